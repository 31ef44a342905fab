"""benchmarks/device_check.sh in its CPU dry-run mode, so the one-shot GPU script cannot rot between GPU loans.

The dry run executes the same steps with tiny models on the CPU (wheel install when wheels are carried, project
import from the tree, Triton kernel build, the stage-1 / pipeline timing code, collection of the GPU-marked tests)
and must report every GPU-only step as skipped with a reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_device_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE_CHECK_BUDGET_S": "900"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), str(out), "--dry-run"],
                            capture_output=True, text=True, env=env, timeout=1200)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for ran in ("import the project from the tree: rc=0", "build the Triton kernel (noarch variants): rc=0",
                "bench_device (tiny models, CPU): rc=0", "collect the GPU-marked tests: rc=0"):  # fmt: skip
        assert ran in summary, summary
    for skipped in ("build the CUDA kernel: dry run", "run the GPU-marked tests: dry run",
                    "local-attention benchmark: dry run"):  # fmt: skip
        assert f"SKIPPED {skipped}" in summary, summary
    bench = (out / "bench_device.md").read_text()
    assert "| static_same_tokens | True |" in bench  # the static-cache decoding gives the dynamic cache's tokens
    assert "| itersr_model | 6 |" in bench and "| dsr_model | 1 |" in bench  # one DSR pass, six LoPAR passes
    assert "| skipped | model offload moves models to an accelerator" in bench
    assert "tests collected" in (out / "tests.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["bench_device.md", "build.log", "env.txt", "summary.md",
                                                     "tests.log"]  # fmt: skip
