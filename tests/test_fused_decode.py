"""The fused one-token layer step (kernels/triton_decode_layer.py), under Triton's interpreter.

Its kernels against the modules they stand for, on fresh random inputs (every option: biases,
q/k norm, RoPE, gating, a gated MLP with norm and residual); the model decoding through them
against the same model through its modules; the cases that must keep the modules' forward.
In fp32 only: the interpreter's fp32 -> bf16 cast differs from the GPU's (by an ulp), so bf16
rounding is checked on the GPU (benchmarks/check_gpu.py).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from power_transformers import PowerCache, PowerConfig
from power_transformers.compat import CACHE_NAME
from power_transformers.modeling_power import PowerRMSNorm, PowerRotaryEmbedding

pytest.importorskip("triton")

from power_transformers.kernels import dispatch  # noqa: E402
from power_transformers.kernels import triton_decode_layer as tdl  # noqa: E402
from power_transformers.kernels import triton_power as tp  # noqa: E402


def rms_norm(x, weight, eps):
    norm = PowerRMSNorm(x.shape[-1], eps=eps)
    norm.weight.data = weight
    return norm(x)


def rope_tables(positions, batch, d, scale):
    """PowerRotaryEmbedding's cos, sin [B, 1, d] at positions [B] or [1] (then the same for every row),
    with inv_freq [d/2] and the attention scaling `scale` (in the model the rope type sets both)."""
    config = PowerConfig(head_dim=d, hidden_size=4 * d, num_attention_heads=4)
    rotary = PowerRotaryEmbedding(config)
    rotary.attention_scaling = scale
    cos, sin = rotary(torch.zeros(1), positions.expand(batch)[:, None])
    return cos, sin, rotary.inv_freq


@pytest.mark.parametrize("bias, qk_norm, rope, gated, b, hq, hk, d", [
    (False, False, True, True, 1, 4, 4, 32),
    (True, True, True, True, 3, 4, 2, 32),
    (True, False, False, False, 2, 2, 1, 64),
    (False, True, False, True, 5, 6, 3, 16),
    (False, False, "one position", False, 3, 2, 2, 16),
])
def test_qkvg_matches_the_modules(bias, qk_norm, rope, gated, b, hq, hk, d):
    """Against the modules (PowerRMSNorm, nn.Linear, the q/k norm, PowerRotaryEmbedding's tables and
    apply_rotary_pos_emb, logsigmoid). RoPE at positions up to 140k, with an attention scaling;
    "one position": one position for every row, as a static cache's step passes it."""
    g = torch.Generator().manual_seed(hash((bias, qk_norm, rope, gated, b)) % 2**31)
    k_dim = 96
    x = torch.randn(b, k_dim, generator=g)
    norm_w = torch.rand(k_dim, generator=g) + 0.5
    ws = [torch.randn(h * d, k_dim, generator=g) / k_dim**0.5 for h in (hq, hk, hk)]
    bs = [torch.randn(h * d, generator=g) for h in (hq, hk, hk)] if bias else [None] * 3
    wg, bg = (torch.randn(hk, k_dim, generator=g), torch.randn(hk, generator=g)) if gated else (None, None)
    qn, kn = (torch.rand(d, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5) if qk_norm else (None, None)
    positions = torch.randint(0, 140_000, (1 if rope == "one position" else b,), generator=g)
    scale = 0.5 + torch.rand(1, generator=g).item()
    cos, sin, inv_freq = rope_tables(positions, b, d, scale) if rope else (None, None, None)

    h = rms_norm(x, norm_w, 1e-6)
    q, k, v = (F.linear(h, w, bb).view(b, 1, -1, d) for w, bb in zip(ws, bs))
    if qk_norm:
        q, k = rms_norm(q, qn, 1e-5), rms_norm(k, kn, 1e-5)
    if rope:
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    got = tp.decode_qkvg(x, norm_w, 1e-6, *ws, wg, *bs, bg, qn, kn, 1e-5, positions[:, None] if rope else None,
                         inv_freq, scale, hq, hk)
    for want, have in zip((q, k, v), got[:3]):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    if gated:
        torch.testing.assert_close(got[3], F.logsigmoid(F.linear(h, wg, bg)).view(b, 1, hk), rtol=1e-5, atol=1e-5)
    else:
        assert got[3] is None


@pytest.mark.parametrize("norm, gated, bias, residual", [
    (False, False, False, True), (True, True, False, False), (True, True, True, False), (False, False, True, False),
])
def test_linear_matches_the_modules(norm, gated, bias, residual):
    g = torch.Generator().manual_seed(hash((norm, gated, bias, residual)) % 2**31)
    b, k_dim, n = 3, 80, 72
    x = torch.randn(b, k_dim, generator=g)
    norm_w = torch.rand(k_dim, generator=g) + 0.5
    w, w2 = (torch.randn(n, k_dim, generator=g) / k_dim**0.5 for _ in range(2))
    b1, b2 = (torch.randn(n, generator=g) for _ in range(2)) if bias else (None, None)
    res = torch.randn(b, n, generator=g)
    h = rms_norm(x, norm_w, 1e-6) if norm else x
    want = F.silu(F.linear(h, w, b1)) * F.linear(h, w2, b2) if gated else F.linear(h, w, b1)
    want = res + want if residual else want
    got = tp.decode_linear(x, w, b1, norm_weight=norm_w if norm else None, eps=1e-6,
                           w2=w2 if gated else None, bias2=b2 if gated else None, residual=res if residual else None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gated_linear_with_one_bias():
    """Either bias of a gated pair alone is added to its own product (each has its own flag)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 48, generator=g)
    w, w2 = (torch.randn(40, 48, generator=g) / 7 for _ in range(2))
    b = torch.randn(40, generator=g)
    torch.testing.assert_close(tp.decode_linear(x, w, b, w2=w2), F.silu(F.linear(x, w, b)) * F.linear(x, w2),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tp.decode_linear(x, w, w2=w2, bias2=b), F.silu(F.linear(x, w)) * F.linear(x, w2, b),
                               rtol=1e-5, atol=1e-5)


def test_dependent_launch_only_on_hopper_gpus_and_never_under_the_interpreter(monkeypatch):
    """Programmatic dependent launch (the decode kernels' launch option and PDL argument): on a CUDA
    device of compute capability 9 or later, off under the interpreter (it runs no inline assembly),
    on CPU and with POWER_PDL=0."""
    from power_transformers.kernels import triton_common

    monkeypatch.setattr(triton_common, "_hopper_or_later", lambda index: index == 1)  # cuda:1 a Hopper GPU
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("POWER_PDL", raising=False)
    hopper, older = torch.device("cuda", 1), torch.device("cuda", 0)
    assert triton_common.dependent_launch(hopper)
    assert not triton_common.dependent_launch(older) and not triton_common.dependent_launch(torch.device("cpu"))
    assert tdl._launch_options(1, True) == {"num_warps": 1, "launch_pdl": True}
    assert tdl._launch_options(8, False) == {"num_warps": tdl.NUM_WARPS}
    monkeypatch.setenv("POWER_PDL", "0")
    assert not triton_common.dependent_launch(hopper)
    monkeypatch.setenv("POWER_PDL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_common.dependent_launch(hopper) and tdl._launch_options(1, True) == {}


def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 32)
    w = torch.randn(16, 32)
    with pytest.raises(ValueError, match="do not match x"):
        tp.decode_linear(x, torch.randn(16, 30))
    with pytest.raises(ValueError, match="residual has shape"):
        tp.decode_linear(x, w, residual=torch.randn(2, 15))
    with pytest.raises(ValueError, match="batch <= 8"):
        tp.decode_linear(torch.randn(9, 32), w)
    with pytest.raises(ValueError, match="w is torch.float64"):
        tp.decode_linear(x, w.double())
    with pytest.raises(ValueError, match="head size 24"):
        tp.decode_qkvg(x, torch.ones(32), 1e-6, torch.randn(48, 32), torch.randn(48, 32), torch.randn(48, 32),
                       None, None, None, None, None, None, None, 1e-6, None, None, 1.0, 2, 2)
    with pytest.raises(ValueError, match="bias2 is the bias of w2"):
        tp.decode_linear(x, w, bias2=torch.randn(16))
    with pytest.raises(ValueError, match="must be contiguous"):
        tp.decode_linear(x, torch.randn(32, 16).t())
    with pytest.raises(ValueError, match="bq, bk and bv go together"):
        tp.decode_qkvg(x, torch.ones(32), 1e-6, torch.randn(32, 32), torch.randn(32, 32), torch.randn(32, 32),
                       None, torch.randn(32), None, None, None, None, None, 1e-6, None, None, 1.0, 2, 2)
    w3 = [torch.randn(32, 32) for _ in range(3)]
    with pytest.raises(ValueError, match="positions must be integers, one per row"):
        tp.decode_qkvg(x, torch.ones(32), 1e-6, *w3, None, None, None, None, None, None, None, 1e-6,
                       torch.zeros(3, dtype=torch.long), torch.ones(8), 1.0, 2, 2)
    with pytest.raises(ValueError, match="positions must be integers"):
        tp.decode_qkvg(x, torch.ones(32), 1e-6, *w3, None, None, None, None, None, None, None, 1e-6,
                       torch.zeros(2), torch.ones(8), 1.0, 2, 2)
    with pytest.raises(ValueError, match=r"RoPE needs inv_freq \[8\]"):
        tp.decode_qkvg(x, torch.ones(32), 1e-6, *w3, None, None, None, None, None, None, None, 1e-6,
                       torch.zeros(2, dtype=torch.long), torch.ones(16), 1.0, 2, 2)
    with pytest.raises(ValueError, match="wk has shape"):
        tp.decode_qkvg(x, torch.ones(32), 1e-6, torch.randn(32, 32), torch.randn(16, 32), torch.randn(32, 32),
                       None, None, None, None, None, None, None, 1e-6, None, None, 1.0, 2, 2)


def decode_logits(model, ids, steps):
    """Prefill ids[:, :-steps] through a PowerCache, then feed the rest one token at a time."""
    cache = PowerCache(model.config)
    with torch.no_grad():
        out = [model(ids[:, :-steps], use_cache=True, **{CACHE_NAME: cache}).logits[:, -1:]]
        for t in range(ids.shape[1] - steps, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], use_cache=True, **{CACHE_NAME: cache}).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(qk_norm=True, attention_bias=True, mlp_bias=True, use_gating=False),
    dict(layer_types=["linear_attention", "full_attention", "linear_attention"], num_key_value_heads=4),
])
def test_a_model_decodes_the_same_through_the_fused_step(overrides, monkeypatch):
    """The tiny model (head size 16) with the Triton backend: one-token steps across two folds of
    the tail, fused against the modules' forward. Also checks that the fused step ran. The
    attention itself runs through the reference in both (the interpreter takes seconds per tail
    step; test_triton_kernels checks the model's kernel attention), and the fused kernels run as
    few, large programs (the interpreter runs programs one by one)."""
    monkeypatch.setattr(dispatch, "_use_triton", lambda *args, **kwargs: False)
    monkeypatch.setattr(tdl, "TARGET_PROGRAMS", 1)
    model = tiny_model(attention_backend="triton", **overrides)
    ids = torch.randint(3, 97, (2, 11))
    calls = []
    real = tp.decode_qkvg
    monkeypatch.setattr(tp, "decode_qkvg", lambda *a: calls.append(1) or real(*a))
    fused = decode_logits(model, ids, 9)
    power_layers = sum(kind == "linear_attention" for kind in model.config.layer_types)
    assert len(calls) == 9 * power_layers
    model.config.fused_decode_step = False
    calls.clear()
    plain = decode_logits(model, ids, 9)
    assert not calls
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


def test_padded_positions_in_a_fused_step(monkeypatch):
    """Left padding in the prompt and a padded position in a one-token step (a 2D mask over past +
    new tokens): the fused step masks its keys, values and gates as the modules' forward does."""
    monkeypatch.setattr(dispatch, "_use_triton", lambda *args, **kwargs: False)
    monkeypatch.setattr(tdl, "TARGET_PROGRAMS", 1)
    model = tiny_model(attention_backend="triton")
    ids = torch.randint(3, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0  # row 0 left-padded
    mask[1, 7] = 0  # row 1: a padded position in a one-token step

    def run(fused):
        model.config.fused_decode_step = fused
        cache = PowerCache(model.config)
        with torch.no_grad():
            out = [model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True, **{CACHE_NAME: cache}).logits]
            for t in range(5, 10):
                out.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], use_cache=True,
                                 **{CACHE_NAME: cache}).logits)
        return torch.cat(out, 1)

    calls = []
    real = tp.decode_qkvg
    monkeypatch.setattr(tp, "decode_qkvg", lambda *a: calls.append(1) or real(*a))
    fused = run(True)
    assert len(calls) == 5 * model.config.num_hidden_layers
    torch.testing.assert_close(fused, run(False), rtol=1e-4, atol=1e-4)


def test_the_modules_forward_where_the_kernels_cannot_read_the_weights():
    """A wrapped linear (as a PEFT adapter wraps it), gradients on, a larger batch, a LayerNorm
    model, the reference backend: each step keeps the modules' forward."""
    model = tiny_model(attention_backend="triton")
    layer = model.model.layers[0]
    one = torch.randn(1, 1, 64)
    with torch.no_grad():
        assert layer._fused_decode_kernels(one) is not None
        assert layer._fused_decode_kernels(torch.randn(1, 2, 64)) is None  # two tokens
        assert layer._fused_decode_kernels(torch.randn(9, 1, 64)) is None  # batch above MAX_BATCH
        assert layer._fused_decode_kernels(one.double()) is None  # weights in another dtype
    assert layer._fused_decode_kernels(one) is None  # gradients on

    class Wrapped(torch.nn.Linear):
        pass

    with torch.no_grad():
        weight = layer.mlp.down_proj.weight
        layer.mlp.down_proj.weight = torch.nn.Parameter(weight.t().contiguous().t())  # the same numbers, strided
        assert layer._fused_decode_kernels(one) is None
        layer.mlp.down_proj.weight = weight
        assert layer._fused_decode_kernels(one) is not None

    wrapped = Wrapped(64, 64, bias=False)
    wrapped.weight = layer.self_attn.q_proj.weight
    layer.self_attn.q_proj = wrapped
    with torch.no_grad():
        assert layer._fused_decode_kernels(one) is None
        gpt2 = tiny_model(attention_backend="triton", norm_type="layer_norm", mlp_type="plain", hidden_act="gelu")
        assert gpt2.model.layers[0]._fused_decode_kernels(one) is None
        ref = tiny_model(attention_backend="reference")
        assert ref.model.layers[0]._fused_decode_kernels(one) is None


def test_compiled_decode_step_has_no_graph_break():
    """torch.compile(fullgraph=True) of a fused one-token step with a static cache: the kernels are
    opaque custom ops (inductor, under the interpreter)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_model(attention_backend="triton")
    ids = torch.randint(3, 97, (1, 6))
    cache = PowerCache(model.config, max_cache_len=16)
    counter = CompileCounterWithBackend("inductor")
    with torch.no_grad():
        model(ids[:, :5], use_cache=True, **{CACHE_NAME: cache})
        step = torch.compile(lambda t: model(t, use_cache=True, **{CACHE_NAME: cache}).logits, fullgraph=True,
                             backend=counter)
        compiled = step(ids[:, 5:6])
    ops = {str(node.target) for graph in counter.graphs for node in graph.graph.nodes}
    assert {"power_transformers.decode_qkvg.default", "power_transformers.decode_linear.default"} <= ops, ops
    plain = decode_logits(model, ids, 1)[:, -1:]
    torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-4)
