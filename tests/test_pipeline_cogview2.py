"""CogView2Pipeline on tiny random components: outputs, batching, determinism, post-selection, callbacks,
saving/loading (both routes, fresh processes) and input validation.

The tiny pipeline: a sentencepiece model trained here (text ids after 64 image ids), a 4×4 → 12×12 grid with 3×3
windows, hidden size 32, an IceVQModel with 64 codes (rate 8: 12×12 tokens ↔ 96×96 pixels) and 8 clusters.
The builders are imported by the other pipeline test files.
"""

from __future__ import annotations

import io
import json
import random
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import sentencepiece as spm
import torch
from conftest import run_without_coglm_hf

from coglm_hf import CogLMConfig, CogLMDirectSRConfig, CogLMForMaskedRegions, CogLMIterativeSRConfig, CogView2Scheduler
from coglm_hf.modeling_coglm_sr import CogLMForDirectSuperResolution, CogLMForIterativeSuperResolution
from coglm_hf.modeling_icevq import IceVQModel
from coglm_hf.pipeline_cogview2 import CogView2Pipeline, CogView2PipelineOutput
from coglm_hf.tokenization_coglm import CogLMTokenizer

NUM_CODES = 64
LOW, HIGH = 4, 12
DETERMINISTIC = dict(top_k_clusters=1, cluster_temperature=0, dsr_top_k_clusters=1, dsr_cluster_temperature=0,
                     itersr_top_k=1)

WORDS = "a the red blue green cat dog house tree river sky small big photo of painting on under".split()
CHARS = "高清摄影隔绝平面风格漫画油画素描等距矢量图水墨国画水彩一只猫狗"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models: one thread avoids OpenMP spin-waits that make every op ~20× slower on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def train_sentencepiece(path: Path) -> Path:
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) + " "
              + "".join(rng.choice(CHARS) for _ in range(rng.randint(1, 6))) for _ in range(500)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buffer, vocab_size=100,
                                   model_type="unigram", pad_id=3, character_coverage=1.0, minloglevel=2)
    path.write_bytes(buffer.getvalue())
    return path


def build_tiny_pipeline(model_file: Path, seed: int = 0, pipeline_cls=CogView2Pipeline):
    """All six components at tiny sizes, random weights (seeded)."""
    tokenizer = CogLMTokenizer.from_sentencepiece(model_file, text_token_offset=NUM_CODES)
    boi = tokenizer.boi_token_id
    common = dict(vocab_size=boi + 8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, num_image_tokens=NUM_CODES,
                  text_token_offset=NUM_CODES, boi_token_id=boi, start_of_english_token_id=boi + 1,
                  start_of_chinese_token_id=boi + 2, boi_position_id=40, image_grid_size=LOW, max_text_length=32,
                  initializer_range=0.3)  # sharper than the default 0.02: outputs depend visibly on every input
    sr = dict(hires_grid_size=HIGH, hires_position_offset=64, local_window=(3, 3), cross_window=(3, 3))
    torch.manual_seed(seed)
    base = CogLMForMaskedRegions(CogLMConfig(**common)).eval()
    dsr = CogLMForDirectSuperResolution(CogLMDirectSRConfig(**common, **sr, sr_text_slots=24)).eval()
    itersr = CogLMForIterativeSuperResolution(CogLMIterativeSRConfig(**common, **sr, sr_text_slots=8)).eval()
    vq = IceVQModel(channels=8, z_channels=8, embedding_dim=8, num_embeddings=NUM_CODES, norm_num_groups=4,
                    attn_resolutions=()).eval()
    scheduler = CogView2Scheduler(cluster_labels=[i % 8 for i in range(NUM_CODES)])
    pipe = pipeline_cls(tokenizer=tokenizer, image_tokenizer=vq, base_model=base, dsr_model=dsr, itersr_model=itersr,
                        scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("spm") / "tiny.model")


@pytest.fixture(scope="module")
def pipe(spm_model):
    return build_tiny_pipeline(spm_model)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tokens_of(pipe, **kwargs) -> torch.Tensor:
    return pipe(output_type="tokens", **kwargs).images


# ------------------------------------------------------------------------------------------------------- outputs


def test_every_output_type(pipe):
    out = pipe("a red cat", num_images_per_prompt=2, generator=seeded(), output_type="pil")
    assert isinstance(out, CogView2PipelineOutput) and out.scores is None
    assert len(out.images) == 2 and all(isinstance(i, PIL.Image.Image) and i.size == (96, 96) for i in out.images)
    array = pipe("a red cat", num_images_per_prompt=2, generator=seeded(), output_type="np").images
    assert array.shape == (2, 96, 96, 3) and array.dtype == np.float32 and 0 <= array.min() and array.max() <= 1
    np.testing.assert_allclose(np.asarray(out.images[0], dtype=np.float32) / 255, array[0], atol=1 / 255 + 1e-6)
    tensor = pipe("a red cat", num_images_per_prompt=2, generator=seeded(), output_type="pt").images
    assert tensor.shape == (2, 3, 96, 96)
    torch.testing.assert_close(tensor.permute(0, 2, 3, 1), torch.from_numpy(array))
    tokens = tokens_of(pipe, prompt="a red cat", num_images_per_prompt=2, generator=seeded())
    assert tokens.shape == (2, HIGH, HIGH) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < NUM_CODES
    # the images are the decoded tokens
    decoded = pipe.image_tokenizer.decode(tokens).clamp(0, 1)
    torch.testing.assert_close(decoded, tensor, atol=1e-5, rtol=0)

    first = pipe("a red cat", only_first_stage=True, generator=seeded(), output_type="tokens", return_dict=False)
    assert isinstance(first, tuple) and first[0].shape == (1, LOW, LOW)
    images = pipe("a red cat", only_first_stage=True, generator=seeded(), output_type="pt").images
    # first-stage images: the 32-pixel decode enlarged ×3 by nearest neighbour, like the official script
    small = pipe.image_tokenizer.decode(first[0]).clamp(0, 1)
    assert images.shape == (1, 3, 96, 96)
    torch.testing.assert_close(images[:, :, ::3, ::3], small, atol=1e-5, rtol=0)


def test_prompt_ids_without_tokenizer_or_image_tokenizer(pipe):
    ids = pipe.tokenizer.encode_prompt("a red cat", style="mainbody")
    bare = CogView2Pipeline(tokenizer=None, image_tokenizer=None, base_model=pipe.base_model, dsr_model=pipe.dsr_model,
                            itersr_model=pipe.itersr_model, scheduler=pipe.scheduler)
    bare.set_progress_bar_config(disable=True)
    expected = tokens_of(pipe, prompt="a red cat", generator=seeded(3))
    # with or without the trailing <start_of_image>, as a list or a tensor
    torch.testing.assert_close(tokens_of(bare, prompt_ids=[ids], generator=seeded(3)), expected, rtol=0, atol=0)
    torch.testing.assert_close(tokens_of(bare, prompt_ids=torch.tensor(ids[:-1]), generator=seeded(3)), expected,
                               rtol=0, atol=0)
    assert tokens_of(bare, prompt_ids=ids, only_first_stage=True).shape == (1, LOW, LOW)
    stage1_only = CogView2Pipeline(tokenizer=None, image_tokenizer=None, base_model=pipe.base_model, dsr_model=None,
                                   itersr_model=None, scheduler=pipe.scheduler)
    stage1_only.set_progress_bar_config(disable=True)
    assert tokens_of(stage1_only, prompt_ids=ids, only_first_stage=True).shape == (1, LOW, LOW)


# ------------------------------------------------------------------------------------------ batching, randomness


@pytest.mark.parametrize("batch", range(1, 8))
def test_batch_sizes_with_chunking(pipe, batch):
    kwargs = dict(prompt="a blue house", num_images_per_prompt=batch, stage1_batch_size=2, sr_batch_size=3)
    tokens = tokens_of(pipe, generator=seeded(batch), **kwargs)
    assert tokens.shape == (batch, HIGH, HIGH)  # no sample dropped when batch % chunk != 0
    torch.testing.assert_close(tokens_of(pipe, generator=seeded(batch), **kwargs), tokens, rtol=0, atol=0)
    if batch > 1:
        flat = tokens.view(batch, -1)
        assert len({tuple(row.tolist()) for row in flat}) == batch  # independent samples, not copies


def test_chunking_keeps_order_and_results(pipe):
    """Deterministic settings: chunk sizes must not change any sample or its place in the batch."""
    prompts = [pipe.tokenizer.encode_prompt(text) for text in ("a cat", "a dog", "red tree", "blue sky", "big river",
                                                                "old house", "a small photo")]
    reference = tokens_of(pipe, prompt_ids=prompts, **DETERMINISTIC)
    chunked = tokens_of(pipe, prompt_ids=prompts, stage1_batch_size=2, sr_batch_size=3, **DETERMINISTIC)
    torch.testing.assert_close(chunked, reference, rtol=0, atol=0)
    single = tokens_of(pipe, prompt_ids=prompts[3:4], **DETERMINISTIC)
    torch.testing.assert_close(single[0], reference[3], rtol=0, atol=0)
    assert len({tuple(t.flatten().tolist()) for t in reference}) > 1


def test_generator_reproducibility(pipe):
    first = pipe(["a cat", "a dog"], num_images_per_prompt=2, generator=seeded(7), output_type="np").images
    again = pipe(["a cat", "a dog"], num_images_per_prompt=2, generator=seeded(7), output_type="np").images
    other = pipe(["a cat", "a dog"], num_images_per_prompt=2, generator=seeded(8), output_type="np").images
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_style_template_and_overrides(pipe):
    (flat,) = pipe.encode_prompts("a cat", None, "flat", super_resolution=True)
    assert flat.text_ids == pipe.tokenizer.encode_prompt("a cat", style="flat")[:-1]
    assert flat.caption_ids == pipe.tokenizer.encode("a cat", add_special_tokens=False)
    (plain,) = pipe.encode_prompts("a cat", None, "none", super_resolution=True)
    assert plain.text_ids != flat.text_ids
    # the flat recipe's direct-SR overrides take effect: 5 clusters at temperature 0.4 differ from 100 at 0.89
    assert pipe.scheduler.sampler_settings("flat")["dsr_top_k_clusters"] == 5
    flat_tokens = tokens_of(pipe, prompt_ids=[flat.text_ids], style="flat", generator=seeded(1))
    none_tokens = tokens_of(pipe, prompt_ids=[flat.text_ids], style="none", generator=seeded(1))
    assert not torch.equal(flat_tokens, none_tokens)
    explicit = tokens_of(pipe, prompt_ids=[flat.text_ids], style="none", generator=seeded(1), temperature=1.1,
                         dsr_top_k_clusters=5, dsr_cluster_temperature=0.4)
    torch.testing.assert_close(explicit, flat_tokens, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- post-selection


def test_post_selection_keeps_best_candidates(pipe):
    prompts, keep, candidates = ["a red cat", "a green tree"], 2, 5
    seen, kept_indices = {}, []

    def callback(p, step, stage, kwargs):
        if stage == "stage1" and step == LOW * LOW - 1:
            for index, grid in zip(kwargs["sample_indices"].tolist(), kwargs["image_tokens"]):
                seen[index] = grid.clone()
        if stage == "selection":
            kept_indices.extend(kwargs["sample_indices"].tolist())
        return {}

    out = pipe(prompts, num_images_per_prompt=keep, num_candidates=candidates, only_first_stage=True,
               generator=seeded(4), output_type="tokens", callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["image_tokens", "sample_indices"], stage1_batch_size=2)
    assert sorted(seen) == list(range(len(prompts) * candidates))
    # independent scoring of every candidate with the raw prompt text
    all_scores = []
    for p, text in enumerate(prompts):
        grids = torch.stack([seen[p * candidates + c] for c in range(candidates)])
        caption = pipe.tokenizer.encode(text, add_special_tokens=False)
        all_scores.append(pipe.base_model.score_captions(grids, caption))
    expected = [p * candidates + int(i) for p, s in enumerate(all_scores) for i in s.argsort(descending=True)[:keep]]
    assert kept_indices == expected
    torch.testing.assert_close(out.images, torch.stack([seen[i] for i in expected]), rtol=0, atol=0)
    torch.testing.assert_close(out.scores, torch.cat([s.sort(descending=True).values[:keep] for s in all_scores]))
    # the super-resolution stages receive the kept candidates
    lows = []
    pipe(prompts, num_images_per_prompt=keep, num_candidates=candidates, generator=seeded(4), output_type="tokens",
         stage1_batch_size=2, callback_on_step_end=lambda p, step, stage, kw: lows.append(kw["image_tokens"])
         if stage == "selection" else {})
    torch.testing.assert_close(lows[0], out.images, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------- callbacks


def test_callbacks_see_every_stage(pipe):
    calls = []

    def callback(p, step, stage, kwargs):
        assert p is pipe
        calls.append((stage, step, tuple(kwargs["image_tokens"].shape), tuple(kwargs["sample_indices"].tolist())))
        if stage == "itersr" and step == 5:
            return {"image_tokens": torch.full_like(kwargs["image_tokens"], 3)}  # replace the final tokens
        return {}

    out = pipe("a cat", num_images_per_prompt=3, num_candidates=4, generator=seeded(), output_type="tokens",
               stage1_batch_size=2, sr_batch_size=2, callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["image_tokens", "sample_indices"])
    stage1 = [c for c in calls if c[0] == "stage1"]
    assert [c[1] for c in stage1] == list(range(16)) * 2  # candidate chunks of 2
    assert {c[3] for c in stage1} == {(0, 1), (2, 3)} and stage1[0][2] == (2, LOW, LOW)
    assert [c[:3] for c in calls if c[0] == "selection"] == [("selection", 0, (3, LOW, LOW))]
    assert [c[3] for c in calls if c[0] == "dsr"] == [(0, 1), (2,)]
    itersr = [c for c in calls if c[0] == "itersr"]
    assert [c[1] for c in itersr] == list(range(6)) * 2 and itersr[0][2] == (2, HIGH, HIGH)
    order = [c[0] for c in calls]
    assert order.index("selection") > max(i for i, s in enumerate(order) if s == "stage1")
    assert order.index("dsr") > order.index("selection") and order.index("itersr") > order.index("dsr")
    assert bool((out.images == 3).all())


def test_stage1_callback_grid_and_replacement(pipe):
    grids = []

    def callback(p, step, stage, kwargs):
        grid = kwargs["image_tokens"]
        grids.append(grid.clone())
        if step == 0:
            grid = grid.clone()
            grid.view(-1)[0] = 5  # the replaced token is fed on
            return {"image_tokens": grid}
        return {}

    out = tokens_of(pipe, prompt="a cat", only_first_stage=True, generator=seeded(), callback_on_step_end=callback)
    assert int((grids[0] >= 0).sum()) == 1 and int((grids[-1] < 0).sum()) == 0  # -1 = not generated yet
    assert int(out.view(-1)[0]) == 5


# ------------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(spm_model, dtype):
    half = build_tiny_pipeline(spm_model).to(dtype=dtype)
    assert half.base_model.dtype == dtype and half.image_tokenizer.dtype == dtype
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        images = half("a red cat", num_images_per_prompt=2, generator=seeded(), output_type="np").images
        assert 0 <= int(tokens_of(half, prompt="a cat", generator=seeded()).min())
    assert images.shape == (2, 96, 96, 3) and np.isfinite(images).all()
    slow = [w for w in caught if "float16 on the CPU" in str(w.message)]
    assert len(slow) == (1 if dtype == torch.float16 else 0)  # float16 on CPU: warned once, however often it runs


@pytest.mark.gpu
def test_gpu_half_precision_and_cpu_offload(spm_model):
    pipe = build_tiny_pipeline(spm_model).to("cuda", torch.float16)
    tokens = tokens_of(pipe, prompt="a red cat", generator=torch.Generator("cuda").manual_seed(0))
    offloaded = build_tiny_pipeline(spm_model).to(dtype=torch.float16)
    offloaded.enable_model_cpu_offload()
    again = tokens_of(offloaded, prompt="a red cat", generator=torch.Generator("cuda").manual_seed(0))
    torch.testing.assert_close(again, tokens, rtol=0, atol=0)


def test_model_cpu_offload_runs_each_stage_through_its_hook(spm_model):
    """The offload plumbing (one accelerate hook per model, chained in `model_cpu_offload_seq`, encode/decode and
    the SR stages included) checked on the CPU: accelerate accepts the CPU as the execution device for model
    offload, so the hooks run here and must not change a single token or pixel."""
    plain = build_tiny_pipeline(spm_model)
    offloaded = build_tiny_pipeline(spm_model)
    offloaded.enable_model_cpu_offload(device="cpu")
    for name in ("base_model", "dsr_model", "itersr_model", "image_tokenizer"):
        assert getattr(offloaded, name)._hf_hook is not None, name
    for pipe in (plain, offloaded):
        pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(tokens_of(offloaded, prompt="a red cat", generator=seeded(), num_candidates=2),
                               tokens_of(plain, prompt="a red cat", generator=seeded(), num_candidates=2),
                               rtol=0, atol=0)
    np.testing.assert_array_equal(offloaded("a cat", generator=seeded(1), output_type="np").images,
                                  plain("a cat", generator=seeded(1), output_type="np").images)


def test_each_stage_runs_where_its_model_is(spm_model):
    """Stage inputs follow their own model's device: an offload hook's execution device wins over the weights'
    device. With sequential offload attached (accelerate cannot run it with the CPU as execution device, but it
    attaches) the SR weights are on the meta device and the stages still target the execution device."""
    pipe = build_tiny_pipeline(spm_model)
    assert {pipe._device_of(getattr(pipe, name)).type for name in ("base_model", "dsr_model", "itersr_model",
                                                                   "image_tokenizer")} == {"cpu"}
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert pipe.dsr_model.transformer.layers[0].attention.dense.weight.device.type == "meta"
    assert pipe._device_of(pipe.dsr_model) == torch.device("cpu", 0)
    assert getattr(pipe.image_tokenizer, "_hf_hook", None) is None  # moved whole, not hooked: weights not on meta
    assert {p.device.type for p in pipe.image_tokenizer.parameters()} == {"cpu"}


@pytest.mark.gpu
def test_gpu_stages_on_two_devices(spm_model):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    pipe = build_tiny_pipeline(spm_model).to("cuda:0", torch.float16)
    expected = tokens_of(pipe, prompt="a red cat", generator=torch.Generator("cuda:0").manual_seed(0))
    for name in ("dsr_model", "itersr_model", "image_tokenizer"):
        getattr(pipe, name).to("cuda:1")
    tokens = tokens_of(pipe, prompt="a red cat", generator=torch.Generator("cuda:0").manual_seed(0))
    torch.testing.assert_close(tokens.cpu(), expected.cpu(), rtol=0, atol=0)
    assert pipe("a cat", generator=torch.Generator("cuda:0").manual_seed(1), output_type="np").images.shape[0] == 1


@pytest.mark.gpu
def test_gpu_sequential_cpu_offload(spm_model):
    """Weights stay on the CPU and each submodule is moved to the GPU only for its forward (accelerate refuses the
    CPU as the execution device of sequential offload, so this runs on GPUs only)."""
    pipe = build_tiny_pipeline(spm_model).to("cuda", torch.float16)
    expected = pipe("a red cat", generator=torch.Generator("cuda").manual_seed(0), output_type="np").images
    sequential = build_tiny_pipeline(spm_model).to(dtype=torch.float16)
    sequential.enable_sequential_cpu_offload()
    images = sequential("a red cat", generator=torch.Generator("cuda").manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(images, expected)


# ------------------------------------------------------------------------------------------- saving / loading


def test_save_and_load_installed(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "CogView2Pipeline"
    assert index["dsr_model"] == ["remote_modeling_coglm_sr", "CogLMForDirectSuperResolution"]
    for name in ("tokenizer", "image_tokenizer", "base_model", "dsr_model", "itersr_model", "scheduler"):
        assert (tmp_path / "pipe" / name / f"{index[name][0]}.py").is_file()
    assert (tmp_path / "pipe" / "pipeline_cogview2.py").is_file()
    loaded = CogView2Pipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.dsr_model) is type(pipe.dsr_model) and type(loaded.tokenizer) is type(pipe.tokenizer)
    np.testing.assert_array_equal(loaded("a cat", generator=seeded(2), output_type="np").images,
                                  pipe("a cat", generator=seeded(2), output_type="np").images)
    # saving over an existing folder replaces it; loading with a dtype converts every model
    loaded.save_pretrained(tmp_path / "pipe")
    half = CogView2Pipeline.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16, tokenizer=None)
    assert half.tokenizer is None and half.itersr_model.dtype == torch.bfloat16
    assert half.image_tokenizer.dtype == torch.bfloat16


def test_save_without_code_loads_installed(pipe, tmp_path):
    """`remote_code=False` (how the embedded demo is shipped): weights and configs only, the package's classes."""
    pipe.save_pretrained(tmp_path / "plain", remote_code=False)
    assert not list((tmp_path / "plain").rglob("*.py"))
    index = json.loads((tmp_path / "plain" / "model_index.json").read_text())
    assert index["dsr_model"] == ["coglm_hf.modeling_coglm_sr", "CogLMForDirectSuperResolution"]
    assert "_name_or_path" not in index
    assert "auto_map" not in json.loads((tmp_path / "plain" / "itersr_model" / "config.json").read_text())
    loaded = CogView2Pipeline.from_pretrained(tmp_path / "plain")
    loaded.set_progress_bar_config(disable=True)
    assert tokens_of(loaded, prompt="a red cat", generator=seeded(2)).tolist() == \
        tokens_of(pipe, prompt="a red cat", generator=seeded(2)).tolist()


REMOTE_CHILD = r"""
import json, sys, torch
try:
    import coglm_hf  # noqa: F401
    raise SystemExit("coglm_hf must not be importable here")
except ImportError:
    pass
from diffusers import DiffusionPipeline
folder, resaved = sys.argv[1], sys.argv[2]
results = {}
pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder + "/pipeline_cogview2.py",
                                         trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
results["classes"] = [type(pipe).__module__, type(pipe.base_model).__module__, type(pipe.tokenizer).__name__]
run = lambda p: p("a red cat", generator=torch.Generator().manual_seed(5), output_type="tokens").images
results["tokens"] = run(pipe).flatten().tolist()
pipe.save_pretrained(resaved)
again = DiffusionPipeline.from_pretrained(resaved, custom_pipeline=resaved + "/pipeline_cogview2.py",
                                          trust_remote_code=True)
again.set_progress_bar_config(disable=True)
results["resaved_tokens"] = run(again).flatten().tolist()
edit = DiffusionPipeline.from_pretrained(resaved, custom_pipeline=resaved + "/pipeline_cogview2_inpaint.py",
                                         trust_remote_code=True)
results["edit_class"] = type(edit).__name__
print(json.dumps(results))
"""


def test_remote_code_loading_in_fresh_process(pipe, tmp_path):
    folder, resaved = tmp_path / "pipe", tmp_path / "resaved"
    pipe.save_pretrained(folder)
    result = run_without_coglm_hf(REMOTE_CHILD, [str(folder), str(resaved)], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    child = json.loads(result.stdout.strip().splitlines()[-1])
    assert child["classes"][0].startswith("diffusers_modules") and child["classes"][1].startswith("diffusers_modules")
    assert child["classes"][2] == "CogLMTokenizer" and child["edit_class"] == "CogView2InpaintPipeline"
    expected = tokens_of(pipe, prompt="a red cat", generator=seeded(5)).flatten().tolist()
    assert child["tokens"] == expected and child["resaved_tokens"] == expected
    # the folder re-saved by remote code loads the installed way too
    reloaded = CogView2Pipeline.from_pretrained(resaved)
    reloaded.set_progress_bar_config(disable=True)
    assert tokens_of(reloaded, prompt="a red cat", generator=seeded(5)).flatten().tolist() == expected


def test_loading_needs_trust_for_folder_code(pipe, tmp_path):
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path / "pipe", custom_pipeline=str(tmp_path / "pipe" /
                                                                                 "pipeline_cogview2.py"))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        CogView2Pipeline.from_pretrained(tmp_path / "pipe" / "scheduler")
    with pytest.raises(TypeError, match="unexpected"):
        CogView2Pipeline.from_pretrained(tmp_path / "pipe", low_cpu_mem=True)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs(pipe):
    ids = pipe.tokenizer.encode_prompt("a cat")
    cases = [
        (dict(prompt=""), ValueError, "empty"),
        (dict(prompt=["a cat", "   "]), ValueError, "empty"),
        (dict(prompt=None), ValueError, "exactly one"),
        (dict(prompt="a cat", prompt_ids=[ids]), ValueError, "exactly one"),
        (dict(prompt_ids=[[]]), ValueError, "empty"),
        (dict(prompt_ids=[[pipe.tokenizer.boi_token_id, *ids]]), ValueError, "only at the end"),
        (dict(prompt_ids=[[-1, 70]]), ValueError, "ids in"),
        (dict(prompt_ids="a cat"), TypeError, "prompt_ids"),
        (dict(prompt=3), TypeError, "prompt must be"),
        (dict(prompt="a cat", style="cubism"), ValueError, "Unknown style"),
        (dict(prompt="a cat", output_type="latents"), ValueError, "output_type"),
        (dict(prompt="a cat", num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
        (dict(prompt="a cat", num_images_per_prompt=3, num_candidates=2), ValueError, "num_candidates"),
        (dict(prompt="a cat", sr_batch_size=0), ValueError, "sr_batch_size"),
        (dict(prompt="a cat", itersr_top_k=[1, 2]), ValueError, "one value per LoPAR pass"),
        (dict(prompt="a cat", temperature=0), ValueError, "temperature"),
        (dict(prompt="a cat", generator=[seeded(), seeded()]), ValueError, "one generator per image"),
        (dict(prompt="a cat", callback_on_step_end_tensor_inputs=["latents"]), ValueError, "not available"),
        (dict(prompt="a cat", callback_on_step_end=lambda *a: {"image_tokens": torch.zeros(1)}), ValueError,
         "returned image_tokens"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            pipe(**kwargs)


def test_long_prompts(pipe):
    long_ids = [70] * 25  # fits stage 1 (32 tokens) but not the 24 text slots of direct SR
    with pytest.raises(ValueError, match="direct super-resolution accepts at most 24"):
        pipe(prompt_ids=[long_ids], output_type="tokens")
    assert tokens_of(pipe, prompt_ids=[long_ids], only_first_stage=True).shape == (1, LOW, LOW)
    with pytest.raises(ValueError, match="stage 1 accepts at most 32"):
        pipe(prompt_ids=[[70] * 33], only_first_stage=True, output_type="tokens")
    with pytest.raises(ValueError, match="style template included"):
        pipe(" ".join(["cat"] * 30), output_type="tokens")
    # iterative SR sees only the first sr_text_slots (8) prompt ids, as the official pipeline: ids beyond do not
    # change its result
    seen = {}

    def callback(p, step, stage, kwargs):
        seen[stage] = kwargs["image_tokens"].clone()
        return {}

    prompts = [[70 + i for i in range(20)], [70 + i for i in range(8)] + [99] * 12]
    tokens_of(pipe, prompt_ids=prompts[:1], callback_on_step_end=callback, **DETERMINISTIC)
    dsr_tokens = seen["dsr"]
    itersr_a = pipe.iterative_super_resolution(dsr_tokens, prompts[:1], pipe.scheduler.sampler_settings(
        "none", itersr_top_k=1), None, 4)
    itersr_b = pipe.iterative_super_resolution(dsr_tokens, prompts[1:], pipe.scheduler.sampler_settings(
        "none", itersr_top_k=1), None, 4)
    torch.testing.assert_close(itersr_a, itersr_b, rtol=0, atol=0)


def test_missing_or_mismatched_components(pipe):
    parts = dict(pipe.components)
    cases = [
        (dict(parts, tokenizer=None), dict(prompt="a cat"), "tokenizer"),
        (dict(parts, image_tokenizer=None), dict(prompt="a cat"), "image_tokenizer"),
        (dict(parts, dsr_model=None), dict(prompt="a cat", output_type="tokens"), "dsr_model"),
        (dict(parts, itersr_model=None), dict(prompt="a cat", output_type="tokens"), "itersr_model"),
        (dict(parts, scheduler=CogView2Scheduler()), dict(prompt="a cat"), "no cluster labels"),
        (dict(parts, scheduler=CogView2Scheduler(cluster_labels=[0, 1] * 10)), dict(prompt="a cat"),
         "cluster labels for 20"),
    ]
    for components, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            CogView2Pipeline(**components)(**kwargs)


@pytest.mark.parametrize("compiled", [False, True])
def test_stage1_static_cache_and_compiled_steps_give_the_same_tokens(spm_model, compiled):
    pipe = build_tiny_pipeline(spm_model)
    kwargs = dict(prompt=["a cat", "a dog"], num_images_per_prompt=3, stage1_batch_size=2, only_first_stage=True)
    reference = tokens_of(pipe, generator=seeded(3), **kwargs)  # sampled, chunks of 2 + 1 sharing a prompt cache
    # the "eager" backend traces the whole step (fullgraph) without generating code: cheap on CI's CPU
    pipe.set_stage1_decoding("static", compile=compiled, **({"backend": "eager"} if compiled else {}))
    torch._dynamo.reset()
    torch.testing.assert_close(tokens_of(pipe, generator=seeded(3), **kwargs), reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="static"):
        pipe.set_stage1_decoding("dynamic", compile=True)
    with pytest.raises(ValueError, match="cache_implementation"):
        pipe.set_stage1_decoding("sliding")
