"""Exploration: can Gluon (Triton 3.6's low-level dialect) run the chunk "share" loop faster than plain Triton?

The loop, per program p (one chunk of one head), X[p], WY[p]: [M, d] bf16, M = 256, d = 64:

    for i in 0..d-1:  OUT[p, i] = (X^T * X[:, i][None, :]) @ WY      ([d, M] x [M, d] -> [d, d], stored bf16)

Plain Triton does, one after the other in one warp group: weight the first operand (CUDA cores), the wgmma
and its wait, the store. The Gluon kernels here keep X^T in registers (the wgmma A operand, DotOperandLayout),
WY in shared memory (the B operand, loaded once by TMA), and:

- "gluon sync": the same schedule as plain Triton (wgmma then wait at once), but with TMA stores of the
  tiles through two shared buffers; it separates the effect of the stores from that of overlapping the wgmma;
- "gluon pipelined": software pipelined, one warp group. The weighted operand is built in 4 chunks of
  K = 64 tokens; each chunk's wgmma is issued asynchronously and waited for (wgmma.wait_group 1) only after
  the next chunk's wgmma is issued, so the CUDA-core weighting of chunk k+1 runs while the tensor cores do
  chunk k. Across tiles, the first chunk of tile i is issued before tile i-1 is retired, and tile i-1's
  epilogue (bf16 convert, shared store, TMA store) runs while that chunk is on the tensor cores. Two
  accumulator register sets alternate; UNROLL tiles per trip of the loop, the wgmmas drained at the end
  of each trip (else ptxas serializes them: see the comment in the kernel).

- "gluon warp-specialised": a worker warp group weights the operand into a ring of shared buffers (mbarriers
  ready / empty), the default warp group issues the wgmmas with A from shared memory and stores the tiles.
  Right, but half as fast as the pipelined kernel on the H100 (2.18-2.35 ms against 1.17 at N = 4096; RESULTS.md,
  attention kernels, run AA): the operand makes a round trip through shared memory that the pipelined kernel's
  register operand avoids (per tile 32 KB written and 64 KB read by the wgmmas, about 0.85 ms of the SM's
  shared-memory bandwidth over the whole run), and the buffers leave one program an SM instead of two.

    PYTHONPATH=$PWD python3 benchmarks/explore_gluon_share.py            # check + time (CUDA device)
    PYTHONPATH=/work/triton36 TRITON_INTERPRET=0 python benchmarks/explore_gluon_share.py --compile-only
    (--only "pipelined,warp" times the variants whose names hold one of the substrings)
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor as TritonDescriptor

M_TOKENS, HEAD_DIM = 256, 64


# --------------------------------------------------------------------------------------------------------------
# plain Triton baseline
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def share_triton_kernel(X, WY, OUT, M: tl.constexpr, D: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, M)
    j = tl.arange(0, D)
    xb = X + p * M * D
    xt = tl.load(xb + t[None, :] * D + j[:, None])  # [D, M] = X^T
    wy = tl.load(WY + p * M * D + t[:, None] * D + j[None, :])  # [M, D]
    ob = OUT + p * D * D * D
    for i in range(D):
        xi = tl.load(xb + t * D + i)  # X[:, i]
        a = (xt * xi[None, :]).to(tl.bfloat16)
        acc = tl.dot(a, wy)
        tl.store(ob + i * D * D + j[:, None] * D + j[None, :], acc.to(tl.bfloat16))


@triton.jit
def share_triton_tma_kernel(X, WY, out_desc, M: tl.constexpr, D: tl.constexpr):
    """The plain Triton loop with its tiles stored through a host tensor descriptor (TMA on Hopper): is it
    the stores that Gluon's TMA gains on, and can plain Triton have that?"""
    p = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, M)
    j = tl.arange(0, D)
    xb = X + p * M * D
    xt = tl.load(xb + t[None, :] * D + j[:, None])  # [D, M] = X^T
    wy = tl.load(WY + p * M * D + t[:, None] * D + j[None, :])  # [M, D]
    for i in range(D):
        xi = tl.load(xb + t * D + i)  # X[:, i]
        a = (xt * xi[None, :]).to(tl.bfloat16)
        acc = tl.dot(a, wy)
        out_desc.store([((p * D + i) * D).to(tl.int32), 0], acc.to(tl.bfloat16))


# --------------------------------------------------------------------------------------------------------------
# Gluon (Hopper): shared pieces
# --------------------------------------------------------------------------------------------------------------
@gluon.jit
def _load_inputs(x_desc, wy_desc, p, x_smem, wy_smem, xcol_smem, M: gl.constexpr, D: gl.constexpr):
    """TMA X[p] and WY[p] into shared memory, then keep a plain (unswizzled) copy of X^T [D, M] so that
    the column X[:, i] is row i of it, a dynamic index."""
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    mbarrier.expect(bar, x_desc.block_type.nbytes + wy_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(x_desc, [p * M, 0], bar, x_smem)
    tma.async_copy_global_to_shared(wy_desc, [p * M, 0], bar, wy_smem)
    mbarrier.wait(bar, phase=0)
    mbarrier.invalidate(bar)
    # (as timed in RESULTS.md: this read is a 32-way bank conflict on every load; gluon_share's t_layout,
    # lanes over columns, lets the compiler use ldmatrix.trans instead, run V call 8)
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [gl.num_warps(), 1], [1, 0])
    xcol_smem.store(x_smem.permute((1, 0)).load(blk))
    gl.thread_barrier()
    # the same bytes with a rank-1 layout, so that .index(i) gives the row X[:, i] as a 1-d view
    return xcol_smem._reinterpret(gl.bfloat16, [D, M], gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                                                order=[0]))


@gluon.jit
def _operands(x_desc, wy_desc, out_desc, p, a_layout: gl.constexpr):
    """Program p's operands: X^T in four pieces of KC = M / 4 tokens in registers (the wgmma A layout),
    WY's four pieces in shared memory (B), the plain copy of X^T for the columns, and two store buffers."""
    M: gl.constexpr = x_desc.block_type.shape[0]
    D: gl.constexpr = x_desc.block_type.shape[1]
    KC: gl.constexpr = M // 4
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [M, D], x_desc.layout)
    wy_smem = gl.allocate_shared_memory(gl.bfloat16, [M, D], wy_desc.layout)
    xcol_smem = gl.allocate_shared_memory(gl.bfloat16, [D, M],
                                          gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
    out_smem = gl.allocate_shared_memory(gl.bfloat16, [2, D, D], out_desc.layout)
    xcol_smem = _load_inputs(x_desc, wy_desc, p, x_smem, wy_smem, xcol_smem, M, D)

    xt0 = x_smem.slice(0 * KC, KC).permute((1, 0)).load(a_layout)
    xt1 = x_smem.slice(1 * KC, KC).permute((1, 0)).load(a_layout)
    xt2 = x_smem.slice(2 * KC, KC).permute((1, 0)).load(a_layout)
    xt3 = x_smem.slice(3 * KC, KC).permute((1, 0)).load(a_layout)
    wy0 = wy_smem.slice(0 * KC, KC)
    wy1 = wy_smem.slice(1 * KC, KC)
    wy2 = wy_smem.slice(2 * KC, KC)
    wy3 = wy_smem.slice(3 * KC, KC)
    return xcol_smem, out_smem, xt0, xt1, xt2, xt3, wy0, wy1, wy2, wy3


@gluon.jit
def _weighted(xt_k, xcol_smem, i, k: gl.constexpr, KC: gl.constexpr, xs_layout: gl.constexpr):
    """Chunk k (tokens k*KC .. k*KC+KC-1) of the operand X^T * X[:, i][None, :], in registers."""
    xi = xcol_smem.index(i).slice(k * KC, KC).load(xs_layout)
    return xt_k * gl.expand_dims(xi, 0)


@gluon.jit
def _store_tile(acc, out_desc, out_smem, row, slot):
    """bf16 tile -> shared buffer `slot` -> TMA store; the store that last used the buffer (two tiles ago)
    must have read it first."""
    tma.store_wait(pendings=1)
    gl.thread_barrier()
    buf = out_smem.index(slot)
    buf.store(acc.to(gl.bfloat16))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(out_desc, [row, 0], buf)


# --------------------------------------------------------------------------------------------------------------
# Gluon: synchronous wgmma (plain Triton's schedule) with TMA stores
# --------------------------------------------------------------------------------------------------------------
@gluon.jit
def share_gluon_sync_kernel(x_desc, wy_desc, out_desc):
    M: gl.constexpr = x_desc.block_type.shape[0]
    D: gl.constexpr = x_desc.block_type.shape[1]
    KC: gl.constexpr = M // 4
    gl.static_assert(gl.num_warps() == 4, "one warp group")
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    xs_layout: gl.constexpr = gl.SliceLayout(0, a_layout)
    p = gl.program_id(0)

    xcol_smem, out_smem, xt0, xt1, xt2, xt3, wy0, wy1, wy2, wy3 = _operands(x_desc, wy_desc, out_desc, p, a_layout)
    zero = gl.zeros([D, D], gl.float32, mma)
    for i in range(D):
        acc = warpgroup_mma(_weighted(xt0, xcol_smem, i, 0, KC, xs_layout), wy0, zero, use_acc=False)
        acc = warpgroup_mma(_weighted(xt1, xcol_smem, i, 1, KC, xs_layout), wy1, acc)
        acc = warpgroup_mma(_weighted(xt2, xcol_smem, i, 2, KC, xs_layout), wy2, acc)
        acc = warpgroup_mma(_weighted(xt3, xcol_smem, i, 3, KC, xs_layout), wy3, acc)
        _store_tile(acc, out_desc, out_smem, (p * D + i) * D, i % 2)
    tma.store_wait(pendings=0)


# --------------------------------------------------------------------------------------------------------------
# Gluon: software-pipelined async wgmma (weighting of chunk k+1 and the previous tile's store under the wgmma)
# --------------------------------------------------------------------------------------------------------------
@gluon.jit
def _tile_rest(acc, a0, xt1, xt2, xt3, wy1, wy2, wy3, xcol_smem, i, KC: gl.constexpr, xs_layout: gl.constexpr):
    """Chunks 1..3 of tile i, chunk 0 (a0) issued and maybe in flight: each chunk is weighted while the
    previous one is on the tensor cores; returns with the last chunk in flight (acc, its operand a3)."""
    a1 = _weighted(xt1, xcol_smem, i, 1, KC, xs_layout)
    acc = warpgroup_mma(a1, wy1, acc, is_async=True)
    acc, a0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a0))
    a2 = _weighted(xt2, xcol_smem, i, 2, KC, xs_layout)
    acc = warpgroup_mma(a2, wy2, acc, is_async=True)
    acc, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a1))
    a3 = _weighted(xt3, xcol_smem, i, 3, KC, xs_layout)
    acc = warpgroup_mma(a3, wy3, acc, is_async=True)
    acc, a2 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a2))
    return acc, a3


@gluon.jit
def share_gluon_pipe_kernel(x_desc, wy_desc, out_desc, UNROLL: gl.constexpr):
    M: gl.constexpr = x_desc.block_type.shape[0]
    D: gl.constexpr = x_desc.block_type.shape[1]
    KC: gl.constexpr = M // 4
    gl.static_assert(D % UNROLL == 0)
    gl.static_assert(UNROLL % 2 == 0, "the two register sets must not swap through the loop's phis")
    gl.static_assert(gl.num_warps() == 4, "one warp group")
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    xs_layout: gl.constexpr = gl.SliceLayout(0, a_layout)
    p = gl.program_id(0)

    xcol_smem, out_smem, xt0, xt1, xt2, xt3, wy0, wy1, wy2, wy3 = _operands(x_desc, wy_desc, out_desc, p, a_layout)
    # Two accumulator register sets: tile i's first wgmma is issued while tile i-1 is in flight, so it must
    # not take registers that a non-wgmma instruction writes then (ptxas would serialize the wgmmas): it reuses,
    # with use_acc=False, the set of tile i-2, retired and stored. The dynamic loop runs UNROLL tiles per trip,
    # unrolled, and drains the wgmma pipeline at the end of each trip: with a wgmma in flight across the loop's
    # back edge and the previous tile's registers read under it, ptxas serializes all wgmmas (C7514).
    spare0 = gl.zeros([D, D], gl.float32, mma)
    spare1 = gl.zeros([D, D], gl.float32, mma)
    for q in range(D // UNROLL):
        for u in gl.static_range(UNROLL):
            i = q * UNROLL + u
            a0 = _weighted(xt0, xcol_smem, i, 0, KC, xs_layout)
            if u == 0:
                acc = warpgroup_mma(a0, wy0, spare0, use_acc=False, is_async=True)
                spare = spare1
            else:
                nxt = warpgroup_mma(a0, wy0, spare, use_acc=False, is_async=True)
                done, a_last, nxt = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_last, nxt))
                # tile i-1 is complete: its epilogue runs while chunk 0 of tile i is on the tensor cores
                _store_tile(done, out_desc, out_smem, (p * D + i - 1) * D, (i - 1) % 2)
                spare = done
                acc = nxt
            acc, a_last = _tile_rest(acc, a0, xt1, xt2, xt3, wy1, wy2, wy3, xcol_smem, i, KC, xs_layout)
        done, a_last = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_last))
        _store_tile(done, out_desc, out_smem, (p * D + q * UNROLL + UNROLL - 1) * D, (UNROLL - 1) % 2)
        spare0 = spare
        spare1 = done
    tma.store_wait(pendings=0)


# --------------------------------------------------------------------------------------------------------------
# Gluon: warp specialised. A worker warp group weights the operand (CUDA cores) into a ring of shared buffers;
# the default warp group only issues the wgmmas (A from shared memory) and stores the tiles
# --------------------------------------------------------------------------------------------------------------
@gluon.jit
def _ws_weigh(x_smem, xcol, a_bufs, ready, empty, D: gl.constexpr, KC: gl.constexpr):
    """Worker: for every tile i and piece k, X^T[:, piece k] * X[piece k, i] into ring slot (4 i + k) % STAGES
    once the wgmma that read that slot before has finished (empty), then ready."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    lay: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    xs_layout: gl.constexpr = gl.SliceLayout(0, lay)
    xts = (x_smem.slice(0 * KC, KC).permute((1, 0)).load(lay), x_smem.slice(1 * KC, KC).permute((1, 0)).load(lay),
           x_smem.slice(2 * KC, KC).permute((1, 0)).load(lay), x_smem.slice(3 * KC, KC).permute((1, 0)).load(lay))
    for i in range(D):
        for k in gl.static_range(4):
            xt_k = xts[k]
            c = i * 4 + k
            idx = c % STAGES
            mbarrier.wait(empty.index(idx), ((c // STAGES) & 1) ^ 1)
            xi = xcol.index(i).slice(k * KC, KC).load(xs_layout)
            a_bufs.index(idx).store(xt_k * gl.expand_dims(xi, 0))
            fence_async_shared()
            mbarrier.arrive(ready.index(idx), count=1)


@gluon.jit
def _ws_mma(a_bufs, ready, empty, wy_smem, out_desc, out_smem, p, D: gl.constexpr, KC: gl.constexpr):
    """Default partition: each tile's four wgmmas from the ring (a slot released once its wgmma is done),
    then the tile's store (_store_tile)."""
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    zero = gl.zeros([D, D], gl.float32, mma)
    for i in range(D):
        for k in gl.static_range(4):
            c = i * 4 + k
            idx = c % STAGES
            mbarrier.wait(ready.index(idx), (c // STAGES) & 1)
            if k == 0:
                acc = warpgroup_mma(a_bufs.index(idx), wy_smem.slice(k * KC, KC), zero, use_acc=False, is_async=True)
            else:
                acc = warpgroup_mma(a_bufs.index(idx), wy_smem.slice(k * KC, KC), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                mbarrier.arrive(empty.index((c - 1) % STAGES), count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index((i * 4 + 3) % STAGES), count=1)
        _store_tile(acc, out_desc, out_smem, (p * D + i) * D, i % 2)
    tma.store_wait(pendings=0)


@gluon.jit
def share_gluon_ws_kernel(x_desc, wy_desc, out_desc, STAGES: gl.constexpr, WREGS: gl.constexpr):
    M: gl.constexpr = x_desc.block_type.shape[0]
    D: gl.constexpr = x_desc.block_type.shape[1]
    KC: gl.constexpr = M // 4
    gl.static_assert(gl.num_warps() == 4, "one warp group issues the wgmmas")
    p = gl.program_id(0)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [M, D], x_desc.layout)
    wy_smem = gl.allocate_shared_memory(gl.bfloat16, [M, D], wy_desc.layout)
    xcol_smem = gl.allocate_shared_memory(gl.bfloat16, [D, M],
                                          gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
    out_smem = gl.allocate_shared_memory(gl.bfloat16, [2, D, D], out_desc.layout)
    a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, KC], gl.bfloat16)
    a_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, D, KC], a_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    xcol = _load_inputs(x_desc, wy_desc, p, x_smem, wy_smem, xcol_smem, M, D)
    gl.warp_specialize([(_ws_mma, (a_bufs, ready, empty, wy_smem, out_desc, out_smem, p, D, KC)),
                        (_ws_weigh, (x_smem, xcol, a_bufs, ready, empty, D, KC))], [4], [WREGS])


# --------------------------------------------------------------------------------------------------------------
# launchers, variants
# --------------------------------------------------------------------------------------------------------------
def _layouts():
    io = gl.NVMMASharedLayout.get_default_for([M_TOKENS, HEAD_DIM], gl.bfloat16)
    out = gl.NVMMASharedLayout.get_default_for([HEAD_DIM, HEAD_DIM], gl.bfloat16)
    return io, out


def _descriptors(x, wy, out):
    n, m, d = x.shape
    io, ol = _layouts()
    x2, wy2, out2 = x.view(n * m, d), wy.view(n * m, d), out.view(n * d * d, d)
    return (TensorDescriptor.from_tensor(x2, [m, d], io), TensorDescriptor.from_tensor(wy2, [m, d], io),
            TensorDescriptor.from_tensor(out2, [d, d], ol))


def triton_launch(warps, stages):

    def run(x, wy, out):
        share_triton_kernel[(x.shape[0], )](x, wy, out, M=x.shape[1], D=x.shape[2], num_warps=warps,
                                            num_stages=stages)

    return run


def triton_tma_launch(warps, stages):

    def run(x, wy, out):
        n, m, d = x.shape
        desc = TritonDescriptor.from_tensor(out.view(n * d * d, d), [d, d])
        share_triton_tma_kernel[(n, )](x, wy, desc, M=m, D=d, num_warps=warps, num_stages=stages)

    return run


def gluon_launch(kernel, consts):

    def run(x, wy, out):
        kernel[(x.shape[0], )](*_descriptors(x, wy, out), **consts, num_warps=4)

    return run


VARIANTS = [(f"triton w{w} s{s}", "triton", (w, s)) for w in (8, 4) for s in (2, 3)]
VARIANTS += [(f"triton w{w} s2, TMA stores", "triton_tma", (w, 2)) for w in (8, 4)]
VARIANTS += [("gluon sync (TMA stores)", "gluon", (share_gluon_sync_kernel, {}))]
VARIANTS += [(f"gluon pipelined, {u} tiles/trip", "gluon", (share_gluon_pipe_kernel, {"UNROLL": u})) for u in (2, 4, 8)]
VARIANTS += [(f"gluon warp-specialised, {st} stages, worker {r} regs", "gluon",
              (share_gluon_ws_kernel, {"STAGES": st, "WREGS": r})) for st, r in ((2, 152), (4, 152), (8, 152))]


def make_runner(kind, arg):
    if kind == "triton_tma":
        return triton_tma_launch(*arg)
    return triton_launch(*arg) if kind == "triton" else gluon_launch(*arg)


# --------------------------------------------------------------------------------------------------------------
# offline compile for sm_90
# --------------------------------------------------------------------------------------------------------------
def _ptxas_info(ptx):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    warnings = [ln.strip() for ln in text.splitlines() if "warning" in ln.lower() or "serializ" in ln.lower()]
    return (int(regs.group(1)) if regs else None, int(spill_st.group(1)) if spill_st else None,
            int(spill_ld.group(1)) if spill_ld else None, warnings)


def compile_offline(kind, arg):
    target = GPUTarget("cuda", 90, 32)
    if kind == "triton":
        warps, stages = arg
        fn = share_triton_kernel
        sig = {"X": "*bf16", "WY": "*bf16", "OUT": "*bf16", "M": "constexpr", "D": "constexpr"}
        attrs = {(i, ): [["tt.divisibility", 16]] for i in range(3)}
        src = ASTSource(fn=fn, signature=sig, constexprs={"M": M_TOKENS, "D": HEAD_DIM}, attrs=attrs)
        return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
    if kind == "triton_tma":
        warps, stages = arg
        out = torch.empty(2 * HEAD_DIM * HEAD_DIM, HEAD_DIM, dtype=torch.bfloat16)
        sig = {"X": "*bf16", "WY": "*bf16", "out_desc": mangle_type(TritonDescriptor.from_tensor(out, [HEAD_DIM, HEAD_DIM])),
               "M": "constexpr", "D": "constexpr"}
        attrs = {(i, ): [["tt.divisibility", 16]] for i in range(2)}
        src = ASTSource(fn=share_triton_tma_kernel, signature=sig, constexprs={"M": M_TOKENS, "D": HEAD_DIM}, attrs=attrs)
        return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
    # descriptors of CPU tensors give the signature strings the JIT would derive on the device
    n = 2
    x = torch.empty(n, M_TOKENS, HEAD_DIM, dtype=torch.bfloat16)
    out = torch.empty(n, HEAD_DIM, HEAD_DIM, HEAD_DIM, dtype=torch.bfloat16)
    descs = _descriptors(x, x, out)
    sig = {name: mangle_type(desc) for name, desc in zip(("x_desc", "wy_desc", "out_desc"), descs)}
    fn, consts = arg
    sig.update({name: "constexpr" for name in consts})
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=target, options={"num_warps": 4})


def report_compile(label, build):
    """Compile with build() (offline, returns the compiled kernel) and print `ok     label regs R spill
    stores S B loads L B shared M B warps W` and ptxas's warnings, or `FAILED label` and the error's last
    lines; returns whether it compiled. (check_gluon_share.py reports its kernels through it too.)"""
    try:
        compiled = build()
        regs, sst, sld, warnings = _ptxas_info(compiled.asm["ptx"])
        print(f"ok     {label} regs {regs} spill stores {sst} B loads {sld} B shared {compiled.metadata.shared} B"
              f" warps {compiled.metadata.num_warps}")
        for w in warnings:
            print(f"       ptxas: {w}")
        return True
    except Exception as err:  # noqa: BLE001
        msg = str(err).strip().splitlines()
        print(f"FAILED {label} {type(err).__name__}: {' | '.join(msg[-8:])[:3000]}")
        return False


def compile_only():
    print(f"triton {triton.__version__} from {os.path.dirname(triton.__file__)}; target sm_90 (offline)")
    ok = True
    for name, kind, arg in VARIANTS:
        ok &= report_compile(f"{name:32s}", lambda kind=kind, arg=arg: compile_offline(kind, arg))
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------------------------
# check and time on a CUDA device
# --------------------------------------------------------------------------------------------------------------
def reference(x, wy):
    xf, wf = x.float(), wy.float()
    # out[p, i, j, c] = sum_t X[p, t, j] X[p, t, i] WY[p, t, c]; the weighted operand is rounded to bf16 as
    # in the kernels (exact product of two bf16 rounded once)
    a = (xf[:, None, :, :] * xf.transpose(1, 2)[:, :, :, None]).to(torch.bfloat16).float()  # [N, i, t, j]
    return torch.einsum("pitj,ptc->pijc", a, wf)


def inputs(n, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, M_TOKENS, HEAD_DIM, generator=g).to(device=device, dtype=torch.bfloat16)
    wy = torch.randn(n, M_TOKENS, HEAD_DIM, generator=g).to(device=device, dtype=torch.bfloat16)
    return x, wy


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--only", default="", help="comma-separated substrings: the variants whose names hold one")
    args = parser.parse_args()
    if args.only:
        VARIANTS[:] = [v for v in VARIANTS if any(o in v[0] for o in args.only.split(","))]
    if args.compile_only:
        return compile_only()
    dev = "cuda"
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    n, d, m = args.n, HEAD_DIM, M_TOKENS
    xs, wys = inputs(8, dev)
    ref = reference(xs, wys)
    x, wy = inputs(n, dev)
    flops = 2.0 * n * d * m * d * d
    store_bytes = n * d**3 * 2
    print(f"N {n}, M {m}, d {d}: {flops / 1e9:.1f} GFLOP, {store_bytes / 1e9:.2f} GB stored")
    print(f"{'kernel':34s} {'rel err':>9s} {'ms':>8s} {'TFLOP/s':>8s} {'store GB/s':>10s}")
    for name, kind, arg in VARIANTS:
        try:
            run = make_runner(kind, arg)
            out_s = torch.empty(8, d, d, d, device=dev, dtype=torch.bfloat16)
            run(xs, wys, out_s)
            torch.cuda.synchronize()
            err = ((out_s.float() - ref).abs().max() / ref.abs().max()).item()
            out = torch.empty(n, d, d, d, device=dev, dtype=torch.bfloat16)
            ms = triton.testing.do_bench(lambda: run(x, wy, out), warmup=50, rep=300, return_mode="median")
            flag = "" if err < 2e-2 else "  WRONG"
            print(f"{name:34s} {err:9.2e} {ms:8.3f} {flops / ms / 1e9:8.1f} {store_bytes / ms / 1e6:10.1f}{flag}")
        except Exception as e:  # noqa: BLE001
            msg = str(e).strip().splitlines()
            print(f"{name:34s} FAILED {type(e).__name__}: {' | '.join(msg[-4:])[:600]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
