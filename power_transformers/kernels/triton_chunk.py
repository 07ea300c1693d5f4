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

States are stored every C tokens (the chunk); a program of the chunk-local kernels holds M
tokens (the block, M = C up to 128, kernel_tiles) and attends to the other blocks of its chunk
block by block. Each chunk of C tokens, per head, with b_t the chunk-local running sum of the
log-gates and beta the chunk total:

    A_tj   = (s q_t . k_j)^2 exp(b_t - b_j)                (j <= t, same chunk)
    num_t  = sum_j A_tj v_j + e^{b_t} phi(s q_t)^T S_n
    den_t  = sum_j A_tj     + e^{b_t} phi(s q_t)^T z_n,    y_t = num_t / (den_t + eps)
    S_{n+1} = e^{beta} S_n + sum_j e^{beta - b_j} phi(k_j) v_j^T   (z likewise with v = 1)

Kernels (phi(q), phi(k) built row-block by row-block on chip, never stored; see triton_common):

    _chunk_share_kernel grid (N, B Hk): every chunk's own share of the (unweighted) state,
                        all chunks in parallel. (At d = 64, C = 256, G = 1 on Hopper:
                        gluon_share, the same products in Gluon.)
    _state_scan_kernel  grid (D / 64, B Hk): chains the shares into the chunk-start states, in
                        place (memory-bound).
    _chunk_fwd_kernel   grid (N C / M, B Hq): chunk-local attention + state query (full tiles of
                        the unweighted state and its symmetric halves, _query_full_tiles) +
                        normalisation, y written once.
    (backward)          the same two over queries and dO, scanned in reverse: dL/dR_n; the
                        reverse scan also takes <dR_n, R_n>, the gradient of each chunk's decay.
    _chunk_bwd_q_kernel grid (N C / M, B Hq): dq and the query part of the gate gradient.
    _chunk_bwd_kv_kernel grid (N C / M, B Hk): dk, dv and the key part of the gate gradient.
    _gate_weights_kernel, _gate_grad_kernel  grid (N, B Hk): a state pass's token weights and
                        chunk decays from the log-gates; dlog_g from both parts of the gate gradient.

The backward reads the forward's chunk states when the forward kept them (keep_states), else
recomputes them with a third state pass.

Longer chunks (C = 256 ... 1024, several blocks) store fewer states. Until run K they did not pay
(64k tokens, d = 64, states kept, benchmarks/RESULTS.md runs G and I): the share kernel read its
chunk a block at a time for every row-block, 4.1 ms a pass against 2.2 at C = 128 (as one
[256, d] tile: 3.6, spilling). Now it holds the two blocks of a 256-token chunk (d <= 64), which
made C = 256 the faster chunk at d = 64 (H100, forward + backward at 64k: 16.24 ms against 17.50
at C = 128, the share kernel about 4.4 ms at either; runs K and L). Which chunk is fastest depends
on the head size and the group: default_chunk.

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
    dot_f32,
    load_gates,
    dot_dtype,
    interpreting,
    load_rows,
    load_tile,
    full_tile_rows,
    load_sym_matrix,
    operand_torch_dtype,
    output_grads,
    row_block_rows,
)
from . import reference
from .reference import expanded_dim

try:  # the state passes' share kernel in Gluon (Hopper, Triton 3.6), where a Triton has Gluon at all
    from . import gluon_share
except ImportError:  # pragma: no cover - Tritons before Gluon
    gluon_share = None


# ----------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------


@triton.jit
def _source_at(src, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Source `src` of a chunk (a source: one query head of the group, one block of the chunk): the
    head's index g in the group, and the block's first token counted from the chunk's start."""
    return src // (CHUNK // BLOCK), (src % (CHUNK // BLOCK)) * BLOCK


@triton.jit
def _share_z(X, ZW, w_base, head0, t0, T, HX, stride_t, offs_c, offs_d,
             HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr, HAS_ZW: tl.constexpr):
    """The chunk's Z share as a [d, d] matrix, sum_g sum_t w_t zw_t x_t x_t^T (fp32 products)."""
    zmat = tl.zeros((HEAD_DIM, HEAD_DIM), dtype=tl.float32)
    for src in range(G * (CHUNK // BLOCK)):
        g, off = _source_at(src, CHUNK, BLOCK)
        tb = t0 + off
        x = load_rows(X + (head0 + g) * HEAD_DIM, tb, T, stride_t, offs_c, offs_d)
        wz = tl.load(w_base + off + offs_c)
        if HAS_ZW:
            wz = wz * tl.load(ZW + head0 + g + (tb + offs_c) * HX, mask=tb + offs_c < T, other=0.0)
        zmat += dot_f32(tl.trans(x), x * wz[:, None])
    return zmat


@triton.jit
def _z_rows(offs_d, HEAD_DIM: tl.constexpr):
    """[d, d] offsets into a stored z [D] of the upper triangle (a <= b) of its symmetric matrix, and that mask."""
    lo = offs_d[:, None]
    return lo * HEAD_DIM - (lo * (lo - 1)) // 2 + offs_d[None, :] - lo, offs_d[None, :] >= lo


@triton.jit
def _chunk_share_kernel(
    X, Y, W, ZW, OUT, ZOUT,
    T, T_PAD, NUM_CHUNKS, HX, HK, SLOT,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, Z_BLOCK: tl.constexpr,
    G: tl.constexpr, HAS_ZW: tl.constexpr, OP: tl.constexpr,
):
    """Chunk n's own share of an unweighted state, every chunk at once (no recurrence here):

        R_i[j, :] = sum_g sum_t w_t x_ti x_tj y_t      row-block i, j >= i stored
        Z[i, j]   = sum_g sum_t w_t x_ti x_tj zw_t     (zw = 1 without ZW)

    into slot n + SLOT of OUT [B, Hk, N+1, D, d] / ZOUT [B, Hk, N+1, D]; _state_scan_kernel then
    chains the chunks. Per row-block one product (x^T x_i) @ (w y) with the same operands x^T and
    w y for every i, so no phi is built; Z is one product per chunk. The chunk's tokens are read
    BLOCK at a time (a source: one query head of the group and one block of the chunk;
    share_source_tokens), Z's Z_BLOCK at a time (its fp32 tiles).
    """
    n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    offs_c = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    t0 = n * CHUNK
    stride_t = HX * HEAD_DIM
    head0 = (b * T * HX + h * G).to(tl.int64)  # head h G + g of x and y
    w_base = W + bh.to(tl.int64) * T_PAD + t0
    slot = bh.to(tl.int64) * (NUM_CHUNKS + 1) + n + SLOT
    zmat = _share_z(X, ZW, w_base, head0, t0, T, HX, stride_t, tl.arange(0, Z_BLOCK), offs_d, HEAD_DIM, CHUNK,
                    Z_BLOCK, G, HAS_ZW)
    z_off, z_ok = _z_rows(offs_d, HEAD_DIM)
    tl.store(ZOUT + slot * D + z_off, zmat, mask=z_ok)

    # R is symmetric in its row pair (i, j) and stored for j >= i: row-blocks i < d / 2 take every
    # row j, row-blocks i >= d / 2 only the rows j >= d / 2. At d >= 64 two such row-blocks make one
    # product of d rows (their columns x_i on its first operand), half the products and half the
    # operands built; at d = 32 each row-block is a product of 16 rows. H100, 64k tokens, the share kernel's
    # two passes (RESULTS.md, attention kernels, run M): d = 64, C = 256 4.51 / 4.45 -> 4.15 / 4.15
    # ms in pairs; d = 128 48.72 -> 43.22 in halves, then 43.08 / 42.98 -> 35.56 / 35.35 in pairs;
    # d = 32 1.87 -> 1.79 in halves (in pairs 1.88 / 1.89 against 1.78 / 1.79). At d = 64 a
    # row-block's 32-row half alone ran slower (mma instead of wgmma: 4.72 / 4.74 against 4.51 /
    # 4.50) and as its transpose came out wrong on the GPU. With x_i on the first operand in the
    # operand dtype (_row_block_share), run O: d = 64 4.11 -> 3.55, d = 32 1.77 -> 1.66, d = 128
    # 35.52 -> 35.94.
    HALF: tl.constexpr = HEAD_DIM // 2
    SPLIT: tl.constexpr = HALF >= 16  # (a product's rows: at least 16)
    UPPER: tl.constexpr = HALF if SPLIT else HEAD_DIM  # the row-blocks that take every row j
    _share_row_blocks(X, Y, OUT, w_base, head0, t0, T, stride_t, slot, offs_c, offs_d, 0, UPPER, 0, HEAD_DIM,
                      False, HEAD_DIM, D, CHUNK, BLOCK, G, OP)
    if SPLIT and HEAD_DIM >= 64:
        _share_row_blocks(X, Y, OUT, w_base, head0, t0, T, stride_t, slot, offs_c, offs_d, HALF, HALF + HALF // 2,
                          HALF, HEAD_DIM, True, HEAD_DIM, D, CHUNK, BLOCK, G, OP)
    elif SPLIT:
        _share_row_blocks(X, Y, OUT, w_base, head0, t0, T, stride_t, slot, offs_c, offs_d, HALF, HEAD_DIM, HALF,
                          HALF, False, HEAD_DIM, D, CHUNK, BLOCK, G, OP)


@triton.jit
def _share_row_blocks(X, Y, OUT, w_base, head0, t0, T, stride_t, slot, offs_c, offs_d, i0, i1, J0: tl.constexpr,
                      J: tl.constexpr, PAIR: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr, G: tl.constexpr, OP: tl.constexpr):
    """Row-blocks i0 <= i < i1 of a chunk's share, their rows J0 <= j < J0 + J (stored where j >= i):
    R_i[j, :] = sum over the chunk's sources of (x_j^T x_i) @ (w y), one [J, d] product per source.
    PAIR: the rows J0 <= j < d of row-blocks i and i + (i1 - i0) in one product of J = 2 (d - J0) rows,
    (x_j x_i | x_j x_{i + (i1 - i0)})^T @ (w y)."""
    if PAIR:
        r = tl.arange(0, J)
        offs_j = J0 + r % (HEAD_DIM - J0)
        partner = (r // (HEAD_DIM - J0)) * (i1 - i0)  # 0 on the first half of the rows, else the pair's step
    else:
        offs_j = J0 + tl.arange(0, J)
        partner = None
    # a source: one query head of the group, one block of the chunk; or the whole group's chunk (BLOCK > CHUNK)
    SOURCES: tl.constexpr = 1 if BLOCK > CHUNK else G * (CHUNK // BLOCK)
    # Up to two sources (d <= 64: a GQA group of two heads' one block, or one head's two blocks of
    # a 256-token chunk where the chunk is not one source) are read once and held for every
    # row-block. Read again for every row-block (from cache), the two blocks took 8.30 ms against
    # 4.36 held (H100, 64k tokens, d = 64; RESULTS.md, attention kernels, run K), and a group of two
    # at C = 128 5.03 against 3.34 (run L; held, it spills more, 1632 bytes a thread against 1064,
    # ptxas sm_90, and is faster all the same). More sources are read again; two blocks of 64 at
    # d = 128, held, spilled 644 bytes against none and were not timed.
    HELD: tl.constexpr = SOURCES == 1 or (SOURCES == 2 and HEAD_DIM <= 64)
    xt0, wy0, x0, ok0, xt1, wy1, x1, ok1 = None, None, None, None, None, None, None, None
    if HELD:
        xt0, wy0, x0, ok0 = _share_source(X, Y, w_base, head0, t0, T, stride_t, offs_c, offs_d, offs_j, 0,
                                          HEAD_DIM, CHUNK, BLOCK, OP)
        xt1, wy1, x1, ok1 = xt0, wy0, x0, ok0
        if SOURCES == 2:
            xt1, wy1, x1, ok1 = _share_source(X, Y, w_base, head0, t0, T, stride_t, offs_c, offs_d, offs_j, 1,
                                              HEAD_DIM, CHUNK, BLOCK, OP)
    # At d = 32 with one source, row-block i's product is issued before row-block i - 1 is stored
    # (an accumulator carried across the loop), so that the tensor cores work while the store and
    # the next operand go on. H100, 64k tokens, the share kernel's two passes (RESULTS.md, attention
    # kernels, run P): d = 32, C = 128 1.67 / 1.66 -> 1.26 / 1.26 ms. Elsewhere no gain: two sources
    # at d = 32 (a GQA group of two) 1.35 against 1.30 / 1.24 for the plain loop; d = 64, C = 128
    # 3.90 -> 4.02; C = 256 3.60 / 3.57 -> 4.35 / 4.31 (4.28 at its best launch options); d = 128,
    # C = 512 36.00 -> 38.03. There each row-block is stored before the next is computed.
    OVERLAP: tl.constexpr = HEAD_DIM <= 32 and SOURCES == 1
    if OVERLAP:
        acc_prev = _row_block_acc(X, Y, w_base, head0, t0, T, stride_t, offs_c, offs_d, offs_j, i0, i1 - i0, xt0,
                                  wy0, x0, ok0, xt1, wy1, x1, ok1, J, PAIR, HELD, HEAD_DIM, CHUNK, BLOCK, SOURCES, OP)
        for i in range(i0 + 1, i1):
            acc = _row_block_acc(X, Y, w_base, head0, t0, T, stride_t, offs_c, offs_d, offs_j, i, i1 - i0, xt0, wy0,
                                 x0, ok0, xt1, wy1, x1, ok1, J, PAIR, HELD, HEAD_DIM, CHUNK, BLOCK, SOURCES, OP)
            _store_row_block(OUT, acc_prev, i - 1, slot, offs_j, offs_d, partner, PAIR, HEAD_DIM, D)
            acc_prev = acc
        _store_row_block(OUT, acc_prev, i1 - 1, slot, offs_j, offs_d, partner, PAIR, HEAD_DIM, D)
    elif SOURCES == 1:
        # One source: the columns of row-blocks i and i + 1 (an even count here) are read together
        # (_columns), off the row-blocks' critical path. H100, 64k tokens, the share kernel's two
        # passes (RESULTS.md, attention kernels, run Q): d = 64, C = 256 3.27 / 3.26 -> 3.22 / 3.23
        # ms; C = 128 3.89 -> 3.54; a GQA group of two at C = 128 2.63 -> 2.51.
        for i in range(i0, i1, 2):
            xi_a, xi_b = _columns(x0, ok0, i)
            xs_a, xs_b = xi_a, xi_b
            if PAIR:
                xs_a, xs_b = _columns(x0, ok0, i + (i1 - i0))
            acc = _weighted_share(tl.zeros((J, HEAD_DIM), dtype=tl.float32), xt0, wy0, xi_a.to(OP), xs_a.to(OP), PAIR)
            _store_row_block(OUT, acc, i, slot, offs_j, offs_d, partner, PAIR, HEAD_DIM, D)
            acc = _weighted_share(tl.zeros((J, HEAD_DIM), dtype=tl.float32), xt0, wy0, xi_b.to(OP), xs_b.to(OP), PAIR)
            _store_row_block(OUT, acc, i + 1, slot, offs_j, offs_d, partner, PAIR, HEAD_DIM, D)
    else:
        for i in range(i0, i1):
            acc = _row_block_acc(X, Y, w_base, head0, t0, T, stride_t, offs_c, offs_d, offs_j, i, i1 - i0, xt0, wy0,
                                 x0, ok0, xt1, wy1, x1, ok1, J, PAIR, HELD, HEAD_DIM, CHUNK, BLOCK, SOURCES, OP)
            _store_row_block(OUT, acc, i, slot, offs_j, offs_d, partner, PAIR, HEAD_DIM, D)


@triton.jit
def _row_block_acc(X, Y, w_base, head0, t0, T, stride_t, offs_c, offs_d, offs_j, i, step, xt0, wy0, x0, ok0, xt1,
                   wy1, x1, ok1, J: tl.constexpr, PAIR: tl.constexpr, HELD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr, SOURCES: tl.constexpr, OP: tl.constexpr):
    """Row-block i's [J, d] share summed over the chunk's sources: the held ones (xt0 ... ok1, from
    _share_source), or each read again."""
    acc = tl.zeros((J, HEAD_DIM), dtype=tl.float32)
    if HELD:
        acc = _row_block_share(acc, xt0, wy0, x0, ok0, i, step, PAIR, OP)
        if SOURCES == 2:
            acc = _row_block_share(acc, xt1, wy1, x1, ok1, i, step, PAIR, OP)
    else:
        for src in range(SOURCES):
            xt, wy, x_rows, ok = _share_source(X, Y, w_base, head0, t0, T, stride_t, offs_c, offs_d, offs_j, src,
                                               HEAD_DIM, CHUNK, BLOCK, OP)
            acc = _row_block_share(acc, xt, wy, x_rows, ok, i, step, PAIR, OP)
    return acc


@triton.jit
def _store_row_block(OUT, acc, i, slot, offs_j, offs_d, partner, PAIR: tl.constexpr, HEAD_DIM: tl.constexpr,
                     D: tl.constexpr):
    """Store row-block i's [J, d] share acc at its rows offs_j (PAIR: row-block i + partner's for
    the second half) where j >= i."""
    if PAIR:
        rows, row_ok = row_block_rows(i + partner, offs_j, HEAD_DIM)
    else:
        rows, row_ok = row_block_rows(i, offs_j, HEAD_DIM)
    tl.store(OUT + slot * D * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _columns(x_rows, ok, i):
    """x[:, i] and x[:, i + 1] [M] as stored (0 where not ok) of the rows x_rows [M], read as one
    [M, 2] load of 4 bytes a row. (Triton 3.6 does not read it ahead through shared memory, as
    once hoped: it reads it in place and converts it to its users' layout through shared memory,
    with a barrier. Two loads of 2 bytes a row, each in its user's layout, were slower all the same
    in bwd_kv, 3.53 -> 4.31 ms at 64k tokens; RESULTS.md, attention kernels, run W.)"""
    two = tl.arange(0, 2)
    return tl.split(tl.load(x_rows[:, None] + i + two[None, :], mask=ok[:, None], other=0.0))


@triton.jit
def _share_source(X, Y, w_base, head0, t0, T, stride_t, offs_c, offs_d, offs_j, src, HEAD_DIM: tl.constexpr,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr, OP: tl.constexpr):
    """Source `src` of a chunk's share (_source_at): x^T's rows offs_j [J, M] and the weighted
    w y [M, d], both in the product dtype OP, and its x rows' pointers [M] with their mask (for the
    columns x_i). BLOCK > CHUNK: the one source of a GQA group's whole chunk, M = G CHUNK rows, row
    g CHUNK + t that of head g, token t0 + t."""
    if BLOCK > CHUNK:
        g_rows = offs_c // CHUNK
        tok = t0 + offs_c % CHUNK
        ok = tok < T
        x_rows = X + (head0 + g_rows) * HEAD_DIM + tok * stride_t
        xt = tl.trans(tl.load(x_rows[:, None] + offs_j[None, :], mask=ok[:, None], other=0.0).to(OP))
        w = tl.load(w_base + offs_c % CHUNK)
        y = tl.load((Y + (head0 + g_rows) * HEAD_DIM + tok * stride_t)[:, None] + offs_d[None, :], mask=ok[:, None],
                    other=0.0)
        wy = (w[:, None] * y.to(tl.float32)).to(OP)
    else:
        g, off = _source_at(src, CHUNK, BLOCK)
        tb = t0 + off
        x_head = X + (head0 + g) * HEAD_DIM
        xt = tl.trans(load_tile(x_head, tb, T, stride_t, offs_c, offs_j).to(OP))
        w = tl.load(w_base + off + offs_c)
        wy = (w[:, None] * load_rows(Y + (head0 + g) * HEAD_DIM, tb, T, stride_t, offs_c, offs_d)).to(OP)
        x_rows = x_head + (tb + offs_c) * stride_t
        ok = tb + offs_c < T
    return xt, wy, x_rows, ok


@triton.jit
def _row_block_share(acc, xt, wy, x_rows, ok, i, step, PAIR: tl.constexpr, OP: tl.constexpr):
    """acc [J, d] + (x_J^T x_i) @ (w y), rows J of row-block i of one source's share (_share_source);
    PAIR: acc + (x_J^T * x_i on the first J / 2 rows, * x_{i + step} on the others) @ (w y).

    The column x_i weights the first operand, built in registers in the operand dtype: for 16-bit
    inputs two multiplies an instruction (packed), no conversions, and the tensor cores read it
    from registers; w y, the same for every row-block, stays in shared memory."""
    xi = tl.load(x_rows + i, mask=ok, other=0.0).to(OP)
    xs = xi
    if PAIR:
        xs = tl.load(x_rows + i + step, mask=ok, other=0.0).to(OP)
    return _weighted_share(acc, xt, wy, xi, xs, PAIR)


@triton.jit
def _weighted_share(acc, xt, wy, xi, xs, PAIR: tl.constexpr):
    """acc [J, d] + (xt * xi) @ wy (xt [J, M] and wy [M, d] from _share_source, the columns xi, xs
    [M] in the operand dtype); PAIR: xi weights the first half of xt's rows, xs the others."""
    if PAIR:
        first = tl.arange(0, xt.shape[0]) < xt.shape[0] // 2
        acc = tl.dot(xt * tl.where(first[:, None], xi[None, :], xs[None, :]), wy, acc)
    else:
        acc = tl.dot(xt * xi[None, :], wy, acc)
    return acc


@triton.jit
def _slot_inner_product(acc, zacc, FSTATES, FZ, MULT, DBETA, slot, s_off, offs_r, r_ok, NUM_SLOTS, D: tl.constexpr,
                        HEAD_DIM: tl.constexpr):
    """This program's rows of <dR, R> + <dZ, Z> for one slot, the full symmetric tensors (MULT [D]:
    2 for an off-diagonal pair, which stands for two entries, 1 on the diagonal), into
    DBETA [B Hk, N + 1, row blocks]."""
    bh = tl.program_id(1)
    r = tl.load(FSTATES + (bh.to(tl.int64) * NUM_SLOTS + slot) * D * HEAD_DIM + s_off, mask=r_ok[:, None], other=0.0)
    z = tl.load(FZ + (bh.to(tl.int64) * NUM_SLOTS + slot) * D + offs_r, mask=r_ok, other=0.0)
    mult = tl.load(MULT + offs_r, mask=r_ok, other=0.0)
    part = tl.sum(mult * (tl.sum(acc * r.to(tl.float32), axis=1) + zacc * z), axis=0)
    tl.store(DBETA + (bh.to(tl.int64) * NUM_SLOTS + slot) * tl.num_programs(0) + tl.program_id(0), part)


@triton.jit
def _state_scan_kernel(
    STATES, ZSTATES, DECAY, S0, Z0, SF, ZF, FSTATES, FZ, MULT, DBETA,
    NUM_CHUNKS,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, REVERSE: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_DOT: tl.constexpr,
):
    """Chain the chunks' own shares into the states, in place, for BLOCK_R rows of one head.

    Forward (slot n + 1 holds chunk n's share):  R_0 = S0 (or 0), R_{n+1} = decay_n R_n + share_n.
    Reverse (slot n holds chunk n's share):      R_N = S0 (or 0), R_n = decay_n R_{n+1} + share_n.
    Every slot then holds its state; forward, SF/ZF get R_N in fp32. Memory-bound: each slot is
    read and written once, the next one's load issued first. HAS_DOT (reverse, the gradients dR):
    also each slot's inner product with the forward states FSTATES / FZ (_slot_inner_product),
    the gradient of the decay that the slot's state carries.
    """
    r0 = tl.program_id(0) * BLOCK_R
    bh = tl.program_id(1)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    r_ok = offs_r < D
    s_off = offs_r[:, None] * HEAD_DIM + offs_d[None, :]
    st_base = STATES + bh.to(tl.int64) * (NUM_CHUNKS + 1) * D * HEAD_DIM
    z_base = ZSTATES + bh.to(tl.int64) * (NUM_CHUNKS + 1) * D
    decay_base = DECAY + bh.to(tl.int64) * NUM_CHUNKS

    if HAS_INIT:
        acc = tl.load(S0 + bh.to(tl.int64) * D * HEAD_DIM + s_off, mask=r_ok[:, None], other=0.0).to(tl.float32)
        zacc = tl.load(Z0 + bh.to(tl.int64) * D + offs_r, mask=r_ok, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_R, HEAD_DIM), dtype=tl.float32)
        zacc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    first = NUM_CHUNKS if REVERSE else 0
    tl.store(st_base + first * D * HEAD_DIM + s_off, acc, mask=r_ok[:, None])
    tl.store(z_base + first * D + offs_r, zacc, mask=r_ok)
    if HAS_DOT:
        _slot_inner_product(acc, zacc, FSTATES, FZ, MULT, DBETA, first, s_off, offs_r, r_ok, NUM_CHUNKS + 1, D,
                            HEAD_DIM)

    step = -1 if REVERSE else 1
    slot = NUM_CHUNKS * 0 + (NUM_CHUNKS - 1 if REVERSE else 1)  # a tensor from the start: it is loop-carried
    share = tl.load(st_base + slot * D * HEAD_DIM + s_off, mask=r_ok[:, None], other=0.0)
    zshare = tl.load(z_base + slot * D + offs_r, mask=r_ok, other=0.0)
    for it in range(NUM_CHUNKS):
        n = NUM_CHUNKS - 1 - it if REVERSE else it  # the chunk whose share is in `slot`
        nxt = tl.minimum(tl.maximum(slot + step, 0), NUM_CHUNKS)
        share_next = tl.load(st_base + nxt * D * HEAD_DIM + s_off, mask=r_ok[:, None], other=0.0)
        zshare_next = tl.load(z_base + nxt * D + offs_r, mask=r_ok, other=0.0)
        decay = tl.load(decay_base + n)
        acc = acc * decay + share.to(tl.float32)
        zacc = zacc * decay + zshare
        tl.store(st_base + slot * D * HEAD_DIM + s_off, acc, mask=r_ok[:, None])
        tl.store(z_base + slot * D + offs_r, zacc, mask=r_ok)
        if HAS_DOT:
            _slot_inner_product(acc, zacc, FSTATES, FZ, MULT, DBETA, slot, s_off, offs_r, r_ok, NUM_CHUNKS + 1, D,
                                HEAD_DIM)
        share, zshare, slot = share_next, zshare_next, slot + step

    if not REVERSE:
        tl.store(SF + bh.to(tl.int64) * D * HEAD_DIM + s_off, acc, mask=r_ok[:, None])
        tl.store(ZF + bh.to(tl.int64) * D + offs_r, zacc, mask=r_ok)


@triton.jit
def _block_gates(g_ptr, c0, t0, T, stride_t, offs_c, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_GATE: tl.constexpr):
    """Running sums b [BLOCK] of the log-gates of tokens t0 + offs_c from the start c0 of their
    chunk (b_t = sum_{u = c0}^{t} g_u), and the chunk's total (a scalar)."""
    b, total = chunk_gates(g_ptr, t0, T, stride_t, offs_c, HAS_GATE)
    if CHUNK > BLOCK:  # the gates of the chunk's earlier blocks, and of its later ones for the total
        offs = tl.arange(0, CHUNK)
        g = load_gates(g_ptr, c0, T, stride_t, offs, HAS_GATE)
        b += tl.sum(tl.where(c0 + offs < t0, g, 0.0), axis=0)
        total = tl.sum(g, axis=0)
    return b, total


@triton.jit
def _intra_scores(q, k, bq, bk, tq, tk, OP: tl.constexpr):
    """Scores of query rows at tokens tq [M] against keys at tokens tk [N] of the same chunk:
    x = (s q) k^T [M, N], decay exp(b_t - b_j) (0 where the key comes after the query),
    A = x^2 decay; b_t, b_j both from the chunk start."""
    x = tl.dot(q.to(OP), tl.trans(k.to(OP)))
    decay = tl.exp(tl.where(tq[:, None] >= tk[None, :], bq[:, None] - bk[None, :], float("-inf")))
    return x, decay, x * x * decay


@triton.jit
def _key_block(q, bq, k_base, v_base, lg_base, c0, j0, t0, T, HK, offs_c, offs_d, HEAD_DIM: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_GATE: tl.constexpr, OP: tl.constexpr):
    """The key block at j0 of the chunk at c0, for the query block at t0 (q [M, d], gates bq): its
    k and v as stored and its scores x, decay, A (_intra_scores)."""
    k = load_tile(k_base, j0, T, HK * HEAD_DIM, offs_c, offs_d)
    bk, _ = _block_gates(lg_base, c0, j0, T, HK, offs_c, CHUNK, BLOCK, HAS_GATE)
    x, decay, a = _intra_scores(q, k, bq, bk, t0 + offs_c, j0 + offs_c, OP)
    return k, load_tile(v_base, j0, T, HK * HEAD_DIM, offs_c, offs_d), x, decay, a


@triton.jit
def _column(x_base, t0, T, stride_t, offs_c, i):
    """x[:, i] [C] as stored (0 past T) of the tokens t0 + offs_c."""
    return tl.load(x_base + (t0 + offs_c) * stride_t + i, mask=t0 + offs_c < T, other=0.0)


@triton.jit
def _column_pair(x_base, t0, T, stride_t, offs_c, i):
    """x[:, i] and x[:, i + 1] [C] as stored (0 past T) of the tokens t0 + offs_c (_columns)."""
    t = t0 + offs_c
    return _columns(x_base + t * stride_t, t < T, i)


@triton.jit
def _row_block_query(acc, a, col, x_base, st_base, i, rows, t0, T, stride_t, x_scale, offs_c, offs_d,
                     HEAD_DIM: tl.constexpr, TRANS: tl.constexpr, RAW_X: tl.constexpr, OP: tl.constexpr):
    """acc + x_i (a @ R_i[rows]) ([C, d] fp32; TRANS: a @ R_i[rows]^T), R_i[j] = R[(min(i, j), max(i, j))]
    the rows j in `rows` of the stored unweighted state's row-block i; x_i = x_scale * x[:, i], read
    from memory (the tile is in cache) rather than cut out of registers: col, read ahead with the
    next row-block's (_column_pair), or None to read it here.

    Without TRANS, x_i weights the first operand in the operand dtype (packed multiplies for
    16-bit inputs) and the product accumulates into acc, with no [C, d] multiply-add in fp32: H100,
    forward kernel at 64k tokens, d = 64 2.10 -> 2.03 ms, d = 32 0.96 -> 1.01 (RESULTS.md,
    attention kernels, run O). With TRANS (the query-side backward) that form pays only at d = 128
    (bwd_q 16.55 -> 15.71 ms, but d = 64 2.53 -> 2.65, d = 32 1.04 -> 1.10; run P): RAW_X (TRANS
    only, _query_full_tiles decides) puts x[:, i] as stored on the operand and leaves x_scale to the
    caller, who puts it on the sum; otherwise the weight goes on the product, in fp32."""
    r_i = tl.load(st_base + full_tile_rows(i, rows, HEAD_DIM)[:, None] * HEAD_DIM + offs_d[None, :])
    if col is None:
        col = _column(x_base, t0, T, stride_t, offs_c, i)
    if not TRANS:
        xi = col.to(tl.float32) * x_scale
        acc = tl.dot(a * xi.to(OP)[:, None], r_i.to(OP), acc)
    elif RAW_X:
        acc = tl.dot(a * col.to(OP)[:, None], tl.trans(r_i.to(OP)), acc)
    else:
        xi = col.to(tl.float32) * x_scale
        acc += xi[:, None] * tl.dot(a, tl.trans(r_i.to(OP)))
    return acc


@triton.jit
def _row_blocks_query(acc, a, x_base, st_base, i0: tl.constexpr, i1: tl.constexpr, rows, t0, T, stride_t, x_scale,
                      offs_c, offs_d, HEAD_DIM: tl.constexpr, TRANS: tl.constexpr, RAW_X: tl.constexpr,
                      PAIRS: tl.constexpr, OP: tl.constexpr):
    """_row_block_query over the row-blocks i0 <= i < i1; PAIRS: two at a time, their columns read
    together ahead of them (_column_pair; i1 - i0 even)."""
    for i in range(i0, i1, 2 if PAIRS else 1):
        col_a, col_b = None, None
        if PAIRS:
            col_a, col_b = _column_pair(x_base, t0, T, stride_t, offs_c, i)
        acc = _row_block_query(acc, a, col_a, x_base, st_base, i, rows, t0, T, stride_t, x_scale, offs_c, offs_d,
                               HEAD_DIM, TRANS, RAW_X, OP)
        if PAIRS:
            acc = _row_block_query(acc, a, col_b, x_base, st_base, i + 1, rows, t0, T, stride_t, x_scale, offs_c,
                                   offs_d, HEAD_DIM, TRANS, RAW_X, OP)
    return acc


@triton.jit
def _row_block_pair_query(acc, a_dup, col1, col2, x_base, st_base, i, cols, second, t0, T, stride_t, x_scale,
                          offs_c, offs_d, HEAD_DIM: tl.constexpr, OP: tl.constexpr):
    """acc + the state query of row-blocks i and i + d/4 against their rows j >= d/2 stacked, in one
    product of inner size d (_query_full_tiles): a_dup [C, d] (a's upper half twice) weighted by
    x_scale x[:, i] (col1) on its first half of columns, x_scale x[:, i + d/4] (col2) on the second;
    col1 and col2 None: read here."""
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = full_tile_rows(i + second.to(tl.int32) * (HALF // 2), cols, HEAD_DIM)
    r_pair = tl.load(st_base + rows[:, None] * HEAD_DIM + offs_d[None, :])
    if col1 is None:
        col1 = _column(x_base, t0, T, stride_t, offs_c, i)
        col2 = _column(x_base, t0, T, stride_t, offs_c, i + HALF // 2)
    x1 = (col1.to(tl.float32) * x_scale).to(OP)
    x2 = (col2.to(tl.float32) * x_scale).to(OP)
    return tl.dot(a_dup * tl.where(second[None, :], x2[:, None], x1[:, None]), r_pair.to(OP), acc)


@triton.jit
def _query_full_tiles(a, x_base, st_base, t0, T, stride_t, x_scale, a_scale, offs_c, offs_d,
                      HEAD_DIM: tl.constexpr, TRANS: tl.constexpr, OP: tl.constexpr):
    """sum_i x_i (a @ R_i) ([C, d] fp32; TRANS: a @ R_i^T) over the full tiles R_i of a stored
    unweighted state: one product and one multiply-add per row-block, no phi. a [C, d] in the
    operand dtype, a = a_scale * x where the symmetry is used (below); x_i = x_scale * x[:, i].

    Without TRANS (a state query, sum_ij x_i a_j R[(i, j)]) the symmetry of R in (i, j) halves the
    products of the lower half: with h = d / 2, the pairs i, j >= h are taken once each order (as
    full tiles), the pairs i < h <= j once with weight 2 (a's upper half doubled: exact), the pairs
    i >= h > j not at all. So row-blocks i < h multiply the whole [C, d] operand, row-blocks
    i >= h only its upper half against their rows j >= h: 3/4 of the products (at d >= 64 two of
    those row-blocks at a time, below)."""
    acc = tl.zeros((a.shape[0], HEAD_DIM), dtype=tl.float32)
    HALF: tl.constexpr = HEAD_DIM // 2
    SPLIT: tl.constexpr = (not TRANS) and HALF >= 16  # (a product's inner size is at least 16)
    # Row-blocks in twos, their columns read together ahead of them (_column_pair), where that was
    # faster: H100, 64k tokens (RESULTS.md, attention kernels, run Q), the query-side backward at d
    # = 64, C = 256 2.54 / 2.53 -> 2.40 / 2.38 ms, d = 32 1.03 -> 0.91; the forward at d = 32 1.01 ->
    # 0.92, but at d = 64 2.04 -> 2.45, and at d = 128 the buffers they take ahead overflow shared
    # memory.
    PAIRS: tl.constexpr = HEAD_DIM <= (64 if TRANS else 32)
    STEP: tl.constexpr = 2 if PAIRS else 1
    if SPLIT:
        a = (a.to(tl.float32) * tl.where(offs_d >= HALF, 2.0, 1.0)[None, :]).to(OP)
        acc = _row_blocks_query(acc, a, x_base, st_base, 0, HALF, offs_d, t0, T, stride_t, x_scale, offs_c, offs_d,
                                HEAD_DIM, TRANS, False, PAIRS, OP)
        if HEAD_DIM >= 64:
            # row-blocks i and i + h/2 in one product of inner size d: a's upper half twice, weighted
            # by x_i and x_{i+h/2} on the operand, against their rows j >= h stacked, accumulated in
            # the product. H100, forward kernel at 64k tokens: 2.27 / 2.25 -> 2.10 / 2.10 ms (16 / 8
            # heads: 2.14 -> 1.92); d = 128 13.32 -> 12.66 (RESULTS.md, attention kernels, run M; at d
            # = 128 through check_gpu.py in run O). d = 32 takes the halves below.
            r = tl.arange(0, HEAD_DIM)
            cols = HALF + r % HALF
            second = r >= HALF
            a_dup = (load_rows(x_base, t0, T, stride_t, offs_c, cols) * a_scale).to(OP)
            for i in range(HALF, HALF + HALF // 2, STEP):
                x1a, x1b, x2a, x2b = None, None, None, None
                if PAIRS:
                    x1a, x1b = _column_pair(x_base, t0, T, stride_t, offs_c, i)
                    x2a, x2b = _column_pair(x_base, t0, T, stride_t, offs_c, i + HALF // 2)
                acc = _row_block_pair_query(acc, a_dup, x1a, x2a, x_base, st_base, i, cols, second, t0, T, stride_t,
                                            x_scale, offs_c, offs_d, HEAD_DIM, OP)
                if PAIRS:
                    acc = _row_block_pair_query(acc, a_dup, x1b, x2b, x_base, st_base, i + 1, cols, second, t0, T,
                                                stride_t, x_scale, offs_c, offs_d, HEAD_DIM, OP)
        else:
            offs_h = HALF + tl.arange(0, HALF)
            a_hi = (load_rows(x_base, t0, T, stride_t, offs_c, offs_h) * a_scale).to(OP)
            acc = _row_blocks_query(acc, a_hi, x_base, st_base, HALF, HEAD_DIM, offs_h, t0, T, stride_t, x_scale,
                                    offs_c, offs_d, HEAD_DIM, TRANS, False, PAIRS, OP)
    else:
        # TRANS at d >= 128: x_i as stored on the operand, x_scale once on the sum (_row_block_query)
        RAW_X: tl.constexpr = TRANS and HEAD_DIM >= 128
        acc = _row_blocks_query(acc, a, x_base, st_base, 0, HEAD_DIM, offs_d, t0, T, stride_t, x_scale, offs_c,
                                offs_d, HEAD_DIM, TRANS, RAW_X, PAIRS, OP)
        if RAW_X:
            acc = acc * x_scale
    return acc


@triton.jit
def _query_block(Q, K, V, LG, STATES, ZSTATES, T, NUM_CHUNKS, HQ, HK, scale,
                 HEAD_DIM: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_GATE: tl.constexpr):
    """What a program over block m of one query head (grid (N CHUNK / BLOCK, B Hq)) starts from:
    the block's place s in its chunk and the chunk's first token c0, its batch row b and query
    head hq, the offsets offs_c, offs_d and first token t0, the query head's base pointer, the
    block's s q ([M, d] fp32), the base pointers of its kv head's k, v and log-gates, the gates'
    running sums b [M] from the chunk start, and the pointers to the kv head's state R_n and Z_n
    at the chunk start.

    k and v are left in memory: the kernels run the state part first and load them after it, so
    that fewer [M, d] tiles are live at once (register spills cost more than the loads)."""
    m = tl.program_id(0)
    n = m // (CHUNK // BLOCK)
    bhq = tl.program_id(1)
    b = bhq // HQ
    hq = bhq % HQ
    h = hq // (HQ // HK)
    bh = b * HK + h
    offs_c = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    t0 = m * BLOCK
    c0 = n * CHUNK
    q_base = Q + (b * T * HQ + hq).to(tl.int64) * HEAD_DIM
    kv_base = (b * T * HK + h).to(tl.int64) * HEAD_DIM
    q = load_rows(q_base, t0, T, HQ * HEAD_DIM, offs_c, offs_d) * scale
    lg_base = LG + b.to(tl.int64) * T * HK + h
    bcum, _ = _block_gates(lg_base, c0, t0, T, HK, offs_c, CHUNK, BLOCK, HAS_GATE)
    slot = bh.to(tl.int64) * (NUM_CHUNKS + 1) + n
    return (m % (CHUNK // BLOCK), c0, b, hq, offs_c, offs_d, t0, q_base, q, K + kv_base, V + kv_base, lg_base,
            bcum, STATES + slot * D * HEAD_DIM, ZSTATES + slot * D)


@triton.jit
def _chunk_fwd_kernel(
    Q, K, V, LG, STATES, ZSTATES, Y, DEN,
    T, NUM_CHUNKS, HQ, HK, scale, eps,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    HAS_GATE: tl.constexpr, OP: tl.constexpr,
):
    s, c0, b, hq, offs_c, offs_d, t0, q_base, q, k_base, v_base, lg_base, bcum, st_base, z_base = _query_block(
        Q, K, V, LG, STATES, ZSTATES, T, NUM_CHUNKS, HQ, HK, scale, HEAD_DIM, D, CHUNK, BLOCK, HAS_GATE)

    # The state carried from earlier chunks (unweighted R_n, Z_n): sum_i q_i (q @ R_i) and q^T Z q,
    # decayed from the chunk start to each query (e^{b_t} <= 1).
    qdec = tl.exp(bcum)
    num = qdec[:, None] * _query_full_tiles(q.to(OP), q_base, st_base, t0, T, HQ * HEAD_DIM, scale, scale,
                                            offs_c, offs_d, HEAD_DIM, False, OP)
    den = qdec * tl.sum(dot_f32(q, load_sym_matrix(z_base, HEAD_DIM)) * q, axis=1)

    # Chunk-local attention: the chunk's blocks up to this one.
    for sp in range(s + 1):
        k, v, x_unused, decay_unused, a = _key_block(q, bcum, k_base, v_base, lg_base, c0, c0 + sp * BLOCK, t0, T, HK,
                                                     offs_c, offs_d, HEAD_DIM, CHUNK, BLOCK, HAS_GATE, OP)
        num += tl.dot(a.to(OP), v.to(OP))
        den += tl.sum(a, axis=1)
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
    HEAD_DIM: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    HAS_GATE: tl.constexpr, OP: tl.constexpr,
):
    """dq of block m for one query head, and dL/db_t from the query side (DBQ [B, T_PAD, Hq])."""
    s, c0, b, hq, offs_c, offs_d, t0, q_base, q, k_base, v_base, lg_base, bcum, st_base, z_base = _query_block(
        Q, K, V, LG, STATES, ZSTATES, T, NUM_CHUNKS, HQ, HK, scale, HEAD_DIM, D, CHUNK, BLOCK, HAS_GATE)
    do = load_tile(DO + (b * T * HQ + hq).to(tl.int64) * HEAD_DIM, t0, T, HQ * HEAD_DIM, offs_c, offs_d).to(OP)
    delta = tl.load(DELTA + (b * T * HQ + hq).to(tl.int64) + (t0 + offs_c) * HQ, mask=t0 + offs_c < T, other=0.0)

    # The state's part, with the unweighted R_n, Z_n symmetric: the loss term e^{b_t} (do_t .
    # sum_ij q_i q_j R_i[j] + delta_t q^T Z q) has gradient 2 e^{b_t} U_t with
    # U = sum_i q_i (do @ R_i^T) + delta (q @ Z), and its b_t-derivative is e^{b_t} q_t . U_t.
    u = _query_full_tiles(do, q_base, st_base, t0, T, HQ * HEAD_DIM, scale, 1.0, offs_c, offs_d, HEAD_DIM, True, OP)
    u += delta[:, None] * dot_f32(q, load_sym_matrix(z_base, HEAD_DIM))
    qdec = tl.exp(bcum)
    dqs = (2.0 * qdec)[:, None] * u  # the gradient with respect to s q
    db = qdec * tl.sum(q * u, axis=1)

    # Chunk-local attention: the chunk's blocks up to this one.
    for sp in range(s + 1):
        k, v, x, decay, a = _key_block(q, bcum, k_base, v_base, lg_base, c0, c0 + sp * BLOCK, t0, T, HK, offs_c, offs_d,
                                       HEAD_DIM, CHUNK, BLOCK, HAS_GATE, OP)
        da = tl.dot(do, tl.trans(v.to(OP))) + delta[:, None]
        db += tl.sum(da * a, axis=1)
        dx = 2.0 * da * x * decay
        dqs += tl.dot(dx.to(OP), k.to(OP))

    t = t0 + offs_c
    tl.store(DQ + (b * T * HQ + hq).to(tl.int64) * HEAD_DIM + t[:, None] * (HQ * HEAD_DIM) + offs_d[None, :],
             dqs * scale, mask=(t < T)[:, None])
    tl.store(DBQ + (b * T_PAD * HQ + hq).to(tl.int64) + t * HQ, db)


@triton.jit
def _key_row_block(dv, v2, kop, vop, col, c, dst_base, i, offs_d, HEAD_DIM: tl.constexpr, OP: tl.constexpr):
    """Row-block i of the key-side backward's state part (_chunk_bwd_kv_kernel): dv + (c k_i) (k @
    dR_i), V2 + k_i (v @ dR_i^T), with col = k[:, i] as stored (read ahead, _column_pair)."""
    dr_i = tl.load(dst_base + full_tile_rows(i, offs_d, HEAD_DIM)[:, None] * HEAD_DIM + offs_d[None, :]).to(OP)
    ki = col.to(tl.float32)
    dv += (c * ki)[:, None] * tl.dot(kop, dr_i)
    v2 += ki[:, None] * tl.dot(vop, tl.trans(dr_i))
    return dv, v2


@triton.jit
def _chunk_bwd_kv_kernel(
    Q, K, V, LG, DSTATES, DZSTATES, DBETA, DO, DELTA, DK, DV, DBK,
    T, T_PAD, NUM_CHUNKS, HQ, HK, scale,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    HAS_GATE: tl.constexpr, OP: tl.constexpr, QROWS: tl.constexpr,
):
    """dk, dv of block m for one kv head (its whole query group) and dL/db_j from the key side
    (DBK [B, T_PAD, Hk]; the chunk total's gradient, DBETA [B Hk, N + 1] at slot n + 1 from the
    reverse scan, added at the chunk's last position; without gates (HAS_GATE) the reverse scan makes no
    DBETA, this kernel reads none, and nothing reads DBK)."""
    m = tl.program_id(0)
    SUB: tl.constexpr = CHUNK // BLOCK
    n = m // SUB
    s = m % SUB
    bh = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    G = HQ // HK
    offs_c = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    t0 = m * BLOCK
    c0 = n * CHUNK
    kv_base = (b * T * HK + h).to(tl.int64) * HEAD_DIM
    lg_base = LG + b.to(tl.int64) * T * HK + h
    bcum, total = _block_gates(lg_base, c0, t0, T, HK, offs_c, CHUNK, BLOCK, HAS_GATE)

    # The keys' share of the state after the chunk, R_{n+1} = e^beta R_n + sum_j c_j k_j k_j v_j^T
    # (Z likewise without v), unweighted and symmetric: dv_j = c_j sum_i k_i (k_j @ dR_i),
    # dk_j = 2 c_j V2_j with V2 = sum_i k_i (v @ dR_i^T) + k @ dZ, and dL/db_j = -c_j k_j . V2_j.
    # First, while few tiles are live: only k and v in the operand dtype and two accumulators.
    c = tl.exp(total - bcum)
    slot = bh.to(tl.int64) * (NUM_CHUNKS + 1) + n + 1
    dst_base = DSTATES + slot * D * HEAD_DIM
    kop = load_tile(K + kv_base, t0, T, HK * HEAD_DIM, offs_c, offs_d).to(OP)
    vop = load_tile(V + kv_base, t0, T, HK * HEAD_DIM, offs_c, offs_d).to(OP)
    dv = tl.zeros((BLOCK, HEAD_DIM), dtype=tl.float32)
    v2 = tl.zeros((BLOCK, HEAD_DIM), dtype=tl.float32)
    # Row-blocks in twos, their key columns read together ahead of them (_column_pair): H100, 64k
    # tokens (RESULTS.md, attention kernels): d = 64, C = 256 4.36 / 4.34 -> 3.56 / 3.53 ms, d = 32
    # 1.16 -> 1.03 (run Q); d = 128, C = 512 26.74 / 26.86 -> 24.77 / 24.67 (run R; 229632 bytes of
    # shared memory at its launch of 8 warps, 3 stages, within the H100's 232448).
    for i in range(0, HEAD_DIM, 2):
        ki_a, ki_b = _column_pair(K + kv_base, t0, T, HK * HEAD_DIM, offs_c, i)
        dv, v2 = _key_row_block(dv, v2, kop, vop, ki_a, c, dst_base, i, offs_d, HEAD_DIM, OP)
        dv, v2 = _key_row_block(dv, v2, kop, vop, ki_b, c, dst_base, i + 1, offs_d, HEAD_DIM, OP)
    k = load_rows(K + kv_base, t0, T, HK * HEAD_DIM, offs_c, offs_d)
    v2 += dot_f32(k, load_sym_matrix(DZSTATES + slot * D, HEAD_DIM))
    dk = (2.0 * c)[:, None] * v2
    db = -c * tl.sum(k * v2, axis=1)  # (the loop below reads k in the operand dtype only: fewer live registers)
    if HAS_GATE:  # every term of R_{n+1} carries e^beta (b_j held fixed): dL/dbeta = <dR_{n+1}, R_{n+1}>
        db += tl.where((offs_c == BLOCK - 1) & (s == SUB - 1), tl.load(DBETA + slot), 0.0)

    # Chunk-local attention: the chunk's queries from this block on, QROWS at a time (smaller score
    # tiles: fewer live registers), every query head of the group.
    offs_q = tl.arange(0, QROWS)
    for qb in range(s * (BLOCK // QROWS), SUB * (BLOCK // QROWS)):
        tq0 = c0 + qb * QROWS
        bq, _ = _block_gates(lg_base, c0, tq0, T, HK, offs_q, CHUNK, QROWS, HAS_GATE)
        for g in range(G):
            hq = h * G + g
            q = (load_rows(Q + (b * T * HQ + hq).to(tl.int64) * HEAD_DIM, tq0, T, HQ * HEAD_DIM, offs_q, offs_d)
                 * scale).to(OP)
            do = load_tile(DO + (b * T * HQ + hq).to(tl.int64) * HEAD_DIM, tq0, T, HQ * HEAD_DIM, offs_q,
                           offs_d).to(OP)
            delta = tl.load(DELTA + (b * T * HQ + hq).to(tl.int64) + (tq0 + offs_q) * HQ, mask=tq0 + offs_q < T,
                            other=0.0)
            x, decay, a = _intra_scores(q, kop, bq, bcum, tq0 + offs_q, t0 + offs_c, OP)
            da = tl.dot(do, tl.trans(vop)) + delta[:, None]
            dv += tl.dot(tl.trans(a.to(OP)), do)
            db -= tl.sum(da * a, axis=0)
            dx = 2.0 * da * x * decay
            dk += tl.dot(tl.trans(dx.to(OP)), q)

    t = t0 + offs_c
    t_ok = (t < T)[:, None]
    out_off = kv_base + t[:, None] * (HK * HEAD_DIM) + offs_d[None, :]
    tl.store(DK + out_off, dk, mask=t_ok)
    tl.store(DV + out_off, dv, mask=t_ok)
    tl.store(DBK + (b * T_PAD * HK + h).to(tl.int64) + t * HK, db)


# ----------------------------------------------------------------------------------
# The log-gates around the state kernels (one launch each, where a handful of torch operations
# over every token took one launch apiece)
# ----------------------------------------------------------------------------------


@triton.jit
def _gate_weights_kernel(LG, W, DECAY, T, T_PAD, NUM_CHUNKS, HK, scale, CHUNK: tl.constexpr, TO_END: tl.constexpr):
    """Chunk n of head bh (grid (N, B Hk)): the state pass's token weights W [B, Hk, T_PAD] (scale
    e^{beta - b_t} with TO_END, else scale e^{b_t}; b the chunk-local running sum of LG [B, T, Hk],
    beta its total, tokens past T with g = 0) and the chunk's decay DECAY [B, Hk, N] = e^beta."""
    n = tl.program_id(0)
    bh = tl.program_id(1)
    offs = tl.arange(0, CHUNK)
    b_run, total = chunk_gates(LG + (bh // HK).to(tl.int64) * T * HK + bh % HK, n * CHUNK, T, HK, offs, True)
    if TO_END:
        w = tl.exp(total - b_run)
    else:
        w = tl.exp(b_run)
    tl.store(W + bh.to(tl.int64) * T_PAD + n * CHUNK + offs, w * scale)
    tl.store(DECAY + bh.to(tl.int64) * NUM_CHUNKS + n, tl.exp(total))


@triton.jit
def _gate_grad_kernel(DBQ, DBK, DLG, T, T_PAD, HQ, HK, CHUNK: tl.constexpr, G: tl.constexpr):
    """Chunk n of kv head h of row b (grid (N, B Hk)): dL/dlog_g [B, T, Hk] from dL/db, the key
    side DBK [B, T_PAD, Hk] plus the query side DBQ [B, T_PAD, Hq] of the group's G heads. b_t is
    the sum of the chunk's g_u for u <= t, so dL/dg_u = sum_{t >= u in the chunk} dL/db_t."""
    n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    t = n * CHUNK + tl.arange(0, CHUNK)
    db = tl.load(DBK + (b * T_PAD * HK + h).to(tl.int64) + t * HK)
    for g in range(G):
        db += tl.load(DBQ + (b * T_PAD * HQ + h * G + g).to(tl.int64) + t * HQ)
    tl.store(DLG + (b * T * HK + h).to(tl.int64) + t * HK, tl.cumsum(db, axis=0, reverse=True), mask=t < T)


# ----------------------------------------------------------------------------------
# Launchers (plain functions of tensors; the custom ops in triton_power wrap them)
# ----------------------------------------------------------------------------------


#: the longest chunk: its gates are one [CHUNK] vector in a program
MAX_CHUNK = 1024
#: the largest block of tokens a program holds as one tile (64 at d = 128, to fit on chip)
MAX_BLOCK = 128


def kernel_tiles(chunk_size: int, head_dim: int) -> tuple[int, int]:
    """(chunk, block) the kernels use: the chunk, between two stored states, is `chunk_size`
    rounded up to a power of two in [16, MAX_CHUNK]; the block, the tokens one program holds as
    a tile, is at most MAX_BLOCK (half that at d = 128, to fit on chip). A chunk of up to
    MAX_BLOCK tokens is one block (so at d = 128 chunks of 128 become 64, as the kernels always
    ran them); a longer one spans several: fewer stored states, a little more chunk-local work.
    Chunking changes only rounding, not the result."""
    chunk = min(1 << max(4, math.ceil(math.log2(max(1, chunk_size)))), MAX_CHUNK)
    block = min(chunk, MAX_BLOCK // 2 if head_dim > 64 else MAX_BLOCK)
    return (block if chunk <= MAX_BLOCK else chunk), block


def query_backward_block(block: int, head_dim: int, op) -> int:
    """The block of the query-side backward (_chunk_bwd_q_kernel): the kernels' block, but at most 32
    tokens for fp32 operands at d = 128, where its tiles at blocks of 64 take 262144 bytes of shared
    memory, over the H100's 232448 a program (sm_90 compile, Triton 3.6; 114816 at 32). Its grid and
    outputs are per token, so it need not share the other kernels' block."""
    return min(block, 32) if (op == tl.float32 and head_dim > 64) else block


def share_source_tokens(chunk: int, block: int, head_dim: int, group: int, op) -> int:
    """Tokens of one source of the share kernel (_chunk_share_kernel's BLOCK): at d = 64 with 16-bit
    operands `op`, where a chunk's tokens over its group of query heads come to 256 (one head a
    key/value head at C = 256, the default there; the backward's share over a GQA group of two at
    C = 128, the default there), all of them, else the block.
    As one source of 256 tokens, each row-block is one product of inner size 256 waited for once,
    where two held blocks of 128 made two, each waited for at once. H100, 64k tokens, the share
    kernel's two passes (RESULTS.md, attention kernels): one head, C = 256 3.60 -> 3.25 ms (run P);
    a group of two, C = 128 2.76 -> 2.61 (run Q). Its Z share still takes the block at a time: over
    256 tokens at once its fp32 tiles spilled 984 bytes a thread against 280 (ptxas, sm_90). Other
    shapes, and fp32 operands (whose GPU check has not run this form), keep the block."""
    return chunk * group if (head_dim == 64 and chunk * group == 256 and op != tl.float32) else block


def default_chunk(head_dim: int, group: int) -> int:
    """The chunk the kernels run when none is asked for (chunk_size=None, PowerConfig's default):
    the fastest of those timed for forward+backward at 64k tokens, bf16, 16 query heads, on the
    H100 (RESULTS.md, attention kernels, run L), by head size and query heads per key/value head.

    - d = 64, one query head a key/value head: 256, whose two blocks the share kernel holds (16.24
      ms against 17.50 at 128; since run P as one source, share_source_tokens).
    - d = 64, groups: 128. A group of two is then what the backward's share kernel holds (12.82 ms
      against 14.36 at 256, where it has four sources and reads them again); larger groups are
      read again for every row-block, and a longer chunk has more of them (three: 10.24 against
      11.99 at 256; four: 11.95 against 15.06).
    - d = 32: 128 (8.09 against 10.42 at 256 and 9.54 at 512; there the 256 chunk is two blocks of
      128 tokens, which the share kernel holds more slowly). d = 16, not timed, follows it.
    - d = 128: 512 (one query head a key/value head: 146.7 ms against 153.7 at 1024, 178.2 at 256
      and 263.8 at 64; two: 118.0 against 119.2 at 1024 and 130.5 at 256). The state is four times
      larger, so fewer chunk states pay for the longer chunk-local work.
    """
    if head_dim > 64:
        return 512
    return 256 if head_dim == 64 and group == 1 else 128


def _gate_weights(log_g, bsz: int, t: int, hk: int, n_chunks: int, chunk: int, to_end: bool, scale: float, device):
    """Per-token weights w [B, Hk, N C] and per-chunk decays [B, Hk, N] (fp32) for the state pass:
    w_t = scale e^{beta - b_t} (to_end: the keys' decay to the chunk end) or scale e^{b_t} (the
    queries' decay from the chunk start), decay_n = e^{beta_n}; b the chunk-local running sum."""
    if log_g is None:
        return (torch.full((bsz, hk, n_chunks * chunk), scale, dtype=torch.float32, device=device),
                torch.ones(bsz, hk, n_chunks, dtype=torch.float32, device=device))
    w = torch.empty(bsz, hk, n_chunks * chunk, dtype=torch.float32, device=device)
    decays = torch.empty(bsz, hk, n_chunks, dtype=torch.float32, device=device)
    if n_chunks:
        _gate_weights_kernel[(n_chunks, bsz * hk)](log_g, w, decays, t, n_chunks * chunk, n_chunks, hk, scale,
                                                   CHUNK=chunk, TO_END=to_end)
    return w, decays


def _gate_grad(dbq, dbk, t: int, chunk: int) -> torch.Tensor:
    """dL/dlog_g [B, T, Hk] fp32 from the per-token dL/db of the query side dbq [B, N C, Hq] and
    of the key side dbk [B, N C, Hk] (b the chunk-local running sum of the log-gates)."""
    bsz, t_pad, hq = dbq.shape
    hk = dbk.shape[2]
    dlog_g = torch.empty(bsz, t, hk, dtype=torch.float32, device=dbq.device)
    if t_pad:
        _gate_grad_kernel[(t_pad // chunk, bsz * hk)](dbq, dbk, dlog_g, t, t_pad, hq, hk, CHUNK=chunk, G=hq // hk)
    return dlog_g


#: (num_warps, num_stages) per kernel for 16-bit operands, by (block, head size), measured on the
#: H100 at 64k tokens, forward+backward (RESULTS.md, attention kernels). Against the default of
#: two stages, 8 warps (4 below [128, 64] tiles):
#: - blocks of 128, d = 64 (tuning notes): 35.8 -> 28.0 ms at C = 128. The share kernel's stores go
#:   faster with 4 warps; the query-style kernels want a deeper pipeline for their state tiles.
#: - blocks of 128, d = 32 (run L): 8.04 -> 6.30 ms at C = 128; the key-side backward at 4 warps.
#: - blocks of 64, d = 128 (run L): 147.37 -> 119.71 ms at C = 512 (four stages in the query-style
#:   kernels: 118.52, within the runs' spread).
TUNED: dict[tuple[int, int], dict[str, tuple[int, int]]] = {
    (128, 64): {"share": (4, 3), "fwd": (8, 4), "bwd_q": (8, 4), "bwd_kv": (8, 4)},
    (128, 32): {"share": (4, 3), "fwd": (8, 4), "bwd_q": (8, 4), "bwd_kv": (4, 3)},
    (64, 128): {"share": (8, 3), "fwd": (8, 3), "bwd_q": (8, 3), "bwd_kv": (8, 3)},
}
#: The key-side backward walks the chunk's queries this many rows at a time (at least 16): its
#: [rows, block] score tiles then fit beside the state part's accumulators. H100, 64k tokens,
#: blocks of 128, d = 64: 128 rows 4.57 ms (164 spilled registers), 64 rows 5.09 (210), 32 rows
#: 4.08 (none), 16 rows 4.50. (Walking the query-side backward's keys in pieces gained nothing.)
BWD_KV_QUERY_ROWS = 32
#: warps of the (memory-bound) scan: 2 / 4 / 8 gave 4.08 / 4.20 / 4.43 ms for its two passes (H100,
#: 64k tokens, run H)
SCAN_WARPS = 2
#: overrides of any kernel's launch options (benchmarks/profile_kernels.py sets them to compare)
LAUNCH: dict[str, tuple[int, int]] = {}


def parse_launch(spec: str) -> dict[str, tuple[int, int]]:
    """LAUNCH entries from `kernel=warps:stages` items joined by commas ("share=4:3,fwd=8:4");
    "default" or "" gives none."""
    if spec in ("", "default"):
        return {}
    out = {}
    for item in spec.split(","):
        kernel, _, opts = item.partition("=")
        warps, _, stages = opts.partition(":")
        if kernel not in ("share", "scan", "fwd", "bwd_q", "bwd_kv") or not warps.isdigit() or not stages.isdigit():
            raise ValueError(f"launch option {item!r}: expected kernel=warps:stages with kernel one of "
                             "share, scan, fwd, bwd_q, bwd_kv")
        out[kernel] = (int(warps), int(stages))
    return out


def _launch_opts(kernel: str, block: int, width: int, op) -> dict:
    """Launch options of `kernel` ("share", "fwd", "bwd_q", "bwd_kv") for operands of type `op`:
    LAUNCH's entry, else TUNED's at the measured shapes (16-bit operands only: fp32 tiles at four
    stages overflow shared memory), else 8 warps for tiles of 128 x 64 and up, 4 below, two
    pipeline stages."""
    if interpreting():
        return {}
    default = (8 if block * width >= 128 * 64 else 4, 2)
    if op != tl.float32:
        default = TUNED.get((block, width), {}).get(kernel, default)
    warps, stages = LAUNCH.get(kernel, default)
    return {"num_warps": warps, "num_stages": stages}


_PAIR_WEIGHTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _pair_weights(head_dim: int, device) -> torch.Tensor:
    """[D] fp32: the weights w_ij of phi_2 (sqrt(2) off the diagonal, 1 on it). The kernels carry
    unweighted states R = S / w (rows); the states that go in and out are the weighted S.

    Built once per head size and device, and never written: a copy from the host at every call
    was a blocking copy, which makes the host wait for the GPU to finish all the work queued
    before it, three times in a forward and backward."""
    key = (head_dim, torch.device(device))
    if key not in _PAIR_WEIGHTS:
        _PAIR_WEIGHTS[key] = reference._embedding_plan(head_dim, 2)[1].to(device=device, dtype=torch.float32)
    return _PAIR_WEIGHTS[key]


def triton_share(x, y, zw, weights, states, z_states, *, reverse: bool, chunk: int, block: int, op):
    """Every chunk's own share into its slot of states / z_states [B, Hk, N+1, ...] with
    _chunk_share_kernel (slot n + 1 forward, n reverse); zw: Z's token weights [B, T, Hx] or None.
    (_state_pass's share where gluon_share does not take it; check_gluon_share.py's reference.)"""
    bsz, t, hx, d = x.shape
    hk, n_chunks, dim = states.shape[1], states.shape[2] - 1, states.shape[3]
    _chunk_share_kernel[(n_chunks, bsz * hk)](
        x, y, weights, zw if zw is not None else z_states, states, z_states,
        t, n_chunks * chunk, n_chunks, hx, hk, 0 if reverse else 1,
        HEAD_DIM=d, D=dim, CHUNK=chunk, BLOCK=share_source_tokens(chunk, block, d, hx // hk, op), Z_BLOCK=block,
        G=hx // hk, HAS_ZW=zw is not None, OP=op, **_launch_opts("share", block, d, op))


def _state_pass(x, y, zw, weights, decays, init_s, init_z, states, z_states, s_final, z_final, *, reverse: bool,
                chunk: int, block: int, op, inner_with=None):
    """Fill states / z_states [B, Hk, N+1, ...] with the recurrence over chunks; forward, s_final /
    z_final get the last state. inner_with = (R, Z) of the forward: also return every slot's
    <state, R> + <z, Z> over the full symmetric tensors ([B Hk, N + 1] fp32; the decay gradients
    of the backward).

    Every chunk's own share at once (_chunk_share_kernel, the matrix products), then a scan that
    chains them (_state_scan_kernel, memory-bound). Three designs that did both in one kernel were
    slower on the H100 at 64k tokens: one serial pass per row-block group, 7.5 ms per pass against
    3.4 + 1.6 ms for these two; the shares' products in parallel with their chaining a
    wavefront through an fp32 ring in L2 and per-row-block flags, 25.5 ms for the forward's and
    the backward's pass against 8.6 (run H, RESULTS.md); and that wavefront in the Gluon share kernel,
    2.2 ms a forward pass against 1.7, 2.5 even with no flags at all (run AA, branch
    chained-gluon-pass)."""
    bsz, t, hx, d = x.shape
    hk, slots, dim = states.shape[1], states.shape[2], states.shape[3]
    n_chunks = slots - 1
    dummy = z_states  # for the pointers a variant does not read
    mult = _pair_weights(d, x.device) ** 2 if inner_with is not None else dummy
    init = (init_s if init_s is not None else dummy, init_z if init_z is not None else dummy)
    final = (s_final if s_final is not None else dummy, z_final if z_final is not None else dummy)
    forward_states = inner_with if inner_with is not None else (dummy, dummy)
    if n_chunks and gluon_share is not None and gluon_share.takes(x, chunk, hx // hk, zw is not None, reverse):
        # the same products and the same states bit for bit: 0.956 ms against 1.588 for the forward's,
        # 0.999 against 1.603 for the backward's (H100, 64k tokens, 16 heads; check_gluon_share.py,
        # RESULTS.md runs T and V)
        gluon_share.chunk_share(x, y, zw, weights, states, z_states, t, n_chunks, reverse)
    elif n_chunks:
        triton_share(x, y, zw, weights, states, z_states, reverse=reverse, chunk=chunk, block=block, op=op)
    block_r = 64 if d <= 64 else 32
    n_blocks = triton.cdiv(dim, block_r)
    inner = None
    if inner_with is not None:
        inner = torch.empty(bsz * hk, slots, n_blocks, dtype=torch.float32, device=x.device)
    _state_scan_kernel[(n_blocks, bsz * hk)](
        states, z_states, decays, *init, *final, *forward_states, mult, inner if inner is not None else dummy,
        n_chunks, HEAD_DIM=d, D=dim, BLOCK_R=block_r, REVERSE=reverse, HAS_INIT=init_s is not None,
        HAS_DOT=inner_with is not None, **({} if interpreting() else {"num_warps": LAUNCH.get("scan", (SCAN_WARPS, 1))[0]}))
    return inner.sum(-1) if inner is not None else None


def _states_forward(k, v, log_g, s0, z0, chunk, block, op):
    """The chunk recurrence: unweighted states R [B, Hk, N+1, D, d] (dtype of the products) and
    Z [B, Hk, N+1, D] fp32, the state before chunk n (n = N: the final one), from the weighted
    initial state (S0, z0) or zero; and the final state, weighted (S [B, Hk, D, d], z [B, Hk, D]),
    in fp32."""
    bsz, t, hk, d = k.shape
    w = _pair_weights(d, k.device)
    if s0 is not None:
        s0, z0 = (s0 / w[:, None]).contiguous(), (z0 / w).contiguous()
    dim = expanded_dim(d, 2)
    n_chunks = triton.cdiv(t, chunk)
    states = torch.empty(bsz, hk, n_chunks + 1, dim, d, dtype=operand_torch_dtype(op), device=k.device)
    z_states = torch.empty(bsz, hk, n_chunks + 1, dim, dtype=torch.float32, device=k.device)
    s_final = torch.empty(bsz, hk, dim, d, dtype=torch.float32, device=k.device)
    z_final = torch.empty(bsz, hk, dim, dtype=torch.float32, device=k.device)
    weights, decays = _gate_weights(log_g, bsz, t, hk, n_chunks, chunk, True, 1.0, k.device)
    _state_pass(k, v, None, weights, decays, s0, z0, states, z_states, s_final, z_final, reverse=False, chunk=chunk,
                block=block, op=op)
    return states, z_states, s_final * w[:, None], z_final * w


def chunk_forward(q, k, v, log_g, s0, z0, scale: float, eps: float, chunk_size: int, keep_states: bool = False):
    """Forward: (y [B, T, Hq, d], den [B, T, Hq] fp32, S_final [B, Hk, D, d], z_final [B, Hk, D], kept):
    kept = the chunk states (R, Z) for chunk_backward if keep_states, else None."""
    bsz, t, hq, d = q.shape
    hk = k.shape[2]
    chunk, block = kernel_tiles(chunk_size, d)
    op = dot_dtype(q.dtype)
    dim = expanded_dim(d, 2)
    states, z_states, s_final, z_final = _states_forward(k, v, log_g, s0, z0, chunk, block, op)
    n_chunks = states.shape[2] - 1
    y = torch.empty(bsz, t, hq, d, dtype=v.dtype, device=q.device)
    den = torch.empty(bsz, t, hq, dtype=torch.float32, device=q.device)
    if n_chunks:
        _chunk_fwd_kernel[(n_chunks * (chunk // block), bsz * hq)](
            q, k, v, log_g if log_g is not None else k, states, z_states, y, den,
            t, n_chunks, hq, hk, scale, eps,
            HEAD_DIM=d, D=dim, CHUNK=chunk, BLOCK=block, HAS_GATE=log_g is not None, OP=op,
            **_launch_opts("fwd", block, d, op),
        )
    return y, den, s_final, z_final, ((states, z_states) if keep_states else None)


#: chunk_backward runs the reverse state pass (dR: the share kernel, then the memory-bound scan) on a
#: second stream of high priority while the query-side kernel, which needs only the forward's states,
#: runs on the caller's; POWER_BACKWARD_OVERLAP=0 runs them one after the other. Gradients are the same
#: bit for bit, and the two streams join before bwd_kv. A small gain: H100, 64k tokens, d = 64, C = 256,
#: forward + backward 12.81 / 12.81 / 12.80 ms against 12.95 / 12.90 / 12.90 in one call, 0.01 to 0.07 ms
#: less in two others (RESULTS.md, attention kernels, run V). Each of the two kernels fills an SM's
#: registers, so they share the GPU by turns, not side by side; bwd_q at 4 warps, which would leave room,
#: is 2 ms slower.
BACKWARD_OVERLAP = True
_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def _concurrently(first, second, device):
    """first() on a high-priority side stream while second() runs on the current one, joined before
    returning first()'s result (where BACKWARD_OVERLAP and the device is CUDA; else one after the
    other). Every tensor either touches stays alive until the join, so the caching allocator needs no
    record_stream; what first() allocates comes from the side stream's pool, is used on the caller's
    stream only after the join, and its memory is reused on the side stream only after the next
    wait_stream, so after everything queued on the caller's stream until then. CUDA graph capture
    takes the fork and the join (checked on the H100, run V)."""
    device = torch.device(device)
    if (not BACKWARD_OVERLAP or os.environ.get("POWER_BACKWARD_OVERLAP") == "0" or device.type != "cuda"
            or interpreting()):
        out = first()
        second()
        return out
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index, priority=-1)
    main, side = torch.cuda.current_stream(index), _SIDE_STREAMS[index]
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = first()
    second()
    main.wait_stream(side)
    return out


def chunk_backward(q, k, v, log_g, s0, z0, y, den, dy, ds_final, dz_final, scale: float, eps: float, chunk_size: int,
                   kept=None):
    """Backward: (dq, dk, dv, dlog_g [B, T, Hk] fp32 or None, dS0 [B, Hk, D, d], dz0 [B, Hk, D]).

    kept: the forward's chunk states (chunk_forward with keep_states), else they are recomputed.

    dS0 passes through the chunk-state dtype (bf16 for bf16 inputs). Inside, dR_n = dL/dR_n for
    the unweighted states taken as full symmetric [d, d, d] tensors: a weighted S = w R (each
    off-diagonal pair stands for two equal entries) gives dR_N = dS_final / w and dS0 = w dR_0."""
    bsz, t, hq, d = q.shape
    hk = k.shape[2]
    chunk, block = kernel_tiles(chunk_size, d)
    op = dot_dtype(q.dtype)
    dim = expanded_dim(d, 2)
    n_chunks = triton.cdiv(t, chunk)
    t_pad = n_chunks * chunk

    # The chunk-start states: kept from the forward, or recomputed (a state pass, to save memory).
    states, z_states = kept if kept is not None else _states_forward(k, v, log_g, s0, z0, chunk, block, op)[:2]
    do, delta = output_grads(dy, y, den, eps, op)
    w = _pair_weights(d, q.device)
    if ds_final is not None:
        ds_final, dz_final = (ds_final / w[:, None]).contiguous(), (dz_final / w).contiguous()
    dstates = torch.empty_like(states)  # dL/dR_n, n = 0 .. N
    dz_states = torch.empty_like(z_states)
    lg = log_g if log_g is not None else k
    # dR_n = sum_t s^2 e^{b_t} q_t q_t^T-products do_t^T (chunk n's queries, every head of the group) + e^{beta_n} dR_{n+1}
    weights, decays = _gate_weights(log_g, bsz, t, hk, n_chunks, chunk, False, scale * scale, q.device)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbq = torch.empty(bsz, t_pad, hq, dtype=torch.float32, device=q.device)
    dbk = torch.empty(bsz, t_pad, hk, dtype=torch.float32, device=q.device)
    common = dict(HEAD_DIM=d, D=dim, CHUNK=chunk, BLOCK=block, HAS_GATE=log_g is not None, OP=op)
    q_block = query_backward_block(block, d, op)

    def query_side():  # dq and the query side of the gate gradient: needs the forward's states, not dR
        if n_chunks:
            _chunk_bwd_q_kernel[(n_chunks * (chunk // q_block), bsz * hq)](
                q, k, v, lg, states, z_states, do, delta, dq, dbq, t, t_pad, n_chunks, hq, hk, scale,
                **dict(common, BLOCK=q_block), **_launch_opts("bwd_q", q_block, d, op))

    def reverse_pass():  # dR and, with gates, the decay gradients <dR, R> (without, none: no reads of R)
        return _state_pass(q, do, delta, weights, decays, ds_final, dz_final, dstates, dz_states, None, None,
                           reverse=True, chunk=chunk, block=block, op=op,
                           inner_with=(states, z_states) if log_g is not None else None)

    dbeta = _concurrently(reverse_pass, query_side, q.device)
    if n_chunks:
        blocks = n_chunks * (chunk // block)  # every block of every chunk: the gate gradients cover T_PAD
        _chunk_bwd_kv_kernel[(blocks, bsz * hk)](
            q, k, v, lg, dstates, dz_states, dbeta if dbeta is not None else dz_states,  # (unread without gates)
            do, delta, dk, dv, dbk,
            t, t_pad, n_chunks, hq, hk, scale, **common, QROWS=max(16, min(block, BWD_KV_QUERY_ROWS)),
            **_launch_opts("bwd_kv", block, d, op))
    dlog_g = _gate_grad(dbq, dbk, t, chunk) if log_g is not None else None
    return dq, dk, dv, dlog_g, dstates[:, :, 0].float() * w[:, None], dz_states[:, :, 0] * w
