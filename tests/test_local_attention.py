"""2D local attention: every backend against the dense masked definition (forward and gradients)."""

from __future__ import annotations

import logging

import pytest
import torch

from coglm_hf import local_attention as la
from coglm_hf.local_attention import (
    local_attention_2d,
    local_attention_2d_reference,
    local_attention_mask,
    set_local_attention_backend,
    window_offsets,
)

# Each case: query grid, window, causal, key grid (None = query grid), cross (grid, window) or None,
# number of global keys (0 = none), whether key/value batches broadcast (batch 1).
CASES = {
    "odd_nonsquare": ((7, 5), (3, 5), False, None, None, 0, False),
    "window_larger_than_grid": ((3, 4), (9, 5), False, None, None, 0, False),
    "causal": ((7, 6), (5, 3), True, None, None, 0, False),
    "causal_17x9_border": ((5, 11), (17, 9), True, None, None, 0, True),
    "coarse_keys_x3": ((9, 6), (3, 3), False, (3, 2), None, 0, False),
    "dsr_like_cross_x3": ((12, 9), (9, 5), False, None, ((4, 3), (5, 5)), 0, True),
    "itersr_like_global": ((8, 7), (9, 5), False, None, None, 5, False),
    "all_sets_causal": ((6, 9), (5, 5), True, None, ((2, 3), (3, 3)), 4, True),
}


def _make(case: str, dtype: torch.dtype, batch: int = 2, heads: int = 2, dim: int = 16, seed: int = 0):
    grid, window, causal, key_grid, cross, num_global, broadcast = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    kb = 1 if broadcast else batch

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    kgrid = key_grid or grid
    q = randn(batch, heads, grid[0] * grid[1], dim)
    k = randn(kb, heads, kgrid[0] * kgrid[1], dim)
    v = randn(kb, heads, kgrid[0] * kgrid[1], dim)
    kwargs = {"grid": grid, "window": window, "causal": causal}
    if key_grid is not None:
        kwargs["key_grid"] = key_grid
    tensors = [q, k, v]
    if cross is not None:
        cgrid, cwindow = cross
        ck, cv = randn(kb, heads, cgrid[0] * cgrid[1], dim), randn(kb, heads, cgrid[0] * cgrid[1], dim)
        kwargs.update(cross_key=ck, cross_value=cv, cross_grid=cgrid, cross_window=cwindow)
        tensors += [ck, cv]
    if num_global:
        gk, gv = randn(kb, heads, num_global, dim), randn(kb, heads, num_global, dim)
        mask = torch.rand(batch, num_global, generator=gen) > 0.5
        mask[0] = False  # a sample whose text is all padding
        mask[1:, 0] = True
        kwargs.update(global_key=gk, global_value=gv, global_key_mask=mask)
        tensors += [gk, gv]
    return tensors, kwargs


def _to_device(tensors, kwargs, device):
    """Move a `_make` case to ``device`` (fresh leaves, kwargs pointing at them)."""
    tensors = [t.detach().to(device).requires_grad_() for t in tensors]
    names = ["cross_key", "cross_value"] if "cross_key" in kwargs else []
    names += ["global_key", "global_value"] if "global_key" in kwargs else []
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    kwargs.update(zip(names, tensors[3:]))
    return tensors, kwargs


def _run(fn, tensors, kwargs, grad_out):
    out = fn(*tensors[:3], **kwargs)
    grads = torch.autograd.grad(out, tensors, grad_out)
    return out, grads


def _reference_f64(query, key, value, **kwargs):
    """Dense reference in float64, from the very same (possibly half-precision) inputs."""
    return local_attention_2d_reference(query, key, value, **kwargs, compute_dtype=torch.float64)


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = la.get_local_attention_backend()
    yield
    la._state["backend"] = previous


# ---------------------------------------------------------------------------------------------------------------
# Semantics of the definition itself
# ---------------------------------------------------------------------------------------------------------------


def _literal_mask(grid, window, key_grid, causal):
    """Literal emulation of CogView2's kernel index arithmetic (one loop per query and window slot)."""
    rows, cols = grid
    krows, kcols = key_grid
    ah, aw = rows // krows, cols // kcols
    kh, kw = window
    slots = [(dy, dx) for dy in range(-(kh // 2), kh - kh // 2) for dx in range(-(kw // 2), kw - kw // 2)]
    if causal:
        slots = slots[: kh * kw // 2 + 1]
    mask = torch.zeros(rows * cols, krows * kcols, dtype=torch.bool)
    for y in range(rows):
        for x in range(cols):
            for dy, dx in slots:
                ky, kx = y // ah + dy, x // aw + dx
                if 0 <= ky < krows and 0 <= kx < kcols:
                    mask[y * cols + x, ky * kcols + kx] = True
    return mask


@pytest.mark.parametrize(
    ("grid", "window", "key_grid", "causal"),
    [((7, 5), (3, 5), (7, 5), False), ((6, 9), (9, 5), (6, 9), True), ((9, 6), (5, 3), (3, 2), False),
     ((60, 60), (9, 5), (60, 60), False), ((60, 60), (5, 5), (20, 20), False)],
)  # fmt: skip
def test_mask_matches_cogview2_index_arithmetic(grid, window, key_grid, causal):
    expected = _literal_mask(grid, window, key_grid, causal)
    assert torch.equal(local_attention_mask(grid, window, key_grid=key_grid, causal=causal), expected)


def test_window_offsets_order_and_causal_half():
    full = window_offsets((3, 5))
    assert full[0] == (-1, -2) and full[-1] == (1, 2) and len(full) == 15
    causal = window_offsets((3, 5), causal=True)
    assert len(causal) == 8 and causal[-1] == (0, 0)  # rows above the centre + left part of the centre row
    assert len(window_offsets((17, 9), causal=True)) == 77  # SAT cuda2d default
    # The real DSR window: 45 slots, 3600 - 896 queries see all of them (borders drop the rest).
    assert local_attention_mask((60, 60), (9, 5)).sum(1).eq(45).sum() == 56 * 52


# ---------------------------------------------------------------------------------------------------------------
# The "torch" backend
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_matches_reference_float64(case):
    set_local_attention_backend("torch")
    tensors, kwargs = _make(case, torch.float64)
    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, grads = _run(local_attention_2d, tensors, kwargs, grad_out)
    ref, ref_grads = _run(local_attention_2d_reference, tensors, kwargs, grad_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


# Tolerances vs a float64 computation from the same low-precision inputs (outputs are O(1)).
TOLERANCES = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", ["causal", "dsr_like_cross_x3", "all_sets_causal"])
def test_torch_backend_low_precision(case, dtype):
    set_local_attention_backend("torch")
    tensors, kwargs = _make(case, dtype)
    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, grads = _run(local_attention_2d, tensors, kwargs, grad_out)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    ref, ref_grads = _run(_reference_f64, tensors, kwargs, grad_out)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref.double(), rtol=0, atol=tol)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=4 * tol)


def test_torch_backend_real_dsr_shape():
    """60x60 queries, 9x5 window + 5x5 window on the 20x20 keys + 16 text keys with padding (one head)."""
    set_local_attention_backend("torch")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 3600, 64, generator=gen) for _ in range(3))
    ck, cv = (torch.randn(1, 1, 400, 64, generator=gen) for _ in range(2))
    gk, gv = (torch.randn(1, 1, 16, 64, generator=gen) for _ in range(2))
    mask = torch.arange(16)[None] >= 6
    kwargs = dict(grid=(60, 60), window=(9, 5), cross_key=ck, cross_value=cv, cross_grid=(20, 20),
                  cross_window=(5, 5), global_key=gk, global_value=gv, global_key_mask=mask)  # fmt: skip
    out = local_attention_2d(q, k, v, **kwargs)
    ref = local_attention_2d_reference(q, k, v, **kwargs, compute_dtype=torch.float64)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def test_non_contiguous_inputs_and_explicit_scale():
    set_local_attention_backend("torch")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 35, 3, 8, generator=gen).transpose(1, 2) for _ in range(3))  # [B, H, N, D] views
    assert not q.is_contiguous()
    out = local_attention_2d(q, k, v, grid=(7, 5), window=(3, 3), scale=0.3)
    ref = local_attention_2d_reference(q.contiguous(), k.contiguous(), v.contiguous(), grid=(7, 5), window=3,
                                       scale=0.3)  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


def test_scale_is_applied_to_the_query_first():
    """fp16: (q * scale) . k must be rounded like the official code (query scaled in its own dtype)."""
    set_local_attention_backend("torch")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 25, 64, generator=gen).half() for _ in range(3))
    out = local_attention_2d(q, k, v, grid=(5, 5), window=3)
    ref = local_attention_2d_reference(q, k, v, grid=(5, 5), window=3, compute_dtype=torch.float64)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-3)


# ---------------------------------------------------------------------------------------------------------------
# The "flex" backend (CPU: eager FlexAttention, forward only)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", ["odd_nonsquare", "causal_17x9_border", "dsr_like_cross_x3", "all_sets_causal"])
def test_flex_backend_forward_matches_reference_cpu(case):
    set_local_attention_backend("flex")
    tensors, kwargs = _make(case, torch.float32)
    with torch.no_grad():
        out = local_attention_2d(*tensors[:3], **kwargs)
        ref = _reference_f64(*tensors[:3], **kwargs)
    torch.testing.assert_close(out.double(), ref.double(), rtol=0, atol=2e-5)


def test_flex_backend_declares_no_cpu_backward():
    set_local_attention_backend("flex")
    tensors, kwargs = _make("odd_nonsquare", torch.float32)
    with pytest.raises(NotImplementedError, match="no backward on CPU"):
        local_attention_2d(*tensors[:3], **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["odd_nonsquare", "causal", "dsr_like_cross_x3", "all_sets_causal"])
def test_flex_backend_cuda_forward_backward(case, dtype):
    set_local_attention_backend("flex")
    tensors, kwargs = _to_device(*_make(case, dtype, dim=64), "cuda")
    grad_out = torch.randn_like(tensors[0])
    out, grads = _run(local_attention_2d, tensors, kwargs, grad_out)
    ref, ref_grads = _run(_reference_f64, tensors, kwargs, grad_out)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref.double(), rtol=0, atol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=4 * tol)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and kernel settings (the kernel itself: tests/test_local_attention_kernel.py)
# ---------------------------------------------------------------------------------------------------------------


def test_auto_without_kernel_logs_once_and_uses_torch(monkeypatch, caplog):
    monkeypatch.delenv(la.KERNEL_PATH_ENV, raising=False)
    monkeypatch.delenv(la.KERNEL_REPO_ENV, raising=False)
    monkeypatch.setitem(la._state, "kernel", None)
    monkeypatch.setitem(la._state, "kernel_error", None)
    set_local_attention_backend("auto")
    tensors, kwargs = _make("odd_nonsquare", torch.float32)
    with caplog.at_level(logging.INFO, logger=la.__name__):
        out = local_attention_2d(*tensors[:3], **kwargs)
        local_attention_2d(*tensors[:3], **kwargs)
    messages = [r.getMessage() for r in caplog.records if "fused kernel unavailable" in r.getMessage()]
    assert len(messages) == 1 and "no kernel configured" in messages[0]
    torch.testing.assert_close(out, local_attention_2d_reference(*tensors[:3], **kwargs), rtol=0, atol=2e-6)


def test_kernel_backend_errors_are_explicit(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(la.KERNEL_REPO_ENV, raising=False)
    monkeypatch.setitem(la._state, "kernel", None)
    monkeypatch.delenv(la.KERNEL_PATH_ENV, raising=False)
    with pytest.raises(RuntimeError, match="no kernel configured"):
        set_local_attention_backend("kernel")
    monkeypatch.setenv(la.KERNEL_PATH_ENV, str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="is not a directory"):
        set_local_attention_backend("kernel")
    monkeypatch.setenv(la.KERNEL_PATH_ENV, str(tmp_path))  # exists, but holds no build/<variant>
    with pytest.raises(RuntimeError, match="could not load local kernel"):
        set_local_attention_backend("kernel")
    assert la.get_local_attention_backend() != "kernel"
    with pytest.raises(ValueError, match="Unknown local attention backend"):
        set_local_attention_backend("cuda")


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def _qkv(n=35, batch=2, heads=2, dim=8, dtype=torch.float32):
    return [torch.randn(batch, heads, n, dim, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(grid=(7, 5), window=(4, 3)), ValueError, "odd sizes"),
        (dict(grid=(5, 5), window=3), ValueError, "has 25 cells"),
        (dict(grid=(7, 5), window=(3, 3), scale="1"), TypeError, "`scale`"),
        (dict(grid=(7, 5), window=(0, 3)), ValueError, "positive"),
        (dict(grid=(7, 5), window=(3, 3), cross_grid=(7, 5)), ValueError, "without `cross_key`"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        local_attention_2d(q, k, v, **kwargs)


def test_bad_tensors():
    q, k, v = _qkv()
    geometry = dict(grid=(7, 5), window=3)
    with pytest.raises(TypeError, match="dtype"):
        local_attention_2d(q, k.half(), v, **geometry)
    with pytest.raises(ValueError, match="heads"):
        local_attention_2d(q, k[:, :1], v[:, :1], **geometry)
    with pytest.raises(ValueError, match="batch"):
        local_attention_2d(q, torch.cat([k, k]), torch.cat([v, v]), **geometry)
    with pytest.raises(ValueError, match="4-D"):
        local_attention_2d(q[0], k, v, **geometry)
    with pytest.raises(ValueError, match="device"):
        local_attention_2d(q, k.to("meta"), v, **geometry)
    with pytest.raises(ValueError, match="integer multiple"):
        local_attention_2d(q, k[:, :, :10], v[:, :, :10], **geometry, key_grid=(2, 5))
    with pytest.raises(ValueError, match="key_grid"):
        local_attention_2d(q, k[:, :, :10], v[:, :, :10], **geometry)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        local_attention_2d(q.long(), k.long(), v.long(), **geometry)
    with pytest.raises(ValueError, match="same shape"):
        local_attention_2d(q, k, v, **geometry, cross_key=k[:, :, :5], cross_value=v[:, :, :6], cross_grid=(1, 5),
                           cross_window=3)  # fmt: skip
    with pytest.raises(ValueError, match="needs `cross_grid"):
        local_attention_2d(q, k, v, **geometry, cross_key=k[:, :, :5], cross_value=v[:, :, :5])
    g = torch.randn(2, 2, 4, 8)
    with pytest.raises(TypeError, match="bool tensor"):
        local_attention_2d(q, k, v, **geometry, global_key=g, global_value=g, global_key_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="global_key_mask` must have shape"):
        local_attention_2d(q, k, v, **geometry, global_key=g, global_value=g,
                           global_key_mask=torch.ones(2, 5, dtype=torch.bool))  # fmt: skip


def check_real_sr_shape_on_cuda() -> None:
    """With the backend already selected: the SR shape on the GPU (60x60, 9x5 + 5x5 cross window on 20x20 + 16 text
    keys, 48 heads, bf16), forward and backward against the reference."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device="cuda", dtype=torch.bfloat16).requires_grad_()

    q, k, v = (randn(2, 48, 3600, 64) for _ in range(3))
    ck, cv, gk, gv = randn(1, 48, 400, 64), randn(1, 48, 400, 64), randn(2, 48, 16, 64), randn(2, 48, 16, 64)
    mask = torch.arange(16, device="cuda")[None] >= torch.tensor([[3], [12]], device="cuda")
    kwargs = dict(grid=(60, 60), window=(9, 5), cross_key=ck, cross_value=cv, cross_grid=(20, 20), cross_window=5,
                  global_key=gk, global_value=gv, global_key_mask=mask)  # fmt: skip
    grad_out = torch.randn_like(q)
    out, grads = _run(local_attention_2d, [q, k, v, ck, cv, gk, gv], kwargs, grad_out)
    ref, ref_grads = _run(local_attention_2d_reference, [q, k, v, ck, cv, gk, gv], kwargs, grad_out)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=3e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r.float(), rtol=0, atol=1.5e-1)
