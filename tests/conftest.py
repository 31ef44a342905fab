"""Shared test helpers: locating the reference fixtures in ``../shared`` without copying them; running a script
where coglm_hf cannot be imported (remote-code loading)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernel is checked with Triton's CPU interpreter, which `triton` reads when it is first
# imported (importing coglm_hf already imports it through torch), so it is chosen here, before any test module.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

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


def run_without_coglm_hf(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter where `import coglm_hf` fails, offline, with a private modules cache."""
    blocker = tmp_path / "block"
    blocker.mkdir(exist_ok=True)
    (blocker / "coglm_hf.py").write_text("raise ImportError('coglm_hf is blocked in this test')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(blocker), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


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
