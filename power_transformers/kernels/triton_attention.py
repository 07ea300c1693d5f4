"""Power attention (degree 2) in its attention form, in Triton: flash-attention-style kernels.

No recurrent state: every query meets every earlier key directly, O(T^2 d) work and O(T d)
memory. On short sequences (T up to a few thousand) in training this costs less than the
chunked form (triton_chunk), whose state passes carry a [D, d] state per chunk.

Shapes (all inputs contiguous, one dtype among fp16 / bf16 / fp32):

    q          [B, T, Hq, d]    query heads, Hq = G * Hk (query head hq uses kv head hq // G)
    k, v       [B, T, Hk, d]
    log_g      [B, T, Hk]       log-gates (<= 0), or None (no gating)
    y          [B, T, Hq, d]    output, dtype of v
    den        [B, T, Hq]       fp32 denominator sum_j A_tj, kept for the backward

With b_t = sum_{u <= t} log_g_u (per batch row and kv head; 0 without gating) and s the scale:

    A_tj  = (s q_t . k_j)^2 exp(b_t - b_j)      (j <= t; 0 above the diagonal)
    y_t   = sum_j A_tj v_j / (sum_j A_tj + eps)

Scores are >= 0 and decays <= 1, so unlike softmax attention no running maximum is needed:
num and den are plain fp32 sums over key blocks.

Kernels (a program owns one block of rows, the "outer" block, and walks blocks of the other
side, the "inner" blocks; only the tiles crossing the diagonal are masked):

    _attn_fwd_kernel     grid (cdiv(T, BLOCK_M), B Hq): a query block, the key blocks up to
                         the diagonal; writes y and den.
    _attn_bwd_q_kernel   grid (cdiv(T, BLOCK_M), B Hq): a query block, the key blocks up to the
                         diagonal; writes dq and dL/db_t from the query side.
    _attn_bwd_kv_kernel  grid (cdiv(T, BLOCK_N), B Hk): a key block, its G query heads and the
                         query blocks from the diagonal on; writes dk, dv and dL/db_j from the
                         key side. Its tiles hold the keys on their rows.
    _gate_sums_kernel    grid (B Hk,): the running sums of the log-gates and each token's decay
                         within its inner block (below), before the other kernels.
    _gate_grad_kernel    grid (B Hk,): dlog_g, the reverse running sum of both sides' dL/db.

Backward (as in triton_chunk): do_t = dy_t / (den_t + eps), delta_t = -do_t . y_t,
dA_tj = do_t . v_j + delta_t; with x_tj = (s q_t) . k_j and decay_tj = exp(b_t - b_j),
dx_tj = 2 dA_tj x_tj decay_tj, d(s q_t) = sum_j dx_tj k_j, dk_j = sum_t dx_tj (s q_t) and
dv_j = sum_t A_tj do_t (summed over the group's query heads), dL/db_t += sum_j dA_tj A_tj
(query side), dL/db_j -= sum_t dA_tj A_tj (key side); dlog_g_u = sum_{t >= u} dL/db_t.

The decay:

* Precision. The running sums b are computed in fp64 (_gate_sums_kernel) and stay fp64 in
  memory ([B, Hk, T]). A program takes them relative to one reference point r in fp64 -- b at a
  row of its outer block -- and only then casts to fp32, so b_t - b_j keeps its digits however
  large |b| has grown over a long, strongly gated sequence (a plain fp32 running sum of
  T = 4096 gates of -3 has |b| ~ 1e4, an absolute error ~1e-3 in every difference). A
  relative value is large only where the decay across it is ~0 anyway.
* Cost. A tile wholly below the diagonal has a separable decay,
  exp(b_t - b_j) = exp(b_t - r) exp(r - b_j), with both exponents <= 0 when r is b at a row
  between the two blocks (gates <= 1: b falls with time), so neither factor overflows and a
  factor underflows only where the whole decay does. The factor that is the same for every
  tile of a program (its outer block's) is applied once, after the walk. The inner block's
  factor splits once more, at the inner block's edge row e: exp(r - b_j) = exp(r - b_e)
  exp(b_e - b_j) (keys; for queries exp(b_t - b_e) exp(b_e - r)), the second precomputed per
  token in fp32 with the sums (_gate_sums_kernel), both <= 1 again. An off-diagonal tile then
  takes one fp64 difference and one exp, and reads one fp32 number per inner row; only the
  diagonal tiles exponentiate differences. H100, 64k tokens (B 64, T 1024 / B 16, T 4096), 16
  heads, d 64, bf16, forward + backward: 3.50 / 10.14 ms with the fp64 sums of every inner
  block in the kernels (the forward's registers 225 against 168 ungated, ptxas sm_90), 2.81 /
  7.77 with the factors and the key side's tiles transposed (_bwd_kv_inner), 2.66 / 7.40 with
  the forward and bwd_q capped at 168 registers (_CONFIGS); ungated 2.00 / 5.83 (RESULTS.md,
  attention kernels, run S).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    SUPPORTED_HEAD_DIMS,
    dot_dtype,
    interpreting,
    load_rows,
    load_tile,
    output_grads,
)


# ----------------------------------------------------------------------------------
# Tile math shared by the kernels
# ----------------------------------------------------------------------------------


@triton.jit
def _gate_ref(bsum, t, HAS_GATE: tl.constexpr):
    """The fp64 running sum at token t (< T): the reference point r of a program's gate sums."""
    if HAS_GATE:
        ref = tl.load(bsum + t)
    else:
        ref = 0.0
    return ref


@triton.jit
def _relative_gate_sums(bsum, t0, T, offs, ref, HAS_GATE: tl.constexpr):
    """b - r of tokens t0 + offs ([C] fp32): the fp64 running sums minus the fp64 reference
    point, cast after the subtraction. Rows past T take the last real token's sum, so that every
    decay involving them is still exp(<= 0) (their scores are 0, and 0 * inf would be NaN)."""
    if HAS_GATE:
        b = tl.load(bsum + tl.minimum(t0 + offs, T - 1))
        rel = (b - ref).to(tl.float32)
    else:
        rel = tl.zeros(offs.shape, dtype=tl.float32)
    return rel


@triton.jit
def _decay_factor(rel, HAS_GATE: tl.constexpr):
    """exp(rel) ([C], rel <= 0), or 1 without gating."""
    if HAS_GATE:
        f = tl.exp(rel)
    else:
        f = tl.full(rel.shape, 1.0, tl.float32)
    return f


@triton.jit
def _inner_factor(bsum, within, ref, i0, T, offs, KEY_SIDE: tl.constexpr, HAS_GATE: tl.constexpr):
    """The decay factor of an inner block below the diagonal, for the tokens i0 + offs ([C] fp32,
    1 without gating): with KEY_SIDE (inner key blocks, r = b at the program's first query)
    exp(r - b_j); else (inner query blocks, r = b at the program's last key) exp(b_t - r).

    `within` holds each token's decay to its own inner block's last row (KEY_SIDE) or from its
    first row (_gate_sums_kernel), so the block takes one fp64 difference, at that row, and one
    exp: the fp64 sums of the whole block in the registers of every thread that holds a column
    cost the gated kernels more registers than the scores (ptxas, sm_90: 225 against 168 in the
    forward), and an exp per column. Both factors are <= 1: no overflow, and a factor underflows
    only where the whole decay does."""
    if HAS_GATE:
        if KEY_SIDE:
            edge = tl.load(bsum + tl.minimum(i0 + offs.shape[0], T) - 1)  # the key block's last row
            block = tl.exp((ref - edge).to(tl.float32))
        else:
            block = tl.exp((tl.load(bsum + i0) - ref).to(tl.float32))  # the query block's first row
        f = block * tl.load(within + i0 + offs, mask=i0 + offs < T, other=0.0)
    else:
        f = tl.full(offs.shape, 1.0, tl.float32)
    return f


@triton.jit
def _scores(a, b, decay, OP: tl.constexpr):
    """A tile of scores x = a b^T and A = x^2 decay ([R, C]): a [R, d] already times s (queries
    on the rows) or the keys (keys on the rows), b [C, d] the other side; decay [R, C] or a
    broadcastable factor."""
    x = tl.dot(a.to(OP), tl.trans(b.to(OP)))
    return x, x * x * decay


@triton.jit
def _score_grads(x, decay, a, b, delta, OP: tl.constexpr):
    """w = dA x decay of a tile of _scores(., ., decay): dA = a b^T + delta is dL/dA (a, b: do and
    v, queries on the rows, or v and do, keys on the rows; delta broadcast along the queries).
    dL/dx = 2 w, and dA A = w x is a token's share of dL/db: computing both from w keeps A itself
    out of the registers."""
    da = tl.dot(a.to(OP), tl.trans(b.to(OP))) + delta
    return da * x * decay


@triton.jit
def _diagonal_decay(b_q, b_k, t_q, t_k, HAS_GATE: tl.constexpr):
    """exp(b_t - b_j) of a tile crossing the diagonal, 0 above it: b_q, t_q the queries' gate sums
    (relative to the program's r) and token indices, b_k, t_k the keys', each already shaped to
    broadcast against the other ([R, 1] and [1, C] either way round)."""
    causal = t_q >= t_k
    if HAS_GATE:
        decay = tl.exp(tl.where(causal, b_q - b_k, float("-inf")))
    else:
        decay = tl.where(causal, 1.0, 0.0)
    return decay


# ----------------------------------------------------------------------------------
# Forward and the query side of the backward: a block of queries walks the key blocks
# ----------------------------------------------------------------------------------


@triton.jit
def _key_block(q, bq, tq, k_base, v_base, bsum, within, ref, j0, T, HK, offs_n, offs_d, HEAD_DIM: tl.constexpr,
               DIAGONAL: tl.constexpr, HAS_GATE: tl.constexpr, OP: tl.constexpr):
    """The key block at j0 of a query block's walk: k, v [BLOCK_N, d] as stored, and the scores'
    x, decay and A [BLOCK_M, BLOCK_N]. With DIAGONAL the block meets the query block's own rows and
    the decay is whole, masked above the diagonal; below it the decay is the key factor exp(r - b_j)
    [1, BLOCK_N] alone: the caller multiplies the query factor exp(b_t - r) in after the walk (all
    it sums is linear in it)."""
    k = load_tile(k_base, j0, T, HK * HEAD_DIM, offs_n, offs_d)
    v = load_tile(v_base, j0, T, HK * HEAD_DIM, offs_n, offs_d)
    if DIAGONAL:
        bk = _relative_gate_sums(bsum, j0, T, offs_n, ref, HAS_GATE)
        decay = _diagonal_decay(bq[:, None], bk[None, :], tq[:, None], (j0 + offs_n)[None, :], HAS_GATE)
    else:
        decay = _inner_factor(bsum, within, ref, j0, T, offs_n, True, HAS_GATE)[None, :]
    x, a = _scores(q, k, decay, OP)
    return k, v, x, decay, a


@triton.jit
def _fwd_inner(num, den, q, bq, tq, k_base, v_base, bsum, within, ref, lo, hi, T, HK,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr,
               HAS_GATE: tl.constexpr, OP: tl.constexpr):
    """num += A v, den += A 1 over the key blocks starting at lo, lo + BLOCK_N, ... < hi."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for j0 in range(lo, hi, BLOCK_N):
        k_unused, v, x_unused, decay_unused, a = _key_block(q, bq, tq, k_base, v_base, bsum, within, ref, j0, T, HK,
                                                            offs_n, offs_d, HEAD_DIM, DIAGONAL, HAS_GATE, OP)
        num += tl.dot(a.to(OP), v.to(OP))
        den += tl.sum(a, axis=1)
    return num, den


@triton.jit
def _query_block(Q, BSUM, T, HQ, HK, scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 HAS_GATE: tl.constexpr, OP: tl.constexpr):
    """What a program over one block of BLOCK_M queries of one query head starts from: its first
    row t0, batch row b, query head hq and kv head h, the offsets (offs_m, offs_d, tq = t0 +
    offs_m), the q and k/v base offsets, the (batch row, kv head)'s offset into [B, Hk, T], s q
    [M, d] in the operand dtype, the reference point r = b at its first row and its queries' b_t - r."""
    t0 = tl.program_id(0) * BLOCK_M
    bhq = tl.program_id(1)
    b = bhq // HQ
    hq = bhq % HQ
    h = hq // (HQ // HK)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_off = (b * T * HQ + hq).to(tl.int64) * HEAD_DIM
    kv_off = (b * T * HK + h).to(tl.int64) * HEAD_DIM
    gate_off = (b * HK + h).to(tl.int64) * T
    q = (load_rows(Q + q_off, t0, T, HQ * HEAD_DIM, offs_m, offs_d) * scale).to(OP)
    ref = _gate_ref(BSUM + gate_off, t0, HAS_GATE)
    bq = _relative_gate_sums(BSUM + gate_off, t0, T, offs_m, ref, HAS_GATE)
    return t0, b, hq, h, offs_m, offs_d, t0 + offs_m, q_off, kv_off, gate_off, q, ref, bq


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, BSUM, WITHIN, Y, DEN,
    T, HQ, HK, scale, eps,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_GATE: tl.constexpr, OP: tl.constexpr,
):
    """y and den of one block of BLOCK_M queries of one query head (BLOCK_M a multiple of BLOCK_N).
    WITHIN: each key's decay to the last row of its BLOCK_N block (_gate_sums_kernel)."""
    t0, b, hq, h, offs_m, offs_d, tq, q_off, kv_off, gate_off, q, ref, bq = _query_block(
        Q, BSUM, T, HQ, HK, scale, HEAD_DIM, BLOCK_M, HAS_GATE, OP)
    bsum, within = BSUM + gate_off, WITHIN + gate_off

    num = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # the keys before the query block (below the diagonal), then their query factor exp(b_t - r)
    num, den = _fwd_inner(num, den, q, bq, tq, K + kv_off, V + kv_off, bsum, within, ref, 0, t0, T, HK,
                          HEAD_DIM, BLOCK_N, False, HAS_GATE, OP)
    qf = _decay_factor(bq, HAS_GATE)
    num = num * qf[:, None]
    den = den * qf
    # the keys of the query block's own rows: the diagonal
    num, den = _fwd_inner(num, den, q, bq, tq, K + kv_off, V + kv_off, bsum, within, ref, t0,
                          tl.minimum(t0 + BLOCK_M, T), T, HK, HEAD_DIM, BLOCK_N, True, HAS_GATE, OP)
    y = num / (den + eps)[:, None]

    t_ok = tq < T
    tl.store(Y + q_off + tq[:, None] * (HQ * HEAD_DIM) + offs_d[None, :], y, mask=t_ok[:, None])
    tl.store(DEN + (b * T * HQ + hq).to(tl.int64) + tq * HQ, den, mask=t_ok)


@triton.jit
def _bwd_q_inner(dqs, db, q, do, delta, bq, tq, k_base, v_base, bsum, within, ref, lo, hi, T, HK,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr,
                 HAS_GATE: tl.constexpr, OP: tl.constexpr):
    """dqs += dx k (the gradient with respect to s q), db += sum_j dA A over the key blocks in [lo, hi):
    dA = do v^T + delta, dx = 2 dA x decay."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for j0 in range(lo, hi, BLOCK_N):
        k, v, x, decay, a_unused = _key_block(q, bq, tq, k_base, v_base, bsum, within, ref, j0, T, HK, offs_n,
                                              offs_d, HEAD_DIM, DIAGONAL, HAS_GATE, OP)
        w = _score_grads(x, decay, do, v, delta[:, None], OP)
        db += tl.sum(w * x, axis=1)
        dqs += tl.dot((2.0 * w).to(OP), k.to(OP))
    return dqs, db


@triton.jit
def _attn_bwd_q_kernel(
    Q, K, V, BSUM, WITHIN, DO, DELTA, DQ, DBQ,
    T, HQ, HK, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_GATE: tl.constexpr, OP: tl.constexpr,
):
    """dq of one block of BLOCK_M queries of one query head, and dL/db_t from the query side
    (DBQ [B, Hq, T] fp32). BLOCK_M a multiple of BLOCK_N; WITHIN as for _attn_fwd_kernel."""
    t0, b, hq, h, offs_m, offs_d, tq, q_off, kv_off, gate_off, q, ref, bq = _query_block(
        Q, BSUM, T, HQ, HK, scale, HEAD_DIM, BLOCK_M, HAS_GATE, OP)
    bsum, within = BSUM + gate_off, WITHIN + gate_off
    do = load_tile(DO + q_off, t0, T, HQ * HEAD_DIM, offs_m, offs_d)
    delta = tl.load(DELTA + (b * T * HQ + hq).to(tl.int64) + tq * HQ, mask=tq < T, other=0.0)

    dqs = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # the keys before the query block, then their query factor exp(b_t - r) (both sums are linear in it)
    dqs, db = _bwd_q_inner(dqs, db, q, do, delta, bq, tq, K + kv_off, V + kv_off, bsum, within, ref, 0, t0, T, HK,
                           HEAD_DIM, BLOCK_N, False, HAS_GATE, OP)
    qf = _decay_factor(bq, HAS_GATE)
    dqs = dqs * qf[:, None]
    db = db * qf
    # the diagonal
    dqs, db = _bwd_q_inner(dqs, db, q, do, delta, bq, tq, K + kv_off, V + kv_off, bsum, within, ref,
                           t0, tl.minimum(t0 + BLOCK_M, T), T, HK, HEAD_DIM, BLOCK_N, True, HAS_GATE, OP)

    t_ok = tq < T
    tl.store(DQ + q_off + tq[:, None] * (HQ * HEAD_DIM) + offs_d[None, :], dqs * scale, mask=t_ok[:, None])
    if HAS_GATE:
        tl.store(DBQ + (b * HQ + hq).to(tl.int64) * T + tq, db, mask=t_ok)


# ----------------------------------------------------------------------------------
# The key side of the backward: a block of keys walks the query blocks, keys on the tiles' rows
# ----------------------------------------------------------------------------------


@triton.jit
def _bwd_kv_inner(dk, dv, db, k, v, bk, tk, q_base, do_base, delta_base, bsum, within, ref, lo, hi, T, HQ, scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DIAGONAL: tl.constexpr,
                  HAS_GATE: tl.constexpr, OP: tl.constexpr):
    """dk += dx^T (s q), dv += A^T do, db -= sum_t dA A over the query blocks of one query head
    starting at lo, lo + BLOCK_M, ... < hi. The tiles are transposed, [BLOCK_N keys, BLOCK_M
    queries]: A^T and dx^T are then the products' first operands as they come out of the score
    product (in registers), and the sums over queries run along rows, within a warp (a sum down
    the columns of a [queries, keys] tile crossed the warps through shared memory every tile, and
    was most of what made this kernel spill, ptxas sm_90)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for t0 in range(lo, hi, BLOCK_M):
        tq = t0 + offs_m
        q = (load_rows(q_base, t0, T, HQ * HEAD_DIM, offs_m, offs_d) * scale).to(OP)
        do = load_tile(do_base, t0, T, HQ * HEAD_DIM, offs_m, offs_d)
        delta = tl.load(delta_base + tq * HQ, mask=tq < T, other=0.0)
        if DIAGONAL:
            bq = _relative_gate_sums(bsum, t0, T, offs_m, ref, HAS_GATE)
            decay = _diagonal_decay(bq[None, :], bk[:, None], tq[None, :], tk[:, None], HAS_GATE)
        else:  # the query factor exp(b_t - r); the key factor comes after the walk
            decay = _inner_factor(bsum, within, ref, t0, T, offs_m, False, HAS_GATE)[None, :]
        x, a = _scores(k, q, decay, OP)  # [BLOCK_N, BLOCK_M]
        dv += tl.dot(a.to(OP), do.to(OP))
        w = _score_grads(x, decay, v, do, delta[None, :], OP)
        db -= tl.sum(w * x, axis=1)
        dk += tl.dot((2.0 * w).to(OP), q)
    return dk, dv, db


@triton.jit
def _attn_bwd_kv_kernel(
    Q, K, V, BSUM, WITHIN, DO, DELTA, DK, DV, DBK,
    T, HQ, HK, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_GATE: tl.constexpr, OP: tl.constexpr,
):
    """dk, dv of one block of BLOCK_N keys of one kv head (over its G query heads), and dL/db_j
    from the key side (DBK [B, Hk, T] fp32). BLOCK_N a multiple of BLOCK_M. WITHIN: each query's
    decay from the first row of its BLOCK_M block (_gate_sums_kernel)."""
    j0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    G = HQ // HK
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tk = j0 + offs_n
    j_end = tl.minimum(j0 + BLOCK_N, T)

    kv_off = (b * T * HK + h).to(tl.int64) * HEAD_DIM
    bsum, within = BSUM + bh.to(tl.int64) * T, WITHIN + bh.to(tl.int64) * T
    k = load_tile(K + kv_off, j0, T, HK * HEAD_DIM, offs_n, offs_d).to(OP)
    v = load_tile(V + kv_off, j0, T, HK * HEAD_DIM, offs_n, offs_d).to(OP)
    ref = _gate_ref(bsum, j_end - 1, HAS_GATE)  # r = b at the key block's last row: b_j >= r >= b_t
    bk = _relative_gate_sums(bsum, j0, T, offs_n, ref, HAS_GATE)

    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # the queries after the key block (below the diagonal), every head of the group; then the
    # key factor exp(r - b_j) of their decay (dk, dv, db are linear in it)
    for g in range(G):
        q_off = (b * T * HQ + h * G + g).to(tl.int64) * HEAD_DIM
        dl_base = DELTA + (b * T * HQ + h * G + g).to(tl.int64)
        dk, dv, db = _bwd_kv_inner(dk, dv, db, k, v, bk, tk, Q + q_off, DO + q_off, dl_base, bsum, within, ref,
                                   j0 + BLOCK_N, T, T, HQ, scale, HEAD_DIM, BLOCK_M, False, HAS_GATE, OP)
    kf = _decay_factor(-bk, HAS_GATE)
    dk = dk * kf[:, None]
    dv = dv * kf[:, None]
    db = db * kf
    # the queries of the key block's own rows: the diagonal
    for g in range(G):
        q_off = (b * T * HQ + h * G + g).to(tl.int64) * HEAD_DIM
        dl_base = DELTA + (b * T * HQ + h * G + g).to(tl.int64)
        dk, dv, db = _bwd_kv_inner(dk, dv, db, k, v, bk, tk, Q + q_off, DO + q_off, dl_base, bsum, within, ref,
                                   j0, j_end, T, HQ, scale, HEAD_DIM, BLOCK_M, True, HAS_GATE, OP)

    t_ok = tk < T
    out_off = kv_off + tk[:, None] * (HK * HEAD_DIM) + offs_d[None, :]
    tl.store(DK + out_off, dk, mask=t_ok[:, None])  # dk is already with respect to k: q carried the s
    tl.store(DV + out_off, dv, mask=t_ok[:, None])
    if HAS_GATE:
        tl.store(DBK + bh.to(tl.int64) * T + tk, db, mask=t_ok)


# ----------------------------------------------------------------------------------
# The gate sums
# ----------------------------------------------------------------------------------


@triton.jit
def _block_decays(bs, BLOCK: tl.constexpr, SIZE: tl.constexpr, TO_END: tl.constexpr):
    """[BLOCK] fp32: each token's decay within its block of SIZE tokens, from the running sums bs
    [BLOCK] fp64 (blocks aligned to SIZE): exp(b_end - b_j) to the block's last row (TO_END),
    else exp(b_t - b_start) from its first row."""
    rows = tl.reshape(bs, (BLOCK // SIZE, SIZE))
    edge = tl.arange(0, SIZE) == (SIZE - 1 if TO_END else 0)
    pick = tl.sum(tl.where(edge[None, :], rows, 0.0), axis=1)[:, None]
    rel = pick - rows if TO_END else rows - pick
    return tl.reshape(tl.exp(rel.to(tl.float32)), (BLOCK,))


@triton.jit
def _gate_sums_kernel(LG, BSUM, KEY_WITHIN, QUERY_WITHIN, T, HK,
                      KEY_BLOCK: tl.constexpr, QUERY_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                      HAS_QUERY: tl.constexpr):
    """Grid (B Hk,): the running sums b [B, Hk, T] fp64 of the log-gates LG [B, T, Hk] (fp32),
    each token's decay to the last row of its KEY_BLOCK block (KEY_WITHIN, fp32 [B, Hk, T]) and,
    with HAS_QUERY, from the first row of its QUERY_BLOCK block (QUERY_WITHIN). Tokens past T
    count as gates of 1, so a ragged last block ends at the last real token's sum."""
    bh = tl.program_id(0)
    b = bh // HK
    h = bh % HK
    offs = tl.arange(0, BLOCK)
    carry = tl.zeros((1,), dtype=tl.float64)
    base = bh.to(tl.int64) * T
    for t0 in range(0, T, BLOCK):
        t = t0 + offs
        ok = t < T
        g = tl.load(LG + (b * T + t).to(tl.int64) * HK + h, mask=ok, other=0.0).to(tl.float64)
        bs = carry + tl.cumsum(g, axis=0)
        carry += tl.sum(g, axis=0)
        tl.store(BSUM + base + t, bs, mask=ok)
        tl.store(KEY_WITHIN + base + t, _block_decays(bs, BLOCK, KEY_BLOCK, True), mask=ok)
        if HAS_QUERY:
            tl.store(QUERY_WITHIN + base + t, _block_decays(bs, BLOCK, QUERY_BLOCK, False), mask=ok)


@triton.jit
def _gate_grad_kernel(DBQ, DBK, DLG, T, HQ, HK, BLOCK: tl.constexpr):
    """Grid (B Hk,): dlog_g [B, T, Hk] fp32 from dL/db [B, Hq, T] of the query side (DBQ, summed over
    the kv head's group) and [B, Hk, T] of the key side (DBK): dL/dg_u = sum_{t >= u} dL/db_t, a
    reverse running sum in fp64, walked from the sequence's end. The two sides cancel in the total
    (it is 0 in exact arithmetic), so each sum is a small difference of large terms."""
    bh = tl.program_id(0)
    b = bh // HK
    h = bh % HK
    G = HQ // HK
    offs = tl.arange(0, BLOCK)
    carry = tl.zeros((1,), dtype=tl.float64)  # the sum over the tokens after this block
    for i in range(tl.cdiv(T, BLOCK)):
        t = (tl.cdiv(T, BLOCK) - 1 - i) * BLOCK + offs
        ok = t < T
        db = tl.load(DBK + bh.to(tl.int64) * T + t, mask=ok, other=0.0).to(tl.float64)
        for g in range(G):
            db += tl.load(DBQ + (b * HQ + h * G + g).to(tl.int64) * T + t, mask=ok, other=0.0).to(tl.float64)
        tl.store(DLG + (b * T + t).to(tl.int64) * HK + h, (carry + tl.cumsum(db, axis=0, reverse=True)).to(tl.float32),
                 mask=ok)
        carry += tl.sum(db, axis=0)


# ----------------------------------------------------------------------------------
# Launchers (plain functions of tensors)
# ----------------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, registers]) per kernel, by the bytes of a tile row:
# measured on the H100 (B 4, T 2048, 16 heads, gated; triton 3.6), the fastest of 8 or 9
# candidates each. "narrow": 2-byte operands and d <= 64; "wide": 2-byte operands at d = 128, or
# fp32 at d <= 64 (as many bytes per row); "fp32_128": fp32 (tf32) at d = 128, where 64 x 64 tiles
# with 3 stages no longer fit in shared memory. A fifth number caps a thread's registers (ptxas
# maxnreg): at 168, three programs of 4 warps share an SM. The gated forward takes 173 uncapped
# (ptxas, sm_90), so two did, and 167 capped, without spills (bwd_q spills 8 bytes): H100, B 64,
# T 1024 / B 16, T 4096, forward 0.651 -> 0.539 / 1.843 -> 1.528 ms, bwd_q 0.722 -> 0.693 / 2.127
# -> 2.093. No other block, warp or stage setting tried was faster at both lengths (bwd_q at 2
# stages and the cap: 0.679 / 2.103, within the spread); at d = 128 ("wide") the settings above were
# re-measured after these kernels changed and stay (RESULTS.md, attention kernels, run S, calls 3 and 9).
_CONFIGS = {
    "narrow": {"fwd": (64, 64, 4, 3, 168), "bwd_q": (64, 64, 4, 3, 168), "bwd_kv": (64, 64, 4, 3)},
    "wide": {"fwd": (64, 64, 4, 3), "bwd_q": (64, 32, 4, 4), "bwd_kv": (32, 64, 4, 3)},
    "fp32_128": {"fwd": (128, 32, 8, 3), "bwd_q": (128, 32, 8, 3), "bwd_kv": (16, 128, 8, 3)},
}


def _config(kernel: str, head_dim: int, dtype: torch.dtype) -> tuple[int, int, dict]:
    """(BLOCK_M, BLOCK_N, launch options) of `kernel`: "fwd", "bwd_q" or "bwd_kv".

    BLOCK_M counts queries, BLOCK_N keys; the outer (per-program) block must be a multiple of
    the inner (walked) one: BLOCK_M of BLOCK_N for "fwd" and "bwd_q", BLOCK_N of BLOCK_M for
    "bwd_kv". Under the interpreter small blocks keep the tests fast (its cost is per element).
    """
    if interpreting():
        return 16, 16, {}
    row_bytes = head_dim * (4 if dtype == torch.float32 else 2)
    kind = "narrow" if row_bytes <= 128 else ("wide" if row_bytes <= 256 else "fp32_128")
    block_m, block_n, warps, stages, *registers = _CONFIGS[kind][kernel]
    options = {"num_warps": warps, "num_stages": stages}
    if registers:
        options["maxnreg"] = registers[0]
    return block_m, block_n, options


def _check(q, k, v, log_g) -> None:
    bsz, t, hq, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head size {d} is not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if k.shape != (bsz, t, k.shape[2], d) or v.shape != k.shape or hq % k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if log_g is not None and log_g.shape != k.shape[:3]:
        raise ValueError(f"log_g must be {tuple(k.shape[:3])}, got {tuple(log_g.shape)}")
    if not all(x.is_contiguous() for x in (q, k, v) + ((log_g,) if log_g is not None else ())):
        raise ValueError("q, k, v and log_g must be contiguous")


#: Tokens a program of _gate_sums_kernel and _gate_grad_kernel takes per step of its walk (for the
#: first, a multiple of every block)
GATE_SUMS_BLOCK = 256


def _gate_sums(log_g, key_block: int, query_block: int | None = None):
    """(b, key_within, query_within) for the kernels, or Nones without gating: the running sums b
    [B, Hk, T] fp64 of the log-gates [B, T, Hk], each token's decay to the last row of its
    key_block block and (query_block not None) from the first row of its query_block block, fp32
    [B, Hk, T] (_gate_sums_kernel, one launch). H100, B Hk = 1024, T = 1024, a forward + backward:
    the torch operations this kernel and _gate_grad_kernel replaced (a cast, a copy and an fp64 scan
    in each pass, and dlog_g's sums) took about 0.20 ms, the two kernels 0.043 (RESULTS.md, attention
    kernels, run S, calls 1 and 4)."""
    if log_g is None:
        return None, None, None
    bsz, t, hk = log_g.shape
    bsum = torch.empty(bsz, hk, t, dtype=torch.float64, device=log_g.device)
    key_within = torch.empty(bsz, hk, t, dtype=torch.float32, device=log_g.device)
    query_within = torch.empty_like(key_within) if query_block is not None else key_within
    block = max(GATE_SUMS_BLOCK, key_block, query_block or 1)
    if bsz * hk and t:
        _gate_sums_kernel[(bsz * hk,)](
            log_g.float(), bsum, key_within, query_within, t, hk,
            KEY_BLOCK=key_block, QUERY_BLOCK=query_block or key_block, BLOCK=block, HAS_QUERY=query_block is not None,
        )
    return bsum, key_within, query_within if query_block is not None else None


def _gate_grad(dbq, dbk):
    """dlog_g [B, T, Hk] fp32 from dL/db of the query side [B, Hq, T] and of the key side [B, Hk, T]
    (fp32, contiguous): b_t = sum_{u <= t} g_u, so dL/dg_u = sum_{t >= u} dL/db_t (_gate_grad_kernel)."""
    bsz, hk, t = dbk.shape
    dlog_g = torch.empty(bsz, t, hk, dtype=torch.float32, device=dbk.device)
    if bsz * hk and t:
        _gate_grad_kernel[(bsz * hk,)](dbq, dbk, dlog_g, t, dbq.shape[1], hk, BLOCK=GATE_SUMS_BLOCK)
    return dlog_g


def attention_forward(q, k, v, log_g, scale: float, eps: float):
    """Forward: (y [B, T, Hq, d] in the dtype of v, den [B, T, Hq] fp32 = sum_j A_tj, without eps).

    q [B, T, Hq, d], k and v [B, T, Hk, d], log_g [B, T, Hk] (<= 0) or None; all contiguous.
    """
    _check(q, k, v, log_g)
    bsz, t, hq, d = q.shape
    hk = k.shape[2]
    y = torch.empty(bsz, t, hq, d, dtype=v.dtype, device=q.device)
    den = torch.empty(bsz, t, hq, dtype=torch.float32, device=q.device)
    if t == 0 or bsz * hq == 0:
        return y, den
    block_m, block_n, opts = _config("fwd", d, q.dtype)
    assert block_m % block_n == 0
    bsum, within, _ = _gate_sums(log_g, block_n)
    _attn_fwd_kernel[(triton.cdiv(t, block_m), bsz * hq)](
        q, k, v, bsum if bsum is not None else k, within if within is not None else k, y, den,
        t, hq, hk, scale, eps,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_GATE=log_g is not None, OP=dot_dtype(q.dtype), **opts,
    )
    return y, den


def attention_backward(q, k, v, log_g, y, den, dy, scale: float, eps: float):
    """Backward: (dq, dk, dv in the dtypes of q, k, v; dlog_g [B, T, Hk] fp32, or None without gating).

    y [B, T, Hq, d] and den [B, T, Hq] are attention_forward's outputs, dy [B, T, Hq, d] the
    gradient of the loss with respect to y (any memory layout).
    """
    _check(q, k, v, log_g)
    bsz, t, hq, d = q.shape
    hk = k.shape[2]
    op = dot_dtype(q.dtype)
    gated = log_g is not None
    if t == 0 or bsz * hq == 0:
        dlog_g = torch.zeros(log_g.shape, dtype=torch.float32, device=q.device) if gated else None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dlog_g

    do, delta = output_grads(dy, y, den, eps, op)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbq = torch.empty(bsz, hq, t, dtype=torch.float32, device=q.device) if gated else den
    dbk = torch.empty(bsz, hk, t, dtype=torch.float32, device=q.device) if gated else den

    q_block_m, q_block_n, q_opts = _config("bwd_q", d, q.dtype)
    kv_block_m, kv_block_n, kv_opts = _config("bwd_kv", d, q.dtype)
    assert q_block_m % q_block_n == 0 and kv_block_n % kv_block_m == 0
    # bwd_q walks key blocks of q_block_n, bwd_kv query blocks of kv_block_m
    bsum, key_within, query_within = _gate_sums(log_g, q_block_n, kv_block_m)
    if not gated:
        bsum = key_within = query_within = k
    _attn_bwd_q_kernel[(triton.cdiv(t, q_block_m), bsz * hq)](
        q, k, v, bsum, key_within, do, delta, dq, dbq, t, hq, hk, scale,
        HEAD_DIM=d, BLOCK_M=q_block_m, BLOCK_N=q_block_n, HAS_GATE=gated, OP=op, **q_opts,
    )
    _attn_bwd_kv_kernel[(triton.cdiv(t, kv_block_n), bsz * hk)](
        q, k, v, bsum, query_within, do, delta, dk, dv, dbk, t, hq, hk, scale,
        HEAD_DIM=d, BLOCK_M=kv_block_m, BLOCK_N=kv_block_n, HAS_GATE=gated, OP=op, **kv_opts,
    )

    return dq, dk, dv, _gate_grad(dbq, dbk) if gated else None
