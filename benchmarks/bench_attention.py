"""Attention kernel benchmark (issue 3): ours vs SDPA (flash, cuDNN and its default choice) vs Manifest's `retention`, one run.

    python benchmarks/bench_attention.py [--out results.md] [--retention-budget 240]

Training: T = 1k, 4k, 16k, 64k at 64k tokens per batch (b = 65536 / T), 16 heads, d = 64,
degree 2, gating, bf16: forward and forward+backward.
Decode: batch 8, 16 heads, d = 64, one token: ours against its fp32 state, `retention`'s
power_retention_inference against its state, SDPA against KV caches of 4k ... 128k tokens.
Ceilings measured in the same run: bf16 matmul rate (8192^3) and copy bandwidth (1 GiB
device-to-device copy, bytes read + written).

Ours twice: the chunked form (any T) and the attention form (what power_attention runs for a
short sequence without a state in or out, triton_power.ATTENTION_FORM_MAX_T), each forced.

FLOP count (ours chunked, per token per head, degree 2, chunk C, D = d (d + 1) / 2):
    forward   2 C d   (causal half of the two chunk-local products Q K^T and A V)
            + 2 D d   (state update phi(K)^T V)
            + 2 D d   (state query phi(Q) S)
    forward+backward = 3 x forward (the usual convention; the backward's recomputation of
    the chunk states is not counted). These are the useful FLOPs; the kernels do more
    (full [d, d] tiles for the triangular row-blocks of phi).
SDPA (causal) and our attention form, per head: forward 2 T^2 d per sequence; forward+backward
3.5 x forward for SDPA, 3 x for ours (as for the chunked form).
Timing: triton.testing.do_bench, median, after warm-up; inputs random (never zeros).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F
import triton

from power_transformers.kernels import triton_power as tp
from power_transformers.kernels.reference import DECODE_TAIL, empty_decode_state, expanded_dim

TOKENS = 65536
HEADS = 16
D_HEAD = 64


def bench(fn, grad_to_none=None, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def graphed_ms(fn, steps, rep=100):
    """ms per call of `steps` calls captured in one CUDA graph (what a static cache and
    reduce-overhead give the model), after `steps` calls to warm up."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(steps):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            fn()
    return bench(graph.replay, rep=rep) / steps


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    matmul_tflops = 2 * 8192**3 / ms / 1e9
    x = torch.randn(256 * 1024 * 1024, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    copy_tbs = 2 * x.numel() * 4 / ms / 1e9
    return matmul_tflops, copy_tbs


def train_inputs(t, requires_grad=True, seed=0):
    b = TOKENS // t
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, t, HEADS, D_HEAD, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    log_g = F.logsigmoid(torch.randn(b, t, HEADS, device="cuda", generator=g) + 3.0)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, log_g)]


def ours_flops(t, chunk):
    dim = expanded_dim(D_HEAD, 2)
    return TOKENS * HEADS * (2 * chunk * D_HEAD + 4 * dim * D_HEAD)


def attention_form_flops(t):
    """Causal attention form, per head: QK^T and A V over the T^2 / 2 pairs, 2 T^2 d per sequence."""
    return (TOKENS // t) * HEADS * 2 * t * t * D_HEAD


def time_ours(t, chunk, form="chunked"):
    """Our forward and forward+backward, with the form forced: "chunked" or "attention"."""
    os.environ["POWER_TRITON_ATTENTION_MAX_T"] = "0" if form == "chunked" else str(1 << 40)
    q, k, v, log_g = train_inputs(t)
    with torch.no_grad():
        fwd = bench(lambda: tp.power_attention(q, k, v, log_g, chunk_size=chunk))
    gy = torch.randn_like(q)

    def fb():
        y, _ = tp.power_attention(q, k, v, log_g, chunk_size=chunk)
        y.backward(gy)

    fwdbwd = bench(fb, grad_to_none=[q, k, v, log_g])
    return fwd, fwdbwd


def profile_parts(t, chunk):
    """Time each kernel of ours separately (ms): where the forward+backward goes."""
    from power_transformers.kernels import triton_chunk as tc

    q, k, v, log_g = train_inputs(t, requires_grad=False)
    scale = D_HEAD**-0.5
    y, den, _, _, _ = tc.chunk_forward(q, k, v, log_g, None, None, scale, 1e-6, chunk)
    gy = torch.randn_like(y)
    parts = {
        "forward (states + chunk)": lambda: tc.chunk_forward(q, k, v, log_g, None, None, scale, 1e-6, chunk),
        "backward (all)": lambda: tc.chunk_backward(q, k, v, log_g, None, None, y, den, gy, None, None, scale, 1e-6, chunk),
    }
    return {name: bench(fn, rep=100) for name, fn in parts.items()}


def time_sdpa(t, backend="flash"):
    """SDPA (causal) forward and forward+backward with one backend forced: "flash" (FlashAttention-2,
    the issue's baseline), "cudnn" (cuDNN's fused attention), or "default" (SDPA's own choice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b = TOKENS // t
    q, k, v = (torch.randn(b, HEADS, t, D_HEAD, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    gy = torch.randn_like(q)
    forced = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "default": None}[backend]

    def fb():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(gy)

    with sdpa_kernel(forced) if forced is not None else contextlib.nullcontext():
        with torch.no_grad():
            fwd = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return fwd, bench(fb, grad_to_none=[q, k, v])


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def with_budget(seconds, fn, *args):
    """fn(*args), or None if it is still running after `seconds` (retention autotunes for minutes)."""
    if seconds <= 0:
        return None
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(seconds))
    try:
        return fn(*args)
    except Timeout:
        return None
    finally:
        signal.alarm(0)


def time_retention(t, chunk):
    from retention import power_retention

    q, k, v, log_g = train_inputs(t)
    kw = dict(deg=2, chunk_size=chunk)
    with torch.no_grad():
        fwd = bench(lambda: power_retention(q, k, v, log_g, **kw), rep=100)
    gy = torch.randn_like(q)

    def fb():
        power_retention(q, k, v, log_g, **kw).backward(gy)

    fwdbwd = bench(fb, grad_to_none=[q, k, v, log_g], rep=100)
    return fwd, fwdbwd


def decode_rows(copy_tbs, retention_ok, retention_budget):
    b = 8
    dim = expanded_dim(D_HEAD, 2)
    rows = []
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(b, 1, HEADS, D_HEAD, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    log_g = F.logsigmoid(torch.randn(b, 1, HEADS, device="cuda", generator=g) + 3.0)
    s = torch.randn(b, HEADS, dim, D_HEAD, device="cuda", generator=g) * 0.01
    z = torch.rand(b, HEADS, dim, device="cuda", generator=g)
    state_bytes = s.numel() * 4 + z.numel() * 4
    floor = state_bytes / (copy_tbs * 1e12) * 1e3

    def per_token():
        return tp.power_attention_decode_(q, k, v, log_g, (s, z))

    rows.append(("ours, state updated in place every token", state_bytes, bench(per_token, rep=100), floor))
    rows.append(("ours, state updated in place every token, CUDA graph", state_bytes, graphed_ms(per_token, 1), floor))
    # The model's decode: a tail of DECODE_TAIL tokens, the state read every token and written
    # once every DECODE_TAIL (the fold): timed over whole cycles, so the fold's cost is spread.
    tailed = empty_decode_state(b, HEADS, D_HEAD, 2, device="cuda")
    tailed.s.copy_(s), tailed.z.copy_(z)

    def with_tail():
        return tp.power_attention_decode_(q, k, v, log_g, tailed)

    tail_name = f"ours, tail of {DECODE_TAIL} (what the model's cache runs): state read every token, written every {DECODE_TAIL}"
    rows.append((tail_name, state_bytes, bench(with_tail, rep=100), floor))
    rows.append((tail_name + ", CUDA graph of " + str(DECODE_TAIL) + " steps, per step", state_bytes,
                 graphed_ms(with_tail, DECODE_TAIL), floor))

    if retention_ok:
        try:
            from retention import power_retention_inference
            from retention._utils import compute_expanded_dim

            rdim = compute_expanded_dim(D_HEAD, 2)
            rs = torch.randn(b, HEADS, rdim, D_HEAD, device="cuda", dtype=torch.bfloat16) * 0.01
            rz = torch.rand(b, HEADS, rdim, device="cuda")
            rbytes = rs.numel() * 2 + rz.numel() * 4

            def step():
                return power_retention_inference(q, k, v, log_g, initial_state=rs, sum_of_keys=rz, deg=2)

            ms = with_budget(retention_budget, bench, step, None, 100)
            if ms is None:
                print(f"retention decode: not run (its autotuning outlasted the {retention_budget:.0f} s budget)",
                      flush=True)
            else:
                rows.append((f"retention power_retention_inference (bf16 state, D={rdim}, read only)", rbytes, ms,
                             rbytes / (copy_tbs * 1e12) * 1e3))
        except Exception as err:  # noqa: BLE001 - report, do not abort the run
            print("retention decode failed:", repr(err)[:300], flush=True)

    for ctx in (4096, 16384, 65536, 131072):
        kc, vc = (torch.randn(b, HEADS, ctx, D_HEAD, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        qq = q.transpose(1, 2)
        ms = bench(lambda: F.scaled_dot_product_attention(qq, kc, vc), rep=100)
        kv_bytes = 2 * kc.numel() * 2
        rows.append((f"SDPA, KV cache {ctx // 1024}k", kv_bytes, ms, kv_bytes / (copy_tbs * 1e12) * 1e3))
        del kc, vc
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="write the markdown tables here")
    parser.add_argument("--retention-budget", type=float, default=150.0,
                        help="seconds for all retention rows (its autotuning alone took 388 s cold at 64k on an "
                             "H100, RESULTS.md run U: give it 420 and fewer --retention-order lengths per call)")
    parser.add_argument("--chunks", default="64,128", help="our chunk sizes to time")
    parser.add_argument("--retention-chunk", type=int, default=1024)
    parser.add_argument("--retention-order", default=None,
                        help="the T to time retention at, in this order, within the budget (default: the table's)")
    parser.add_argument("--retention-decode-budget", type=float, default=60.0, help="seconds; 0 skips the row")
    parser.add_argument("--no-retention", action="store_true", help="skip the retention rows")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode table")
    parser.add_argument("--seqlens", default="1024,4096,16384,65536")
    parser.add_argument("--attention-form-max-t", type=int, default=16384, help="time our attention form up to this T")
    parser.add_argument("--profile", action="store_true", help="also time our kernels one by one at the last T")
    parser.add_argument("--launch", default="default",
                        help="launch options of our chunk kernels, as profile_kernels.py takes them (share=4:3,...)")
    args = parser.parse_args()
    from power_transformers.kernels import triton_chunk

    triton_chunk.LAUNCH.update(triton_chunk.parse_launch(args.launch))
    chunks = [int(c) for c in args.chunks.split(",")]
    seqlens = [int(t) for t in args.seqlens.split(",") if t]  # --seqlens "": the decode table only

    try:
        import retention  # noqa: F401

        retention_ok = not args.no_retention
    except ImportError:
        retention_ok = False
    dev = torch.cuda.get_device_name()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Device: {dev}; torch {torch.__version__}, triton {triton.__version__}; {when}; "
             f"chunk-kernel launch options: {args.launch}", ""]

    matmul, copy_tbs = ceilings()
    lines += [f"Ceilings measured in this run: bf16 matmul {matmul:.0f} TFLOP/s, copy {copy_tbs:.2f} TB/s "
              "(bytes read + written).", ""]
    print("\n".join(lines), flush=True)

    lines += ["Training, 64k tokens per batch, 16 heads, d = 64, p = 2, gating, bf16 (ms, median):", "",
              "| T | batch | SDPA flash fwd | SDPA flash fwd+bwd | SDPA cuDNN fwd | fwd+bwd | SDPA default fwd+bwd "
              "| retention fwd (C=%d) | retention fwd+bwd | "
              % args.retention_chunk + " | ".join(f"ours chunked fwd (C={c}) | fwd+bwd | TFLOP/s fwd / fwd+bwd" for c in chunks)
              + " | ours attention form fwd | fwd+bwd | TFLOP/s fwd / fwd+bwd |",
              "|---" * (12 + 3 * len(chunks)) + "|"]
    # retention first, in the order asked (its autotuning takes minutes per shape; the budget is shared)
    ret_deadline = time.time() + args.retention_budget
    ret = {}
    order = [int(t) for t in args.retention_order.split(",")] if args.retention_order else seqlens
    for t in order if retention_ok else []:
        try:
            start = time.time()
            ret[t] = with_budget(ret_deadline - time.time(), time_retention, t, args.retention_chunk)
            print(f"retention T={t}: {ret[t]} ({time.time() - start:.0f} s with autotuning)", flush=True)
        except Exception as err:  # noqa: BLE001
            ret[t] = f"failed: {type(err).__name__}"  # the table says so, rather than "budget"
            print("retention failed:", repr(err)[:300], flush=True)
        torch.cuda.empty_cache()
    for t in seqlens:
        s_f, s_fb = time_sdpa(t)
        cells = [f"{t // 1024}k", str(TOKENS // t), f"{s_f:.3f}", f"{s_fb:.3f}"]
        for backend, both in (("cudnn", True), ("default", False)):
            try:
                times = time_sdpa(t, backend)
                cells += [f"{x:.3f}" for x in (times if both else times[1:])]
            except Exception as err:  # noqa: BLE001 - a backend this torch or card lacks
                print(f"SDPA {backend} failed:", repr(err)[:300], flush=True)
                cells += ["failed"] * (2 if both else 1)
            torch.cuda.empty_cache()
        r = ret.get(t)
        if isinstance(r, str):
            cells += [r] * 2
        else:
            cells += [f"{r[0]:.3f}", f"{r[1]:.3f}"] if r else ["not run (budget)" if retention_ok else "not installed"] * 2
        for c in chunks:
            try:
                o_f, o_fb = time_ours(t, c)
            except Exception as err:  # noqa: BLE001 - report, keep the other rows
                print(f"ours C={c} failed:", repr(err)[:500], flush=True)
                cells += ["failed"] * 3
                continue
            fl = ours_flops(t, c)
            cells += [f"{o_f:.3f}", f"{o_fb:.3f}", f"{fl / o_f / 1e9:.0f} / {3 * fl / o_fb / 1e9:.0f}"]
        if t <= args.attention_form_max_t:
            a_f, a_fb = time_ours(t, chunks[0], form="attention")
            fl = attention_form_flops(t)
            cells += [f"{a_f:.3f}", f"{a_fb:.3f}", f"{fl / a_f / 1e9:.0f} / {3 * fl / a_fb / 1e9:.0f}"]
        else:
            cells += ["not run"] * 3
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()

    if args.profile:
        for c in chunks:
            for name, ms in profile_parts(seqlens[-1], c).items():
                print(f"profile T={seqlens[-1]} C={c}: {name}: {ms:.3f} ms", flush=True)

    lines += ["", "Decode, batch 8, 16 heads, d = 64, one token (ms, median); floor = bytes / copy bandwidth:", "",
              "| what | bytes (MB) | time (ms) | floor (ms) | time / floor |", "|---|---|---|---|---|"]
    for name, nbytes, ms, floor in ([] if args.no_decode else decode_rows(copy_tbs, retention_ok and args.retention_decode_budget > 0,
                                                                   args.retention_decode_budget)):
        lines.append(f"| {name} | {nbytes / 1e6:.1f} | {ms:.4f} | {floor:.4f} | {ms / floor:.1f} |")
        print(lines[-1], flush=True)

    text = "\n".join(lines)
    print("\n" + text, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
