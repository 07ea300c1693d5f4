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
from power_transformers.kernels import triton_decode  # noqa: E402
from power_transformers.kernels import triton_power as tp  # noqa: E402
from power_transformers.kernels.reference import expanded_dim  # noqa: E402
from power_transformers.kernels.triton_common import interpreting, pair_weights  # noqa: E402
from power_transformers.kernels.triton_decode import (  # noqa: E402
    _split, add_up_shares, leave_share, load_row_block, query_phi_rows, row_block_query, row_block_terms,
    sum_terms)


@triton.jit
def _fold_row_block(s_i, z_i, i, TK, TV, TG, tail, g_last, offs_d, HEAD_DIM: tl.constexpr, CT: tl.constexpr):
    """Row-block i of S and z (s_i [d, d], z_i [d] fp32) with a full tail folded in:
    e^{g_last} s_i + sum_j e^{g_last - G_j} phi_i(k_j) v_j^T over its CT tokens j (running
    log-gates G_j), one outer product per token in fp32 registers. (As one tl.dot of
    [d, CT] x [CT, d] it ran slower on the H100: 6.7 ms in exact fp32, 0.32 ms in tf32x3, against
    0.30 ms this way, for a 69 MB state.)"""
    w = pair_weights(i, offs_d)
    s_i *= tl.exp(g_last)
    z_i *= tl.exp(g_last)
    for j in range(CT):
        row = (tail + j) * HEAD_DIM
        phik = tl.load(TK + row + offs_d) * (tl.load(TK + row + i) * tl.exp(g_last - tl.load(TG + tail + j))) * w
        s_i += phik[:, None] * tl.load(TV + row + offs_d)[None, :]
        z_i += phik
    return s_i, z_i


@triton.jit
def _fold_kernel(S, Z, TK, TV, TG, TLEN, HEAD_DIM: tl.constexpr, D: tl.constexpr, CT: tl.constexpr,
                 FOLD_SPLIT: tl.constexpr):
    """Before a step: a full tail (CT tokens) into the state
    (_fold_row_block). Any other tail length: nothing (the program reads one number and ends).
    Grid (B Hk, FOLD_SPLIT), the row-blocks interleaved over the programs. TLEN stays CT: the
    step that follows reads it as an empty tail and sets it to 1."""
    bh = tl.program_id(0)
    if tl.load(TLEN + bh) == CT:
        offs_d = tl.arange(0, HEAD_DIM)
        tail = bh.to(tl.int64) * CT
        g_last = tl.load(TG + tail + CT - 1)
        s_base = S + bh.to(tl.int64) * D * HEAD_DIM
        z_base = Z + bh.to(tl.int64) * D
        for mm in range(HEAD_DIM // FOLD_SPLIT):
            i = tl.program_id(1) + mm * FOLD_SPLIT
            s_ptr, z_ptr, row_ok, s_i, z_i = load_row_block(s_base, z_base, i, offs_d, HEAD_DIM)
            s_i, z_i = _fold_row_block(s_i, z_i, i, TK, TV, TG, tail, g_last, offs_d, HEAD_DIM, CT)
            tl.store(s_ptr, s_i, mask=row_ok[:, None])
            tl.store(z_ptr, z_i, mask=row_ok)


@triton.jit
def _tail_step_kernel(
    Q, K, V, LG, S, Z, TK, TV, TG, TLEN, PART_NUM, PART_DEN, COUNT, Y,
    HQ, HK, scale, eps,
    HEAD_DIM: tl.constexpr, D: tl.constexpr, G: tl.constexpr, ROWS: tl.constexpr, SPLIT: tl.constexpr,
    CT: tl.constexpr, HAS_GATE: tl.constexpr, DEFER: tl.constexpr,
):
    """One token per (batch row, kv head) against its state and its tail. Grid (B Hk, SPLIT + 1):
    programs 0..SPLIT-1 read the state's row-blocks (not written), program SPLIT attends over the
    tail and the new token and appends the token to the tail; the last to arrive adds up the
    shares, writes y and advances the tail length. _fold_kernel runs before it. (Folding inside
    this kernel, each state program its own row-blocks at the step that fills the tail, made
    every step slower: 0.073 against 0.060 ms amortised.) DEFER (one query row): sum the
    row-blocks' products over their rows once, after the loop, instead of once per row-block.
    q [B, Hq, d], k/v [B, Hk, d], log_g [B, Hk]; tail buffers TK/TV [B Hk, CT, d] fp32,
    TG [B Hk, CT] (running log-gate since the last fold), TLEN [B Hk] int32 (CT: full and just
    folded by _fold_kernel, so empty); COUNT [B Hk] int32 is zero between calls."""
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

    # The tail holds m tokens since the last fold; the new token is position m.
    m = tl.load(TLEN + bh)
    m = tl.where(m == CT, 0, m)
    tail = bh.to(tl.int64) * CT
    g_m = tl.load(TG + tail + tl.maximum(m - 1, 0), mask=m > 0, other=0.0)
    if HAS_GATE:
        g_m += tl.load(LG + bh).to(tl.float32)
    kv = bh.to(tl.int64) * HEAD_DIM
    k_new = tl.load(K + kv + offs_d).to(tl.float32)
    v_new = tl.load(V + kv + offs_d).to(tl.float32)
    num = tl.zeros((ROWS, HEAD_DIM), dtype=tl.float32)
    den = tl.zeros((ROWS,), dtype=tl.float32)
    if sp < SPLIT:  # the state's part: this program's row-blocks, decayed since the last fold
        s_base = S + bh.to(tl.int64) * D * HEAD_DIM
        z_base = Z + bh.to(tl.int64) * D
        if DEFER:
            acc_s = tl.zeros((HEAD_DIM, HEAD_DIM), dtype=tl.float32)
            acc_z = tl.zeros((HEAD_DIM,), dtype=tl.float32)
            for mm in range(HEAD_DIM // SPLIT):
                i = sp + mm * SPLIT
                _s, _z, _ok, s_i, z_i = load_row_block(s_base, z_base, i, offs_d, HEAD_DIM)
                acc_s, acc_z = row_block_terms(query_phi_rows(q, q_rows, i, r_ok, scale, offs_d), s_i, z_i,
                                               acc_s, acc_z)
            num, den = sum_terms(acc_s, acc_z)
        else:
            for mm in range(HEAD_DIM // SPLIT):
                i = sp + mm * SPLIT
                _s, _z, _ok, s_i, z_i = load_row_block(s_base, z_base, i, offs_d, HEAD_DIM)
                num_i, den_i = row_block_query(query_phi_rows(q, q_rows, i, r_ok, scale, offs_d), s_i, z_i)
                num += num_i
                den += den_i
        carry = tl.exp(g_m)
        num *= carry
        den *= carry
    else:  # the tail's tokens and the new one: (s q.k_j)^2 e^{G_m - G_j} v_j
        ok = offs_t < m
        rows = (tail + offs_t)[:, None] * HEAD_DIM + offs_d[None, :]
        tk = tl.load(TK + rows, mask=ok[:, None], other=0.0)
        tv = tl.load(TV + rows, mask=ok[:, None], other=0.0)
        decay = tl.where(ok, tl.exp(g_m - tl.load(TG + tail + offs_t, mask=ok, other=0.0)), 0.0)
        sc = tl.sum(q[:, None, :] * tk[None, :, :], axis=2)  # [ROWS, CT]
        a = sc * sc * decay[None, :]
        sc_new = tl.sum(q * k_new[None, :], axis=1)  # [ROWS]
        a_new = sc_new * sc_new
        num = tl.sum(a[:, :, None] * tv[None, :, :], axis=1) + a_new[:, None] * v_new[None, :]
        den = tl.sum(a, axis=1) + a_new
        tl.store(TK + (tail + m) * HEAD_DIM + offs_d, k_new)
        tl.store(TV + (tail + m) * HEAD_DIM + offs_d, v_new)
        tl.store(TG + tail + m, g_m)

    if leave_share(PART_NUM, PART_DEN, COUNT, num, den, offs_r, offs_d, ROWS, SPLIT + 1, HEAD_DIM):
        num, den = add_up_shares(PART_NUM, PART_DEN, offs_r, offs_d, ROWS, SPLIT + 1, HEAD_DIM)
        tl.store(Y + row_off[:, None] + offs_d[None, :], num / (den + eps)[:, None], mask=r_ok[:, None])
        tl.store(TLEN + bh, m + 1)
        tl.store(COUNT + bh, 0)


class TailDecoder:
    """The buffers of one layer's tail decoding: S [B, Hk, D, d], z [B, Hk, D] fp32 (updated in
    place at folds), the tail of up to `tail` tokens, its length and the arrival counters.
    `split` programs per (batch row, kv head) share a step's state reads (default: today's
    decode kernel's choice), `fold_split` share a fold's row-blocks."""

    def __init__(self, s, z, tail: int, hq: int, split: int | None = None, fold_split: int = 8,
                 defer: bool = True, warps: int = 4):
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
        self.split = split or _split(bsz * hk, d)
        self.fold_split = min(fold_split, d)
        self.defer, self.warps = defer and self.rows == 1, warps
        self.part_num = torch.empty(bsz * hk * (self.split + 1) * self.rows, d, device=dev)
        self.part_den = torch.empty(bsz * hk * (self.split + 1) * self.rows, device=dev)

    def fold(self):
        """A full tail into the state (nothing for any other tail length)."""
        bsz, hk, dim, d = self.s.shape
        _fold_kernel[(bsz * hk, self.fold_split)](
            self.s, self.z, self.tk, self.tv, self.tg, self.tlen, HEAD_DIM=d, D=dim, CT=self.tail,
            FOLD_SPLIT=self.fold_split, **({} if interpreting() else {"num_warps": 4}))

    def step(self, q, k, v, log_g, scale, eps=1e-6):
        """q [B, 1, Hq, d], k/v [B, 1, Hk, d], log_g [B, 1, Hk] or None -> y [B, 1, Hq, d]."""
        bsz, _, hk, d = k.shape
        self.fold()
        y = torch.empty_like(q, dtype=v.dtype)
        _tail_step_kernel[(bsz * hk, self.split + 1)](
            q, k, v, log_g if log_g is not None else k, self.s, self.z, self.tk, self.tv, self.tg, self.tlen,
            self.part_num, self.part_den, self.count, y, self.hq, hk, scale, eps,
            HEAD_DIM=d, D=expanded_dim(d, 2), G=self.hq // hk, ROWS=self.rows, SPLIT=self.split, CT=self.tail,
            HAS_GATE=log_g is not None, DEFER=self.defer, **({} if interpreting() else {"num_warps": self.warps}))
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


def check(bsz, hq, hk, d, tail, steps, device, dtype=torch.float32, **design):
    """Tail decoding (TailDecoder(**design)) against today's decode kernel (every token folded)
    over `steps` tokens: (largest relative error of y over the steps, relative error of S right
    after the last fold)."""
    q, k, v, log_g, s, z = inputs(bsz, steps, hq, hk, d, device)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = d**-0.5
    s_ref, z_ref = s.clone(), z.clone()
    dec = TailDecoder(s.clone(), z.clone(), tail, hq, **design)
    worst, s_err, s_folded = 0.0, None, None
    # step i > 0 with i % tail == 0 folds tokens 0..i-1 into the state before its own
    for i in range(steps):
        sl = slice(i, i + 1)
        y_ref = tp.power_attention_decode_(q[:, sl], k[:, sl], v[:, sl], log_g[:, sl], (s_ref, z_ref))
        y = dec.step(q[:, sl].contiguous(), k[:, sl].contiguous(), v[:, sl].contiguous(), log_g[:, sl].contiguous(),
                     scale)
        worst = max(worst, ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item())
        if s_folded is not None and i % tail == 0:
            s_err = ((dec.s - s_folded).norm() / s_folded.norm()).item()
        if (i + 1) % tail == 0:
            s_folded = s_ref.clone()
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

    s2, z2 = s.clone(), z.clone()
    triton_decode.DEFER_SUMS = False
    before_ms = graphed(lambda: tp.power_attention_decode_(q, k, v, log_g, (s2, z2)), tail)
    triton_decode.DEFER_SUMS = True
    today_ms = graphed(lambda: tp.power_attention_decode_(q, k, v, log_g, (s2, z2)), tail)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; state {state_bytes / 1e6:.1f} MB; floor {floor:.4f} ms")
    print("| decode step, graphed, per token | programs per head | ms | / floor |")
    print("|---|---|---|---|")
    print(f"| today's kernel (state read and written every token), a sum per row-block | {_split(bsz * heads, d)} "
          f"| {before_ms:.4f} | {before_ms / floor:.2f} |")
    print(f"| today's kernel, one sum after the loop (DEFER_SUMS) | {_split(bsz * heads, d)} | {today_ms:.4f} "
          f"| {today_ms / floor:.2f} |", flush=True)
    for split, defer in ((8, False), (8, True), (4, True), (16, True)):
        dec = TailDecoder(s.clone(), z.clone(), tail, heads, split=split, defer=defer)
        ms = graphed(lambda: dec.step(q, k, v, log_g, scale), tail)
        print(f"| tail of {tail}: fold kernel + step, {'one sum after the loop' if defer else 'a sum per row-block'}"
              f" (amortised over {tail} steps) | {split} + 1 | {ms:.4f} | {ms / floor:.2f} |", flush=True)
    dec = TailDecoder(s.clone(), z.clone(), tail, heads)
    idle = graphed(dec.fold, tail)
    dec.tlen.fill_(tail)  # full: every launch folds (it leaves the length as it is)
    busy = graphed(dec.fold, tail)
    print(f"| the fold kernel alone (split {dec.fold_split}): nothing to fold / a full tail | | {idle:.4f} / {busy:.4f} "
          f"| {idle / floor:.2f} / {busy / floor:.2f} |", flush=True)

if __name__ == "__main__":
    main()
