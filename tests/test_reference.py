"""The PyTorch reference: the embedding identity, the three forms against each other, gradients, stability."""

import math

import pytest
import torch

from power_transformers.kernels import (
    empty_decode_state,
    empty_state,
    fold_tail_,
    expanded_dim,
    power_attention,
    power_attention_chunked,
    power_attention_decode_,
    power_attention_quadratic,
    power_attention_recurrent,
    symmetric_power_embedding,
)


def make_inputs(b=2, t=37, hq=4, hk=2, d=8, gating=True, dtype=torch.float64, strength=2.0, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    q = torch.randn(b, t, hq, d, generator=g, dtype=dtype)
    k = torch.randn(b, t, hk, d, generator=g, dtype=dtype)
    v = torch.randn(b, t, hk, d, generator=g, dtype=dtype)
    log_g = torch.nn.functional.logsigmoid(torch.randn(b, t, hk, generator=g, dtype=dtype) + strength) if gating else None
    return q, k, v, log_g


def assert_rel(got, want, tol=1e-8):
    """Relative error in norm (per-element checks are flaky where (q.k)^p ~ eps amplifies rounding)."""
    error = ((got - want).norm() / want.norm()).item()
    assert error < tol, f"relative error {error:.3g} >= {tol}"


@pytest.mark.parametrize("degree", [2, 4])
def test_embedding_inner_product_is_power_of_dot(degree):
    x, y = torch.randn(50, 7, dtype=torch.float64), torch.randn(50, 7, dtype=torch.float64)
    phi_x, phi_y = symmetric_power_embedding(x, degree), symmetric_power_embedding(y, degree)
    assert phi_x.shape == (50, expanded_dim(7, degree)) == (50, math.comb(7 + degree - 1, degree))
    torch.testing.assert_close((phi_x * phi_y).sum(-1), (x * y).sum(-1) ** degree, rtol=1e-10, atol=1e-10)


def test_expanded_dim_of_design_card():
    assert expanded_dim(64, 2) == 2080


@pytest.mark.parametrize("degree", [2, 4])
@pytest.mark.parametrize("gating", [True, False])
@pytest.mark.parametrize("hq,hk", [(4, 2), (3, 3)])
def test_three_forms_agree(degree, gating, hq, hk):
    q, k, v, log_g = make_inputs(hq=hq, hk=hk, gating=gating, t=29)  # 29: not a multiple of the chunk
    y_attn = power_attention_quadratic(q, k, v, log_g, degree=degree)
    y_rec, (s_rec, z_rec) = power_attention_recurrent(q, k, v, log_g, degree=degree)
    y_chunk, (s_chunk, z_chunk) = power_attention_chunked(q, k, v, log_g, degree=degree, chunk_size=8, output_final_state=True)
    assert_rel(y_rec, y_attn)
    assert_rel(y_chunk, y_attn)
    assert_rel(s_chunk, s_rec)
    assert_rel(z_chunk, z_rec)


def test_output_is_the_normalised_weighted_sum():
    """A direct check of the formula on a tiny case, independent of every form's code path."""
    q, k, v, log_g = make_inputs(b=1, t=5, hq=1, hk=1, d=3)
    s, eps = 3**-0.5, 1e-6
    cum = log_g[0, :, 0].cumsum(0)
    expected = torch.zeros(5, 3, dtype=torch.float64)
    for i in range(5):
        a = torch.stack([(s * q[0, i, 0] @ k[0, j, 0]) ** 2 * torch.exp(cum[i] - cum[j]) for j in range(i + 1)])
        expected[i] = (a[:, None] * v[0, : i + 1, 0]).sum(0) / (a.sum() + eps)
    torch.testing.assert_close(power_attention_quadratic(q, k, v, log_g)[0, :, 0], expected, rtol=1e-10, atol=1e-12)


def test_chunked_from_a_state_continues_the_sequence():
    q, k, v, log_g = make_inputs(t=40)
    full, _ = power_attention_chunked(q, k, v, log_g, chunk_size=16)
    first, state = power_attention_chunked(q[:, :23], k[:, :23], v[:, :23], log_g[:, :23], chunk_size=16, output_final_state=True)
    second, _ = power_attention_chunked(q[:, 23:], k[:, 23:], v[:, 23:], log_g[:, 23:], chunk_size=16, initial_state=state)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-9, atol=1e-9)


def test_no_chunk_size_runs_the_reference_default_chunk():
    """chunk_size=None (PowerConfig's default, through the dispatch as the model calls it on a CPU)
    runs reference.DEFAULT_CHUNK."""
    from power_transformers.kernels import reference

    q, k, v, log_g = make_inputs(t=150, seed=3)
    y, state = power_attention(q, k, v, log_g, backend="reference", output_final_state=True)
    y_default, state_default = power_attention_chunked(q, k, v, log_g, chunk_size=reference.DEFAULT_CHUNK,
                                                       output_final_state=True)
    y_other, _ = power_attention_chunked(q, k, v, log_g, chunk_size=32, output_final_state=True)
    assert torch.equal(y, y_default) and torch.equal(state[0], state_default[0]) and torch.equal(state[1], state_default[1])
    assert not torch.equal(y, y_other)  # another chunk rounds otherwise, so the first check can fail


def test_decode_updates_state_in_place():
    q, k, v, log_g = make_inputs(t=12)
    state = empty_state(2, 2, 8, 2, dtype=torch.float64)
    pointers = [x.data_ptr() for x in state]
    ys = [power_attention_decode_(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], log_g[:, i : i + 1], state) for i in range(12)]
    assert [x.data_ptr() for x in state] == pointers
    torch.testing.assert_close(torch.cat(ys, 1), power_attention_quadratic(q, k, v, log_g), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("degree, hq, gating, steps", [(2, 4, True, 22), (4, 2, True, 22), (2, 2, False, 22),
                                                     (2, 4, True, 20)])
def test_tail_decode_equals_decode_across_folds(degree, hq, gating, steps):
    """One token at a time through a DecodeState (tail of 4): the outputs of folding every token
    (Form 2) over five folds; a flush leaves (S, z) equal to Form 2's state and the tails empty.
    20 steps: the last step fills the tail and folds it (length 4, folded), so the flush must not
    fold it again."""
    q, k, v, log_g = make_inputs(t=steps, hq=hq, gating=gating)
    state, tailed = empty_state(2, 2, 8, degree, dtype=torch.float64), empty_decode_state(2, 2, 8, degree, dtype=torch.float64)
    pointers = [x.data_ptr() for x in tailed]
    for i in range(steps):
        sl = slice(i, i + 1)
        y = power_attention_decode_(q[:, sl], k[:, sl], v[:, sl], None if log_g is None else log_g[:, sl], state, degree=degree)
        y_tail = power_attention_decode_(q[:, sl], k[:, sl], v[:, sl], None if log_g is None else log_g[:, sl], tailed,
                                         degree=degree)
        # 1e-8, not tighter: at degree 4, (q.k)^4 over a small normaliser amplifies fp64 rounding
        # (one CI run of fresh inputs reached 8.7e-10); a wrong decay or a lost token is ~1e-2
        assert_rel(y_tail, y, 1e-8)
    assert tailed.tail_len.eq((steps - 1) % 4 + 1).all()  # a full tail (4) is a folded one
    fold_tail_(tailed, degree=degree)
    assert tailed.tail_len.eq(0).all() and [x.data_ptr() for x in tailed] == pointers
    assert_rel(tailed.s, state[0], 1e-12)
    assert_rel(tailed.z, state[1], 1e-12)


def test_several_tokens_through_a_decode_state_fold_its_tail_first():
    q, k, v, log_g = make_inputs(t=9)
    tailed = empty_decode_state(2, 2, 8, 2, dtype=torch.float64)
    ys = [power_attention_decode_(q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], log_g[:, i : i + 1], tailed) for i in range(6)]
    ys.append(power_attention_decode_(q[:, 6:], k[:, 6:], v[:, 6:], log_g[:, 6:], tailed))
    assert tailed.tail_len.eq(0).all()
    torch.testing.assert_close(torch.cat(ys, 1), power_attention_quadratic(q, k, v, log_g), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gating", [True, False])
def test_chunked_gradients_equal_attention_form(gating):
    inputs = [x.requires_grad_() if x is not None else None for x in make_inputs(t=21, gating=gating)]
    weights = torch.randn(2, 21, 4, 8, dtype=torch.float64)
    (power_attention_quadratic(*inputs) * weights).sum().backward()
    expected = [x.grad.clone() for x in inputs if x is not None]
    for x in inputs:
        if x is not None:
            x.grad = None
    (power_attention_chunked(*inputs, chunk_size=6)[0] * weights).sum().backward()
    for got, want in zip([x.grad for x in inputs if x is not None], expected):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_long_context_with_strong_gates_stays_finite():
    """100k tokens, gates near 0 (log-gates ~ -5): G reaches -5e5; no exp(G_i) * exp(-G_j) anywhere."""
    q, k, v, _ = make_inputs(b=1, t=100_000, hq=2, hk=1, d=4, dtype=torch.float32, seed=0)
    log_g = torch.full((1, 100_000, 1), -5.0)
    q, k = q * 3, k * 3  # large scores too
    y, (s, z) = power_attention_chunked(q, k, v, log_g, chunk_size=256, output_final_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(s).all() and torch.isfinite(z).all()
    # exp(-5 * 50) is far below fp32 resolution: the last outputs depend only on the last 50 tokens.
    y_tail = power_attention_quadratic(q[:, -50:], k[:, -50:], v[:, -50:], log_g[:, -50:])
    torch.testing.assert_close(y[:, -10:], y_tail[:, -10:], rtol=1e-4, atol=1e-4)


def test_bf16_inputs_give_bf16_output_and_fp32_state():
    q, k, v, log_g = (x.to(torch.bfloat16) for x in make_inputs(dtype=torch.float32, t=17))
    y, (s, z) = power_attention(q, k, v, log_g.float(), chunk_size=8, output_final_state=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32 and z.dtype == torch.float32
    ref = power_attention_quadratic(*(x.double() for x in (q, k, v, log_g)))
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(degree=3), "even"),
        (dict(degree=0), "even"),
        (dict(k_heads=3), "multiple"),
        (dict(v_len=5), "same shape"),
        (dict(gate_shape=True), "log_g"),
    ],
)
def test_bad_input_names_the_problem(change, message):
    q, k, v, log_g = make_inputs(t=8, hq=4, hk=2)
    if "k_heads" in change:
        k, v, log_g = k[:, :, :1].repeat(1, 1, 3, 1), v[:, :, :1].repeat(1, 1, 3, 1), log_g[:, :, :1].repeat(1, 1, 3)
    if "v_len" in change:
        v = v[:, :5]
    if "gate_shape" in change:
        log_g = log_g[..., :1]
    with pytest.raises(ValueError, match=message):
        power_attention(q, k, v, log_g, degree=change.get("degree", 2))
