"""Design experiment (GPU): a decode step that reads the state without writing it every token.

    python benchmarks/explore_tail_decode.py [--tail 64] [--batch 8]

Today's decode kernel folds every token into the state: it reads and writes S once per token,
which is 2x issue 3's floor (one read of S) at the full copy rate. DESIGN.md's cache keeps "any
not yet folded tail of the current chunk" instead. This script tries that on the kernel side,
before any cache change:

  one step    y = [e^{G_m} phi(q)^T S + sum_{j<=m} (s q.k_j)^2 e^{G_m - G_j} v_j] / (same for z, 1)
              over the tail of m + 1 tokens since the last fold (G: running log-gate since then);
              S is read, not written; the new token's k, v, G go into the tail buffer.
  fold        when the tail is full (m + 1 = CT): S = e^{G_m} S + sum_j e^{G_m - G_j} phi(k_j) v_j^T
              (z likewise), in the same kernel, and the tail empties.

The tail length is kept per (batch row, kv head) on the device, so that CT steps can be one CUDA
graph: the fold is a branch inside the kernel, not in Python. It reports the amortised time per
token over CT graphed steps against the floor, and today's kernel beside it, after checking both
against each other over 2 CT + 5 steps.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from power_transformers.kernels import reference  # noqa: E402
from power_transformers.kernels import triton_power as tp  # noqa: E402
from power_transformers.kernels.reference import expanded_dim  # noqa: E402
from power_transformers.kernels.triton_common import interpreting, phi_rows  # noqa: E402
from power_transformers.kernels.triton_decode import (  # noqa: E402
    _split, add_up_shares, leave_share, load_row_block, query_phi_rows, row_block_query)


@triton.jit
def _load_tail(K, V, TK, TV, TG, kv, tail, m, g_m, offs_t, offs_d, HEAD_DIM: tl.constexpr):
    """The tail's keys and values [CT, d] fp32 (positions < m from the buffer, the new token at m,
    zero past it) and the decays e^{G_m - G_j} [CT] (0 past the new token)."""
    old = offs_t < m
    is_new = offs_t == m
    rows = (tail + offs_t)[:, None] * HEAD_DIM + offs_d[None, :]
    tk = tl.where(is_new[:, None], tl.load(K + kv + offs_d).to(tl.float32)[None, :],
                  tl.load(TK + rows, mask=old[:, None], other=0.0))
    tv = tl.where(is_new[:, None], tl.load(V + kv + offs_d).to(tl.float32)[None, :],
                  tl.load(TV + rows, mask=old[:, None], other=0.0))
    tg = tl.where(is_new, g_m, tl.load(TG + tail + offs_t, mask=old, other=0.0))
    return tk, tv, tl.where(offs_t <= m, tl.exp(g_m - tg), 0.0)


@triton.jit
def _tail_step_kernel(
    Q, K, V, LG, S, Z, TK, TV, TG, TLEN, PART_NUM, PART_DEN, COUNT, Y,
    HQ, HK, scale, eps,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
    CT: tl.constexpr, HAS_GATE: tl.constexpr,
):
    """One token per (batch row, kv head) against its state and tail; SPLIT programs share the
    state's row-blocks and the last to arrive adds up the shares, writes y and advances the tail.
    q [B, Hq, d], k/v [B, Hk, d], log_g [B, Hk]; tail buffers TK/TV [B Hk, CT, d], TG [B Hk, CT]
    (running log-gate since the last fold), TLEN [B Hk] int32; COUNT [B Hk] int32 is zero
    between calls (the last program resets it)."""
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, ROWS)
    offs_t = tl.arange(0, CT)
    r_ok = offs_r < G
    row_off = (b * HQ + h * G + offs_r).to(tl.int64) * HEAD_DIM  # [ROWS], the same in q and y
    q_rows = Q + row_off
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=r_ok[:, None], other=0.0).to(tl.float32) * scale

    # The tail: m tokens since the last fold in the buffer; the new token is position m.
    m = tl.load(TLEN + bh)
    kv = bh.to(tl.int64) * HEAD_DIM
    g_new = 0.0
    if HAS_GATE:
        g_new = tl.load(LG + bh).to(tl.float32)
    tail = bh.to(tl.int64) * CT
    g_m = tl.load(TG + tail + tl.maximum(m - 1, 0), mask=m > 0, other=0.0) + g_new
    fold = m == CT - 1
    carry = tl.exp(g_m)  # the state's decay since the last fold

    # The state's part: this program's row-blocks, read once, not written.
    s_base = S + bh.to(tl.int64) * D * HEAD_DIM
    z_base = Z + bh.to(tl.int64) * D
    num = tl.zeros((ROWS, HEAD_DIM), dtype=tl.float32)
    den = tl.zeros((ROWS,), dtype=tl.float32)
    for mm in range(HEAD_DIM // SPLIT):
        i = sp + mm * SPLIT
        s_ptr_unused, z_ptr_unused, row_ok_unused, s_i, z_i = load_row_block(s_base, z_base, i, offs_d, HEAD_DIM)
        num_i, den_i = row_block_query(query_phi_rows(q, q_rows, i, r_ok, scale, offs_d), s_i, z_i)
        num += carry * num_i
        den += carry * den_i

    if fold:  # once every CT tokens: the tail into this program's row-blocks (they are read again)
        tk, tv, decay = _load_tail(K, V, TK, TV, TG, kv, tail, m, g_m, offs_t, offs_d, HEAD_DIM)
        for mm in range(HEAD_DIM // SPLIT):
            i = sp + mm * SPLIT
            s_ptr, z_ptr, row_ok, s_i, z_i = load_row_block(s_base, z_base, i, offs_d, HEAD_DIM)
            ki = tl.sum(tl.where((offs_d == i)[None, :], tk, 0.0), axis=1)  # column i of the tail's keys
            phik = phi_rows(tk, ki * decay, i, offs_d)  # [CT, d]
            tl.store(s_ptr, carry * s_i + tl.dot(tl.trans(phik), tv, input_precision="ieee"), mask=row_ok[:, None])
            tl.store(z_ptr, carry * z_i + tl.sum(phik, axis=0), mask=row_ok)

    if sp == 0:  # the tail's attention, and the new token into the buffer
        tk, tv, decay = _load_tail(K, V, TK, TV, TG, kv, tail, m, g_m, offs_t, offs_d, HEAD_DIM)
        sc = tl.sum(q[:, None, :] * tk[None, :, :], axis=2)  # [ROWS, CT]
        a = sc * sc * decay[None, :]
        num += tl.sum(a[:, :, None] * tv[None, :, :], axis=1)
        den += tl.sum(a, axis=1)
        tl.store(TK + (tail + m) * HEAD_DIM + offs_d, tl.load(K + kv + offs_d).to(tl.float32))
        tl.store(TV + (tail + m) * HEAD_DIM + offs_d, tl.load(V + kv + offs_d).to(tl.float32))
        tl.store(TG + tail + m, g_m)

    if leave_share(PART_NUM, PART_DEN, COUNT, num, den, offs_r, offs_d, ROWS, SPLIT, HEAD_DIM):
        num, den = add_up_shares(PART_NUM, PART_DEN, offs_r, offs_d, ROWS, SPLIT, HEAD_DIM)
        tl.store(Y + row_off[:, None] + offs_d[None, :], num / (den + eps)[:, None], mask=r_ok[:, None])
        tl.store(TLEN + bh, tl.where(fold, 0, m + 1))
        tl.store(COUNT + bh, 0)


class TailDecoder:
    """The buffers of one layer's tail decoding: S [B, Hk, D, d], z [B, Hk, D] fp32 (updated in
    place at folds), the tail of up to `tail` tokens, its length and the arrival counters."""

    def __init__(self, s, z, tail: int, hq: int):
        bsz, hk, dim, d = s.shape
        self.s, self.z, self.tail, self.hq = s, z, tail, hq
        dev = s.device
        self.tk = torch.zeros(bsz * hk, tail, d, device=dev)
        self.tv = torch.zeros(bsz * hk, tail, d, device=dev)
        self.tg = torch.zeros(bsz * hk, tail, device=dev)
        self.tlen = torch.zeros(bsz * hk, dtype=torch.int32, device=dev)
        self.count = torch.zeros(bsz * hk, dtype=torch.int32, device=dev)
        group = hq // hk
        self.rows = triton.next_power_of_2(group)
        self.split = _split(bsz * hk, d)  # programs per (row, head), as today's kernel uses
        self.part_num = torch.empty(bsz * hk * self.split * self.rows, d, device=dev)
        self.part_den = torch.empty(bsz * hk * self.split * self.rows, device=dev)

    def step(self, q, k, v, log_g, scale, eps=1e-6):
        """q [B, 1, Hq, d], k/v [B, 1, Hk, d], log_g [B, 1, Hk] or None -> y [B, 1, Hq, d]."""
        bsz, _, hk, d = k.shape
        y = torch.empty_like(q, dtype=v.dtype)
        _tail_step_kernel[(bsz * hk, self.split)](
            q, k, v, log_g if log_g is not None else k, self.s, self.z, self.tk, self.tv, self.tg, self.tlen,
            self.part_num, self.part_den, self.count, y, self.hq, hk, scale, eps,
            HEAD_DIM=d, D=expanded_dim(d, 2), G=self.hq // hk, ROWS=self.rows, SPLIT=self.split, CT=self.tail,
            HAS_GATE=log_g is not None, **({} if interpreting() else {"num_warps": 4}))
        return y


def inputs(bsz, steps, hq, hk, d, device, seed=0, context=64):
    """Random q, k, v, log-gates for `steps` tokens, and the state (S, z) of a random `context`
    before them (from the reference, so that the denominators are what a model sees)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(bsz, context + steps, h, d, generator=g) for h in (hq, hk, hk))
    log_g = F.logsigmoid(torch.randn(bsz, context + steps, hk, generator=g) + 3.0)
    _, (s, z) = reference.power_attention_chunked(q[:, :context], k[:, :context], v[:, :context],
                                                  log_g[:, :context], chunk_size=32, output_final_state=True)
    return [x[:, context:].contiguous().to(device) for x in (q, k, v, log_g)] + [s.to(device), z.to(device)]


def check(bsz, hq, hk, d, tail, steps, device, dtype=torch.float32):
    """Tail decoding against today's decode kernel (every token folded) over `steps` tokens:
    (largest relative error of y over the steps, relative error of S after the last fold)."""
    q, k, v, log_g, s, z = inputs(bsz, steps, hq, hk, d, device)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = d**-0.5
    s_ref, z_ref = s.clone(), z.clone()
    dec = TailDecoder(s.clone(), z.clone(), tail, hq)
    worst, s_err = 0.0, None
    for i in range(steps):
        sl = slice(i, i + 1)
        y_ref = tp.power_attention_decode_(q[:, sl], k[:, sl], v[:, sl], log_g[:, sl], (s_ref, z_ref))
        y = dec.step(q[:, sl].contiguous(), k[:, sl].contiguous(), v[:, sl].contiguous(), log_g[:, sl].contiguous(),
                     scale)
        worst = max(worst, ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item())
        if (i + 1) % tail == 0:
            s_err = ((dec.s - s_ref).norm() / s_ref.norm()).item()
    return worst, s_err


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    x = torch.empty(1 << 28, device="cuda")
    ms = triton.testing.do_bench(lambda: x.clone(), rep=100)
    return 2 * x.numel() * 4 / (ms * 1e-3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tail", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    bsz, heads, d, tail = args.batch, 16, 64, args.tail
    print(torch.cuda.get_device_name(), f"batch {bsz}, {heads} heads, d = {d}, tail {tail}", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        y_err, s_err = check(bsz, heads, heads, d, tail, 2 * tail + 5, "cuda", dtype)
        print(f"check {dtype}: y against today's kernel over {2 * tail + 5} steps, worst {y_err:.2e}; "
              f"S after the fold {s_err:.2e}", flush=True)

    q, k, v, log_g, s, z = inputs(bsz, 1, heads, heads, d, "cuda")
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    scale = d**-0.5
    bandwidth = copy_bandwidth()
    state_bytes = s.numel() * 4 + z.numel() * 4
    floor = state_bytes / bandwidth * 1e3

    def graphed(fn, n):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(n):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
        return triton.testing.do_bench(graph.replay, rep=200) / n

    dec = TailDecoder(s.clone(), z.clone(), tail, heads)
    tail_ms = graphed(lambda: dec.step(q, k, v, log_g, scale), tail)
    s2, z2 = s.clone(), z.clone()
    today_ms = graphed(lambda: tp.power_attention_decode_(q, k, v, log_g, (s2, z2)), tail)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; state {state_bytes / 1e6:.1f} MB; floor {floor:.4f} ms")
    print("| decode step, graphed, per token | ms | / floor |")
    print("|---|---|---|")
    print(f"| today's kernel (state read and written every token) | {today_ms:.4f} | {today_ms / floor:.2f} |")
    print(f"| tail of {tail} (state read every token, written at each fold) | {tail_ms:.4f} | {tail_ms / floor:.2f} |")


if __name__ == "__main__":
    main()
