"""The Triton kernel of hub_kernels/cogview2-local-attention-triton, checked on CPU with Triton's interpreter.

The kernel project is pure Python, so its build output (``build/torch-cuda``, ``build/torch-cpu``) is produced here
by ``build_local.py`` and loaded through the ``kernels`` API like a Hub kernel. ``TRITON_INTERPRET=1`` runs the very
same ``@triton.jit`` programs on CPU tensors (numpy), so forward and every gradient are compared with the dense
reference on all the geometries of the PyTorch path. Shapes are small: the interpreter executes each program
serially in Python.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coglm_hf import local_attention as la
from coglm_hf.local_attention import local_attention_2d, set_local_attention_backend

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

pytest.importorskip("triton", reason="the Triton backend needs `triton` (pip install -e '.[test]')")

KERNEL_DIR = Path(__file__).resolve().parents[1] / "hub_kernels" / "cogview2-local-attention-triton"
REPO_ID = "coglm/cogview2-local-attention-triton"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _build_module():
    spec = importlib.util.spec_from_file_location("triton_build_local", KERNEL_DIR / "build_local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("triton_kernel")
    _build_module().build(root / "build")
    return root


@pytest.fixture(scope="module")
def kernel(kernel_dir):
    """The kernel module, imported through ``kernels.get_local_kernel`` (interpreted when there is no GPU)."""
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("without a GPU the Triton kernel runs under TRITON_INTERPRET=1 (set by tests/conftest.py)")
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    previous = dict(la._state)
    module = la.load_local_attention_triton_kernel(kernel_dir)
    yield module
    la._state.update(previous)
    if saved is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = saved


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = la.get_local_attention_backend()
    yield
    la._state["backend"] = previous


def test_build_output_layout(kernel_dir):
    build = _build_module()
    for backend in ("cuda", "cpu"):
        variant = kernel_dir / "build" / f"torch-{backend}"
        metadata = json.loads((variant / "metadata.json").read_text())
        assert metadata["name"] == "cogview2-local-attention-triton" and metadata["python-depends"] == []
        assert metadata["backend"] == {"type": backend} and metadata["id"] == build.kernel_id()
        assert sorted(p.name for p in variant.glob("*.py")) == ["__init__.py", "_triton_kernels.py"]
    assert not list((kernel_dir / "build").glob(".staging_*"))


def test_loading_routes(kernel, kernel_dir, monkeypatch):
    """get_local_kernel(path) and get_kernel(repo_id, revision) through LOCAL_KERNELS give the same module."""
    assert type(kernel).__name__ == "module" and kernel.__name__.startswith("_cogview2_local_attention_triton_")
    assert DEVICE in kernel.SUPPORTED_DEVICES
    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO_ID}={kernel_dir}")
    monkeypatch.setitem(la._state, "triton", None)
    assert la.load_local_attention_triton_kernel(repo_id=REPO_ID, revision="v1") is kernel


def _heads(case: str) -> int:
    return 2 if case == "itersr_like_global" else 1  # one case checks head indexing; fewer programs elsewhere


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference_float32(kernel, case):
    set_local_attention_backend("triton")
    tensors, kwargs = _to_device(*_make(case, torch.float32, heads=_heads(case)), DEVICE)
    grad_out = torch.randn_like(tensors[0])
    out, grads = _run(local_attention_2d, tensors, kwargs, grad_out)
    assert "_LocalAttention2D" in out.grad_fn.name()  # the Triton path ran
    ref, ref_grads = _run(_reference_f64, tensors, kwargs, grad_out)
    torch.testing.assert_close(out.double(), ref.double(), rtol=0, atol=2e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=5e-5)


@pytest.mark.parametrize(
    ("case", "dtype"), [("all_sets_causal", torch.bfloat16), ("causal_17x9_border", torch.float16)], ids=str
)
def test_triton_half_precision(kernel, case, dtype):
    set_local_attention_backend("triton")
    tensors, kwargs = _to_device(*_make(case, dtype, heads=1), DEVICE)
    grad_out = torch.randn_like(tensors[0])
    out, grads = _run(local_attention_2d, tensors, kwargs, grad_out)
    ref, ref_grads = _run(_reference_f64, tensors, kwargs, grad_out)
    tol = TOLERANCES[dtype]
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref.double(), rtol=0, atol=tol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=4 * tol)


def test_triton_empty_batch(kernel):
    set_local_attention_backend("triton")
    q, k, v = (torch.randn(0, 2, 35, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out = local_attention_2d(q, k, v, grid=(7, 5), window=3)
    assert out.shape == (0, 2, 35, 16)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == t.shape for g, t in zip(grads, (q, k, v)))


def test_triton_backend_refuses_what_it_cannot_run(kernel):
    set_local_attention_backend("triton")
    tensors, kwargs = _make("odd_nonsquare", torch.float64)
    with pytest.raises(RuntimeError, match="does not handle torch.float64"):
        local_attention_2d(*tensors[:3], **kwargs)


def test_auto_uses_triton_only_on_cuda(kernel, monkeypatch):
    """`auto` with no compiled kernel configured: Triton on CUDA, the PyTorch path on CPU (interpreter is slow)."""
    monkeypatch.delenv(la.KERNEL_PATH_ENV, raising=False)
    monkeypatch.delenv(la.KERNEL_REPO_ENV, raising=False)
    monkeypatch.setitem(la._state, "kernel", None)
    monkeypatch.setitem(la._state, "kernel_error", None)
    set_local_attention_backend("auto")
    tensors, kwargs = _to_device(*_make("odd_nonsquare", torch.float32, heads=1), DEVICE)
    out = local_attention_2d(*tensors[:3], **kwargs)
    assert ("_LocalAttention2D" in out.grad_fn.name()) == (DEVICE == "cuda")


# ---------------------------------------------------------------------------------------------------------------
# Hub loading: publisher trust is an explicit opt-in (argument or environment), never assumed
# ---------------------------------------------------------------------------------------------------------------


class _RecordingGetKernel:
    """Stands in for `kernels.get_kernel` (which would go online): records the trust argument, refuses like
    kernels 0.17.2 does for a repo outside its trusted publishers unless the repo is allow-listed."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __call__(self, repo_id, *, revision, trust_remote_code=False):
        self.calls.append(trust_remote_code)
        if trust_remote_code is not True and repo_id not in (trust_remote_code or []):
            raise ValueError(f"Kernel repository '{repo_id}' is not from a trusted publisher.")
        return self.module


def test_hub_kernel_needs_explicit_trust(kernel, monkeypatch, caplog):
    import kernels

    fake = _RecordingGetKernel(kernel)
    monkeypatch.setattr(kernels, "get_kernel", fake)
    monkeypatch.delenv(la.KERNEL_TRUST_ENV, raising=False)
    monkeypatch.setitem(la._state, "triton", None)
    monkeypatch.setitem(la._state, "kernel", None)  # restored afterwards: the compiled-kernel loader is used below
    with pytest.raises(RuntimeError, match=f"pass trust_remote_code=True or set {la.KERNEL_TRUST_ENV}=1"):
        la.load_local_attention_triton_kernel(repo_id=REPO_ID)
    assert fake.calls == [False]
    with caplog.at_level(logging.WARNING, logger=la.__name__):
        assert la.load_local_attention_triton_kernel(repo_id=REPO_ID, trust_remote_code=True) is kernel
    assert fake.calls[-1] == [REPO_ID]  # only this repo is allow-listed, not every publisher
    assert any("explicit opt-in" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(la.KERNEL_TRUST_ENV, "1")
    assert la.load_local_attention_kernel(repo_id=REPO_ID) is kernel
    assert fake.calls[-1] == [REPO_ID]
    with pytest.raises(RuntimeError, match="not from a trusted publisher"):
        la.load_local_attention_kernel(repo_id=REPO_ID, trust_remote_code=False)  # the argument wins


# ---------------------------------------------------------------------------------------------------------------
# Compiled for Hopper without a GPU: the interpreter does not run Triton's compiler, this does
# ---------------------------------------------------------------------------------------------------------------

AOT = r"""
import inspect, sys
sys.path.insert(0, sys.argv[1])
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import cogview2_local_attention_triton as pkg
from cogview2_local_attention_triton import _triton_kernels as tk

TENSORS = {"GM": "*u8", "LSE": "*fp32", "DELTA": "*fp32"}
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

def compile_for_hopper(fn, dtype, **constants):
    constants["PRECISION"] = pkg._precision(dtype)
    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constants:
            signature[name] = "constexpr"
        elif name in TENSORS:
            signature[name] = TENSORS[name]
        elif name in ("Q", "K", "V", "CK", "CV", "GK", "GV", "OUT", "DO", "DQ", "DK", "DV"):
            signature[name] = "*" + DTYPES[dtype]
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32))
    assert ".target sm_90" in kernel.asm["ptx"] and kernel.asm["cubin"]
    print("compiled", fn.fn.__name__, DTYPES[dtype])

local = pkg._WindowSet.make(60, 60, 60, 60, 9, 5, False)  # the real DSR windows
cross = pkg._WindowSet.make(60, 60, 20, 20, 5, 5, False)
causal = pkg._WindowSet.make(20, 20, 20, 20, 17, 9, True)
tr, tc = pkg.QUERY_TILE
common = dict(TR=tr, TC=tc, BLOCK_G=pkg.GLOBAL_BLOCK, BLOCK_D=64)
for dtype in (torch.bfloat16, torch.float32):
    compile_for_hopper(tk._forward_kernel, dtype, CAUSAL=False, HAS_CROSS=True, HAS_GLOBAL=True,
                       BLOCK_KC=pkg._key_run(local, tc), BLOCK_CKC=pkg._key_run(cross, tc), **common)
compile_for_hopper(tk._dq_kernel, torch.float16, CAUSAL=True, HAS_CROSS=True, HAS_GLOBAL=True,
                   BLOCK_KC=pkg._key_run(causal, tc), BLOCK_CKC=pkg._key_run(cross, tc), **common)
for ws, dtype, is_causal in ((causal, torch.float32, True), (cross, torch.bfloat16, False)):
    tkr, tkc = pkg._key_tile(ws)
    compile_for_hopper(tk._dkv_window_kernel, dtype, CAUSAL=is_causal, TKR=tkr, TKC=tkc,
                       BLOCK_QC=pkg._query_run(ws, tkc), BLOCK_D=64)
compile_for_hopper(tk._dkv_global_kernel, torch.bfloat16, BLOCK_G=pkg.GLOBAL_BLOCK, BLOCK_N=pkg.QUERY_BLOCK,
                   BLOCK_D=64)
"""


def test_triton_kernels_compile_for_hopper():
    """Every kernel goes through Triton's compiler to sm_90 PTX and cubin (no GPU needed): catches what only the
    compiler rejects (non-constexpr globals, types of loop-carried values, dot shapes)."""
    pytest.importorskip("triton.backends.nvidia", reason="needs Triton's NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", AOT, str(KERNEL_DIR / "torch-ext")], capture_output=True,
                            text=True, env=env, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled ") == 6, result.stdout


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: the real super-resolution shape
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_real_shape_bf16_48_heads(kernel):
    """60x60, 9x5 + 5x5 cross window on 20x20 + 16 text keys, 48 heads, bf16, forward and backward on CUDA."""
    set_local_attention_backend("triton")
    check_real_sr_shape_on_cuda()
