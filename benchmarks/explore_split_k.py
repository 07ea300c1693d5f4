"""Exploration (GPU): could a decode layer's q/k/v projection ride in the launch before it?

Answer (H100, RESULTS.md, generation, run AA): no. Per layer, graphed, 12 layers: the model's two launches
5.59 / 6.13 us (the down launch alone 2.44 / 2.77), the fused launch 13.06 us with 2 rows of h a program,
25.91 with 4, 17.87 with 8, 28.52 with 16. Each program adds a partial sum for every one of the 2304
outputs, so 48 to 384 programs make 0.1 to 0.9 million fp32 atomics a layer, which cost far more than
the launch they save. (`python benchmarks/explore_split_k.py --rows 2,4,8,16`, one call.)

At batch 1 the q/k/v launch costs the benchmark model's step about 57 us (4.8 us a layer; RESULTS.md,
generation, run X: the step without it 0.230 ms against 0.287), and 5x the Llama needs 0.236. The
q/k/v projection reads RMSNorm(h), h the hidden state that the MLP's down projection (+ the residual)
makes in the launch before: a grid-wide dependency, hence a launch. But RMSNorm(h) = g * h / rms(h),
and rms(h) is one number, so

    W_qkv RMSNorm(h) = (sum over the rows r of h: W_qkv[:, r] g_r h_r) / rms(h)

is a split-K sum over the rows of h that the down launch's programs each own: a program that makes
rows R of h can add W_qkv[:, R] (g h)[R] into an fp32 buffer by atomics, and h[R]^2 into a sum of
squares; the step's next launch (the attention's tail step) would divide by rms and apply the q/k
norms, RoPE and the gate. The weights read are the same bytes, read by the down launch's programs
before their wait for the launch before (programmatic dependent launch); what it adds are the
atomics (every program adds a partial sum for each of the 2304 outputs).

This times a chain of `layers` layers of the benchmark model's shape (hidden 768, intermediate 2048,
12 heads of 64; bf16; batch 1), graphed, three ways:

    launches    the model's two launches: the down projection + residual (triton_decode_layer.linear)
                and the q/k/v projection (project_qkvg: norm, projections, RoPE, gate)
    down only   the down launch alone (what the fused launch must beat, with the q/k/v launch gone)
    fused       one launch a layer (_down_qkv_kernel): rows of h = h_prev + W_down a, then the split-K
                sums into z [2304] fp32 and the sum of squares, by atomics (zeroed by a memset inside
                the graph, counted); --rows rows of h a program. The gate's 12 projections are left
                out (12 more sums a program)

and checks the fused sums against torch (z / rms against the normed projections, fp32).

    python benchmarks/explore_split_k.py [--layers 12] [--rows 4,8,16]
    TRITON_INTERPRET=1 python benchmarks/explore_split_k.py --check-only --rows 8
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
    dependent_launch, interpreting, pdl_options, prefetch_l2, wait_for_previous_kernel)
from power_transformers.kernels.triton_decode_layer import linear, project_qkvg  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM = 768, 2048, 12, 64
QKV = 3 * HEADS * HEAD_DIM


@triton.jit
def _down_qkv_kernel(A, W1, H_PREV, H, W2T, GW, Z, SS, K1: tl.constexpr, N2: tl.constexpr, ROWS: tl.constexpr,
                     BZ: tl.constexpr, LINES: tl.constexpr, PDL: tl.constexpr):
    """Grid (HIDDEN / ROWS,): rows r of h = h_prev + W1 a (W1 [HIDDEN, K1] bf16, a [K1] bf16, h in bf16
    as the residual add rounds it), then Z [N2] += W2T[r, :]^T (g h)[r] and SS += sum h[r]^2 (fp32
    atomics). W2T [HIDDEN, N2] is the q/k/v weight transposed, so that a program's rows are contiguous:
    with PDL its LINES 128-byte lines (a power of two at least ROWS N2 / 64) are asked into L2 before the
    wait, its first tile loaded into registers."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    w1 = tl.load(W1 + rows[:, None] * K1 + tl.arange(0, K1)[None, :])
    offs_z = tl.arange(0, BZ)
    # these rows' q/k/v weights before the wait, like the down weights: the first of their N2 / BZ tiles
    # in registers, all of them asked into L2 (with PDL)
    w2 = tl.load(W2T + rows[:, None] * N2 + offs_z[None, :])
    if PDL:
        lines = tl.arange(0, LINES) * 64
        prefetch_l2(W2T + tl.program_id(0) * ROWS * N2 + lines, lines < ROWS * N2)
    wait_for_previous_kernel(PDL)
    a = tl.load(A + tl.arange(0, K1)).to(tl.float32)
    y = tl.sum(w1.to(tl.float32) * a[None, :], axis=1).to(H.dtype.element_ty)
    h = (tl.load(H_PREV + rows).to(tl.float32) + y.to(tl.float32)).to(H.dtype.element_ty)
    tl.store(H + rows, h)
    hf = h.to(tl.float32)
    tl.atomic_add(SS, tl.sum(hf * hf, axis=0), sem="relaxed")
    hg = (tl.load(GW + rows).to(tl.float32) * hf)[:, None]
    tl.atomic_add(Z + offs_z, tl.sum(w2.to(tl.float32) * hg, axis=0), sem="relaxed")
    for z0 in tl.static_range(BZ, N2, BZ):
        w2 = tl.load(W2T + rows[:, None] * N2 + z0 + offs_z[None, :])
        tl.atomic_add(Z + z0 + offs_z, tl.sum(w2.to(tl.float32) * hg, axis=0), sem="relaxed")


def run_fused(a, w1, hs, w2t, gw, zs, ss, rows, warps):
    """Every layer's fused launch; hs [layers + 1, HIDDEN] (row 0 the input), zs [layers, QKV], ss [layers]."""
    pdl = dependent_launch(a.device)
    warps = warps or (4 if rows <= 8 else 8)
    zs.zero_()
    ss.zero_()
    opts = {} if interpreting() else {"num_warps": warps, **pdl_options(pdl)}
    for layer in range(w1.shape[0]):
        _down_qkv_kernel[(HIDDEN // rows,)](a, w1[layer], hs[layer], hs[layer + 1], w2t[layer], gw[layer], zs[layer],
                                           ss[layer:layer + 1], K1=INTERMEDIATE, N2=QKV, ROWS=rows, BZ=256,
                                           LINES=triton.next_power_of_2(rows * QKV // 64), PDL=pdl, **opts)


def run_launches(a, w1, h0, wq, wk, wv, wg, gw, positions, inv_freq, qkv_too=True):
    """The model's launches: down + residual, then (qkv_too) the q/k/v projection of the result;
    returns every layer's h [1, HIDDEN]."""
    hs = [h0[None]]
    for layer in range(w1.shape[0]):
        hs.append(linear(a[None], None, 0.0, w1[layer], None, None, None, hs[-1]))
        if qkv_too:
            project_qkvg(hs[-1], gw[layer], 1e-6, wq[layer], wk[layer], wv[layer], wg[layer], None, None, None, None,
                         None, None, 1e-6, positions, inv_freq, 1.0, HEADS, HEADS)
    return hs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rows", default="4,8,16", help="rows of h per fused program (powers of two)")
    parser.add_argument("--warps", type=int, default=0, help="a fused program's warps; 0: 4 up to 8 rows, else 8 "
                        "(ptxas sm_90: 90 / 161 registers at 4 / 8 rows, 16 rows spill at 4 warps, 198 at 8)")
    parser.add_argument("--check-only", action="store_true", help="no timing (the interpreter)")
    args = parser.parse_args()
    device = "cpu" if interpreting() else "cuda"
    layers = 2 if args.check_only else args.layers
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(torch.bfloat16)

    a = rand(INTERMEDIATE)
    w1 = rand(layers, HIDDEN, INTERMEDIATE, scale=INTERMEDIATE**-0.5)
    wqkv = rand(layers, QKV, HIDDEN, scale=HIDDEN**-0.5)
    wq, wk, wv = (wqkv[:, i * HIDDEN:(i + 1) * HIDDEN].contiguous() for i in range(3))
    wg = rand(layers, HEADS, HIDDEN, scale=HIDDEN**-0.5)
    w2t = wqkv.transpose(1, 2).contiguous()
    gw = (1 + 0.1 * torch.randn(layers, HIDDEN, generator=g, device=device)).to(torch.bfloat16)
    positions = torch.tensor([4096], device=device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
    h0 = rand(HIDDEN)

    def chain_buffers():
        hs = torch.empty(layers + 1, HIDDEN, dtype=torch.bfloat16, device=device)
        hs[0] = h0
        return hs

    ok = True
    ref_h = torch.cat(run_launches(a, w1, h0, wq, wk, wv, wg, gw, positions, inv_freq, qkv_too=False))
    for rows in [int(r) for r in args.rows.split(",")]:
        hs, zs, ss = chain_buffers(), torch.empty(layers, QKV, device=device), torch.empty(layers, device=device)
        run_fused(a, w1, hs, w2t, gw, zs, ss, rows, args.warps)
        h = hs[1:].float()
        rstd = torch.rsqrt(ss / HIDDEN + 1e-6)
        want = torch.einsum("lnk,lk->ln", wqkv.float(), (gw.float() * h)) * torch.rsqrt(
            (h * h).mean(-1, keepdim=True) + 1e-6)
        err_z = ((zs * rstd[:, None] - want).abs().max() / want.abs().max()).item()
        # (the fused launch sums each row's products in another order than the model's down launch)
        err_h = ((hs.float() - ref_h.float()).abs().max() / ref_h.float().abs().max()).item()
        ok &= err_z < 1e-4 and err_h < 1e-2
        print(f"fused, {rows} rows a program: h against the down launch's {err_h:.2e}; z / rms against torch "
              f"{err_z:.2e}", flush=True)
    if not ok:
        return 1
    if args.check_only:
        return 0

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_attention import ceilings, graphed_ms

    _, copy_tbs = ceilings()
    weight_bytes = (w1[0].numel() + wqkv[0].numel() + wg[0].numel()) * 2
    print(f"{torch.cuda.get_device_name()}; {layers} layers, hidden {HIDDEN}, intermediate {INTERMEDIATE}, q/k/v "
          f"{QKV}; PDL {dependent_launch(torch.device(device))}; copy {copy_tbs:.2f} TB/s; floor (down + q/k/v "
          f"weights at the copy rate) {weight_bytes / copy_tbs / 1e6:.2f} us a layer")
    print("| chain | us a layer |\n|---|---|")
    hs = chain_buffers()
    runs = {"launches: down + residual, then q/k/v (the model's)":
            lambda: run_launches(a, w1, h0, wq, wk, wv, wg, gw, positions, inv_freq),
            "down + residual alone": lambda: run_launches(a, w1, h0, wq, wk, wv, wg, gw, positions, inv_freq, False)}
    zs, ss = torch.empty(layers, QKV, device=device), torch.empty(layers, device=device)
    for rows in [int(r) for r in args.rows.split(",")]:
        runs[f"fused, {rows} rows a program ({HIDDEN // rows} programs)"] = (
            lambda rows=rows: run_fused(a, w1, hs, w2t, gw, zs, ss, rows, args.warps))
    for _ in range(2):
        for name, run in runs.items():
            print(f"| {name} | {graphed_ms(run, 4) * 1e3 / layers:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
