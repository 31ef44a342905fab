"""Triton kernels of CogView2's fused 2D local attention (forward, dq, dk/dv of windowed and global keys).

Layout: ``[batch, heads, tokens, head_dim]`` tensors with a unit stride on the head dim; the other strides are
arguments, so a key batch of 1 is broadcast with a zero batch stride. A *windowed set* is a key grid
``KR x KC`` seen through a centred window of radius ``(RH, RW)`` (``KW = 2 * RW + 1`` columns, ``SLOTS`` raster
slots kept: all of them, or the causal half); query ``(y, x)`` uses the window centred at ``(y // AH, x // AW)``.

Tiling: a forward/dq program owns a ``TR x TC`` tile of the query grid. For every key row its windows touch, the
keys it needs form one contiguous run of at most ``BLOCK_KC`` cells, so the scores of that row are one
``[TR*TC, BLOCK_KC]`` matrix product, masked per element by the exact window rule. A dk/dv program owns a
``TKR x TKC`` tile of a key grid and visits, row by row, the run of queries whose windows contain it (inverting
the window rule), so gradients need no atomics. Softmax statistics are kept in float32 in base 2 (``exp2``);
``lse`` is stored in natural-log units.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # globals a kernel reads must be constexpr
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _window_allowed(dy, dx, RH, RW, KW, SLOTS):
    """Whether offset ``(dy, dx)`` from the window centre is one of the kept window slots."""
    inside = (dy >= -RH) & (dy <= RH) & (dx >= -RW) & (dx <= RW)
    return inside & ((dy + RH) * KW + dx + RW < SLOTS)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in float32. PRECISION: "ieee" (float32 inputs: no tf32), "default" (tensor-core half
    types) or "upcast" (bfloat16 under Triton's CPU interpreter, whose bfloat16 dot is wrong: the operands are
    widened exactly to float32 first, which gives the same products)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PRECISION == "ieee":
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _scaled(q, scale):
    # The official order: the query is multiplied by the scale in its own dtype before the dot product.
    return (q.to(tl.float32) * scale).to(q.dtype)


@triton.jit
def _query_tile(pid, ROWS, COLS, TR: tl.constexpr, TC: tl.constexpr):
    tiles_x = (COLS + TC - 1) // TC  # not tl.cdiv: a jit function the interpreter misses if triton was imported first
    y0 = (pid // tiles_x) * TR
    x0 = (pid % tiles_x) * TC
    offs = tl.arange(0, TR * TC)
    qy = y0 + offs // TC
    qx = x0 + offs % TC
    return y0, x0, qy, qx, (qy < ROWS) & (qx < COLS)


@triton.jit
def _key_rows(y0, ROWS, TR: tl.constexpr, AH, RH, CAUSAL: tl.constexpr, KR):
    """Key rows touched by the windows of query rows ``[y0, y0 + TR)`` (causal windows end at the centre row)."""
    cy_lo = y0 // AH
    cy_hi = (tl.minimum(y0 + TR, ROWS) - 1) // AH
    below = 0 if CAUSAL else RH
    return tl.maximum(cy_lo - RH, 0), tl.minimum(cy_hi + below, KR - 1) + 1


@triton.jit
def _fwd_window(
    acc, m_i, l_i, q, qy, qx, q_ok, y0, x0, ROWS, K, V, sk_n, sv_n, offs_d, d_ok,
    KR, KC, AH, AW, RH, RW, KW, SLOTS,
    CAUSAL: tl.constexpr, TR: tl.constexpr, BLOCK_KC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    cy = qy // AH
    cx = qx // AW
    kx = x0 // AW - RW + tl.arange(0, BLOCK_KC)
    kx_ok = (kx >= 0) & (kx < KC)
    dx = kx[None, :] - cx[:, None]
    ky_lo, ky_end = _key_rows(y0, ROWS, TR, AH, RH, CAUSAL, KR)
    for ky in range(ky_lo, ky_end):
        kn = ky * KC + kx
        k = tl.load(K + kn[:, None] * sk_n + offs_d[None, :], mask=kx_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + kn[:, None] * sv_n + offs_d[None, :], mask=kx_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * LOG2E
        allowed = _window_allowed((ky - cy)[:, None], dx, RH, RW, KW, SLOTS) & kx_ok[None, :] & q_ok[:, None]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _forward_kernel(
    Q, K, V, CK, CV, GK, GV, GM, OUT, LSE,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    sck_b, sck_h, sck_n, scv_b, scv_h, scv_n, sgk_b, sgk_h, sgk_n, sgv_b, sgv_h, sgv_n, sgm_b,
    HEADS, ROWS, COLS, D, scale,
    KR, KC, AH, AW, RH, RW, KW, SLOTS,
    CKR, CKC, CAH, CAW, CRH, CRW, CKW, NUM_GLOBAL,
    CAUSAL: tl.constexpr, HAS_CROSS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    TR: tl.constexpr, TC: tl.constexpr, BLOCK_KC: tl.constexpr, BLOCK_CKC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    y0, x0, qy, qx, q_ok = _query_tile(pid, ROWS, COLS, TR, TC)
    qn = qy * COLS + qx
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sq_b + h * sq_h + qn[:, None] * sq_n + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :],
                other=0.0)  # fmt: skip
    q = _scaled(q, scale)
    acc = tl.zeros((TR * TC, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((TR * TC,), -1.0e30, dtype=tl.float32)  # finite: a fully masked row never makes NaN
    l_i = tl.zeros((TR * TC,), dtype=tl.float32)
    acc, m_i, l_i = _fwd_window(
        acc, m_i, l_i, q, qy, qx, q_ok, y0, x0, ROWS, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, sk_n, sv_n,
        offs_d, d_ok, KR, KC, AH, AW, RH, RW, KW, SLOTS, CAUSAL, TR, BLOCK_KC, PRECISION,
    )  # fmt: skip
    if HAS_CROSS:
        acc, m_i, l_i = _fwd_window(
            acc, m_i, l_i, q, qy, qx, q_ok, y0, x0, ROWS, CK + b * sck_b + h * sck_h, CV + b * scv_b + h * scv_h,
            sck_n, scv_n, offs_d, d_ok, CKR, CKC, CAH, CAW, CRH, CRW, CKW, CKW * (2 * CRH + 1), False, TR,
            BLOCK_CKC, PRECISION,
        )  # fmt: skip
    if HAS_GLOBAL:
        for g0 in range(0, NUM_GLOBAL, BLOCK_G):
            offs_g = g0 + tl.arange(0, BLOCK_G)
            g_ok = offs_g < NUM_GLOBAL
            real = (tl.load(GM + b * sgm_b + offs_g, mask=g_ok, other=0) != 0) & g_ok
            gk = tl.load(GK + b * sgk_b + h * sgk_h + offs_g[:, None] * sgk_n + offs_d[None, :],
                         mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            gv = tl.load(GV + b * sgv_b + h * sgv_h + offs_g[:, None] * sgv_n + offs_d[None, :],
                         mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            s = _dot(q, tl.trans(gk), PRECISION) * LOG2E
            s = tl.where(real[None, :] & q_ok[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(gv.dtype), gv, PRECISION)
            m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    row = bh * ROWS * COLS + qn
    tl.store(OUT + row[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + row, (m_i + tl.log2(l_safe)) * LN2, mask=q_ok)


@triton.jit
def _dq_window(
    dq, q, do, lse2, delta, qy, qx, q_ok, y0, x0, ROWS, K, V, sk_n, sv_n, offs_d, d_ok,
    KR, KC, AH, AW, RH, RW, KW, SLOTS,
    CAUSAL: tl.constexpr, TR: tl.constexpr, BLOCK_KC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    cy = qy // AH
    cx = qx // AW
    kx = x0 // AW - RW + tl.arange(0, BLOCK_KC)
    kx_ok = (kx >= 0) & (kx < KC)
    dx = kx[None, :] - cx[:, None]
    ky_lo, ky_end = _key_rows(y0, ROWS, TR, AH, RH, CAUSAL, KR)
    for ky in range(ky_lo, ky_end):
        kn = ky * KC + kx
        k = tl.load(K + kn[:, None] * sk_n + offs_d[None, :], mask=kx_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + kn[:, None] * sv_n + offs_d[None, :], mask=kx_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, tl.trans(k), PRECISION) * LOG2E
        allowed = _window_allowed((ky - cy)[:, None], dx, RH, RW, KW, SLOTS) & kx_ok[None, :] & q_ok[:, None]
        p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, CK, CV, GK, GV, GM, DO, LSE, DELTA, DQ,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    sck_b, sck_h, sck_n, scv_b, scv_h, scv_n, sgk_b, sgk_h, sgk_n, sgv_b, sgv_h, sgv_n, sgm_b,
    HEADS, ROWS, COLS, D, scale,
    KR, KC, AH, AW, RH, RW, KW, SLOTS,
    CKR, CKC, CAH, CAW, CRH, CRW, CKW, NUM_GLOBAL,
    CAUSAL: tl.constexpr, HAS_CROSS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
    TR: tl.constexpr, TC: tl.constexpr, BLOCK_KC: tl.constexpr, BLOCK_CKC: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // HEADS, bh % HEADS
    y0, x0, qy, qx, q_ok = _query_tile(pid, ROWS, COLS, TR, TC)
    qn = qy * COLS + qx
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    mask_qd = q_ok[:, None] & d_ok[None, :]
    q = _scaled(tl.load(Q + b * sq_b + h * sq_h + qn[:, None] * sq_n + offs_d[None, :], mask=mask_qd, other=0.0),
                scale)  # fmt: skip
    row = bh * ROWS * COLS + qn
    do = tl.load(DO + row[:, None] * D + offs_d[None, :], mask=mask_qd, other=0.0)
    lse2 = tl.load(LSE + row, mask=q_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + row, mask=q_ok, other=0.0)
    dq = tl.zeros((TR * TC, BLOCK_D), dtype=tl.float32)
    dq = _dq_window(
        dq, q, do, lse2, delta, qy, qx, q_ok, y0, x0, ROWS, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, sk_n,
        sv_n, offs_d, d_ok, KR, KC, AH, AW, RH, RW, KW, SLOTS, CAUSAL, TR, BLOCK_KC, PRECISION,
    )  # fmt: skip
    if HAS_CROSS:
        dq = _dq_window(
            dq, q, do, lse2, delta, qy, qx, q_ok, y0, x0, ROWS, CK + b * sck_b + h * sck_h,
            CV + b * scv_b + h * scv_h, sck_n, scv_n, offs_d, d_ok, CKR, CKC, CAH, CAW, CRH, CRW, CKW,
            CKW * (2 * CRH + 1), False, TR, BLOCK_CKC, PRECISION,
        )  # fmt: skip
    if HAS_GLOBAL:
        for g0 in range(0, NUM_GLOBAL, BLOCK_G):
            offs_g = g0 + tl.arange(0, BLOCK_G)
            g_ok = offs_g < NUM_GLOBAL
            real = (tl.load(GM + b * sgm_b + offs_g, mask=g_ok, other=0) != 0) & g_ok
            gk = tl.load(GK + b * sgk_b + h * sgk_h + offs_g[:, None] * sgk_n + offs_d[None, :],
                         mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            gv = tl.load(GV + b * sgv_b + h * sgv_h + offs_g[:, None] * sgv_n + offs_d[None, :],
                         mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
            s = _dot(q, tl.trans(gk), PRECISION) * LOG2E
            p = tl.where(real[None, :] & q_ok[:, None], tl.exp2(s - lse2[:, None]), 0.0)
            dp = _dot(do, tl.trans(gv), PRECISION)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(gk.dtype), gk, PRECISION)
    tl.store(DQ + row[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mask_qd)


@triton.jit
def _dkv_window_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    HEADS, NUM_QB, KB_STRIDE, ROWS, COLS, D, scale,
    KR, KC, AH, AW, RH, RW, KW, SLOTS,
    CAUSAL: tl.constexpr, TKR: tl.constexpr, TKC: tl.constexpr, BLOCK_QC: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid, bh = tl.program_id(0), tl.program_id(1)
    kb, h = bh // HEADS, bh % HEADS
    tiles_x = (KC + TKC - 1) // TKC
    ky0 = (pid // tiles_x) * TKR
    kx0 = (pid % tiles_x) * TKC
    offs_n = tl.arange(0, TKR * TKC)
    ky = ky0 + offs_n // TKC
    kx = kx0 + offs_n % TKC
    k_ok = (ky < KR) & (kx < KC)
    kn = ky * KC + kx
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    mask_kd = k_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kb * sk_b + h * sk_h + kn[:, None] * sk_n + offs_d[None, :], mask=mask_kd, other=0.0)
    v = tl.load(V + kb * sv_b + h * sv_h + kn[:, None] * sv_n + offs_d[None, :], mask=mask_kd, other=0.0)
    # Queries whose window contains a key of this tile: centre rows ky - RH .. ky + RH (causal: ky .. ky + RH),
    # centre columns kx - RW .. kx + RW, i.e. query rows y with y // AH in that range, and the same for columns.
    ky_hi = tl.minimum(ky0 + TKR, KR) - 1
    above = 0 if CAUSAL else RH
    y_lo = tl.maximum((ky0 - above) * AH, 0)
    y_end = tl.minimum((ky_hi + RH) * AH + AH, ROWS)
    qx = (kx0 - RW) * AW + tl.arange(0, BLOCK_QC)
    qx_ok = (qx >= 0) & (qx < COLS)
    dx = kx[:, None] - (qx // AW)[None, :]
    dk = tl.zeros((TKR * TKC, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((TKR * TKC, BLOCK_D), dtype=tl.float32)
    # A broadcast key (batch 1: NUM_QB = query batch, KB_STRIDE = 0) gathers the gradients of every query batch.
    for i in range(0, NUM_QB):
        b = kb * KB_STRIDE + i
        for y in range(y_lo, y_end):
            qn = y * COLS + qx
            mask_qd = qx_ok[:, None] & d_ok[None, :]
            q = _scaled(tl.load(Q + b * sq_b + h * sq_h + qn[:, None] * sq_n + offs_d[None, :], mask=mask_qd,
                                other=0.0), scale)  # fmt: skip
            row = (b * HEADS + h) * ROWS * COLS + qn
            do = tl.load(DO + row[:, None] * D + offs_d[None, :], mask=mask_qd, other=0.0)
            lse2 = tl.load(LSE + row, mask=qx_ok, other=0.0) * LOG2E
            delta = tl.load(DELTA + row, mask=qx_ok, other=0.0)
            s = _dot(k, tl.trans(q), PRECISION) * LOG2E
            allowed = _window_allowed(ky[:, None] - y // AH, dx, RH, RW, KW, SLOTS) & qx_ok[None, :] & k_ok[:, None]
            p = tl.where(allowed, tl.exp2(s - lse2[None, :]), 0.0)
            dv += _dot(p.to(do.dtype), do, PRECISION)
            dp = _dot(v, tl.trans(do), PRECISION)
            ds = p * (dp - delta[None, :])
            dk += _dot(ds.to(q.dtype), q, PRECISION)
    out = bh * KR * KC + kn
    tl.store(DK + out[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask_kd)
    tl.store(DV + out[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask_kd)


@triton.jit
def _dkv_global_kernel(
    Q, GK, GV, GM, DO, LSE, DELTA, DK, DV,
    sq_b, sq_h, sq_n, sgk_b, sgk_h, sgk_n, sgv_b, sgv_h, sgv_n, sgm_b,
    HEADS, NUM_QB, KB_STRIDE, NQ, D, scale, NUM_GLOBAL,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid, bh = tl.program_id(0), tl.program_id(1)
    kb, h = bh // HEADS, bh % HEADS
    offs_g = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    g_ok = offs_g < NUM_GLOBAL
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    mask_gd = g_ok[:, None] & d_ok[None, :]
    gk = tl.load(GK + kb * sgk_b + h * sgk_h + offs_g[:, None] * sgk_n + offs_d[None, :], mask=mask_gd, other=0.0)
    gv = tl.load(GV + kb * sgv_b + h * sgv_h + offs_g[:, None] * sgv_n + offs_d[None, :], mask=mask_gd, other=0.0)
    dk = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for i in range(0, NUM_QB):
        b = kb * KB_STRIDE + i
        real = (tl.load(GM + b * sgm_b + offs_g, mask=g_ok, other=0) != 0) & g_ok
        for n0 in range(0, NQ, BLOCK_N):
            qn = n0 + tl.arange(0, BLOCK_N)
            n_ok = qn < NQ
            mask_qd = n_ok[:, None] & d_ok[None, :]
            q = _scaled(tl.load(Q + b * sq_b + h * sq_h + qn[:, None] * sq_n + offs_d[None, :], mask=mask_qd,
                                other=0.0), scale)  # fmt: skip
            row = (b * HEADS + h) * NQ + qn
            do = tl.load(DO + row[:, None] * D + offs_d[None, :], mask=mask_qd, other=0.0)
            lse2 = tl.load(LSE + row, mask=n_ok, other=0.0) * LOG2E
            delta = tl.load(DELTA + row, mask=n_ok, other=0.0)
            s = _dot(gk, tl.trans(q), PRECISION) * LOG2E
            p = tl.where(real[:, None] & n_ok[None, :], tl.exp2(s - lse2[None, :]), 0.0)
            dv += _dot(p.to(do.dtype), do, PRECISION)
            dp = _dot(gv, tl.trans(do), PRECISION)
            ds = p * (dp - delta[None, :])
            dk += _dot(ds.to(q.dtype), q, PRECISION)
    out = bh * NUM_GLOBAL + offs_g
    tl.store(DK + out[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=mask_gd)
    tl.store(DV + out[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=mask_gd)
