"""CogView2Pipeline follows Diffusers' pipeline conventions: save/load options (variant, max_shard_size,
safe_serialization, device_map), per-component loading messages, optional components left out, a list of
generators (one per image) and output_type="latent". Tiny random components (see test_pipeline_cogview2.py)."""

from __future__ import annotations

import json
import logging
import pickle

import diffusers
import numpy as np
import pytest
import torch
from test_pipeline_cogview2 import DETERMINISTIC, HIGH, LOW, build_tiny_pipeline, seeded, single_thread  # noqa: F401
from test_pipeline_cogview2 import spm_model as spm_model  # noqa: F401  (fixture)

from coglm_hf.pipeline_cogview2 import CogView2Pipeline
from coglm_hf.pipeline_cogview2_inpaint import CogView2InpaintPipeline

MODELS = ("image_tokenizer", "base_model", "dsr_model", "itersr_model")


@pytest.fixture(scope="module")
def pipe(spm_model):
    return build_tiny_pipeline(spm_model)


def weights_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json")
                  and ("model" in p.name))


def assert_same_models(a, b):
    for name in MODELS:
        for (key, x), (_, y) in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().items()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"{name}.{key}")


# ------------------------------------------------------------------------------------------ save / load options


def test_variant_and_pickle_free_loading(pipe, tmp_path):
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder, variant="fp16", safe_serialization=False)
    index = json.loads((folder / "model_index.json").read_text())
    for name in MODELS:
        assert name in index
        names = [p.name for p in (folder / name).iterdir()]
        assert any(n.split(".")[1] == "fp16" for n in names), names
    # as in Diffusers: the Diffusers component writes a pickle, the transformers models stay on safetensors
    assert (folder / "image_tokenizer" / "diffusion_pytorch_model.fp16.bin").is_file()
    assert (folder / "base_model" / "model.fp16.safetensors").is_file()

    logger = diffusers.utils.logging.get_logger("diffusers.pipelines.pipeline_utils")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        loaded = CogView2Pipeline.from_pretrained(folder, variant="fp16")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    messages = " ".join(r.getMessage() for r in records)
    for name in ("tokenizer", *MODELS, "scheduler"):
        assert f"Loaded {name} as" in messages
    assert_same_models(pipe, loaded)
    with pytest.raises(FileNotFoundError, match="no weights of variant 'bf16'"):
        CogView2Pipeline.from_pretrained(folder, variant="bf16")

    # the pickle is read with weights_only=True: a pickle that would run code is refused, the code never runs
    marker = tmp_path / "pickled-code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "image_tokenizer" / "diffusion_pytorch_model.fp16.bin").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(OSError, match="Unable to load weights"):
        CogView2Pipeline.from_pretrained(folder, variant="fp16")
    assert not marker.exists()


def test_shards_and_device_map(pipe, tmp_path):
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder, max_shard_size="20KB")
    shards = [p.name for p in (folder / "base_model").iterdir() if p.name.startswith("model-")]
    assert len(shards) > 1 and (folder / "base_model" / "model.safetensors.index.json").is_file()
    loaded = CogView2Pipeline.from_pretrained(folder, device_map="cpu")
    assert_same_models(pipe, loaded)
    assert all(getattr(loaded, name).device.type == "cpu" for name in MODELS)
    loaded = CogView2Pipeline.from_pretrained(folder, device_map={"base_model": torch.device("cpu")})
    assert loaded.base_model.device.type == "cpu"
    for bad in ("bogus", 0, -5, "5 parsecs", True):
        with pytest.raises(ValueError, match="max_shard_size"):
            pipe.save_pretrained(tmp_path / "other", max_shard_size=bad)
    with pytest.raises(ValueError, match="variant"):
        pipe.save_pretrained(tmp_path / "other", variant="../x")
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="device_map"):
        CogView2Pipeline.from_pretrained(folder, device_map="balanced")
    with pytest.raises(ValueError, match="device_map names"):
        CogView2Pipeline.from_pretrained(folder, device_map={"unet": "cpu"})


def test_optional_components_save_and_load_as_none(pipe, tmp_path):
    assert set(CogView2Pipeline._optional_components) == {"tokenizer", "image_tokenizer", "dsr_model",
                                                         "itersr_model"}
    for optional in CogView2Pipeline._optional_components:
        parts = dict(pipe.components, **{optional: None})
        partial = CogView2Pipeline(**parts)
        partial.set_progress_bar_config(disable=True)
        folder = tmp_path / optional
        partial.save_pretrained(folder)
        assert not (folder / optional).exists()
        assert json.loads((folder / "model_index.json").read_text())[optional] == [None, None]
        loaded = CogView2Pipeline.from_pretrained(folder)
        assert getattr(loaded, optional) is None
        for name in set(CogView2Pipeline._optional_components) - {optional}:
            assert getattr(loaded, name) is not None
        # a call that does not need the missing component gives the same result as before saving
        call = dict(prompt_ids=[pipe.tokenizer.encode_prompt("a cat")], output_type="tokens",
                    only_first_stage=optional in ("dsr_model", "itersr_model"))
        loaded.set_progress_bar_config(disable=True)
        torch.testing.assert_close(loaded(**call, generator=seeded(3)).images,
                                   partial(**call, generator=seeded(3)).images, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("candidates", [None, 2])
def test_generator_list_equals_single_runs(pipe, candidates):
    seeds = [11, 12, 13]
    prompts = ["a red cat", "a blue house"]
    kwargs = dict(num_candidates=candidates, output_type="tokens", stage1_batch_size=3, sr_batch_size=2)
    batched = pipe(prompts, num_images_per_prompt=len(seeds),
                   generator=[seeded(s) for _ in prompts for s in seeds], **kwargs)
    assert batched.images.shape == (len(prompts) * len(seeds), HIGH, HIGH)
    for i, (prompt, seed) in enumerate([(p, s) for p in prompts for s in seeds]):
        alone = pipe(prompt, generator=seeded(seed), **kwargs)
        torch.testing.assert_close(batched.images[i], alone.images[0], rtol=0, atol=0)
        if candidates:
            torch.testing.assert_close(batched.scores[i], alone.scores[0])
    # a list of one generator is the same as the generator
    torch.testing.assert_close(pipe("a red cat", generator=[seeded(5)], **kwargs).images,
                               pipe("a red cat", generator=seeded(5), **kwargs).images, rtol=0, atol=0)


def test_generator_list_first_stage_and_editing(pipe):
    first = pipe("a cat", num_images_per_prompt=2, generator=[seeded(1), seeded(2)], only_first_stage=True,
                 output_type="latent").images
    assert first.shape == (2, LOW, LOW) and first.dtype == torch.long
    for i, seed in enumerate((1, 2)):
        alone = pipe("a cat", generator=seeded(seed), only_first_stage=True, output_type="latent").images
        torch.testing.assert_close(first[i], alone[0], rtol=0, atol=0)
    edit = CogView2InpaintPipeline.from_pipe(pipe)
    image = torch.rand(3, 96, 96, generator=seeded(0))
    call = dict(prompt="a dog", image=image, mask_box=(0.25, 0.25, 0.75, 0.75), output_type="latent")
    both = edit(**call, num_images_per_prompt=2, generator=[seeded(7), seeded(8)]).images
    for i, seed in enumerate((7, 8)):
        torch.testing.assert_close(both[i], edit(**call, generator=seeded(seed)).images[0], rtol=0, atol=0)


def test_generator_list_errors(pipe):
    with pytest.raises(ValueError, match="list of 1 generators but the call returns 2 images"):
        pipe("a cat", num_images_per_prompt=2, generator=[seeded()], output_type="tokens")
    with pytest.raises(TypeError, match="torch.Generator or a list of them"):
        pipe("a cat", generator=[seeded(), 3], num_images_per_prompt=2, output_type="tokens")


def test_latent_is_tokens(pipe):
    tokens = pipe("a cat", generator=seeded(4), output_type="tokens").images
    latent = pipe("a cat", generator=seeded(4), output_type="latent").images
    torch.testing.assert_close(tokens, latent, rtol=0, atol=0)
    no_decoder = CogView2Pipeline(**dict(pipe.components, image_tokenizer=None))
    no_decoder.set_progress_bar_config(disable=True)
    assert np.array_equal(no_decoder("a cat", generator=seeded(4), output_type="latent").images, latent)
