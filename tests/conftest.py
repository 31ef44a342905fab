"""Shared test helpers: locating the reference fixtures in ``../shared`` without copying them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_root() -> Path | None:
    candidates = []
    if os.environ.get("COGLM_SHARED_DIR"):
        candidates.append(Path(os.environ["COGLM_SHARED_DIR"]))
    candidates += [REPO_ROOT.parent / "shared", REPO_ROOT / "shared"]
    for path in candidates:
        if (path / "fixtures").is_dir():
            return path
    return None


def fixture_dir(name: str) -> Path:
    """Return ``../shared/fixtures/<name>``; skip the test when absent, fail under CI."""
    root = _shared_root()
    path = root / "fixtures" / name if root is not None else None
    if path is None or not path.is_dir():
        msg = f"reference fixture '{name}' not found (looked for ../shared/fixtures; set COGLM_SHARED_DIR)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def cogview2_fixture_dir() -> Path:
    return fixture_dir("cogview2_reference")


@pytest.fixture(scope="session")
def icetk_fixture_dir() -> Path:
    return fixture_dir("icetk_vqvae")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
