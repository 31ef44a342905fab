"""Write safetensors files one tensor at a time, converting dtypes in bounded chunks.

``safetensors.torch.save_file`` serialises a whole shard into memory first; a 6B-parameter CogLM checkpoint
converted that way needs several times its size in RAM. Here each tensor is read (typically from a memory-mapped
source file), converted and written in chunks of at most ``CHUNK_BYTES``, so the extra memory is one chunk. The
files follow the safetensors format (8-byte little-endian header length, JSON header with ``data_offsets``, raw
little-endian data) and load with ``safetensors`` / ``from_pretrained`` as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

CHUNK_BYTES = 64 * 2**20
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def target_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """Floating tensors take ``dtype``; integer and bool tensors keep theirs (as ``model.to(dtype)`` does)."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def tensor_nbytes(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    return tensor.numel() * torch.empty((), dtype=target_dtype(tensor, dtype)).element_size()


def iter_tensor_bytes(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> Iterator[memoryview]:
    """The bytes of ``tensor.to(dtype)`` in row-major order, converted ``CHUNK_BYTES`` at a time."""
    dtype = target_dtype(tensor, dtype)
    flat = tensor.detach().reshape(-1)
    step = max(1, CHUNK_BYTES // torch.empty((), dtype=dtype).element_size())
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step].to(device="cpu", dtype=dtype).contiguous()
        yield memoryview(chunk.view(torch.uint8).numpy())


def tensor_digest(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """SHA-256 of dtype, shape and the bytes ``tensor`` will be written as (to find identical tensors)."""
    digest = hashlib.sha256(f"{target_dtype(tensor, dtype)}{list(tensor.shape)}".encode())
    for chunk in iter_tensor_bytes(tensor, dtype):
        digest.update(chunk)
    return digest.hexdigest()


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (in the given order) as one safetensors file, converting floating ones to ``dtype``."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor_nbytes(tensor, dtype)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[target_dtype(tensor, dtype)], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for tensor in tensors.values():
            for chunk in iter_tensor_bytes(tensor, dtype):
                file.write(chunk)


def plan_shards(names: list[str], sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Split ``names`` (in order) into groups of at most ``max_bytes`` (a larger tensor gets a group of its own)."""
    groups, current, size = [], [], 0
    for name in names:
        if current and size + sizes[name] > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += sizes[name]
    if current:
        groups.append(current)
    return groups


def parse_size(size: int | str) -> int:
    """``"5GB"`` → 5·10⁹ bytes (also KB, MB, KiB, MiB, GiB, or a plain number)."""
    if isinstance(size, int):
        return size
    factors = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
               "TIB": 2**40}
    text = str(size).strip().upper()
    for unit, factor in sorted(factors.items(), key=lambda item: -len(item[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def write_sharded_weights(folder: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                          dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB",
                          shared_files: Mapping[str, list[str]] | None = None,
                          written: dict[str, Path] | None = None) -> None:
    """Write a model's weights the way ``save_pretrained`` lays them out, streaming every tensor.

    One ``model.safetensors``, or ``model-<i>-of-<n>.safetensors`` shards and ``model.safetensors.index.json``.
    ``shared_files`` maps extra file names to the tensors they hold (tensors several models share); a shared file
    already in ``written`` (name → path) is hard-linked instead of written again (copied where links fail).
    """
    folder = Path(folder)
    shared_files = dict(shared_files or {})
    written = {} if written is None else written
    sizes = {name: tensor_nbytes(tensor, dtype) for name, tensor in tensors.items()}
    in_shared = {name for names in shared_files.values() for name in names}
    own = [name for name in tensors if name not in in_shared]
    shards = plan_shards(own, sizes, parse_size(max_shard_size))
    if not shared_files and len(shards) <= 1:
        write_safetensors(folder / WEIGHTS_NAME, tensors, dtype)
        return
    files = {f"model-{i:05d}-of-{len(shards):05d}.safetensors": names for i, names in enumerate(shards, start=1)}
    weight_map = {}
    for file_name, names in {**shared_files, **files}.items():
        if file_name in written:
            try:
                os.link(written[file_name], folder / file_name)
            except OSError:
                write_safetensors(folder / file_name, {name: tensors[name] for name in names}, dtype)
        else:
            write_safetensors(folder / file_name, {name: tensors[name] for name in names}, dtype)
            if file_name in shared_files:
                written[file_name] = folder / file_name
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {"total_parameters": sum(t.numel() for t in tensors.values()),
                          "total_size": sum(sizes.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["iter_tensor_bytes", "parse_size", "plan_shards", "tensor_digest", "write_safetensors",
           "write_sharded_weights"]
