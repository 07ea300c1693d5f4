"""The Triton kernels against the PyTorch reference (fp64), under Triton's CPU interpreter.

Shapes are tiny on purpose: the interpreter costs ~1 ms per tl.dot step, and these run in CI
on two cores. The same comparisons at real sizes on a GPU: benchmarks/check_gpu.py.
"""

import math
import os
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from power_transformers.kernels import dispatch, reference  # noqa: E402
from power_transformers.kernels import triton_attention as ta  # noqa: E402
from power_transformers.kernels import triton_chunk as tc  # noqa: E402
from power_transformers.kernels import triton_power as tp  # noqa: E402


@pytest.fixture(autouse=True)
def chunked_form(monkeypatch):
    """These tests are of the chunked kernels: keep short sequences off the attention form
    (test_triton_attention.py has its own tests, and the choice is tested below)."""
    monkeypatch.setenv("POWER_TRITON_ATTENTION_MAX_T", "0")


def rel(a, b):
    """||a - b|| / ||b|| in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(b, t, hq, hk, d, *, gated=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g).to(dtype)
    k = torch.randn(b, t, hk, d, generator=g).to(dtype)
    v = torch.randn(b, t, hk, d, generator=g).to(dtype)
    # gates near 1 (log-gates in about [-1, 0]) so that the state matters across chunks
    log_g = F.logsigmoid(torch.randn(b, t, hk, generator=g) + 2.0) if gated else None
    return q, k, v, log_g


def random_state(b, hk, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, hk, 8, d, generator=g)
    vals = torch.randn(b, hk, 8, d, generator=g)
    phi = reference.symmetric_power_embedding(keys * d**-0.25, 2)
    return torch.einsum("bhnD,bhnd->bhDd", phi, vals), phi.sum(2)  # a state that real keys could give


def leaf(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def leaf64(*xs):
    return [None if x is None else x.detach().double().requires_grad_() for x in xs]


# ----------------------------------------------------------------------------------
# Forward and every gradient
# ----------------------------------------------------------------------------------


def check_against_reference(q, k, v, log_g, s0, z0, chunk, ref_chunk=None, tol=1e-5, grad_tol=1e-4):
    """power_attention (Triton, `chunk`) against the reference chunked form in fp64 (`ref_chunk`,
    default the same): the output, the final state, and the gradients of q, k, v, log_g and the
    initial state (where given) under a random loss through the output and the final state (as
    truncated backprop through time would take it)."""
    with_state = s0 is not None
    ins, ins64 = leaf(q, k, v, log_g, s0, z0), leaf64(q, k, v, log_g, s0, z0)
    init = tuple(ins[4:]) if with_state else None
    init64 = tuple(ins64[4:]) if with_state else None
    y, state = tp.power_attention(*ins[:4], chunk_size=chunk, initial_state=init, output_final_state=True)
    y_ref, state_ref = reference.power_attention_chunked(
        *ins64[:4], chunk_size=ref_chunk or chunk, initial_state=init64, output_final_state=True)
    assert y.dtype == v.dtype and y.shape == q.shape
    assert rel(y, y_ref) < tol
    assert rel(state[0], state_ref[0]) < tol and rel(state[1], state_ref[1]) < tol
    gen = torch.Generator().manual_seed(7)
    gy, gs, gz = (torch.randn(x.shape, generator=gen) for x in (y, state[0], state[1]))
    ((y * gy).sum() + (state[0] * gs).sum() + (state[1] * gz).sum()).backward()
    ((y_ref * gy.double()).sum() + (state_ref[0] * gs.double()).sum() + (state_ref[1] * gz.double()).sum()).backward()
    for name, x, x64 in zip(["q", "k", "v", "log_g", "S0", "z0"], ins, ins64):
        if x is None:
            continue
        assert x.grad is not None, name
        assert rel(x.grad, x64.grad) < grad_tol, (name, rel(x.grad, x64.grad))


@pytest.mark.parametrize(
    "b,t,hq,hk,d,gated,chunk,with_state",
    [
        (2, 37, 2, 1, 32, True, 16, True),  # GQA, ragged T, gates, initial and final state
        (1, 20, 1, 1, 32, False, 16, False),  # no gates
        (1, 33, 4, 2, 16, True, 32, True),  # groups of 2, chunk 32, one token in the last chunk
        (1, 20, 2, 1, 128, True, 16, False),  # the largest head size (full [128, 128] state tiles)
        (1, 40, 2, 1, 64, True, 16, True),  # d = 64: the share kernel's and the query's row-blocks in pairs
    ],
)
def test_forward_and_gradients(monkeypatch, b, t, hq, hk, d, gated, chunk, with_state):
    monkeypatch.setattr(tc, "BWD_KV_QUERY_ROWS", 16)  # chunk 32: the key-side backward takes its queries in two pieces
    q, k, v, log_g = make_inputs(b, t, hq, hk, d, gated=gated, seed=t)
    s0, z0 = random_state(b, hk, d, seed=t + 1) if with_state else (None, None)
    check_against_reference(q, k, v, log_g, s0, z0, chunk)


@pytest.mark.parametrize(
    "t,hq,hk,gated,chunk,with_state",
    [
        (70, 2, 1, True, 64, True),  # 4 blocks a chunk, GQA, ragged: the last chunk has blocks past T
        (40, 1, 1, False, 32, False),  # 2 blocks a chunk, no gates
    ],
)
def test_chunks_of_several_blocks(monkeypatch, t, hq, hk, gated, chunk, with_state):
    """A chunk longer than the block (states every `chunk` tokens, programs of 16): outputs, final
    state and every gradient against the reference, as for one block a chunk."""
    monkeypatch.setattr(tc, "MAX_BLOCK", 16)
    assert tc.kernel_tiles(chunk, 16) == (chunk, 16)
    q, k, v, log_g = make_inputs(1, t, hq, hk, 16, gated=gated, seed=t)
    s0, z0 = random_state(1, hk, 16, seed=t + 1) if with_state else (None, None)
    check_against_reference(q, k, v, log_g, s0, z0, chunk, ref_chunk=16)


def test_a_chunk_of_256_is_one_source_of_the_share_kernel(monkeypatch):
    """At d = 64 without groups a 256-token chunk (the default there) of 16-bit inputs is one
    source of the share kernel (one product a row-block over all its tokens), its Z share still two
    blocks of 128: outputs, final state and every gradient against the reference, over a chunk and
    a ragged one (the interpreter's products are exact, so fp32 inputs through the same rule)."""
    monkeypatch.setattr(tc, "BWD_KV_QUERY_ROWS", 16)
    assert tc.kernel_tiles(256, 64) == (256, 128)
    assert tc.share_source_tokens(256, 128, 64, 1, tl.bfloat16) == 256
    assert tc.share_source_tokens(256, 128, 64, 1, tl.float32) == 128
    assert tc.share_source_tokens(256, 128, 64, 2, tl.bfloat16) == 128
    assert tc.share_source_tokens(128, 128, 64, 2, tl.bfloat16) == 256  # a group of two at C = 128: one source
    assert tc.share_source_tokens(256, 128, 32, 1, tl.bfloat16) == 128
    monkeypatch.setattr(tc, "share_source_tokens", lambda chunk, block, d, group, op: chunk if chunk == 256 else block)
    q, k, v, log_g = make_inputs(1, 300, 1, 1, 64, gated=True, seed=3)
    s0, z0 = random_state(1, 1, 64, seed=4)
    check_against_reference(q, k, v, log_g, s0, z0, 256, ref_chunk=64)


def test_a_gqa_group_of_two_is_one_source_of_the_share_kernel(monkeypatch):
    """The backward's share over a group of two query heads at C = 128 as one source of 256 rows
    (both heads' tokens), against the reference: outputs, final state and every gradient."""
    monkeypatch.setattr(tc, "BWD_KV_QUERY_ROWS", 16)
    monkeypatch.setattr(tc, "share_source_tokens", lambda chunk, block, d, group, op: chunk * group)
    q, k, v, log_g = make_inputs(1, 45, 4, 2, 16, gated=True, seed=5)
    s0, z0 = random_state(1, 2, 16, seed=6)
    check_against_reference(q, k, v, log_g, s0, z0, 16)


def test_the_query_side_backward_takes_its_own_block(monkeypatch):
    """bwd_q runs on its own block (query_backward_block: at most 32 tokens for fp32 operands at d =
    128, whose tiles at 64 overflow the H100's shared memory), its grid counted in that block: here
    half the other kernels' block (16 against 32 at C = 32), against the reference over a ragged
    length, with GQA."""
    assert tc.query_backward_block(64, 128, tl.float32) == 32
    assert tc.query_backward_block(64, 128, tl.bfloat16) == 64
    assert tc.query_backward_block(128, 64, tl.float32) == 128
    assert tc.query_backward_block(16, 128, tl.float32) == 16
    monkeypatch.setattr(tc, "BWD_KV_QUERY_ROWS", 16)
    monkeypatch.setattr(tc, "query_backward_block", lambda block, d, op: block // 2)
    assert tc.kernel_tiles(32, 16) == (32, 32)
    q, k, v, log_g = make_inputs(1, 75, 4, 2, 16, gated=True, seed=9)
    s0, z0 = random_state(1, 2, 16, seed=10)
    check_against_reference(q, k, v, log_g, s0, z0, 32, ref_chunk=16)


@pytest.mark.parametrize("to_end", [True, False])
def test_gate_kernels_match_their_torch_form(to_end):
    """The log-gates' kernels against the same sums in torch, on their own (through the attention a
    wrong head of a GQA group moved dlog_g by only 2e-5 relative): the state pass's weights and
    decays over a ragged length, and dlog_g from the query side of a group of two plus the key side."""
    g = torch.Generator().manual_seed(11)
    bsz, t, hk, hq, chunk = 2, 37, 2, 4, 16
    n_chunks, t_pad = 3, 48
    log_g = F.logsigmoid(torch.randn(bsz, t, hk, generator=g))
    w, decays = tc._gate_weights(log_g, bsz, t, hk, n_chunks, chunk, to_end, 0.5, "cpu")
    b = F.pad(log_g, (0, 0, 0, t_pad - t)).view(bsz, n_chunks, chunk, hk).cumsum(2)
    total = b[:, :, -1:]
    w_ref = 0.5 * ((total - b) if to_end else b).exp()
    assert torch.allclose(w, w_ref.permute(0, 3, 1, 2).reshape(bsz, hk, t_pad), rtol=1e-5, atol=0)
    assert torch.allclose(decays, total[:, :, 0].exp().transpose(1, 2), rtol=1e-5, atol=0)

    dbq = torch.randn(bsz, t_pad, hq, generator=g)
    dbk = torch.randn(bsz, t_pad, hk, generator=g)
    db = (dbk + dbq.view(bsz, t_pad, hk, hq // hk).sum(-1)).view(bsz, n_chunks, chunk, hk)
    ref = db.flip(2).cumsum(2).flip(2).reshape(bsz, t_pad, hk)[:, :t]
    assert torch.allclose(tc._gate_grad(dbq, dbk, t, chunk), ref, rtol=0, atol=1e-5)


def test_forward_keeps_its_states_for_the_backward(monkeypatch):
    """With keep_states the backward reads the forward's chunk states instead of a second state
    pass: the same gradients, one pass fewer; nothing is kept without a gradient to take. By
    default small states are kept (d = 64, C = 128) and large ones recomputed (d = 128, C = 64)."""
    passes = []
    real = tc._states_forward
    monkeypatch.setattr(tc, "_states_forward", lambda *a: passes.append(1) or real(*a))
    q, k, v, log_g = make_inputs(1, 40, 2, 1, 16, seed=4)
    grads, counts = {}, {}
    for keep in (False, True):
        passes.clear()
        ins = leaf(q, k, v, log_g)
        y, _ = tp.power_attention(*ins, chunk_size=32, keep_states=keep)
        (y**2).sum().backward()
        grads[keep], counts[keep] = [x.grad for x in ins], len(passes)
    assert counts == {False: 2, True: 1}
    for recomputed, kept in zip(grads[False], grads[True]):
        assert torch.equal(recomputed, kept)
    captured = []
    real_op = tp._chunk_forward_op
    monkeypatch.setattr(tp, "_chunk_forward_op", lambda *a: captured.append(a[-1]) or real_op(*a))
    with torch.no_grad():
        tp.power_attention(*leaf(q, k, v, log_g), chunk_size=32, keep_states=True)
    tp.power_attention(q, k, v, log_g, chunk_size=32, keep_states=True)  # no input asks for a gradient
    assert captured == [False, False]
    assert tp._keep_states(64, 128, None) and not tp._keep_states(128, 64, None)
    assert tp._keep_states(128, 64, True) and not tp._keep_states(64, 128, False)
    monkeypatch.setenv("POWER_TRITON_KEEP_STATES", "0")
    assert not tp._keep_states(64, 128, None)


def test_gluon_share_takes_only_its_configuration_on_hopper(monkeypatch):
    """The state passes' shares go through gluon_share only at d = 64, C = 256, G = 1, bf16 (the forward's
    without z weights, the backward's with them), and only on a CUDA device with Triton 3.6: never on the
    CPU or under the interpreter, where _chunk_share_kernel (which the tests here check) runs instead."""
    gs = pytest.importorskip("power_transformers.kernels.gluon_share")
    assert gs.configuration(64, torch.bfloat16, 256, 1, False, False)  # the forward's pass
    assert gs.configuration(64, torch.bfloat16, 256, 1, True, True)  # the backward's (z weights: delta)
    for args in ((128, torch.bfloat16, 256, 1, False, False), (64, torch.float16, 256, 1, False, False),
                 (64, torch.bfloat16, 128, 1, False, False), (64, torch.bfloat16, 256, 2, False, False),
                 (64, torch.bfloat16, 256, 1, True, False), (64, torch.bfloat16, 256, 1, False, True)):
        assert not gs.configuration(*args), args
    x = torch.zeros(1, 256, 2, 64, dtype=torch.bfloat16)
    assert not gs.runs_on(x.device) and not gs.takes(x, 256, 1, False, False)
    # a Hopper with Triton 3.6, as the GPU machine has (faked: no CUDA here)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(gs, "interpreting", lambda: False)
    monkeypatch.setattr(gs.triton, "__version__", "3.6.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert gs.runs_on(cuda)
    monkeypatch.setenv("POWER_GLUON", "0")
    assert not gs.runs_on(cuda)
    monkeypatch.delenv("POWER_GLUON")
    monkeypatch.setattr(gs.triton, "__version__", "3.9.0")
    assert not gs.runs_on(cuda)
    monkeypatch.setattr(gs.triton, "__version__", "3.6.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert not gs.runs_on(cuda)


def test_state_passes_hand_their_shares_to_gluon_where_it_takes_them(monkeypatch):
    """_state_pass gives gluon_share the forward's pass (keys and values, no z weights, forward) and the
    backward's (queries and dO, the delta as z weights, reverse) with the tensors it would give the
    Triton share kernel, and launches nothing else for them: a stand-in that fills the states through
    triton_share (the Triton kernel) gives the same outputs and gradients, to the bit, as the plain run."""
    q, k, v, log_g = make_inputs(1, 40, 2, 2, 16, gated=True, seed=3)

    def run():
        qs, ks, vs, gs = (x.clone().requires_grad_() for x in (q, k, v, log_g))
        y, _ = tp.power_attention(qs, ks, vs, gs, chunk_size=16, initial_state=random_state(1, 2, 16, seed=4),
                                  output_final_state=True)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), qs.grad, ks.grad, vs.grad, gs.grad

    plain = run()
    calls = []

    def chunk_share(x, y, zw, weights, states, z_states, t, n_chunks, reverse):
        calls.append((x.data_ptr(), y.data_ptr(), zw, reverse, t, n_chunks))
        tc.triton_share(x, y, zw, weights, states, z_states, reverse=reverse, chunk=16,
                        block=tc.kernel_tiles(16, 16)[1], op=tc.dot_dtype(x.dtype))

    monkeypatch.setattr(tc, "gluon_share", types.SimpleNamespace(takes=lambda *args: True, chunk_share=chunk_share))
    through = run()
    for a, b in zip(plain, through):
        assert torch.equal(a, b)
    assert [(c[2] is None, c[3], c[4], c[5]) for c in calls] == [(True, False, 40, 3), (False, True, 40, 3)]
    assert calls[1][2].shape == (1, 40, 2) and calls[1][2].dtype == torch.float32  # the delta


def test_pair_weights_are_built_once_per_device():
    """No copy from the host in a forward or backward (a blocking copy waits for the GPU's queue)."""
    w = tc._pair_weights(16, "cpu")
    assert tc._pair_weights(16, torch.device("cpu")) is w
    assert w.dtype == torch.float32 and w.shape == (136,)
    assert torch.equal(w, reference._embedding_plan(16, 2)[1].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_grads_in_one_pass(dtype):
    """do = dy / (den + eps) in the operand dtype and delta = -do . y, from a dy that is not
    contiguous, over a row count that is not a multiple of the kernel's rows."""
    import triton.language as tl

    from power_transformers.kernels.triton_common import output_grads

    g = torch.Generator().manual_seed(3)
    y = torch.randn(2, 7, 3, 16, generator=g).to(dtype)
    den = torch.rand(2, 7, 3, generator=g) + 0.5
    dy = torch.randn(2, 3, 7, 16, generator=g).to(dtype).transpose(1, 2)
    op = tl.bfloat16 if dtype == torch.bfloat16 else tl.float32
    do, delta = output_grads(dy, y, den, 1e-3, op)
    want = dy.double() / (den.double() + 1e-3)[..., None]
    assert do.dtype == dtype and delta.dtype == torch.float32 and delta.shape == den.shape
    # within one rounding to the operand dtype (the interpreter rounds to bf16 its own way)
    assert rel(do, want) < (1e-6 if dtype == torch.float32 else 2**-8)
    # and delta from that very rounded do
    assert rel(delta, -(do.double() * y.double()).sum(-1)) < 1e-6


def test_tail_step_readers_fill_the_gpu_at_any_batch():
    """About TAIL_STEP_READERS state readers in all, a power of two per (row, kv head), at most
    TAIL_STEP_MAX_READERS: the measured bests, 2 at batch 8 x 16 heads and 8 at batch 1 x 12."""
    from power_transformers.kernels.triton_decode import TAIL_STEP_MAX_READERS, TAIL_STEP_READERS, _tail_split

    assert (TAIL_STEP_READERS, TAIL_STEP_MAX_READERS) == (384, 8)
    assert [_tail_split(p, 64) for p in (128, 12, 1, 384, 100_000)] == [2, 8, 8, 1, 1]
    assert _tail_split(1, 4) == 4


def test_tail_step_takes_8_warps_where_it_has_one_program_per_sm(monkeypatch):
    """8 warps for a tail step of at most one program per SM (batch 1 x 12 heads x 9 programs on an
    H100's 132 SMs: 6.5 against 6.9 us), 4 past that (batch 8 x 12 x 5: 29.7 against 37.8), 8 at
    d = 128 (RESULTS.md, generation, run M)."""
    from power_transformers.kernels import triton_decode as td

    monkeypatch.setattr(td, "multiprocessors", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert [td._tail_step_warps(n, 64, cuda) for n in (12 * 9, 132, 133, 96 * 5)] == [8, 8, 4, 4]
    assert td._tail_step_warps(1000, 128, cuda) == 8
    monkeypatch.setattr(td, "TAIL_STEP_WARPS", 2)
    assert td._tail_step_warps(12 * 9, 64, cuda) == 2


def test_kernel_tiles():
    assert tc.kernel_tiles(1, 64) == (16, 16)
    assert tc.kernel_tiles(100, 64) == (128, 128)
    assert tc.kernel_tiles(512, 64) == (512, 128)
    assert tc.kernel_tiles(128, 128) == (64, 64)  # one block: at d = 128 a chunk of 128 runs as 64
    assert tc.kernel_tiles(512, 128) == (512, 64)
    assert tc.kernel_tiles(5000, 32) == (tc.MAX_CHUNK, 128)


def test_default_chunk():
    assert [tc.default_chunk(d, g) for d, g in ((32, 1), (64, 1), (64, 2), (64, 3), (64, 4), (128, 1), (128, 4))] == [
        128, 256, 128, 128, 128, 512, 512]


def test_no_chunk_size_runs_the_default_chunk(monkeypatch):
    """chunk_size=None (PowerConfig's default) asks default_chunk with the head size and the group."""
    asked = []

    def chunk_of(head_dim, group):
        asked.append((head_dim, group))
        return 16

    monkeypatch.setattr(tp, "default_chunk", chunk_of)
    q, k, v, log_g = make_inputs(1, 40, 4, 2, 16, seed=5)
    y, state = tp.power_attention(q, k, v, log_g, output_final_state=True)
    assert asked == [(16, 2)]
    y16, state16 = tp.power_attention(q, k, v, log_g, chunk_size=16, output_final_state=True)
    y64, _ = tp.power_attention(q, k, v, log_g, chunk_size=64, output_final_state=True)
    assert torch.equal(y, y16) and torch.equal(state[0], state16[0]) and torch.equal(state[1], state16[1])
    assert not torch.equal(y, y64)  # the chunk does change the rounding, so the first check can fail


@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunk_sizes_forward(chunk):
    q, k, v, log_g = make_inputs(1, 70, 2, 2, 32, seed=chunk)
    y, state = tp.power_attention(q, k, v, log_g, chunk_size=chunk, output_final_state=True)
    # the quadratic form is chunk-free: every chunk size must give it
    y_ref = reference.power_attention_quadratic(q.double(), k.double(), v.double(), log_g.double())
    _, state_ref = reference.power_attention_chunked(q.double(), k.double(), v.double(), log_g.double(),
                                                     chunk_size=16, output_final_state=True)
    assert rel(y, y_ref) < 1e-5
    assert rel(state[0], state_ref[0]) < 1e-5 and rel(state[1], state_ref[1]) < 1e-5


def test_only_the_loss_through_y():
    """No gradient for the final state flows in: the backward takes None for it."""
    q, k, v, log_g = make_inputs(1, 24, 1, 1, 16, seed=3)
    ins, ins64 = leaf(q, k, v, log_g), leaf64(q, k, v, log_g)
    y, _ = tp.power_attention(*ins, chunk_size=16)
    y_ref, _ = reference.power_attention_chunked(*ins64, chunk_size=16)
    (y**2).sum().backward()
    (y_ref**2).sum().backward()
    for x, x64 in zip(ins, ins64):
        assert rel(x.grad, x64.grad) < 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_inputs(dtype, tol):
    q, k, v, log_g = make_inputs(1, 40, 2, 1, 32, dtype=dtype, seed=11)
    y, state = tp.power_attention(q, k, v, log_g, chunk_size=16, output_final_state=True)
    y_ref, state_ref = reference.power_attention_chunked(q.double(), k.double(), v.double(), log_g.double(),
                                                         chunk_size=16, output_final_state=True)
    assert y.dtype == dtype and state[0].dtype == torch.float32
    assert not torch.isnan(y).any()
    assert rel(y, y_ref) < tol and rel(state[0], state_ref[0]) < tol


def test_left_padding_is_invisible():
    """Pad tokens with zeroed k, v, log_g add nothing and decay nothing: the padded row gives
    the unpadded row's outputs and final state."""
    q, k, v, log_g = make_inputs(2, 29, 2, 1, 32, seed=5)
    pad = 11  # row 1 is left-padded by 11 tokens
    k, v, log_g = k.clone(), v.clone(), log_g.clone()
    k[1, :pad] = 0
    v[1, :pad] = 0
    log_g[1, :pad] = 0
    y, state = tp.power_attention(q, k, v, log_g, chunk_size=16, output_final_state=True)
    y_alone, state_alone = tp.power_attention(q[1:, pad:], k[1:, pad:], v[1:, pad:], log_g[1:, pad:],
                                              chunk_size=16, output_final_state=True)
    assert rel(y[1:, pad:], y_alone) < 1e-5
    assert rel(state[0][1:], state_alone[0]) < 1e-5 and rel(state[1][1:], state_alone[1]) < 1e-5
    # and the kernel agrees with the reference on the padded batch
    y_ref, _ = reference.power_attention_chunked(q.double(), k.double(), v.double(), log_g.double(), chunk_size=16)
    assert rel(y[:, pad:], y_ref[:, pad:]) < 1e-5


# ----------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------


def test_decode_chain_equals_chunked_forward():
    """Prefill with the chunked kernel, then decode token by token (and three at once):
    outputs and states equal the chunked forward over the whole sequence."""
    t_prefill, t_total = 21, 29
    q, k, v, log_g = make_inputs(1, t_total, 4, 2, 32, seed=9)
    y_full, state_full = reference.power_attention_chunked(q.double(), k.double(), v.double(), log_g.double(),
                                                           chunk_size=16, output_final_state=True)
    _, state = tp.power_attention(q[:, :t_prefill], k[:, :t_prefill], v[:, :t_prefill], log_g[:, :t_prefill],
                                  chunk_size=16, output_final_state=True)
    ptrs = (state[0].data_ptr(), state[1].data_ptr())
    outs = []
    t = t_prefill
    while t < t_total:
        n = 3 if t == t_prefill else 1  # a few tokens at once, then one at a time
        sl = slice(t, t + n)
        outs.append(tp.power_attention_decode_(q[:, sl], k[:, sl], v[:, sl], log_g[:, sl], state))
        t += n
    assert (state[0].data_ptr(), state[1].data_ptr()) == ptrs  # updated in place
    assert rel(torch.cat(outs, 1), y_full[:, t_prefill:]) < 1e-5
    assert rel(state[0], state_full[0]) < 1e-5 and rel(state[1], state_full[1]) < 1e-5


@pytest.mark.parametrize("split", [1, 4])
def test_decode_matches_reference_decode_ungated_with_padding_row(split, monkeypatch):
    """One program per (row, head), or the state split over `split` programs whose shares the last adds up."""
    from power_transformers.kernels import triton_decode

    monkeypatch.setattr(triton_decode, "_split", lambda programs, head_dim: split)
    q, k, v, _ = make_inputs(2, 5, 1, 1, 32, gated=False, seed=4)
    k, v = k.clone(), v.clone()
    k[0, :2] = 0  # a left-padded row still in its padding
    v[0, :2] = 0
    s, z = random_state(2, 1, 32)
    state, state_ref = (s.clone(), z.clone()), (s.double(), z.double())
    y = tp.power_attention_decode_(q, k, v, None, state)
    y_ref = reference.power_attention_decode_(q.double(), k.double(), v.double(), None, state_ref)
    assert rel(y, y_ref) < 1e-5
    assert rel(state[0], state_ref[0]) < 1e-5 and rel(state[1], state_ref[1]) < 1e-5


@pytest.mark.parametrize("split", [1, 4])
def test_decode_one_query_row_sums_its_terms_once(split, monkeypatch):
    """One token and one query head per kv head (DEFER: query_row_block's one sum per program): token by token, gated,
    outputs and state against the reference."""
    from power_transformers.kernels import triton_decode

    monkeypatch.setattr(triton_decode, "_split", lambda programs, head_dim: split)
    q, k, v, log_g = make_inputs(2, 4, 2, 2, 32, seed=6)
    s, z = random_state(2, 2, 32)
    state, state_ref = (s.clone(), z.clone()), (s.double(), z.double())
    for t in range(4):
        sl = slice(t, t + 1)
        y = tp.power_attention_decode_(q[:, sl], k[:, sl], v[:, sl], log_g[:, sl], state)
        y_ref = reference.power_attention_decode_(q[:, sl].double(), k[:, sl].double(), v[:, sl].double(),
                                                  log_g[:, sl].double(), state_ref)
        assert rel(y, y_ref) < 1e-5
    assert rel(state[0], state_ref[0]) < 1e-5 and rel(state[1], state_ref[1]) < 1e-5


@pytest.mark.parametrize("hq, hk, d, tail, gated, readers, steps, fold_tokens", [
    (2, 2, 32, 8, True, None, 19, None), (8, 2, 16, 4, False, 2, 11, None), (16, 1, 64, 16, True, None, 35, None),
    (2, 2, 32, 8, True, 32, 16, None), (2, 2, 32, 8, True, 4, 16, None),
    (2, 2, 16, 64, True, None, 66, 16), (2, 2, 16, 64, True, 2, 66, 16)])
def test_tail_decode_matches_reference_across_folds(hq, hk, d, tail, gated, readers, steps, fold_tokens, monkeypatch):
    """One token at a time through a DecodeState: the kernels (a step that reads the state and
    attends over the tail; the step that fills the tail folds it) against the reference's tail
    decoding in fp64, over several folds. (16, 1, 64, 16): 16 query rows, so the tail is attended 8
    tokens at a time. Then a flush (fold_tail_) and the state against the reference's. readers: the
    step's state readers per (row, kv head). None (the rule's, 8 here) and 32: the step's readers fold
    the tail (FOLD_IN_STEP_READERS); 2 and 4: _fold_kernel folds it after the step. steps 16 with a
    tail of 8: the last step fills the tail and folds it, so the flush must leave it alone.
    fold_tokens 16 with a tail of 64: the fold takes the tail in two passes of two 16-token tiles
    (fold_row_blocks), in the step and in _fold_kernel."""
    from power_transformers.kernels import triton_decode
    from power_transformers.kernels.reference import empty_decode_state

    if readers is not None:
        monkeypatch.setattr(triton_decode, "_tail_split", lambda pairs, head_dim: readers)
    if fold_tokens is not None:
        monkeypatch.setattr(triton_decode, "FOLD_TOKENS", triton_decode.tl.constexpr(fold_tokens))

    q, k, v, log_g = make_inputs(2, steps, hq, hk, d, gated=gated, seed=13)
    s, z = random_state(2, hk, d)
    state = empty_decode_state(2, hk, d, 2, tail=tail)
    ref = empty_decode_state(2, hk, d, 2, dtype=torch.float64, tail=tail)
    state.s.copy_(s), state.z.copy_(z), ref.s.copy_(s), ref.z.copy_(z)
    pointers = [x.data_ptr() for x in state]
    for t in range(steps):
        sl = slice(t, t + 1)
        g = log_g[:, sl] if gated else None
        y = dispatch.power_attention_decode_(q[:, sl], k[:, sl], v[:, sl], g, state, backend="triton")
        y_ref = dispatch.power_attention_decode_(q[:, sl].double(), k[:, sl].double(), v[:, sl].double(),
                                                 None if g is None else g.double(), ref, backend="reference")
        assert rel(y, y_ref) < 1e-5
    assert torch.equal(state.tail_len, ref.tail_len) and [x.data_ptr() for x in state] == pointers
    dispatch.fold_tail_(state, backend="triton")
    dispatch.fold_tail_(ref, backend="reference")
    assert state.tail_len.eq(0).all()
    assert rel(state.s, ref.s) < 1e-5 and rel(state.z, ref.z) < 1e-5


def test_a_model_decodes_through_the_kernels_as_through_the_reference():
    """The tiny model (head size 16, GQA) with attention_backend="triton": prefill, decode across
    folds of the tail (4 tokens in the tests), a block of tokens, more decoding; the logits
    equal a cache-free forward through the reference."""
    from helpers import tiny_model

    from power_transformers import PowerCache
    from power_transformers.compat import CACHE_NAME

    model = tiny_model(attention_backend="triton")
    ids = torch.randint(3, 97, (2, 20))
    cache = PowerCache(model.config)
    with torch.no_grad():
        logits = [model(ids[:, :3], **{CACHE_NAME: cache}, use_cache=True).logits]
        logits += [model(ids[:, t : t + 1], **{CACHE_NAME: cache}, use_cache=True).logits for t in range(3, 9)]
        logits.append(model(ids[:, 9:12], **{CACHE_NAME: cache}, use_cache=True).logits)
        logits += [model(ids[:, t : t + 1], **{CACHE_NAME: cache}, use_cache=True).logits for t in range(12, 20)]
        model.config.attention_backend = "reference"
        full = model(ids, use_cache=False).logits
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)


def test_the_model_config_decides_whether_chunk_states_are_kept(monkeypatch):
    """PowerConfig.keep_chunk_states reaches the kernels (None: their size rule, which keeps the
    tiny model's); the model trains the same either way."""
    from helpers import tiny_model

    captured = []
    real_op = tp._chunk_forward_op
    monkeypatch.setattr(tp, "_chunk_forward_op", lambda *a: captured.append(a[-1]) or real_op(*a))
    ids = torch.randint(3, 97, (2, 40))
    grads = {}
    for keep in (None, False):
        model = tiny_model(attention_backend="triton", keep_chunk_states=keep, chunk_size=16)
        captured.clear()
        model(ids, labels=ids).loss.backward()
        grads[keep] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        assert captured and all(flag == (keep is None) for flag in captured), (keep, captured)
    for kept, recomputed in zip(grads[None], grads[False]):
        torch.testing.assert_close(kept, recomputed, rtol=0, atol=0)


def test_tail_decode_rejects_a_wrong_tail():
    from power_transformers.kernels.reference import empty_decode_state

    q = torch.randn(1, 1, 1, 16)
    good = empty_decode_state(1, 1, 16, 2)
    for bad, needle in ((good._replace(tail_k=good.tail_k[:, :, :3].contiguous()), "power of two"),
                        (good._replace(tail_len=good.tail_len.long()), "tail_len has dtype"),
                        (good._replace(tail_g=good.tail_g[:, :, :2].contiguous()), "tail_g has shape")):
        with pytest.raises(ValueError, match=needle):
            dispatch.power_attention_decode_(q, q, q, None, bad, backend="triton")
    # the fold alone (what reading a cache's state runs) takes the kernels only where the step does
    with pytest.raises(ValueError, match="head size 48"):
        dispatch.fold_tail_(empty_decode_state(1, 1, 48, 2), backend="triton")


# ----------------------------------------------------------------------------------
# Bad input, dispatch
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda: (torch.randn(1, 4, 1, 48),) * 3 + (None, 2), "head size 48"),
        (lambda: (torch.randn(1, 4, 1, 32),) * 3 + (None, 4), "degree 4"),
        (lambda: (torch.randn(1, 4, 1, 32, dtype=torch.float64),) * 3 + (None, 2), "dtype torch.float64"),
        (lambda: (torch.randn(1, 4, 1, 32), torch.randn(1, 4, 1, 32).half(), torch.randn(1, 4, 1, 32), None, 2), "k has dtype"),
        (lambda: (torch.randn(1, 4, 3, 32), torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32), None, 2), "multiple"),
        (lambda: (torch.randn(1, 4, 1, 32),) * 3 + (torch.zeros(1, 5, 1), 2), "log_g"),
    ],
)
def test_unsupported_inputs_name_the_problem(make, needle):
    q, k, v, log_g, degree = make()
    with pytest.raises(ValueError, match=needle):
        dispatch.power_attention(q, k, v, log_g, degree=degree, backend="triton")


def test_decode_rejects_a_wrong_state():
    q = torch.randn(1, 1, 1, 32)
    bad = (torch.zeros(1, 1, 10, 32), torch.zeros(1, 1, 10))
    with pytest.raises(ValueError, match="state shapes"):
        dispatch.power_attention_decode_(q, q, q, None, bad, backend="triton")
    half = (torch.zeros(1, 1, 528, 32, dtype=torch.float16), torch.zeros(1, 1, 528, dtype=torch.float16))
    with pytest.raises(ValueError, match="fp32"):
        dispatch.power_attention_decode_(q, q, q, None, half, backend="triton")


def test_dispatch_triton_backend_and_auto_fallback(monkeypatch):
    q, k, v, log_g = make_inputs(1, 18, 1, 1, 16, seed=2)
    y, _ = dispatch.power_attention(q, k, v, log_g, chunk_size=16, backend="triton")
    y_ref, _ = reference.power_attention_chunked(q.double(), k.double(), v.double(), log_g.double(), chunk_size=16)
    assert rel(y, y_ref) < 1e-5
    # "auto" on an input the kernels cannot take (pretend CUDA): one warning, then the reference
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    x = torch.randn(1, 4, 1, 48)
    with pytest.warns(UserWarning, match="head size 48"):
        dispatch.power_attention(x, x, x, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.power_attention(x, x, x, None)  # no second warning


def test_short_sequences_take_the_attention_form(monkeypatch):
    """Without a state in or out and T within the limit, power_attention runs the attention-form
    kernels (same numbers, gradients included); with a state, or past the limit, the chunked ones."""
    monkeypatch.delenv("POWER_TRITON_ATTENTION_MAX_T")
    calls = []
    monkeypatch.setattr(tp, "attention_forward", lambda *a: calls.append("attention") or ta.attention_forward(*a))
    monkeypatch.setattr(tp, "chunk_forward", lambda *a: calls.append("chunked") or tc.chunk_forward(*a))
    q, k, v, log_g = make_inputs(1, 40, 2, 1, 16, seed=21)
    ins, ins64 = leaf(q, k, v, log_g), leaf64(q, k, v, log_g)
    y, state = tp.power_attention(*ins, chunk_size=16)
    assert calls == ["attention"] and state is None
    y_ref = reference.power_attention_quadratic(*ins64)
    assert rel(y, y_ref) < 1e-5
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * gy).sum().backward()
    (y_ref * gy.double()).sum().backward()
    for x, x64 in zip(ins, ins64):
        assert rel(x.grad, x64.grad) < 1e-4

    tp.power_attention(q, k, v, log_g, chunk_size=16, output_final_state=True)
    assert calls[-1] == "chunked"  # a final state asked for
    monkeypatch.setattr(tp, "ATTENTION_FORM_MAX_T", 16)  # at d = 16 that is T <= 1
    tp.power_attention(q, k, v, log_g, chunk_size=16)
    assert calls[-1] == "chunked"


# Triton installations to compile with besides the installed one (os.pathsep-separated folders that
# hold a `triton` package): CI adds 3.6, the GPU machine's, which rejects code that later ones accept.
EXTRA_TRITONS = [p for p in os.environ.get("POWER_TEST_EXTRA_TRITONS", "").split(os.pathsep) if p]


@pytest.mark.parametrize("triton_path", [None] + EXTRA_TRITONS)
def test_kernels_compile_for_hopper(triton_path):
    """Every Triton kernel compiles for sm_90 at the shapes the GPU runs (tests/compile_sm90.py, in a
    subprocess without the interpreter): the interpreter runs code that the compiler may reject."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    if triton_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(triton_path), env.get("PYTHONPATH", "")])
    script = os.path.join(os.path.dirname(__file__), "compile_sm90.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("ok ") == 55, done.stdout
    if triton_path is not None:
        assert done.stdout.startswith(f"triton {os.path.abspath(triton_path)}"), done.stdout[:300]


def test_launch_options_take_the_tuned_set_only_where_it_was_measured(monkeypatch):
    """TUNED (deeper pipelines) applies at the measured blocks and head sizes with 16-bit operands
    only: fp32 tiles at four stages overflow shared memory on the H100, and other shapes were not
    measured."""
    import triton.language as tl

    monkeypatch.setattr(tc, "interpreting", lambda: False)
    monkeypatch.setattr(tc, "LAUNCH", {})
    assert tc._launch_opts("fwd", 128, 64, tl.bfloat16) == {"num_warps": 8, "num_stages": 4}
    assert tc._launch_opts("share", 128, 64, tl.float16) == {"num_warps": 4, "num_stages": 3}
    assert tc._launch_opts("fwd", 128, 64, tl.float32) == {"num_warps": 8, "num_stages": 2}
    assert tc._launch_opts("bwd_kv", 64, 64, tl.bfloat16) == {"num_warps": 4, "num_stages": 2}
    assert tc._launch_opts("bwd_kv", 128, 32, tl.bfloat16) == {"num_warps": 4, "num_stages": 3}
    assert tc._launch_opts("fwd", 64, 128, tl.bfloat16) == {"num_warps": 8, "num_stages": 3}
    assert tc._launch_opts("fwd", 64, 128, tl.float32) == {"num_warps": 8, "num_stages": 2}
    assert tc._launch_opts("fwd", 128, 16, tl.bfloat16) == {"num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(tc, "LAUNCH", tc.parse_launch("fwd=4:1"))
    assert tc._launch_opts("fwd", 128, 64, tl.bfloat16) == {"num_warps": 4, "num_stages": 1}
    assert tc.parse_launch("default") == {}
    for bad in ("fwd=4", "forward=4:1", "fwd=four:1"):
        with pytest.raises(ValueError, match="kernel=warps:stages"):
            tc.parse_launch(bad)


# ----------------------------------------------------------------------------------
# Custom ops: opcheck and torch.compile without graph breaks
# ----------------------------------------------------------------------------------


def test_opcheck_custom_ops():
    q, k, v, log_g = make_inputs(1, 16, 1, 1, 16, seed=8)
    s, z = random_state(1, 1, 16)
    args = leaf(q, k, v, log_g, s, z)
    for keep_states in (False, True):
        torch.library.opcheck(torch.ops.power_transformers.chunk_forward.default, (*args, 0.25, 1e-6, 16, keep_states),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.power_transformers.attention_forward.default, (*args[:4], 0.25, 1e-6),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.power_transformers.decode_.default,
                          (q[:, :1], k[:, :1], v[:, :1], log_g[:, :1], s.clone(), z.clone(), 0.25, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
    from power_transformers.kernels.reference import empty_decode_state

    tailed = empty_decode_state(1, 1, 16, 2, tail=4)._replace(s=s.clone(), z=z.clone())
    torch.library.opcheck(torch.ops.power_transformers.tail_decode_.default,
                          (q[:, :1], k[:, :1], v[:, :1], log_g[:, :1], *tailed, 0.25, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.power_transformers.fold_tail_.default, tuple(tailed),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    q, k, v, log_g = make_inputs(1, 16, 1, 1, 16, seed=12)
    ins = leaf(q, k, v, log_g)

    def f(q, k, v, log_g):
        y, state = tp.power_attention(q, k, v, log_g, chunk_size=16, output_final_state=True)
        return (y.float() ** 2).sum() + state[1].sum()

    compiled = torch.compile(f, fullgraph=True)  # inductor: the custom ops are opaque nodes, no graph break
    loss = compiled(*ins)
    loss.backward()
    ins_eager = leaf(q, k, v, log_g)
    f(*ins_eager).backward()
    assert math.isclose(loss.item(), f(q, k, v, log_g).item(), rel_tol=1e-6)
    for x, xe in zip(ins, ins_eager):
        assert rel(x.grad, xe.grad) < 1e-6

    # the decode step under compile still updates the state in place
    s, z = random_state(1, 1, 16)
    state, state_eager = (s.clone(), z.clone()), (s.clone(), z.clone())
    step = torch.compile(lambda *a: tp.power_attention_decode_(*a[:4], (a[4], a[5])), fullgraph=True)
    y = step(q[:, :1], k[:, :1], v[:, :1], log_g[:, :1], *state)
    y_eager = tp.power_attention_decode_(q[:, :1], k[:, :1], v[:, :1], log_g[:, :1], state_eager)
    assert rel(y, y_eager) < 1e-6 and rel(state[0], state_eager[0]) < 1e-6 and rel(state[1], state_eager[1]) < 1e-6


def _sass(*lines):
    """SASS text as nvdisasm -c prints it: one instruction a line at consecutive addresses."""
    out, address = [], 0x100
    for line in lines:
        if line.endswith(":"):
            out.append(line)
        else:
            out.append(f"        /*{address:04x}*/                   {line} ;")
            address += 0x10
    return "\n".join(out)


def test_sass_audit_finds_a_write_to_an_operand_read_by_a_product_in_flight():
    """tests/sass_audit.py (run on every kernel by compile_sm90.py): the loop head that builds the
    next operand in the registers a product of the step before still reads, with that product left
    in flight by the wait before the back edge, is found; waiting for every product first is clean;
    so is a write to registers no product in flight reads, and a write after the wait."""
    from sass_audit import operand_hazards

    def loop(keep, head="HMUL2.BF16_V2 R24, R40, R28.H0_H0"):
        return _sass(".L_x_0:", head, "WARPGROUP.ARRIVE",
                     "HGMMA.64x64x16.F32.BF16 R88, R24, gdesc[UR16].tnspB, R88, gsb0",
                     f"WARPGROUP.DEPBAR.LE gsb0, {keep:#x}", "@P6 BRA `(.L_x_0)", "EXIT")

    found = operand_hazards(loop(1))
    assert len(found) == 1 and found[0].startswith("loop 00100-00140: 00100 HMUL2.BF16_V2") and "R24" in found[0]
    assert operand_hazards(loop(0)) == []
    assert operand_hazards(loop(1, head="HMUL2.BF16_V2 R32, R40, R28.H0_H0")) == []  # R32: not A's R24-R27
    assert operand_hazards(loop(1, head="LDS.128 R20, [R2]")) == []  # writes R20-R23
    assert len(operand_hazards(loop(1, head="LDS.64 R26, [R2]"))) == 1  # writes R26-R27, read by the product
    assert len(operand_hazards(loop(1, head="IMAD.WIDE R22, R3, 0x4, R4"))) == 0  # writes R22-R23
    assert len(operand_hazards(loop(1, head="IMAD.WIDE R23, R3, 0x4, R4"))) == 1  # writes R23-R24
    assert len(operand_hazards(loop(1, head="HMMA.16816.F32.BF16 R20, R4, R8, RZ"))) == 0  # writes R20-R23
    assert len(operand_hazards(loop(1, head="HMMA.16816.F32.BF16 R22, R4, R8, RZ"))) == 1  # writes R22-R25
    # a predicate first, then the register written
    assert len(operand_hazards(loop(1, head="SHFL.BFLY PT, R25, R63, 0x10, 0x1f"))) == 1
    assert len(operand_hazards(loop(1, head="SHFL.BFLY PT, R32, R25, 0x10, 0x1f"))) == 0  # reads R25
    assert len(operand_hazards(loop(1, head="ATOMG.E.ADD.STRONG.GPU PT, R26, desc[UR6][R2.64], R5"))) == 1
    assert len(operand_hazards(loop(1, head="LOP3.LUT P0, R27, R2, 0x3, RZ, 0xc0, !PT"))) == 1
    assert len(operand_hazards(loop(1, head="LOP3.LUT R27, R2, 0x3, RZ, 0xc0, !PT"))) == 1  # no predicate
    assert len(operand_hazards(loop(1, head="ISETP.GE.AND P0, PT, R24, R3, PT"))) == 0  # writes predicates only
    straight = ["HGMMA.64x64x16.F32.BF16 R88, R24, gdesc[UR16].tnspB, R88, gsb0", "FMUL R27, R1, R2",
                "WARPGROUP.DEPBAR.LE gsb0, 0x0", "FMUL R26, R1, R2", "EXIT"]
    found = operand_hazards(_sass(*straight))
    assert len(found) == 1 and found[0].startswith("00110 FMUL R27")
