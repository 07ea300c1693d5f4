"""Exploration (GPU): what a kernel boundary costs in a chain like a one-token decode step, and what
a counter between the stages of one launch would cost instead.

Answer (H100, RESULTS.md, generation, runs M and Y): 60 stages of [1024, 1024] took 1.94 us a stage
as launches with PDL, 3.73 as counters polled by atomic_add and 9.53 polled by ld.acquire, against a
floor of 0.70. Persistent programs (one wave that walks every stage, so that only they poll) took
1.94 / 1.86: no better than the launches, and worse at 12 stages (2.00 against 1.70) or 16 rows a
program (2.19 against 1.85); only at [2048, 2048] a little better (4.09 against 4.71). So the decode
step keeps its launches: a stage boundary costs about the same as a counter between resident
programs as it does as a launch.

    python benchmarks/explore_launch_chain.py [--stages 60] [--dim 1024] [--rows 8] [--warps 4]
    TRITON_INTERPRET=1 python benchmarks/explore_launch_chain.py --check-only --stages 4 --dim 64 --rows 16

(On the GPU run it under `timeout`: the counters chain spins, and a wrong assumption about the
order in which programs start would hang it.)

A batch-1 decode step of the benchmark model is a chain of about 60 dependent launches, each 2 to 4
us past its bytes even with programmatic dependent launch (RESULTS.md, generation, run L: a layer
is 21 us in five launches against floors of 7). Fewer, larger launches would need a stage to wait
for the one before inside a launch. This times a chain of `stages` matrix-vector products
y_s = W_s y_{s-1} ([dim, dim] bf16 weights per stage, more than L2 holds in all; `rows` output rows
per program), graphed, three ways:

    launches   one launch per stage; on Hopper with programmatic dependent launch, as the fused
               step launches: a program loads its weight tile, waits for the launch before, then
               reads y_{s-1}
    persistent one launch of dim / rows programs (at most one an SM, all resident at once), each
               walking the stages: its weight tile of stage s issued, then a spin on stage s - 1's
               counter as below (not run in the interpreter, which runs programs one at a time)
    counters   one launch for the whole chain, program ids ordered by stage: a program loads its
               weight tile, spins until the counter of stage s - 1 says all that stage's programs
               stored their rows, reads y_{s-1} from L2, stores its rows of y_s, and raises stage
               s's counter. The GPU starts a launch's programs in the order of their ids (what
               single-pass scans rely on), so every program a stage waits for has started. The
               counters are zeroed by a memset inside the graph (counted in the time).

and prints each against the floor (the weights read once at the copy bandwidth measured here).
Every chain must give the same numbers, bit for bit (the same products in the same order): a
stage that read y_{s-1} before it was complete would not. They are also compared with torch.
(Triton lowers the scalar atomic_add(c, 0) poll to one thread's ld.acquire and a broadcast through
shared memory; the inline ld.acquire poll runs on every thread.)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # after PYTHONPATH: a tree named there is the one imported
from power_transformers.kernels.triton_common import (  # noqa: E402
    dependent_launch, interpreting, multiprocessors, pdl_options, wait_for_previous_kernel)


@triton.jit
def stage_rows(W, XS, s, part, DIM: tl.constexpr, ROWS: tl.constexpr):
    """Stage s's weight tile for the rows part * ROWS.. ([ROWS, DIM], as stored) and those rows."""
    rows = part * ROWS + tl.arange(0, ROWS)
    # (int32 offsets: stages * DIM * DIM < 2**31 is checked on the host; s may be the literal 0 or 1,
    # which Triton passes as a constant with no .to)
    w = tl.load(W + s * DIM * DIM + rows[:, None] * DIM + tl.arange(0, DIM)[None, :])
    return w, rows


@triton.jit
def store_product(XS, s, w, rows, DIM: tl.constexpr):
    """XS[s + 1, rows] = w @ XS[s] (fp32 sums, stored in XS's dtype); XS[s] read from L2 (.cg: an
    earlier replay's copy may sit in this SM's L1)."""
    x = tl.load(XS + s * DIM + tl.arange(0, DIM), cache_modifier=".cg").to(tl.float32)
    y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(XS + (s + 1) * DIM + rows, y.to(XS.dtype.element_ty))


@triton.jit
def _stage_kernel(W, XS, s, DIM: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    """One stage: grid (DIM / ROWS,)."""
    w, rows = stage_rows(W, XS, s, tl.program_id(0), DIM, ROWS)
    wait_for_previous_kernel(PDL)
    store_product(XS, s, w, rows, DIM)


@triton.jit
def acquire_load(ptr):
    """The int32 at ptr, read at gpu scope with acquire semantics (PTX ld.acquire.gpu): a plain
    read of L2, where polling by atomic_add(ptr, 0) is a read-modify-write that the L2 slice
    serializes."""
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def wait_stage(COUNT, s, P: tl.constexpr, POLL_LOAD: tl.constexpr):
    """Spin until stage s's counter says its P programs stored their rows."""
    if POLL_LOAD:
        while acquire_load(COUNT + s) < P:
            pass
    else:
        while tl.atomic_add(COUNT + s, 0, sem="acquire") < P:
            pass


@triton.jit
def store_and_release(XS, COUNT, s, w, rows, DIM: tl.constexpr):
    """store_product, then raise stage s's counter once every thread's stores were issued."""
    store_product(XS, s, w, rows, DIM)
    tl.debug_barrier()
    tl.atomic_add(COUNT + s, 1, sem="release")


@triton.jit
def _chain_kernel(W, XS, COUNT, DIM: tl.constexpr, ROWS: tl.constexpr, POLL_LOAD: tl.constexpr):
    """Every stage: grid (stages * DIM / ROWS,), stage s the programs s * P .. (s + 1) * P - 1.
    POLL_LOAD: spin on acquire_load rather than on atomic_add(count, 0)."""
    P: tl.constexpr = DIM // ROWS
    s = tl.program_id(0) // P
    w, rows = stage_rows(W, XS, s, tl.program_id(0) % P, DIM, ROWS)
    if s > 0:
        wait_stage(COUNT, s - 1, P, POLL_LOAD)
    store_and_release(XS, COUNT, s, w, rows, DIM)


@triton.jit
def _persistent_chain_kernel(W, XS, COUNT, STAGES, DIM: tl.constexpr, ROWS: tl.constexpr, POLL_LOAD: tl.constexpr):
    """Every stage in P = DIM / ROWS programs that stay resident (grid (P,), at most one wave): each
    program walks the stages, issues the load of its stage-s weight tile, waits for stage s - 1's
    counter, then stores its rows of y_s and raises stage s's counter. Unlike _chain_kernel (one
    program a stage and part, thousands of them spinning at once), only P programs poll."""
    P: tl.constexpr = DIM // ROWS
    for s in range(STAGES):
        w, rows = stage_rows(W, XS, s, tl.program_id(0), DIM, ROWS)
        if s > 0:
            wait_stage(COUNT, s - 1, P, POLL_LOAD)
        store_and_release(XS, COUNT, s, w, rows, DIM)


def run_launches(w, xs, rows, warps):
    stages, dim = w.shape[0], w.shape[1]
    pdl = dependent_launch(xs.device)
    opts = {} if interpreting() else {"num_warps": warps, **pdl_options(pdl)}
    for s in range(stages):
        _stage_kernel[(dim // rows,)](w, xs, s, DIM=dim, ROWS=rows, PDL=pdl, **opts)


def run_counters(w, xs, count, rows, warps, poll_load=False):
    stages, dim = w.shape[0], w.shape[1]
    count.zero_()
    _chain_kernel[(stages * dim // rows,)](w, xs, count, DIM=dim, ROWS=rows, POLL_LOAD=poll_load and not interpreting(),
                                           **({} if interpreting() else {"num_warps": warps}))


def run_persistent(w, xs, count, rows, warps, poll_load=False):
    stages, dim = w.shape[0], w.shape[1]
    count.zero_()
    _persistent_chain_kernel[(dim // rows,)](w, xs, count, stages, DIM=dim, ROWS=rows, POLL_LOAD=poll_load,
                                             num_warps=warps)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, default=60)
    parser.add_argument("--dim", type=int, default=1024, help="a power of two")
    parser.add_argument("--rows", type=int, default=8, help="output rows per program")
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--check-only", action="store_true", help="no timing (the interpreter)")
    args = parser.parse_args()
    device = "cpu" if interpreting() else "cuda"
    if args.stages * args.dim * args.dim >= 2**31:
        parser.error("stages * dim * dim must be below 2**31 (the kernels' int32 offsets)")
    g = torch.Generator(device=device).manual_seed(0)
    w = (torch.randn(args.stages, args.dim, args.dim, generator=g, device=device) / args.dim**0.5).to(torch.bfloat16)
    x0 = torch.randn(args.dim, generator=g, device=device).to(torch.bfloat16)
    count = torch.zeros(args.stages, dtype=torch.int32, device=device)
    chains = {  # name: a function of the chain's [stages + 1, dim] buffer, row 0 the input
        "launches": lambda xs: run_launches(w, xs, args.rows, args.warps),
        "counters, polled by atomic_add": lambda xs: run_counters(w, xs, count, args.rows, args.warps),
        "counters, polled by ld.acquire": lambda xs: run_counters(w, xs, count, args.rows, args.warps, poll_load=True),
    }
    # The persistent chain spins on programs that run beside it: not in the interpreter, which runs
    # programs one after another; all P programs must be resident at once, so at most one per SM.
    persistent = not interpreting() and args.dim // args.rows <= multiprocessors(torch.device(device))
    if persistent:
        chains["persistent programs, counters polled by atomic_add"] = (
            lambda xs: run_persistent(w, xs, count, args.rows, args.warps))
        chains["persistent programs, counters polled by ld.acquire"] = (
            lambda xs: run_persistent(w, xs, count, args.rows, args.warps, poll_load=True))
    outs = {}
    for name, run in chains.items():
        outs[name] = torch.zeros(args.stages + 1, args.dim, dtype=torch.bfloat16, device=device)
        outs[name][0] = x0
        run(outs[name])
    ref = x0.float()
    for s in range(args.stages):
        ref = (w[s].float() @ ref).to(torch.bfloat16).float()
    same = all(torch.equal(outs["launches"], y) for y in outs.values())
    last = outs["counters, polled by atomic_add"][-1].float()
    err = ((last - ref).norm() / ref.norm()).item()
    # (against torch the roundings of 60 stages drift apart: printed, not a condition)
    print(f"launches and every counter chain{'' if persistent else ' (the persistent ones not run)'} bit for bit the "
          f"same: {same}; last stage against torch: {err:.2e}", flush=True)
    if not same:
        return 1
    if args.check_only:
        return 0

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_attention import ceilings, graphed_ms

    _, copy_tbs = ceilings()
    floor_us = w.numel() * w.element_size() / (copy_tbs * 1e12) * 1e6
    print(f"{torch.cuda.get_device_name()}; {args.stages} stages of [{args.dim}, {args.dim}] bf16, {args.rows} rows a "
          f"program, {args.warps} warps; PDL {dependent_launch(torch.device(device))}; copy {copy_tbs:.2f} TB/s")
    print("| chain | us | us a stage | floor us a stage |\n|---|---|---|---|")
    for name, run in chains.items():
        us = graphed_ms(lambda run=run, xs=outs[name]: run(xs), 4) * 1e3
        print(f"| {name} | {us:.1f} | {us / args.stages:.2f} | {floor_us / args.stages:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
