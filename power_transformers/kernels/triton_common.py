"""Shared pieces of the Triton power attention kernels (degree 2).

The symmetric power embedding phi_2: R^d -> R^D, D = d (d + 1) / 2, has one entry per pair
i <= j, w_ij x_i x_j with w_ij = sqrt(2) off the diagonal and 1 on it, in the order of
`itertools.combinations_with_replacement` (the reference's order): (0,0), (0,1), ..., (0,d-1),
(1,1), ..., (d-1,d-1). Row-block i of that order is the d - i pairs (i, j >= i); it starts at
index i d - i (i - 1) / 2.

The kernels never form phi(x) for all D entries at once. They walk over the d row-blocks and
build block i on chip from the d-dimensional tile x [M, d] and its column x[:, i] [M]:

    phi_i(x)[m, j] = w_ij x[m, i] x[m, j]     for j >= i, and 0 for j < i.

A row-block of a state S [D, d] is then the [d, d] tile of rows (i, j), j = 0..d-1 (rows j < i
masked out), and phi(x)^T S = sum_i phi_i(x) @ S_i, S += phi(k) v^T is S_i += phi_i(k)^T v.
The chunk kernels take RB consecutive row-blocks at a time (phi_multi_rows: [M, RB d], the
state rows of multi_block_rows), which makes the matrix products larger and, in the state
passes, lets one read of K and V (or Q and dO) serve RB row-blocks.

(Building phi from gathers of arbitrary (i, j) pairs, without the masked half of each block,
was tried and ran 3x slower on the H100: the gathers cost more than the masked work.)
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

#: head sizes the kernels are compiled for (tl.arange needs powers of two; tl.dot >= 16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DEGREES = (2,)


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_dtype(torch_dtype):
    """The operand type of tl.dot for inputs of `torch_dtype`.

    fp16/bf16 inputs multiply in their own type (full tensor-core rate) with fp32
    accumulation; fp32 inputs in fp32 (tf32 on the GPU). Under the interpreter bf16 dots are
    wrong (FACTS.md), so they run in fp32 there.
    """
    import torch

    if torch_dtype == torch.float16:
        return tl.float16
    if torch_dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


@triton.jit
def pair_weights(i, offs_d):
    """[d] weights of the pairs (i, j): sqrt(2) for j > i, 1 for j == i, 0 for j < i (no such pair)."""
    return tl.where(offs_d > i, 1.4142135623730951, tl.where(offs_d == i, 1.0, 0.0))


@triton.jit
def phi_rows(x, xi, i, offs_d):
    """Row-block i of phi_2, built on chip: x [M, d] fp32, xi [M] (= x[:, i], possibly times a
    per-row weight) -> [M, d] with entry (m, j) = w_ij xi[m] x[m, j] (0 for j < i)."""
    w = pair_weights(i, offs_d)
    return x * (xi[:, None] * w[None, :])


@triton.jit
def row_block_rows(i, offs_d, HEAD_DIM: tl.constexpr):
    """Indices in [0, D) of the rows (i, j) of row-block i ([d], valid where j >= i) and that mask."""
    start = i * HEAD_DIM - (i * (i - 1)) // 2
    return start + offs_d - i, offs_d >= i


@triton.jit
def load_gates(g_ptr, t0, T, stride_t, offs_c, HAS_GATE: tl.constexpr):
    """The log-gates of tokens t0 + offs_c as stored ([C], 0 past T or without gating)."""
    if HAS_GATE:
        g = tl.load(g_ptr + (t0 + offs_c) * stride_t, mask=t0 + offs_c < T, other=0.0)
    else:
        g = tl.zeros(offs_c.shape, dtype=tl.float32)
    return g


@triton.jit
def gate_sums(g):
    """Chunk-local running sums b [C] (b_t = sum_{u = t0}^{t} g_u) and the chunk total (a scalar)."""
    g = g.to(tl.float32)
    return tl.cumsum(g, axis=0), tl.sum(g, axis=0)


@triton.jit
def chunk_gates(g_ptr, t0, T, stride_t, offs_c, HAS_GATE: tl.constexpr):
    """Chunk-local running sums of the log-gates of tokens t0 + offs_c.

    Returns b [C] with b_t = sum_{u = t0}^{t} g_u and the chunk total (a scalar). Tokens at or
    past T count as g = 0 (they decay nothing), so the total is b at the last real token.
    """
    return gate_sums(load_gates(g_ptr, t0, T, stride_t, offs_c, HAS_GATE))


@triton.jit
def load_tile(base, t0, T, stride_t, offs_c, offs_d):
    """A [C, d'] tile of tokens t0 + offs_c in the stored dtype (rows outside [0, T) are 0); offs_d
    the column offsets. Unconverted, so that a prefetched tile's load stays in flight until used."""
    t = t0 + offs_c
    return tl.load(base + t[:, None] * stride_t + offs_d[None, :], mask=((t >= 0) & (t < T))[:, None], other=0.0)


@triton.jit
def load_rows(base, t0, T, stride_t, offs_c, offs_d):
    """load_tile in fp32."""
    return load_tile(base, t0, T, stride_t, offs_c, offs_d).to(tl.float32)


# ----------------------------------------------------------------------------------
# Several row-blocks at once (the state passes: fewer re-reads of K, V, Q, dO)
# ----------------------------------------------------------------------------------


@triton.jit
def multi_block_rows(i0, RB: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The state rows of row-blocks i0 .. i0 + RB - 1, flattened: ([RB d] indices into [0, D),
    [RB d] valid). Entry f = rb d + j is the pair (i0 + rb, j), valid where j >= i0 + rb."""
    flat = tl.arange(0, RB * HEAD_DIM)
    i = i0 + flat // HEAD_DIM
    j = flat % HEAD_DIM
    return i * HEAD_DIM - (i * (i - 1)) // 2 + j - i, j >= i


@triton.jit
def phi_multi_rows(x, xcols, i0, M: tl.constexpr, RB: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Row-blocks i0 .. i0 + RB - 1 of phi_2, side by side: x [M, d] fp32 and xcols [M, RB]
    (= x[:, i0:i0+RB], possibly times a per-row weight) -> [M, RB d], in multi_block_rows' order."""
    offs_d = tl.arange(0, HEAD_DIM)
    if RB == 1:  # plain 2-D: the 3-D form costs a layout shuffle per step on the GPU
        return phi_rows(x, tl.sum(xcols, axis=1), i0, offs_d)
    i = i0 + tl.arange(0, RB)
    w = tl.where(offs_d[None, :] > i[:, None], 1.4142135623730951,
                 tl.where(offs_d[None, :] == i[:, None], 1.0, 0.0))  # [RB, d]
    phi = x[:, None, :] * xcols[:, :, None] * w[None, :, :]  # [M, RB, d]
    return tl.reshape(phi, (M, RB * HEAD_DIM))


@triton.jit
def phi_multi_rows_grad(x, xcols, dphi, i0, M: tl.constexpr, RB: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The gradient with respect to x [M, d] of sum(dphi * phi_multi_rows(x, x[:, i0:i0+RB], i0)).

    dphi [M, RB d]. Entry (i, j) = w_ij x_i x_j sends w_ij dphi_ij x_i to x_j and
    w_ij dphi_ij x_j to x_i (both to x_i on the diagonal).
    """
    offs_d = tl.arange(0, HEAD_DIM)
    if RB == 1:
        gw1 = dphi * pair_weights(i0, offs_d)[None, :]
        col1 = tl.sum(gw1 * x, axis=1)  # [M]: everything that lands in column i0
        return gw1 * tl.sum(xcols, axis=1)[:, None] + tl.where(offs_d[None, :] == i0, col1[:, None], 0.0)
    i = i0 + tl.arange(0, RB)
    w = tl.where(offs_d[None, :] > i[:, None], 1.4142135623730951,
                 tl.where(offs_d[None, :] == i[:, None], 1.0, 0.0))  # [RB, d]
    gw = tl.reshape(dphi, (M, RB, HEAD_DIM)) * w[None, :, :]
    dx = tl.sum(gw * xcols[:, :, None], axis=1)  # the x_j side, [M, d]
    col = tl.sum(gw * x[:, None, :], axis=2)  # the x_i side, [M, RB]: lands in columns i0 .. i0 + RB - 1
    return dx + tl.sum(tl.where(offs_d[None, None, :] == i[None, :, None], col[:, :, None], 0.0), axis=1)
