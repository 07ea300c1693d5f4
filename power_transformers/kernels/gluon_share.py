"""The chunk share kernel of the state passes in Gluon (Triton 3.6's low-level dialect), Hopper only.

One configuration of triton_chunk._chunk_share_kernel: d = 64, C = 256, one query head a key/value head
(G = 1), bf16 inputs; the forward's pass (keys and values, no z weights, SLOT = 1) or the backward's
(queries and dO, z weights zw = delta, SLOT = 0). Shapes (contiguous):

    x, y        [B, T, Hk, d]     bf16 (keys and values; queries and dO)
    zw          [B, T, Hk]        fp32 (the backward's delta), or none
    weights     [B, Hk, N C]      fp32 token weights (triton_chunk._gate_weights; tokens past T unread)
    states      [B, Hk, N + 1, D, d]  bf16, D = d (d + 1) / 2 = 2080: row-block i's rows (i, j), j >= i,
                start at row i d - i (i - 1) / 2
    z_states    [B, Hk, N + 1, D] fp32

For each chunk n (C tokens t, those past T read as 0) and each (batch, head), slot n + SLOT gets

    R_i[j, :] = sum_t w_t x_ti x_tj y_t          (row-block i, rows j >= i)
    Z[i, j]   = sum_t w_t zw_t x_ti x_tj         (i <= j; zw = 1 in the forward)

as the Triton kernel writes them (the other slots and rows are not touched). The products are the Triton
kernel's: row-blocks i < 32 one [64, 64] tile each ((x^T * x_i) @ (w y), every row j, rows j < i not
stored); row-blocks i >= 32 in pairs (i, i + 16), i = 32..47, one [64, 64] tile of the rows j >= 32 of
both (x_{32..63}^T * x_i on its first 32 rows, * x_{i+16} on the others). The weighted operand is rounded
to bf16 as in Triton (the exact product of two bf16 rounded once), w y is rounded to bf16 from fp32.

How (benchmarks/explore_gluon_share.py, the pattern): one warp group a program. x^T is held in
registers in the A-operand layout of wgmma, w y in NVMMA shared memory (the B operand), the column
x[:, i] read from a plain shared copy of x^T in the operand's slice layout; each tile's 4 pieces of 64
tokens are issued asynchronously, the next piece weighted while the previous runs, and tile i - 1 stored
(masked, from registers, optionally through a layout conversion to 16-byte rows) while tile i's first
piece runs; two accumulator register sets; UNROLL tiles per loop trip, drained at each trip's end.

Z: (w x)^T @ x with wgmma on bf16 operands and fp32 accumulation, w x (fp32, rounded once as in Triton's
x * w) split into three bf16 pieces hi + mid + lo (exact to about 2^-27 relative), each multiplied by the
exact bf16 x: three bf16 products of [64, 256] x [256, 64] per chunk, within fp32 accuracy of Triton's
tf32x3 form (both round w x to fp32 first).

Checked on an H100 (benchmarks/check_gluon_share.py, Triton 3.6): states equal to the Triton kernel's
bit for bit, z within 4.2e-7 of its largest entry, at (B, T, H) = (1, 256, 2), (2, 1000, 4), (1, 65536, 16),
gated and not, forward's pass and backward's (RESULTS.md runs T and V). At 64k tokens, 16 heads (median of
do_bench): 0.956 ms against the Triton kernel's 1.588 for the forward's pass, 0.999 against 1.603 for the
backward's, since x^T is read out of x_smem without bank conflicts (run V call 8; 1.164 and 1.184 before,
and 1.448 with the tiles stored straight from the product's layout, convert_stores=False, run T). ptxas
sm_90: 255 registers, no spills (the backward's 24 bytes), 106,496 bytes of shared memory: two programs an
SM (ncu, run V call 6).

Gluon kernels are compiled for sm_90 only and cannot run under TRITON_INTERPRET (the CPU interpreter);
their check is benchmarks/check_gluon_share.py on a CUDA device (Hopper), and check_gpu.py's chunked
cases at d = 64, C = 256 run through it. triton_chunk._state_pass takes it where `takes` says so
(elsewhere, and on the CPU, _chunk_share_kernel: the interpreter's tests check that one).
"""

from __future__ import annotations

import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .triton_common import interpreting

HEAD_DIM = 64
CHUNK = 256
#: tiles per trip of the loops (even; divides 32 and 16)
UNROLL = 8
#: the Triton whose Gluon API this module is written against and was checked with on the GPU (Gluon is
#: experimental: Triton 3.9's rejects this code)
TRITON_VERSION = "3.6."


def takes(x: torch.Tensor, chunk: int, group: int, has_zw: bool, reverse: bool) -> bool:
    """Whether triton_chunk._state_pass runs its share through this kernel: the pass is this kernel's
    configuration (configuration) on a device and a Triton that run it (runs_on)."""
    return configuration(x.shape[-1], x.dtype, chunk, group, has_zw, reverse) and runs_on(x.device)


def configuration(head_dim: int, dtype: torch.dtype, chunk: int, group: int, has_zw: bool, reverse: bool) -> bool:
    """A state pass at d = 64, C = 256, G = 1, bf16: the forward's (keys and values, no z weights) or
    the backward's (queries and dO, reverse, with z weights)."""
    return (has_zw == reverse and group == 1 and chunk == CHUNK and head_dim == HEAD_DIM
            and dtype == torch.bfloat16)


def runs_on(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 with Triton 3.6, not under TRITON_INTERPRET;
    POWER_GLUON=0 turns it off."""
    if device.type != "cuda" or interpreting() or os.environ.get("POWER_GLUON") == "0":
        return False
    return triton.__version__.startswith(TRITON_VERSION) and torch.cuda.get_device_capability(device) == (9, 0)


@gluon.jit
def _weighted(xt_k, xcol_smem, i, k: gl.constexpr, KC: gl.constexpr, xs_layout: gl.constexpr,
              rows_layout: gl.constexpr, PAIR: gl.constexpr, STEP: gl.constexpr):
    """Piece k (tokens k KC .. k KC + KC - 1) of a tile's first operand in registers: xt_k * x[:, i] (bf16),
    PAIR: x[:, i] on the first half of the rows, x[:, i + STEP] on the others."""
    xi = gl.expand_dims(xcol_smem.index(i).slice(k * KC, KC).load(xs_layout), 0)
    if PAIR:
        xs = gl.expand_dims(xcol_smem.index(i + STEP).slice(k * KC, KC).load(xs_layout), 0)
        first = gl.expand_dims(gl.arange(0, xt_k.shape[0], layout=rows_layout) < xt_k.shape[0] // 2, 1)
        xi = gl.where(first, xi, xs)
    return xt_k * xi


@gluon.jit
def _store_tile(acc, OUT, slot_base, i, PAIR: gl.constexpr, STEP: gl.constexpr, HEAD_DIM: gl.constexpr,
                store_layout: gl.constexpr, CONVERT: gl.constexpr):
    """Tile i's [64, d] fp32 result -> bf16, its rows j >= (row-block) stored at their packed rows; PAIR:
    rows 32..63 of row-block i on the first half, of row-block i + STEP on the second."""
    val = acc.to(gl.bfloat16)
    if CONVERT:
        val = gl.convert_layout(val, store_layout)
    lay: gl.constexpr = val.type.layout
    r = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, lay))
    c = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, lay))
    if PAIR:
        half: gl.constexpr = HEAD_DIM // 2
        j = half + r % half
        blk = i + (r // half) * STEP
    else:
        j = r
        blk = i + r * 0
    row = blk * HEAD_DIM - (blk * (blk - 1)) // 2 + j - blk
    ok = gl.expand_dims(j >= blk, 1) & gl.expand_dims(c < HEAD_DIM, 0)
    ptrs = OUT + slot_base + gl.expand_dims(row.to(gl.int64) * HEAD_DIM, 1) + gl.expand_dims(c, 0)
    gl.store(ptrs, val, mask=ok)


@gluon.jit
def _tile_rest(acc, a0, xt1, xt2, xt3, wy1, wy2, wy3, xcol_smem, i, KC: gl.constexpr, xs_layout: gl.constexpr,
               rows_layout: gl.constexpr, PAIR: gl.constexpr, STEP: gl.constexpr):
    """Pieces 1..3 of tile i, piece 0 (operand a0) issued: each piece weighted while the one before runs;
    returns with the last piece in flight (acc, its operand)."""
    a1 = _weighted(xt1, xcol_smem, i, 1, KC, xs_layout, rows_layout, PAIR, STEP)
    acc = warpgroup_mma(a1, wy1, acc, is_async=True)
    acc, a0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a0))
    a2 = _weighted(xt2, xcol_smem, i, 2, KC, xs_layout, rows_layout, PAIR, STEP)
    acc = warpgroup_mma(a2, wy2, acc, is_async=True)
    acc, a1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a1))
    a3 = _weighted(xt3, xcol_smem, i, 3, KC, xs_layout, rows_layout, PAIR, STEP)
    acc = warpgroup_mma(a3, wy3, acc, is_async=True)
    acc, a2 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a2))
    return acc, a3


@gluon.jit
def _tiles(xt0, xt1, xt2, xt3, wy_smem, xcol_smem, OUT, slot_base, I0: gl.constexpr, NT: gl.constexpr,
           PAIR: gl.constexpr, STEP: gl.constexpr, UNROLL: gl.constexpr, KC: gl.constexpr, HEAD_DIM: gl.constexpr,
           mma: gl.constexpr, xs_layout: gl.constexpr, rows_layout: gl.constexpr, store_layout: gl.constexpr,
           CONVERT: gl.constexpr):
    """Tiles i = I0 .. I0 + NT - 1, software pipelined (explore_gluon_share.share_gluon_pipe_kernel).

    Two accumulator register sets: tile i's first wgmma is issued while tile i - 1 is in flight, into the
    set of tile i - 2 (retired and stored) with use_acc=False. UNROLL tiles a trip, unrolled, the wgmmas
    drained at the trip's end: a wgmma in flight across the loop's back edge makes ptxas serialize them."""
    gl.static_assert(NT % UNROLL == 0)
    gl.static_assert(UNROLL % 2 == 0, "the two register sets must not swap through the loop's phis")
    wy0 = wy_smem.slice(0 * KC, KC)
    wy1 = wy_smem.slice(1 * KC, KC)
    wy2 = wy_smem.slice(2 * KC, KC)
    wy3 = wy_smem.slice(3 * KC, KC)
    spare0 = gl.zeros([HEAD_DIM, HEAD_DIM], gl.float32, mma)
    spare1 = gl.zeros([HEAD_DIM, HEAD_DIM], gl.float32, mma)
    for q in range(NT // UNROLL):
        for u in gl.static_range(UNROLL):
            i = I0 + q * UNROLL + u
            a0 = _weighted(xt0, xcol_smem, i, 0, KC, xs_layout, rows_layout, PAIR, STEP)
            if u == 0:
                acc = warpgroup_mma(a0, wy0, spare0, use_acc=False, is_async=True)
                spare = spare1
            else:
                nxt = warpgroup_mma(a0, wy0, spare, use_acc=False, is_async=True)
                done, a_last, nxt = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_last, nxt))
                # tile i - 1 is complete: stored while piece 0 of tile i runs
                _store_tile(done, OUT, slot_base, i - 1, PAIR, STEP, HEAD_DIM, store_layout, CONVERT)
                spare = done
                acc = nxt
            acc, a_last = _tile_rest(acc, a0, xt1, xt2, xt3, wy1, wy2, wy3, xcol_smem, i, KC, xs_layout, rows_layout,
                                     PAIR, STEP)
        done, a_last = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_last))
        _store_tile(done, OUT, slot_base, I0 + q * UNROLL + UNROLL - 1, PAIR, STEP, HEAD_DIM, store_layout, CONVERT)
        spare0 = spare
        spare1 = done


@gluon.jit
def _load_x(X, x_head, t0, T, stride_t, col0: gl.constexpr, M: gl.constexpr, HEAD_DIM: gl.constexpr,
            io_layout: gl.constexpr):
    """[M, d] bf16 tile of tokens t0 .. t0 + M - 1 (0 past T), columns col0 + c % (d - col0)."""
    tok = t0 + gl.arange(0, M, layout=gl.SliceLayout(1, io_layout))
    c = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io_layout))
    cols = col0 + c % (HEAD_DIM - col0)
    ok = gl.expand_dims(tok < T, 1) & gl.expand_dims(c < HEAD_DIM, 0)
    ptrs = X + x_head + gl.expand_dims(tok.to(gl.int64) * stride_t, 1) + gl.expand_dims(cols, 0)
    return gl.load(ptrs, mask=ok, other=0.0)


@gluon.jit
def _share_kernel(X, Y, ZW, W, OUT, ZOUT, T, T_PAD, NUM_CHUNKS, HK, HEAD_DIM: gl.constexpr, D: gl.constexpr,
                  CHUNK: gl.constexpr, SLOT: gl.constexpr, HAS_ZW: gl.constexpr, UNROLL: gl.constexpr,
                  CONVERT: gl.constexpr):
    M: gl.constexpr = CHUNK
    KC: gl.constexpr = M // 4
    HALF: gl.constexpr = HEAD_DIM // 2
    gl.static_assert(HEAD_DIM == 64 and CHUNK == 256, "d = 64, C = 256 only")
    gl.static_assert(gl.num_warps() == 4, "one warp group")
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    xs_layout: gl.constexpr = gl.SliceLayout(0, a_layout)
    rows_layout: gl.constexpr = gl.SliceLayout(1, a_layout)
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    # x^T read out of x_smem (128-byte swizzle) with a warp's lanes over 8 columns and 4 token groups: the
    # compiler then reads it with ldmatrix.trans, 8 instructions a thread. With the lanes over 32 tokens of one
    # column it took 128 2-byte loads a thread, each a 32-way bank conflict: 1.164 ms a pass at 64k, 0.956 now
    # (H100, RESULTS.md run V, calls 7-8)
    t_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    nvmma: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    n = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // HK
    h = bh % HK
    t0 = n * CHUNK
    stride_t = HK * HEAD_DIM
    x_head = (b.to(gl.int64) * T * HK + h) * HEAD_DIM
    w_base = W + bh.to(gl.int64) * T_PAD + t0
    slot = bh.to(gl.int64) * (NUM_CHUNKS + 1) + n + SLOT

    # x and w y [M, d] into NVMMA shared memory; a plain copy of x^T [d, M] for the columns x[:, i]
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [M, HEAD_DIM], nvmma)
    wy_smem = gl.allocate_shared_memory(gl.bfloat16, [M, HEAD_DIM], nvmma)
    xcol_smem = gl.allocate_shared_memory(gl.bfloat16, [HEAD_DIM, M],
                                          gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
    x = _load_x(X, x_head, t0, T, stride_t, 0, M, HEAD_DIM, io_layout)
    y = _load_x(Y, x_head, t0, T, stride_t, 0, M, HEAD_DIM, io_layout)
    w = gl.load(w_base + gl.arange(0, M, layout=gl.SliceLayout(1, io_layout)))
    x_smem.store(x)
    wy_smem.store((gl.expand_dims(w, 1) * y.to(gl.float32)).to(gl.bfloat16))
    gl.thread_barrier()
    xcol_smem.store(x_smem.permute((1, 0)).load(t_layout))
    fence_async_shared()
    gl.thread_barrier()
    # the same bytes with a rank-1 layout, so that .index(i) gives the column x[:, i] as a 1-d view
    xcol = xcol_smem._reinterpret(gl.bfloat16, [HEAD_DIM, M],
                                  gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))

    xt0 = x_smem.slice(0 * KC, KC).permute((1, 0)).load(a_layout)
    xt1 = x_smem.slice(1 * KC, KC).permute((1, 0)).load(a_layout)
    xt2 = x_smem.slice(2 * KC, KC).permute((1, 0)).load(a_layout)
    xt3 = x_smem.slice(3 * KC, KC).permute((1, 0)).load(a_layout)

    # Z = (w zw x)^T @ x: w zw x in fp32 split into three bf16 pieces, each product exact, fp32 accumulation
    zacc = gl.zeros([HEAD_DIM, HEAD_DIM], gl.float32, mma)
    for k in gl.static_range(4):
        if k == 0:
            xt_k = xt0
        elif k == 1:
            xt_k = xt1
        elif k == 2:
            xt_k = xt2
        else:
            xt_k = xt3
        tk = k * KC + gl.arange(0, KC, layout=xs_layout)
        wk = gl.load(w_base + tk)
        if HAS_ZW:  # Z's own token weights (the backward's delta), 0 past T
            wk = wk * gl.load(ZW + (b.to(gl.int64) * T * HK + h) + (t0 + tk) * HK, mask=t0 + tk < T, other=0.0)
        v = xt_k.to(gl.float32) * gl.expand_dims(wk, 0)
        hi = v.to(gl.bfloat16)
        r1 = v - hi.to(gl.float32)
        mid = r1.to(gl.bfloat16)
        lo = (r1 - mid.to(gl.float32)).to(gl.bfloat16)
        xk = x_smem.slice(k * KC, KC)
        zacc = warpgroup_mma(lo, xk, zacc)
        zacc = warpgroup_mma(mid, xk, zacc)
        zacc = warpgroup_mma(hi, xk, zacc)
    za = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, mma))
    zb = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, mma))
    lo_i = gl.expand_dims(za, 1)
    z_off = lo_i * HEAD_DIM - (lo_i * (lo_i - 1)) // 2 + gl.expand_dims(zb, 0) - lo_i
    gl.store(ZOUT + slot * D + z_off, zacc, mask=gl.expand_dims(zb, 0) >= lo_i)

    slot_base = slot * D * HEAD_DIM
    # row-blocks 0 .. d/2 - 1: every row j
    _tiles(xt0, xt1, xt2, xt3, wy_smem, xcol, OUT, slot_base, 0, HALF, False, 0, UNROLL, KC, HEAD_DIM, mma,
           xs_layout, rows_layout, store_layout, CONVERT)

    # row-blocks d/2 .. d - 1 in pairs (i, i + d/4): rows j >= d/2 of both. x_smem (read only by Z and the
    # operand loads above) becomes [x[:, d/2:], x[:, d/2:]]
    xp = _load_x(X, x_head, t0, T, stride_t, HALF, M, HEAD_DIM, io_layout)
    gl.thread_barrier()
    x_smem.store(xp)
    gl.thread_barrier()
    xp0 = x_smem.slice(0 * KC, KC).permute((1, 0)).load(a_layout)
    xp1 = x_smem.slice(1 * KC, KC).permute((1, 0)).load(a_layout)
    xp2 = x_smem.slice(2 * KC, KC).permute((1, 0)).load(a_layout)
    xp3 = x_smem.slice(3 * KC, KC).permute((1, 0)).load(a_layout)
    _tiles(xp0, xp1, xp2, xp3, wy_smem, xcol, OUT, slot_base, HALF, HALF // 2, True, HALF // 2, UNROLL, KC,
           HEAD_DIM, mma, xs_layout, rows_layout, store_layout, CONVERT)


def chunk_share(x, y, zw, weights, states, z_states, t: int, n_chunks: int, reverse: bool, unroll: int = UNROLL,
                convert_stores: bool = True) -> None:
    """Every chunk's own share into the slots of states / z_states (as _state_pass allocates them), as
    triton_chunk._chunk_share_kernel writes them at d = 64, C = 256, G = 1, bf16: the forward (x, y the
    keys and values, zw None, slots 1 .. N) or, reverse, the backward's (x, y the queries and dO, zw
    [B, T, Hk] fp32 the delta, slots 0 .. N - 1). weights: the pass's token weights [B, Hk, N C] fp32."""
    bsz, t_x, hx, d = x.shape
    hk = states.shape[1]
    assert d == HEAD_DIM and hx == hk and t_x == t, "d = 64, one query head a key/value head"
    assert x.dtype == y.dtype == states.dtype == torch.bfloat16 and z_states.dtype == torch.float32
    assert n_chunks == states.shape[2] - 1 == -(-t // CHUNK)
    assert weights.dtype == torch.float32 and weights.numel() == bsz * hk * n_chunks * CHUNK
    assert (zw is not None) == reverse, "the backward's pass has z weights (delta), the forward's none"
    assert zw is None or (zw.dtype == torch.float32 and zw.shape == (bsz, t, hk) and zw.is_contiguous())
    assert x.is_contiguous() and y.is_contiguous() and weights.is_contiguous()
    assert states.is_contiguous() and z_states.is_contiguous()
    if n_chunks == 0:
        return
    _share_kernel[(n_chunks, bsz * hk)](x, y, zw if zw is not None else weights, weights, states, z_states, t,
                                        n_chunks * CHUNK, n_chunks, hk, HEAD_DIM=d, D=states.shape[3], CHUNK=CHUNK,
                                        SLOT=0 if reverse else 1, HAS_ZW=zw is not None, UNROLL=unroll,
                                        CONVERT=convert_stores, num_warps=4)
