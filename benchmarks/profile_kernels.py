"""Per-kernel GPU times of our chunked forward + backward (torch.profiler), for tuning.

    python benchmarks/profile_kernels.py [T] [chunk,...] [block_d,...]
"""

import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from power_transformers.kernels import triton_chunk as tc

T = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
CHUNKS = [int(c) for c in (sys.argv[2] if len(sys.argv) > 2 else "64,128").split(",")]
BLOCKS = [int(c) for c in (sys.argv[3] if len(sys.argv) > 3 else "64,128").split(",")]
B, H, D = 65536 // T, 16, 64


def run(mod, chunk, reps=3):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    lg = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=g) + 3)
    s = D**-0.5
    y, den, _, _ = mod.chunk_forward(q, k, v, lg, None, None, s, 1e-6, chunk)
    gy = torch.randn_like(y)
    mod.chunk_backward(q, k, v, lg, None, None, y, den, gy, None, None, s, 1e-6, chunk)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            y, den, _, _ = mod.chunk_forward(q, k, v, lg, None, None, s, 1e-6, chunk)
            mod.chunk_backward(q, k, v, lg, None, None, y, den, gy, None, None, s, 1e-6, chunk)
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows[e.key] = t / reps / 1e3
    total = 0.0
    for name, ms in sorted(rows.items(), key=lambda kv: -kv[1])[:12]:
        print(f"   {ms:8.3f} ms  {name[:90]}")
        total += ms
    print(f"   {sum(rows.values()):8.3f} ms  total per fwd+bwd", flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), f"T={T} B={B} H={H} d={D}", flush=True)
    for chunk in CHUNKS:
        for bd in BLOCKS:
            tc.BLOCK_D = bd
            print(f"flat blocks, chunk {chunk}, BLOCK_D {bd}:", flush=True)
            try:
                run(tc, chunk)
            except Exception as err:  # noqa: BLE001
                print("   failed:", repr(err)[:400], flush=True)
        try:
            sys.path.insert(0, "benchmarks")
            import _rowblock_chunk as rb

            print(f"row blocks (previous version), chunk {chunk}:", flush=True)
            run(rb, chunk)
        except Exception as err:  # noqa: BLE001
            print("   failed:", repr(err)[:400], flush=True)
