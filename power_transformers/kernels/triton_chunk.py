"""Chunked power attention (degree 2) in Triton: forward, prefill state and backward.

Shapes (all inputs contiguous):

    q              [B, T, Hq, d]    query heads, Hq = G * Hk (GQA groups of G)
    k, v           [B, T, Hk, d]
    log_g          [B, T, Hk]       log-gates, or None
    states         [B, Hk, N + 1, D, d] in the dtype of the products (bf16 for bf16 inputs),
    z_states       [B, Hk, N + 1, D] fp32: the state before chunk n (n = N: after the last
                   token); N = ceil(T / C). The final state is returned in fp32.
    y              [B, T, Hq, d]    output, dtype of v
    den            [B, T, Hq]       fp32 denominator sum_j A_ij (+ the state's), kept for backward

Each chunk of C tokens, per head, with b_t the chunk-local running sum of the log-gates
and beta the chunk total:

    A_tj   = (s q_t . k_j)^2 exp(b_t - b_j)                (j <= t, same chunk)
    num_t  = sum_j A_tj v_j + e^{b_t} phi(s q_t)^T S_n
    den_t  = sum_j A_tj     + e^{b_t} phi(s q_t)^T z_n,    y_t = num_t / (den_t + eps)
    S_{n+1} = e^{beta} S_n + sum_j e^{beta - b_j} phi(k_j) v_j^T   (z likewise with v = 1)

Kernels (phi(q), phi(k) built row-block by row-block on chip, never stored; see triton_common):

    _chunk_outer_kernel grid (d / RB, N, B Hk): every chunk's own share of the state
                        (RB row-blocks, [RB d, d], per program), all chunks in parallel.
    _state_scan_kernel  grid (D / BLOCK_R, B Hk): chains the shares into the chunk-start states
                        in place (memory-bound, one read and one write per state).
    _chunk_fwd_kernel   grid (N, B Hq): chunk-local attention + state query (CRB row-blocks
                        per step) + normalisation, y written once.
    (backward)          the same two kernels over queries and dO give dL/dS_n, scanned in reverse.
    _chunk_bwd_q_kernel grid (N, B Hq): dq and the query part of the gate gradient.
    _chunk_bwd_kv_kernel grid (N, B Hk): dk, dv and the key part of the gate gradient.

Backward (y = num / (den + eps)): with do_t = dy_t / (den_t + eps) and delta_t = -do_t . y_t,
num and den are an unnormalised power attention over values [v, 1] with output gradient
[do, delta]; dA_tj = do_t . v_j + delta_t. Gate gradients are taken with respect to b
(and beta, which enters at the chunk's last position) and turned into log_g gradients by a
reverse running sum inside each chunk.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .triton_common import (
    chunk_gates,
    dot_dtype,
    gate_sums,
    interpreting,
    load_gates,
    load_rows,
    load_tile,
    multi_block_rows,
    phi_multi_rows,
    phi_multi_rows_grad,
)
from .reference import expanded_dim


# ----------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------


@triton.jit
def _chunk_outer_kernel(
    X, Y, ZW, LG, OUT, ZOUT,
    T, NUM_CHUNKS, HX, HK, SLOT, w_scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, RB: tl.constexpr, G: tl.constexpr,
    HAS_GATE: tl.constexpr, TO_END: tl.constexpr, HAS_ZW: tl.constexpr, OP: tl.constexpr,
):
    """One chunk's own share of a state, every chunk at once (no recurrence here):

        OUT[n + SLOT]  = sum_{g < G} sum_{t in chunk n} w_t phi(x_t) y_t^T     (RB row-blocks, all d columns)
        ZOUT[n + SLOT] = sum_{g < G} sum_{t in chunk n} w_t phi(x_t) zw_t      (zw = 1 without ZW)

    x, y [B, T, HX, d] with HX = G Hk (the G heads of a group share the kv head's state);
    w_t = e^{beta - b_t} (TO_END: the keys' decay to the chunk end, exponent <= 0) or e^{b_t}
    (the queries' decay from the chunk start), times w_scale (s^2 for phi(s q) = s^2 phi(q)). _state_scan_kernel then chains the chunks.
    """
    i0 = tl.program_id(0) * RB
    n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HK
    h = bh % HK
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = i0 + tl.arange(0, RB)
    rows, row_ok = multi_block_rows(i0, RB, HEAD_DIM)
    t0 = n * CHUNK
    bcum, total = chunk_gates(LG + b.to(tl.int64) * T * HK + h, t0, T, HK, offs_c, HAS_GATE)
    w = (tl.exp(total - bcum) if TO_END else tl.exp(bcum)) * w_scale

    acc = tl.zeros((RB * HEAD_DIM, HEAD_DIM), dtype=tl.float32)
    zacc = tl.zeros((RB * HEAD_DIM,), dtype=tl.float32)
    for g in range(G):
        head = (b * T * HX + h * G + g).to(tl.int64)
        x = load_rows(X + head * HEAD_DIM, t0, T, HX * HEAD_DIM, offs_c, offs_d)
        xcols = load_rows(X + head * HEAD_DIM, t0, T, HX * HEAD_DIM, offs_c, cols)
        y = load_tile(Y + head * HEAD_DIM, t0, T, HX * HEAD_DIM, offs_c, offs_d)
        phi = phi_multi_rows(x, xcols * w[:, None], i0, CHUNK, RB, HEAD_DIM)  # [C, RB d]
        acc += tl.dot(tl.trans(phi.to(OP)), y.to(OP))
        if HAS_ZW:
            zw = tl.load(ZW + head + (t0 + offs_c) * HX, mask=t0 + offs_c < T, other=0.0)
            zacc += tl.sum(phi * zw[:, None], axis=0)
        else:
            zacc += tl.sum(phi, axis=0)

    slot = (bh.to(tl.int64) * (NUM_CHUNKS + 1) + n + SLOT)
    tl.store(OUT + slot * D * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(ZOUT + slot * D + rows, zacc, mask=row_ok)


@triton.jit
def _state_scan_kernel(
    STATES, ZSTATES, BETA, S0, Z0, SF, ZF,
    NUM_CHUNKS, HK,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
    REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """Chain the chunks' own shares into the states, in place, for BLOCK_R rows of one head.

    Forward (slot n + 1 holds chunk n's share):  S_0 = S0 (or 0), S_{n+1} = e^{beta_n} S_n + share_n.
    Reverse (slot n holds chunk n's share):      S_N = S0 (or 0), S_n = e^{beta_n} S_{n+1} + share_n
    (the backward's dL/dS_n). Every slot then holds its state; forward, SF/ZF get S_N in fp32.
    Memory-bound: each slot is read and written once, the next one's load issued first.
    """
    r0 = tl.program_id(0) * BLOCK_R
    bh = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    r_ok = offs_r < D
    s_off = offs_r[:, None] * HEAD_DIM + offs_d[None, :]
    st_base = STATES + bh.to(tl.int64) * (NUM_CHUNKS + 1) * D * HEAD_DIM
    z_base = ZSTATES + bh.to(tl.int64) * (NUM_CHUNKS + 1) * D
    beta_base = BETA + b.to(tl.int64) * NUM_CHUNKS * HK + h

    if HAS_INIT:
        acc = tl.load(S0 + bh.to(tl.int64) * D * HEAD_DIM + s_off, mask=r_ok[:, None], other=0.0).to(tl.float32)
        zacc = tl.load(Z0 + bh.to(tl.int64) * D + offs_r, mask=r_ok, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_R, HEAD_DIM), dtype=tl.float32)
        zacc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    first = NUM_CHUNKS if REVERSE else 0
    tl.store(st_base + first * D * HEAD_DIM + s_off, acc, mask=r_ok[:, None])
    tl.store(z_base + first * D + offs_r, zacc, mask=r_ok)

    slot = NUM_CHUNKS - 1 if REVERSE else 1
    step = -1 if REVERSE else 1
    share = tl.load(st_base + slot * D * HEAD_DIM + s_off, mask=r_ok[:, None], other=0.0)
    zshare = tl.load(z_base + slot * D + offs_r, mask=r_ok, other=0.0)
    for it in range(NUM_CHUNKS):
        n = NUM_CHUNKS - 1 - it if REVERSE else it  # the chunk whose share is in `slot`
        nxt = tl.minimum(tl.maximum(slot + step, 0), NUM_CHUNKS)
        share_next = tl.load(st_base + nxt * D * HEAD_DIM + s_off, mask=r_ok[:, None], other=0.0)
        zshare_next = tl.load(z_base + nxt * D + offs_r, mask=r_ok, other=0.0)
        if HAS_GATE:
            decay = tl.exp(tl.load(beta_base + n * HK))
            acc = acc * decay
            zacc = zacc * decay
        acc += share.to(tl.float32)
        zacc += zshare
        tl.store(st_base + slot * D * HEAD_DIM + s_off, acc, mask=r_ok[:, None])
        tl.store(z_base + slot * D + offs_r, zacc, mask=r_ok)
        share, zshare, slot = share_next, zshare_next, slot + step

    if not REVERSE:
        tl.store(SF + bh.to(tl.int64) * D * HEAD_DIM + s_off, acc, mask=r_ok[:, None])
        tl.store(ZF + bh.to(tl.int64) * D + offs_r, zacc, mask=r_ok)


@triton.jit
def _intra_scores(q, k, bcum, offs_c, OP: tl.constexpr):
    """Chunk-local scores: x = (s q) k^T [C, C], decay exp(b_t - b_j) (0 above the diagonal), A = x^2 decay."""
    x = tl.dot(q.to(OP), tl.trans(k.to(OP)))
    causal = offs_c[:, None] >= offs_c[None, :]
    decay = tl.exp(tl.where(causal, bcum[:, None] - bcum[None, :], float("-inf")))
    return x, decay, x * x * decay


@triton.jit
def _chunk_fwd_kernel(
    Q, K, V, LG, STATES, ZSTATES, Y, DEN,
    T, NUM_CHUNKS, HQ, HK, scale, eps,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, CRB: tl.constexpr,
    HAS_GATE: tl.constexpr, OP: tl.constexpr,
):
    n = tl.program_id(0)
    bhq = tl.program_id(1)
    b = bhq // HQ
    hq = bhq % HQ
    h = hq // (HQ // HK)
    bh = b * HK + h
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    t0 = n * CHUNK

    q_base = Q + (b * T * HQ + hq).to(tl.int64) * HEAD_DIM
    kv_base = (b * T * HK + h).to(tl.int64) * HEAD_DIM
    q = load_rows(q_base, t0, T, HQ * HEAD_DIM, offs_c, offs_d) * scale
    k = load_rows(K + kv_base, t0, T, HK * HEAD_DIM, offs_c, offs_d)
    v = load_rows(V + kv_base, t0, T, HK * HEAD_DIM, offs_c, offs_d)
    bcum, total = chunk_gates(LG + b.to(tl.int64) * T * HK + h, t0, T, HK, offs_c, HAS_GATE)

    x_unused, decay_unused, a = _intra_scores(q, k, bcum, offs_c, OP)
    num = tl.dot(a.to(OP), v.to(OP))
    den = tl.sum(a, axis=1)

    # The state carried from earlier chunks: phi(s q)^T S_n, phi(s q)^T z_n, row-block by row-block.
    st_base = STATES + (bh.to(tl.int64) * (NUM_CHUNKS + 1) + n) * D * HEAD_DIM
    z_base = ZSTATES + (bh.to(tl.int64) * (NUM_CHUNKS + 1) + n) * D
    inter_num = tl.zeros((CHUNK, HEAD_DIM), dtype=tl.float32)
    inter_den = tl.zeros((CHUNK,), dtype=tl.float32)
    for i0 in range(0, HEAD_DIM, CRB):
        rows, row_ok = multi_block_rows(i0, CRB, HEAD_DIM)
        s_blk = tl.load(st_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        z_blk = tl.load(z_base + rows, mask=row_ok, other=0.0)
        qcols = load_rows(q_base, t0, T, HQ * HEAD_DIM, offs_c, i0 + tl.arange(0, CRB)) * scale
        phiq = phi_multi_rows(q, qcols, i0, CHUNK, CRB, HEAD_DIM)  # [C, CRB d]
        inter_num += tl.dot(phiq.to(OP), s_blk.to(OP))
        inter_den += tl.sum(phiq * z_blk[None, :], axis=1)

    qdec = tl.exp(bcum)  # decay from the chunk start to each query (<= 1)
    num += qdec[:, None] * inter_num
    den += qdec * inter_den
    y = num / (den + eps)[:, None]

    t = t0 + offs_c
    t_ok = t < T
    tl.store(Y + (b * T * HQ + hq).to(tl.int64) * HEAD_DIM + t[:, None] * (HQ * HEAD_DIM) + offs_d[None, :],
             y, mask=t_ok[:, None])
    tl.store(DEN + (b * T * HQ + hq).to(tl.int64) + t * HQ, den, mask=t_ok)


# ----------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------


@triton.jit
def _chunk_bwd_q_kernel(
    Q, K, V, LG, STATES, ZSTATES, DO, DELTA, DQ, DBQ,
    T, T_PAD, NUM_CHUNKS, HQ, HK, scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, CRB: tl.constexpr,
    HAS_GATE: tl.constexpr, OP: tl.constexpr,
):
    """dq of chunk n for one query head, and dL/db_t from the query side (DBQ [B, T_PAD, Hq])."""
    n = tl.program_id(0)
    bhq = tl.program_id(1)
    b = bhq // HQ
    hq = bhq % HQ
    h = hq // (HQ // HK)
    bh = b * HK + h
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    t0 = n * CHUNK

    q_base = Q + (b * T * HQ + hq).to(tl.int64) * HEAD_DIM
    do_base = DO + (b * T * HQ + hq).to(tl.int64) * HEAD_DIM
    kv_base = (b * T * HK + h).to(tl.int64) * HEAD_DIM
    q = load_rows(q_base, t0, T, HQ * HEAD_DIM, offs_c, offs_d) * scale
    k = load_rows(K + kv_base, t0, T, HK * HEAD_DIM, offs_c, offs_d)
    v = load_rows(V + kv_base, t0, T, HK * HEAD_DIM, offs_c, offs_d)
    do = load_rows(do_base, t0, T, HQ * HEAD_DIM, offs_c, offs_d)
    delta = tl.load(DELTA + (b * T * HQ + hq).to(tl.int64) + (t0 + offs_c) * HQ, mask=t0 + offs_c < T, other=0.0)
    bcum, total = chunk_gates(LG + b.to(tl.int64) * T * HK + h, t0, T, HK, offs_c, HAS_GATE)

    x, decay, a = _intra_scores(q, k, bcum, offs_c, OP)
    da = tl.dot(do.to(OP), tl.trans(v.to(OP))) + delta[:, None]
    db = tl.sum(da * a, axis=1)
    dx = 2.0 * da * x * decay
    dqs = tl.dot(dx.to(OP), k.to(OP))  # gradient with respect to s q

    st_base = STATES + (bh.to(tl.int64) * (NUM_CHUNKS + 1) + n) * D * HEAD_DIM
    z_base = ZSTATES + (bh.to(tl.int64) * (NUM_CHUNKS + 1) + n) * D
    qdec = tl.exp(bcum)
    for i0 in range(0, HEAD_DIM, CRB):
        rows, row_ok = multi_block_rows(i0, CRB, HEAD_DIM)
        s_blk = tl.load(st_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        z_blk = tl.load(z_base + rows, mask=row_ok, other=0.0)
        qcols = load_rows(q_base, t0, T, HQ * HEAD_DIM, offs_c, i0 + tl.arange(0, CRB)) * scale
        # gradient with respect to e^{b_t} phi(s q_t) on these rows: S do_t + z delta_t
        rg = (tl.dot(do.to(OP), tl.trans(s_blk.to(OP))) + delta[:, None] * z_blk[None, :]) * qdec[:, None]
        db += tl.sum(phi_multi_rows(q, qcols, i0, CHUNK, CRB, HEAD_DIM) * rg, axis=1)
        dqs += phi_multi_rows_grad(q, qcols, rg, i0, CHUNK, CRB, HEAD_DIM)

    t = t0 + offs_c
    tl.store(DQ + (b * T * HQ + hq).to(tl.int64) * HEAD_DIM + t[:, None] * (HQ * HEAD_DIM) + offs_d[None, :],
             dqs * scale, mask=(t < T)[:, None])
    tl.store(DBQ + (b * T_PAD * HQ + hq).to(tl.int64) + t * HQ, db)


@triton.jit
def _chunk_bwd_kv_kernel(
    Q, K, V, LG, STATES, ZSTATES, DSTATES, DZSTATES, DO, DELTA, DK, DV, DBK,
    T, T_PAD, NUM_CHUNKS, HQ, HK, scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, CRB: tl.constexpr,
    HAS_GATE: tl.constexpr, OP: tl.constexpr,
):
    """dk, dv of chunk n for one kv head (its whole query group) and dL/db_j from the key side
    (DBK [B, T_PAD, Hk]; the chunk total's gradient added at the chunk's last position)."""
    n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    G = HQ // HK
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    t0 = n * CHUNK

    kv_base = (b * T * HK + h).to(tl.int64) * HEAD_DIM
    k = load_rows(K + kv_base, t0, T, HK * HEAD_DIM, offs_c, offs_d)
    v = load_rows(V + kv_base, t0, T, HK * HEAD_DIM, offs_c, offs_d)
    bcum, total = chunk_gates(LG + b.to(tl.int64) * T * HK + h, t0, T, HK, offs_c, HAS_GATE)

    dk = tl.zeros((CHUNK, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((CHUNK, HEAD_DIM), dtype=tl.float32)
    db = tl.zeros((CHUNK,), dtype=tl.float32)
    for g in range(G):
        hq = h * G + g
        q = load_rows(Q + (b * T * HQ + hq).to(tl.int64) * HEAD_DIM, t0, T, HQ * HEAD_DIM, offs_c, offs_d) * scale
        do = load_rows(DO + (b * T * HQ + hq).to(tl.int64) * HEAD_DIM, t0, T, HQ * HEAD_DIM, offs_c, offs_d)
        delta = tl.load(DELTA + (b * T * HQ + hq).to(tl.int64) + (t0 + offs_c) * HQ, mask=t0 + offs_c < T, other=0.0)
        x, decay, a = _intra_scores(q, k, bcum, offs_c, OP)
        da = tl.dot(do.to(OP), tl.trans(v.to(OP))) + delta[:, None]
        dv += tl.dot(tl.trans(a.to(OP)), do.to(OP))
        db -= tl.sum(da * a, axis=0)
        dx = 2.0 * da * x * decay
        dk += tl.dot(tl.trans(dx.to(OP)), q.to(OP))

    # The keys' share of the state after the chunk, S_{n+1} = e^beta S_n + sum_j c_j phi(k_j) v_j^T.
    c = tl.exp(total - bcum)
    st_base = STATES + (bh.to(tl.int64) * (NUM_CHUNKS + 1) + n + 1) * D * HEAD_DIM
    z_base = ZSTATES + (bh.to(tl.int64) * (NUM_CHUNKS + 1) + n + 1) * D
    dst_base = DSTATES + (bh.to(tl.int64) * (NUM_CHUNKS + 1) + n + 1) * D * HEAD_DIM
    dz_base = DZSTATES + (bh.to(tl.int64) * (NUM_CHUNKS + 1) + n + 1) * D
    dv_state = tl.zeros((CHUNK, HEAD_DIM), dtype=tl.float32)
    dbeta = tl.sum(tl.zeros((CHUNK,), dtype=tl.float32), axis=0)
    for i0 in range(0, HEAD_DIM, CRB):
        rows, row_ok = multi_block_rows(i0, CRB, HEAD_DIM)
        s_off = rows[:, None] * HEAD_DIM + offs_d[None, :]
        ds_blk = tl.load(dst_base + s_off, mask=row_ok[:, None], other=0.0)
        dz_blk = tl.load(dz_base + rows, mask=row_ok, other=0.0)
        s_blk = tl.load(st_base + s_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
        z_blk = tl.load(z_base + rows, mask=row_ok, other=0.0)
        kcols = load_rows(K + kv_base, t0, T, HK * HEAD_DIM, offs_c, i0 + tl.arange(0, CRB))
        phik = phi_multi_rows(k, kcols, i0, CHUNK, CRB, HEAD_DIM)  # [C, CRB d]
        dv_state += tl.dot(phik.to(OP), ds_blk.to(OP))
        # gradient with respect to c_j phi(k_j) on these rows: dS v_j + dz
        rg = (tl.dot(v.to(OP), tl.trans(ds_blk.to(OP))) + dz_blk[None, :]) * c[:, None]
        db -= tl.sum(phik * rg, axis=1)
        dk += phi_multi_rows_grad(k, kcols, rg, i0, CHUNK, CRB, HEAD_DIM)
        # every term of S_{n+1} carries e^beta (with b_j held fixed): d/dbeta = <dS_{n+1}, S_{n+1}>
        dbeta += tl.sum(tl.sum(ds_blk.to(tl.float32) * s_blk, axis=1), axis=0) + tl.sum(dz_blk * z_blk, axis=0)
    dv += c[:, None] * dv_state
    db += tl.where(offs_c == CHUNK - 1, dbeta, 0.0)

    t = t0 + offs_c
    t_ok = (t < T)[:, None]
    out_off = kv_base + t[:, None] * (HK * HEAD_DIM) + offs_d[None, :]
    tl.store(DK + out_off, dk, mask=t_ok)
    tl.store(DV + out_off, dv, mask=t_ok)
    tl.store(DBK + (b * T_PAD * HK + h).to(tl.int64) + t * HK, db)


# ----------------------------------------------------------------------------------
# Launchers (plain functions of tensors; the custom ops in triton_power wrap them)
# ----------------------------------------------------------------------------------


def kernel_chunk_size(chunk_size: int, head_dim: int) -> int:
    """The chunk the kernels use: `chunk_size` rounded up to a power of two in [16, 128]
    (64 at d = 128, to fit the on-chip tiles). Chunking changes only rounding, not the result."""
    c = 1 << max(4, math.ceil(math.log2(max(1, chunk_size))))
    return min(c, 64 if head_dim > 64 else 128)


def _rows_per_program(head_dim: int) -> int:
    """Row-blocks per program of _chunk_outer_kernel (each extra one saves a re-read of the
    chunk's x and y, and costs registers): 2 up to d = 64, 1 above. POWER_TRITON_STATE_ROWS
    overrides it (for benchmarks)."""
    rb = int(os.environ.get("POWER_TRITON_STATE_ROWS", "2" if head_dim <= 64 else "1"))
    return max(1, min(rb, head_dim))


def _rows_per_chunk_step(head_dim: int) -> int:
    """Row-blocks per step of the chunk kernels' walk over the state (a [C, CRB d] x [CRB d, d]
    product per step). POWER_TRITON_CHUNK_ROWS overrides it (for benchmarks)."""
    crb = int(os.environ.get("POWER_TRITON_CHUNK_ROWS", "1"))
    return max(1, min(crb, head_dim))


def _launch_opts(chunk: int, width: int) -> dict:
    if interpreting():
        return {}
    return {"num_warps": 8 if chunk * width >= 128 * 64 else 4, "num_stages": 2}


def _state_dtype(op) -> torch.dtype:
    """Chunk states are stored in the dtype the matrix products read them in (bf16 for bf16
    inputs): half the memory traffic, and the very numbers the products would see."""
    return {tl.bfloat16: torch.bfloat16, tl.float16: torch.float16}.get(op, torch.float32)


def _chunk_totals(log_g, n_chunks: int, chunk: int):
    """beta [B, N, Hk] fp32: each chunk's sum of log-gates (its decay of the state), or None."""
    if log_g is None:
        return None
    bsz, t, hk = log_g.shape
    padded = torch.nn.functional.pad(log_g.float(), (0, 0, 0, n_chunks * chunk - t))
    return padded.view(bsz, n_chunks, chunk, hk).sum(2).contiguous()


def _scan_(states, z_states, beta, init_s, init_z, reverse: bool):
    """Chain the chunks' shares held in `states` / `z_states` into the states, in place; forward,
    also return the final state (S [B, Hk, D, d], z [B, Hk, D]) in fp32."""
    bsz, hk, slots, dim, d = states.shape
    s_final = z_final = None
    if not reverse:
        s_final = torch.empty(bsz, hk, dim, d, dtype=torch.float32, device=states.device)
        z_final = torch.empty(bsz, hk, dim, dtype=torch.float32, device=states.device)
    block_r = 64 if d <= 64 else 32
    any_f32 = z_states  # a placeholder pointer for the arguments a variant does not read
    _state_scan_kernel[(triton.cdiv(dim, block_r), bsz * hk)](
        states, z_states, beta if beta is not None else any_f32,
        init_s if init_s is not None else any_f32, init_z if init_z is not None else any_f32,
        s_final if s_final is not None else any_f32, z_final if z_final is not None else any_f32,
        slots - 1, hk, HEAD_DIM=d, D=dim, BLOCK_R=block_r, REVERSE=reverse, HAS_INIT=init_s is not None,
        HAS_GATE=beta is not None, **({} if interpreting() else {"num_warps": 4}),
    )
    return s_final, z_final


def _chunk_shares(x, y, zw, log_g, out, zout, slot: int, w_scale: float, to_end: bool, chunk: int, op):
    """Launch _chunk_outer_kernel: every chunk's own share of the state into out / zout."""
    bsz, t, hx, d = x.shape
    hk = out.shape[1]
    n_chunks = out.shape[2] - 1
    rb = _rows_per_program(d)
    _chunk_outer_kernel[(d // rb, n_chunks, bsz * hk)](
        x, y, zw if zw is not None else x, log_g if log_g is not None else x, out, zout,
        t, n_chunks, hx, hk, slot, w_scale,
        HEAD_DIM=d, D=out.shape[3], CHUNK=chunk, RB=rb, G=hx // hk,
        HAS_GATE=log_g is not None, TO_END=to_end, HAS_ZW=zw is not None, OP=op, **_launch_opts(chunk, d * rb),
    )


def _states_forward(k, v, log_g, s0, z0, chunk, op):
    """The chunk recurrence: states [B, Hk, N+1, D, d] (dtype of the products) and z_states
    [B, Hk, N+1, D] fp32, the state before chunk n (n = N: the final one); and the final
    state (S [B, Hk, D, d], z [B, Hk, D]) in fp32.

    Two launches: every chunk's own share at once (the matrix products, fully parallel), then
    a scan that chains them (memory-bound). A single serial pass that did both ran at a small
    fraction of either ceiling on the H100."""
    bsz, t, hk, d = k.shape
    dim = expanded_dim(d, 2)
    n_chunks = triton.cdiv(t, chunk)
    states = torch.empty(bsz, hk, n_chunks + 1, dim, d, dtype=_state_dtype(op), device=k.device)
    z_states = torch.empty(bsz, hk, n_chunks + 1, dim, dtype=torch.float32, device=k.device)
    if n_chunks:
        _chunk_shares(k, v, None, log_g, states, z_states, 1, 1.0, True, chunk, op)
    s_final, z_final = _scan_(states, z_states, _chunk_totals(log_g, n_chunks, chunk), s0, z0, reverse=False)
    return states, z_states, s_final, z_final


def chunk_forward(q, k, v, log_g, s0, z0, scale: float, eps: float, chunk_size: int):
    """Forward: (y [B, T, Hq, d], den [B, T, Hq] fp32, S_final [B, Hk, D, d], z_final [B, Hk, D])."""
    bsz, t, hq, d = q.shape
    hk = k.shape[2]
    chunk = kernel_chunk_size(chunk_size, d)
    op = dot_dtype(q.dtype)
    dim = expanded_dim(d, 2)
    states, z_states, s_final, z_final = _states_forward(k, v, log_g, s0, z0, chunk, op)
    n_chunks = states.shape[2] - 1
    y = torch.empty(bsz, t, hq, d, dtype=v.dtype, device=q.device)
    den = torch.empty(bsz, t, hq, dtype=torch.float32, device=q.device)
    if n_chunks:
        _chunk_fwd_kernel[(n_chunks, bsz * hq)](
            q, k, v, log_g if log_g is not None else k, states, z_states, y, den,
            t, n_chunks, hq, hk, scale, eps,
            HEAD_DIM=d, D=dim, CHUNK=chunk, CRB=_rows_per_chunk_step(d), HAS_GATE=log_g is not None, OP=op,
            **_launch_opts(chunk, d),
        )
    return y, den, s_final, z_final


def chunk_backward(q, k, v, log_g, s0, z0, y, den, dy, ds_final, dz_final, scale: float, eps: float, chunk_size: int):
    """Backward: (dq, dk, dv, dlog_g [B, T, Hk] fp32 or None, dS0 [B, Hk, D, d], dz0 [B, Hk, D]).

    dS0 passes through the chunk-state dtype (bf16 for bf16 inputs)."""
    bsz, t, hq, d = q.shape
    hk = k.shape[2]
    chunk = kernel_chunk_size(chunk_size, d)
    op = dot_dtype(q.dtype)
    dim = expanded_dim(d, 2)
    n_chunks = triton.cdiv(t, chunk)
    t_pad = n_chunks * chunk

    # Recompute the chunk-start states rather than keep them from the forward (memory).
    states, z_states, _, _ = _states_forward(k, v, log_g, s0, z0, chunk, op)
    do = dy.float() / (den + eps)[..., None]
    delta = -(do * y.float()).sum(-1)
    # the products read dO in their operand dtype anyway: store it so (half the bytes for bf16)
    do = do.to(_state_dtype(op))
    dstates = torch.empty_like(states)  # dL/dS_n, n = 0 .. N
    dz_states = torch.empty_like(z_states)
    lg = log_g if log_g is not None else k
    # dS_n = sum_t e^{b_t} phi(s q_t) do_t^T (chunk n's queries, every head of the group) + e^{beta_n} dS_{n+1}
    if n_chunks:
        _chunk_shares(q, do, delta, log_g, dstates, dz_states, 0, scale * scale, False, chunk, op)
    _scan_(dstates, dz_states, _chunk_totals(log_g, n_chunks, chunk), ds_final, dz_final, reverse=True)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbq = torch.empty(bsz, t_pad, hq, dtype=torch.float32, device=q.device)
    dbk = torch.empty(bsz, t_pad, hk, dtype=torch.float32, device=q.device)
    if n_chunks:
        common = dict(HEAD_DIM=d, D=dim, CHUNK=chunk, CRB=_rows_per_chunk_step(d), HAS_GATE=log_g is not None, OP=op,
                      **_launch_opts(chunk, d))
        _chunk_bwd_q_kernel[(n_chunks, bsz * hq)](
            q, k, v, lg, states, z_states, do, delta, dq, dbq, t, t_pad, n_chunks, hq, hk, scale, **common)
        _chunk_bwd_kv_kernel[(n_chunks, bsz * hk)](
            q, k, v, lg, states, z_states, dstates, dz_states, do, delta, dk, dv, dbk,
            t, t_pad, n_chunks, hq, hk, scale, **common)
    dlog_g = None
    if log_g is not None:
        db = dbk + dbq.view(bsz, t_pad, hk, hq // hk).sum(-1)
        # b_t = sum_{u <= t in the chunk} g_u, so dL/dg_u = sum_{t >= u in the chunk} dL/db_t
        db = db.view(bsz, n_chunks, chunk, hk).flip(2).cumsum(2).flip(2)
        dlog_g = db.reshape(bsz, t_pad, hk)[:, :t]
    return dq, dk, dv, dlog_g, dstates[:, :, 0].float(), dz_states[:, :, 0]
