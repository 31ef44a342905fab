"""Training data: tokenize (image, caption) pairs once with :class:`IceVQModel` and read them back as samples.

Sources users have:

* :func:`image_folder_records` — a folder of images with caption files (``cat.jpg`` + ``cat.txt``; optionally a
  second-language caption ``cat.zh.txt`` with ``second_caption_suffix=".zh.txt"``);
* :func:`hf_dataset_records` — a Hugging Face ``datasets.Dataset`` with an image column and text column(s).

:func:`build_token_cache` resizes + center-crops every image to the stage sizes (grid × VQ compression rate:
160 px → 20×20 and 480 px → 60×60 for CogView2), encodes them in batches and appends them to a cache directory of
safetensors shards (atomic writes: an interrupted build loses at most the shard in progress and resumes by
skipping cached keys). Folder records are keyed by the hash of image bytes + captions, dataset records by the
dataset fingerprint + row index. Images that are corrupt, smaller than ``min_image_size`` or have an empty caption
are logged, counted in the returned :class:`TokenCacheReport`, listed in ``skipped.jsonl`` and skipped.

:class:`TokenCacheDataset` reads the cache lazily (memory-mapped rows) and yields the sample dicts that the
collators of :mod:`coglm_hf.training.collators` take.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CACHE_FORMAT = "coglm-token-cache"
CACHE_VERSION = 1
INFO_FILE = "cache_info.json"
SKIPPED_FILE = "skipped.jsonl"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_GRID_KEYS = ("image_tokens", "hires_tokens")


class SkipRecord(Exception):
    """A record that cannot be used; ``reason`` is the counter key (``corrupt``, ``too_small``, ``empty_caption`` …)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ImageTextRecord:
    """One (image, caption) pair before tokenization.

    Args:
        key: stable cache key (content hash or dataset fingerprint + index).
        source: human-readable origin for reports (a path or ``dataset[i]``).
        load_image: returns the image (any PIL mode); may raise for corrupt data.
        texts: the caption, optionally followed by the same caption in a second language.
    """

    key: str
    source: str
    load_image: Callable[[], Image.Image]
    texts: list[str]


@dataclass
class TokenCacheReport:
    """What :func:`build_token_cache` did. ``skipped`` counts records per reason; ``examples`` keeps a few."""

    total: int = 0
    encoded: int = 0
    already_cached: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.total} records: {self.encoded} encoded, {self.already_cached} already cached, "
                f"{sum(self.skipped.values())} skipped ({reasons})")


# ------------------------------------------------------------------------------------------------ sources
def _open_bytes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def image_folder_records(
    folder: str | os.PathLike,
    caption_suffix: str = ".txt",
    second_caption_suffix: str | None = None,
    recursive: bool = True,
) -> Iterator[ImageTextRecord]:
    """Records of a folder of images with caption files next to them (``x.jpg`` + ``x.txt``).

    The caption file is read as UTF-8 and stripped; a missing caption file counts as an empty caption (reported
    and skipped by :func:`build_token_cache`). Files are visited in sorted order; the key is the SHA-256
    of the image bytes and the captions, so renamed files stay cached and edited captions are re-encoded.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist (data.image_folder)")
    pattern = "**/*" if recursive else "*"
    for path in sorted(p for p in root.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        texts = []
        for suffix in (caption_suffix, second_caption_suffix):
            caption = path.with_name(path.stem + suffix) if suffix else None
            if caption is not None and caption.is_file():
                texts.append(caption.read_text(encoding="utf-8", errors="replace").strip())
            elif suffix == caption_suffix:
                texts.append("")  # reported as missing/empty caption
        data = path.read_bytes()
        digest = hashlib.sha256(data)
        for text in texts:
            digest.update(b"\0" + text.encode("utf-8"))
        yield ImageTextRecord(
            key=digest.hexdigest(), source=str(path), load_image=lambda data=data: _open_bytes(data), texts=texts
        )


def _dataset_image_loader(value) -> Callable[[], Image.Image]:
    if isinstance(value, Image.Image):
        return lambda: value
    if isinstance(value, dict) and value.get("bytes") is not None:
        return lambda: _open_bytes(value["bytes"])
    if isinstance(value, dict) and value.get("path"):
        return lambda: _open_bytes(Path(value["path"]).read_bytes())
    if isinstance(value, (bytes, bytearray)):
        return lambda: _open_bytes(bytes(value))
    if isinstance(value, (str, os.PathLike)):
        return lambda: _open_bytes(Path(value).read_bytes())

    def fail():
        raise SkipRecord("corrupt", f"unsupported image value of type {type(value).__name__}")

    return fail


def hf_dataset_records(
    dataset,
    image_column: str = "image",
    text_column: str = "text",
    second_text_column: str | None = None,
) -> Iterator[ImageTextRecord]:
    """Records of a ``datasets.Dataset`` (PIL images, ``{"bytes", "path"}`` dicts, paths or raw bytes).

    Image decoding is switched off in the dataset (``Image(decode=False)``) so that a corrupt image is reported and
    skipped here instead of raising inside ``datasets``. Keys are ``<fingerprint>:<row index>``.
    """
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
    for column in (image_column, text_column, second_text_column):
        if column is not None and column not in columns:
            raise ValueError(f"column {column!r} not in the dataset (columns: {columns}); set data.image_column / "
                             "data.text_column")
    from datasets import Image as ImageFeature

    if isinstance(dataset.features.get(image_column), ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    fingerprint = getattr(dataset, "_fingerprint", None) or "dataset"
    for index, row in enumerate(dataset):
        texts = []
        for column in (text_column, second_text_column):
            if column is None:
                continue
            value = row[column]
            if isinstance(value, (list, tuple)):
                value = value[0] if value else ""
            texts.append(value.strip() if isinstance(value, str) else "")
        yield ImageTextRecord(
            key=f"{fingerprint}:{index}",
            source=f"dataset[{index}]",
            load_image=_dataset_image_loader(row[image_column]),
            texts=texts,
        )


# ------------------------------------------------------------------------------------------------ preprocessing
def resize_center_crop(image: Image.Image, size: int) -> torch.Tensor:
    """RGB ``[3, size, size]`` float in [0, 1]: shorter side resized to ``size`` (bicubic), then center-cropped
    (icetk's ``Resize`` + ``CenterCrop``)."""
    image = image.convert("RGB")
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _tokenize_text(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    is_text = getattr(tokenizer, "is_text_token", None)
    return [int(i) for i in ids if is_text is None or is_text(int(i))]


# ------------------------------------------------------------------------------------------------ cache writer
def _grid_dtype(num_embeddings: int) -> torch.dtype:
    return torch.int16 if num_embeddings <= 2**15 else torch.int32


class TokenCacheWriter:
    """Append tokenized samples to a cache directory, one safetensors shard per ``shard_size`` samples.

    Each shard holds ``image_tokens`` ``[n, g, g]`` and/or ``hires_tokens`` ``[n, G, G]``, the captions as flat
    ``text_ids`` with ``text_offsets`` ``[n + 1]`` (and ``text_ids_2``/``text_offsets_2`` for the second language;
    empty spans when absent), and the keys/sources in its metadata. Shards are written to a temporary file and
    renamed, so a crash never leaves a half-written shard.
    """

    def __init__(self, cache_dir: str | os.PathLike, info: dict, shard_size: int = 1024):
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.info = dict(info, format=CACHE_FORMAT, version=CACHE_VERSION)
        self.shard_size = int(shard_size)
        info_path = self.cache_dir / INFO_FILE
        if info_path.is_file():
            existing = json.loads(info_path.read_text())
            mismatched = {k: (existing.get(k), v) for k, v in self.info.items() if existing.get(k) != v}
            if mismatched:
                raise ValueError(f"the token cache in {str(self.cache_dir)!r} was built with other settings "
                                 f"{mismatched} (existing, requested); use a new data.cache_dir")
        else:
            _atomic_write_text(info_path, json.dumps(self.info, indent=2))
        self.next_shard = len(list(self.cache_dir.glob("shard-*.safetensors")))
        self.pending: list[dict] = []

    def add(self, key: str, source: str, text_ids: list[int], text_ids_2: list[int] | None = None, **grids):
        """Queue one sample (``image_tokens=``/``hires_tokens=`` grids as tensors); flush when a shard is full."""
        self.pending.append({"key": key, "source": source, "text_ids": text_ids, "text_ids_2": text_ids_2 or [],
                             **grids})
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        items, self.pending = self.pending, []
        dtype = _grid_dtype(int(self.info["num_embeddings"]))
        tensors = {}
        for name in _GRID_KEYS:
            if name in items[0]:
                tensors[name] = torch.stack([torch.as_tensor(item[name]) for item in items]).to(dtype)
        for suffix in ("", "_2"):
            texts = [item["text_ids" + suffix] for item in items]
            offsets = np.cumsum([0] + [len(t) for t in texts])
            flat = [i for t in texts for i in t]
            tensors["text_ids" + suffix] = torch.tensor(flat, dtype=torch.int32)
            tensors["text_offsets" + suffix] = torch.from_numpy(offsets.astype(np.int64))
        metadata = {"keys": json.dumps([item["key"] for item in items]),
                    "sources": json.dumps([item["source"] for item in items])}
        path = self.cache_dir / f"shard-{self.next_shard:06d}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.next_shard += 1


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def cached_keys(cache_dir: str | os.PathLike) -> set[str]:
    """Keys already stored in the shards of ``cache_dir`` (empty when there is no cache)."""
    keys: set[str] = set()
    for shard in sorted(Path(cache_dir).glob("shard-*.safetensors")):
        keys.update(json.loads(safe_open(str(shard), framework="pt").metadata()["keys"]))
    return keys


# ------------------------------------------------------------------------------------------------ cache builder
def build_token_cache(
    records: Iterable[ImageTextRecord],
    cache_dir: str | os.PathLike,
    vq_model,
    text_tokenizer,
    image_size: int | None = None,
    hires_size: int | None = None,
    min_image_size: int | None = None,
    batch_size: int = 16,
    shard_size: int = 1024,
    num_workers: int = 4,
    total: int | None = None,
    progress: bool = True,
) -> TokenCacheReport:
    """Tokenize ``records`` with ``vq_model`` (an :class:`IceVQModel`) and ``text_tokenizer`` into ``cache_dir``.

    Args:
        records: from :func:`image_folder_records` or :func:`hf_dataset_records` (any iterable of records).
        cache_dir: output directory (created; an existing cache is extended, cached keys are skipped).
        vq_model: image tokenizer with ``encode(images [B, 3, H, W] in [0, 1]) -> ids [B, h, w]`` and
            ``config.compress_rate`` / ``config.num_embeddings``; runs on its own device and dtype.
        text_tokenizer: caption tokenizer (``CogLMTokenizer``); non-text ids it returns are dropped.
        image_size: pixels of the stage-1 grid (``image_grid_size × compress_rate``, 160); None = no stage-1 grid.
        hires_size: pixels of the super-resolution grid (480); None = no hi-res grid.
        min_image_size: images whose shorter side is below this are skipped (default: the largest size requested,
            so that nothing is upscaled); 0 accepts everything.
        batch_size: images per ``encode`` call.
        shard_size: samples per shard file.
        num_workers: threads decoding and resizing images (0 = in the calling thread).
        total: number of records, for the progress bar (``len(records)`` when available).
        progress: show a tqdm progress bar.

    Returns:
        a :class:`TokenCacheReport`; the skipped records are also listed in ``cache_dir/skipped.jsonl``.
    """
    sizes = {name: size for name, size in zip(_GRID_KEYS, (image_size, hires_size)) if size}
    if not sizes:
        raise ValueError("build_token_cache needs image_size and/or hires_size (pixels = grid × VQ compression)")
    rate = int(vq_model.config.compress_rate)
    for name, size in sizes.items():
        if size % rate:
            raise ValueError(f"{name} size {size} px is not a multiple of the VQ compression rate {rate}")
    info_path = Path(cache_dir) / INFO_FILE
    if info_path.is_file():  # extend an existing cache: it fixes the grids every sample must have
        existing = json.loads(info_path.read_text())
        for name, size in sizes.items():
            if existing.get(f"{name}_size") != size:
                raise ValueError(f"the token cache {str(cache_dir)!r} has {name} at {existing.get(f'{name}_size')} px,"
                                 f" not {size} px; use a new data.cache_dir")
        sizes = {name: existing[f"{name}_size"] for name in _GRID_KEYS if existing.get(f"{name}_size")}
    min_size = max(sizes.values()) if min_image_size is None else int(min_image_size)
    info = {"compress_rate": rate, "num_embeddings": int(vq_model.config.num_embeddings),
            **{f"{name}_size": size for name, size in sizes.items()}}
    writer = TokenCacheWriter(cache_dir, info, shard_size=shard_size)
    done = cached_keys(cache_dir)
    report = TokenCacheReport()
    # the records skipped by this build (a rebuild re-checks every uncached record, so the list is replaced)
    skipped_log = open(Path(cache_dir) / SKIPPED_FILE, "w", encoding="utf-8")  # closed in the finally below

    def skip(record: ImageTextRecord, reason: str, detail: str) -> None:
        report.skipped[reason] += 1
        message = f"{record.source}: {reason} ({detail})" if detail else f"{record.source}: {reason}"
        if len(report.examples) < 20:
            report.examples.append(message)
            logger.warning("skipping %s", message)
        skipped_log.write(json.dumps({"source": record.source, "key": record.key, "reason": reason,
                                      "detail": detail}) + "\n")

    def prepare(record: ImageTextRecord) -> dict:
        """Decode, check and resize one record (runs in worker threads); raises SkipRecord."""
        text_ids = [_tokenize_text(text_tokenizer, text) if text else [] for text in record.texts]
        if not text_ids or not text_ids[0]:
            raise SkipRecord("empty_caption")
        try:
            image = record.load_image()
            width, height = image.size
            if min(width, height) < min_size:
                raise SkipRecord("too_small", f"{width}x{height} < {min_size}")
            pixels = {name: resize_center_crop(image, size) for name, size in sizes.items()}
        except SkipRecord:
            raise
        except Exception as error:  # any decoder failure must not stop a long build
            raise SkipRecord("corrupt", f"{type(error).__name__}: {error}") from error
        return {"record": record, "pixels": pixels, "text_ids": text_ids[0],
                "text_ids_2": text_ids[1] if len(text_ids) > 1 else []}

    def safe_prepare(record: ImageTextRecord):
        try:
            return prepare(record)
        except SkipRecord as error:
            return error

    device = vq_model.device
    dtype = vq_model.dtype

    def encode_batch(batch: list[dict]) -> None:
        grids = {}
        with torch.no_grad():
            for name in sizes:
                images = torch.stack([item["pixels"][name] for item in batch]).to(device=device, dtype=dtype)
                grids[name] = vq_model.encode(images).cpu()
        for row, item in enumerate(batch):
            record = item["record"]
            writer.add(record.key, record.source, item["text_ids"], item["text_ids_2"],
                       **{name: grid[row] for name, grid in grids.items()})
            done.add(record.key)
        report.encoded += len(batch)

    if total is None and hasattr(records, "__len__"):
        total = len(records)
    bar = tqdm(total=total, desc="tokenizing images", unit="img", disable=not progress)
    executor = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    try:
        iterator = iter(records)
        while True:
            chunk = []
            for record in iterator:
                report.total += 1
                if record.key in done:
                    report.already_cached += 1
                    bar.update(1)
                    continue
                chunk.append(record)
                if len(chunk) == batch_size:
                    break
            if not chunk:
                break
            results = list(executor.map(safe_prepare, chunk)) if executor else [safe_prepare(r) for r in chunk]
            batch = []
            for record, result in zip(chunk, results):
                if isinstance(result, SkipRecord):
                    skip(record, result.reason, result.detail)
                else:
                    batch.append(result)
            if batch:
                encode_batch(batch)
            bar.update(len(chunk))
        writer.flush()
    finally:
        bar.close()
        skipped_log.close()
        if executor is not None:
            executor.shutdown()
    logger.info("token cache %s: %s", cache_dir, report.summary())
    return report


# ------------------------------------------------------------------------------------------------ dataset
class TokenCacheDataset(Dataset):
    """Samples of a token cache: ``image_tokens`` / ``hires_tokens`` (long grids), ``text_ids`` (list),
    ``text_ids_2`` (when the sample has a second language), ``index`` and ``epoch`` (for the collators' seeds).

    Rows are read lazily from the memory-mapped shards, so the dataset is cheap to create and to copy into
    dataloader workers. Call :meth:`set_epoch` at each epoch (the training script does) to vary the collators'
    random choices between epochs.

    Args:
        cache_dir: a directory written by :func:`build_token_cache` / :class:`TokenCacheWriter`.
        require: grids every sample must have (``("image_tokens",)`` for the base stage, both for direct SR,
            ``("hires_tokens",)`` for iterative SR).
    """

    def __init__(self, cache_dir: str | os.PathLike, require: Iterable[str] = ()):
        self.cache_dir = Path(cache_dir)
        info_path = self.cache_dir / INFO_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"no token cache in {str(self.cache_dir)!r} ({INFO_FILE} missing); build it with "
                                    "build_token_cache or the training script (data.image_folder / data.hf_dataset)")
        self.info = json.loads(info_path.read_text())
        self.shards = sorted(str(p) for p in self.cache_dir.glob("shard-*.safetensors"))
        if not self.shards:
            raise ValueError(f"the token cache {str(self.cache_dir)!r} holds no samples; check skipped.jsonl")
        first = safe_open(self.shards[0], framework="pt")
        self.grids = tuple(name for name in _GRID_KEYS if name in first.keys())
        missing = [name for name in require if name not in self.grids]
        if missing:
            raise ValueError(f"the token cache {str(self.cache_dir)!r} has no {missing} (it holds {list(self.grids)})"
                             "; rebuild it with the sizes this stage needs (hires_size for super-resolution)")
        self.texts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        counts = []
        for shard in self.shards:
            handle = safe_open(shard, framework="pt")
            self.texts.append(tuple(handle.get_tensor(n) for n in ("text_ids", "text_offsets", "text_ids_2",
                                                                    "text_offsets_2")))
            counts.append(len(json.loads(handle.metadata()["keys"])))
        self.starts = np.cumsum([0] + counts)
        self.epoch = 0
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}  # memory maps are reopened in each worker
        return state

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.shards[shard], framework="pt")
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} samples")
        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        row = index - int(self.starts[shard])
        handle = self._handle(shard)
        sample = {name: handle.get_slice(name)[row : row + 1][0].long() for name in self.grids}
        ids, offsets, ids_2, offsets_2 = self.texts[shard]
        sample["text_ids"] = ids[offsets[row] : offsets[row + 1]].tolist()
        second = ids_2[offsets_2[row] : offsets_2[row + 1]].tolist()
        if second:
            sample["text_ids_2"] = second
        sample["index"] = index
        sample["epoch"] = self.epoch
        return sample


def stage_image_sizes(model_config, compress_rate: int, stage: str) -> tuple[int | None, int | None]:
    """Pixel sizes ``(image_size, hires_size)`` a stage needs: grid × VQ compression (160 / 480 for CogView2)."""
    low = model_config.image_grid_size * compress_rate
    high = model_config.hires_grid_size * compress_rate if model_config.hires_grid_size else None
    if stage == "base":
        return low, None
    if stage == "dsr":
        return low, high
    if stage == "itersr":
        return None, high
    raise ValueError(f"unknown stage {stage!r}; expected base, dsr or itersr")


__all__ = [
    "ImageTextRecord",
    "SkipRecord",
    "TokenCacheDataset",
    "TokenCacheReport",
    "TokenCacheWriter",
    "build_token_cache",
    "cached_keys",
    "hf_dataset_records",
    "image_folder_records",
    "resize_center_crop",
    "stage_image_sizes",
]
