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
read and written once per call: that is the memory floor of a decode step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import expanded_dim
from .triton_common import interpreting, pair_weights, phi_rows, row_block_rows


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
def query_phi_rows(q, q_rows, i, r_ok, scale, offs_d):
    """Row-block i of phi(s q) [ROWS, d] for the scaled queries q [ROWS, d] (fp32) whose rows start
    at the pointers q_rows [ROWS] (column i is read from there)."""
    qi = tl.load(q_rows + i, mask=r_ok, other=0.0).to(tl.float32) * scale
    return phi_rows(q, qi, i, offs_d)


@triton.jit
def row_block_query(phiq, s_i, z_i):
    """Row-block i's part of phi(q)^T S [ROWS, d] and phi(q)^T z [ROWS] (phiq [ROWS, d] from
    query_phi_rows; a few rows, so a broadcast product rather than tl.dot)."""
    return tl.sum(phiq[:, :, None] * s_i[None, :, :], axis=1), tl.sum(phiq * z_i[None, :], axis=1)


@triton.jit
def row_block_terms(phiq, s_i, z_i, acc_s, acc_z):
    """For one query row (phiq [1, d]): row-block i's terms of phi(q)^T S and phi(q)^T z added to
    acc_s [d, d] and acc_z [d] unsummed; sum_terms sums them once, after the last row-block, where
    row_block_query would sum across the tile's rows (over the warps) for every block."""
    p = tl.sum(phiq, axis=0)  # the one row, [d]
    return acc_s + p[:, None] * s_i, acc_z + p * z_i


@triton.jit
def sum_terms(acc_s, acc_z):
    """num [1, d] and den [1] from the terms that row_block_terms gathered."""
    return tl.sum(acc_s[None, :, :], axis=1), tl.sum(acc_z[None, :], axis=1)


@triton.jit
def leave_share(PART_NUM, PART_DEN, COUNT, num, den, offs_r, offs_d, ROWS: tl.constexpr, SPLIT: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """Split over SPLIT programs (grid (B Hk, SPLIT)): store this program's share of the output
    (num [ROWS, d], den [ROWS]) and arrive at COUNT[b h]. True for the last of the (b, h) to
    arrive; the atomic is acq_rel, so every share is visible to it (add_up_shares)."""
    part = (tl.program_id(0) * SPLIT + tl.program_id(1)).to(tl.int64) * ROWS
    tl.store(PART_NUM + (part + offs_r)[:, None] * HEAD_DIM + offs_d[None, :], num)
    tl.store(PART_DEN + part + offs_r, den)
    return tl.atomic_add(COUNT + tl.program_id(0), 1) == SPLIT - 1


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
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, ROWS)
    r_tok = offs_r // G
    r_ok = r_tok < t
    row_off = ((b * t + r_tok) * HQ + h * G + offs_r % G).to(tl.int64) * HEAD_DIM  # [ROWS], same in q and y
    q_rows = Q + row_off
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=r_ok[:, None], other=0.0).to(tl.float32) * scale

    s_base = S + bh.to(tl.int64) * D * HEAD_DIM
    z_base = Z + bh.to(tl.int64) * D
    num = tl.zeros((ROWS, HEAD_DIM), dtype=tl.float32)
    den = tl.zeros((ROWS,), dtype=tl.float32)
    acc_s = tl.zeros((HEAD_DIM, HEAD_DIM), dtype=tl.float32)  # DEFER's terms (row_block_terms)
    acc_z = tl.zeros((HEAD_DIM,), dtype=tl.float32)
    # row-blocks sp, sp + SPLIT, ...: interleaved, since the early ones hold more pairs
    for m in range(HEAD_DIM // SPLIT):
        i = sp + m * SPLIT
        s_ptr, z_ptr, row_ok, s_i, z_i = load_row_block(s_base, z_base, i, offs_d, HEAD_DIM)
        phiq_all = query_phi_rows(q, q_rows, i, r_ok, scale, offs_d)  # [ROWS, d]
        w = pair_weights(i, offs_d)
        for tok in range(t):
            kv_off = ((b * t + tok) * HK + h).to(tl.int64) * HEAD_DIM
            k = tl.load(K + kv_off + offs_d).to(tl.float32)
            ki = tl.load(K + kv_off + i).to(tl.float32)
            v = tl.load(V + kv_off + offs_d).to(tl.float32)
            if HAS_GATE:
                a = tl.exp(tl.load(LG + (b * t + tok).to(tl.int64) * HK + h).to(tl.float32))
                s_i = s_i * a
                z_i = z_i * a
            phik = k * ki * w
            s_i += phik[:, None] * v[None, :]
            z_i += phik
            if DEFER:  # one token, one query row
                acc_s, acc_z = row_block_terms(phiq_all, s_i, z_i, acc_s, acc_z)
            else:
                num_i, den_i = row_block_query(tl.where((r_tok == tok)[:, None], phiq_all, 0.0), s_i, z_i)
                num += num_i
                den += den_i
        tl.store(s_ptr, s_i, mask=row_ok[:, None])
        tl.store(z_ptr, z_i, mask=row_ok)
    if DEFER:
        num, den = sum_terms(acc_s, acc_z)

    y_ptr = Y + row_off[:, None] + offs_d[None, :]
    if SPLIT == 1:
        tl.store(y_ptr, num / (den + eps)[:, None], mask=r_ok[:, None])
    else:
        if leave_share(PART_NUM, PART_DEN, COUNT, num, den, offs_r, offs_d, ROWS, SPLIT, HEAD_DIM):
            num, den = add_up_shares(PART_NUM, PART_DEN, offs_r, offs_d, ROWS, SPLIT, HEAD_DIM)
            tl.store(y_ptr, num / (den + eps)[:, None], mask=r_ok[:, None])


def _rows(tokens: int, group: int) -> int:
    return triton.next_power_of_2(max(1, tokens * group))


#: sum a single query row's terms once per program (row_block_terms) rather than once per row-block
DEFER_SUMS = True


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
            DEFER=DEFER_SUMS and rows == 1, **opts,
        )
        if ys is not y:
            y[:, sl] = ys
    return y
