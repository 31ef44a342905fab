"""Fused 2D local attention with CogView2 semantics in Triton (pure Python: no compiler needed), forward and backward.

Same contract as the compiled ``cogview2-local-attention`` kernel: one softmax per query over (a) its ``kH x kW``
window on the key grid, (b) an optional window on a coarser "cross" grid and (c) optional global keys with a
padding mask; out-of-grid neighbours are dropped. Inputs are ``[batch, heads, tokens, head_dim]`` tensors (key
batches may be 1 = broadcast) in float32, float16 or bfloat16; softmax statistics and accumulation run in float32.
``coglm_hf.local_attention.local_attention_2d`` validates the arguments and calls `local_attention_2d` here.

Runs on CUDA devices; on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1`` before import), which
is how the tests check it without a GPU.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import NamedTuple

import torch
import triton

from ._triton_kernels import _dkv_global_kernel, _dkv_window_kernel, _dq_kernel, _forward_kernel

__all__ = ["MAX_HEAD_DIM", "SUPPORTED_DEVICES", "local_attention_2d", "supports"]

MAX_HEAD_DIM = 256  # a [64, head_dim] float32 accumulator per program stays in registers up to this size
SUPPORTED_DEVICES = frozenset({"cuda"} | ({"cpu"} if os.environ.get("TRITON_INTERPRET") == "1" else set()))
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUERY_TILE = (8, 8)  # rows x cols of query cells per forward / dq program
GLOBAL_BLOCK = 16  # global keys per block
QUERY_BLOCK = 64  # queries per step of the global-key gradient loop


def supports(query: torch.Tensor) -> bool:
    """Whether this kernel handles ``query``'s device, dtype and head dim."""
    return query.device.type in SUPPORTED_DEVICES and query.dtype in _DTYPES and 0 < query.shape[-1] <= MAX_HEAD_DIM


class _WindowSet(NamedTuple):
    """Geometry of one windowed key set, in the kernels' argument order."""

    key_rows: int
    key_cols: int
    ratio_rows: int
    ratio_cols: int
    radius_rows: int
    radius_cols: int
    window_cols: int
    slots: int

    @staticmethod
    def make(q_rows: int, q_cols: int, k_rows: int, k_cols: int, kh: int, kw: int, causal: bool) -> _WindowSet:
        slots = kh * kw // 2 + 1 if causal else kh * kw
        return _WindowSet(k_rows, k_cols, q_rows // k_rows, q_cols // k_cols, kh // 2, kw // 2, kw, slots)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


def _key_run(ws: _WindowSet, tile_cols: int) -> int:
    """Longest run of key columns the windows of ``tile_cols`` adjacent query columns touch."""
    centres = (tile_cols + ws.ratio_cols - 2) // ws.ratio_cols + 1
    return _pow2(centres + ws.window_cols - 1)


def _key_tile(ws: _WindowSet) -> tuple[int, int]:
    """Key cells (rows, cols) per dk/dv program: 8x8, or 4x4 on a coarse grid (each key sees 3x3 more queries)."""
    return (8, 8) if ws.ratio_cols == 1 else (4, 4)


def _query_run(ws: _WindowSet, tile_cols: int) -> int:
    """Longest run of query columns whose windows contain one of ``tile_cols`` adjacent key columns."""
    return _pow2((tile_cols + ws.window_cols - 1) * ws.ratio_cols)


def _strides(t: torch.Tensor, batch: int) -> tuple[int, int, int]:
    """Batch (0 when broadcast), head and token strides of a ``[B, H, N, D]`` tensor with a unit head-dim stride."""
    return (t.stride(0) if t.shape[0] == batch and batch > 1 else 0), t.stride(1), t.stride(2)


def _unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _precision(dtype: torch.dtype) -> str:
    """How the kernels multiply: float32 in full precision (tf32 would miss float32 accuracy), half types on the
    tensor cores; bfloat16 under the interpreter widened to float32 (its bfloat16 dot is broken)."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" else "default"


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


class _Problem(NamedTuple):
    rows: int
    cols: int
    local: _WindowSet
    cross: _WindowSet | None
    causal: bool
    scale: float


def _problem(geometry: list[int], scale: float) -> _Problem:
    q_rows, q_cols, k_rows, k_cols, kh, kw, causal, c_rows, c_cols, c_kh, c_kw = geometry
    local = _WindowSet.make(q_rows, q_cols, k_rows, k_cols, kh, kw, bool(causal))
    cross = _WindowSet.make(q_rows, q_cols, c_rows, c_cols, c_kh, c_kw, False) if c_rows else None
    return _Problem(q_rows, q_cols, local, cross, bool(causal), float(scale))


def _global_mask(global_mask: torch.Tensor | None, num_global: int, like: torch.Tensor) -> torch.Tensor:
    if global_mask is None:
        return torch.ones(1, max(num_global, 1), dtype=torch.uint8, device=like.device)
    return global_mask.to(torch.uint8).contiguous()


def _common_args(pb: _Problem, q, k, v, ck, cv, gk, gv, gm):
    """Strides and geometry shared by the forward and dq kernels."""
    batch, heads, _, dim = q.shape
    dummy = (0, 0, 0)
    cross = pb.cross or _WindowSet(1, 1, 1, 1, 0, 0, 1, 1)
    num_global = 0 if gk is None else gk.shape[2]
    strides = (
        *_strides(q, batch), *_strides(k, batch), *_strides(v, batch),
        *(dummy if ck is None else _strides(ck, batch)), *(dummy if cv is None else _strides(cv, batch)),
        *(dummy if gk is None else _strides(gk, batch)), *(dummy if gv is None else _strides(gv, batch)),
        gm.stride(0) if gm.shape[0] > 1 else 0,
    )  # fmt: skip
    geometry = (heads, pb.rows, pb.cols, dim, pb.scale, *pb.local, *cross[:7], num_global)
    constants = dict(
        CAUSAL=pb.causal, HAS_CROSS=pb.cross is not None, HAS_GLOBAL=gk is not None, TR=QUERY_TILE[0],
        TC=QUERY_TILE[1], BLOCK_KC=_key_run(pb.local, QUERY_TILE[1]), BLOCK_CKC=_key_run(cross, QUERY_TILE[1]),
        BLOCK_G=GLOBAL_BLOCK, BLOCK_D=_pow2(dim), PRECISION=_precision(q.dtype),
    )  # fmt: skip
    grid = (triton.cdiv(pb.rows, QUERY_TILE[0]) * triton.cdiv(pb.cols, QUERY_TILE[1]), batch * heads)
    return strides, geometry, constants, grid


def _forward(pb: _Problem, q, k, v, ck, cv, gk, gv, gm) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, tokens, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, tokens, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    strides, geometry, constants, grid = _common_args(pb, q, k, v, ck, cv, gk, gv, gm)
    dummy = q  # never read when the matching HAS_* flag is off
    with _device_guard(q):
        _forward_kernel[grid](
            q, k, v, ck if ck is not None else dummy, cv if cv is not None else dummy,
            gk if gk is not None else dummy, gv if gv is not None else dummy, gm, out, lse,
            *strides, *geometry, **constants,
        )  # fmt: skip
    return out, lse


def _window_grads(pb: _Problem, ws: _WindowSet, causal: bool, q, k, v, dout, lse, delta):
    batch, heads, _, dim = q.shape
    dk = torch.empty((k.shape[0], heads, k.shape[2], dim), dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    tkr, tkc = _key_tile(ws)
    broadcast = k.shape[0] != batch
    grid = (triton.cdiv(ws.key_rows, tkr) * triton.cdiv(ws.key_cols, tkc), k.shape[0] * heads)
    _dkv_window_kernel[grid](
        q, k, v, dout, lse, delta, dk, dv, *_strides(q, batch), *_strides(k, k.shape[0]), *_strides(v, v.shape[0]),
        heads, batch if broadcast else 1, 0 if broadcast else 1, pb.rows, pb.cols, dim, pb.scale, *ws,
        CAUSAL=causal, TKR=tkr, TKC=tkc, BLOCK_QC=_query_run(ws, tkc),
        BLOCK_D=_pow2(dim), PRECISION=_precision(q.dtype),
    )  # fmt: skip
    return dk, dv


def _global_grads(pb: _Problem, q, gk, gv, gm, dout, lse, delta):
    batch, heads, tokens, dim = q.shape
    dk = torch.empty((gk.shape[0], heads, gk.shape[2], dim), dtype=gk.dtype, device=gk.device)
    dv = torch.empty_like(dk)
    broadcast = gk.shape[0] != batch
    grid = (triton.cdiv(gk.shape[2], GLOBAL_BLOCK), gk.shape[0] * heads)
    _dkv_global_kernel[grid](
        q, gk, gv, gm, dout, lse, delta, dk, dv, *_strides(q, batch), *_strides(gk, gk.shape[0]),
        *_strides(gv, gv.shape[0]), gm.stride(0) if gm.shape[0] > 1 else 0, heads, batch if broadcast else 1,
        0 if broadcast else 1, tokens, dim, pb.scale, gk.shape[2],
        BLOCK_G=GLOBAL_BLOCK, BLOCK_N=QUERY_BLOCK, BLOCK_D=_pow2(dim), PRECISION=_precision(q.dtype),
    )  # fmt: skip
    return dk, dv


def _backward(pb: _Problem, dout, q, k, v, ck, cv, gk, gv, gm, out, lse):
    dout = dout.contiguous()
    if q.numel() == 0:
        return tuple(None if t is None else torch.zeros_like(t) for t in (q, k, v, ck, cv, gk, gv))
    delta = (dout.float() * out.float()).sum(-1)  # rowsum(dO * O): the softmax-backward correction per query
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    strides, geometry, constants, grid = _common_args(pb, q, k, v, ck, cv, gk, gv, gm)
    dummy = q
    with _device_guard(q):
        _dq_kernel[grid](
            q, k, v, ck if ck is not None else dummy, cv if cv is not None else dummy,
            gk if gk is not None else dummy, gv if gv is not None else dummy, gm, dout, lse, delta, dq,
            *strides, *geometry, **constants,
        )  # fmt: skip
        dk, dv = _window_grads(pb, pb.local, pb.causal, q, k, v, dout, lse, delta)
        dck = dcv = dgk = dgv = None
        if ck is not None:
            dck, dcv = _window_grads(pb, pb.cross, False, q, ck, cv, dout, lse, delta)
        if gk is not None:
            dgk, dgv = _global_grads(pb, q, gk, gv, gm, dout, lse, delta)
    return dq, dk, dv, dck, dcv, dgk, dgv


class _LocalAttention2D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ck, cv, gk, gv, gm, pb):
        out, lse = _forward(pb, q, k, v, ck, cv, gk, gv, gm)
        ctx.save_for_backward(q, k, v, ck, cv, gk, gv, gm, out, lse)
        ctx.problem = pb
        return out

    @staticmethod
    def backward(ctx, dout):
        grads = _backward(ctx.problem, dout, *ctx.saved_tensors)
        return (*grads, None, None)


def local_attention_2d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cross_key: torch.Tensor | None,
    cross_value: torch.Tensor | None,
    global_key: torch.Tensor | None,
    global_value: torch.Tensor | None,
    global_mask: torch.Tensor | None,
    geometry: list[int],
    scale: float,
) -> torch.Tensor:
    """Attention output ``[B, H, rows*cols, D]`` in the input dtype (differentiable in every tensor argument).

    ``geometry = [q_rows, q_cols, k_rows, k_cols, kH, kW, causal, c_rows, c_cols, c_kH, c_kW]`` (``c_* = 0``: no
    cross set), the same list the compiled kernel takes; the caller has validated shapes, dtypes and devices.
    """
    pb = _problem(geometry, scale)
    tensors = [_unit_last(t) for t in (query, key, value, cross_key, cross_value, global_key, global_value)]
    num_global = 0 if global_key is None else global_key.shape[2]
    gm = _global_mask(global_mask, num_global, query)
    return _LocalAttention2D.apply(*tensors, gm, pb)
