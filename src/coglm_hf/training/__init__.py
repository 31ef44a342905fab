"""Training for the three CogView2 stages: collators for the CogLM objectives, tokenized-data caches and a
Trainer entry point (``python -m coglm_hf.training.train``); see docs/training.md.

The shipped example configs (stage YAMLs, tiny model configs, Accelerate and DeepSpeed configs) live in
:data:`CONFIG_DIR`; :func:`config_path` returns one of them.
"""

from pathlib import Path

from .collators import (
    CogLMDirectSRCollator,
    CogLMIterativeSRCollator,
    CogLMPretrainingCollator,
    caption_row,
    patch_regions,
    sample_patch_mask,
    text_to_image_row,
)
from .data import (
    TokenCacheDataset,
    TokenCacheReport,
    TokenCacheWriter,
    build_token_cache,
    hf_dataset_records,
    image_folder_records,
)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_path(name: str) -> Path:
    """Path of a shipped config (``accelerate_fsdp2.yaml``, ``base.yaml``, ``ds_zero3.json`` …)."""
    path = CONFIG_DIR / name
    if not path.is_file():
        available = sorted(p.name for p in CONFIG_DIR.iterdir())
        raise FileNotFoundError(f"no shipped config {name!r}; available: {available}")
    return path


__all__ = [
    "CONFIG_DIR",
    "CogLMDirectSRCollator",
    "CogLMIterativeSRCollator",
    "CogLMPretrainingCollator",
    "TokenCacheDataset",
    "TokenCacheReport",
    "TokenCacheWriter",
    "build_token_cache",
    "caption_row",
    "config_path",
    "hf_dataset_records",
    "image_folder_records",
    "patch_regions",
    "sample_patch_mask",
    "text_to_image_row",
]
