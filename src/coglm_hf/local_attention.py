# Copyright 2026 The coglm_hf Authors. Licensed under the Apache License, Version 2.0.
"""2D local attention with the exact semantics of CogView2's ``localAttention`` ops.

A query at cell ``(y, x)`` of a ``rows x cols`` grid attends to the key cells ``(y // a + dy, x // a' + dx)`` of a
``kH x kW`` window (odd sizes) on the key grid, where ``(a, a')`` is the ratio query grid / key grid (1 for
self-attention, 3 for CogView2's 60x60 -> 20x20 cross-resolution window). Out-of-grid neighbours are *dropped*
(CogView2 masks them with -10000; windows are never shifted inwards as NATTEN does). The causal variant keeps the
first ``kH * kW // 2 + 1`` window offsets in raster order.

`local_attention_2d` fuses what the super-resolution stages need into ONE softmax over the union of
(a) the query's local window, (b) an optional cross-resolution window on a coarser grid and (c) optional global
keys (the text tokens) with a padding mask.

Implementations, all computing the same numbers (selected with `set_local_attention_backend`):
* ``"torch"``: a memory-light banded formulation. Grid cells are laid out row-major on a zero-padded canvas whose
  width is a multiple of a small tile ``T``; for every window row the ``T`` queries of a tile meet the
  ``T + kW - 1`` keys of one contiguous run of the canvas (an ``unfold`` *view*, no copy) in one batched matmul,
  and the window diagonal band is read back with a strided view. Scores are only ``~(T + kW - 1) / kW`` times
  the exact work and nothing of size ``N x N`` is ever formed. Works on every device, with autograd.
* ``"flex"``: ``torch.nn.attention.flex_attention`` with a cached ``BlockMask`` over the concatenated keys
  (compiled on CUDA; CPU FlexAttention has no backward).
* ``"kernel"``: the fused compiled kernels of ``hub_kernels/cogview2-local-attention`` loaded with the ``kernels``
  package (see `load_local_attention_kernel` for the settings).
* ``"triton"``: the fused Triton kernel of ``hub_kernels/cogview2-local-attention-triton``, a pure-Python kernel
  project also loaded with the ``kernels`` package (see `load_local_attention_triton_kernel`); CUDA devices.
``"auto"`` (default) uses the compiled kernel when one is configured and loads, else on CUDA the Triton kernel when
it loads, else ``"torch"``. This module imports only torch and, lazily and guarded, ``kernels``: the kernels (and
Triton) stay outside the remote code.
`local_attention_2d_reference` is the dense masked definition, used by the tests.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "get_local_attention_backend",
    "load_local_attention_kernel",
    "load_local_attention_triton_kernel",
    "local_attention_2d",
    "local_attention_2d_reference",
    "local_attention_mask",
    "set_local_attention_backend",
    "window_offsets",
]

_BACKENDS = ("auto", "torch", "flex", "kernel", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Settings of the kernel route (documented in docs/kernels.md).
KERNEL_PATH_ENV = "COGLM_LOCAL_ATTENTION_KERNEL_PATH"  # local kernel dir (holds build/<variant>/)
KERNEL_REPO_ENV = "COGLM_LOCAL_ATTENTION_KERNEL"  # Hub repo id, loaded from LOCAL_KERNELS or the Hub cache
KERNEL_REVISION_ENV = "COGLM_LOCAL_ATTENTION_KERNEL_REVISION"
DEFAULT_KERNEL_REVISION = "v1"
TRITON_KERNEL_PATH_ENV = "COGLM_LOCAL_ATTENTION_TRITON_KERNEL_PATH"  # local Triton kernel dir (build/torch-<backend>/)
TRITON_KERNEL_REPO_ENV = "COGLM_LOCAL_ATTENTION_TRITON_KERNEL"  # Hub repo id of the Triton kernel
# Explicit opt-in to load a Hub kernel repo whose publisher `kernels` does not trust (never assumed).
KERNEL_TRUST_ENV = "COGLM_LOCAL_ATTENTION_TRUST_KERNEL_REPO"
# In a source checkout the Triton kernel project sits next to the package; its build output is used by default.
_SOURCE_TRITON_KERNEL = Path(__file__).resolve().parents[2] / "hub_kernels" / "cogview2-local-attention-triton"
BACKEND_ENV = "COGLM_LOCAL_ATTENTION_BACKEND"
FLEX_COMPILE_ENV = "COGLM_LOCAL_ATTENTION_FLEX_COMPILE"  # "auto" (CUDA only), "1", "0"


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"`{name}` must be an int or a pair of ints (rows, cols), got {value!r}.")
    if value[0] <= 0 or value[1] <= 0:
        raise ValueError(f"`{name}` must be positive, got {tuple(value)}.")
    return int(value[0]), int(value[1])


def _odd_window(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    window = _pair(value, name)
    if window[0] % 2 == 0 or window[1] % 2 == 0:
        raise ValueError(
            f"`{name}` must have odd sizes so that the window is centred on the query, got {window}; "
            "CogView2 uses (9, 5) on the 60x60 grid and (5, 5) across resolutions."
        )
    return window


def window_offsets(window: int | tuple[int, int], *, causal: bool = False) -> tuple[tuple[int, int], ...]:
    """Offsets ``(dy, dx)`` of a centred ``kH x kW`` window in raster order (the order of CogView2's score slots).

    The causal variant keeps the first ``kH * kW // 2 + 1`` offsets: every row above the centre, and the centre
    row up to and including the centre.
    """
    kh, kw = _odd_window(window, "window")
    offsets = tuple((dy, dx) for dy in range(-(kh // 2), kh // 2 + 1) for dx in range(-(kw // 2), kw // 2 + 1))
    return offsets[: kh * kw // 2 + 1] if causal else offsets


@dataclass(frozen=True)
class _WindowSet:
    """One windowed key set: keys on ``key_grid``; the query grid is ``key_grid * ratio``."""

    query_grid: tuple[int, int]
    key_grid: tuple[int, int]
    window: tuple[int, int]
    causal: bool

    @property
    def ratio(self) -> tuple[int, int]:
        return self.query_grid[0] // self.key_grid[0], self.query_grid[1] // self.key_grid[1]

    @property
    def num_keys(self) -> int:
        return self.key_grid[0] * self.key_grid[1]

    @property
    def num_slots(self) -> int:
        kh, kw = self.window
        return kh * kw // 2 + 1 if self.causal else kh * kw


def _make_window_set(
    query_grid: tuple[int, int], key_grid: tuple[int, int], window: tuple[int, int], causal: bool, what: str
) -> _WindowSet:
    if query_grid[0] % key_grid[0] or query_grid[1] % key_grid[1]:
        raise ValueError(
            f"The query grid {query_grid} must be an integer multiple of the {what} grid {key_grid} "
            "(each query uses the window centred at (y // a, x // a'))."
        )
    return _WindowSet(query_grid, key_grid, window, causal)


@functools.lru_cache(maxsize=64)
def _slot_validity(ws: _WindowSet, device: torch.device) -> torch.Tensor:
    """``[Nq, num_slots]`` bool: whether window slot ``p`` of query ``n`` lies inside the key grid."""
    rows, cols = ws.query_grid
    ah, aw = ws.ratio
    offsets = torch.tensor(window_offsets(ws.window, causal=ws.causal), device=device)
    cy = torch.arange(rows, device=device).repeat_interleave(cols)[:, None] // ah + offsets[None, :, 0]
    cx = torch.arange(cols, device=device).repeat(rows)[:, None] // aw + offsets[None, :, 1]
    return (cy >= 0) & (cy < ws.key_grid[0]) & (cx >= 0) & (cx < ws.key_grid[1])


def local_attention_mask(
    grid: tuple[int, int],
    window: int | tuple[int, int],
    *,
    key_grid: tuple[int, int] | None = None,
    causal: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense boolean mask ``[rows * cols, key_rows * key_cols]`` (True = attend) of one local window.

    Meant for references and small grids: it is quadratic in the number of cells.
    """
    grid = _pair(grid, "grid")
    ws = _make_window_set(grid, _pair(key_grid or grid, "key_grid"), _odd_window(window, "window"), causal, "key")
    (rows, cols), (krows, kcols), (ah, aw) = grid, ws.key_grid, ws.ratio
    (kh, kw), slots = ws.window, ws.num_slots
    cy = torch.arange(rows, device=device).repeat_interleave(cols)[:, None] // ah
    cx = torch.arange(cols, device=device).repeat(rows)[:, None] // aw
    dy = torch.arange(krows, device=device).repeat_interleave(kcols)[None, :] - cy
    dx = torch.arange(kcols, device=device).repeat(krows)[None, :] - cx
    inside = (dy.abs() <= kh // 2) & (dx.abs() <= kw // 2)
    return inside & ((dy + kh // 2) * kw + dx + kw // 2 < slots)


# ----------------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    """Validated description of one call."""

    sets: tuple[_WindowSet, ...]  # self window first, then the optional cross window
    num_global: int
    scale: float


def _check_tensor(t: torch.Tensor, name: str, query: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}.")
    if t.dim() != 4:
        raise ValueError(f"`{name}` must be 4-D [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}.")
    if t.dtype != query.dtype:
        raise TypeError(f"`{name}` has dtype {t.dtype} but `query` has {query.dtype}; cast them to one dtype.")
    if t.device != query.device:
        raise ValueError(f"`{name}` is on {t.device} but `query` is on {query.device}; move them to one device.")
    if t.shape[1] != query.shape[1] or t.shape[3] != query.shape[3]:
        raise ValueError(
            f"`{name}` has {t.shape[1]} heads of dim {t.shape[3]} but `query` has {query.shape[1]} of dim "
            f"{query.shape[3]}; they must match."
        )
    if t.shape[0] not in (1, query.shape[0]):
        raise ValueError(f"`{name}` batch {t.shape[0]} must be 1 (broadcast) or the query batch {query.shape[0]}.")


def _check_pair(
    key: torch.Tensor | None, value: torch.Tensor | None, names: tuple[str, str], query: torch.Tensor
) -> bool:
    if (key is None) != (value is None):
        raise ValueError(f"Pass both `{names[0]}` and `{names[1]}` or neither.")
    if key is None:
        return False
    _check_tensor(key, names[0], query)
    _check_tensor(value, names[1], query)
    if key.shape != value.shape:
        raise ValueError(
            f"`{names[0]}` {tuple(key.shape)} and `{names[1]}` {tuple(value.shape)} must have the same shape."
        )
    return True


def _validate(
    query, key, value, grid, key_grid, window, causal, cross_key, cross_value, cross_grid, cross_window,
    global_key, global_value, global_key_mask, scale,
) -> _Problem:  # fmt: skip
    if not isinstance(query, torch.Tensor):
        raise TypeError(f"`query` must be a torch.Tensor, got {type(query).__name__}.")
    if query.dim() != 4:
        raise ValueError(f"`query` must be 4-D [batch, heads, tokens, head_dim], got shape {tuple(query.shape)}.")
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"`query` must be float16, bfloat16, float32 or float64, got {query.dtype}.")
    _check_pair(key, value, ("key", "value"), query)
    grid = _pair(grid, "grid")
    if query.shape[2] != grid[0] * grid[1]:
        raise ValueError(
            f"`query` has {query.shape[2]} tokens but grid {grid} has {grid[0] * grid[1]} cells "
            "(tokens must be the row-major cells of the grid)."
        )
    if key_grid is None:
        if key.shape[2] != query.shape[2]:
            raise ValueError(
                f"`key` has {key.shape[2]} tokens but `query` has {query.shape[2]}; pass `key_grid=(rows, cols)` "
                "when the keys live on a coarser grid."
            )
        key_grid = grid
    key_grid = _pair(key_grid, "key_grid")
    if key.shape[2] != key_grid[0] * key_grid[1]:
        raise ValueError(f"`key` has {key.shape[2]} tokens but key grid {key_grid} has {key_grid[0] * key_grid[1]}.")
    sets = [_make_window_set(grid, key_grid, _odd_window(window, "window"), bool(causal), "key")]

    if _check_pair(cross_key, cross_value, ("cross_key", "cross_value"), query):
        if cross_grid is None or cross_window is None:
            raise ValueError("`cross_key` needs `cross_grid=(rows, cols)` and `cross_window=(kH, kW)`.")
        cross_grid = _pair(cross_grid, "cross_grid")
        if cross_key.shape[2] != cross_grid[0] * cross_grid[1]:
            raise ValueError(
                f"`cross_key` has {cross_key.shape[2]} tokens but cross_grid {cross_grid} has "
                f"{cross_grid[0] * cross_grid[1]} cells."
            )
        sets.append(_make_window_set(grid, cross_grid, _odd_window(cross_window, "cross_window"), False, "cross"))
    elif cross_grid is not None or cross_window is not None:
        raise ValueError("`cross_grid`/`cross_window` were given without `cross_key`/`cross_value`.")

    num_global = 0
    if _check_pair(global_key, global_value, ("global_key", "global_value"), query):
        num_global = global_key.shape[2]
        if num_global == 0:
            raise ValueError("`global_key` has 0 tokens; pass None instead.")
        if global_key_mask is not None:
            if not isinstance(global_key_mask, torch.Tensor) or global_key_mask.dtype != torch.bool:
                raise TypeError("`global_key_mask` must be a bool tensor [batch, global tokens] (True = real key).")
            if (
                global_key_mask.dim() != 2
                or global_key_mask.shape[1] != num_global
                or (global_key_mask.shape[0] not in (1, query.shape[0]))
            ):
                raise ValueError(
                    f"`global_key_mask` must have shape [{query.shape[0]} or 1, {num_global}], "
                    f"got {tuple(global_key_mask.shape)}."
                )
            if global_key_mask.device != query.device:
                raise ValueError(f"`global_key_mask` is on {global_key_mask.device}, `query` on {query.device}.")
    elif global_key_mask is not None:
        raise ValueError("`global_key_mask` was given without `global_key`/`global_value`.")

    if scale is None:
        scale = query.shape[-1] ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"`scale` must be a float or None, got {type(scale).__name__}.")
    elif not math.isfinite(scale):
        raise ValueError(f"`scale` must be a finite number, got {scale}.")
    return _Problem(tuple(sets), num_global, float(scale))


# ----------------------------------------------------------------------------------------------------------------
# Dense masked reference (tests)
# ----------------------------------------------------------------------------------------------------------------


def local_attention_2d_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    grid: tuple[int, int],
    window: int | tuple[int, int],
    causal: bool = False,
    cross_key: torch.Tensor | None = None,
    cross_value: torch.Tensor | None = None,
    cross_grid: tuple[int, int] | None = None,
    cross_window: int | tuple[int, int] | None = None,
    global_key: torch.Tensor | None = None,
    global_value: torch.Tensor | None = None,
    global_key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    key_grid: tuple[int, int] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Definition of `local_attention_2d` as dense attention over all concatenated keys with a boolean mask.

    Quadratic in memory; for tests. The query is scaled in its own dtype (the official order), then everything is
    computed in ``compute_dtype`` (default: float32, or float64 for float64 inputs) and cast back.
    """
    problem = _validate(
        query, key, value, grid, key_grid, window, causal, cross_key, cross_value, cross_grid, cross_window,
        global_key, global_value, global_key_mask, scale,
    )  # fmt: skip
    dtype = compute_dtype or (torch.float64 if query.dtype == torch.float64 else torch.float32)
    batch = query.shape[0]
    keys, values, masks = [key], [value], []
    for ws in problem.sets:
        masks.append(local_attention_mask(ws.query_grid, ws.window, key_grid=ws.key_grid, causal=ws.causal,
                                          device=query.device).expand(batch, 1, -1, -1))  # fmt: skip
    if cross_key is not None:
        keys.append(cross_key)
        values.append(cross_value)
    if global_key is not None:
        keys.append(global_key)
        values.append(global_value)
        gmask = global_key_mask if global_key_mask is not None else query.new_ones(1, problem.num_global, dtype=bool)
        masks.append(gmask[:, None, None, :].expand(batch, 1, query.shape[2], -1))
    k = torch.cat([t.expand(batch, -1, -1, -1) for t in keys], dim=2).to(dtype)
    v = torch.cat([t.expand(batch, -1, -1, -1) for t in values], dim=2).to(dtype)
    mask = torch.cat(masks, dim=-1)
    scores = (query * problem.scale).to(dtype) @ k.transpose(-1, -2)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (probs @ v).to(query.dtype)


# ----------------------------------------------------------------------------------------------------------------
# "torch" backend: banded batched matmuls
# ----------------------------------------------------------------------------------------------------------------

_TILE = 8  # queries per tile; the canvas width is padded to a multiple of it


@dataclass(frozen=True)
class _Band:
    """Canvas layout of one window set (see the module docstring)."""

    ws: _WindowSet
    tile: int

    @property
    def group(self) -> int:  # queries sharing one window centre
        return self.ws.ratio[0] * self.ws.ratio[1]

    @property
    def radius(self) -> tuple[int, int]:
        return self.ws.window[0] // 2, self.ws.window[1] // 2

    @property
    def width(self) -> int:  # canvas width, a multiple of the tile
        return -(-(self.ws.key_grid[1] + 2 * self.radius[1]) // self.tile) * self.tile

    @property
    def height(self) -> int:
        return self.ws.key_grid[0] + 2 * self.radius[0]

    @property
    def margin(self) -> int:  # zeros before/after the flattened key canvases so every run stays in range
        return self.radius[0] * self.width + self.radius[1]

    @property
    def run(self) -> int:  # keys one tile meets per window row
        return self.tile + self.ws.window[1] - 1

    @property
    def window_rows(self) -> range:  # window rows that hold at least one slot
        rh = self.radius[0]
        return range(-rh, 1) if self.ws.causal else range(-rh, rh + 1)

    def to_canvas(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, Nq, C]`` in query order -> ``[B*H*height*width, group, C]`` on the padded canvas."""
        (rows, cols), (ah, aw) = self.ws.key_grid, self.ws.ratio
        rh, rw = self.radius
        bh, c = x.shape[0] * x.shape[1], x.shape[-1]
        x = x.reshape(bh, rows, ah, cols, aw, c).transpose(2, 3).reshape(bh, rows, cols, self.group, c)
        x = F.pad(x, (0, 0, 0, 0, rw, self.width - cols - rw, rh, rh))
        return x.reshape(-1, self.group, c)

    def from_canvas(self, x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
        """Inverse of `to_canvas` (drops the padding): ``[B*H*height*width, group, C]`` -> ``[B, H, Nq, C]``."""
        (rows, cols), (ah, aw) = self.ws.key_grid, self.ws.ratio
        rh, rw = self.radius
        x = x.reshape(batch * heads, self.height, self.width, ah, aw, -1)[:, rh : rh + rows, rw : rw + cols]
        return x.transpose(2, 3).reshape(batch, heads, self.ws.query_grid[0] * self.ws.query_grid[1], -1)

    def flat_keys(self, k: torch.Tensor, batch: int) -> torch.Tensor:
        """``[B or 1, H, Nk, D]`` -> flattened zero-padded canvases with margins, ``[2*margin + B*H*h*w, D]``."""
        rows, cols = self.ws.key_grid
        rh, rw = self.radius
        heads, dim = k.shape[1], k.shape[3]
        buf = k.new_zeros(2 * self.margin + batch * heads * self.height * self.width, dim)
        inner = buf[self.margin : buf.shape[0] - self.margin].view(batch, heads, self.height, self.width, dim)
        inner[:, :, rh : rh + rows, rw : rw + cols] = k.reshape(-1, heads, rows, cols, dim).expand(
            batch, -1, -1, -1, -1
        )
        return buf

    def runs(self, flat: torch.Tensor, dy: int, num_tiles: int) -> torch.Tensor:
        """``[num_tiles, D, run]`` view: the keys tile ``t`` meets in window row ``dy`` (no copy)."""
        start = self.margin + dy * self.width - self.radius[1]
        return flat[start : start + num_tiles * self.tile + self.run - self.tile].unfold(0, self.run, self.tile)

    def band_shape(self, num_tiles: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Size/stride picking the window diagonal band ``[tiles, T, group, kW]`` from ``[tiles, T*group, run]``."""
        t, g, r = self.tile, self.group, self.run
        return (num_tiles, t, g, self.ws.window[1]), (t * g * r, g * r + 1, r, 1)


def _band_scores(band: _Band, q_canvas: torch.Tensor, k: torch.Tensor, batch: int) -> torch.Tensor:
    """Scores ``[B, H, Nq, num_slots]`` of scaled queries (canvas layout) against one window set."""
    heads = k.shape[1]
    flat = band.flat_keys(k, batch)
    num_tiles = q_canvas.shape[0] // band.tile
    q_tiles = q_canvas.view(num_tiles, band.tile * band.group, -1)
    size, stride = band.band_shape(num_tiles)
    rows = [torch.bmm(q_tiles, band.runs(flat, dy, num_tiles)).as_strided(size, stride) for dy in band.window_rows]
    scores = torch.stack(rows, dim=-2).reshape(num_tiles * band.tile, band.group, -1)
    return band.from_canvas(scores, batch, heads)[..., : band.ws.num_slots]


def _band_output(band: _Band, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum_p probs[..., p] * value(p)`` for one window set: ``[B, H, Nq, num_slots]`` -> ``[B, H, Nq, D]``, at
    least float32 (accumulated over window rows)."""
    batch, heads = probs.shape[:2]
    flat = band.flat_keys(v, batch)
    kw = band.ws.window[1]
    probs = F.pad(probs, (0, len(band.window_rows) * kw - probs.shape[-1]))  # causal: zero the dropped slots
    canvas = band.to_canvas(probs)
    num_tiles = canvas.shape[0] // band.tile
    canvas = canvas.view(num_tiles, band.tile, band.group, len(band.window_rows), kw)
    size, stride = band.band_shape(num_tiles)
    out = None
    for i, dy in enumerate(band.window_rows):
        zeros = probs.new_zeros(num_tiles, band.tile * band.group, band.run)
        weights = torch.as_strided_scatter(zeros, canvas[..., i, :], size, stride)
        values = band.runs(flat, dy, num_tiles).transpose(1, 2)
        if out is None:
            out = torch.bmm(weights, values).to(torch.promote_types(values.dtype, torch.float32))
        elif out.dtype == values.dtype:
            out = torch.baddbmm(out, weights, values)
        else:  # half precision: accumulate the window rows in float32
            out = out + torch.bmm(weights, values)
    return band.from_canvas(out.view(num_tiles * band.tile, band.group, -1), batch, heads)


_CHUNK_QUERIES = 8192  # (batch x heads x queries) per chunk: bounds the temporaries, whatever the head count


def _local_attention_torch(
    problem: _Problem,
    query: torch.Tensor,
    windowed: list[tuple[torch.Tensor, torch.Tensor]],
    global_key: torch.Tensor | None,
    global_value: torch.Tensor | None,
    global_key_mask: torch.Tensor | None,
) -> torch.Tensor:
    heads_per_chunk = max(1, _CHUNK_QUERIES // (query.shape[0] * query.shape[2]))
    if query.shape[1] <= heads_per_chunk:
        return _torch_chunk(problem, query, windowed, global_key, global_value, global_key_mask)
    outputs = []
    for h in range(0, query.shape[1], heads_per_chunk):
        heads = slice(h, h + heads_per_chunk)
        outputs.append(
            _torch_chunk(
                problem,
                query[:, heads],
                [(k[:, heads], v[:, heads]) for k, v in windowed],
                None if global_key is None else global_key[:, heads],
                None if global_value is None else global_value[:, heads],
                global_key_mask,
            )
        )
    return torch.cat(outputs, dim=1)


def _torch_chunk(
    problem: _Problem,
    query: torch.Tensor,
    windowed: list[tuple[torch.Tensor, torch.Tensor]],
    global_key: torch.Tensor | None,
    global_value: torch.Tensor | None,
    global_key_mask: torch.Tensor | None,
) -> torch.Tensor:
    batch = query.shape[0]
    q = query * problem.scale  # the official order: scale the query in its own dtype first
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    bands = [_Band(ws, _TILE) for ws in problem.sets]
    logits, invalid = [], []
    for band, (k, _) in zip(bands, windowed):
        logits.append(_band_scores(band, band.to_canvas(q), k, batch).to(compute))
        valid = (_slot_validity.__wrapped__ if torch.compiler.is_compiling() else _slot_validity)(band.ws, query.device)
        invalid.append(~valid.expand(batch, 1, -1, -1))
    if global_key is not None:
        logits.append((q @ global_key.transpose(-1, -2)).to(compute))
        if global_key_mask is None:
            invalid.append(
                query.new_zeros(1, 1, 1, problem.num_global, dtype=torch.bool).expand(batch, 1, query.shape[2], -1)
            )
        else:
            invalid.append(~global_key_mask[:, None, None, :].expand(batch, 1, query.shape[2], -1))
    scores = torch.cat(logits, dim=-1).masked_fill_(torch.cat(invalid, dim=-1), float("-inf"))
    probs = scores.softmax(dim=-1).to(query.dtype)
    sizes = [band.ws.num_slots for band in bands] + ([problem.num_global] if global_key is not None else [])
    parts = probs.split(sizes, dim=-1)
    out = None
    for band, (_, v), p in zip(bands, windowed, parts):
        o = _band_output(band, p, v)
        out = o if out is None else out + o
    if global_key is not None:
        out = out + (parts[-1] @ global_value).to(out.dtype)
    return out.to(query.dtype)


# ----------------------------------------------------------------------------------------------------------------
# "flex" backend
# ----------------------------------------------------------------------------------------------------------------


def _window_rule(ws: _WindowSet, offset: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Mask rule for keys ``[offset, offset + Nk)`` of the concatenated key sequence."""
    cols, (krows, kcols), (ah, aw) = ws.query_grid[1], ws.key_grid, ws.ratio
    rh, rw = ws.window[0] // 2, ws.window[1] // 2
    kw, slots = ws.window[1], ws.num_slots

    def rule(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        k = kv_idx - offset
        dy = k // kcols - (q_idx // cols) // ah
        dx = k % kcols - (q_idx % cols) // aw
        inside = (k >= 0) & (k < krows * kcols) & (dy.abs() <= rh) & (dx.abs() <= rw)
        return inside & ((dy + rh) * kw + dx + rw < slots)

    return rule


@functools.lru_cache(maxsize=32)
def _flex_block_mask(sets: tuple[_WindowSet, ...], num_global: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    rules, offset = [], 0
    for ws in sets:
        rules.append(_window_rule(ws, offset))
        offset += ws.num_keys
    total = offset + num_global

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = kv_idx >= offset  # global keys (padding is applied as a score_mod, so the mask stays shape-only)
        for rule in rules:
            allowed = allowed | rule(q_idx, kv_idx)
        return allowed

    num_queries = sets[0].query_grid[0] * sets[0].query_grid[1]
    return create_block_mask(mask_mod, None, None, num_queries, total, device=device)


@functools.lru_cache(maxsize=2)
def _flex_function(compiled: bool) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _local_attention_flex(
    problem: _Problem,
    query: torch.Tensor,
    windowed: list[tuple[torch.Tensor, torch.Tensor]],
    global_key: torch.Tensor | None,
    global_value: torch.Tensor | None,
    global_key_mask: torch.Tensor | None,
) -> torch.Tensor:
    if (
        query.device.type == "cpu"
        and torch.is_grad_enabled()
        and any(
            t.requires_grad
            for t in (query, *[x for pair in windowed for x in pair], global_key, global_value)
            if t is not None
        )
    ):
        raise NotImplementedError(
            "FlexAttention has no backward on CPU; use set_local_attention_backend('torch') (or 'auto') to train "
            "on CPU, or run the flex backend under torch.no_grad()."
        )
    batch = query.shape[0]
    keys = [k for k, _ in windowed] + ([global_key] if global_key is not None else [])
    values = [v for _, v in windowed] + ([global_value] if global_value is not None else [])
    k = torch.cat([t.expand(batch, -1, -1, -1) for t in keys], dim=2)
    v = torch.cat([t.expand(batch, -1, -1, -1) for t in values], dim=2)
    block_mask = _flex_block_mask(problem.sets, problem.num_global, query.device)
    score_mod = None
    if global_key_mask is not None:
        local = k.shape[2] - problem.num_global
        real = torch.cat([global_key_mask.new_ones(global_key_mask.shape[0], local), global_key_mask], dim=1)
        real = real.expand(batch, -1)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(real[b, kv_idx], score, float("-inf"))

    setting = os.environ.get(FLEX_COMPILE_ENV, "auto")
    compiled = query.device.type == "cuda" if setting == "auto" else setting == "1"
    flex = _flex_function(compiled)
    return flex(query * problem.scale, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)


# ----------------------------------------------------------------------------------------------------------------
# "kernel" and "triton" backends (hub_kernels/cogview2-local-attention[-triton], loaded with the `kernels` package)
# ----------------------------------------------------------------------------------------------------------------

_state: dict[str, object] = {
    "backend": os.environ.get(BACKEND_ENV, "auto"),
    "kernel": None,  # loaded compiled kernel module
    "kernel_error": None,  # why loading it failed (str), None if not tried yet
    "triton": None,  # loaded Triton kernel module
    "triton_error": None,
}


@dataclass(frozen=True)
class _KernelKind:
    """Where one kind of kernel ("kernel": compiled, "triton") is configured."""

    name: str
    label: str  # in messages
    path_env: str
    repo_env: str
    default_path: Path | None


_KINDS = {
    "kernel": _KernelKind("kernel", "kernel", KERNEL_PATH_ENV, KERNEL_REPO_ENV, None),
    "triton": _KernelKind(
        "triton", "Triton kernel", TRITON_KERNEL_PATH_ENV, TRITON_KERNEL_REPO_ENV, _SOURCE_TRITON_KERNEL
    ),
}


def _trusted(trust_remote_code: bool | None) -> bool:
    if trust_remote_code is not None:
        return bool(trust_remote_code)
    return os.environ.get(KERNEL_TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _load_kernel(
    kind: _KernelKind,
    path: str | os.PathLike | None,
    repo_id: str | None,
    revision: str | None,
    trust_remote_code: bool | None,
) -> ModuleType:
    path = path if path is not None else os.environ.get(kind.path_env) or None
    repo_id = repo_id if repo_id is not None else os.environ.get(kind.repo_env) or None
    revision = revision or os.environ.get(KERNEL_REVISION_ENV) or DEFAULT_KERNEL_REVISION
    if path is None and repo_id is None and kind.default_path is not None and (kind.default_path / "build").is_dir():
        path = kind.default_path
    try:
        import kernels
    except ImportError as err:
        raise RuntimeError(f"the `kernels` package is not installed ({err}); `pip install kernels`") from err
    if path is not None:
        if not Path(path).is_dir():
            raise RuntimeError(f"{kind.path_env}={path!s} is not a directory")
        source, load = f"local kernel {path}", lambda: kernels.get_local_kernel(Path(path))
    elif repo_id is not None:
        trust = _trusted(trust_remote_code)
        if trust:
            logger.warning("local_attention_2d: trusting Hub kernel repo %s (explicit opt-in)", repo_id)
        source = f"{repo_id}@{revision}"

        def load():
            return kernels.get_kernel(repo_id, revision=revision, trust_remote_code=[repo_id] if trust else False)
    else:
        raise RuntimeError(f"no {kind.label} configured (set {kind.path_env} or {kind.repo_env})")
    try:
        module = load()
    except Exception as err:  # the loader raises many types (FileNotFoundError, ValueError, OSError, ImportError)
        hint = ""
        if "trusted publisher" in str(err) or "publisher trust" in str(err):
            hint = (
                f" (if you trust {repo_id}, pass trust_remote_code=True or set {KERNEL_TRUST_ENV}=1; "
                "kernels refuses repos outside its trusted publishers otherwise)"
            )
        raise RuntimeError(f"could not load {source}: {type(err).__name__}: {err}{hint}") from err
    if not all(callable(getattr(module, name, None)) for name in ("local_attention_2d", "supports")):
        raise RuntimeError(f"{source} does not provide `local_attention_2d` and `supports`")
    _state[kind.name], _state[f"{kind.name}_error"] = module, None
    return module


def load_local_attention_kernel(
    path: str | os.PathLike | None = None,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool | None = None,
) -> ModuleType:
    """Load the fused compiled local-attention kernel through the ``kernels`` package and use it from now on.

    Resolution order (arguments override the environment):
    1. ``path`` / ``$COGLM_LOCAL_ATTENTION_KERNEL_PATH``: a local kernel directory holding
       ``build/torch<ver>-cxx11-<backend>-x86_64-linux/`` -> ``kernels.get_local_kernel(path)``;
    2. ``repo_id`` / ``$COGLM_LOCAL_ATTENTION_KERNEL``: a Hub kernel repo, with ``revision`` /
       ``$COGLM_LOCAL_ATTENTION_KERNEL_REVISION`` (default ``"v1"``) -> ``kernels.get_kernel(repo_id, revision=...)``,
       served by ``LOCAL_KERNELS`` or the Hub cache (set ``HF_HUB_OFFLINE=1`` to forbid downloads).

    ``kernels`` refuses Hub repos of publishers it does not trust; ``trust_remote_code=True`` (or
    ``$COGLM_LOCAL_ATTENTION_TRUST_KERNEL_REPO=1``) allows exactly ``repo_id`` — the kernel then runs native code
    from that repo, so opt in only for repos you trust. Nothing is trusted by default.

    Raises ``RuntimeError`` (with the reason) when nothing is configured or loading fails.
    """
    return _load_kernel(_KINDS["kernel"], path, repo_id, revision, trust_remote_code)


def load_local_attention_triton_kernel(
    path: str | os.PathLike | None = None,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool | None = None,
) -> ModuleType:
    """Load the Triton local-attention kernel (a pure-Python ``kernels`` project) and use it from now on.

    Same resolution as `load_local_attention_kernel`, with ``$COGLM_LOCAL_ATTENTION_TRITON_KERNEL_PATH`` /
    ``$COGLM_LOCAL_ATTENTION_TRITON_KERNEL``; when neither is set, a source checkout's
    ``hub_kernels/cogview2-local-attention-triton`` is used once its ``build_local.py`` has produced ``build/``.
    The variants are ``build/torch-cuda`` and ``build/torch-cpu`` (CPU tensors only under ``TRITON_INTERPRET=1``).
    """
    return _load_kernel(_KINDS["triton"], path, repo_id, revision, trust_remote_code)


def _kernel_for(query: torch.Tensor, forced: bool, kind: str = "kernel") -> ModuleType | None:
    """The loaded kernel of ``kind`` if it handles ``query`` (device, dtype, head dim), else None (``forced``: raise).

    A kernel that cannot be loaded is reported once in the log.
    """
    if _state[kind] is None and _state[f"{kind}_error"] is None:
        try:
            _load_kernel(_KINDS[kind], None, None, None, None)
        except RuntimeError as err:
            _state[f"{kind}_error"] = str(err)
            if not forced:
                what = "fused kernel" if kind == "kernel" else _KINDS[kind].label
                logger.info("local_attention_2d: using the PyTorch path, %s unavailable: %s", what, err)
    kernel = _state[kind]
    if kernel is None:
        if forced:
            raise RuntimeError(f"local attention backend {kind!r} requested but {_state[f'{kind}_error']}")
        return None
    if not kernel.supports(query):
        if forced:
            raise RuntimeError(
                f"the loaded {kind} local-attention kernel does not handle {query.dtype} tensors with head dim "
                f"{query.shape[-1]} on {query.device.type}; use the 'torch' backend"
            )
        return None
    return kernel


def _local_attention_kernel(
    kernel: ModuleType,
    problem: _Problem,
    query: torch.Tensor,
    windowed: list[tuple[torch.Tensor, torch.Tensor]],
    global_key: torch.Tensor | None,
    global_value: torch.Tensor | None,
    global_key_mask: torch.Tensor | None,
) -> torch.Tensor:
    self_set = problem.sets[0]
    geometry = [*self_set.query_grid, *self_set.key_grid, *self_set.window, int(self_set.causal)]
    cross_key = cross_value = None
    if len(problem.sets) > 1:
        geometry += [*problem.sets[1].key_grid, *problem.sets[1].window]
        cross_key, cross_value = windowed[1]
    else:
        geometry += [0, 0, 0, 0]

    def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.contiguous()  # the kernels index raw memory

    return kernel.local_attention_2d(
        contiguous(query), contiguous(windowed[0][0]), contiguous(windowed[0][1]),
        contiguous(cross_key), contiguous(cross_value), contiguous(global_key), contiguous(global_value),
        contiguous(global_key_mask), geometry, problem.scale,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def set_local_attention_backend(backend: str) -> None:
    """Select the implementation of `local_attention_2d`: ``"auto"`` (compiled kernel if configured and loadable,
    else on CUDA the Triton kernel if it loads, else ``"torch"``), ``"torch"``, ``"flex"``, ``"kernel"`` or
    ``"triton"`` (these two raise if their kernel cannot be loaded)."""
    if backend not in _BACKENDS:
        raise ValueError(f"Unknown local attention backend {backend!r}; choose one of {_BACKENDS}.")
    if backend in _KINDS and _state[backend] is None:
        _state[f"{backend}_error"] = None
        try:
            _load_kernel(_KINDS[backend], None, None, None, None)
        except RuntimeError as err:
            raise RuntimeError(f"local attention backend {backend!r} is unavailable: {err}") from err
    _state["backend"] = backend


def get_local_attention_backend() -> str:
    """The selected backend name (see `set_local_attention_backend`)."""
    return str(_state["backend"])


def local_attention_2d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    grid: tuple[int, int],
    window: int | tuple[int, int],
    causal: bool = False,
    cross_key: torch.Tensor | None = None,
    cross_value: torch.Tensor | None = None,
    cross_grid: tuple[int, int] | None = None,
    cross_window: int | tuple[int, int] | None = None,
    global_key: torch.Tensor | None = None,
    global_value: torch.Tensor | None = None,
    global_key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    key_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """CogView2 2D local attention, with one joint softmax over window, cross window and global keys.

    Args:
        query: ``[B, H, rows*cols, D]``, row-major cells of ``grid``.
        key, value: ``[B or 1, H, Nk, D]`` on ``key_grid`` (default: ``grid``); the query grid must be an integer
            multiple ``(a, a')`` of it, and query ``(y, x)`` uses the window centred at ``(y // a, x // a')``.
        grid: query grid ``(rows, cols)``.
        window: ``(kH, kW)`` (odd) window on the key grid; an int means square.
        causal: keep only the first ``kH * kW // 2 + 1`` raster offsets of the local window.
        cross_key, cross_value: ``[B or 1, H, cross_rows*cross_cols, D]``, a second windowed key set on
            ``cross_grid`` (e.g. the 20x20 low-res keys of direct super-resolution) with ``cross_window``.
        global_key, global_value: ``[B or 1, H, T, D]`` keys every query attends to (e.g. text).
        global_key_mask: ``[B or 1, T]`` bool, True for real keys, False for padding.
        scale: logit scale, default ``D ** -0.5``; the query is multiplied by it before the dot product.
        key_grid: grid of ``key``/``value`` when it is coarser than ``grid``.

    Returns:
        ``[B, H, rows*cols, D]`` in the input dtype (softmax computed in float32).
    """
    problem = _validate(
        query, key, value, grid, key_grid, window, causal, cross_key, cross_value, cross_grid, cross_window,
        global_key, global_value, global_key_mask, scale,
    )  # fmt: skip
    windowed = [(key, value)] + ([(cross_key, cross_value)] if cross_key is not None else [])
    backend = _state["backend"]
    if backend in ("auto", "kernel"):
        kernel = _kernel_for(query, forced=backend == "kernel")
        if kernel is not None:
            return _local_attention_kernel(kernel, problem, query, windowed, global_key, global_value, global_key_mask)
    if backend == "triton" or (backend == "auto" and query.device.type == "cuda"):
        kernel = _kernel_for(query, forced=backend == "triton", kind="triton")
        if kernel is not None:
            return _local_attention_kernel(kernel, problem, query, windowed, global_key, global_value, global_key_mask)
    if query.shape[0] == 0 or query.shape[1] == 0:
        # an empty batch (or no heads): an empty result, still connected to the inputs for autograd
        empty = query.new_zeros(*query.shape[:3], value.shape[-1])
        return empty + 0 * (query.sum() + key.sum() + value.sum())
    if backend == "flex":
        return _local_attention_flex(problem, query, windowed, global_key, global_value, global_key_mask)
    return _local_attention_torch(problem, query, windowed, global_key, global_value, global_key_mask)
