"""Tuning experiment (GPU): ways to run the two state products of the chunk kernels.

    python benchmarks/explore_state_products.py [T] [--passes query,dq,share] [--chunks 128,256]

The chunked kernels spend most of their time in two products against a symmetric state held
once per pair (i <= j), D = d (d + 1) / 2 rows of d:

  query  out [C, d] = sum_{i<=j} m_ij x_i x_j R[(i, j)]       (m = 2 off the diagonal)
  share  R[(i, j)]  = sum_t w_t x_ti x_tj y_t                   (every chunk's own share)

Variants timed here on the same inputs (16 heads, d = 64, bf16 operands, fp32 accumulation):

  query_scaled   today's: per row-block i the full [d, d] tile R_i, acc += x_i * (x @ R_i)
  query_acc      full tiles, the scale on the operand: acc = dot(x_i * x, R_i, acc)
  query_pairs    row-blocks p and d - p packed into one [d, d] tile (d/2 + 1 products, no
                 masked half): acc = dot(m x_I x_J, R[rows], acc), x_J gathered from memory
  query_blocks   the state in blocks of 16 x 16 pairs (I <= J, retention's layout: D' = 2560
                 rows at d = 64, 62.5% of the full tiles' products): the operand x_I (x) x_J
                 [C, 256] built in registers by a reshape, no gathers
  share_masked   today's: per row-block, x^T @ ((w x_i) y), the j < i half masked on store
  share_pairs    row-blocks p and d - p packed: (w x_I x_J)^T @ y, every stored row useful
  share_blocks   the block layout: (w x_I (x) x_J)^T @ y per block pair
  dq_full        the query's gradient through the state, today's: sum_i x_i (dO @ R_i^T)
  dq_blocks      the same in the block layout: P = dO @ S_IJ^T [C, 256], reduced against x_J
                 and x_I into the columns of blocks I and J

Each variant is checked against the first of its kind before it is timed (block-layout states
and shares are converted to and from the pair layout for that). query_blocks, share_blocks and
the dq variants were added after the first GPU run of this script and checked only under the
interpreter so far.
"""

from __future__ import annotations

import argparse


import torch
import triton
import triton.language as tl

from power_transformers.kernels.triton_common import full_tile_rows, row_block_rows

H, D_HEAD = 16, 64
BLOCK = 16  # the block layout's block of the head dimension


def block_layout_index(d: int, bb: int = BLOCK) -> torch.Tensor:
    """[D'] long: for each row of the block layout (block pairs I <= J in order, then u, v within
    the block), the row of the pair layout holding the same entry R[(min(a, b), max(a, b))]."""
    nb = d // bb
    pair_row = lambda a, b: a * d - a * (a - 1) // 2 + b - a  # noqa: E731
    rows = []
    for i in range(nb):
        for j in range(i, nb):
            for u in range(bb):
                for v in range(bb):
                    a, b = i * bb + u, j * bb + v
                    rows.append(pair_row(min(a, b), max(a, b)))
    return torch.tensor(rows)


def pair_layout_index(d: int, bb: int = BLOCK) -> torch.Tensor:
    """[D] long: for each pair (a <= b) of the pair layout, the row of the block layout holding it."""
    nb = d // bb
    block_row = {}
    r = 0
    for i in range(nb):
        for j in range(i, nb):
            for u in range(bb):
                for v in range(bb):
                    block_row.setdefault((i * bb + u, j * bb + v), r)
                    r += 1
    return torch.tensor([block_row[(a, b)] for a in range(d) for b in range(a, d)])


@triton.jit
def block_features(x_base, t, I: tl.constexpr, J: tl.constexpr, HEAD_DIM: tl.constexpr, BB: tl.constexpr):
    """x_I [C, BB], x_J [C, BB] (fp32, loaded) and their outer products [C, BB * BB] (u major)."""
    offs_b = tl.arange(0, BB)
    xi = tl.load(x_base + t[:, None] * HEAD_DIM + I * BB + offs_b[None, :]).to(tl.float32)
    xj = tl.load(x_base + t[:, None] * HEAD_DIM + J * BB + offs_b[None, :]).to(tl.float32)
    return xi, xj, tl.reshape(xi[:, :, None] * xj[:, None, :], (xi.shape[0], BB * BB))


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
def _chunk_program(X, ST, T, N, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr):
    """A program over chunk n of head bh (grid (N, H)): n, bh, offs_d, the chunk's tokens t [C],
    the head's base pointer in X [H, T, d] and its chunk's base in ST [H, N, D, d]."""
    n = tl.program_id(0)
    bh = tl.program_id(1)
    t = n * CHUNK + tl.arange(0, CHUNK)
    return (n, bh, tl.arange(0, HEAD_DIM), t, X + bh.to(tl.int64) * T * HEAD_DIM,
            ST + (bh.to(tl.int64) * N + n) * D * HEAD_DIM)


@triton.jit
def _query_kernel(X, ST, OUT, T, N, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                  VARIANT: tl.constexpr, BB: tl.constexpr = BLOCK, NB: tl.constexpr = D_HEAD // BLOCK):
    n, bh, offs_d, t, x_base, st = _chunk_program(X, ST, T, N, CHUNK, HEAD_DIM, D)
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
    elif VARIANT == 2:
        for p in range(HEAD_DIM // 2 + 1):
            xx, row, valid, m = pair_products(x_base, t, p, offs_d, HEAD_DIM)
            a = (xx * tl.where(valid, m, 0.0)[None, :]).to(x.dtype)
            r = tl.load(st + row[:, None] * HEAD_DIM + offs_d[None, :], mask=valid[:, None], other=0.0)
            acc = tl.dot(a, r, acc)
    elif VARIANT == 3:
        offs_f = tl.arange(0, BB * BB)
        for I in tl.static_range(NB):
            for J in tl.static_range(I, NB):
                p = I * NB - I * (I - 1) // 2 + (J - I)
                xi_unused, xj_unused, f = block_features(x_base, t, I, J, HEAD_DIM, BB)
                r = tl.load(st + (p * BB * BB + offs_f)[:, None] * HEAD_DIM + offs_d[None, :])
                acc = tl.dot((f * (1.0 if I == J else 2.0)).to(x.dtype), r, acc)
    tl.store(OUT + (bh.to(tl.int64) * T + t[:, None]) * HEAD_DIM + offs_d[None, :], acc)


@triton.jit
def _share_kernel(X, Y, W, OUT, T, N, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
                  VARIANT: tl.constexpr, BB: tl.constexpr = BLOCK, NB: tl.constexpr = D_HEAD // BLOCK):
    n, bh, offs_d, t, x_base, out = _chunk_program(X, OUT, T, N, CHUNK, HEAD_DIM, D)
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
    elif VARIANT == 2:
        wy = (w[:, None] * y).to(X.dtype.element_ty)
        offs_f = tl.arange(0, BB * BB)
        for I in tl.static_range(NB):
            for J in tl.static_range(I, NB):
                p = I * NB - I * (I - 1) // 2 + (J - I)
                xi_unused, xj_unused, f = block_features(x_base, t, I, J, HEAD_DIM, BB)
                acc = tl.dot(tl.trans(f.to(wy.dtype)), wy)
                tl.store(out + (p * BB * BB + offs_f)[:, None] * HEAD_DIM + offs_d[None, :],
                         acc.to(OUT.dtype.element_ty))
    else:
        yop = y.to(X.dtype.element_ty)
        for p in range(HEAD_DIM // 2 + 1):
            xx, row, valid, m_unused = pair_products(x_base, t, p, offs_d, HEAD_DIM)
            a = (xx * w[:, None]).to(yop.dtype)
            acc = tl.dot(tl.trans(a), yop)
            tl.store(out + row[:, None] * HEAD_DIM + offs_d[None, :], acc.to(OUT.dtype.element_ty),
                     mask=valid[:, None])


@triton.jit
def _dq_kernel(X, DO, ST, OUT, T, N, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D: tl.constexpr,
               VARIANT: tl.constexpr, BB: tl.constexpr = BLOCK, NB: tl.constexpr = D_HEAD // BLOCK):
    """d/dx of sum_t dO_t . (phi(x_t)^T S) for the chunk's rows: 2 sum_i x_i (dO @ R_i^T) over full
    tiles (VARIANT 0), or through the block layout (VARIANT 1)."""
    n, bh, offs_d, t, x_base, st = _chunk_program(X, ST, T, N, CHUNK, HEAD_DIM, D)
    do = tl.load(DO + (bh.to(tl.int64) * T + t[:, None]) * HEAD_DIM + offs_d[None, :])
    if VARIANT == 0:
        acc = tl.zeros((CHUNK, HEAD_DIM), dtype=tl.float32)
        for i in range(HEAD_DIM):
            r_i = tl.load(st + full_tile_rows(i, offs_d, HEAD_DIM)[:, None] * HEAD_DIM + offs_d[None, :])
            xi = tl.load(x_base + t * HEAD_DIM + i).to(tl.float32)
            acc += xi[:, None] * tl.dot(do, tl.trans(r_i))
        acc = 2.0 * acc
    else:
        offs_f = tl.arange(0, BB * BB)
        offs_nb = tl.arange(0, NB)
        acc3 = tl.zeros((CHUNK, NB, BB), dtype=tl.float32)
        for I in tl.static_range(NB):
            for J in tl.static_range(I, NB):
                p = I * NB - I * (I - 1) // 2 + (J - I)
                xi, xj, f_unused = block_features(x_base, t, I, J, HEAD_DIM, BB)
                r = tl.load(st + (p * BB * BB + offs_f)[:, None] * HEAD_DIM + offs_d[None, :])
                m = 1.0 if I == J else 2.0
                pp = tl.reshape(tl.dot(do, tl.trans(r)), (CHUNK, BB, BB)) * m  # [C, u, v]
                gi = tl.sum(pp * xj[:, None, :], axis=2)  # d/dx_I
                gj = tl.sum(pp * xi[:, :, None], axis=1)  # d/dx_J
                acc3 += tl.where((offs_nb == I)[None, :, None], gi[:, None, :], 0.0)
                acc3 += tl.where((offs_nb == J)[None, :, None], gj[:, None, :], 0.0)
        acc = tl.reshape(acc3, (CHUNK, HEAD_DIM))
    tl.store(OUT + (bh.to(tl.int64) * T + t[:, None]) * HEAD_DIM + offs_d[None, :], acc)


def time_variant(name, chunk, warps, stages, fn, result, ref):
    """Run fn once, compare result() with ref[0] (the first variant of its kind sets it), time fn,
    print a table row."""
    try:
        fn()
        torch.cuda.synchronize()
        out = result()
        err = 0.0 if ref[0] is None else ((out - ref[0]).norm() / ref[0].norm()).item()
        if ref[0] is None:
            ref[0] = out.clone()
        ms = triton.testing.do_bench(fn, warmup=5, rep=50)
        print(f"| {name} | {chunk} | {warps} | {stages} | {ms:.3f} | {err:.1e} |", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"| {name} | {chunk} | {warps} | {stages} | failed: {repr(e)[:200]} | |", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("t_len", nargs="?", type=int, default=65536)
    parser.add_argument("--passes", default="query,dq,share", help="which products to time")
    parser.add_argument("--chunks", default="128,256")
    args = parser.parse_args()
    t_len, passes = args.t_len, set(args.passes.split(","))
    d = D_HEAD
    dim = d * (d + 1) // 2
    to_block, to_pair = block_layout_index(d).cuda(), pair_layout_index(d).cuda()
    dim_blocks = to_block.numel()
    dev = "cuda"
    print(torch.cuda.get_device_name(), f"T={t_len} H={H} d={d}; ms per pass (median of triton do_bench)", flush=True)
    print("| kernel | C | warps | stages | ms | rel. err vs first |")
    print("|---|---|---|---|---|---|")
    configs = ((8, 2), (8, 3), (4, 2))
    for chunk in (int(c) for c in args.chunks.split(",")):
        n = t_len // chunk
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(H, t_len, d, device=dev, generator=g).bfloat16() * 0.3
        y = torch.randn(H, t_len, d, device=dev, generator=g).bfloat16()
        w = torch.rand(H, t_len, device=dev, generator=g)
        st = torch.randn(H, n, dim, d, device=dev, generator=g).bfloat16()
        st_blocks = st[:, :, to_block].contiguous()  # the same symmetric state in the block layout
        out = torch.zeros(H, t_len, d, device=dev)
        ref = [None]
        for variant, name in () if "query" not in passes else ((0, "query_scaled"), (1, "query_acc"), (2, "query_pairs"), (3, "query_blocks")):
            state, rows = (st_blocks, dim_blocks) if variant == 3 else (st, dim)
            for warps, stages in configs:
                time_variant(name, chunk, warps, stages, lambda: _query_kernel[(n, H)](
                    x, state, out, t_len, n, CHUNK=chunk, HEAD_DIM=d, D=rows, VARIANT=variant, num_warps=warps,
                    num_stages=stages), lambda: out, ref)
        ref = [None]
        for variant, name in () if "dq" not in passes else ((0, "dq_full"), (1, "dq_blocks")):
            state, rows = (st_blocks, dim_blocks) if variant == 1 else (st, dim)
            for warps, stages in configs:
                time_variant(name, chunk, warps, stages, lambda: _dq_kernel[(n, H)](
                    x, y, state, out, t_len, n, CHUNK=chunk, HEAD_DIM=d, D=rows, VARIANT=variant, num_warps=warps,
                    num_stages=stages), lambda: out, ref)
        ref = [None]
        shares = torch.zeros(H, n, dim, d, device=dev, dtype=torch.bfloat16)
        share_blocks = torch.zeros(H, n, dim_blocks, d, device=dev, dtype=torch.bfloat16)
        for variant, name in () if "share" not in passes else ((0, "share_masked"), (2, "share_blocks")):
            target, rows = (share_blocks, dim_blocks) if variant == 2 else (shares, dim)
            result = (lambda: share_blocks[:, :, to_pair].float()) if variant == 2 else (lambda: shares.float())
            for warps, stages in ((8, 2), (4, 2), (4, 3)):
                time_variant(name, chunk, warps, stages, lambda: _share_kernel[(n, H)](
                    x, y, w, target, t_len, n, CHUNK=chunk, HEAD_DIM=d, D=rows, VARIANT=variant, num_warps=warps,
                    num_stages=stages), result, ref)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
