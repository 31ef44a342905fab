"""The fused kernel of hub_kernels/cogview2-local-attention: local build, loading through `kernels`, numerics.

The kernel is built once per module with ``build_local.py`` in a subprocess (CPU variant on a CPU torch build,
CUDA variant on a CUDA build; ~40-65 s on 2 cores, hence ``slow``), unless ``COGLM_LOCAL_ATTENTION_KERNEL_PATH``
already points at a built kernel directory. Nothing touches the network (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coglm_hf import local_attention as la
from coglm_hf.local_attention import local_attention_2d, local_attention_2d_reference, set_local_attention_backend

sys.path.insert(0, str(Path(__file__).parent))
from test_local_attention import (  # noqa: E402
    CASES,
    TOLERANCES,
    _make,
    _reference_f64,
    _run,
    _to_device,
    check_real_sr_shape_on_cuda,
)

KERNEL_DIR = Path(__file__).resolve().parents[1] / "hub_kernels" / "cogview2-local-attention"
REPO_ID = "coglm/cogview2-local-attention"
BACKEND = "cuda" if torch.version.cuda else "cpu"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.slow


def _variant_name() -> str:
    spec = importlib.util.spec_from_file_location("build_local", KERNEL_DIR / "build_local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.variant_name(BACKEND)


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    prebuilt = os.environ.get(la.KERNEL_PATH_ENV)
    if prebuilt and (Path(prebuilt) / "build" / _variant_name()).is_dir():
        return Path(prebuilt)
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        pytest.skip("building the kernel needs ninja (pip install ninja) and a C++ compiler")
    if BACKEND == "cuda" and shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("building the CUDA kernel needs nvcc")
    root = tmp_path_factory.mktemp("kernel")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(KERNEL_DIR / "build_local.py"), "--backend", BACKEND, "--out", str(root / "build")],
        capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return root


@pytest.fixture(scope="module")
def kernel(kernel_dir):
    os.environ["HF_HUB_OFFLINE"] = "1"
    previous = dict(la._state)
    module = la.load_local_attention_kernel(kernel_dir)
    yield module
    la._state.update(previous)


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = la.get_local_attention_backend()
    yield
    la._state["backend"] = previous


def test_variant_layout_and_metadata(kernel_dir):
    variant = kernel_dir / "build" / _variant_name()
    metadata = json.loads((variant / "metadata.json").read_text())
    assert metadata["name"] == "cogview2-local-attention" and metadata["python-depends"] == []
    assert metadata["backend"]["type"] == BACKEND and metadata["id"].startswith(f"_cogview2_local_attention_{BACKEND}_")
    assert (variant / f"{metadata['id']}.so").is_file() and (variant / "_ops.py").is_file()
    assert not list((kernel_dir / "build").glob(".staging_*"))


def test_loading_routes(kernel, kernel_dir, monkeypatch):
    """get_local_kernel(path) and get_kernel(repo_id, revision) through LOCAL_KERNELS give the same module."""
    assert DEVICE in kernel.SUPPORTED_DEVICES
    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO_ID}={kernel_dir}")
    monkeypatch.setitem(la._state, "kernel", None)
    assert la.load_local_attention_kernel(repo_id=REPO_ID, revision="v1") is kernel


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_float32(kernel, case):
    set_local_attention_backend("kernel")
    tensors, kwargs = _to_device(*_make(case, torch.float32, dim=64), DEVICE)
    grad_out = torch.randn_like(tensors[0])
    out, grads = _run(local_attention_2d, tensors, kwargs, grad_out)
    assert "cogview2_local_attention" in out.grad_fn.name()  # the fused op ran
    ref, ref_grads = _run(_reference_f64, tensors, kwargs, grad_out)
    torch.testing.assert_close(out.double(), ref.double(), rtol=0, atol=2e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=5e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["causal_17x9_border", "dsr_like_cross_x3", "all_sets_causal"])
def test_kernel_half_precision(kernel, case, dtype):
    set_local_attention_backend("kernel")
    tensors, kwargs = _to_device(*_make(case, dtype, dim=64), DEVICE)
    grad_out = torch.randn_like(tensors[0])
    out, grads = _run(local_attention_2d, tensors, kwargs, grad_out)
    ref, ref_grads = _run(_reference_f64, tensors, kwargs, grad_out)
    tol = TOLERANCES[dtype]
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref.double(), rtol=0, atol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=4 * tol)


def test_auto_backend_uses_configured_kernel(kernel, kernel_dir, monkeypatch):
    monkeypatch.setitem(la._state, "kernel", None)
    monkeypatch.setitem(la._state, "kernel_error", None)
    monkeypatch.setenv(la.KERNEL_PATH_ENV, str(kernel_dir))
    set_local_attention_backend("auto")
    tensors, kwargs = _to_device(*_make("itersr_like_global", torch.float32, dim=64), DEVICE)
    out = local_attention_2d(*tensors[:3], **kwargs)
    assert "cogview2_local_attention" in out.grad_fn.name()
    # float64 is not a kernel dtype: auto falls back to the PyTorch path.
    tensors64, kwargs64 = _to_device(*_make("itersr_like_global", torch.float64, dim=64), DEVICE)
    out64 = local_attention_2d(*tensors64[:3], **kwargs64)
    assert "cogview2_local_attention" not in out64.grad_fn.name()


def test_kernel_under_torch_compile_fullgraph(kernel):
    set_local_attention_backend("kernel")
    tensors, kwargs = _to_device(*_make("all_sets_causal", torch.float32, dim=64), DEVICE)
    compiled = torch.compile(lambda q, k, v: local_attention_2d(q, k, v, **kwargs), fullgraph=True)
    grad_out = torch.randn_like(tensors[0])
    out = compiled(*tensors[:3])
    grads = torch.autograd.grad(out, tensors, grad_out)
    ref = local_attention_2d_reference(*tensors[:3], **kwargs, compute_dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, tensors, grad_out)
    torch.testing.assert_close(out.double(), ref.double(), rtol=0, atol=2e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=5e-5)


@pytest.mark.gpu
def test_kernel_real_shape_bf16_48_heads(kernel):
    """The SR shape on the GPU: 60x60, 9x5 + 5x5 cross window on 20x20 + 16 text keys, 48 heads, bf16."""
    set_local_attention_backend("kernel")
    check_real_sr_shape_on_cuda()


def test_kernel_empty_batch_and_heads(kernel):
    """Batch 0 or heads 0 give empty results (a CUDA launch with a zero grid dimension would fail)."""
    set_local_attention_backend("kernel")
    for batch, heads in ((0, 2), (2, 0)):
        q, k, v = (torch.randn(batch, heads, 35, 64, device=DEVICE, requires_grad=True) for _ in range(3))
        out = local_attention_2d(q, k, v, grid=(7, 5), window=3)
        assert out.shape == q.shape
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert all(g is None or g.shape == t.shape for g, t in zip(grads, (q, k, v)))


def test_kernel_backward_checks_its_saved_tensors(kernel):
    """The backward op validates `lse` (float32 [B, H, N]) and that grad_out/out/lse sit on q's device."""
    ops = sys.modules[kernel.__name__ + "._ops"].ops
    q, k, v = (torch.randn(1, 2, 35, 64, device=DEVICE) for _ in range(3))
    geometry = [7, 5, 7, 5, 3, 3, 0, 0, 0, 0, 0]
    out, lse = ops.forward(q, k, v, None, None, None, None, None, geometry, 0.125)

    def backward(grad_out, out, lse):
        return ops.backward(grad_out, q, k, v, None, None, None, None, None, out, lse, geometry, 0.125)

    assert backward(torch.ones_like(out), out, lse)[0].shape == q.shape
    with pytest.raises(RuntimeError, match="lse must be float32"):
        backward(torch.ones_like(out), out, lse.half())
    with pytest.raises(RuntimeError, match=r"lse must have shape \[1, 2, 35\]"):
        backward(torch.ones_like(out), out, lse.reshape(1, 70))
    with pytest.raises(RuntimeError, match="grad_out and out must have the shape of q"):
        backward(torch.ones_like(out)[:, :1], out, lse)
    if DEVICE == "cuda":
        with pytest.raises(RuntimeError, match="lse is on cpu"):
            backward(torch.ones_like(out), out, lse.cpu())
