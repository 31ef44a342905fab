"""CogView2Pipeline: text → 480×480 image in three token stages and one decoder.

```
prompt ──tokenizer──► ids ──► stage 1   base_model      400 tokens (20×20), cached autoregression, cluster sampling
                               (optional) post-selection: num_candidates per prompt, keep the best caption scores
                          ──► stage 2   dsr_model       3600 tokens (60×60) in one pass, cluster sampling
                          ──► stage 3   itersr_model    6 LoPAR passes, top-k sampling
                          ──► image_tokenizer.decode    480×480 RGB
```

The sampling rules live in the scheduler (`CogView2Scheduler`), the attention patterns in the models; this file is
the story of the stages. `CogView2StagesMixin` holds what the text-to-image and the editing pipeline
(`pipeline_cogview2_inpaint.py`) share: component checks, the stage-1 loop, both super-resolution stages, decoding,
and saving/loading.

Ships in saved pipeline folders (remote code): imports only the standard library, torch, transformers, diffusers
(and their dependency huggingface_hub) and its sibling `image_processing_icevq.py` (numpy, PIL) — never `coglm_hf`,
so `DiffusionPipeline.from_pretrained(folder, custom_pipeline=<folder>/pipeline_cogview2.py, trust_remote_code=True)`
works where coglm_hf is not installed.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils import logging as diffusers_logging
from transformers.cache_utils import Cache, DynamicCache, StaticCache

from .image_processing_icevq import IceVQImageProcessor

# Per-component loading messages go where DiffusionPipeline.from_pretrained writes its own.
_pipeline_logger = diffusers_logging.get_logger(DiffusionPipeline.__module__)

# "latent" is Diffusers' name for the output before decoding: here the token grids, as "tokens".
OUTPUT_TYPES = ("pil", "np", "pt", "tokens", "latent")
TOKEN_OUTPUT_TYPES = ("tokens", "latent")
# Files of the pipeline folder root: the pipelines and what they import relatively (copied by `save_pretrained`).
PIPELINE_FILES = ("pipeline_cogview2.py", "pipeline_cogview2_inpaint.py", "image_processing_icevq.py")
# Prefix of the entry modules `save_pretrained` writes into component folders (see `_add_remote_code`).
REMOTE_ENTRY_PREFIX = "remote_"
COMPONENT_NAMES = ("tokenizer", "image_tokenizer", "base_model", "dsr_model", "itersr_model", "scheduler")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", flags=re.MULTILINE)

@dataclass
class CogView2PipelineOutput(BaseOutput):
    """Output of the CogView2 pipelines.

    Args:
        images: PIL images (`"pil"`), a float32 `[B, H, W, 3]` array (`"np"`), a float32 `[B, 3, H, W]` tensor
            (`"pt"`), or the final token grids as a `LongTensor` `[B, h, w]` (`"tokens"`), `B = prompts ×
            num_images_per_prompt`, grouped by prompt.
        scores: with post-selection (`num_candidates`), the caption score (mean log-likelihood of the prompt text
            given the image) of every returned image, `[B]` float32, best first within each prompt; else `None`.
    """

    images: Any
    scores: torch.Tensor | None = None


@dataclass
class PromptInput:
    """One request after tokenization: `text_ids` are the templated prompt ids without the trailing
    `<start_of_image>`; `caption_ids` the ids scored by post-selection."""

    text_ids: list[int]
    caption_ids: list[int]


def _module_files(path: Path) -> list[Path]:
    """`path` and every sibling file it imports with `from .x import …`, recursively."""
    found, todo = [], [path]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.append(current)
        for name in _RELATIVE_IMPORT.findall(current.read_text(encoding="utf-8")):
            sibling = current.parent / f"{name}.py"
            if not sibling.is_file():
                raise FileNotFoundError(f"{current} imports .{name} but {sibling} does not exist")
            todo.append(sibling)
    return found


def _replace_dir(staging: Path, target: Path) -> None:
    """Move a finished `staging` folder to `target`, replacing an existing one only after the move succeeded."""
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, retired / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(retired / target.name, target)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def _remove_code(folder: Path) -> None:
    """Strip the source files and `auto_map` entries the components' own `save_pretrained` wrote into `folder`, and
    the local paths (`_name_or_path`) of the configs."""
    for path in folder.rglob("*.py"):
        path.unlink()
    for path in [folder / "model_index.json", *folder.glob("*/*config.json")]:
        config = json.loads(path.read_text(encoding="utf-8"))
        if [config.pop(key) for key in ("auto_map", "_name_or_path") if key in config]:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
GeneratorArg = torch.Generator | list[torch.Generator] | None


def _draw(sample: Callable[..., torch.Tensor], generator: GeneratorArg, *batched: torch.Tensor) -> torch.Tensor:
    """`sample(*batched, generator=...)` over tensors whose first dimension is the batch: once with one generator
    (or `None`), or with a list holding one generator per row, once per run of consecutive rows sharing a
    generator, so that a sample's draws do not depend on the other samples of its batch. Each draw runs on its
    generator's device (a stage on another GPU than the generator samples there); the result is on the device of
    `batched[0]`."""
    device = batched[0].device

    def draw(tensors, g):
        if g is not None:
            tensors = [t if t.device == g.device else t.to(g.device) for t in tensors]
        return sample(*tensors, generator=g).to(device)

    if not isinstance(generator, list):
        return draw(batched, generator)
    draws, start = [], 0
    for end in range(1, batched[0].shape[0] + 1):
        if end == batched[0].shape[0] or generator[end] is not generator[start]:
            draws.append(draw([t[start:end] for t in batched], generator[start]))
            start = end
    return torch.cat(draws)


def _rows(generator: GeneratorArg, start: int, stop: int) -> GeneratorArg:
    """The generator(s) of rows `start:stop`."""
    return generator[start:stop] if isinstance(generator, list) else generator


def check_max_shard_size(max_shard_size: Any) -> None:
    """Accept a positive number of bytes or a size string like "5GB", "200MB", "10KiB" (what Diffusers and
    Transformers parse)."""
    if isinstance(max_shard_size, bool) or not (
        (isinstance(max_shard_size, int) and max_shard_size > 0)
        or (isinstance(max_shard_size, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]i?B\s*", max_shard_size,
                                                              flags=re.IGNORECASE))
    ):
        raise ValueError(f"max_shard_size must be a positive number of bytes or a size such as '5GB' or '200MB', "
                         f"got {max_shard_size!r}")


def _read_json(path: Path) -> dict:
    """Parse a JSON object file; a corrupt file is a ValueError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore it or save the pipeline again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}; save the pipeline again")
    return data


def _as_id_lists(prompt_ids: Any) -> list[list[int]]:
    """`prompt_ids` (one list of ints, a list of lists, or a `[L]` / `[P, L]` integer tensor) → list of id lists."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.is_floating_point() or prompt_ids.dtype == torch.bool or prompt_ids.dim() not in (1, 2):
            raise TypeError(f"prompt_ids as a tensor must be a [L] or [P, L] integer tensor, got {prompt_ids.dtype} "
                            f"{list(prompt_ids.shape)}")
        return [row.tolist() for row in prompt_ids.reshape(-1, prompt_ids.shape[-1])]
    if isinstance(prompt_ids, Sequence) and not isinstance(prompt_ids, (str, bytes)):
        if len(prompt_ids) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt_ids):
            return [list(prompt_ids)]
        lists = []
        for row in prompt_ids:
            if isinstance(row, torch.Tensor):
                row = row.tolist()
            if not isinstance(row, Sequence) or isinstance(row, (str, bytes)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in row
            ):
                raise TypeError("prompt_ids must be a list of ints (one prompt) or a list of such lists")
            lists.append(list(row))
        if lists:
            return lists
    raise TypeError(f"prompt_ids must be a list of ints, a list of id lists or an integer tensor, got {prompt_ids!r}")


class CogView2StagesMixin:
    """Components, stages and saving/loading shared by `CogView2Pipeline` and `CogView2InpaintPipeline`."""

    model_cpu_offload_seq = "base_model->dsr_model->itersr_model->image_tokenizer"
    # sequential offload moves the (small) image tokenizer to the accelerator whole: its code lookup is not a forward
    _exclude_from_cpu_offload = ["image_tokenizer"]
    _optional_components = ["tokenizer", "image_tokenizer", "dsr_model", "itersr_model"]
    _callback_tensor_inputs = ["image_tokens", "sample_indices"]
    # stage-1 decoding (see `set_stage1_decoding`): the cache kind and, when compiled, the compiled base model
    _stage1_cache_implementation = "dynamic"
    _stage1_step = None

    def __init__(self, tokenizer, image_tokenizer, base_model, dsr_model, itersr_model, scheduler):
        """
        Args:
            tokenizer: `CogLMTokenizer` (text → icetk ids); optional when you pass `prompt_ids`.
            image_tokenizer: `IceVQModel` (token grids ↔ images); optional with `output_type="tokens"`.
            base_model: `CogLMForMaskedRegions` (stage 1 and post-selection).
            dsr_model: `CogLMForDirectSuperResolution`; optional with `only_first_stage=True`.
            itersr_model: `CogLMForIterativeSuperResolution`; optional with `only_first_stage=True`.
            scheduler: `CogView2Scheduler` holding the cluster labels and sampler defaults.
        """
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            image_tokenizer=image_tokenizer,
            base_model=base_model,
            dsr_model=dsr_model,
            itersr_model=itersr_model,
            scheduler=scheduler,
        )
        self.image_processor = IceVQImageProcessor()

    # ------------------------------------------------------------------------------------------------ components

    def check_components(self, super_resolution: bool, decode: bool, tokenize: bool) -> None:
        """Raise `ValueError` naming a missing component, or two components that disagree on sizes or ids."""
        missing = [name for name in ("base_model", "scheduler") if getattr(self, name) is None]
        if tokenize and self.tokenizer is None:
            missing.append("tokenizer (or pass prompt_ids instead of prompt)")
        if decode and self.image_tokenizer is None:
            missing.append('image_tokenizer (or use output_type="tokens")')
        if super_resolution:
            missing += [f"{name} (or use only_first_stage=True)" for name in ("dsr_model", "itersr_model")
                        if getattr(self, name) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} is missing components: {', '.join(missing)}. Load them with "
                             "from_pretrained or pass them to the constructor.")
        base = self.base_model.config
        labels = self.scheduler.cluster_labels
        if labels is None:
            raise ValueError("the scheduler has no cluster labels; call scheduler.set_cluster_labels(...) with the "
                             "codebook's table (cluster_label.npy)")
        if labels.numel() != base.num_image_tokens:
            raise ValueError(f"the scheduler has cluster labels for {labels.numel()} image tokens but base_model has "
                             f"{base.num_image_tokens} image ids; use the cluster table of this codebook")
        if tokenize and (self.tokenizer.boi_token_id, self.tokenizer.text_token_offset) != (
            base.boi_token_id, base.text_token_offset
        ):
            raise ValueError(f"tokenizer and base_model disagree on the id layout: <start_of_image> "
                             f"{self.tokenizer.boi_token_id} vs {base.boi_token_id}, first text id "
                             f"{self.tokenizer.text_token_offset} vs {base.text_token_offset}")
        if decode and self.image_tokenizer.config.num_embeddings != base.num_image_tokens:
            raise ValueError(f"image_tokenizer has {self.image_tokenizer.config.num_embeddings} codes but base_model "
                             f"has {base.num_image_tokens} image ids")
        if super_resolution:
            dsr, itersr = self.dsr_model.config, self.itersr_model.config
            if dsr.image_grid_size != base.image_grid_size or itersr.hires_grid_size != dsr.hires_grid_size:
                raise ValueError(f"grid sizes do not chain: base {base.image_grid_size}, dsr {dsr.image_grid_size} → "
                                 f"{dsr.hires_grid_size}, itersr {itersr.hires_grid_size}")
            for name, config in (("dsr_model", dsr), ("itersr_model", itersr)):
                if config.num_image_tokens != base.num_image_tokens or config.boi_token_id != base.boi_token_id:
                    raise ValueError(f"{name} and base_model disagree on the id layout (num_image_tokens, "
                                     "boi_token_id)")

    @property
    def low_res_grid(self) -> int:
        """Side of the stage-1 token grid (20)."""
        return self.base_model.config.image_grid_size

    @property
    def high_res_grid(self) -> int:
        """Side of the super-resolution token grid (60)."""
        return self.dsr_model.config.hires_grid_size

    def _check_generator(self, generator: GeneratorArg, device: torch.device, num_images: int | None = None) -> None:
        """`generator`: `None`, one `torch.Generator`, or a list of `num_images` of them (one per returned image;
        `num_images=None`: a pipeline that takes one generator only)."""
        if generator is None:
            return
        generators = generator if isinstance(generator, list) else [generator]
        if isinstance(generator, list) and num_images is None:
            raise TypeError(f"{type(self).__name__} takes one torch.Generator, not a list")
        if isinstance(generator, list) and len(generator) != num_images:
            raise ValueError(f"generator is a list of {len(generator)} generators but the call returns {num_images} "
                             "images (prompts × num_images_per_prompt); pass one generator per image or a single one")
        for item in generators:
            if not isinstance(item, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or a list of them, got "
                                f"{type(item).__name__}")
            if item.device.type != device.type:
                raise ValueError(f"the generator is on {item.device} but the pipeline runs on {device}; create it "
                                 f"there: torch.Generator('{device.type}').manual_seed(seed)")

    @staticmethod
    def _device_of(model) -> torch.device:
        """Where `model` computes: the execution device of its accelerate offload hook (on the model for model
        offload, on its submodules for sequential offload), else the device of its weights. Each stage builds its
        inputs there, so the three models may sit on different devices (`pipe.base_model.to("cuda:0")`,
        `pipe.dsr_model.to("cuda:1")`, …)."""
        for module in model.modules():
            device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if device is not None:
                return torch.device(device)
        return next(model.parameters()).device

    def _warn_if_half_on_cpu(self, device: torch.device) -> None:
        """float16 has few fast CPU kernels, so a float16 pipeline is several times slower than float32 there.
        Warned once per process (Python's default warning filter), not an error: the results are valid."""
        if device.type == "cpu" and self.base_model is not None and self.base_model.dtype == torch.float16:
            warnings.warn("this pipeline runs in float16 on the CPU, which is several times slower than float32 "
                          "there; use pipe.to(torch.float32) (or load with dtype=torch.float32) on CPUs and keep "
                          "float16/bfloat16 for GPUs", UserWarning, stacklevel=3)

    def _check_callback(self, callback, tensor_inputs) -> list[str]:
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        if callback is not None and not callable(callback):
            raise TypeError("callback_on_step_end must be callable(pipe, step, stage, callback_kwargs) -> dict")
        if callback is not None:
            try:
                inspect.signature(callback).bind(self, 0, "stage1", {})
            except TypeError:
                raise TypeError("callback_on_step_end must accept four arguments (pipe, step, stage, "
                                "callback_kwargs) and return a dict") from None
            except ValueError:  # no signature (some builtins): let the call decide
                pass
        if isinstance(tensor_inputs, str) or not isinstance(tensor_inputs, Sequence):
            raise TypeError(f"callback_on_step_end_tensor_inputs must be a list of names such as ['image_tokens'], "
                            f"got {tensor_inputs!r}")
        unknown = [name for name in tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from "
                             f"{self._callback_tensor_inputs}")
        return list(tensor_inputs)

    @staticmethod
    def _check_batch_size(name: str, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

    # ---------------------------------------------------------------------------------------------------- prompts

    def encode_prompts(
        self, prompt: str | list[str] | None, prompt_ids: Any, style: str, super_resolution: bool
    ) -> list[PromptInput]:
        """Tokenize prompts with the style template (or take `prompt_ids`) and check their length.

        `prompt_ids` are used as given (no template; a trailing `<start_of_image>` is optional) and double as the
        caption of post-selection. Limits: `base_model.config.max_text_length` (109) tokens for stage 1 and, when
        super-resolution runs, the `sr_text_slots` of the direct-SR model (96); longer prompts are an error.
        """
        if (prompt is None) == (prompt_ids is None):
            raise ValueError("pass exactly one of prompt (text) and prompt_ids (token ids)")
        config = self.base_model.config
        requests = []
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise TypeError("prompt must be a non-empty string or a non-empty list of strings")
            for text in prompts:
                if not text.strip():
                    raise ValueError("a prompt is empty; describe the image to generate")
                ids = self.tokenizer.encode_prompt(text, style=style)
                caption = self.tokenizer.encode(text, add_special_tokens=False)
                requests.append(PromptInput(text_ids=ids[:-1], caption_ids=caption))
        else:
            for ids in _as_id_lists(prompt_ids):
                if ids and ids[-1] == config.boi_token_id:
                    ids = ids[:-1]
                if not ids:
                    raise ValueError("a prompt_ids entry is empty; it needs at least one text id")
                bad = [i for i in ids if not 0 <= i < config.vocab_size or i == config.boi_token_id]
                if bad:
                    raise ValueError(f"prompt_ids must be ids in [0, {config.vocab_size}) with <start_of_image> "
                                     f"({config.boi_token_id}) only at the end; found {bad[:4]}")
                requests.append(PromptInput(text_ids=list(ids), caption_ids=list(ids)))
        limit, stage = config.max_text_length, "stage 1"
        if super_resolution and self.dsr_model.config.sr_text_slots < limit:
            limit, stage = self.dsr_model.config.sr_text_slots, "direct super-resolution"
        for request in requests:
            if len(request.text_ids) > limit:
                raise ValueError(f"a prompt is {len(request.text_ids)} tokens long (style template included) but "
                                 f"{stage} accepts at most {limit}; shorten it or use style='none'")
        return requests

    # ---------------------------------------------------------------------------------------------------- stage 1

    def set_stage1_decoding(self, cache_implementation: str = "dynamic", compile: bool = False, **compile_kwargs):
        """Choose how stage 1 runs its one-token decoding steps (the tokens are the same either way).

        Args:
            cache_implementation: `"dynamic"` (default): a `DynamicCache` that grows by one token per step.
                `"static"`: a `StaticCache` preallocated for the longest prompt plus the grid
                (`max_text_length + 1 + image_grid_size²` slots), so every step has the same shapes.
            compile: with `"static"`, run the steps through `torch.compile(base_model, fullgraph=True, dynamic=False,
                **compile_kwargs)` (on a GPU add `mode="reduce-overhead"` for CUDA graphs; on a CPU inductor needs a
                C++ compiler). The first call compiles (seconds to minutes); each new chunk size compiles once more.
            compile_kwargs: passed to `torch.compile`.
        """
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}")
        if compile and cache_implementation != "static":
            raise ValueError("compile=True needs cache_implementation='static' (a growing cache recompiles every step)")
        self._stage1_cache_implementation = cache_implementation
        self._stage1_step = None
        if compile:
            options = {"fullgraph": True, "dynamic": False, **compile_kwargs}
            self._stage1_step = torch.compile(self.base_model, **options)

    def _new_stage1_cache(self) -> Cache:
        config = self.base_model.config
        if self._stage1_cache_implementation == "static":
            return StaticCache(config=config, max_cache_len=config.max_text_length + 1 + config.num_image_positions)
        return DynamicCache(config=config)

    def _step_callback(self, callback, tensor_inputs, stage: str, step: int, image_tokens, sample_indices):
        """Call `callback(pipe, step, stage, {name: tensor})`; returns the (possibly replaced) `image_tokens`."""
        if callback is None:
            return image_tokens
        values = {"image_tokens": image_tokens, "sample_indices": sample_indices}
        outputs = callback(self, step, stage, {name: values[name] for name in tensor_inputs})
        if outputs is None:
            return image_tokens
        if not isinstance(outputs, dict):
            raise TypeError(f"callback_on_step_end must return a dict (e.g. the callback_kwargs it was given), got "
                            f"{type(outputs).__name__} at stage {stage!r}")
        replaced = outputs.get("image_tokens", image_tokens)
        if replaced is image_tokens:
            return image_tokens
        if not isinstance(replaced, torch.Tensor) or replaced.shape != image_tokens.shape:
            raise ValueError(f"callback_on_step_end returned image_tokens of shape "
                             f"{getattr(replaced, 'shape', type(replaced))}; expected {list(image_tokens.shape)}")
        if replaced.is_floating_point() or replaced.is_complex() or replaced.dtype == torch.bool:
            raise TypeError(f"callback_on_step_end returned image_tokens of dtype {replaced.dtype} at stage "
                            f"{stage!r}; return integer token ids (e.g. tokens.long())")
        # stage 1 marks the cells not generated yet with -1
        low, high = (-1 if stage == "stage1" else 0), self.base_model.config.num_image_tokens
        if replaced.numel() and (int(replaced.min()) < low or int(replaced.max()) >= high):
            raise ValueError(f"callback_on_step_end returned image_tokens outside [{low}, {high}) at stage {stage!r} "
                             f"(values {int(replaced.min())} … {int(replaced.max())}); return image ids of the "
                             "codebook")
        return replaced.to(image_tokens.device, torch.long)

    def prefill(
        self, text_ids: Sequence[int], context_tokens: torch.Tensor | None = None, context_cells: torch.Tensor | None = None
    ) -> tuple[Cache, torch.Tensor]:
        """Encode `[text, <start_of_image>, context image tokens]` once (batch 1) and return the cache and the fp32
        image logits `[1, V_img]` of its last position.

        Visibility: text rows see all text; `<start_of_image>` sees the text and itself; context rows see
        the text, `<start_of_image>` and every context token (bidirectional). Positions: text `0 … L-1`,
        `<start_of_image>` at `boi_position_id`, a context token of grid cell `j` at `boi_position_id + 1 + j`.
        The text up-weighting (+c on text keys) is applied by the model.
        """
        config = self.base_model.config
        device = self._device_of(self.base_model)
        text = torch.tensor(list(text_ids), dtype=torch.long, device=device)
        boi = torch.tensor([config.boi_token_id], dtype=torch.long, device=device)
        if context_tokens is None:
            context_tokens = torch.zeros(0, dtype=torch.long, device=device)
            context_cells = torch.zeros(0, dtype=torch.long, device=device)
        length = text.numel()
        input_ids = torch.cat([text, boi, context_tokens.to(device)])[None]
        image_positions = config.boi_position_id + torch.cat([boi.new_zeros(1), 1 + context_cells.to(device)])
        position_ids = torch.cat([torch.arange(length, device=device), image_positions])
        size = input_ids.shape[1]
        visible = torch.ones(size, size, dtype=torch.bool, device=device).tril()
        visible[:length, :length] = True
        visible[length + 1 :, length + 1 :] = True
        cache = self._new_stage1_cache()
        logits = self.base_model(
            input_ids,
            position_ids=position_ids,
            attention_mask=visible[None],
            past_key_values=cache,
            use_cache=True,
            image_logits_only=True,
            logits_to_keep=1,
        ).logits[:, -1]
        return cache, logits

    def autoregress(
        self,
        cache: Cache,
        logits: torch.Tensor,
        grid: torch.Tensor,
        cells: torch.Tensor,
        settings: dict,
        generator: GeneratorArg,
        callback=None,
        tensor_inputs: Sequence[str] = (),
        sample_indices: torch.Tensor | None = None,
        progress=None,
    ) -> torch.LongTensor:
        """Stage-1 cached generation of the grid cells `cells` (in this order) for a batch sharing one prompt cache.

        Args:
            cache: the batch-1 prompt cache of `prefill` (broadcast to the batch by the model; updated in place).
            logits: `[1, V_img]` logits of the last prefilled position.
            grid: `[b, g²]` image ids, -1 at the cells to sample; other cells of `cells` are teacher-forced
                (their ids are fed without sampling, as the official cached loop).
            cells: `[n]` grid cells of the generated segment, in generation order; cell `j` has position
                `boi_position_id + 1 + j`.
            settings: sampler knobs of `CogView2Scheduler.sampler_settings`.
            generator: one generator (or `None`) for the batch, or a list of `b` (one per row).

        Returns:
            The filled `[b, g²]` grid.
        """
        config = self.base_model.config
        batch, side = grid.shape[0], config.image_grid_size
        grid = grid.clone()
        to_sample = (grid[0, cells] < 0).tolist()
        positions = (config.boi_position_id + 1 + cells).to(grid.device)
        logits = logits.expand(batch, -1)
        self.base_model.broadcast_cache(cache, batch)  # before the steps: a compiled step never sees batch 1
        step_model = self.base_model if self._stage1_step is None else self._stage1_step
        sample = functools.partial(self.scheduler.sample_stage1, temperature=settings["temperature"],
                                   top_k_clusters=settings["top_k_clusters"],
                                   cluster_temperature=settings["cluster_temperature"])
        for step, cell in enumerate(cells.tolist()):
            if to_sample[step]:
                grid[:, cell] = _draw(sample, generator, logits)
            if callback is not None:
                grid = self._step_callback(
                    callback, tensor_inputs, "stage1", step, grid.view(batch, side, side), sample_indices
                ).view(batch, -1)
            if step + 1 < len(to_sample):
                logits = step_model(
                    grid[:, cell : cell + 1],
                    position_ids=positions[step : step + 1],
                    past_key_values=cache,
                    use_cache=True,
                    image_logits_only=True,
                ).logits[:, -1]
            if progress is not None:
                progress.update()
        return grid

    def generate_stage1(
        self,
        requests: list[PromptInput],
        per_prompt: int,
        settings: dict,
        generator: GeneratorArg,
        batch_size: int,
        callback=None,
        tensor_inputs: Sequence[str] = (),
    ) -> torch.LongTensor:
        """Text → `[len(requests) · per_prompt, g, g]` stage-1 grids, grouped by prompt.

        Each prompt is encoded once; its cache is shared by every chunk of at most `batch_size` samples.
        `generator`: one generator (or `None`) for all samples, or a list with one per sample; consecutive samples
        sharing a generator are chunked from their first one as if generated alone (and draw together).
        """
        side = self.low_res_grid
        cells = torch.arange(side * side)
        chunks = self._stage1_chunks(len(requests), per_prompt, generator, batch_size)
        device = self._device_of(self.base_model)
        results = []
        with self.progress_bar(total=len(chunks) * cells.numel()) as progress:
            progress.set_description("stage 1")
            cache = logits = None
            for index, (p, start, size) in enumerate(chunks):
                if index == 0 or chunks[index - 1][0] != p:
                    cache, logits = self.prefill(requests[p].text_ids)
                last_chunk_of_prompt = index + 1 == len(chunks) or chunks[index + 1][0] != p
                grid = torch.full((size, cells.numel()), -1, dtype=torch.long, device=device)
                sample_indices = torch.arange(start, start + size)
                results.append(
                    self.autoregress(
                        cache if last_chunk_of_prompt else copy.deepcopy(cache),
                        logits,
                        grid,
                        cells,
                        settings,
                        _rows(generator, start, start + size),
                        callback,
                        tensor_inputs,
                        sample_indices,
                        progress,
                    )
                )
        return torch.cat(results).view(-1, side, side)

    @staticmethod
    def _stage1_chunks(
        num_prompts: int, per_prompt: int, generator: GeneratorArg, batch_size: int
    ) -> list[tuple[int, int, int]]:
        """`(prompt, first sample, size)` chunks of at most `batch_size` samples of one prompt.

        The samples of a prompt form runs sharing a generator (one run with a single generator); each run is cut in
        pieces of `batch_size` from its start, and consecutive pieces are packed into a chunk while they fit."""
        chunks = []
        for p in range(num_prompts):
            first, last = p * per_prompt, (p + 1) * per_prompt
            runs, start = [], first
            for end in range(first + 1, last + 1):
                if end == last or not isinstance(generator, list) or generator[end] is not generator[start]:
                    runs.append((start, end))
                    start = end
            pieces = [(s, min(batch_size, end - s)) for start, end in runs for s in range(start, end, batch_size)]
            chunk_start, chunk_size = pieces[0]
            for piece_start, piece_size in pieces[1:]:
                if chunk_size + piece_size <= batch_size:
                    chunk_size += piece_size
                else:
                    chunks.append((p, chunk_start, chunk_size))
                    chunk_start, chunk_size = piece_start, piece_size
            chunks.append((p, chunk_start, chunk_size))
        return chunks

    def select_candidates(
        self,
        candidates: torch.LongTensor,
        requests: list[PromptInput],
        keep: int,
        batch_size: int,
    ) -> tuple[torch.LongTensor, torch.FloatTensor, torch.LongTensor]:
        """Post-selection (the official ordering bug fixed): score every candidate with its caption and keep the `keep` best per prompt.

        Args:
            candidates: `[P · C, g, g]` stage-1 grids, `C` per prompt, grouped by prompt.

        Returns:
            `(kept grids [P · keep, g, g], their scores [P · keep], their indices into candidates)`, best first.
        """
        per_prompt = candidates.shape[0] // len(requests)
        flat = candidates.reshape(candidates.shape[0], -1)
        scores = []
        with self.progress_bar(total=len(requests)) as progress:
            progress.set_description("post-selection")
            for p, request in enumerate(requests):
                group = flat[p * per_prompt : (p + 1) * per_prompt]
                scores.append(torch.cat([self.base_model.score_captions(chunk, request.caption_ids).float()
                                         for chunk in group.split(batch_size)]))
                progress.update()
        scores = torch.stack(scores)  # [P, C]
        order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :keep]
        indices = (order + per_prompt * torch.arange(len(requests), device=order.device)[:, None]).flatten()
        return candidates[indices], scores.gather(1, order).flatten(), indices

    # ---------------------------------------------------------------------------------------- super-resolution

    @staticmethod
    def _pad_texts(texts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Right-pad id lists into `[b, T]` ids and a `[b, T]` 0/1 mask (the SR models re-pack them on the left)."""
        width = max(len(t) for t in texts)
        ids = torch.zeros(len(texts), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(texts), width, dtype=torch.long, device=device)
        for row, text in enumerate(texts):
            ids[row, : len(text)] = torch.tensor(list(text), dtype=torch.long, device=device)
            mask[row, : len(text)] = 1
        return ids, mask

    def direct_super_resolution(
        self,
        low_res: torch.LongTensor,
        texts: Sequence[Sequence[int]],
        settings: dict,
        generator: GeneratorArg,
        batch_size: int,
        callback=None,
        tensor_inputs: Sequence[str] = (),
    ) -> torch.LongTensor:
        """Stage 2: `[B, g, g]` → `[B, G, G]`, one forward pass and one cluster-sampling draw per chunk.

        `texts`: the prompt ids (without `<start_of_image>`) of every sample. `generator`: one (or `None`), or a
        list with one per sample (each sample then draws alone)."""
        side = self.high_res_grid
        sample = functools.partial(self.scheduler.sample_dsr, dsr_temperature=settings["dsr_temperature"],
                                   dsr_top_k_clusters=settings["dsr_top_k_clusters"],
                                   dsr_cluster_temperature=settings["dsr_cluster_temperature"])
        results = []
        with self.progress_bar(total=-(-low_res.shape[0] // batch_size)) as progress:
            progress.set_description("direct super-resolution")
            for start in range(0, low_res.shape[0], batch_size):
                chunk = low_res[start : start + batch_size]
                input_ids, attention_mask = self._pad_texts(texts[start : start + batch_size],
                                                            self._device_of(self.dsr_model))
                logits = self.dsr_model(input_ids=input_ids, attention_mask=attention_mask,
                                        low_res_tokens=chunk.to(input_ids.device)).logits
                tokens = _draw(sample, _rows(generator, start, start + chunk.shape[0]), logits).view(-1, side, side)
                del logits
                sample_indices = torch.arange(start, start + chunk.shape[0])
                results.append(self._step_callback(callback, tensor_inputs, "dsr", 0, tokens, sample_indices))
                progress.update()
        return torch.cat(results)

    def iterative_super_resolution(
        self,
        tokens: torch.LongTensor,
        texts: Sequence[Sequence[int]],
        settings: dict,
        generator: GeneratorArg,
        batch_size: int,
        input_mask: torch.BoolTensor | None = None,
        callback=None,
        tensor_inputs: Sequence[str] = (),
    ) -> torch.LongTensor:
        """Stage 3: the LoPAR passes over `[B, G, G]` grids, chunk by chunk.

        The model sees the first `sr_text_slots` (16) prompt ids, as in the official pipeline. `input_mask`
        (`[B, G, G]` bool) restricts the cells that may change (editing); the others keep their ids exactly.
        `generator`: one (or `None`), or a list with one per sample (each sample then draws alone).
        """
        side = tokens.shape[-1]
        slots = self.itersr_model.config.sr_text_slots
        mask_token = self.itersr_model.config.boi_token_id
        num_chunks = -(-tokens.shape[0] // batch_size)
        results = []
        with self.progress_bar(total=num_chunks * self.scheduler.num_lopar_passes) as progress:
            progress.set_description("iterative super-resolution")
            for start in range(0, tokens.shape[0], batch_size):
                current = tokens[start : start + batch_size].clone()
                batch = current.shape[0]
                input_ids, attention_mask = self._pad_texts([t[:slots] for t in texts[start : start + batch_size]],
                                                            self._device_of(self.itersr_model))
                current = current.to(input_ids.device)
                chunk_mask = None if input_mask is None else input_mask[start : start + batch_size].to(current.device)
                sample_indices = torch.arange(start, start + batch)
                passes = self.scheduler.lopar_passes(side, side, chunk_mask, settings["itersr_top_k"])
                for step, (_, regenerate, top_k) in enumerate(passes):
                    regenerate = regenerate.to(current.device).expand(batch, side, side)
                    masked = torch.where(regenerate, mask_token, current)
                    logits = self.itersr_model(
                        input_ids=input_ids, attention_mask=attention_mask, image_tokens=masked
                    ).logits
                    flat = regenerate.reshape(batch, -1)
                    sample = functools.partial(self._sample_itersr_cells, top_k=top_k,
                                               temperature=settings["itersr_temperature"])
                    samples = _draw(sample, _rows(generator, start, start + batch),
                                    logits.view(batch, flat.shape[1], -1), flat)
                    del logits
                    current = current.reshape(batch, -1).masked_scatter(flat, samples).view(batch, side, side)
                    current = self._step_callback(callback, tensor_inputs, "itersr", step, current, sample_indices)
                    progress.update()
                results.append(current)
        return torch.cat(results)

    def _sample_itersr_cells(self, logits, regenerate, *, generator, top_k, temperature) -> torch.LongTensor:
        """LoPAR draw of the cells to regenerate only: `logits` `[b, N, V]`, `regenerate` `[b, N]` bool."""
        return self.scheduler.sample_itersr(logits[regenerate], top_k, generator, temperature=temperature)

    # ---------------------------------------------------------------------------------------------------- decode

    def decode(self, tokens: torch.LongTensor, output_type: str, batch_size: int, upscale: int = 1):
        """Token grids `[B, h, w]` → images (`output_type` "pil", "np" or "pt"), decoded `batch_size` at a time;
        `upscale` > 1 enlarges them by nearest-neighbour (first-stage-only output, as the official script)."""
        images = []
        for chunk in tokens.split(batch_size):
            decoded = self.image_tokenizer.decode(chunk.to(self._device_of(self.image_tokenizer))).float()
            if upscale > 1:
                decoded = F.interpolate(decoded, scale_factor=upscale, mode="nearest")
            images.append(decoded.cpu())
        return self.image_processor.postprocess(torch.cat(images), output_type=output_type)

    # ------------------------------------------------------------------------------------------- saving/loading

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs):
        """A pipeline of this class sharing `pipeline`'s components (no copy); components passed as keyword
        arguments replace the shared ones, `dtype` (or `torch_dtype`) converts the models."""
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        unknown = set(kwargs) - set(COMPONENT_NAMES)
        if unknown:
            raise TypeError(f"from_pipe got unexpected arguments {sorted(unknown)}; pass components only: "
                            f"{', '.join(COMPONENT_NAMES)}")
        components = {name: kwargs.get(name, getattr(pipeline, name, None)) for name in COMPONENT_NAMES}
        new = cls(**components)
        if dtype is not None or torch_dtype is not None:
            new.to(dtype=torch_dtype if dtype is None else dtype)
        if hasattr(pipeline, "_progress_bar_config"):
            new.set_progress_bar_config(**pipeline._progress_bar_config)
        return new

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        remote_code: bool = True,
        **kwargs,
    ) -> None:
        """Save a self-contained pipeline folder, atomically (a temporary sibling folder replaces `save_directory`).

        Besides the component folders, the folder gets the code it needs to load without coglm_hf: the pipeline
        files at the root and each component's module file(s) in its folder, with `model_index.json` entries
        `[<module file>, <class>]` that resolve to them. It loads with `CogView2Pipeline.from_pretrained(folder)`
        (coglm_hf installed; no code from the folder runs) or with `DiffusionPipeline.from_pretrained(folder,
        custom_pipeline=<folder>/pipeline_cogview2.py, trust_remote_code=True)`. Optional components set to `None`
        are left out and load back as `None`.

        `remote_code=False` writes weights and configs only (entries `["coglm_hf.<module>", <class>]`, no
        `auto_map`): a folder for the installed package alone, the way the embedded demo is shipped.

        Args:
            save_directory: the pipeline folder to write (replaced if it exists).
            safe_serialization: as in Diffusers: `False` makes the Diffusers component (`image_tokenizer`) write a
                pickled `.bin` (`torch.save`); the transformers models always write safetensors.
            variant: weights files are named `<name>.<variant>.<ext>` (e.g. `"fp16"`); load them back with
                `from_pretrained(..., variant=...)`.
            max_shard_size: largest weights file per model (`int` bytes or a string such as `"5GB"`, `"200MB"`);
                bigger models are sharded with an index file.
        """
        if not isinstance(safe_serialization, bool):
            raise TypeError(f"safe_serialization must be True or False, got {safe_serialization!r}")
        if variant is not None and (not isinstance(variant, str) or not re.fullmatch(r"[\w-]+", variant)):
            raise ValueError(f"variant must be a short name made of letters, digits, '_' or '-' (e.g. 'fp16'), got "
                             f"{variant!r}")
        if max_shard_size is not None:
            check_max_shard_size(max_shard_size)
        if push_to_hub:
            raise ValueError("push_to_hub is not supported here: save the folder, then upload it with "
                             "huggingface_hub.upload_folder")
        target = Path(save_directory).absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            staging.chmod(0o755)
            super().save_pretrained(staging, safe_serialization=safe_serialization, variant=variant,
                                    max_shard_size=max_shard_size)
            if remote_code:
                self._add_remote_code(staging)
            else:
                _remove_code(staging)
            _replace_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        # staging folders of saves that were killed midway (an interrupted save never touches `target`)
        for stale in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)

    def _add_remote_code(self, folder: Path) -> None:
        """Copy the pipeline and component code into `folder` and point `model_index.json` at it.

        diffusers' remote-code loader copies only the files that the module named in `model_index.json` imports
        directly, so each component folder gets an entry module `remote_<module>.py` that imports every file of
        the component's code (its transitive closure) and re-exports the class.
        """
        # the pipeline files: next to this module, or (remote code loads only the file it was asked for) in the
        # folder this pipeline was loaded from
        sources = [Path(__file__).parent]
        if self.name_or_path and Path(self.name_or_path).is_dir():
            sources.append(Path(self.name_or_path))
        for name in PIPELINE_FILES:
            source = next((s / name for s in sources if (s / name).is_file()), None)
            if source is None and name == PIPELINE_FILES[0]:
                raise FileNotFoundError(f"{name} not found in {sources}; cannot write a self-contained folder")
            if source is not None:
                for path in _module_files(source):
                    shutil.copyfile(path, folder / path.name)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index.pop("_name_or_path", None)
        for name in COMPONENT_NAMES:
            entry = index.get(name)
            component = getattr(self, name, None)
            if component is None or not entry or entry[0] in (None, "diffusers", "transformers"):
                continue
            source = Path(importlib.import_module(type(component).__module__).__file__)
            files = _module_files(source)
            for path in files:
                if not (folder / name / path.name).exists():
                    shutil.copyfile(path, folder / name / path.name)
            class_name = type(component).__name__
            lines = [f'"""Entry module of `{name}` for diffusers\' remote-code loader (written by save_pretrained): it '
                     "imports every file the component needs."
                     '"""', ""]
            lines += [f"from .{path.stem} import *  # noqa: F401,F403" for path in sorted(files[1:])]
            lines += [f"from .{source.stem} import {class_name}  # noqa: F401", ""]
            (folder / name / f"{REMOTE_ENTRY_PREFIX}{source.stem}.py").write_text("\n".join(lines), encoding="utf-8")
            index[name] = [f"{REMOTE_ENTRY_PREFIX}{source.stem}", class_name]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a pipeline folder written by `save_pretrained` or the converter (local folder or Hub repo id).

        Where this class comes from the installed coglm_hf package, every component is built with coglm_hf's own
        classes (the `[module, class]` entries of `model_index.json` are looked up among coglm_hf's modules); no
        code from the folder is executed. With `trust_remote_code=True` or `custom_pipeline`, loading is left to
        `DiffusionPipeline.from_pretrained` and the folder's code.

        Args:
            pretrained_model_name_or_path: the pipeline folder or a Hub repo id.
            dtype / torch_dtype: dtype of every model, or a dict `{component name: dtype, "default": dtype}`.
            variant: load the weights files saved with `save_pretrained(..., variant=...)` (e.g. `"fp16"`).
            device_map: where to put the models: a device (`"cpu"`, `"cuda"`, `"cuda:1"`, `torch.device`) for all
                of them, or a dict `{component name: device}` (components not named stay on the CPU).
            local_files_only, revision, cache_dir, token: passed to the Hub download for repo ids.
            tokenizer, image_tokenizer, base_model, dsr_model, itersr_model, scheduler: ready components that
                replace the folder's (`None` leaves an optional component out).

        Pickled `.bin` weights (written with `safe_serialization=False`) are only ever read with
        `torch.load(weights_only=True)`. Each loaded component is reported at INFO level on Diffusers' pipeline
        logger, as `DiffusionPipeline.from_pretrained` does.
        """
        if kwargs.get("trust_remote_code") or kwargs.get("custom_pipeline") or not cls._has_installed_modules():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        kwargs.pop("trust_remote_code", None)
        download_keys = ("local_files_only", "revision", "cache_dir", "token")
        download = {key: kwargs.pop(key) for key in download_keys if key in kwargs}
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        dtype = torch_dtype if dtype is None else dtype
        variant, device_map = kwargs.pop("variant", None), kwargs.pop("device_map", None)
        passed = {name: kwargs.pop(name) for name in COMPONENT_NAMES if name in kwargs}
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected arguments {sorted(kwargs)}")
        if variant is not None and not isinstance(variant, str):
            raise TypeError(f"variant must be a string such as 'fp16', got {variant!r}")
        devices = cls._component_devices(device_map)
        folder = cls._resolve_folder(pretrained_model_name_or_path, download)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: {pretrained_model_name_or_path} is not a pipeline "
                                    "folder (write one with save_pretrained or conversion/convert_cogview2.py)")
        index = _read_json(index_path)
        components = {}
        for name in COMPONENT_NAMES:
            if name in passed:
                components[name] = passed[name]
                continue
            entry = index.get(name)
            if not entry or entry[0] is None:
                components[name] = None
                continue
            if not isinstance(entry, list) or len(entry) != 2 or not all(isinstance(e, str) for e in entry):
                raise ValueError(f"{index_path}: the entry of {name} must be [module, class], got {entry!r}")
            if not (folder / name).is_dir():
                raise FileNotFoundError(f"{folder / name} not found: {index_path} names a {name} but the folder "
                                        "has no such subfolder; save the pipeline again")
            component_cls = cls._installed_class(*entry)
            load_kwargs = {}
            component_dtype = dtype.get(name, dtype.get("default")) if isinstance(dtype, dict) else dtype
            if component_dtype is not None and name.endswith("_model"):
                load_kwargs["dtype"] = component_dtype
            elif component_dtype is not None and name == "image_tokenizer":
                load_kwargs["torch_dtype"] = component_dtype
            if variant is not None and name.endswith(("_model", "image_tokenizer")):
                load_kwargs["variant"] = variant
            components[name] = cls._load_component(component_cls, folder / name, name, load_kwargs)
            if name in devices:
                components[name] = components[name].to(devices[name])
            _pipeline_logger.info(f"Loaded {name} as {entry[1]} from `{name}` subfolder of "
                                  f"{pretrained_model_name_or_path}.")
        for name in ("base_model", "scheduler"):
            if components[name] is None:
                raise ValueError(f"{index_path} has no {name}; it is required")
        pipeline = cls(**components)
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipeline

    @staticmethod
    def _resolve_folder(name_or_path: str | os.PathLike, download: dict) -> Path:
        """The local folder of `name_or_path`; a Hub repo id ("org/name") is downloaded (or found in the cache)."""
        folder = Path(name_or_path).expanduser()
        if folder.is_dir():
            return folder
        text = str(name_or_path)
        if folder.exists():
            raise NotADirectoryError(f"{folder} is a file; pass the pipeline folder (the one with model_index.json)")
        if folder.is_absolute() or text.startswith((".", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text):
            raise FileNotFoundError(f"folder not found: {folder}; check the path (it is not a Hub repo id either)")
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(text, **download))
        except Exception as error:  # the Hub client raises many types (offline, missing repo, auth)
            raise OSError(f"{text} is not a local folder and could not be fetched from the Hub "
                          f"({type(error).__name__}: {error}); check the path or repo id") from error

    @staticmethod
    def _component_devices(device_map: Any) -> dict[str, torch.device]:
        """`device_map` of `from_pretrained` → `{component name: device}` for the models."""
        models = ("image_tokenizer", "base_model", "dsr_model", "itersr_model")
        if device_map is None:
            return {}
        if isinstance(device_map, dict):
            unknown = set(device_map) - set(models)
            if unknown:
                raise ValueError(f"device_map names {sorted(unknown)}; its keys must be among {models}")
            items = device_map.items()
        else:
            items = [(name, device_map) for name in models]
        devices = {}
        for name, device in items:
            try:
                devices[name] = torch.device(device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device_map: {device!r} is not a device; use 'cpu', 'cuda', 'cuda:1', a "
                                 "torch.device or a dict {component: device} ('auto'/'balanced' are not "
                                 "supported)") from None
            if devices[name].type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device_map puts {name} on {device!r} but no CUDA device is visible; use 'cpu'")
        return devices

    @staticmethod
    def _load_component(component_cls, path: Path, name: str, load_kwargs: dict):
        """`component_cls.from_pretrained(path)`, with a missing `variant` reported by name."""
        variant = load_kwargs.get("variant")
        if variant is not None and not any(f".{variant}." in file.name for file in path.iterdir()):
            raise FileNotFoundError(f"{path} has no weights of variant {variant!r}; save with "
                                    f"save_pretrained(..., variant={variant!r}) or load without variant "
                                    f"({name})")
        if name == "image_tokenizer" and not any(file.suffix == ".safetensors" for file in path.iterdir()):
            # a folder saved with safe_serialization=False: say so instead of letting Diffusers look for
            # safetensors first (it logs an error); the pickle is still read with weights_only=True
            load_kwargs = dict(load_kwargs, use_safetensors=False)
        try:
            return component_cls.from_pretrained(path, **load_kwargs)
        except (TypeError, ImportError):  # programming errors and missing packages: report them as they are
            raise
        except Exception as error:  # the loaders raise many types (OSError, ValueError, SafetensorError, ...)
            raise OSError(f"could not load {name} from {path} ({type(error).__name__}: {error}); the folder is "
                          "damaged or incomplete: save or convert the pipeline again") from error

    @classmethod
    def _has_installed_modules(cls) -> bool:
        """True when this file is part of an installed package (coglm_hf), not a copy loaded as remote code."""
        package = __name__.rpartition(".")[0]
        return bool(package) and not package.startswith("diffusers_modules")

    @classmethod
    def _installed_class(cls, module_name: str, class_name: str):
        """Resolve a `model_index.json` entry among the sibling modules of this file in its package."""
        package = __name__.rpartition(".")[0]
        library = module_name.rpartition(".")[2].removeprefix(REMOTE_ENTRY_PREFIX)
        if module_name in ("transformers", "diffusers"):
            module = importlib.import_module(module_name)
        else:
            try:
                module = importlib.import_module(f"{package}.{library}")
            except ModuleNotFoundError:
                raise ValueError(f"model_index.json names [{module_name!r}, {class_name!r}], which is not a module "
                                 f"of {package}; load the folder with trust_remote_code=True if you trust its "
                                 "code") from None
        component_cls = getattr(module, class_name, None)
        if component_cls is None:
            raise ValueError(f"{module.__name__} has no class {class_name!r} (named in model_index.json)")
        return component_cls


class CogView2Pipeline(CogView2StagesMixin, DiffusionPipeline):
    r"""Text-to-image generation with CogView2: stage 1 (20×20 tokens), optional post-selection, direct
    super-resolution (60×60), iterative super-resolution (LoPAR) and VQ decoding to 480×480.

    Components: `tokenizer` (`CogLMTokenizer`), `image_tokenizer` (`IceVQModel`), `base_model`
    (`CogLMForMaskedRegions`), `dsr_model` (`CogLMForDirectSuperResolution`), `itersr_model`
    (`CogLMForIterativeSuperResolution`), `scheduler` (`CogView2Scheduler`). `tokenizer`, `image_tokenizer`,
    `dsr_model` and `itersr_model` may be `None` when the call does not need them (`prompt_ids`,
    `output_type="tokens"`, `only_first_stage=True`).

    Example:

    ```py
    >>> import torch
    >>> from coglm_hf.pipeline_cogview2 import CogView2Pipeline

    >>> pipe = CogView2Pipeline.from_pretrained("converted/cogview2", dtype=torch.float16).to("cuda")
    >>> generator = torch.Generator("cuda").manual_seed(0)
    >>> image = pipe("a tiger wearing VR glasses", num_candidates=4, generator=generator).images[0]
    ```
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_ids: Any = None,
        num_images_per_prompt: int = 1,
        num_candidates: int | None = None,
        style: str = "mainbody",
        only_first_stage: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("image_tokens",),
        temperature: float | None = None,
        top_k_clusters: int | None = None,
        cluster_temperature: float | None = None,
        dsr_temperature: float | None = None,
        dsr_top_k_clusters: int | None = None,
        dsr_cluster_temperature: float | None = None,
        itersr_top_k: int | Sequence[int] | None = None,
        itersr_temperature: float | None = None,
        stage1_batch_size: int = 8,
        sr_batch_size: int = 4,
    ) -> CogView2PipelineOutput | tuple:
        r"""Generate images from text.

        Args:
            prompt: text prompt(s); wrapped in the template of `style` by the tokenizer.
            prompt_ids: instead of `prompt`: one list of token ids per prompt, used as given (no template; a
                trailing `<start_of_image>` is optional). They are also the caption scored by post-selection.
            num_images_per_prompt: images returned per prompt.
            num_candidates: post-selection: generate this many stage-1 candidates per prompt, score each with the
                caption likelihood of the raw prompt text and keep the `num_images_per_prompt` best ones
                for super-resolution (`None` = no post-selection). With a list of generators, every image has its
                own `num_candidates` candidates.
            style: one of `scheduler.styles` ("mainbody" default, "none", "photo", "flat", "comics", "oil",
                "sketch", "isometric", "chinese", "watercolor"): prompt template and its sampler overrides.
            only_first_stage: stop after stage 1 (and post-selection); images are the 20×20-token decodes enlarged
                by nearest-neighbour to the super-resolution size when the SR models are present.
            generator: the only source of randomness, on the device the pipeline runs on: one `torch.Generator`,
                or a list with one per returned image (prompts × `num_images_per_prompt`, grouped by prompt). With
                a list, image `i` is the image of a run of its prompt with `generator=generator[i]` alone: its own
                `num_candidates` candidates (post-selection keeps its best one) and its own draws in every stage.
            output_type: "pil", "np", "pt" or "tokens" (the final token grids, `[B, 20, 20]` with
                `only_first_stage`, else `[B, 60, 60]`); "latent" (Diffusers' name for the undecoded output) is
                the same as "tokens".
            return_dict: return a `CogView2PipelineOutput` (else a tuple `(images,)` or `(images, scores)`).
            callback_on_step_end: `callback(pipe, step, stage, callback_kwargs) -> dict`, called after every stage-1
                token (`stage="stage1"`, `step` = token index; `image_tokens` `[b, 20, 20]` with -1 at cells not
                generated yet), after post-selection (`"selection"`, step 0; the kept grids and, in
                `sample_indices`, their candidate indices), after direct SR (`"dsr"`, step 0) and after every LoPAR
                pass (`"itersr"`, step = pass − 1). Stages run in chunks: `sample_indices` tells which samples of
                the batch `image_tokens` holds. Returning `{"image_tokens": t}` replaces the tokens (in stage 1 only
                the newest token is fed on).
            callback_on_step_end_tensor_inputs: which of `"image_tokens"`, `"sample_indices"` the callback receives.
            temperature, top_k_clusters, cluster_temperature: stage-1 cluster sampling (defaults 1.15, 16, 1.0).
            dsr_temperature, dsr_top_k_clusters, dsr_cluster_temperature: direct-SR cluster sampling (1.0, 100,
                0.89). `top_k_clusters=1` with a cluster temperature of 0 is exact argmax in the most probable
                cluster.
            itersr_top_k: top-k of each LoPAR pass (one int for all passes or one per pass; default 40, 40, 40, 20,
                20, 10). itersr_temperature: their temperature (1.0; 0 = argmax).
                Knobs left `None` come from the style recipe, then the scheduler config.
            stage1_batch_size: samples generated together in stage 1 (and scored together); 8 as the official
                script.
            sr_batch_size: samples per super-resolution / decoding chunk (4 as the official pipeline). Any batch
                size works; no sample is dropped.

        Returns:
            `CogView2PipelineOutput`, or a tuple when `return_dict=False`.
        """
        # 0. check inputs
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        decode = output_type not in TOKEN_OUTPUT_TYPES
        self.check_components(super_resolution=not only_first_stage, decode=decode, tokenize=prompt is not None)
        settings = self.scheduler.sampler_settings(
            style,
            temperature=temperature,
            top_k_clusters=top_k_clusters,
            cluster_temperature=cluster_temperature,
            dsr_temperature=dsr_temperature,
            dsr_top_k_clusters=dsr_top_k_clusters,
            dsr_cluster_temperature=dsr_cluster_temperature,
            itersr_top_k=itersr_top_k,
            itersr_temperature=itersr_temperature,
        )
        self._check_batch_size("num_images_per_prompt", num_images_per_prompt)
        self._check_batch_size("stage1_batch_size", stage1_batch_size)
        self._check_batch_size("sr_batch_size", sr_batch_size)
        if num_candidates is not None:
            self._check_batch_size("num_candidates", num_candidates)
            if num_candidates < num_images_per_prompt and not isinstance(generator, list):
                raise ValueError(f"num_candidates ({num_candidates}) must be >= num_images_per_prompt "
                                 f"({num_images_per_prompt}): post-selection keeps the best of the candidates")
        tensor_inputs = self._check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        self._warn_if_half_on_cpu(device)
        requests = self.encode_prompts(prompt, prompt_ids, style, super_resolution=not only_first_stage)
        self._check_generator(generator, device, len(requests) * num_images_per_prompt)

        # 1. stage 1: 20×20 tokens per candidate; with one generator per image, each image has its own candidates
        per_image = isinstance(generator, list)
        if per_image:
            candidates = num_candidates or 1
            per_prompt = num_images_per_prompt * candidates
            stage1_generator = [g for g in generator for _ in range(candidates)]
        else:
            per_prompt = num_candidates or num_images_per_prompt
            stage1_generator = generator
        tokens = self.generate_stage1(requests, per_prompt, settings, stage1_generator, stage1_batch_size,
                                      callback_on_step_end, tensor_inputs)

        # 2. post-selection: keep the best-scored candidates of each prompt (of each image with a generator list)
        scores = None
        if num_candidates is not None:
            if per_image:
                groups = [request for request in requests for _ in range(num_images_per_prompt)]
                tokens, scores, kept = self.select_candidates(tokens, groups, 1, stage1_batch_size)
            else:
                tokens, scores, kept = self.select_candidates(tokens, requests, num_images_per_prompt,
                                                              stage1_batch_size)
            tokens = self._step_callback(callback_on_step_end, tensor_inputs, "selection", 0, tokens, kept.cpu())
            scores = scores.cpu()

        # 3. super-resolution: 60×60 tokens
        if not only_first_stage:
            texts = [request.text_ids for request in requests for _ in range(num_images_per_prompt)]
            tokens = self.direct_super_resolution(tokens, texts, settings, generator, sr_batch_size,
                                                  callback_on_step_end, tensor_inputs)
            tokens = self.iterative_super_resolution(tokens, texts, settings, generator, sr_batch_size,
                                                     callback=callback_on_step_end, tensor_inputs=tensor_inputs)

        # 4. decode
        if not decode:
            images = tokens.cpu()
        else:
            upscale = 1
            if only_first_stage and self.dsr_model is not None:
                upscale = self.dsr_model.config.sr_scale
            images = self.decode(tokens, output_type, sr_batch_size, upscale)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,) if scores is None else (images, scores)
        return CogView2PipelineOutput(images=images, scores=scores)


__all__ = ["CogView2Pipeline", "CogView2PipelineOutput", "CogView2StagesMixin", "PromptInput", "check_max_shard_size"]
