"""Decode: a few new tokens against the recurrent state, updated in place (degree 2).

Shapes:

    q         [B, t, Hq, d]   the new tokens' queries (t small: 1 for plain decoding)
    k, v      [B, t, Hk, d]
    log_g     [B, t, Hk] or None
    S         [B, Hk, D, d] fp32, z [B, Hk, D] fp32: updated in place (same storage)
    y         [B, t, Hq, d]   dtype of v

Per token: S = e^g S + phi(k) v^T, z = e^g z + phi(k), y = phi(s q)^T S / (phi(s q)^T z + eps).

SPLIT programs per (batch row, kv head) share the d row-blocks of its state: each [d, d] block
is read once, updated for every new token in turn (the row-blocks are independent), written
back once; the queries of all t tokens and the G query heads of the group (rows
r = token * G + g) take their share of the output from the block between the updates. The
last program of a (batch row, kv head) to finish adds up the shares and writes y. The state is
read and written once per call (decode_).

With a tail (reference.DecodeState, what the model's cache carries), one token reads the state
and does not write it: _tail_step_kernel reads the state's row-blocks, attends over the tail and
appends the token to it. The step that fills the tail folds it into the state, so the state is
written once every TAIL tokens: with enough readers (FOLD_IN_STEP_READERS), each reader folds
its own row-blocks and a step is one launch; else _fold_kernel runs after the step (a program per
row-block group that reads one number and ends unless the step filled its tail, so that every
step is the same launches, one CUDA graph). _fold_kernel also folds the pending tails when the
state is read out (fold_tail_).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import expanded_dim
from .triton_common import (column, dependent_launch, dot_f32, interpreting, multiprocessors, pair_weights, pdl_options,
                            phi_rows, prefetch_l2, row_block_rows, wait_for_previous_kernel)


@triton.jit
def decode_program(Q, t, HQ, HK, scale, HEAD_DIM: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr):
    """This program's (batch row, kv head) bh = b Hk + h of grid axis 0, and its query rows: the t
    tokens' G query heads of the group, row r = token * G + g (ROWS >= t G, the rest masked).
    Returns bh, b, h, offs_d, offs_r, r_tok [ROWS] (each row's token), r_ok [ROWS], row_off
    [ROWS] (the rows' offsets, the same in q and y) and q [ROWS, d] fp32, scaled."""
    bh = tl.program_id(0)
    b = bh // HK
    h = bh % HK
    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, ROWS)
    r_tok = offs_r // G
    r_ok = r_tok < t
    row_off = ((b * t + r_tok) * HQ + h * G + offs_r % G).to(tl.int64) * HEAD_DIM
    q = tl.load(Q + row_off[:, None] + offs_d[None, :], mask=r_ok[:, None], other=0.0).to(tl.float32) * scale
    return bh, b, h, offs_d, offs_r, r_tok, r_ok, row_off, q


@triton.jit
def load_row_block(s_base, z_base, i, offs_d, HEAD_DIM: tl.constexpr):
    """Row-block i of one head's state (S [D, d], z [D] fp32): the pointers to its rows in S and z,
    the rows' mask (pairs (i, j >= i)), and the rows s_i [d, d], z_i [d] (0 where masked)."""
    rows, row_ok = row_block_rows(i, offs_d, HEAD_DIM)
    s_ptr = s_base + rows[:, None] * HEAD_DIM + offs_d[None, :]
    z_ptr = z_base + rows
    return (s_ptr, z_ptr, row_ok, tl.load(s_ptr, mask=row_ok[:, None], other=0.0),
            tl.load(z_ptr, mask=row_ok, other=0.0))


@triton.jit
def prefetch_row_blocks(s_base, z_base, first, STEP: tl.constexpr, HEAD_DIM: tl.constexpr, LINES: tl.constexpr):
    """Have row-blocks first, first + STEP, ... of one head's state (S [D, d], z [D] fp32) brought
    into L2 (prefetch_l2): LINES 128-byte lines a row of S (d / 32, at least 1), every row of z."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_l = tl.arange(0, LINES) * 32
    for mm in range(HEAD_DIM // STEP):
        rows, row_ok = row_block_rows(first + mm * STEP, offs_d, HEAD_DIM)
        prefetch_l2(s_base + rows[:, None] * HEAD_DIM + offs_l[None, :], row_ok[:, None] & (offs_l < HEAD_DIM)[None, :])
        prefetch_l2(z_base + rows, row_ok)


@triton.jit
def query_phi_rows(q, Q, row_off, r_ok, i, scale, offs_d):
    """Row-block i of phi(s q) [ROWS, d] for the scaled queries q [ROWS, d] (fp32) of the rows at
    Q + row_off (decode_program). Column i is read from there (in cache), not cut out of q's
    registers (column): that is a sum across the warps in every row-block, and made the in-place
    decode's graphed one-token call 0.0727 ms against 0.0612 (H100, batch 8, 16 heads;
    RESULTS.md, attention kernels, run L). The tail step showed no difference either way
    (generation, run N)."""
    qi = tl.load(Q + row_off + i, mask=r_ok, other=0.0).to(tl.float32) * scale
    return phi_rows(q, qi, i, offs_d)


@triton.jit
def query_row_block(phiq, s_i, z_i, num, den, acc_s, acc_z, DEFER: tl.constexpr):
    """Add row-block i's part of phi(q)^T S and phi(q)^T z (phiq [ROWS, d] from query_phi_rows):
    summed into num [ROWS, d], den [ROWS] now (a few rows, so a broadcast product rather than
    tl.dot), or, with DEFER (one query row),
    unsummed into acc_s [d, d], acc_z [d], which finish_query sums over the rows once after the
    last row-block. The sum runs across the tile's rows, over the warps: once per program instead
    of once per row-block took the per-token decode from 0.077 to 0.058 ms (H100, batch 8)."""
    if DEFER:
        p = tl.sum(phiq, axis=0)  # the one row, [d]
        acc_s += p[:, None] * s_i
        acc_z += p * z_i
    else:
        num += tl.sum(phiq[:, :, None] * s_i[None, :, :], axis=1)
        den += tl.sum(phiq * z_i[None, :], axis=1)
    return num, den, acc_s, acc_z


@triton.jit
def finish_query(num, den, acc_s, acc_z, DEFER: tl.constexpr):
    """num [ROWS, d], den [ROWS] once every row-block went through query_row_block."""
    if DEFER:
        num = tl.sum(acc_s[None, :, :], axis=1)
        den = tl.sum(acc_z[None, :], axis=1)
    return num, den


@triton.jit
def leave_share(PART_NUM, PART_DEN, COUNTER, ARRIVAL: tl.constexpr, num, den, offs_r, offs_d, ROWS: tl.constexpr,
                SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Split over SPLIT programs (grid (B Hk, SPLIT)): store this program's share of the output
    (num [ROWS, d], den [ROWS]) and arrive at the (b, h)'s counter (add ARRIVAL to the int32 at
    COUNTER). True for the last of the (b, h) to arrive; the atomic is acq_rel, so every share is
    visible to it (add_up_shares)."""
    part = (tl.program_id(0) * SPLIT + tl.program_id(1)).to(tl.int64) * ROWS
    tl.store(PART_NUM + (part + offs_r)[:, None] * HEAD_DIM + offs_d[None, :], num)
    tl.store(PART_DEN + part + offs_r, den)
    return tl.atomic_add(COUNTER, ARRIVAL) // ARRIVAL == SPLIT - 1


@triton.jit
def add_up_shares(PART_NUM, PART_DEN, offs_r, offs_d, ROWS: tl.constexpr, SPLIT: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    """The sum of the SPLIT shares that leave_share stored for this program's (b, h): num, den."""
    num = tl.zeros((ROWS, HEAD_DIM), dtype=tl.float32)
    den = tl.zeros((ROWS,), dtype=tl.float32)
    for other in range(SPLIT):
        part = (tl.program_id(0) * SPLIT + other).to(tl.int64) * ROWS
        num += tl.load(PART_NUM + (part + offs_r)[:, None] * HEAD_DIM + offs_d[None, :], cache_modifier=".cg")
        den += tl.load(PART_DEN + part + offs_r, cache_modifier=".cg")
    return num, den


@triton.jit
def _decode_kernel(
    Q, K, V, LG, S, Z, Y, PART_NUM, PART_DEN, COUNT,
    t, HQ, HK, scale, eps,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
    HAS_GATE: tl.constexpr, DEFER: tl.constexpr,
):
    sp = tl.program_id(1)
    bh, b, h, offs_d, offs_r, r_tok, r_ok, row_off, q = decode_program(Q, t, HQ, HK, scale, HEAD_DIM, G, ROWS)

    s_base = S + bh.to(tl.int64) * D * HEAD_DIM
    z_base = Z + bh.to(tl.int64) * D
    num = tl.zeros((ROWS, HEAD_DIM), dtype=tl.float32)
    den = tl.zeros((ROWS,), dtype=tl.float32)
    acc_s = tl.zeros((HEAD_DIM, HEAD_DIM), dtype=tl.float32)  # DEFER's terms (query_row_block)
    acc_z = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    # row-blocks sp, sp + SPLIT, ...: interleaved, since the early ones hold more pairs
    for m in range(HEAD_DIM // SPLIT):
        i = sp + m * SPLIT
        s_ptr, z_ptr, row_ok, s_i, z_i = load_row_block(s_base, z_base, i, offs_d, HEAD_DIM)
        phiq_all = query_phi_rows(q, Q, row_off, r_ok, i, scale, offs_d)  # [ROWS, d]
        w = pair_weights(i, offs_d)
        for tok in range(t):
            kv_off = ((b * t + tok) * HK + h).to(tl.int64) * HEAD_DIM
            k = tl.load(K + kv_off + offs_d).to(tl.float32)
            ki = tl.load(K + kv_off + i).to(tl.float32)  # read, as query_phi_rows reads q's column
            v = tl.load(V + kv_off + offs_d).to(tl.float32)
            if HAS_GATE:
                a = tl.exp(tl.load(LG + (b * t + tok).to(tl.int64) * HK + h).to(tl.float32))
                s_i = s_i * a
                z_i = z_i * a
            phik = k * ki * w
            s_i += phik[:, None] * v[None, :]
            z_i += phik
            phiq = tl.where((r_tok == tok)[:, None], phiq_all, 0.0)  # this token's query rows
            num, den, acc_s, acc_z = query_row_block(phiq, s_i, z_i, num, den, acc_s, acc_z, DEFER)
        tl.store(s_ptr, s_i, mask=row_ok[:, None])
        tl.store(z_ptr, z_i, mask=row_ok)
    num, den = finish_query(num, den, acc_s, acc_z, DEFER)

    y_ptr = Y + row_off[:, None] + offs_d[None, :]
    if SPLIT == 1:
        tl.store(y_ptr, num / (den + eps)[:, None], mask=r_ok[:, None])
    else:
        if leave_share(PART_NUM, PART_DEN, COUNT + bh, 1, num, den, offs_r, offs_d, ROWS, SPLIT, HEAD_DIM):
            num, den = add_up_shares(PART_NUM, PART_DEN, offs_r, offs_d, ROWS, SPLIT, HEAD_DIM)
            tl.store(y_ptr, num / (den + eps)[:, None], mask=r_ok[:, None])


def _rows(tokens: int, group: int) -> int:
    return triton.next_power_of_2(max(1, tokens * group))


def _split(programs: int, head_dim: int) -> int:
    """Programs per (batch row, kv head): enough for ~4 per SM of an H100, at most 16."""
    want = triton.next_power_of_2(max(1, -(-528 // programs)))
    return min(want, 16, head_dim)


def decode_(q, k, v, log_g, s_state, z_state, scale: float, eps: float) -> torch.Tensor:
    """Feed q/k/v [B, t, *, d] through the state (S, z), in place; returns y [B, t, Hq, d]."""
    bsz, t, hq, d = q.shape
    hk = k.shape[2]
    group = hq // hk
    y = torch.empty(bsz, t, hq, d, dtype=v.dtype, device=q.device)
    # Tokens per launch: the on-chip product [rows, d, d] stays within ~32k numbers.
    per_launch = max(1, (32768 // (d * d)) // group)
    split = _split(bsz * hk, d)
    opts = {} if interpreting() else {"num_warps": 4 if d <= 64 else 8}
    for start in range(0, t, per_launch):
        n = min(per_launch, t - start)
        sl = slice(start, start + n)
        qs, ks, vs = q[:, sl].contiguous(), k[:, sl].contiguous(), v[:, sl].contiguous()
        gs = log_g[:, sl].contiguous() if log_g is not None else ks
        ys = y if n == t else torch.empty(bsz, n, hq, d, dtype=v.dtype, device=q.device)
        rows = _rows(n, group)
        part_num = torch.empty(bsz * hk * split * rows, d, dtype=torch.float32, device=q.device)
        part_den = torch.empty(bsz * hk * split * rows, dtype=torch.float32, device=q.device)
        count = torch.zeros(bsz * hk, dtype=torch.int32, device=q.device)
        _decode_kernel[(bsz * hk, split)](
            qs, ks, vs, gs, s_state, z_state, ys, part_num, part_den, count, n, hq, hk, scale, eps,
            HEAD_DIM=d, D=expanded_dim(d, 2), G=group, ROWS=rows, SPLIT=split, HAS_GATE=log_g is not None,
            DEFER=rows == 1, **opts,
        )
        if ys is not y:
            y[:, sl] = ys
    return y


# ----------------------------------------------------------------------------------
# Decoding with a tail (reference.DecodeState): the state is read every token, written once
# every TAIL tokens
# ----------------------------------------------------------------------------------


#: Tokens per product of a fold (fold_row_blocks): two [FOLD_TOKENS, d] fp32 tiles of keys and two
#: of values live beside the row-block. ptxas (Triton 3.6, sm_90), the folding tail step with 32:
#: no spills at 8 warps, 88 bytes a thread at 4 (with the tiles read again for every row-block:
#: 20 and 352; with 64 then: 2068 at 4 warps).
FOLD_TOKENS = tl.constexpr(32)


@triton.jit
def tail_tiles(TK, TV, TG, tail, t0, n, g_last, k_new, v_new, new_at, offs_d, TB: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Tokens t0 .. t0 + TB - 1 of a tail (from row `tail` of TK, TV [rows, d] and TG, fp32) as tiles:
    keys and values [TB, d] and each token's decay to the fold, e^{g_last - G_j} [TB]; 0 at n and
    past it. The token at new_at (a step's own token, -1 for none) is k_new, v_new [d] with decay 1:
    the step's tail program writes it to the tail meanwhile, so a fold in the step does not read it
    back. (The tail program itself reads the tail this way, without its new token.)"""
    offs_t = t0 + tl.arange(0, TB)
    ok = offs_t < n
    new = offs_t == new_at
    rows = (tail + offs_t)[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(TK + rows, mask=(ok & ~new)[:, None], other=0.0)
    v = tl.load(TV + rows, mask=(ok & ~new)[:, None], other=0.0)
    decay = tl.where(ok, tl.exp(g_last - tl.load(TG + tail + offs_t, mask=ok & ~new, other=0.0)), 0.0)
    k = tl.where(new[:, None], k_new[None, :], k)
    v = tl.where(new[:, None], v_new[None, :], v)
    return k, v, tl.where(new, 1.0, decay)


@triton.jit
def fold_row_blocks(s_base, z_base, first, STEP: tl.constexpr, TK, TV, TG, tail, n, g_last, k_new, v_new, new_at,
                    offs_d, CT: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Row-blocks first, first + STEP, ... of one head's state (S [D, d], z [D] fp32) with the first
    n tokens of its tail folded in (tail_tiles), each read and written back once (a tail longer
    than 2 x FOLD_TOKENS: once per 2 x FOLD_TOKENS tokens): S_i = e^{g_last} S_i + phi_i(K)^T
    diag(decay) V, z likewise, one product (dot_f32: tensor cores, about fp32 accuracy) per
    FOLD_TOKENS tokens. The tail's tiles are read once, before the row-blocks. Read again for every
    row-block, they were a chain of reads that the fold waited on: the benchmark model's graphed
    step at batch 8 went from 0.806 to 0.784 ms, and batch 64 (folded in _fold_kernel) from 1.93x
    to 1.87x its memory floor (H100, RESULTS.md, generation, run N). Token by token, with a
    load per token, each reader's fold was a chain of dependent reads; the benchmark model's graphed
    step (64 steps timed, 64k context, default compile, H100) went from 0.305 to 0.301 ms at batch 1
    and from 0.813 to 0.805 at batch 8 (RESULTS.md, generation, run L, call 6). A large batch's
    fold, bound by its bytes, ran as fast either way (tf32x3 0.32 ms, token by token 0.30; 69 MB of
    state; benchmarks/explore_tail_decode.py at commit b9045cb)."""
    TB: tl.constexpr = FOLD_TOKENS if FOLD_TOKENS < CT else (CT if CT >= 16 else 16)  # tl.dot takes >= 16
    g = tl.exp(g_last)
    for p0 in range(0, n, 2 * TB):  # one pass for a tail of up to 2 TB tokens (the default tail: 64, TB 32)
        ka, va, da = tail_tiles(TK, TV, TG, tail, p0, n, g_last, k_new, v_new, new_at, offs_d, TB, HEAD_DIM)
        kb, vb, db = tail_tiles(TK, TV, TG, tail, p0 + TB, n, g_last, k_new, v_new, new_at, offs_d, TB, HEAD_DIM)
        own = tl.where(p0 == 0, g, 1.0)  # the state's own decay, once
        for mm in range(HEAD_DIM // STEP):
            i = first + mm * STEP
            s_ptr, z_ptr, row_ok, s_i, z_i = load_row_block(s_base, z_base, i, offs_d, HEAD_DIM)
            w = pair_weights(i, offs_d)
            s_i, z_i = fold_tile(s_i * own, z_i * own, ka, va, da, i, w, offs_d)
            s_i, z_i = fold_tile(s_i, z_i, kb, vb, db, i, w, offs_d)
            tl.store(s_ptr, s_i, mask=row_ok[:, None])
            tl.store(z_ptr, z_i, mask=row_ok)


@triton.jit
def fold_tile(s_i, z_i, k, v, decay, i, w, offs_d):
    """Row-block i (s_i [d, d], z_i [d]) plus one tile of tail tokens (tail_tiles: k, v [TB, d] and
    decay [TB]; w = pair_weights(i))."""
    phik = k * (column(k, i, offs_d) * decay)[:, None] * w[None, :]  # [TB, d]: phi_i(k_j) e^{g_last - G_j}
    return dot_f32(tl.trans(phik), v, s_i), z_i + tl.sum(phik, axis=0)


@triton.jit
def _fold_kernel(S, Z, TK, TV, TG, TLEN, HEAD_DIM: tl.constexpr, D: tl.constexpr, CT: tl.constexpr,
                 SPLIT: tl.constexpr, FILLED: tl.constexpr, PDL: tl.constexpr):
    """Tails into the state (else the program reads one number and ends): S = e^{G} S + sum_j
    e^{G - G_j} phi(k_j) v_j^T, z likewise (G the running log-gate of the tail's last token).
    FILLED: the tails that the step just before filled (length CT, which then marks them folded);
    else every tail with tokens not yet folded (1 to CT - 1). Grid (B Hk, SPLIT), row-blocks
    interleaved. The lengths are left as they are (fold_tail_ zeroes them)."""
    wait_for_previous_kernel(PDL)
    bh = tl.program_id(0)
    n = tl.load(TLEN + bh)
    if FILLED:
        todo = n == CT
    else:
        todo = (n >= 1) & (n < CT)
    if todo:
        offs_d = tl.arange(0, HEAD_DIM)
        tail = bh.to(tl.int64) * CT
        g_last = tl.load(TG + tail + n - 1)
        none = tl.zeros((HEAD_DIM,), dtype=tl.float32)
        fold_row_blocks(S + bh.to(tl.int64) * D * HEAD_DIM, Z + bh.to(tl.int64) * D, tl.program_id(1), SPLIT,
                        TK, TV, TG, tail, n, g_last, none, none, -1, offs_d, CT, HEAD_DIM)


#: The tail step's arrival count lives in the high bits of the tail length (which never exceeds
#: the tail's capacity): no counter to zero before a step, and the last program's write of the new
#: length clears it.
ARRIVAL = tl.constexpr(65536)


@triton.jit
def _tail_step_kernel(
    Q, K, V, LG, S, Z, TK, TV, TG, TLEN, PART_NUM, PART_DEN, Y,
    HQ, HK, scale, eps,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
    CT: tl.constexpr, TB: tl.constexpr, HAS_GATE: tl.constexpr, DEFER: tl.constexpr, FOLD: tl.constexpr,
    PDL: tl.constexpr, PREFETCH: tl.constexpr, LINES: tl.constexpr,
):
    """One token per (batch row, kv head) against its state and tail.
    Grid (B Hk, SPLIT + 1): programs 0..SPLIT-1 read the state's row-blocks; program SPLIT attends
    over the tail (TB tokens at a time) and the new token, and appends the token to the tail; the
    last to arrive adds up the shares, writes y and the new length. The step that fills the tail
    (m + 1 = CT) leaves the length CT, which marks the tail folded, and the next step starts at
    m = 0. With FOLD this kernel folds it: each reader folds its own row-blocks after reading them
    and writes them back. Without, _fold_kernel (FILLED) runs after it."""
    sp = tl.program_id(1)
    s_base = S + tl.program_id(0).to(tl.int64) * D * HEAD_DIM
    z_base = Z + tl.program_id(0).to(tl.int64) * D
    if PDL and PREFETCH and sp < SPLIT:
        # launched while q/k/v are projected: the reader's row-blocks stream into L2 meanwhile
        prefetch_row_blocks(s_base, z_base, sp, SPLIT, HEAD_DIM, LINES)
    wait_for_previous_kernel(PDL)  # q/k/v were just projected
    bh, _b, _h, offs_d, offs_r, _tok, r_ok, row_off, q = decode_program(Q, 1, HQ, HK, scale, HEAD_DIM, G, ROWS)

    # m tokens since the last fold; the new token goes at m. The high bits count arrivals (ARRIVAL).
    m_stored = tl.load(TLEN + bh) % ARRIVAL
    m = tl.where(m_stored == CT, 0, m_stored)
    fold_now = m + 1 == CT  # (with FOLD)
    tail = bh.to(tl.int64) * CT
    g_m = tl.load(TG + tail + tl.maximum(m - 1, 0), mask=m > 0, other=0.0)
    if HAS_GATE:
        g_m += tl.load(LG + bh).to(tl.float32)
    kv = bh.to(tl.int64) * HEAD_DIM
    k_new = tl.load(K + kv + offs_d).to(tl.float32)
    v_new = tl.load(V + kv + offs_d).to(tl.float32)
    num = tl.zeros((ROWS, HEAD_DIM), dtype=tl.float32)
    den = tl.zeros((ROWS,), dtype=tl.float32)
    if sp < SPLIT:  # e^{G_m} phi(s q)^T S over this program's row-blocks
        acc_s = tl.zeros((HEAD_DIM, HEAD_DIM), dtype=tl.float32)  # DEFER's terms (query_row_block)
        acc_z = tl.zeros((HEAD_DIM,), dtype=tl.float32)
        for mm in range(HEAD_DIM // SPLIT):
            i = sp + mm * SPLIT
            _s_ptr, _z_ptr, _row_ok, s_i, z_i = load_row_block(s_base, z_base, i, offs_d, HEAD_DIM)
            phiq = query_phi_rows(q, Q, row_off, r_ok, i, scale, offs_d)
            num, den, acc_s, acc_z = query_row_block(phiq, s_i, z_i, num, den, acc_s, acc_z, DEFER)
        num, den = finish_query(num, den, acc_s, acc_z, DEFER)
        num *= tl.exp(g_m)
        den *= tl.exp(g_m)
        if FOLD:
            if fold_now:  # the tail's m tokens and this one (at m), into the row-blocks just read (in L2 now)
                fold_row_blocks(s_base, z_base, sp, SPLIT, TK, TV, TG, tail, m + 1, g_m, k_new, v_new, m, offs_d,
                                CT, HEAD_DIM)
    else:  # sum_{j<=m} (s q.k_j)^2 e^{G_m - G_j} v_j over the tail and the new token
        for t0 in range(0, m, TB):
            tk, tv, decay = tail_tiles(TK, TV, TG, tail, t0, m, g_m, k_new, v_new, -1, offs_d, TB, HEAD_DIM)
            sc = tl.sum(q[:, None, :] * tk[None, :, :], axis=2)  # [ROWS, TB]
            a = sc * sc * decay[None, :]
            num += tl.sum(a[:, :, None] * tv[None, :, :], axis=1)
            den += tl.sum(a, axis=1)
        sc_new = tl.sum(q * k_new[None, :], axis=1)  # [ROWS]
        a_new = sc_new * sc_new
        num += a_new[:, None] * v_new[None, :]
        den += a_new
        tl.store(TK + (tail + m) * HEAD_DIM + offs_d, k_new)
        tl.store(TV + (tail + m) * HEAD_DIM + offs_d, v_new)
        tl.store(TG + tail + m, g_m)

    if leave_share(PART_NUM, PART_DEN, TLEN + bh, ARRIVAL, num, den, offs_r, offs_d, ROWS, SPLIT + 1, HEAD_DIM):
        num, den = add_up_shares(PART_NUM, PART_DEN, offs_r, offs_d, ROWS, SPLIT + 1, HEAD_DIM)
        tl.store(Y + row_off[:, None] + offs_d[None, :], num / (den + eps)[:, None], mask=r_ok[:, None])
        tl.store(TLEN + bh, m + 1)


#: Readers of the state a tail step aims for in all (each (batch row, kv head) has one more
#: program for its tail), at most TAIL_STEP_MAX_READERS per (batch row, kv head): more readers
#: each walk fewer row-blocks, yet past 8 the step got slower (why was not found: reading the
#: shares as one tile or unrolling the walk changed nothing; RESULTS.md runs H and K). Graphed
#: fold + step on the H100, before the fold moved into the step (benchmarks/tune_tail_decode.py,
#: RESULTS.md run H): batch 1 x 12 heads, 4 / 8 / 16 / 32 / 64 readers: 10.3 / 8.9 / 9.2 / 12.2 /
#: 15.1 us; batch 8 x 16 heads, 1 / 2 / 4: 54.2 / 44.2 / 47.2 us. With the state prefetched into
#: L2 (TAIL_STEP_PREFETCH), the model's graphed step at batch 1 took 0.291 / 0.287 ms with 8
#: readers, 0.286 / 0.285 with 16, 0.320 with 32, and an unrolled walk changed nothing beyond that
#: spread (RESULTS.md, generation, run L, call 4).
TAIL_STEP_READERS = 384
TAIL_STEP_MAX_READERS = 8
#: Warps per program of a tail step (None: 4 up to head size 64, else 8; 8 too where the step has at
#: most one program per SM, whose walk then has more loads in flight). With the fold in the
#: step, batch 1 x 12 heads: 8 / 16 / 32 readers took 7.2 / 7.1 / 9.9 us at 4 warps, 8.8 / 8.0 / 8.5
#: at 2 and 20.4 / 14.5 / 15.6 at 1; the graphed model step 0.305 ms with the rule, 0.311 with 16
#: readers at 2 warps, 0.423 with 32 at 1 (benchmarks/tune_tail_decode.py --warps, RESULTS.md run K).
#: 8 warps: 8 readers 6.5 against 6.9 us at 4 (16 readers 9.1 against 7.0); batch 8 x 12 heads (480
#: programs), 2 / 4 / 8 readers 39.8 / 37.8 / 46.6 against 35.0 / 29.7 / 34.6 (RESULTS.md, generation,
#: run M, call 4).
TAIL_STEP_WARPS = None
#: Numbers in the tail program's [rows, TB, d] product (TB tail tokens at a time). Its registers
#: count for every program of the step: at 8192 (64 a thread) the step took 43.9 us at batch 8 x
#: 16 heads, at 2048 41.0; at batch 1 x 12 heads 8.4 and 8.8 (H100, with PDL, RESULTS.md run K).
TAIL_BLOCK_ELEMENTS = 2048
#: Readers per (batch row, kv head) from which a tail step folds a tail it fills itself, each
#: reader its own row-blocks (one launch a step). With fewer, each reader would walk more
#: row-blocks through the fold than _fold_kernel's programs do, and the fold runs as a launch of
#: its own after the step (an earlier version that folded inside the step with the rule's 2 readers
#: at batch 8 took 0.073 ms a step amortised, against 0.060 with the fold kernel). H100, batch 1 x
#: 12 heads (8 readers): the graphed model step went from 0.321 to 0.305 ms (RESULTS.md, generation,
#: run K).
FOLD_IN_STEP_READERS = 8


#: With PDL, each reader of a tail step has its row-blocks of the state prefetched into L2
#: (prefetch_row_blocks) before it waits for the q/k/v projection.
#: H100, the benchmark model's graphed step at 64k context, default compile, 32 steps timed: 0.292 /
#: 0.294 ms without, 0.290 / 0.286 with (RESULTS.md, generation, run L, call 2). Loading the walk's
#: next row-blocks into shared memory instead (Triton's pipelining, tl.range num_stages 2 / 3 / 4)
#: made the step slower: 0.297 / 0.300 / 0.317 ms against 0.289 without (call 3). The tail program
#: prefetching its tail as well made batch 8 7% slower (call 5).
TAIL_STEP_PREFETCH = True


def _tail_split(pairs: int, head_dim: int) -> int:
    """Readers per (batch row, kv head) of a tail step: a power of two, about TAIL_STEP_READERS in
    all, at most TAIL_STEP_MAX_READERS and one per row-block."""
    return min(head_dim, TAIL_STEP_MAX_READERS, 1 << max(0, (TAIL_STEP_READERS // max(1, pairs)).bit_length() - 1))


def _tail_step_warps(programs: int, head_dim: int, device) -> int:
    """num_warps of a tail step of `programs` programs (TAIL_STEP_WARPS)."""
    if TAIL_STEP_WARPS:
        return TAIL_STEP_WARPS
    if head_dim > 64:
        return 8
    return 8 if programs <= multiprocessors(device) else 4


def _fold(state, filled: bool) -> None:
    """_fold_kernel over `state` (FILLED: the tails the step just before filled)."""
    s, z, tail_k = state.s, state.z, state.tail_k
    bsz, hk, dim, d = s.shape
    split = min(8, d)
    pdl = dependent_launch(s.device)
    _fold_kernel[(bsz * hk, split)](s, z, tail_k, state.tail_v, state.tail_g, state.tail_len,
                                    HEAD_DIM=d, D=dim, CT=tail_k.shape[2], SPLIT=split, FILLED=filled, PDL=pdl,
                                    **({} if interpreting() else {"num_warps": 4, **pdl_options(pdl)}))


def fold_tail_(state) -> None:
    """Fold every tail of `state` (a reference.DecodeState) with tokens not yet folded into (S, z);
    lengths -> 0."""
    _fold(state, filled=False)
    state.tail_len.zero_()


def tail_decode_(q, k, v, log_g, state, scale: float, eps: float) -> torch.Tensor:
    """One token q [B, 1, Hq, d], k/v [B, 1, Hk, d], log_g [B, 1, Hk] or None through `state` (a
    reference.DecodeState, fp32, updated in place; a tail this step fills is folded): one launch
    where each (batch row, kv head) has FOLD_IN_STEP_READERS readers or more, else two (the fold
    after the step). Returns y [B, 1, Hq, d]."""
    bsz, _, hq, d = q.shape
    hk = k.shape[2]
    group = hq // hk
    cap = state.tail_k.shape[2]
    rows = _rows(1, group)
    split = _tail_split(bsz * hk, d)
    fold_in_step = split >= min(d, FOLD_IN_STEP_READERS)
    y = torch.empty(bsz, 1, hq, d, dtype=v.dtype, device=q.device)
    part_num = torch.empty(bsz * hk * (split + 1) * rows, d, dtype=torch.float32, device=q.device)
    part_den = torch.empty(bsz * hk * (split + 1) * rows, dtype=torch.float32, device=q.device)
    # the tail program's [rows, TB, d] product within TAIL_BLOCK_ELEMENTS numbers
    tb = min(cap, max(2, triton.next_power_of_2(TAIL_BLOCK_ELEMENTS // (rows * d))))
    pdl = dependent_launch(q.device)
    _tail_step_kernel[(bsz * hk, split + 1)](
        q, k, v, log_g if log_g is not None else k, state.s, state.z, state.tail_k, state.tail_v, state.tail_g,
        state.tail_len, part_num, part_den, y, hq, hk, scale, eps,
        HEAD_DIM=d, D=expanded_dim(d, 2), G=group, ROWS=rows, SPLIT=split, CT=cap, TB=tb,
        HAS_GATE=log_g is not None, DEFER=rows == 1, FOLD=fold_in_step, PDL=pdl, PREFETCH=TAIL_STEP_PREFETCH,
        LINES=max(1, d // 32),
        **({} if interpreting() else {"num_warps": _tail_step_warps(bsz * hk * (split + 1), d, q.device),
                                      **pdl_options(pdl)}))
    if not fold_in_step:
        _fold(state, filled=True)
    return y
