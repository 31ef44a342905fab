"""The bad-input and fault sweep: every public entry point (configs, models, the local-attention op, tokenizers, the
VQ model and its image processor, both pipelines, the CLI, the converters and training) fed wrong values, broken or
dangerous files and interrupted runs.

Each case states the exception it must raise and a pattern the message must contain (the argument or file it is
about and, where it helps, what to do). A few cases instead check that a fault is handled without an error (an
empty attention batch, a 0/1 uint8 mask, stale temporary folders, a half-written checkpoint). Tiny models only.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import fixture_dir
from test_pipeline_cogview2 import build_tiny_pipeline, seeded, train_sentencepiece

from coglm_hf import CogLMConfig, CogLMDirectSRConfig, CogLMForMaskedRegions, CogLMIterativeSRConfig
from coglm_hf.cli import main as cli_main
from coglm_hf.convert_cogview2 import convert_cogview2
from coglm_hf.convert_sat import convert_sat_checkpoint, load_sat_state_dict
from coglm_hf.image_processing_icevq import IceVQImageProcessor
from coglm_hf.local_attention import local_attention_2d, set_local_attention_backend
from coglm_hf.modeling_icevq import IceVQModel
from coglm_hf.pipeline_cogview2 import CogView2Pipeline
from coglm_hf.pipeline_cogview2_inpaint import CogView2InpaintPipeline
from coglm_hf.sampling import cluster_sample, top_k_sample
from coglm_hf.tokenization_coglm import CogLMTokenizer
from coglm_hf.training.train import apply_overrides, build_trainer, load_config, resolve_checkpoint
from coglm_hf.training.train import main as train_main

CONFIG_DIR = Path(__file__).resolve().parents[1] / "src" / "coglm_hf" / "training" / "configs"


class Context:
    """Lazily built shared objects; `tmp` is a fresh folder per case."""

    def __init__(self, root: Path):
        self.root = root
        self.tmp: Path = root

    @cached_property
    def spm(self) -> Path:
        return train_sentencepiece(self.root / "tiny.model")

    @cached_property
    def pipe(self) -> CogView2Pipeline:
        return build_tiny_pipeline(self.spm)

    @cached_property
    def edit(self) -> CogView2InpaintPipeline:
        return CogView2InpaintPipeline.from_pipe(self.pipe)

    @cached_property
    def saved(self) -> Path:
        folder = self.root / "saved"
        self.pipe.save_pretrained(folder)
        return folder

    def saved_copy(self) -> Path:
        folder = self.tmp / "copy"
        shutil.copytree(self.saved, folder)
        return folder

    @cached_property
    def sat(self) -> Path:
        return fixture_dir("cogview2_reference") / "checkpoints"

    def sat_copy(self, name: str = "coglm") -> Path:
        target = self.tmp / name
        shutil.copytree(self.sat / name, target)
        for path in [target, *target.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        return target

    @property
    def config_kwargs(self) -> dict:
        return dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=64, num_image_tokens=16, text_token_offset=16, boi_token_id=90,
                    start_of_english_token_id=91, start_of_chinese_token_id=92, boi_position_id=40,
                    image_grid_size=4, max_text_length=32)

    @cached_property
    def base(self) -> CogLMForMaskedRegions:
        torch.manual_seed(0)
        return CogLMForMaskedRegions(CogLMConfig(**self.config_kwargs)).eval()

    @cached_property
    def vq(self) -> IceVQModel:
        return self.pipe.image_tokenizer

    def train_config(self, **changes) -> dict:
        config = {"stage": "base", "model_config": str(CONFIG_DIR / "tiny_base.json"),
                  "data": {"cache_dir": str(self.tmp / "cache")},
                  "training": {"output_dir": str(self.tmp / "run"), "use_cpu": True, "max_steps": 1}}
        config.update(changes)
        return config

    def cli(self, *argv) -> tuple[int, str]:
        """Run `coglm-hf`; returns (exit code, stderr)."""
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli_main([str(a) for a in argv])
        return code, err.getvalue()


@dataclass
class Case:
    name: str
    run: Callable[[Context], object]
    error: type[BaseException] | None = None  # None: must succeed (and `run` asserts the outcome itself)
    match: str = ""


CASES: list[Case] = []


def case(name: str, error: type[BaseException] | None = None, match: str = ""):
    def register(run):
        CASES.append(Case(name, run, error, match))
        return run

    return register


def bad(name: str, error: type[BaseException], match: str, run: Callable[[Context], object]) -> None:
    CASES.append(Case(name, run, error, match))


# ------------------------------------------------------------------------------------------------------- configs

def config_case(name, error, match, **changes):
    bad(f"config-{name}", error, match, lambda c: CogLMConfig(**{**c.config_kwargs, **changes}))


config_case("hidden-size-str", TypeError, "hidden_size must be an integer", hidden_size="32")
config_case("hidden-size-float", TypeError, "hidden_size must be an integer", hidden_size=32.0)
config_case("hidden-size-bool", TypeError, "hidden_size must be an integer", hidden_size=True)
config_case("hidden-size-zero", ValueError, "hidden_size must be positive", hidden_size=0)
config_case("layers-negative", ValueError, "num_hidden_layers must be positive", num_hidden_layers=-1)
config_case("heads-not-divisor", ValueError, "divisible by num_attention_heads", num_attention_heads=5)
config_case("float-window", TypeError, "local_window must be two integers", local_window=(5.6, 3))
config_case("even-window", ValueError, "local_window must be two positive odd", local_window=(4, 3))
config_case("one-number-window", TypeError, "local_window must be two integers", local_window=(3,))
config_case("string-window", TypeError, "local_window must be two integers", local_window="9x5")
config_case("zero-cross-window", ValueError, "cross_window", cross_window=(0, 3))
config_case("bias-nan", TypeError, "text_attention_bias must be a finite number", text_attention_bias=math.nan)
config_case("bias-inf", TypeError, "text_attention_bias must be a finite number", text_attention_bias=math.inf)
config_case("bias-str", TypeError, "text_attention_bias must be a finite number", text_attention_bias="1.4")
config_case("eps-nan", TypeError, "layer_norm_eps must be a finite number", layer_norm_eps=math.nan)
config_case("dropout-above-one", ValueError, "dropout", attention_dropout=1.5)
config_case("act-not-str", TypeError, "hidden_act must be a string", hidden_act=3)
config_case("tie-str", TypeError, "tie_word_embeddings must be True or False", tie_word_embeddings="yes")
config_case("pad-str", TypeError, "pad_token_id must be an integer", pad_token_id="0")
config_case("specials-beyond-vocab", ValueError, "below vocab_size", vocab_size=91)
config_case("boi-before-text", ValueError, "text_token_offset", boi_token_id=10)
config_case("grid-beyond-positions", ValueError, "max_position_embeddings", image_grid_size=6)
config_case("text-beyond-boi", ValueError, "max_text_length", max_text_length=41)
bad("config-dsr-not-multiple", ValueError, "multiple of image_grid_size",
    lambda c: CogLMDirectSRConfig(**{**c.config_kwargs, "hires_grid_size": 10, "hires_position_offset": 64}))
bad("config-dsr-offset-overlaps", ValueError, "hires_position_offset",
    lambda c: CogLMDirectSRConfig(**{**c.config_kwargs, "hires_grid_size": 12, "hires_position_offset": 10}))
bad("config-itersr-no-slots", ValueError, "sr_text_slots",
    lambda c: CogLMIterativeSRConfig(**{**c.config_kwargs, "hires_grid_size": 12, "hires_position_offset": 64,
                                        "sr_text_slots": 0}))


@case("config-corrupt-json-names-file", OSError, "config.json")
def _(c):
    c.base.save_pretrained(c.tmp / "m")
    (c.tmp / "m" / "config.json").write_text("{not json")
    CogLMForMaskedRegions.from_pretrained(c.tmp / "m")


@case("config-missing-folder", FileNotFoundError, "folder not found: .*missing-model")
def _(c):
    CogLMConfig.from_pretrained(str(c.tmp / "missing-model"))


# -------------------------------------------------------------------------------------------------------- models

IDS = torch.tensor([[20, 21, 22]])
bad("model-float-ids", TypeError, "input_ids must be an integer tensor", lambda c: c.base(IDS.float()))
bad("model-bool-ids", TypeError, "input_ids must be an integer tensor", lambda c: c.base(IDS.bool()))
bad("model-1d-ids", ValueError, r"input_ids must be a \[batch, seq\]", lambda c: c.base(IDS[0]))
bad("model-3d-ids", ValueError, r"input_ids must be a \[batch, seq\]", lambda c: c.base(IDS[None]))
bad("model-no-ids", ValueError, "input_ids", lambda c: c.base(None))
bad("model-ids-list", ValueError, "input_ids", lambda c: c.base([[20, 21]]))
bad("model-ids-beyond-vocab", ValueError, "vocab_size", lambda c: c.base(torch.tensor([[100]])))
bad("model-negative-ids", ValueError, r"Replace placeholders \(e.g. -1\)", lambda c: c.base(torch.tensor([[-1, 20]])))
bad("model-bias-nan", ValueError, "text_attention_bias must be a finite", lambda c: c.base(IDS, text_attention_bias=math.nan))
bad("model-mask-wrong-shape", ValueError, "attention_mask", lambda c: c.base(IDS, attention_mask=torch.ones(1, 5)))
bad("model-position-ids-wrong-length", ValueError, "position_ids",
    lambda c: c.base(IDS, position_ids=torch.arange(5)[None]))
bad("model-too-long", ValueError, "max_position_embeddings|position",
    lambda c: c.base(torch.full((1, 70), 20)))
bad("dsr-float-ids", TypeError, "input_ids must be an integer tensor",
    lambda c: c.pipe.dsr_model(input_ids=torch.ones(1, 3), low_res_tokens=torch.zeros(1, 4, 4, dtype=torch.long)))
bad("dsr-low-res-grid", ValueError, "low_res_tokens",
    lambda c: c.pipe.dsr_model(input_ids=torch.tensor([[70]]), low_res_tokens=torch.zeros(1, 5, 5, dtype=torch.long)))
bad("dsr-low-res-float", TypeError, "low_res_tokens",
    lambda c: c.pipe.dsr_model(input_ids=torch.tensor([[70]]), low_res_tokens=torch.zeros(1, 4, 4)))
bad("dsr-low-res-beyond-codebook", ValueError, "low_res_tokens",
    lambda c: c.pipe.dsr_model(input_ids=torch.tensor([[70]]), low_res_tokens=torch.full((1, 4, 4), 99)))
bad("itersr-grid", ValueError, "image_tokens",
    lambda c: c.pipe.itersr_model(input_ids=torch.tensor([[70]]), image_tokens=torch.zeros(1, 4, 4, dtype=torch.long)))
bad("itersr-float-tokens", TypeError, "image_tokens",
    lambda c: c.pipe.itersr_model(input_ids=torch.tensor([[70]]), image_tokens=torch.zeros(1, 12, 12)))
bad("model-missing-folder", FileNotFoundError, "folder not found: .*missing-model",
    lambda c: CogLMForMaskedRegions.from_pretrained(c.tmp / "missing-model"))
bad("score-captions-count", ValueError, r"need one caption per image \(2 images\), got 3",
    lambda c: c.pipe.base_model.score_captions(torch.zeros(2, 16, dtype=torch.long), [[70], [71], [72]]))
bad("score-captions-empty", ValueError, "a caption is empty",
    lambda c: c.pipe.base_model.score_captions(torch.zeros(1, 16, dtype=torch.long), [[]]))


# ------------------------------------------------------------------------------------------ local attention op

def attend(batch=1, heads=2, grid=(4, 4), dim=8, **kwargs):
    q = kwargs.pop("q", None)
    if q is None:
        q = torch.randn(batch, heads, grid[0] * grid[1], dim)
    k = kwargs.pop("k", torch.randn(batch, heads, grid[0] * grid[1], dim))
    v = kwargs.pop("v", k)
    return local_attention_2d(q, k, v, grid=kwargs.pop("grid_arg", grid), window=kwargs.pop("window", 3), **kwargs)


@case("attention-empty-batch-returns-empty")
def _(c):
    out = attend(batch=0)
    assert out.shape == (0, 2, 16, 8)
    out = attend(batch=0, global_key=torch.randn(0, 2, 3, 8), global_value=torch.randn(0, 2, 3, 8))
    assert out.shape == (0, 2, 16, 8)
    query = torch.randn(2, 0, 16, 8, requires_grad=True)  # no heads; still differentiable
    (grad,) = torch.autograd.grad(attend(q=query, k=torch.randn(2, 0, 16, 8)).sum(), query)
    assert grad.shape == query.shape


bad("attention-query-not-tensor", TypeError, "query", lambda c: attend(q=[[1.0]]))
bad("attention-query-3d", ValueError, "query", lambda c: attend(q=torch.randn(2, 16, 8)))
bad("attention-int-query", TypeError, "query", lambda c: attend(q=torch.ones(1, 2, 16, 8, dtype=torch.long)))
bad("attention-grid-mismatch", ValueError, "grid", lambda c: attend(grid_arg=(3, 4)))
bad("attention-float-window", TypeError, "window", lambda c: attend(window=(5.6, 3)))
bad("attention-even-window", ValueError, "window", lambda c: attend(window=4))
bad("attention-zero-window", ValueError, "window", lambda c: attend(window=0))
bad("attention-key-dim", ValueError, "key", lambda c: attend(k=torch.randn(1, 2, 16, 4)))
bad("attention-key-heads", ValueError, "key", lambda c: attend(k=torch.randn(1, 3, 16, 8)))
bad("attention-key-tokens", ValueError, "key", lambda c: attend(k=torch.randn(1, 2, 9, 8)))
bad("attention-value-shape", ValueError, "value", lambda c: attend(v=torch.randn(1, 2, 9, 8)))
bad("attention-coarse-key-grid", ValueError, "key grid|key_grid",
    lambda c: attend(k=torch.randn(1, 2, 4, 8), key_grid=(3, 3)))
bad("attention-cross-without-grid", ValueError, "cross_grid",
    lambda c: attend(cross_key=torch.randn(1, 2, 4, 8), cross_value=torch.randn(1, 2, 4, 8)))
bad("attention-cross-grid-alone", ValueError, "cross_key", lambda c: attend(cross_grid=(2, 2)))
bad("attention-global-mask-shape", ValueError, "global_key_mask",
    lambda c: attend(global_key=torch.randn(1, 2, 3, 8), global_value=torch.randn(1, 2, 3, 8),
                     global_key_mask=torch.ones(1, 4, dtype=torch.bool)))
bad("attention-global-value-missing", ValueError, "global_value", lambda c: attend(global_key=torch.randn(1, 2, 3, 8)))
bad("attention-unknown-backend", ValueError, "backend", lambda c: set_local_attention_backend("cuda"))
bad("attention-scale-nan", ValueError, "scale", lambda c: attend(scale=math.nan))


# --------------------------------------------------------------------------------------------------- tokenizers

bad("tokenizer-missing-model", FileNotFoundError, "sentencepiece model not found",
    lambda c: CogLMTokenizer.from_sentencepiece(c.tmp / "ice_text.model"))


@case("tokenizer-garbage-model", ValueError, "not_a_model|sentencepiece|cannot")
def _(c):
    (c.tmp / "garbage.model").write_bytes(b"\x00\x01garbage" * 10)
    CogLMTokenizer.from_sentencepiece(c.tmp / "garbage.model")


bad("tokenizer-negative-offset", ValueError, "text_token_offset",
    lambda c: CogLMTokenizer.from_sentencepiece(c.spm, text_token_offset=-1))
bad("tokenizer-unknown-style", ValueError, "unknown style", lambda c: c.pipe.tokenizer.encode_prompt("a cat", "cubism"))
bad("tokenizer-prompt-not-str", TypeError, "text must be a str", lambda c: c.pipe.tokenizer.encode_prompt(3))
bad("tokenizer-missing-folder", FileNotFoundError, "folder not found: .*missing-tokenizer",
    lambda c: CogLMTokenizer.from_pretrained(str(c.tmp / "missing-tokenizer")))


@case("tokenizer-folder-without-tokenizer-json", (OSError, ValueError), "tokenizer.json")
def _(c):
    c.pipe.tokenizer.save_pretrained(c.tmp / "tok")
    (c.tmp / "tok" / "tokenizer.json").unlink()
    CogLMTokenizer.from_pretrained(c.tmp / "tok")


# ------------------------------------------------------------------------------------------------------------ VQ

def nan_image():
    image = torch.rand(1, 3, 32, 32)
    image[0, 1, 3, 4] = math.nan
    return image


bad("vq-nan-pixels", ValueError, "NaN pixels", lambda c: c.vq.encode(nan_image()))
bad("vq-uint8", TypeError, "floating point in \\[0, 1\\]",
    lambda c: c.vq.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)))
bad("vq-minus-one-to-one", ValueError, r"RGB in \[0, 1\]", lambda c: c.vq.encode(torch.rand(1, 3, 32, 32) * 2 - 1))
bad("vq-four-channels", ValueError, r"images must be \[B, 3", lambda c: c.vq.encode(torch.rand(1, 4, 32, 32)))
bad("vq-size-not-multiple", ValueError, "multiple of the compression rate", lambda c: c.vq.encode(torch.rand(1, 3, 30, 30)))
bad("vq-empty-batch", ValueError, "batch 0", lambda c: c.vq.encode(torch.rand(0, 3, 32, 32)))
bad("vq-not-tensor", TypeError, "IceVQImageProcessor", lambda c: c.vq.encode(np.zeros((32, 32, 3))))
bad("vq-decode-float", TypeError, "ids must be an integer tensor", lambda c: c.vq.decode(torch.zeros(1, 4, 4)))
bad("vq-decode-beyond-codebook", ValueError, r"ids must be in \[0, 64\)", lambda c: c.vq.decode(torch.full((1, 4, 4), 64)))
bad("vq-decode-flat", ValueError, r"ids must be \[B, h, w\]", lambda c: c.vq.decode(torch.zeros(1, 16, dtype=torch.long)))
bad("vq-decode-empty", ValueError, "must not be empty", lambda c: c.vq.decode(torch.zeros(0, 4, 4, dtype=torch.long)))
bad("vq-bad-compress-rate", ValueError, "compress_rate", lambda c: c.vq.encode(torch.rand(1, 3, 32, 32), compress_rate=5))
bad("processor-bad-size", ValueError, "image_size", lambda c: IceVQImageProcessor(image_size=-3))
bad("processor-empty", ValueError, "no images", lambda c: IceVQImageProcessor().preprocess([]))
bad("processor-channels-first-array", ValueError, r"\[H, W, 3\]", lambda c: IceVQImageProcessor().preprocess(
    np.zeros((3, 8, 8), dtype=np.uint8)))
bad("processor-int32-array", TypeError, "uint8", lambda c: IceVQImageProcessor().preprocess(
    np.zeros((8, 8, 3), dtype=np.int32)))
bad("processor-string", TypeError, "PIL images", lambda c: IceVQImageProcessor().preprocess("photo.png"))
bad("processor-mixed-sizes", ValueError, "different sizes", lambda c: IceVQImageProcessor().preprocess(
    [torch.rand(3, 8, 8), torch.rand(3, 16, 16)]))
bad("processor-output-type", ValueError, "output_type", lambda c: IceVQImageProcessor().postprocess(
    torch.rand(1, 3, 8, 8), "latent"))


# ---------------------------------------------------------------------------------------------------- samplers

NAN_LOGITS = torch.full((2, 64), math.nan)
LABELS = torch.arange(64) % 8
bad("sampler-nan-argmax", ValueError, "NaN", lambda c: cluster_sample(NAN_LOGITS, LABELS, top_k_clusters=1,
                                                                       cluster_temperature=0))
bad("sampler-nan-sampling", ValueError, "non-finite", lambda c: cluster_sample(NAN_LOGITS, LABELS, generator=seeded()))
bad("sampler-posinf", ValueError, r"\+inf", lambda c: top_k_sample(torch.full((2, 64), math.inf), 4))
bad("sampler-all-neginf-row", ValueError, "all -inf", lambda c: top_k_sample(torch.full((1, 64), -math.inf), 1))


@case("sampler-some-neginf-is-fine")
def _(c):
    logits = torch.zeros(1, 64)
    logits[0, 5:] = -math.inf
    assert int(top_k_sample(logits, 64, generator=seeded())) < 5


# ----------------------------------------------------------------------------------------------------- pipeline

def call(name, error, match, **kwargs):
    kwargs.setdefault("output_type", "tokens")
    if "prompt_ids" not in kwargs:
        kwargs.setdefault("prompt", "a cat")
    bad(f"pipeline-{name}", error, match, lambda c: c.pipe(**kwargs))


def callback(result):
    return lambda pipe, step, stage, tensors: result(tensors)


call("empty-prompt", ValueError, "empty", prompt="")
call("blank-in-list", ValueError, "empty", prompt=["a cat", "  "])
call("no-prompt", ValueError, "exactly one", prompt=None)
call("prompt-and-ids", ValueError, "exactly one", prompt_ids=[[70]], prompt="a cat")
call("prompt-int", TypeError, "prompt must be", prompt=3)
call("prompt-empty-list", TypeError, "prompt must be", prompt=[])
call("ids-empty", ValueError, "empty", prompt_ids=[[]])
bad("pipeline-ids-boi-inside", ValueError, "only at the end", lambda c: c.pipe(
    prompt_ids=[[71, c.pipe.tokenizer.boi_token_id, 70]], output_type="tokens"))
call("ids-negative", ValueError, "ids in", prompt_ids=[[-1, 70]])
call("ids-string", TypeError, "prompt_ids", prompt_ids="a cat")
call("ids-float-tensor", TypeError, "integer tensor", prompt_ids=torch.tensor([[70.0]]))
call("ids-3d-tensor", TypeError, "integer tensor", prompt_ids=torch.zeros(1, 1, 2, dtype=torch.long))
call("ids-nested-floats", TypeError, "prompt_ids", prompt_ids=[[70.5]])
call("too-long-for-stage1", ValueError, "stage 1 accepts at most 32", prompt_ids=[[70] * 33], only_first_stage=True)
call("too-long-for-dsr", ValueError, "direct super-resolution accepts at most 24", prompt_ids=[[70] * 25])
call("unknown-style", ValueError, "Unknown style", style="cubism")
call("output-type-latents", ValueError, "output_type", output_type="latents")
call("images-zero", ValueError, "num_images_per_prompt", num_images_per_prompt=0)
call("images-float", ValueError, "num_images_per_prompt", num_images_per_prompt=1.5)
call("images-bool", ValueError, "num_images_per_prompt", num_images_per_prompt=True)
call("candidates-zero", ValueError, "num_candidates", num_candidates=0)
call("candidates-fewer", ValueError, "num_candidates", num_images_per_prompt=3, num_candidates=2)
call("stage1-batch-zero", ValueError, "stage1_batch_size", stage1_batch_size=0)
call("sr-batch-negative", ValueError, "sr_batch_size", sr_batch_size=-1)
call("temperature-zero", ValueError, "temperature", temperature=0)
call("temperature-nan", ValueError, "temperature", temperature=math.nan)
call("top-k-clusters-zero", ValueError, "top_k_clusters", top_k_clusters=0)
call("itersr-top-k-length", ValueError, "one value per LoPAR pass", itersr_top_k=[1, 2])
call("itersr-top-k-zero", ValueError, "itersr_top_k", itersr_top_k=0)
call("generator-int", TypeError, "torch.Generator", generator=0)
call("generator-list-length", ValueError, "one generator per image", generator=[seeded(), seeded()])
call("generator-list-item", TypeError, "torch.Generator", generator=[3])
call("callback-not-callable", TypeError, "callback_on_step_end must be callable", callback_on_step_end=3)
call("callback-signature", TypeError, "four arguments", callback_on_step_end=lambda pipe: {})
call("callback-inputs-str", TypeError, "must be a list of names", callback_on_step_end=callback(lambda t: t),
     callback_on_step_end_tensor_inputs="image_tokens")
call("callback-inputs-unknown", ValueError, "not available", callback_on_step_end=callback(lambda t: t),
     callback_on_step_end_tensor_inputs=["latents"])
call("callback-returns-list", TypeError, "must return a dict", callback_on_step_end=callback(lambda t: [1]))
call("callback-float-tokens", TypeError, "dtype torch.float32",
     callback_on_step_end=callback(lambda t: {"image_tokens": t["image_tokens"].float()}))
call("callback-wrong-shape", ValueError, "returned image_tokens of shape",
     callback_on_step_end=callback(lambda t: {"image_tokens": torch.zeros(1)}))
call("callback-beyond-codebook", ValueError, r"outside \[-1, 64\)",
     callback_on_step_end=callback(lambda t: {"image_tokens": t["image_tokens"].clamp(min=0) + 64}))
call("callback-negative-after-stage1", ValueError, r"outside \[0, 64\) at stage 'dsr'",
     callback_on_step_end=lambda p, step, stage, t: {"image_tokens": t["image_tokens"] * 0 - 1} if stage == "dsr"
     else t)


def without(name: str):
    return lambda c: CogView2Pipeline(**dict(c.pipe.components, **{name: None}))


bad("pipeline-no-tokenizer", ValueError, "tokenizer \\(or pass prompt_ids",
    lambda c: without("tokenizer")(c)("a cat", output_type="tokens"))
bad("pipeline-no-image-tokenizer", ValueError, "image_tokenizer \\(or use output_type",
    lambda c: without("image_tokenizer")(c)("a cat"))
bad("pipeline-no-dsr", ValueError, "dsr_model \\(or use only_first_stage",
    lambda c: without("dsr_model")(c)("a cat", output_type="tokens"))
bad("pipeline-no-labels", ValueError, "no cluster labels", lambda c: CogView2Pipeline(
    **dict(c.pipe.components, scheduler=type(c.pipe.scheduler)()))("a cat", output_type="tokens"))


@case("pipeline-nan-weights-argmax", ValueError, "non-finite")
def _(c):
    broken = build_tiny_pipeline(c.spm)
    with torch.no_grad():
        broken.base_model.lm_head.weight.fill_(math.nan)
    broken("a cat", output_type="tokens", top_k_clusters=1, cluster_temperature=0, only_first_stage=True)


@case("pipeline-nan-weights-sampling", ValueError, "non-finite")
def _(c):
    broken = build_tiny_pipeline(c.spm)
    with torch.no_grad():
        broken.dsr_model.lm_head.weight.fill_(math.nan)
    broken("a cat", output_type="tokens", generator=seeded())


# saving and loading
bad("load-missing-absolute-folder", FileNotFoundError, "folder not found",
    lambda c: CogView2Pipeline.from_pretrained(c.tmp / "missing"))
bad("load-missing-relative-folder", FileNotFoundError, "folder not found",
    lambda c: CogView2Pipeline.from_pretrained("./converted/missing"))
bad("load-unreachable-repo", OSError, "not a local folder and could not be fetched",
    lambda c: CogView2Pipeline.from_pretrained("no-such-org/no-such-pipeline", local_files_only=True))


@case("load-a-file", NotADirectoryError, "is a file")
def _(c):
    (c.tmp / "model_index.json").write_text("{}")
    CogView2Pipeline.from_pretrained(c.tmp / "model_index.json")


bad("load-folder-without-index", FileNotFoundError, "model_index.json not found",
    lambda c: CogView2Pipeline.from_pretrained(c.tmp))


@case("load-corrupt-index", ValueError, r"model_index.json is not valid JSON")
def _(c):
    folder = c.saved_copy()
    (folder / "model_index.json").write_text('{"_class_name": "CogView2Pipeline",')
    CogView2Pipeline.from_pretrained(folder)


@case("load-index-not-object", ValueError, "must hold a JSON object")
def _(c):
    folder = c.saved_copy()
    (folder / "model_index.json").write_text("[1, 2]")
    CogView2Pipeline.from_pretrained(folder)


@case("load-index-bad-entry", ValueError, r"entry of base_model must be \[module, class\]")
def _(c):
    folder = c.saved_copy()
    index = json.loads((folder / "model_index.json").read_text())
    index["base_model"] = "CogLMForMaskedRegions"
    (folder / "model_index.json").write_text(json.dumps(index))
    CogView2Pipeline.from_pretrained(folder)


@case("load-index-missing-subfolder", FileNotFoundError, "has no such subfolder")
def _(c):
    folder = c.saved_copy()
    shutil.rmtree(folder / "dsr_model")
    CogView2Pipeline.from_pretrained(folder)


@case("load-index-unknown-module", ValueError, "trust_remote_code=True")
def _(c):
    folder = c.saved_copy()
    index = json.loads((folder / "model_index.json").read_text())
    index["base_model"] = ["evil_module", "CogLMForMaskedRegions"]
    (folder / "model_index.json").write_text(json.dumps(index))
    CogView2Pipeline.from_pretrained(folder)


@case("load-index-no-base-model", ValueError, "has no base_model")
def _(c):
    folder = c.saved_copy()
    index = json.loads((folder / "model_index.json").read_text())
    index["base_model"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    CogView2Pipeline.from_pretrained(folder)


@case("load-corrupt-model-config", OSError, "config.json")
def _(c):
    folder = c.saved_copy()
    (folder / "base_model" / "config.json").write_text("{")
    CogView2Pipeline.from_pretrained(folder)


@case("load-truncated-weights", OSError, "could not load base_model from .*damaged")
def _(c):
    folder = c.saved_copy()
    weights = folder / "base_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    CogView2Pipeline.from_pretrained(folder)


bad("load-missing-variant", FileNotFoundError, "no weights of variant 'fp16'",
    lambda c: CogView2Pipeline.from_pretrained(c.saved, variant="fp16"))
bad("load-variant-not-str", TypeError, "variant must be a string",
    lambda c: CogView2Pipeline.from_pretrained(c.saved, variant=16))
bad("load-device-map-bogus", ValueError, "device_map: 'gpu0' is not a device",
    lambda c: CogView2Pipeline.from_pretrained(c.saved, device_map="gpu0"))
bad("load-device-map-component", ValueError, "device_map names",
    lambda c: CogView2Pipeline.from_pretrained(c.saved, device_map={"unet": "cpu"}))
bad("load-unexpected-argument", TypeError, "unexpected arguments", lambda c: CogView2Pipeline.from_pretrained(
    c.saved, low_cpu_mem=True))
bad("save-shard-size-bogus", ValueError, "max_shard_size", lambda c: c.pipe.save_pretrained(
    c.tmp / "out", max_shard_size="bogus"))
bad("save-shard-size-zero", ValueError, "max_shard_size", lambda c: c.pipe.save_pretrained(
    c.tmp / "out", max_shard_size=0))
bad("save-variant-path", ValueError, "variant must be", lambda c: c.pipe.save_pretrained(
    c.tmp / "out", variant="a/b"))
bad("save-safe-serialization-str", TypeError, "safe_serialization", lambda c: c.pipe.save_pretrained(
    c.tmp / "out", safe_serialization="no"))
bad("save-push-to-hub", ValueError, "upload_folder", lambda c: c.pipe.save_pretrained(c.tmp / "out",
                                                                                      push_to_hub=True))
bad("from-pipe-unknown", TypeError, "pass components only", lambda c: CogView2InpaintPipeline.from_pipe(
    c.pipe, unet=None))
bad("device-map-cuda-without-gpu", ValueError, "no CUDA device is visible",
    lambda c: torch.cuda.is_available() or CogView2Pipeline.from_pretrained(c.saved, device_map="cuda"))


@case("save-interrupted-leaves-nothing-and-next-save-cleans")
def _(c):
    target = c.tmp / "pipe"
    stale = c.tmp / ".pipe.tmp-killed"
    (stale / "base_model").mkdir(parents=True)
    with pytest.raises(ValueError):
        c.pipe.save_pretrained(target, max_shard_size="bogus")
    assert not target.exists() and stale.exists()
    c.pipe.save_pretrained(target)
    assert sorted(p.name for p in c.tmp.iterdir()) == ["pipe"]


# ------------------------------------------------------------------------------------------------------ editing

def edit_call(name, error, match, **kwargs):
    def run(c):
        arguments = dict(prompt="a dog", image=torch.rand(3, 96, 96), mask_box=(0.25, 0.25, 0.75, 0.75),
                         output_type="tokens")
        arguments.update(kwargs)
        return c.edit(**arguments)

    bad(f"edit-{name}", error, match, run)


edit_call("no-image", ValueError, "image is required", image=None)
edit_call("image-list", ValueError, "one image with one prompt", image=[torch.rand(3, 96, 96)])
edit_call("prompt-list", ValueError, "one image with one prompt", prompt=["a", "b"])
edit_call("image-str", TypeError, "image must be", image="photo.png")
edit_call("image-4-channels", ValueError, r"\[3, H, W\]", image=torch.rand(4, 96, 96))
edit_call("mask-and-box", ValueError, "exactly one of mask_image", mask_image=np.ones((96, 96), bool))
edit_call("neither-mask-nor-box", ValueError, "exactly one of mask_image", mask_box=None)
edit_call("mask-wrong-size", ValueError, "mask", mask_box=None, mask_image=np.ones((10, 10), bool))
edit_call("mask-nan", ValueError, "NaN", mask_box=None, mask_image=np.full((96, 96), np.nan, np.float32))
edit_call("mask-3d", ValueError, r"mask_image must be \[H, W\]", mask_box=None,
          mask_image=np.ones((2, 96, 96), bool))
edit_call("mask-empty", ValueError, "mask", mask_box=None, mask_image=np.zeros((96, 96), bool))
edit_call("mask-string", TypeError, "mask_image must be", mask_box=None, mask_image="mask.png")
edit_call("box-outside", ValueError, "mask_box", mask_box=(0.2, 0.2, 1.5, 0.8))
edit_call("box-inverted", ValueError, "mask_box", mask_box=(0.8, 0.2, 0.2, 0.8))
edit_call("box-three-numbers", ValueError, "mask_box", mask_box=(0.2, 0.2, 0.8))
edit_call("ids-two-prompts", ValueError, "one prompt per call", prompt=None, prompt_ids=[[70], [71]])
edit_call("generator-list-length", ValueError, "one generator per image", generator=[seeded()],
          num_images_per_prompt=2)


@case("edit-uint8-01-mask-selects-region")
def _(c):
    flags = np.zeros((96, 96), np.uint8)
    flags[24:72, 24:72] = 1
    image = torch.rand(3, 96, 96, generator=seeded(1))
    run = dict(prompt="a dog", image=image, output_type="tokens", generator=None, top_k_clusters=1,
               cluster_temperature=0, dsr_top_k_clusters=1, dsr_cluster_temperature=0, itersr_top_k=1)
    from_flags = c.edit(mask_image=flags, **run).images
    from_bool = c.edit(mask_image=flags.astype(bool), **run).images
    from_pil = c.edit(mask_image=PIL.Image.fromarray(flags), **run).images
    torch.testing.assert_close(from_flags, from_bool, rtol=0, atol=0)
    torch.testing.assert_close(from_pil, from_bool, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------- CLI

def cli_case(name, match, *argv, setup=None):
    def run(c):
        arguments = [a(c) if callable(a) else a for a in argv]
        if setup is not None:
            setup(c)
        code, err = c.cli(*arguments)
        assert code == 1, (code, err)
        assert "Traceback" not in err
        assert "Loading weights" not in err  # every mistake is caught before the model loads
        raise CliError(err)

    bad(f"cli-{name}", CliError, match, run)


class CliError(Exception):
    """The CLI's stderr, for the pattern check."""


def write_file(name, data=b"not an image"):
    def setup(c):
        (c.tmp / name).write_bytes(data)

    return setup


def tmp(name):
    return lambda c: c.tmp / name


cli_case("output-dir-is-a-file", "--output-dir .* is a file", "generate", "a cat", "--model", lambda c: c.saved,
         "--output-dir", tmp("taken"), setup=write_file("taken", b""))
cli_case("output-dir-under-a-file", "--output-dir .* not writable", "generate", "a cat", "--model",
         lambda c: c.tmp / "missing-model", "--output-dir", tmp("taken/out"), setup=write_file("taken", b""))
cli_case("edit-not-an-image", "--image .*notanimage.png is not an image file", "edit", "--image",
         tmp("notanimage.png"), "--box", "0.2,0.2,0.8,0.8", "--prompt", "a dog", "--output-dir", tmp("out"),
         setup=write_file("notanimage.png"))
cli_case("edit-mask-not-an-image", "--mask .* is not an image file", "edit", "--image", tmp("ok.png"), "--mask",
         tmp("mask.png"), "--prompt", "a dog", "--output-dir", tmp("out"),
         setup=lambda c: (PIL.Image.new("RGB", (8, 8)).save(c.tmp / "ok.png"), write_file("mask.png")(c)))
cli_case("edit-missing-image", "--image .* not found", "edit", "--image", tmp("nothing.png"), "--box",
         "0.2,0.2,0.8,0.8", "--prompt", "a dog")
cli_case("edit-bad-box", "--box must be four", "edit", "--image", tmp("ok.png"), "--box", "a,b", "--prompt", "x",
         setup=lambda c: PIL.Image.new("RGB", (8, 8)).save(c.tmp / "ok.png"))
cli_case("device-gpu0", "--device gpu0 is not a device name", "generate", "a cat", "--device", "gpu0",
         "--output-dir", tmp("out"))
cli_case("device-tpu", "--device .*only cpu, cuda", "generate", "a cat", "--device", "xla", "--output-dir",
         tmp("out"))
if not torch.cuda.is_available():
    cli_case("device-cuda-without-gpu", "no CUDA GPU is visible", "generate", "a cat", "--device", "cuda",
             "--output-dir", tmp("out"))
cli_case("missing-model", "--model .* is not a folder", "generate", "a cat", "--model", tmp("nope"),
         "--output-dir", tmp("out"))
cli_case("no-prompt", "give at least one prompt", "generate", "--output-dir", tmp("out"))
cli_case("itersr-top-k", "--itersr-top-k must be", "generate", "a cat", "--model", lambda c: c.saved,
         "--itersr-top-k", "x", "--output-dir", tmp("out"))
cli_case("cpu-offload-on-cpu", "--cpu-offload needs a GPU", "generate", "a cat", "--model", lambda c: c.saved,
         "--cpu-offload", "--device", "cpu", "--output-dir", tmp("out"))
cli_case("corrupt-model-index", "model_index.json is not valid JSON", "generate", "a cat", "--model",
         lambda c: c.tmp / "copy", "--output-dir", tmp("out"),
         setup=lambda c: (c.saved_copy(), (c.tmp / "copy" / "model_index.json").write_text("{")))
cli_case("convert-without-inputs", "sat_dir", "convert", "--output", tmp("out"), "--cluster-labels", tmp("c.npy"))
cli_case("convert-output-is-input", "would delete the input", "convert", "--sat-dir", lambda c: c.sat.parent,
         "--coglm", lambda c: c.tmp / "sat", "--output", lambda c: c.tmp / "sat", "--overwrite",
         "--cluster-labels", tmp("c.npy"), setup=lambda c: (c.tmp / "sat").mkdir())


# --------------------------------------------------------------------------------------------------- converters

@case("convert-into-its-input-is-refused", ValueError, "would delete the input")
def _(c):
    source = c.sat_copy()
    try:
        convert_sat_checkpoint(source, source, overwrite=True)
    finally:
        assert (source / "latest").is_file()  # untouched


@case("convert-into-a-parent-of-its-input-is-refused", ValueError, "would delete the input")
def _(c):
    source = c.sat_copy()
    convert_sat_checkpoint(source, c.tmp, overwrite=True)


bad("convert-missing-input", FileNotFoundError, "SAT model folder not found",
    lambda c: convert_sat_checkpoint(c.tmp / "nothing", c.tmp / "out"))
bad("convert-bad-dtype", ValueError, "dtype must be one of", lambda c: convert_sat_checkpoint(
    c.tmp, c.tmp / "out", dtype="int8"))
bad("convert-shard-size", ValueError, "max_shard_size", lambda c: convert_sat_checkpoint(
    c.sat_copy(), c.tmp / "out", max_shard_size="bogus"))


@case("convert-output-exists", FileExistsError, "pass overwrite=True")
def _(c):
    (c.tmp / "out").mkdir()
    convert_sat_checkpoint(c.sat_copy(), c.tmp / "out")


@case("convert-output-is-a-file", NotADirectoryError, "is a file")
def _(c):
    (c.tmp / "out").write_text("")
    convert_sat_checkpoint(c.sat_copy(), c.tmp / "out", overwrite=True)


@case("convert-no-latest", FileNotFoundError, "latest")
def _(c):
    source = c.sat_copy()
    (source / "latest").unlink()
    load_sat_state_dict(source)


@case("convert-bad-latest", ValueError, "iteration number or 'release'")
def _(c):
    source = c.sat_copy()
    (source / "latest").write_text("../../etc")
    load_sat_state_dict(source)


@case("convert-missing-weights", FileNotFoundError, "mp_rank_00_model_states.pt is missing")
def _(c):
    source = c.sat_copy()
    (source / "latest").write_text("7")
    load_sat_state_dict(source)


@case("convert-corrupt-model-config", ValueError, r"model_config.json is not valid JSON")
def _(c):
    source = c.sat_copy()
    (source / "model_config.json").write_text('{"num_layers": 2,,}')
    load_sat_state_dict(source)


@case("convert-code-in-pickle-is-refused", ValueError, "weights_only=True")
def _(c):
    source = c.sat_copy()
    weights = source / (source / "latest").read_text().strip() / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "hook": argparse.Namespace(run="code")}, weights)
    load_sat_state_dict(source)


@case("convert-not-a-state-file", ValueError, "not a SAT model-state file")
def _(c):
    source = c.sat_copy()
    weights = source / (source / "latest").read_text().strip() / "mp_rank_00_model_states.pt"
    torch.save([1, 2], weights)
    load_sat_state_dict(source)


@case("convert-stale-temporary-folders-are-removed")
def _(c):
    for name in (".out.tmp-killed", ".out.old-killed"):
        (c.tmp / name / "sub").mkdir(parents=True)
    (c.tmp / ".other.tmp-keep").mkdir()
    convert_sat_checkpoint(c.sat_copy(), c.tmp / "out")
    assert sorted(p.name for p in c.tmp.iterdir()) == [".other.tmp-keep", "coglm", "out"]


@case("convert-pipeline-output-is-a-model-folder", ValueError, "would delete the input")
def _(c):
    sat = c.tmp / "sat"
    sat.mkdir()
    for name in ("coglm", "cogview2-dsr", "cogview2-itersr"):
        shutil.copytree(c.sat / name, sat / name)
    convert_cogview2(sat / "coglm", sat_dir=sat, cluster_labels=c.tmp / "labels.npy", overwrite=True)


# ------------------------------------------------------------------------------------------------------ training

bad("train-unknown-top-level-key", ValueError, r"learning_rate.*TrainingArguments fields: put them under training",
    lambda c: build_trainer(c.train_config(learning_rate=0.5)))
bad("train-typo-top-level", ValueError, r"did you mean 'model_conifg' → 'model_config'",
    lambda c: build_trainer(c.train_config(model_conifg="x.json")))
bad("train-typo-in-data", ValueError, r"unknown data: keys \['cach_dir'\].*'cache_dir'",
    lambda c: build_trainer(c.train_config(data={"cach_dir": "x"})))
bad("train-data-not-mapping", ValueError, "section 'data' must be a mapping",
    lambda c: build_trainer(c.train_config(data="cache")))
bad("train-unknown-collator-key", ValueError, r"unknown collator: keys.*patch_sise",
    lambda c: build_trainer(c.train_config(collator={"patch_sise": 2})))
bad("train-unknown-training-field", ValueError, "unknown TrainingArguments fields",
    lambda c: build_trainer(c.train_config(training={"output_dir": "x", "learnin_rate": 1})))
bad("train-unknown-stage", ValueError, "stage must be one of", lambda c: build_trainer(c.train_config(stage="sr")))
bad("train-model-and-config", ValueError, "exactly one of model", lambda c: build_trainer(c.train_config(model="m")))
bad("train-missing-model-folder", FileNotFoundError, "model folder", lambda c: build_trainer(
    {**c.train_config(model=str(c.tmp / "m")), "model_config": None}))
bad("train-missing-model-config", FileNotFoundError, "model_config", lambda c: build_trainer(
    c.train_config(model_config=str(c.tmp / "nothing.json"))))
bad("train-no-cache-dir", ValueError, "data.cache_dir", lambda c: build_trainer(c.train_config(data={})))
bad("train-no-output-dir", ValueError, "output_dir", lambda c: build_trainer(c.train_config(training={})))
bad("train-cli-typo-in-data", ValueError, r"unknown data: keys \['cach_dir'\]", lambda c: train_main(
    ["--stage", "base", "--prepare-data", "--data.cach_dir", str(c.tmp)]))
bad("train-override-without-value", ValueError, "needs a value", lambda c: apply_overrides({}, ["--max_steps"]))
bad("train-override-not-a-flag", ValueError, "unexpected argument", lambda c: apply_overrides({}, ["max_steps"]))
bad("train-missing-config-file", FileNotFoundError, "config file", lambda c: load_config(c.tmp / "nothing.yaml"))


@case("train-corrupt-yaml-names-file", ValueError, r"bad.yaml")
def _(c):
    (c.tmp / "bad.yaml").write_text("stage: base\ntraining: [unclosed\n")
    load_config(c.tmp / "bad.yaml")


@case("train-corrupt-json-names-file", ValueError, r"bad.json")
def _(c):
    (c.tmp / "bad.json").write_text('{"stage": ')
    load_config(c.tmp / "bad.json")


@case("train-config-not-mapping", ValueError, "must hold a mapping")
def _(c):
    (c.tmp / "list.yaml").write_text("- base\n")
    load_config(c.tmp / "list.yaml")


def checkpoint(run: Path, step: int, complete: bool) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


@case("train-resume-skips-a-checkpoint-cut-short")
def _(c):
    run = c.tmp / "run"
    good = checkpoint(run, 5, complete=True)
    checkpoint(run, 10, complete=False)
    (checkpoint(run, 12, complete=False) / "trainer_state.json").write_text('{"global_')  # killed mid-write
    assert resolve_checkpoint(True, str(run)) == str(good)
    assert resolve_checkpoint(True, str(c.tmp / "fresh")) is None


bad("train-resume-incomplete-path", ValueError, "incomplete checkpoint",
    lambda c: resolve_checkpoint(str(checkpoint(c.tmp / "run", 3, complete=False)), str(c.tmp / "run")))
bad("train-resume-missing-path", FileNotFoundError, "does not exist",
    lambda c: resolve_checkpoint(str(c.tmp / "nothing"), str(c.tmp)))
bad("train-resume-number", ValueError, "true, false or a checkpoint folder", lambda c: resolve_checkpoint(5, "x"))


# ----------------------------------------------------------------------------------------------------- the sweep

@pytest.fixture(scope="module")
def context(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Context(tmp_path_factory.mktemp("sweep"))
    torch.set_num_threads(threads)
    set_local_attention_backend("auto")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, context: Context, tmp_path):
    context.tmp = tmp_path
    if case.error is None:
        case.run(context)
        return
    with pytest.raises(case.error) as caught:
        case.run(context)
    message = str(caught.value)
    assert caught.match(case.match), message
    assert "Traceback" not in message


def test_case_names_are_unique_and_cover_every_area():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    areas = {name.split("-")[0] for name in names}
    assert {"config", "model", "dsr", "itersr", "attention", "tokenizer", "vq", "processor", "sampler", "pipeline",
            "load", "save", "edit", "cli", "convert", "train"} <= areas
    assert len(names) >= 190
