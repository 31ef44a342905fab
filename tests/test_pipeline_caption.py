"""CogView2CaptionPipeline: the caption layout (Eq. 1), decoding modes, ranking, errors, the CLI, and the demo model
captioning held-out scenes above chance."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from coglm_hf.attention_masks import caption_scoring_position_ids, caption_scoring_regions
from coglm_hf.cli import main
from coglm_hf.configuration_coglm import CogLMConfig
from coglm_hf.demo import default_model_path
from coglm_hf.demo.evaluate_captioning import chance_rows, read_caption, score_caption
from coglm_hf.demo.shapes import HIRES_SIZE, caption_en, caption_zh, heldout_prompts, render
from coglm_hf.pipeline_cogview2_caption import CogView2CaptionPipeline
from coglm_hf.training.collators import CogLMPretrainingCollator, caption_row


@pytest.fixture(scope="module")
def captioner():
    pipe = CogView2CaptionPipeline.from_pretrained(default_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def scenes():
    return [sample.scene for sample in heldout_prompts(6)]


@pytest.fixture(scope="module")
def image_tokens(captioner, scenes):
    return captioner.encode_images([render(scene, HIRES_SIZE) for scene in scenes])


def _manual_greedy(model, image: torch.Tensor, tag: int, steps: int, end: int | None) -> list[int]:
    """Greedy captioning without a cache: the full pretraining caption row, Eq. 1 mask from its regions."""
    config = model.config
    num_image = image.numel()
    ids: list[int] = []
    for _ in range(steps):
        input_ids = torch.cat([image, torch.tensor([tag] + ids)])[None]
        positions = caption_scoring_position_ids(num_image, len(ids), config.boi_position_id)
        regions = [caption_scoring_regions(num_image, len(ids))]
        logits = model(input_ids, position_ids=positions, mask_regions=regions, text_attention_bias=0.0).logits[0, -1]
        allowed = torch.full_like(logits, float("-inf"))
        allowed[config.text_token_offset : config.boi_token_id] = 0
        if end is not None:
            allowed[end] = 0
        token = int((logits + allowed).argmax())
        if token == end:
            break
        ids.append(token)
    return ids


@pytest.mark.parametrize("language", ["en", "zh"])
def test_cached_generate_matches_the_pretraining_caption_row(captioner, image_tokens, language):
    config = captioner.base_model.config
    tag = config.start_of_english_token_id if language == "en" else config.start_of_chinese_token_id
    output = captioner(image_tokens=image_tokens[:2], language=language, max_new_tokens=12)
    for row, ids in zip(image_tokens[:2], output.caption_ids):
        with torch.no_grad():
            expected = _manual_greedy(captioner.base_model, row, tag, 12, captioner.end_token_id())
        assert ids[0] == expected
    assert output.scores is None and all(isinstance(c[0], str) and c[0] for c in output.captions)


def test_images_and_their_tokens_give_the_same_captions_and_batching_changes_nothing(captioner, scenes, image_tokens):
    images = [render(scene, HIRES_SIZE) for scene in scenes[:3]]
    batched = captioner(images, batch_size=3, max_new_tokens=10).captions
    one_by_one = [captioner(image_tokens=image_tokens[i : i + 1], max_new_tokens=10).captions[0] for i in range(3)]
    assert batched == one_by_one


def test_beam_search_ranked_by_caption_score(captioner, image_tokens):
    output = captioner(image_tokens=image_tokens[:2], num_beams=4, num_captions_per_image=3, rank_by_score=True,
                       max_new_tokens=12)
    assert output.scores.shape == (2, 3)
    assert torch.all(output.scores[:, :-1] >= output.scores[:, 1:])
    tag = captioner.base_model.config.start_of_english_token_id
    for i, captions in enumerate(output.caption_ids):
        expected = captioner.base_model.score_captions(image_tokens[i : i + 1].expand(3, -1), captions,
                                                       language_token_id=tag)
        torch.testing.assert_close(output.scores[i], expected.float(), rtol=1e-5, atol=1e-5)


def test_sampling_follows_the_generator_only(captioner, image_tokens):
    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return captioner(image_tokens=image_tokens[:2], do_sample=True, num_captions_per_image=3, top_k=20,
                         generator=generator, max_new_tokens=12).caption_ids

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sample(0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert sample(0) == first
    assert sample(1) != first
    assert len(first) == 2 and all(len(c) == 3 for c in first)


def test_from_pipe_shares_the_weights_and_from_pretrained_skips_super_resolution(captioner):
    from coglm_hf.pipeline_cogview2 import CogView2Pipeline

    assert captioner.dsr_model is None and captioner.itersr_model is None
    pipe = CogView2Pipeline(**{name: getattr(captioner, name) for name in
                               ("tokenizer", "image_tokenizer", "base_model", "dsr_model", "itersr_model", "scheduler")})
    shared = CogView2CaptionPipeline.from_pipe(pipe)
    assert shared.base_model is pipe.base_model and shared.image_tokenizer is pipe.image_tokenizer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of image"),
        ({"image_tokens": torch.zeros(1, 100, dtype=torch.long), "image": render(heldout_prompts(1)[0].scene)},
         "exactly one of image"),
        ({"image_tokens": torch.zeros(1, 100, dtype=torch.long), "language": "fr"}, "language must be"),
        ({"image_tokens": torch.zeros(1, 100, dtype=torch.long), "num_captions_per_image": 2}, "greedy decoding"),
        ({"image_tokens": torch.zeros(1, 100, dtype=torch.long), "num_beams": 2, "num_captions_per_image": 3},
         "at most num_beams"),
        ({"image_tokens": torch.zeros(1, 100, dtype=torch.long), "max_new_tokens": 500}, "max_new_tokens"),
        ({"image_tokens": torch.zeros(1, 99, dtype=torch.long)}, "10×10"),
        ({"image_tokens": torch.full((1, 100), 5000, dtype=torch.long)}, "VQ ids"),
        ({"image": []}, "no images"),
    ],
)
def test_bad_arguments_are_clear_errors(captioner, kwargs, message):
    with pytest.raises(ValueError, match=message):
        captioner(**kwargs)


# ------------------------------------------------------------------------------------------------ training rows
def test_caption_rows_can_end_with_an_end_token():
    config = CogLMConfig(vocab_size=1083, num_image_tokens=1024, text_token_offset=1024, boi_token_id=1080,
                         start_of_english_token_id=1081, start_of_chinese_token_id=1082, image_grid_size=4,
                         boi_position_id=32, max_position_embeddings=64, max_text_length=8, hidden_size=32,
                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    grid = torch.arange(16).view(4, 4)
    patches = torch.zeros(4, 4, dtype=torch.bool)
    row = caption_row(grid, [1030, 1031], patches, config.start_of_english_token_id, config, end_token_id=1025)
    assert row.input_ids[16:] == [1081, 1030, 1031, 1025]
    assert row.labels[17:] == [1030, 1031, 1025] and row.mask_regions == [(16, 19)]
    long_row = caption_row(grid, list(range(1030, 1045)), patches, 1081, config, end_token_id=1025)
    assert len(long_row.input_ids) == 16 + 1 + 8 and long_row.input_ids[-1] == 1025  # truncated, end kept
    with pytest.raises(ValueError, match="caption_end_token_id"):
        CogLMPretrainingCollator(config, caption_end_token_id=1080)
    collator = CogLMPretrainingCollator(config, caption_ratio=1.0, caption_end_token_id=1025)
    batch = collator([{"image_tokens": grid, "text_ids": [1030, 1031]}])
    assert batch["input_ids"][0, -1] == 1025 and batch["labels"][0, -1] == 1025


# ------------------------------------------------------------------------------------------------ evaluation
def test_caption_reader_understands_both_languages():
    for index, sample in enumerate(heldout_prompts(8)):
        for caption in (caption_en(sample.scene, random.Random(index)), caption_zh(sample.scene, random.Random(index))):
            verdict = score_caption(caption, sample.scene)
            assert verdict.scene, caption
    reading = read_caption("a red circle below a blue star on a white background 高清摄影")
    assert reading.background == "white" and reading.objects == (("red", "circle"), ("blue", "star"))
    assert not score_caption("a red circle on a white background a green square", heldout_prompts(1)[0].scene).scene


def test_demo_model_captions_held_out_scenes_above_chance(captioner):
    samples = heldout_prompts(12)
    output = captioner([sample.image(HIRES_SIZE) for sample in samples])
    verdicts = [score_caption(c[0], s.scene) for c, s in zip(output.captions, samples)]
    chance = chance_rows([s.scene for s in samples], num_scenes=100)[0]
    background, colors, objects = (np.mean([getattr(v, k) for v in verdicts]) for k in ("background", "colors",
                                                                                        "objects"))
    print(f"held-out captions: background {background:.2f} (chance {chance.background:.2f}), object colours "
          f"{colors:.2f} (chance {chance.colors:.3f}), objects {objects:.2f} (chance {chance.objects:.3f})")
    assert background >= chance.background + 0.6  # measured 1.00 with the shipped (captioning-finetuned) model
    assert colors >= max(0.6, 5 * chance.colors)  # measured 0.83
    assert objects >= max(0.15, 10 * chance.objects)  # measured 0.33
    # the finetune taught captions to end: they stop at <eos>, well before the text length
    config = captioner.base_model.config
    limit = min(config.max_text_length, config.boi_position_id - 1)
    assert sum(len(ids[0]) < limit for ids in output.caption_ids) >= 0.9 * len(samples)


def test_cli_caption_prints_one_caption_per_line(tmp_path, capsys):
    paths = []
    for index, sample in enumerate(heldout_prompts(2)):
        paths.append(tmp_path / f"scene{index}.png")
        sample.image(HIRES_SIZE).save(paths[-1])
    assert main(["caption", str(paths[0])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "background" in lines[0]
    assert main(["caption", *map(str, paths), "--num-captions", "2", "--language", "zh"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith(str(paths[i // 2]) + ": ") for i, line in enumerate(lines))
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["caption", str(tmp_path / "notes.txt")]) == 1
    assert "not an image file" in capsys.readouterr().err
    assert main(["caption", str(tmp_path / "missing.png")]) == 1
