"""Shared pieces of the Triton power attention kernels (degree 2).

The symmetric power embedding phi_2: R^d -> R^D, D = d (d + 1) / 2, has one entry per pair
i <= j, w_ij x_i x_j with w_ij = sqrt(2) off the diagonal and 1 on it, in the order of
`itertools.combinations_with_replacement` (the reference's order): (0,0), (0,1), ..., (0,d-1),
(1,1), ..., (d-1,d-1). Row-block i of that order is the d - i pairs (i, j >= i); it starts at
index i d - i (i - 1) / 2.

The kernels never form phi(x) for all D entries at once. They walk over the d row-blocks and
build block i on chip from the d-dimensional tile x [M, d] and its column x[:, i] [M]:

    phi_i(x)[m, j] = w_ij x[m, i] x[m, j]     for j >= i, and 0 for j < i.

The decode kernel keeps the weighted state S [D, d] = sum phi(k) v^T, the model's and the
reference's. The chunk kernels carry it unweighted, R = S / w (row by row), which lets a state
query skip phi altogether: reading row-block i as the full [d, d] tile R_i[j] = R[(min(i, j),
max(i, j))] (full_tile_rows), phi(x)^T S = sum_i x_i (x @ R_i), one product with the same
operand x for every i plus one multiply-add. A state update needs no phi either:
R_i += x^T @ ((w x_i) y), the same operand x^T for every i.

(Building phi from gathers of arbitrary (i, j) pairs, without the masked half of each block,
was tried and ran 3x slower on the H100: the gathers cost more than the masked work.)
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

#: head sizes the kernels are compiled for (tl.arange needs powers of two; tl.dot >= 16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DEGREES = (2,)


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _hopper_or_later(device_index: int) -> bool:
    import torch

    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _index(device) -> int:
    """The index of a CUDA torch.device ("cuda" alone: 0)."""
    return device.index if device.index is not None else 0


def multiprocessors(device) -> int:
    """SMs of the CUDA device `device` (a torch.device)."""
    return _multiprocessors(_index(device))


def dependent_launch(device) -> bool:
    """Whether the one-token decode kernels on `device` (a torch.device) launch with programmatic
    dependent launch (PDL): on CUDA GPUs of compute capability 9.0 or later, not under the
    interpreter, unless POWER_PDL=0.

    A one-token step is a chain of short kernels (six a layer), each a few microseconds, and most
    of a microsecond went between two of them. With PDL a kernel is launched while the one before
    it runs, reads what no kernel of the step writes (its weights), then waits in
    wait_for_previous_kernel for the one before to finish."""
    if interpreting() or device.type != "cuda" or os.environ.get("POWER_PDL", "1") == "0":
        return False
    return _hopper_or_later(_index(device))


def pdl_options(pdl: bool) -> dict:
    """Triton launch options for a kernel whose PDL argument is `pdl` (dependent_launch)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With PDL (the kernel launched with pdl_options(True)): wait until the kernel before this one
    in the stream has finished and its writes are visible, then let the next kernel launch (it
    waits here in turn, so a step's kernels still run in order). A kernel calls this before it
    reads anything that an earlier kernel may write and before it writes anything; without PDL a
    no-op (griddepcontrol is an sm_90 instruction, and the interpreter runs no inline assembly)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, ok):
    """Ask for the lines holding `ptrs` (a tensor of pointers, one per 128-byte line wanted) to be
    brought into L2 where `ok`, without waiting for them (PTX prefetch.global.L2; sm_90 kernels
    launched with PDL only, as wait_for_previous_kernel: not under the interpreter). A kernel that
    starts before the one ahead of it finishes can so have the memory it will read stream in while
    it waits, without holding it in registers; L2 is where every SM reads through, so a line
    prefetched before a write elsewhere is not a stale copy."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


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


def operand_torch_dtype(op):
    """The torch dtype of tl.dot operands of type `op` (bf16, fp16, else fp32): what the kernels
    store the tensors in that only the products read (chunk states, dO), half the bytes for
    16-bit inputs and the very numbers the products would see."""
    import torch

    return {tl.bfloat16: torch.bfloat16, tl.float16: torch.float16}.get(op, torch.float32)


# fp32 products at about fp32 accuracy on the GPU (three tf32 passes); the interpreter is exact anyway
_F32_PRECISION = tl.constexpr("ieee" if interpreting() else "tf32x3")


@triton.jit
def dot_f32(a, b, acc=None):
    """(acc +) a @ b for fp32 operands at about fp32 accuracy (the chunk kernels' denominators, the
    decode tail's fold)."""
    return tl.dot(a, b, acc, input_precision=_F32_PRECISION)


@triton.jit
def column(x, i, offs_d):
    """Column i of a register tile x [M, d] (offs_d = arange(d)): [M], without a load from memory."""
    return tl.sum(tl.where(offs_d[None, :] == i, x, 0.0), axis=1)


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


# ----------------------------------------------------------------------------------
# Full [d, d] tiles of a symmetric state (the chunk kernels' state queries)
# ----------------------------------------------------------------------------------


@triton.jit
def full_tile_rows(i, offs_d, HEAD_DIM: tl.constexpr):
    """[d] indices into [0, D) of the rows that hold R_i[j] = R[(min(i, j), max(i, j))], j = 0..d-1.

    The chunk kernels keep unweighted states R[(i, j)] = sum_t c_t x_i x_j y_t (no sqrt(2)), a
    symmetric [d, d, d] tensor stored once per pair. Read as full tiles R_i (every j, no masked
    half), a state query needs no phi at all: phi(q)^T S = sum_i q_i (q @ R_i), one product and
    one multiply-add per row-block. Each row is a contiguous d-vector, so the gather is cheap."""
    lo = tl.minimum(offs_d, i)
    hi = tl.maximum(offs_d, i)
    return lo * HEAD_DIM - (lo * (lo - 1)) // 2 + hi - lo


@triton.jit
def load_sym_matrix(z_ptr, HEAD_DIM: tl.constexpr):
    """The [d, d] symmetric matrix Z[a, b] = z[(min(a, b), max(a, b))] of a stored z [D] (fp32)."""
    a = tl.arange(0, HEAD_DIM)[:, None]
    b = tl.arange(0, HEAD_DIM)[None, :]
    lo = tl.minimum(a, b)
    hi = tl.maximum(a, b)
    return tl.load(z_ptr + lo * HEAD_DIM - (lo * (lo - 1)) // 2 + hi - lo)


@triton.jit
def _output_grads_kernel(DY, Y, DEN, DO, DELTA, rows, eps, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
                         OP: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = r < rows
    offs = r.to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    den = tl.load(DEN + r, mask=ok, other=1.0)
    do = (tl.load(DY + offs, mask=ok[:, None], other=0.0).to(tl.float32) / (den + eps)[:, None]).to(OP)
    y = tl.load(Y + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DO + offs, do, mask=ok[:, None])
    tl.store(DELTA + r, -tl.sum(do.to(tl.float32) * y, axis=1), mask=ok)


def output_grads(dy, y, den, eps: float, op):
    """What both backwards read of the output gradient: do = dy / (den + eps) in the operand dtype
    of `op` [B, T, Hq, d], and delta = -do . y [B, T, Hq] fp32, in one pass over dy and y.

    delta is taken from the rounded do the products will see: dA = do . v + delta is a difference
    of nearly equal terms where y ~ v (strong gates: the diagonal dominates), and an fp32 do in
    delta against a rounded one in the product would leave the rounding uncancelled. (As torch
    ops, the casts, the division, the product and the sum made five passes over fp32 copies.)
    dy may have any memory layout (autograd does not promise a contiguous one)."""
    import torch

    d = y.shape[-1]
    dy = dy.contiguous()
    do = torch.empty(y.shape, dtype=operand_torch_dtype(op), device=y.device)
    delta = torch.empty(y.shape[:-1], dtype=torch.float32, device=y.device)
    rows = delta.numel()
    if rows:
        block = max(16, 4096 // d)
        _output_grads_kernel[(triton.cdiv(rows, block),)](dy, y.contiguous(), den.contiguous(), do, delta, rows, eps,
                                                           HEAD_DIM=d, ROWS=block, OP=op)
    return do, delta
