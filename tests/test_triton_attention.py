"""The attention-form Triton kernels (triton_attention) against the PyTorch reference (fp64),
under Triton's CPU interpreter.

Tiny shapes, as in test_triton_kernels.py: the interpreter's cost is per element and per step.
Under the interpreter the kernels use 16 x 16 blocks, so T = 37 and 70 span several blocks and
end in a ragged one.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from power_transformers.kernels import reference  # noqa: E402
from power_transformers.kernels import triton_attention as ta  # noqa: E402

EPS = 1e-6


def rel(a, b):
    """||a - b|| / ||b|| in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(b, t, hq, hk, d, *, gates="mild", dtype=torch.float32, seed=0):
    """q, k, v and log-gates: "mild" (log_g in about [-1, 0]), "strong" (about -3), "reset" (a
    first token of log_g = -1e4, then mild: every running sum is ~ -1e4, which a plain fp32
    running sum would leave with an error ~1e-3 in each b_t - b_j) or None (no gating)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g).to(dtype)
    k = torch.randn(b, t, hk, d, generator=g).to(dtype)
    v = torch.randn(b, t, hk, d, generator=g).to(dtype)
    if gates is None:
        return q, k, v, None
    log_g = F.logsigmoid(torch.randn(b, t, hk, generator=g) + 2.0)
    if gates == "strong":
        log_g = -3.0 + 0.5 * torch.randn(b, t, hk, generator=g)
    elif gates == "reset":
        log_g[:, 0] = -1e4
    return q, k, v, log_g


def reference_grads(q, k, v, log_g, dy, scale):
    """y and (dq, dk, dv, dlog_g) of the reference in fp64, by torch.autograd."""
    ins = [None if x is None else x.detach().double().requires_grad_() for x in (q, k, v, log_g)]
    y = reference.power_attention_quadratic(*ins, degree=2, scale=scale, eps=EPS)
    (y * dy.double()).sum().backward()
    return y, [None if x is None else x.grad for x in ins]


def check(q, k, v, log_g, *, tol_y=1e-5, tol_grad=1e-4, seed=0):
    scale = q.shape[-1] ** -0.5
    y, den = ta.attention_forward(q, k, v, log_g, scale, EPS)
    assert y.dtype == v.dtype and y.shape == q.shape and den.dtype == torch.float32
    # dy not contiguous (as autograd may hand it over; the reference's own output is a permuted view)
    b, t, hq, d = y.shape
    dy = torch.randn(b, hq, t, d, generator=torch.Generator().manual_seed(seed + 100)).to(y.dtype).transpose(1, 2)
    y_ref, grads_ref = reference_grads(q, k, v, log_g, dy, scale)
    assert rel(y, y_ref) < tol_y, rel(y, y_ref)

    grads = ta.attention_backward(q, k, v, log_g, y, den, dy, scale, EPS)
    assert (grads[3] is None) == (log_g is None)
    for name, x, gx, gx_ref in zip(["dq", "dk", "dv", "dlog_g"], (q, k, v, log_g), grads, grads_ref):
        if x is None:
            continue
        assert gx.shape == x.shape and gx.dtype == (torch.float32 if name == "dlog_g" else x.dtype), name
        assert rel(gx, gx_ref) < tol_grad, (name, rel(gx, gx_ref))


@pytest.mark.parametrize(
    "b,t,hq,hk,d,gates",
    [
        (2, 37, 2, 1, 32, "mild"),  # GQA (groups of 2), ragged T, two batch rows
        (1, 70, 4, 2, 16, "mild"),  # groups of 2 over 2 kv heads, ragged T over 5 blocks
        (1, 37, 2, 2, 32, None),  # no gating
        (1, 70, 2, 1, 16, "strong"),  # log_g ~ -3: decays ~0 a few tokens back
        (1, 70, 2, 1, 16, "reset"),  # |b| ~ 1e4: the fp64 reference point keeps b_t - b_j exact
        (1, 5, 1, 1, 16, "mild"),  # T shorter than one block
    ],
)
def test_forward_and_gradients(b, t, hq, hk, d, gates):
    check(*make_inputs(b, t, hq, hk, d, gates=gates, seed=t + hq), seed=t)


def test_unequal_blocks(monkeypatch):
    """Outer blocks walking smaller inner blocks (several diagonal tiles per program), and inner
    blocks that differ between the two backward kernels (16 keys for bwd_q, 32 queries for bwd_kv),
    so that each takes the gate decays within blocks of its own size, as GPU configurations do
    (fp32 at d = 128: 128 queries over 32-key blocks, 128 keys over 16-query blocks)."""

    def config(kernel, head_dim, dtype):
        return (32, 16, {}) if kernel in ("fwd", "bwd_q") else (32, 64, {})

    monkeypatch.setattr(ta, "_config", config)
    check(*make_inputs(1, 75, 2, 1, 16, seed=4), seed=4)


class _Attention(torch.autograd.Function):
    """The forward and backward launchers as one autograd function (how a model would use them)."""

    @staticmethod
    def forward(ctx, q, k, v, log_g, scale):
        y, den = ta.attention_forward(q, k, v, log_g, scale, EPS)
        ctx.save_for_backward(q, k, v, log_g, y, den)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, log_g, y, den = ctx.saved_tensors
        dq, dk, dv, dlog_g = ta.attention_backward(q, k, v, log_g, y, den, dy, ctx.scale, EPS)
        return dq, dk, dv, dlog_g, None


def test_backward_equals_autograd_on_the_reference():
    """A loss that is not linear in y, through several blocks: the launchers' gradients are
    torch.autograd's through the reference."""
    q, k, v, log_g = make_inputs(2, 50, 2, 1, 16, seed=21)
    ins = [x.detach().clone().requires_grad_() for x in (q, k, v, log_g)]
    ins64 = [x.detach().double().requires_grad_() for x in (q, k, v, log_g)]
    scale = 0.3
    y = _Attention.apply(*ins, scale)
    y_ref = reference.power_attention_quadratic(*ins64, degree=2, scale=scale, eps=EPS)
    (y**2).sum().backward()
    (y_ref**2).sum().backward()
    assert rel(y, y_ref) < 1e-5
    for name, x, x64 in zip(["q", "k", "v", "log_g"], ins, ins64):
        assert rel(x.grad, x64.grad) < 1e-4, (name, rel(x.grad, x64.grad))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_inputs(dtype, tol):
    q, k, v, log_g = make_inputs(1, 40, 2, 1, 32, dtype=dtype, seed=11)
    check(q, k, v, log_g, tol_y=tol, tol_grad=tol, seed=11)


def test_unsupported_head_size():
    x = torch.randn(1, 4, 1, 48)
    with pytest.raises(ValueError, match="head size 48"):
        ta.attention_forward(x, x, x, None, 0.1, EPS)


@pytest.mark.parametrize("t,key_block,query_block", [(70, 16, 16), (37, 32, 16), (300, 64, None)])
def test_gate_sums(t, key_block, query_block):
    """_gate_sums_kernel against torch: the fp64 running sums, each token's decay to the last row of
    its key block and from the first row of its query block (a ragged last block ends at the last
    real token). The attention tests above pass through these only as products with other factors."""
    log_g = F.logsigmoid(torch.randn(2, t, 3, generator=torch.Generator().manual_seed(t)) + 1.0)
    bsum, key_within, query_within = ta._gate_sums(log_g, key_block, query_block)
    b = log_g.double().transpose(1, 2).cumsum(-1)
    assert bsum.dtype == torch.float64 and torch.allclose(bsum, b, rtol=1e-12, atol=1e-12)
    tok = torch.arange(t)
    end = torch.clamp((tok // key_block + 1) * key_block - 1, max=t - 1)
    assert torch.allclose(key_within, torch.exp(b[..., end] - b).float(), rtol=1e-5, atol=0)  # fp32 exp
    if query_block is None:
        assert query_within is None
    else:
        start = tok // query_block * query_block
        assert torch.allclose(query_within, torch.exp(b - b[..., start]).float(), rtol=1e-5, atol=0)
    assert ta._gate_sums(None, key_block, query_block) == (None, None, None)


def test_gate_grad():
    """_gate_grad_kernel against torch: dlog_g_u = sum_{t >= u} (key side + the group's query sides),
    over several of its blocks (walked from the end) and a group of two."""
    g = torch.Generator().manual_seed(5)
    t = 2 * ta.GATE_SUMS_BLOCK + 37
    dbq, dbk = torch.randn(2, 4, t, generator=g), torch.randn(2, 2, t, generator=g)
    db = dbk.double() + dbq.view(2, 2, 2, t).sum(2, dtype=torch.float64)
    expected = db.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)
    dlog_g = ta._gate_grad(dbq, dbk)
    assert dlog_g.shape == (2, t, 2) and dlog_g.dtype == torch.float32
    assert torch.allclose(dlog_g.double(), expected, rtol=1e-6, atol=1e-6)
