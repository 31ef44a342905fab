"""Convert official CogView2 SwissArmyTransformer (SAT) model folders to coglm_hf checkpoints.

A SAT folder holds ``latest`` (the iteration to load, or ``release``), ``model_config.json`` and
``<iteration>/mp_rank_00_model_states.pt`` whose ``module`` entry is the state dict (SwissArmyTransformer's checkpoint layout). The kind
of model (``coglm``, ``cogview2-dsr``, ``cogview2-itersr``) is detected from the keys. Every key is mapped explicitly;
an unknown or missing key is an error, never a silent drop.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from .configuration_coglm import CogLMConfig, CogLMDirectSRConfig, CogLMIterativeSRConfig
from .pipeline_cogview2 import check_max_shard_size
from .safetensors_streaming import write_sharded_weights

logger = logging.getLogger(__name__)

MODEL_KINDS = ("coglm", "dsr", "itersr")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

_LAYER_KEY = re.compile(
    r"^transformer\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|third_layernorm|fourth_layernorm|"
    r"attention\.query_key_value|attention\.dense|mlp\.dense_h_to_4h|mlp\.dense_4h_to_h)\.(weight|bias)$"
)
_PLUS_KEY = re.compile(r"^mixins\.attention_plus\.(query_key_value|dense)\.(\d+)\.(weight|bias)$")
_TOP_LEVEL = {
    "transformer.word_embeddings.weight": "transformer.word_embeddings.weight",
    "transformer.position_embeddings.weight": "transformer.position_embeddings.weight",
    "transformer.final_layernorm.weight": "transformer.final_layernorm.weight",
    "transformer.final_layernorm.bias": "transformer.final_layernorm.bias",
    "mixins.extra_position_embedding.position_embeddings.weight": "transformer.hires_position_embeddings.weight",
}


def _numpy_safe_globals() -> list:
    """The numpy types DeepSpeed/SAT bookkeeping (rng states) pickles — and nothing else.

    numpy 2 pickles its array helpers as ``numpy._core.multiarray.*``; files written with numpy 1.x (every 2022
    DeepSpeed checkpoint) name the same functions ``numpy.core.multiarray.*``. ``weights_only`` matches globals by
    the name in the file, so both names are allow-listed for the same two functions. (Protocol 2's
    ``__builtin__.set`` and ``_codecs.encode`` are already mapped and allowed by torch itself.)
    """
    core = getattr(np, "_core", None) or np.core
    allowed: list = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        function = getattr(core.multiarray, name)
        allowed += [(function, f"numpy._core.multiarray.{name}"), (function, f"numpy.core.multiarray.{name}")]
    allowed += [type(np.dtype(name)) for name in ("uint32", "int64", "float64", "float32", "bool", "int32", "uint8")]
    return allowed


def _read_model_states(weights: Path) -> dict:
    """``torch.load(weights_only=True)`` of a DeepSpeed model-state file, memory-mapped when it is a zip archive.

    A refused object and a damaged file get different errors; neither suggests an unsafe load.
    """
    zipped = zipfile.is_zipfile(weights)  # torch's format since 1.6; the legacy tar/pickle format cannot be mapped
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(weights, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", str(error))
        if refused:
            raise ValueError(
                f"{weights} was refused by the safe loader (weights_only=True): it holds a {refused.group(1)} object, "
                "which no CogView2 or DeepSpeed model-state file contains (they hold tensors, plain containers and "
                "numpy rng states). It was not run. Use the official file."
            ) from None
        damaged = error
    except Exception as error:  # a truncated zip, a foreign file: torch raises RuntimeError, EOFError, KeyError…
        damaged = error
    raise ValueError(
        f"{weights} is damaged (truncated or corrupted) or is not a PyTorch checkpoint "
        f"({type(damaged).__name__} while reading it); download or copy it again"
    ) from damaged


def load_sat_state_dict(model_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, str]:
    """Read ``latest`` → ``<iteration>/mp_rank_00_model_states.pt`` → ``module``.

    Loads with ``torch.load(weights_only=True, mmap=True)``: the tensors stay in the file until read; only numpy
    arrays/scalars (rng states, under their numpy 1 or numpy 2 names) are allowed beyond what ``weights_only``
    accepts. Returns ``(state_dict, model_config, iteration)``.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"SAT model folder not found: {model_dir}")
    tracker = model_dir / "latest"
    if not tracker.is_file():
        raise FileNotFoundError(f"{tracker} is missing: a SAT model folder names its iteration in 'latest'")
    iteration = tracker.read_text().strip()
    if not (iteration.isdigit() or iteration == "release"):
        raise ValueError(f"{tracker} must hold an iteration number or 'release', got {iteration!r}")
    weights = model_dir / iteration / "mp_rank_00_model_states.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (named by {tracker})")
    config_path = model_dir / "model_config.json"
    model_config = read_json_object(config_path) if config_path.is_file() else {}

    payload = _read_model_states(weights)
    if not isinstance(payload, dict) or not isinstance(payload.get("module"), dict):
        raise ValueError(f"{weights} is not a SAT model-state file: expected a dict with a 'module' state dict")
    state_dict = payload["module"]
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{weights}: 'module' entries that are not tensors: {bad[:5]}")
    return state_dict, model_config, iteration


def detect_model_kind(state_dict: dict[str, torch.Tensor]) -> str:
    """``dsr`` if the ``attention_plus`` mixin is present, ``itersr`` if only the extra position table, else
    ``coglm``."""
    if any(k.startswith("mixins.attention_plus.") for k in state_dict):
        return "dsr"
    if "mixins.extra_position_embedding.position_embeddings.weight" in state_dict:
        return "itersr"
    return "coglm"


def map_key(key: str) -> str:
    """Official SAT key → coglm_hf key; ``KeyError`` for anything not part of the CogView2 checkpoints."""
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    match = _LAYER_KEY.match(key)
    if match:
        layer, module, param = match.groups()
        return f"transformer.layers.{layer}.{module}.{param}"
    match = _PLUS_KEY.match(key)
    if match:
        module, layer, param = match.groups()
        return f"transformer.layers.{layer}.attention.hires_{module}.{param}"
    raise KeyError(key)


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every official key (strict: unknown keys raise ``ValueError`` listing them)."""
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        try:
            converted[map_key(key)] = tensor
        except KeyError:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in the SAT checkpoint (not part of CogView2): {unknown[:8]}"
                         + (f" … ({len(unknown)} in all)" if len(unknown) > 8 else ""))
    return converted


def _parse_layout(layout) -> list[int]:
    if isinstance(layout, str):
        return [int(v) for v in layout.split(",")]
    return [int(v) for v in layout]


def config_from_sat(state_dict: dict[str, torch.Tensor], model_config: dict, kind: str) -> CogLMConfig:
    """Build the config from tensor shapes, cross-checked against ``model_config.json`` (mismatch → ValueError)."""
    vocab_size, hidden_size = state_dict["transformer.word_embeddings.weight"].shape
    max_positions = state_dict["transformer.position_embeddings.weight"].shape[0]
    layer_ids = {int(m.group(1)) for k in state_dict if (m := _LAYER_KEY.match(k))}
    num_layers = max(layer_ids) + 1 if layer_ids else 0
    intermediate = state_dict["transformer.layers.0.mlp.dense_h_to_4h.weight"].shape[0] if num_layers else 0
    heads = int(model_config.get("num_attention_heads", 0)) or None
    if heads is None:
        raise ValueError("model_config.json must give num_attention_heads (it cannot be read from the weights)")
    expected = {"num_layers": num_layers, "hidden_size": hidden_size, "vocab_size": vocab_size,
                "max_sequence_length": max_positions, "inner_hidden_size": intermediate}
    for name, value in expected.items():
        if name in model_config and model_config[name] is not None and int(model_config[name]) != int(value):
            raise ValueError(f"model_config.json says {name}={model_config[name]} but the weights have {value}")
    order = model_config.get("layernorm_order", "sandwich")
    if order != "sandwich":
        raise ValueError(f"only sandwich LayerNorm checkpoints are CogView2 models; got layernorm_order={order!r}")
    if set(layer_ids) != set(range(num_layers)):
        raise ValueError(f"layer indices are not contiguous: {sorted(layer_ids)}")

    kwargs = dict(vocab_size=int(vocab_size), hidden_size=int(hidden_size), num_hidden_layers=num_layers,
                  num_attention_heads=heads, intermediate_size=int(intermediate),
                  max_position_embeddings=int(max_positions))
    if kind == "coglm":
        return CogLMConfig(**kwargs)
    hires_rows = state_dict["mixins.extra_position_embedding.position_embeddings.weight"].shape[0]
    hires_grid = int(round(hires_rows**0.5))
    if hires_grid * hires_grid != hires_rows:
        raise ValueError(f"the extra position table has {hires_rows} rows, not a square grid")
    kernel = int(model_config.get("kernel_size", 5))
    kwargs.update(hires_grid_size=hires_grid, local_window=(2 * kernel - 1, kernel),
                  hires_position_offset=int(max_positions))
    if "new_sequence_length" in model_config and int(model_config["new_sequence_length"]) != max_positions + hires_rows:
        raise ValueError(f"new_sequence_length={model_config['new_sequence_length']} does not match "
                         f"{max_positions} + {hires_rows} position rows")
    if kind == "dsr":
        layout = _parse_layout(model_config.get("layout", [96, 96 + (hires_grid // 3) ** 2, 0]))
        text_slots, low_end = layout[0], layout[1]
        low_grid = int(round((low_end - text_slots) ** 0.5))
        kernel2 = int(model_config.get("kernel_size2", 5))
        return CogLMDirectSRConfig(**kwargs, sr_text_slots=text_slots, image_grid_size=low_grid,
                                   cross_window=(kernel2, kernel2))
    layout = _parse_layout(model_config.get("layout", [16, 16 + hires_rows]))
    return CogLMIterativeSRConfig(**kwargs, sr_text_slots=layout[0])


def model_class_for(kind: str):
    if kind == "coglm":
        from .modeling_coglm import CogLMForMaskedRegions

        return CogLMForMaskedRegions
    from .modeling_coglm_sr import CogLMForDirectSuperResolution, CogLMForIterativeSuperResolution

    return CogLMForDirectSuperResolution if kind == "dsr" else CogLMForIterativeSuperResolution


def build_empty_model(state_dict: dict[str, torch.Tensor], model_config: dict):
    """The coglm_hf model a SAT state dict converts to, on the meta device (no memory), checked key by key.

    Returns ``(model, kind, converted)`` where ``converted`` maps coglm_hf keys to the (untouched) SAT tensors.
    """
    kind = detect_model_kind(state_dict)
    config = config_from_sat(state_dict, model_config, kind)
    with torch.device("meta"):
        model = model_class_for(kind)(config)
    converted = convert_state_dict(state_dict)
    targets = model.state_dict()
    expected = {k for k in targets if k != "lm_head.weight"}
    missing, unexpected = expected - converted.keys(), converted.keys() - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the {kind} model: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")
    for key, tensor in converted.items():
        if targets[key].shape != tensor.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(targets[key].shape)}")
    return model, kind, converted


def load_converted_model(model_dir: str | os.PathLike, dtype: str | torch.dtype = "float32"):
    """Load a SAT folder straight into the matching coglm_hf model (no files written).

    The model is built without weights and takes the checkpoint's tensors directly: where the file already holds
    ``dtype`` they stay memory-mapped, otherwise each is converted once.
    """
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    state_dict, model_config, _ = load_sat_state_dict(model_dir)
    model, kind, converted = build_empty_model(state_dict, model_config)
    model.load_state_dict({k: v.to(torch_dtype) for k, v in converted.items()}, strict=False, assign=True)
    model.tie_weights()
    return model.eval(), kind


def save_converted_model(model, converted: dict[str, torch.Tensor], folder: str | os.PathLike,
                         dtype: torch.dtype, max_shard_size: str | int = "5GB", **shard_options) -> None:
    """``save_pretrained`` for a model built by `build_empty_model`: config and code as usual, then the weights
    streamed from ``converted`` into safetensors shards (see `coglm_hf.safetensors_streaming`).

    ``shard_options`` (``shared_files``, ``written``) go to `write_sharded_weights`.
    """
    model.to(dtype)  # on the meta device: only records the dtype the config states
    type(model).save_pretrained(model, folder, state_dict={})
    write_sharded_weights(folder, converted, dtype, max_shard_size, **shard_options)


def read_json_object(path: Path) -> dict:
    """Parse a JSON object file; a corrupt one is a ``ValueError`` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore the original file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, inputs=()) -> Path:
    """Refuse, before any work, an existing ``output_dir`` without ``overwrite`` and an ``output_dir`` that is (or
    contains) one of the ``inputs``: replacing it would delete the input."""
    output_dir = Path(output_dir)
    target = output_dir.resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).resolve()
        if source == target or target in source.parents:
            raise ValueError(f"the output folder {output_dir} is (or contains) the input {source}; writing there "
                             "would delete the input. Choose another output folder.")
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it")
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"{output_dir} is a file; choose a folder path for the output")
    return output_dir


def remove_stale_staging(output_dir: Path, keep: Path | None = None) -> int:
    """Delete the ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings that an interrupted write into ``output_dir`` left
    behind (all but ``keep``); returns how many were removed."""
    removed = 0
    for pattern in (f".{output_dir.name}.tmp-*", f".{output_dir.name}.old-*"):
        for stale in output_dir.parent.glob(pattern):
            if stale != keep and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
                removed += 1
    if removed:
        logger.info("removed %d temporary folder(s) left next to %s by an interrupted run", removed, output_dir)
    return removed


def atomic_output_dir(output_dir: Path, overwrite: bool):
    """Context manager yielding a temporary sibling folder that replaces ``output_dir`` only on success (after
    which temporary folders left by interrupted earlier runs are removed)."""

    class _Atomic:
        def __enter__(self):
            if output_dir.exists() and not overwrite:
                raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it")
            output_dir.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
            self.tmp.chmod(0o755)  # mkdtemp creates 0700; the result is an ordinary, shareable folder
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            if output_dir.exists():
                backup = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
                os.replace(output_dir, backup / "old")
                os.replace(self.tmp, output_dir)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(self.tmp, output_dir)
            remove_stale_staging(output_dir)
            return False

    return _Atomic()


def convert_sat_checkpoint(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Convert one SAT folder into a ``save_pretrained`` folder (safetensors, config, remote code).

    Memory: the checkpoint is memory-mapped and each tensor is streamed into the output, so the peak is about the
    size of the input file whatever ``dtype`` is (no model is materialised).

    Args:
        input_dir: the SAT model folder (``coglm``, ``cogview2-dsr`` or ``cogview2-itersr``).
        output_dir: target folder; written atomically.
        dtype: ``float32``, ``float16`` or ``bfloat16`` weights.
        overwrite: replace an existing ``output_dir``.
        max_shard_size: safetensors shard size.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_max_shard_size(max_shard_size)
    output_dir = check_output_dir(output_dir, overwrite, [input_dir])
    state_dict, model_config, _ = load_sat_state_dict(input_dir)
    model, kind, converted = build_empty_model(state_dict, model_config)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        save_converted_model(model, converted, tmp, DTYPES[dtype], max_shard_size)
    logger.info("converted %s checkpoint %s → %s", kind, input_dir, output_dir)
    return output_dir


__all__ = [
    "MODEL_KINDS",
    "check_output_dir",
    "build_empty_model",
    "config_from_sat",
    "convert_sat_checkpoint",
    "convert_state_dict",
    "detect_model_kind",
    "load_converted_model",
    "load_sat_state_dict",
    "map_key",
    "save_converted_model",
    "read_json_object",
    "remove_stale_staging",
]
