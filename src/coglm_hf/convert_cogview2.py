"""Convert the official CogView2 release into one complete CogView2Pipeline folder.

Inputs (reference §2, §8): the three SwissArmyTransformer model folders (``coglm``, ``cogview2-dsr``,
``cogview2-itersr``; usually together in one SAT home folder), icetk's ``ice_text.model`` and ``ice_image.pt``, and
CogView2's ``cluster_label.npy``. Output: a self-contained pipeline folder (see ``CogView2Pipeline.save_pretrained``)
with sharded safetensors in the chosen dtype, written atomically.

Every input is read and cross-checked before anything is written: the checkpoint kinds, the grids the three models
chain through, the id layout the tokenizer must follow (taken from the models' config), the codebook size and the
cluster table.

Identical weights are stored once: a tensor with the same name and bit-identical contents in several of the three
models (e.g. a super-resolution model whose backbone was frozen from ``coglm``) is written to a shared shard
``model-shared-<hash>-…safetensors`` that each model's ``model.safetensors.index.json`` references; the copies in
the component folders are hard links to one file (byte copies where the file system has no hard links; the Hub
stores identical files once as well). Every component folder still loads on its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .conversion_icetk import (
    convert_icetk_image_model,
    icevq_config_from_icetk,
    load_cluster_labels,
    load_icetk_checkpoint,
)
from .convert_sat import DTYPES, atomic_output_dir, load_converted_model
from .pipeline_cogview2 import CogView2Pipeline
from .scheduling_cogview2 import CogView2Scheduler
from .tokenization_coglm import CogLMTokenizer

logger = logging.getLogger(__name__)

SAT_FOLDER_NAMES = {"coglm": "coglm", "dsr": "cogview2-dsr", "itersr": "cogview2-itersr"}
MODEL_COMPONENTS = ("base_model", "dsr_model", "itersr_model")
SHARED_SHARD_PREFIX = "model-shared-"
WEIGHTS_INDEX = "model.safetensors.index.json"


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = str(size).strip().upper()
    for unit, factor in sorted(match.items(), key=lambda item: -len(item[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _load_sat_model(path: str | os.PathLike, expected_kind: str, dtype: str):
    model, kind = load_converted_model(path, dtype)
    if kind != expected_kind:
        raise ValueError(f"{path} holds a {SAT_FOLDER_NAMES[kind]} checkpoint but the {SAT_FOLDER_NAMES[expected_kind]} "
                         "one was expected there; check which folder you passed for which model")
    return model


def _check_models(base, dsr, itersr) -> None:
    """The three models must share the id layout and chain their grids (20 → 60 → 60)."""
    layout = ("vocab_size", "num_image_tokens", "text_token_offset", "boi_token_id", "start_of_english_token_id",
              "start_of_chinese_token_id")
    for name, model in (("cogview2-dsr", dsr), ("cogview2-itersr", itersr)):
        for field in layout:
            if getattr(model.config, field) != getattr(base.config, field):
                raise ValueError(f"{name} has {field}={getattr(model.config, field)} but coglm has "
                                 f"{getattr(base.config, field)}; the three checkpoints must come from one release")
    if dsr.config.image_grid_size != base.config.image_grid_size:
        raise ValueError(f"cogview2-dsr upsamples a {dsr.config.image_grid_size}² grid but coglm generates "
                         f"{base.config.image_grid_size}²")
    if itersr.config.hires_grid_size != dsr.config.hires_grid_size:
        raise ValueError(f"cogview2-itersr works on {itersr.config.hires_grid_size}² but cogview2-dsr produces "
                         f"{dsr.config.hires_grid_size}²")


def convert_cogview2(
    output_dir: str | os.PathLike,
    sat_dir: str | os.PathLike | None = None,
    coglm_dir: str | os.PathLike | None = None,
    dsr_dir: str | os.PathLike | None = None,
    itersr_dir: str | os.PathLike | None = None,
    cluster_labels: str | os.PathLike | None = None,
    text_model: str | os.PathLike | None = None,
    image_model: str | os.PathLike | None = None,
    image_config: str | os.PathLike | dict | None = None,
    dtype: str = "float32",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    deduplicate: bool = True,
) -> Path:
    """Convert the official CogView2 files into a pipeline folder loadable with `CogView2Pipeline.from_pretrained`.

    Args:
        output_dir: the pipeline folder to write (appears only when complete).
        sat_dir: a SAT home folder holding `coglm/`, `cogview2-dsr/` and `cogview2-itersr/`; or give each with
            `coglm_dir`, `dsr_dir`, `itersr_dir` (they override `sat_dir`).
        cluster_labels: CogView2's `cluster_label.npy` (required: stage 1 and direct SR sample by cluster).
        text_model: icetk's `ice_text.model`; without it the pipeline has no tokenizer (use `prompt_ids`).
        image_model: icetk's `ice_image.pt`; without it the pipeline has no image tokenizer
            (`output_type="tokens"` only, no editing).
        image_config: `IceVQModel` arguments or icetk's HVQVAE constructor arguments (dict or JSON file) for a
            non-official image tokenizer; default: the official architecture with widths read from the weights.
        dtype: `float32`, `float16` or `bfloat16` for every model's weights.
        max_shard_size: largest safetensors shard, e.g. `"5GB"`.
        overwrite: replace an existing `output_dir`.
        deduplicate: store bit-identical tensors shared by the three models once (see the module docstring).

    Raises:
        FileNotFoundError: an input is missing. FileExistsError: `output_dir` exists without `overwrite`.
        ValueError: inputs that do not fit together (kinds, grids, id layout, codebook size, cluster table).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True (--overwrite) to replace it")
    paths = {"coglm": coglm_dir, "dsr": dsr_dir, "itersr": itersr_dir}
    for kind, path in paths.items():
        if path is None:
            if sat_dir is None:
                raise ValueError(f"give sat_dir (the folder holding {', '.join(SAT_FOLDER_NAMES.values())}) or "
                                 f"the {SAT_FOLDER_NAMES[kind]} folder itself")
            paths[kind] = Path(sat_dir) / SAT_FOLDER_NAMES[kind]
    if cluster_labels is None:
        raise ValueError("cluster_labels is required: CogView2's cluster_label.npy (one cluster id per image token)")

    # 1. read and check every input before writing anything
    base = _load_sat_model(paths["coglm"], "coglm", dtype)
    dsr = _load_sat_model(paths["dsr"], "dsr", dtype)
    itersr = _load_sat_model(paths["itersr"], "itersr", dtype)
    _check_models(base, dsr, itersr)
    config = base.config
    scheduler = CogView2Scheduler(cluster_labels=load_cluster_labels(cluster_labels, config.num_image_tokens))
    tokenizer = None
    if text_model is not None:
        tokenizer = CogLMTokenizer.from_sentencepiece(
            text_model,
            text_token_offset=config.text_token_offset,
            boi_token_id=config.boi_token_id,
            start_of_english_token_id=config.start_of_english_token_id,
            start_of_chinese_token_id=config.start_of_chinese_token_id,
        )
    image_tokenizer = None
    if image_model is not None:
        if isinstance(image_config, (str, os.PathLike)):
            image_config = json.loads(Path(image_config).read_text(encoding="utf-8"))
        if image_config is not None and "Encoder" in image_config:
            image_config = icevq_config_from_icetk(image_config)
        image_tokenizer = convert_icetk_image_model(load_icetk_checkpoint(image_model), image_config, DTYPES[dtype])
        codes = image_tokenizer.config.num_embeddings
        if codes != config.num_image_tokens:
            raise ValueError(f"the image tokenizer has {codes} codes but the CogLM models use {config.num_image_tokens}"
                             " image ids; convert the matching ice_image.pt")
    pipeline = CogView2Pipeline(tokenizer=tokenizer, image_tokenizer=image_tokenizer, base_model=base, dsr_model=dsr,
                                itersr_model=itersr, scheduler=scheduler)

    # 2. write to a temporary sibling folder, then move it into place
    with atomic_output_dir(output_dir, overwrite) as staging:
        folder = staging / "pipeline"
        pipeline.save_pretrained(folder, max_shard_size=max_shard_size)
        if deduplicate:
            shared = deduplicate_weights(folder, MODEL_COMPONENTS, max_shard_size)
            if shared:
                logger.info("stored %d tensors shared by several models once", shared)
        for path in folder.iterdir():
            os.replace(path, staging / path.name)
        folder.rmdir()
    return output_dir


def _tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{tensor.dtype}{list(tensor.shape)}".encode() + data).hexdigest()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    tensors = {}
    for path in files:
        tensors.update(load_file(path))
    return tensors


def _shards(names: list[str], tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Split `names` (in order) into groups of at most `max_bytes` (a larger tensor gets its own shard)."""
    groups, current, size = [], [], 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        groups.append(current)
    return groups


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def deduplicate_weights(folder: str | os.PathLike, components: tuple[str, ...], max_shard_size: int | str) -> int:
    """Store tensors that several model components share (same name, bit-identical) once.

    Each component's weights are rewritten as shards + `model.safetensors.index.json`: the tensors it shares with
    exactly the same set of other components go into `model-shared-<hash>-<i>-of-<n>.safetensors` shards whose
    bytes are identical in every such component (hard-linked to one file), the rest into
    `model-<i>-of-<n>.safetensors`. Components that share nothing are left as written.

    Returns:
        The number of tensors stored once instead of several times.
    """
    folder = Path(folder)
    max_bytes = _parse_size(max_shard_size)
    present = [name for name in components if (folder / name).is_dir()]
    weights = {name: _read_weights(folder / name) for name in present}
    digests = {name: {key: _tensor_digest(t) for key, t in tensors.items()} for name, tensors in weights.items()}
    owners: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in present:
        for key, digest in digests[name].items():
            owners[(key, digest)].append(name)
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)  # sharing set -> tensor names
    for (key, _), names in owners.items():
        if len(names) > 1:
            groups[tuple(names)].append(key)
    if not groups:
        return 0

    written: dict[str, Path] = {}  # shared shard file name -> first file written
    for name in present:
        tensors, target = weights[name], folder / name
        shared_groups = {members: sorted(keys) for members, keys in groups.items() if name in members}
        if not shared_groups:
            continue
        shared_keys = {key for keys in shared_groups.values() for key in keys}
        own_keys = sorted(set(tensors) - shared_keys)
        for path in list(target.glob("*.safetensors")) + list(target.glob(WEIGHTS_INDEX)):
            path.unlink()
        weight_map = {}
        for members, keys in sorted(shared_groups.items()):
            tag = hashlib.sha256("|".join(members).encode()).hexdigest()[:8]
            parts = _shards(keys, tensors, max_bytes)
            for index, part in enumerate(parts, start=1):
                file_name = f"{SHARED_SHARD_PREFIX}{tag}-{index:05d}-of-{len(parts):05d}.safetensors"
                if file_name in written:
                    _link_or_copy(written[file_name], target / file_name)
                else:
                    save_file({key: tensors[key].contiguous() for key in part}, target / file_name,
                              metadata={"format": "pt"})
                    written[file_name] = target / file_name
                weight_map.update(dict.fromkeys(part, file_name))
        parts = _shards(own_keys, tensors, max_bytes)
        for index, part in enumerate(parts, start=1):
            file_name = f"model-{index:05d}-of-{len(parts):05d}.safetensors"
            save_file({key: tensors[key].contiguous() for key in part}, target / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file_name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (target / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return sum(len(keys) * (len(members) - 1) for members, keys in groups.items())


__all__ = ["SAT_FOLDER_NAMES", "convert_cogview2", "deduplicate_weights"]
