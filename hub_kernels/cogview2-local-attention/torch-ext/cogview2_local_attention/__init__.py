"""Fused 2D local attention with CogView2 semantics (CUDA and CPU), forward and backward.

One softmax per query over (a) its ``kH x kW`` window on the key grid, (b) an optional window on a coarser
"cross" grid and (c) optional global keys with a padding mask. Out-of-grid neighbours are dropped. Inputs must be
contiguous ``[batch, heads, tokens, head_dim]`` tensors (key batches may be 1 = broadcast) in float32, float16
or bfloat16; softmax and accumulation run in float32. ``coglm_hf.local_attention.local_attention_2d`` validates
the arguments and calls `local_attention_2d` here.
"""

from __future__ import annotations

import torch

from ._ops import add_op_namespace_prefix, ops

__all__ = ["CUDA_HEAD_DIMS", "SUPPORTED_DEVICES", "local_attention_2d", "supports"]

# Head dims the CUDA kernels are instantiated for (register-resident rows of 16-byte vector loads). 128 is left
# out until tuned: every kernel spilled registers there; `auto` then uses the Triton kernel or the PyTorch path.
CUDA_HEAD_DIMS = (64,)
# Device types this build implements, looked up once at import (keeps `supports` traceable by torch.compile).
SUPPORTED_DEVICES = frozenset(
    device
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if torch._C._dispatch_has_kernel_for_dispatch_key(add_op_namespace_prefix("forward"), key)
)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(query: torch.Tensor) -> bool:
    """Whether this build handles ``query``'s device, dtype and head dim."""
    device = query.device.type
    if device not in SUPPORTED_DEVICES or query.dtype not in _DTYPES:
        return False
    return device != "cuda" or query.shape[-1] in CUDA_HEAD_DIMS


@torch.library.register_fake(add_op_namespace_prefix("forward"))
def _forward_fake(q, k, v, cross_k, cross_v, global_k, global_v, global_mask, geometry, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake(add_op_namespace_prefix("backward"))
def _backward_fake(grad_out, q, k, v, cross_k, cross_v, global_k, global_v, global_mask, out, lse, geometry, scale):
    def like(t):
        return q.new_empty(0) if t is None else torch.empty_like(t)

    return like(q), like(k), like(v), like(cross_k), like(cross_v), like(global_k), like(global_v)


def _setup_context(ctx, inputs, output):
    q, k, v, cross_k, cross_v, global_k, global_v, global_mask, geometry, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cross_k, cross_v, global_k, global_v, global_mask, out, lse)
    ctx.geometry, ctx.scale = geometry, scale


def _backward(ctx, grad_out, grad_lse):
    # The log-sum-exp output is an internal by-product (`local_attention_2d` returns only `out`).
    q, k, v, cross_k, cross_v, global_k, global_v, global_mask, out, lse = ctx.saved_tensors
    grads = ops.backward(
        grad_out.contiguous(), q, k, v, cross_k, cross_v, global_k, global_v, global_mask, out, lse,
        ctx.geometry, ctx.scale,
    )  # fmt: skip
    dq, dk, dv, dcross_k, dcross_v, dglobal_k, dglobal_v = grads
    return (
        dq, dk, dv,
        dcross_k if cross_k is not None else None, dcross_v if cross_v is not None else None,
        dglobal_k if global_k is not None else None, dglobal_v if global_v is not None else None,
        None, None, None,
    )  # fmt: skip


torch.library.register_autograd(add_op_namespace_prefix("forward"), _backward, setup_context=_setup_context)


def local_attention_2d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cross_key: torch.Tensor | None,
    cross_value: torch.Tensor | None,
    global_key: torch.Tensor | None,
    global_value: torch.Tensor | None,
    global_key_mask: torch.Tensor | None,
    geometry: list[int],
    scale: float,
) -> torch.Tensor:
    """``[B, H, rows*cols, D]`` output; ``geometry = [q_rows, q_cols, k_rows, k_cols, kH, kW, causal, c_rows,
    c_cols, c_kH, c_kW]`` (the ``c_*`` entries 0 without a cross set); the query is multiplied by ``scale``
    (in its dtype) before the dot products."""
    out, _ = ops.forward(
        query, key, value, cross_key, cross_value, global_key, global_value, global_key_mask, geometry, scale
    )
    return out
