"""Tuning (GPU): how many programs per (batch row, kv head) should read the state in a tail
decode step (triton_decode.tail_decode_; one more program takes the tail).

    python benchmarks/tune_tail_decode.py [--batch 8] [--heads 16] [--splits 1,2,4,8,16,32] [--tail-blocks 8192]
                                          [--warps 0]

Times DECODE_TAIL graphed steps (a whole fold cycle) per setting, as bench_attention.py does,
against the floor (the fp32 state read once at the copy bandwidth measured here), and names the
setting tail_decode_ takes by its rule (triton_decode._tail_split, TAIL_STEP_READERS).
--tail-blocks: values of triton_decode.TAIL_BLOCK_ELEMENTS (the tail program's product size) to try;
--warps: values of triton_decode.TAIL_STEP_WARPS (0: the rule's).
POWER_PDL=0 launches the kernels without programmatic dependent launch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # after PYTHONPATH: a tree named there is the one imported
sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import ceilings, graphed_ms  # noqa: E402

from power_transformers.kernels import triton_decode  # noqa: E402
from power_transformers.kernels import triton_power as tp  # noqa: E402
from power_transformers.kernels.reference import DECODE_TAIL, empty_decode_state, expanded_dim  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--splits", default="1,2,4,8,16,32")
    parser.add_argument("--tail-blocks", default=str(triton_decode.TAIL_BLOCK_ELEMENTS))
    parser.add_argument("--warps", default="0", help="warps per program to try (0: the rule's)")
    args = parser.parse_args()
    b, heads, d = args.batch, args.heads, 64
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(b, 1, heads, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    log_g = F.logsigmoid(torch.randn(b, 1, heads, device="cuda", generator=g) + 3.0)
    _, copy_tbs = ceilings()
    floor = b * heads * expanded_dim(d, 2) * (d + 1) * 4 / (copy_tbs * 1e12) * 1e3
    pdl = triton_decode.dependent_launch(q.device)
    print(torch.cuda.get_device_name(), f"batch {b}, {heads} heads, d = {d}, tail {DECODE_TAIL}, PDL {pdl}; "
          f"floor {floor:.4f} ms")
    rule = triton_decode._tail_split(b * heads, d)
    tail_split, tail_block = triton_decode._tail_split, triton_decode.TAIL_BLOCK_ELEMENTS
    warps_rule = triton_decode.TAIL_STEP_WARPS
    settings = [(int(r), int(e), int(w)) for w in args.warps.split(",") for e in args.tail_blocks.split(",")
                for r in args.splits.split(",")]
    for readers, elements, warps in settings:
        triton_decode._tail_split = lambda pairs, head_dim: readers
        triton_decode.TAIL_BLOCK_ELEMENTS = elements
        triton_decode.TAIL_STEP_WARPS = warps or warps_rule
        state = empty_decode_state(b, heads, d, 2, device="cuda")
        state.s.normal_(0, 0.01), state.z.uniform_()

        def step():
            return tp.power_attention_decode_(q, k, v, log_g, state)

        ms = graphed_ms(step, DECODE_TAIL, rep=300)
        print(f"{readers} + 1 programs, tail block {elements}, warps {warps or 'rule'}: {ms:.4f} ms per step, "
              f"{ms / floor:.2f}x the floor{'  <- the rule' if (readers, elements, warps) == (rule, tail_block, 0) else ''}",
              flush=True)
    triton_decode._tail_split, triton_decode.TAIL_BLOCK_ELEMENTS = tail_split, tail_block
    triton_decode.TAIL_STEP_WARPS = warps_rule


if __name__ == "__main__":
    main()
