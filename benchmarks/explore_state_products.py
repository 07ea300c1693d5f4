"""Tuning experiment (GPU): ways to run the two state products of the chunk kernels.

    python benchmarks/explore_state_products.py [T]

The chunked kernels spend most of their time in two products against a symmetric state held
once per pair (i <= j), D = d (d + 1) / 2 rows of d:

  query  out [C, d] = sum_{i<=j} m_ij x_i x_j R[(i, j)]       (m = 2 off the diagonal)
  share  R[(i, j)]  = sum_t w_t x_ti x_tj y_t                   (every chunk's own share)

Variants timed here on the same inputs (16 heads, d = 64, bf16 operands, fp32 accumulation):

  query_scaled   today's: per row-block i the full [d, d] tile R_i, acc += x_i * (x @ R_i)
  query_acc      full tiles, the scale on the operand: acc = dot(x_i * x, R_i, acc)
  query_pairs    row-blocks p and d - p packed into one [d, d] tile (d/2 + 1 products, no
                 masked half): acc = dot(m x_I x_J, R[rows], acc), x_J gathered from memory
  share_masked   today's: per row-block, x^T @ ((w x_i) y), the j < i half masked on store
  share_pairs    row-blocks p and d - p packed: (w x_I x_J)^T @ y, every stored row useful

Each variant is checked against the first of its kind before it is timed.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from power_transformers.kernels.triton_common import full_tile_rows, row_block_rows

H, D_HEAD = 16, 64


@triton.jit
def pair_block(p, offs_d, HEAD_DIM: tl.constexpr):
    """Row-block p (rows (p, j), j >= p) and row-block d - p (rows (d - p, j), j >= d - p) packed
    into d slots r: slot r holds pair (I, J) at stored row `row`; valid is False for the repeats
    at p = d / 2; m is 2 off the diagonal, 1 on it."""
    first = offs_d >= p
    i = tl.where(first, p, HEAD_DIM - p)
    j = tl.where(first, offs_d, offs_d + HEAD_DIM - p)
    valid = first | (p < HEAD_DIM - p)
    row = i * HEAD_DIM - (i * (i - 1)) // 2 + j - i
    m = tl.where(j > i, 2.0, 1.0)
    return i, j, row, valid, m


@triton.jit
def pair_products(x_base, t, p, offs_d, HEAD_DIM: tl.constexpr):
    """[C, d] x_I x_J of pair block p (x_J gathered from memory, x_I one of two columns), with the
    block's stored rows, validity and multiplicity."""
    i, j, row, valid, m = pair_block(p, offs_d, HEAD_DIM)
    xj = tl.load(x_base + t[:, None] * HEAD_DIM + j[None, :]).to(tl.float32)
    xa = tl.load(x_base + t * HEAD_DIM + p).to(tl.float32)
    xb = tl.load(x_base + t * HEAD_DIM + (HEAD_DIM - p) % HEAD_DIM).to(tl.float32)
    xi = tl.where((offs_d >= p)[None, :], xa[:, None], xb[:, None])
    return xj * xi, row, valid, m


@triton.jit
def _query_kernel(X, ST, OUT, T, N, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                  VARIANT: tl.constexpr):
    n = tl.program_id(0)
    bh = tl.program_id(1)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    t = n * CHUNK + offs_c
    x_base = X + bh.to(tl.int64) * T * HEAD_DIM
    st = ST + (bh.to(tl.int64) * N + n) * D * HEAD_DIM
    x = tl.load(x_base + t[:, None] * HEAD_DIM + offs_d[None, :])
    acc = tl.zeros((CHUNK, HEAD_DIM), dtype=tl.float32)
    if VARIANT == 0:
        for i in range(HEAD_DIM):
            r_i = tl.load(st + full_tile_rows(i, offs_d, HEAD_DIM)[:, None] * HEAD_DIM + offs_d[None, :])
            xi = tl.load(x_base + t * HEAD_DIM + i).to(tl.float32)
            acc += xi[:, None] * tl.dot(x, r_i)
    elif VARIANT == 1:
        xf = x.to(tl.float32)
        for i in range(HEAD_DIM):
            r_i = tl.load(st + full_tile_rows(i, offs_d, HEAD_DIM)[:, None] * HEAD_DIM + offs_d[None, :])
            xi = tl.load(x_base + t * HEAD_DIM + i).to(tl.float32)
            acc = tl.dot((xf * xi[:, None]).to(x.dtype), r_i, acc)
    else:
        for p in range(HEAD_DIM // 2 + 1):
            xx, row, valid, m = pair_products(x_base, t, p, offs_d, HEAD_DIM)
            a = (xx * tl.where(valid, m, 0.0)[None, :]).to(x.dtype)
            r = tl.load(st + row[:, None] * HEAD_DIM + offs_d[None, :], mask=valid[:, None], other=0.0)
            acc = tl.dot(a, r, acc)
    tl.store(OUT + (bh.to(tl.int64) * T + t[:, None]) * HEAD_DIM + offs_d[None, :], acc)


@triton.jit
def _share_kernel(X, Y, W, OUT, T, N, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                  VARIANT: tl.constexpr):
    n = tl.program_id(0)
    bh = tl.program_id(1)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, HEAD_DIM)
    t = n * CHUNK + offs_c
    x_base = X + bh.to(tl.int64) * T * HEAD_DIM
    out = OUT + (bh.to(tl.int64) * N + n) * D * HEAD_DIM
    w = tl.load(W + bh.to(tl.int64) * T + t)
    y = tl.load(Y + (bh.to(tl.int64) * T + t[:, None]) * HEAD_DIM + offs_d[None, :]).to(tl.float32)
    if VARIANT == 0:
        xt = tl.trans(tl.load(x_base + t[:, None] * HEAD_DIM + offs_d[None, :]))
        for i in range(HEAD_DIM):
            xi = tl.load(x_base + t * HEAD_DIM + i).to(tl.float32)
            acc = tl.dot(xt, ((w * xi)[:, None] * y).to(xt.dtype))
            rows, row_ok = row_block_rows(i, offs_d, HEAD_DIM)
            tl.store(out + rows[:, None] * HEAD_DIM + offs_d[None, :], acc.to(OUT.dtype.element_ty),
                     mask=row_ok[:, None])
    else:
        yop = y.to(X.dtype.element_ty)
        for p in range(HEAD_DIM // 2 + 1):
            xx, row, valid, m_unused = pair_products(x_base, t, p, offs_d, HEAD_DIM)
            a = (xx * w[:, None]).to(yop.dtype)
            acc = tl.dot(tl.trans(a), yop)
            tl.store(out + row[:, None] * HEAD_DIM + offs_d[None, :], acc.to(OUT.dtype.element_ty),
                     mask=valid[:, None])


def main():
    t_len = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    d = D_HEAD
    dim = d * (d + 1) // 2
    dev = "cuda"
    print(torch.cuda.get_device_name(), f"T={t_len} H={H} d={d}; ms per pass (median of triton do_bench)", flush=True)
    print("| kernel | C | warps | stages | ms | rel. err vs first |")
    print("|---|---|---|---|---|---|")
    for chunk in (128, 256):
        n = t_len // chunk
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(H, t_len, d, device=dev, generator=g).bfloat16() * 0.3
        y = torch.randn(H, t_len, d, device=dev, generator=g).bfloat16()
        w = torch.rand(H, t_len, device=dev, generator=g)
        st = torch.randn(H, n, dim, d, device=dev, generator=g).bfloat16()
        ref = None
        for variant, name in ((0, "query_scaled"), (1, "query_acc"), (2, "query_pairs")):
            for warps, stages in ((8, 2), (8, 3), (4, 2)):
                out = torch.zeros(H, t_len, d, device=dev)

                def fn():
                    _query_kernel[(n, H)](x, st, out, t_len, n, CHUNK=chunk, HEAD_DIM=d, D=dim, VARIANT=variant,
                                          num_warps=warps, num_stages=stages)
                try:
                    fn()
                    torch.cuda.synchronize()
                    err = 0.0 if ref is None else ((out - ref).norm() / ref.norm()).item()
                    if ref is None:
                        ref = out.clone()
                    ms = triton.testing.do_bench(fn, warmup=5, rep=50)
                    print(f"| {name} | {chunk} | {warps} | {stages} | {ms:.3f} | {err:.1e} |", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"| {name} | {chunk} | {warps} | {stages} | failed: {repr(e)[:200]} | |", flush=True)
        ref = None
        for variant, name in ((0, "share_masked"), (1, "share_pairs")):
            for warps, stages in ((8, 2), (4, 2), (8, 1)):
                out = torch.zeros(H, n, dim, d, device=dev, dtype=torch.bfloat16)

                def fn():
                    _share_kernel[(n, H)](x, y, w, out, t_len, n, CHUNK=chunk, HEAD_DIM=d, D=dim, VARIANT=variant,
                                          num_warps=warps, num_stages=stages)
                try:
                    fn()
                    torch.cuda.synchronize()
                    err = 0.0 if ref is None else ((out.float() - ref).norm() / ref.norm()).item()
                    if ref is None:
                        ref = out.float().clone()
                    ms = triton.testing.do_bench(fn, warmup=5, rep=50)
                    print(f"| {name} | {chunk} | {warps} | {stages} | {ms:.3f} | {err:.1e} |", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"| {name} | {chunk} | {warps} | {stages} | failed: {repr(e)[:200]} | |", flush=True)
        del x, y, w, st
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
