"""The rest of a power decoder layer's one-token step: norms, projections, RoPE, gate and MLP.

At batch 1 a decode step reads every weight once, and each launch costs a few microseconds
whatever it reads. Under inductor a power layer's step was about 11 launches, most of them
the norms, projections and RoPE around the attention. Here a power layer's step is four launches
and the attention's tail step (triton_decode; with a fold launch after it where the step has few
readers). On the H100 the benchmark model's batch-1 step went from 137 kernels and 0.496 ms to 84
kernels (the fold a launch of its own then) and 0.380 ms (RESULTS.md,
generation, run J):

    qkvg     h = RMSNorm(x); q = RoPE(qnorm(h Wq^T)) [B, Hq, d], k = RoPE(knorm(h Wk^T)),
             v = h Wv^T [B, Hk, d], log_g = logsigmoid(h Wg^T + bg) [B, Hk] fp32. RoPE's angles
             come from the positions and inverse frequencies, as PowerRotaryEmbedding makes its
             tables: made by inductor, those tables were seven small launches a step (H100, the
             benchmark model's graphed batch-1 step at 64k context: 0.307 ms with them, 0.292 /
             0.294 without; RESULTS.md, generation, run L)
    linear   y = x W^T (+ b), optionally with RMSNorm before it, a SiLU-gated pair
             silu(x W1^T) * (x W2^T), and a residual added after it. A layer uses it three
             times: o_proj + residual, norm + gate/up, down + residual.

Shapes: x [B, K] (B <= MAX_BATCH), weights as nn.Linear holds them ([N, K], contiguous, the
dtype of x), outputs in x's dtype. Nothing is copied or concatenated: the q, k, v and gate
weights stay four tensors, and programs pick theirs by program id.

Rounding follows the eager modules (PowerRMSNorm, nn.Linear, SiLU, the residual add): each
module's output is rounded to x's dtype where the eager model rounds it; the products and sums
inside run in fp32 (RoPE too, where the eager model rounds each of its products).

On Hopper the kernels launch with programmatic dependent launch (triton_common.dependent_launch):
a program loads its first weight tiles (nothing in a step writes them), then waits for the kernel
before it, so that the weights stream in while the previous launch finishes. H100, a layer's four
launches at batch 1: 18.0 us without, 13.6 with; the benchmark model's compiled step at 64k
context 0.364 against 0.340 ms (RESULTS.md, generation, run K, call 3).

The products are matrix-vector products: batch rows times weight tiles as a broadcast product
[BB, BN, BK] summed over K once at the end, not tl.dot (M would be the batch, 1 to 8, under
tl.dot's 16 rows; and the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import dependent_launch, interpreting, pdl_options, wait_for_previous_kernel

#: Largest batch the fused step takes; larger batches read each weight tile for more rows, which
#: the eager path's matrix products (cuBLAS, inductor) do better.
MAX_BATCH = 8
#: Broadcast-product elements per program (fp32 registers: 64 a thread at 4 warps)
PRODUCT_ELEMENTS = 8192
#: Input elements per step of a program's walk over K. The walk is unrolled (K is a compile-time
#: constant), so that every load of a program is issued before the first product waits on one: with
#: a rolled loop over blocks of 256 each program waited on memory once per block, and a launch took
#: 4 to 10 us against floors of 0.4 to 2 (H100, RESULTS.md, generation, run J).
MAX_K_BLOCK = 4096
#: Programs a launch aims for (an H100 has 132 SMs): with the walk over K unrolled, 128 to 1024
#: gave the same per-layer time within 0.5 us at batch 1 and 8 (benchmarks/tune_fused_step.py,
#: RESULTS.md, generation, run J)
TARGET_PROGRAMS = 512


@triton.jit
def row_rstd(X, stride_x, offs_b, b_ok, K: tl.constexpr, eps, BB: tl.constexpr, BK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of the rows offs_b of X [B, K]: fp32 [BB] (PowerRMSNorm's scale)."""
    ss = tl.zeros((BB,), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(X + offs_b[:, None] * stride_x + offs_k[None, :], mask=b_ok[:, None] & (offs_k < K)[None, :],
                    other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def weight_tiles(WA, WB, rows_a, rows_b, ok_a, ok_b, k0, K: tl.constexpr, TWO: tl.constexpr, BK: tl.constexpr):
    """The [BN, BK] tiles at columns k0.. of WA's rows rows_a and, with TWO, WB's rows rows_b (as
    stored; without TWO the second is the first)."""
    offs_k = k0 + tl.arange(0, BK)
    k_ok = offs_k < K
    w_a = tl.load(WA + rows_a.to(tl.int64)[:, None] * K + offs_k[None, :], mask=ok_a[:, None] & k_ok[None, :], other=0.0)
    w_b = w_a
    if TWO:
        w_b = tl.load(WB + rows_b.to(tl.int64)[:, None] * K + offs_k[None, :], mask=ok_b[:, None] & k_ok[None, :],
                      other=0.0)
    return w_a, w_b


@triton.jit
def project_rows(X, stride_x, offs_b, b_ok, K: tl.constexpr, rstd, NW, WA, WB, rows_a, rows_b, ok_a, ok_b, w_a0, w_b0,
                 NORM: tl.constexpr, TWO: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The rows rows_a [BN] of x' WA^T and, with TWO, rows_b of x' WB^T: fp32 [BB, BN] each (the
    second zero without TWO). x' is X's rows offs_b, or with NORM, PowerRMSNorm(x) with weight NW and
    the scales rstd [BB] of row_rstd, rounded to x's dtype as the module rounds it. w_a0, w_b0: the
    weight tiles of the first block of K (weight_tiles at 0), loaded before the program waited for
    the kernel before it (wait_for_previous_kernel)."""
    acc_a = tl.zeros((BB, BN, BK), dtype=tl.float32)
    acc_b = tl.zeros((BB, BN, BK), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < K
        if k0 == 0:
            w_a, w_b = w_a0, w_b0
        else:
            w_a, w_b = weight_tiles(WA, WB, rows_a, rows_b, ok_a, ok_b, k0, K, TWO, BK)
        x = tl.load(X + offs_b[:, None] * stride_x + offs_k[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            xn = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
            nw = tl.load(NW + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            x = (nw[None, :] * xn.to(tl.float32)).to(x.dtype)
        x = x.to(tl.float32)[:, None, :]
        acc_a += x * w_a.to(tl.float32)[None]
        if TWO:
            acc_b += x * w_b.to(tl.float32)[None]
    return tl.sum(acc_a, axis=2), tl.sum(acc_b, axis=2)


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """x rounded to `dtype` and back to fp32: where the eager model stores a module's output."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def rope_tables(POS, INV_FREQ, offs_b, b_ok, stride_pos, j, scale, DT: tl.constexpr):
    """RoPE's cos and sin [BB, BP] at columns j (and j + d/2: the same angle) for the rows offs_b,
    as PowerRotaryEmbedding computes them: angle = float(position) * inv_freq[j] in fp32, times the
    attention scaling, rounded to DT. POS [B] integer positions (stride_pos 0: one for every row),
    INV_FREQ [d/2] (any float type). tl.cos and tl.sin are libdevice's (full range reduction, as
    torch's), not the approximate instructions."""
    pos = tl.load(POS + offs_b * stride_pos, mask=b_ok, other=0).to(tl.float32)
    angle = pos[:, None] * tl.load(INV_FREQ + j).to(tl.float32)[None, :]
    return rounded(tl.cos(angle) * scale, DT), rounded(tl.sin(angle) * scale, DT)


@triton.jit
def store_log_gates(LG, BG, g, rows, offs_b, b_ok, HK, DT: tl.constexpr):
    """LG [B, HK] at (offs_b, rows) = logsigmoid(g + BG[rows]), g [BB, BP] the gate projection."""
    ok = rows < HK
    g = rounded(g + tl.load(BG + rows, mask=ok, other=0.0).to(tl.float32)[None, :], DT)
    log_g = tl.minimum(g, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(g)))  # logsigmoid without overflow
    tl.store(LG + offs_b[:, None] * HK + rows[None, :], log_g, mask=b_ok[:, None] & ok[None, :])


@triton.jit
def _qkvg_kernel(
    X, NW, WQ, WK, WV, WG, BQ, BK_, BV, BG, QNW, KNW, POS, INV_FREQ, Q, K_OUT, V, LG,
    B, HQ, HK, stride_pos, eps, qk_eps, rope_scale,
    KDIM: tl.constexpr, HEAD_DIM: tl.constexpr, BP: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, QK_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, PDL: tl.constexpr,
):
    """Grid ((HQ + 2 HK) HALF / BP + gate programs, cdiv(B, BB)). Program p of the first part takes
    rows j and j + HALF (j in a block of BP) of head p // (HALF / BP), counting q's heads, then k's,
    then v's: the pairs RoPE rotates together (with QK_NORM, BP = HALF: the whole head, for its
    norm). The rest take the gate's rows, 2 BP at a time."""
    HALF: tl.constexpr = HEAD_DIM // 2
    DT: tl.constexpr = X.dtype.element_ty
    p = tl.program_id(0)
    offs_b = tl.program_id(1) * BB + tl.arange(0, BB)
    b_ok = offs_b < B
    head = p // (HALF // BP)
    if head < HQ + 2 * HK:
        j = (p % (HALF // BP)) * BP + tl.arange(0, BP)
        W, BIAS, NORM_W, OUT, h, heads = WQ, BQ, QNW, Q, head, HQ
        if head >= HQ:
            W, BIAS, NORM_W, OUT, h, heads = WK, BK_, KNW, K_OUT, head - HQ, HK
        if head >= HQ + HK:
            W, BIAS, OUT, h = WV, BV, V, head - HQ - HK
        rows_lo = h * HEAD_DIM + j
        rows_hi = rows_lo + HALF
        ok = j < HALF
        w_lo, w_hi = weight_tiles(W, W, rows_lo, rows_hi, ok, ok, 0, KDIM, True, BK)
        wait_for_previous_kernel(PDL)
        rstd = row_rstd(X, KDIM, offs_b, b_ok, KDIM, eps, BB, BK)
        lo, hi = project_rows(X, KDIM, offs_b, b_ok, KDIM, rstd, NW, W, W, rows_lo, rows_hi, ok, ok, w_lo, w_hi,
                              True, True, BB, BP, BK)
        if HAS_BIAS:
            lo += tl.load(BIAS + rows_lo).to(tl.float32)[None, :]
            hi += tl.load(BIAS + rows_hi).to(tl.float32)[None, :]
        lo, hi = rounded(lo, DT), rounded(hi, DT)
        if head < HQ + HK:
            if QK_NORM:  # the program holds the whole head (BP = HALF)
                r = tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / HEAD_DIM + qk_eps)[:, None]
                lo = rounded(tl.load(NORM_W + j).to(tl.float32)[None, :] * rounded(lo * r, DT), DT)
                hi = rounded(tl.load(NORM_W + HALF + j).to(tl.float32)[None, :] * rounded(hi * r, DT), DT)
            if HAS_ROPE:  # x cos + rotate_half(x) sin, rotate_half(x) = (-x_hi, x_lo)
                cos, sin = rope_tables(POS, INV_FREQ, offs_b, b_ok, stride_pos, j, rope_scale, DT)
                lo, hi = lo * cos - hi * sin, hi * cos + lo * sin
        out = OUT + ((offs_b * heads + h) * HEAD_DIM)[:, None] + j[None, :]
        tl.store(out, lo, mask=b_ok[:, None])
        tl.store(out + HALF, hi, mask=b_ok[:, None])
    elif HAS_GATE:
        rows_a = (p - (HQ + 2 * HK) * (HALF // BP)) * 2 * BP + tl.arange(0, BP)
        rows_b = rows_a + BP
        w_a, w_b = weight_tiles(WG, WG, rows_a, rows_b, rows_a < HK, rows_b < HK, 0, KDIM, True, BK)
        wait_for_previous_kernel(PDL)
        rstd = row_rstd(X, KDIM, offs_b, b_ok, KDIM, eps, BB, BK)
        a, b = project_rows(X, KDIM, offs_b, b_ok, KDIM, rstd, NW, WG, WG, rows_a, rows_b, rows_a < HK, rows_b < HK,
                            w_a, w_b, True, True, BB, BP, BK)
        store_log_gates(LG, BG, a, rows_a, offs_b, b_ok, HK, DT)
        store_log_gates(LG, BG, b, rows_b, offs_b, b_ok, HK, DT)


@triton.jit
def _linear_kernel(
    X, stride_x, NW, W, BIAS, W2, BIAS2, R, OUT, B, N, eps,
    K: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr,
    RESIDUAL: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
):
    """OUT [B, N] = (R +) f(x' W^T (+ BIAS)), f the identity or, with GATED, silu(.) * (x' W2^T (+ BIAS2));
    x' = X [B, K] (row stride stride_x) or, with NORM, its RMSNorm (weight NW). Grid (cdiv(N, BN), cdiv(B, BB))."""
    DT: tl.constexpr = OUT.dtype.element_ty
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    ok = rows < N
    offs_b = tl.program_id(1) * BB + tl.arange(0, BB)
    b_ok = offs_b < B
    w_a, w_b = weight_tiles(W, W2, rows, rows, ok, ok, 0, K, GATED, BK)
    wait_for_previous_kernel(PDL)
    if NORM:
        rstd = row_rstd(X, stride_x, offs_b, b_ok, K, eps, BB, BK)
    else:
        rstd = tl.zeros((BB,), dtype=tl.float32)
    a, b = project_rows(X, stride_x, offs_b, b_ok, K, rstd, NW, W, W2, rows, rows, ok, ok, w_a, w_b, NORM, GATED, BB,
                        BN, BK)
    if HAS_BIAS:
        a += tl.load(BIAS + rows, mask=ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS2:  # (with GATED)
        b += tl.load(BIAS2 + rows, mask=ok, other=0.0).to(tl.float32)[None, :]
    y = rounded(a, DT)
    if GATED:
        y = rounded(y * tl.sigmoid(y), DT) * rounded(b, DT)
    out = offs_b[:, None] * N + rows[None, :]
    m = b_ok[:, None] & ok[None, :]
    if RESIDUAL:
        y = tl.load(R + out, mask=m, other=0.0).to(tl.float32) + rounded(y, DT)
    tl.store(OUT + out, y, mask=m)


def _batch_block(batch: int) -> int:
    return triton.next_power_of_2(min(batch, MAX_BATCH))


def _k_block(k: int) -> int:
    return min(triton.next_power_of_2(k), MAX_K_BLOCK)


def _row_block(rows: int, limit: int) -> int:
    """Rows per program: a power of two up to `limit` (the registers' budget), small enough that
    `rows` give about TARGET_PROGRAMS programs."""
    want = max(1, rows // TARGET_PROGRAMS)
    return max(1, min(limit, 1 << (want.bit_length() - 1)))


#: Warps per program, by batch block: one warp up to SMALL_BATCH_BLOCK rows (a program's
#: reductions then stay within its warp), else NUM_WARPS. H100, per layer (run J): batch 1 19.5
#: against 19.8 us, batch 4 24.8 against 27.3; at batch 8 one warp made the down product 20.5 us
#: against 8.0.
NUM_WARPS = 4
SMALL_BATCH_BLOCK = 4


def _launch_options(batch_block: int, pdl: bool) -> dict:
    if interpreting():
        return {}
    return {"num_warps": 1 if batch_block <= SMALL_BATCH_BLOCK else NUM_WARPS, **pdl_options(pdl)}


def project_qkvg(x, norm_weight, eps, wq, wk, wv, wg, bq, bk, bv, bg, q_norm_weight, k_norm_weight, qk_eps,
                 positions, inv_freq, rope_scale, num_heads: int, num_kv_heads: int):
    """x [B, K] -> q [B, 1, Hq, d], k, v [B, 1, Hk, d] (x's dtype), log_g [B, 1, Hk] fp32 (empty without
    wg). bq/bk/bv: the attention biases or None; q/k_norm_weight: per-head RMSNorm or None; RoPE:
    positions [B] or [1] (integers, contiguous), inv_freq [d/2] and its scale (rope_tables), or
    positions None for none."""
    bsz, kdim = x.shape
    d = wq.shape[0] // num_heads
    half = d // 2
    bb, bk_ = _batch_block(bsz), _k_block(kdim)
    limit = max(1, PRODUCT_ELEMENTS // (2 * bb * bk_))
    qk_norm = q_norm_weight is not None
    bp = half if qk_norm else min(half, _row_block((num_heads + 2 * num_kv_heads) * half, limit))
    q = x.new_empty(bsz, 1, num_heads, d)
    k = x.new_empty(bsz, 1, num_kv_heads, d)
    v = x.new_empty(bsz, 1, num_kv_heads, d)
    log_g = x.new_empty(bsz, 1, num_kv_heads if wg is not None else 0, dtype=torch.float32)
    gate_programs = -(-num_kv_heads // (2 * bp)) if wg is not None else 0
    pdl = dependent_launch(x.device)
    grid = ((num_heads + 2 * num_kv_heads) * (half // bp) + gate_programs, -(-bsz // bb))
    dummy = wq
    _qkvg_kernel[grid](
        x, norm_weight, wq, wk, wv, wg if wg is not None else dummy,
        bq if bq is not None else dummy, bk if bk is not None else dummy, bv if bv is not None else dummy,
        bg if bg is not None else dummy, q_norm_weight if qk_norm else dummy, k_norm_weight if qk_norm else dummy,
        positions if positions is not None else dummy, inv_freq if positions is not None else dummy, q, k, v, log_g,
        bsz, num_heads, num_kv_heads, 1 if positions is not None and positions.shape[0] > 1 else 0,
        float(eps), float(qk_eps), float(rope_scale),
        KDIM=kdim, HEAD_DIM=d, BP=bp, BB=bb, BK=bk_, HAS_BIAS=bq is not None, HAS_GATE=wg is not None, QK_NORM=qk_norm,
        HAS_ROPE=positions is not None, PDL=pdl, **_launch_options(bb, pdl),
    )
    return q, k, v, log_g


def linear(x, norm_weight, eps, w, bias, w2, bias2, residual):
    """(residual +) f(x' w^T (+ bias)) [B, N] in x's dtype: x [B, K] (rows may be strided), x' its
    RMSNorm with weight norm_weight when given, f silu(.) * (x' w2^T (+ bias2)) when w2 is given."""
    bsz, kdim = x.shape
    n = w.shape[0]
    gated = w2 is not None
    bb, bk_ = _batch_block(bsz), _k_block(kdim)
    bn = _row_block(n, max(1, PRODUCT_ELEMENTS // ((2 if gated else 1) * bb * bk_)))
    out = x.new_empty(bsz, n)
    pdl = dependent_launch(x.device)
    _linear_kernel[(triton.cdiv(n, bn), triton.cdiv(bsz, bb))](
        x, x.stride(0), norm_weight if norm_weight is not None else w, w, bias if bias is not None else w,
        w2 if gated else w, bias2 if bias2 is not None else w, residual if residual is not None else x, out,
        bsz, n, float(eps),
        K=kdim, NORM=norm_weight is not None, GATED=gated, HAS_BIAS=bias is not None,
        HAS_BIAS2=gated and bias2 is not None, RESIDUAL=residual is not None, BB=bb, BN=bn, BK=bk_, PDL=pdl,
        **_launch_options(bb, pdl),
    )
    return out
