"""Per-kernel GPU times of our chunked forward + backward (torch.profiler), for tuning.

    python benchmarks/profile_kernels.py [T] [C,...] [LAUNCH ...] [--heads=N] [--kv-heads=N] [--head-dim=d]

C the chunk. The backward reads the forward's chunk states where power_attention would keep them
(triton_power.KEEP_STATES_MAX_D_PER_CHUNK, POWER_TRITON_KEEP_STATES), else recomputes them.
16 query heads (--heads; --kv-heads: fewer key/value heads, GQA), d = 64 (--head-dim), bf16, gating, 64k
tokens. Each LAUNCH is a set of launch options for
triton_chunk.LAUNCH, `kernel=warps:stages` joined by commas (`share=4:2,fwd=8:3`), or
`default`; every chunk runs with every set. Prints one line per configuration and the fastest
last.
"""

import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from power_transformers.kernels import triton_chunk as tc
from power_transformers.kernels import triton_common
from power_transformers.kernels import triton_power as tp

OPTIONS = dict(a[2:].partition("=")[::2] for a in sys.argv[1:] if a.startswith("--"))
if set(OPTIONS) - {"heads", "kv-heads", "head-dim"} or not all(v.isdigit() for v in OPTIONS.values()):
    sys.exit(f"options: --heads=N, --kv-heads=N, --head-dim=d; got {sys.argv[1:]}")
ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
T = int(ARGS[0]) if ARGS else 65536
CHUNKS = [int(c) for c in (ARGS[1] if len(ARGS) > 1 else "128,64").split(",")]
LAUNCHES = ARGS[2:] or ["default"]
B, H, D = 65536 // T, int(OPTIONS.get("heads", 16)), int(OPTIONS.get("head-dim", 64))
HK = int(OPTIONS.get("kv-heads", H))
KERNELS = ["_chunk_share_kernel", "_share_kernel", "_state_scan_kernel", "_chunk_fwd_kernel", "_chunk_bwd_q_kernel",
           "_chunk_bwd_kv_kernel", "_output_grads_kernel"]


def run(chunk, reps=3):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, device="cuda", generator=g, dtype=torch.bfloat16) for h in (H, HK, HK))
    lg = F.logsigmoid(torch.randn(B, T, HK, device="cuda", generator=g) + 3)
    s = D**-0.5
    keep = tp._keep_states(D, chunk, None)
    y, den, _, _, kept = tc.chunk_forward(q, k, v, lg, None, None, s, 1e-6, chunk, keep)
    gy = torch.randn_like(y)
    tc.chunk_backward(q, k, v, lg, None, None, y, den, gy, None, None, s, 1e-6, chunk, kept)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            y, den, _, _, kept = tc.chunk_forward(q, k, v, lg, None, None, s, 1e-6, chunk, keep)
            tc.chunk_backward(q, k, v, lg, None, None, y, den, gy, None, None, s, 1e-6, chunk, kept)
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            times[e.key] = t / reps / 1e3
    return times


def registers():
    """'name regs/spills' of every compiled variant of our kernels (spills slow a kernel down)."""
    out = []
    for name in KERNELS:
        fn = getattr(tc, name, None) or getattr(triton_common, name, None)
        if fn is None:  # (gluon_share's kernel: its compiled form has no register count here)
            continue
        for caches in getattr(fn, "device_caches", {}).values():
            for compiled in caches[0].values():
                out.append(f"{name.strip('_').replace('_kernel', '')} {compiled.n_regs}/{compiled.n_spills}")
    return " ".join(out)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), f"T={T} B={B} H={H}/{HK} d={D}; ms per forward+backward "
          "(the state kernels run twice where the states are kept: the forward and dL/dR; three times where "
          "the backward recomputes them)", flush=True)
    best = None
    for chunk in CHUNKS:
        for launch in LAUNCHES:
            tc.LAUNCH.clear()
            tc.LAUNCH.update(tc.parse_launch(launch))
            try:
                times = run(chunk)
            except Exception as err:  # noqa: BLE001
                print(f"C={chunk} {launch}: failed {repr(err)[:300]}", flush=True)
                continue
            total = sum(times.values())  # our kernels and the torch ops around them
            parts = " ".join(f"{k.strip('_').replace('_kernel', '')}={times.get(k, 0):.2f}" for k in KERNELS)
            kept = "kept" if tp._keep_states(D, chunk, None) else "recomputed"
            print(f"C={chunk} ({kept}) {launch}: total {total:.2f} | {parts}", flush=True)
            rest = sorted(((t, k) for k, t in times.items() if k not in KERNELS), reverse=True)
            print(f"  torch ops {sum(t for t, _ in rest):.2f}:", " ".join(f"{k[:50]}={t:.2f}" for t, k in rest[:6]), flush=True)
            try:
                print("  registers/spills:", registers(), flush=True)
            except Exception as err:  # noqa: BLE001
                print("  registers/spills: not read", repr(err)[:200], flush=True)
            if best is None or total < best[0]:
                best = (total, chunk, launch)
    if best:
        print(f"BEST C={best[1]} {best[2]} total {best[0]:.2f} ms")
