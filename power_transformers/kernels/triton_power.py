"""Triton power attention: the entry points `dispatch` uses, registered as torch custom ops.

    power_attention(q, k, v, log_g, *, degree, scale, eps, chunk_size, initial_state,
                    output_final_state) -> (y, state | None)       autograd: q, k, v, log_g, state
    power_attention_decode_(q, k, v, log_g, state, *, degree, scale, eps) -> y
                    updates state = (S, z) in place (same storage: static caches, CUDA graphs);
                    with a reference.DecodeState, one token reads (S, z) and goes into the tail
    fold_tail(state)   folds a DecodeState's pending tail into (S, z), in place
    decode_qkvg(...), decode_linear(...)
                    the rest of a power layer's one-token step (triton_decode_layer): norm,
                    projections, RoPE, gate; o_proj, MLP and the residuals

Shapes as in reference.py: q [B, T, Hq, d], k/v [B, T, Hk, d], log_g [B, T, Hk] or None,
S [B, Hk, D, d] fp32, z [B, Hk, D] fp32, D = d (d + 1) / 2, in the reference's symmetric order
(so states from either implementation are interchangeable).

Two forms for sequences: the chunked kernels (triton_chunk: any T, states in and out) and, for a
short sequence without a state in or out, the attention-form kernels (triton_attention), which
cost less there (ATTENTION_FORM_MAX_T).

What the kernels take: degree 2; head sizes 16, 32, 64, 128; fp16, bf16 or fp32 q/k/v of one
dtype (fp32 accumulation, fp32 states; fp32 products run as tf32 on the GPU); any T; GQA; gating
on or off (log-gates <= 0, gates in (0, 1], as the model's logsigmoid gives); CUDA tensors (or any
device under TRITON_INTERPRET=1). Degree 4 is not there: its
state (D = C(d+3, 4), 766,480 rows at d = 64) does not fit the on-chip scheme, so the
reference serves it. `check_supported` names what is outside this set. dispatch.py turns that
into an error under backend="triton", and into a one-time warning plus the reference under
"auto".

The kernels are wrapped as `torch.library.custom_op`s with fake (meta) implementations and a
registered autograd formula, so `torch.compile(fullgraph=True)` sees one opaque op per call and
no graph break. Nothing here keeps per-process state: device and stream come from the inputs.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor

from .reference import DecodeState, State, expanded_dim
from .triton_attention import attention_backward, attention_forward
from .triton_chunk import chunk_backward, chunk_forward, default_chunk, kernel_tiles
from .triton_common import SUPPORTED_DEGREES, SUPPORTED_HEAD_DIMS, dot_dtype, interpreting, operand_torch_dtype
from .triton_decode import decode_, fold_tail_, tail_decode_
from .triton_decode_layer import MAX_BATCH as DECODE_LAYER_MAX_BATCH
from .triton_decode_layer import linear, project_qkvg

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------
# What the kernels take
# ----------------------------------------------------------------------------------


def _problem(q: Tensor, degree: int, k=None, v=None, log_g=None, state=None) -> Optional[str]:
    """Why the kernels cannot take these inputs, or None if they can."""
    if degree not in SUPPORTED_DEGREES:
        return f"degree {degree!r} is not supported by the Triton kernels (supported: {SUPPORTED_DEGREES})"
    if q.dim() != 4:
        return f"q must be [batch, time, heads, head_dim], got shape {tuple(q.shape)}"
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        return f"head size {d} is not supported by the Triton kernels (supported: {SUPPORTED_HEAD_DIMS})"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported by the Triton kernels (supported: fp16, bf16, fp32)"
    if not q.is_cuda and not interpreting():
        return f"the Triton kernels need CUDA tensors (got device {q.device}; on CPU set TRITON_INTERPRET=1)"
    for name, x in (("k", k), ("v", v)):
        if x is None:
            continue
        if x.dim() != 4 or x.shape[0] != q.shape[0] or x.shape[1] != q.shape[1] or x.shape[3] != d:
            return f"{name} {tuple(x.shape)} does not match q {tuple(q.shape)} in batch, time or head size"
        if x.dtype != q.dtype:
            return f"{name} has dtype {x.dtype} but q has {q.dtype}: the Triton kernels need one dtype"
        if x.device != q.device:
            return f"{name} is on {x.device} but q on {q.device}"
    if k is not None:
        if v is not None and v.shape != k.shape:
            return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape"
        if q.shape[2] % k.shape[2]:
            return f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})"
        if log_g is not None and tuple(log_g.shape) != tuple(k.shape[:3]):
            return f"log_g must be [batch, time, kv_heads] = {tuple(k.shape[:3])}, got {tuple(log_g.shape)}"
        if state is not None:
            s, z = state
            want = (k.shape[0], k.shape[2], expanded_dim(d, degree))
            if tuple(s.shape) != want + (d,) or tuple(z.shape) != want:
                return f"state shapes {tuple(s.shape)}, {tuple(z.shape)} do not match {want + (d,)}, {want}"
            if s.dtype != torch.float32 or z.dtype != torch.float32:
                return f"the state must be fp32, got {s.dtype} and {z.dtype}"
    return None


def is_supported(q: Tensor, degree: int, k=None, v=None, log_g=None, state=None) -> bool:
    """True when the Triton kernels can run on these inputs."""
    return _problem(q, degree, k, v, log_g, state) is None


def check_supported(q: Tensor, degree: int, k=None, v=None, log_g=None, state=None) -> None:
    """Raise ValueError naming the problem when the Triton kernels cannot run on these inputs."""
    problem = _problem(q, degree, k, v, log_g, state)
    if problem is not None:
        raise ValueError(problem)


# ----------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------


def _on_device_of(x: Tensor):
    """Launch on the input's GPU, not the current one (a model spread over GPUs in one process)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("power_transformers::chunk_forward", mutates_args=())
def _chunk_forward_op(
    q: Tensor, k: Tensor, v: Tensor, log_g: Optional[Tensor], initial_s: Optional[Tensor], initial_z: Optional[Tensor],
    scale: float, eps: float, chunk_size: int, keep_states: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y [B,T,Hq,d], den [B,T,Hq] fp32, S_final [B,Hk,D,d] fp32, z_final [B,Hk,D] fp32, and the chunk
    states R [B,Hk,N+1,D,d], Z [B,Hk,N+1,D] fp32 for the backward if keep_states, else empty)."""
    with _on_device_of(q):
        y, den, s_final, z_final, kept = chunk_forward(
            q, k, v, log_g, initial_s, initial_z, scale, eps, chunk_size, keep_states)
    if kept is None:
        kept = (q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32))
    return y, den, s_final, z_final, *kept


@_chunk_forward_op.register_fake
def _(q, k, v, log_g, initial_s, initial_z, scale, eps, chunk_size, keep_states):
    b, t, hq, d = q.shape
    hk, dim = k.shape[2], expanded_dim(d, 2)
    f32 = dict(dtype=torch.float32, device=q.device)
    if keep_states:
        slots = -(-t // kernel_tiles(chunk_size, d)[0]) + 1
        kept = (q.new_empty(b, hk, slots, dim, d, dtype=operand_torch_dtype(dot_dtype(q.dtype))),
                q.new_empty(b, hk, slots, dim, **f32))
    else:
        kept = (q.new_empty(0, **f32), q.new_empty(0, **f32))
    return (q.new_empty(b, t, hq, d, dtype=v.dtype), q.new_empty(b, t, hq, **f32),
            q.new_empty(b, hk, dim, d, **f32), q.new_empty(b, hk, dim, **f32), *kept)


@torch.library.custom_op("power_transformers::chunk_backward", mutates_args=())
def _chunk_backward_op(
    q: Tensor, k: Tensor, v: Tensor, log_g: Optional[Tensor], initial_s: Optional[Tensor], initial_z: Optional[Tensor],
    y: Tensor, den: Tensor, dy: Tensor, ds_final: Optional[Tensor], dz_final: Optional[Tensor],
    states: Optional[Tensor], z_states: Optional[Tensor], scale: float, eps: float, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dlog_g [B,T,Hk] fp32 (empty without gates), dS0, dz0 (empty without an initial state));
    states / z_states: the forward's kept chunk states, or None to recompute them."""
    with _on_device_of(q):
        dq, dk, dv, dlog_g, ds0, dz0 = chunk_backward(
            q, k, v, log_g, initial_s, initial_z, y, den, dy, ds_final, dz_final, scale, eps, chunk_size,
            None if states is None else (states, z_states))
    if dlog_g is None:
        dlog_g = q.new_empty(0, dtype=torch.float32)
    else:
        dlog_g = dlog_g.to(log_g.dtype).contiguous()
    if initial_s is None:
        ds0, dz0 = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    else:
        ds0, dz0 = ds0.to(initial_s.dtype).contiguous(), dz0.to(initial_z.dtype).contiguous()
    return dq, dk, dv, dlog_g, ds0, dz0


@_chunk_backward_op.register_fake
def _(q, k, v, log_g, initial_s, initial_z, y, den, dy, ds_final, dz_final, states, z_states, scale, eps, chunk_size):
    empty = q.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(log_g) if log_g is not None else empty,
            torch.empty_like(initial_s) if initial_s is not None else empty,
            torch.empty_like(initial_z) if initial_z is not None else empty.clone())


def _setup_context(ctx, inputs, output):
    q, k, v, log_g, initial_s, initial_z, scale, eps, chunk_size, keep_states = inputs
    y, den, _, _, states, z_states = output
    if not keep_states:
        states = z_states = None
    ctx.save_for_backward(q, k, v, log_g, initial_s, initial_z, y, den, states, z_states)
    ctx.args = (scale, eps, chunk_size)


def _backward(ctx, dy, dden, ds_final, dz_final, dstates_unused, dz_states_unused):
    q, k, v, log_g, initial_s, initial_z, y, den, states, z_states = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    dq, dk, dv, dlog_g, ds0, dz0 = _chunk_backward_op(
        q, k, v, log_g, initial_s, initial_z, y, den, dy.contiguous(),
        None if ds_final is None else ds_final.contiguous(), None if dz_final is None else dz_final.contiguous(),
        states, z_states, *ctx.args)
    return (dq, dk, dv, dlog_g if log_g is not None else None,
            ds0 if initial_s is not None else None, dz0 if initial_z is not None else None, None, None, None, None)


_chunk_forward_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("power_transformers::attention_forward", mutates_args=())
def _attention_forward_op(q: Tensor, k: Tensor, v: Tensor, log_g: Optional[Tensor], scale: float, eps: float
                          ) -> tuple[Tensor, Tensor]:
    """The attention form, no state: (y [B,T,Hq,d], den [B,T,Hq] fp32)."""
    with _on_device_of(q):
        return attention_forward(q, k, v, log_g, scale, eps)


@_attention_forward_op.register_fake
def _(q, k, v, log_g, scale, eps):
    b, t, hq, _ = q.shape
    return q.new_empty(q.shape, dtype=v.dtype), q.new_empty(b, t, hq, dtype=torch.float32)


@torch.library.custom_op("power_transformers::attention_backward", mutates_args=())
def _attention_backward_op(q: Tensor, k: Tensor, v: Tensor, log_g: Optional[Tensor], y: Tensor, den: Tensor,
                           dy: Tensor, scale: float, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dlog_g [B,T,Hk] in log_g's dtype, empty without gates)."""
    with _on_device_of(q):
        dq, dk, dv, dlog_g = attention_backward(q, k, v, log_g, y, den, dy, scale, eps)
    dlog_g = q.new_empty(0, dtype=torch.float32) if dlog_g is None else dlog_g.to(log_g.dtype).contiguous()
    return dq, dk, dv, dlog_g


@_attention_backward_op.register_fake
def _(q, k, v, log_g, y, den, dy, scale, eps):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(log_g) if log_g is not None else q.new_empty(0, dtype=torch.float32))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, log_g, scale, eps = inputs
    ctx.save_for_backward(q, k, v, log_g, *output)
    ctx.args = (scale, eps)


def _attention_autograd(ctx, dy, dden):
    q, k, v, log_g, y, den = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    dq, dk, dv, dlog_g = _attention_backward_op(q, k, v, log_g, y, den, dy.contiguous(), *ctx.args)
    return dq, dk, dv, dlog_g if log_g is not None else None, None, None


_attention_forward_op.register_autograd(_attention_autograd, setup_context=_attention_setup_context)


@torch.library.custom_op("power_transformers::decode_", mutates_args=("state_s", "state_z"))
def _decode_op(
    q: Tensor, k: Tensor, v: Tensor, log_g: Optional[Tensor], state_s: Tensor, state_z: Tensor, scale: float, eps: float,
) -> Tensor:
    """y [B, t, Hq, d]; state_s [B, Hk, D, d] and state_z [B, Hk, D] updated in place."""
    with _on_device_of(q):
        return decode_(q, k, v, log_g, state_s, state_z, scale, eps)


@_decode_op.register_fake
def _(q, k, v, log_g, state_s, state_z, scale, eps):
    return q.new_empty(q.shape, dtype=v.dtype)


@torch.library.custom_op("power_transformers::tail_decode_",
                         mutates_args=("state_s", "state_z", "tail_k", "tail_v", "tail_g", "tail_len"))
def _tail_decode_op(
    q: Tensor, k: Tensor, v: Tensor, log_g: Optional[Tensor], state_s: Tensor, state_z: Tensor, tail_k: Tensor,
    tail_v: Tensor, tail_g: Tensor, tail_len: Tensor, scale: float, eps: float,
) -> Tensor:
    """y [B, 1, Hq, d]; the DecodeState's tensors updated in place."""
    with _on_device_of(q):
        return tail_decode_(q, k, v, log_g, DecodeState(state_s, state_z, tail_k, tail_v, tail_g, tail_len), scale, eps)


@_tail_decode_op.register_fake
def _(q, k, v, log_g, state_s, state_z, tail_k, tail_v, tail_g, tail_len, scale, eps):
    return q.new_empty(q.shape, dtype=v.dtype)


@torch.library.custom_op("power_transformers::fold_tail_",
                         mutates_args=("state_s", "state_z", "tail_len"))
def _fold_tail_op(state_s: Tensor, state_z: Tensor, tail_k: Tensor, tail_v: Tensor, tail_g: Tensor,
                  tail_len: Tensor) -> None:
    with _on_device_of(state_s):
        fold_tail_(DecodeState(state_s, state_z, tail_k, tail_v, tail_g, tail_len))


@_fold_tail_op.register_fake
def _(state_s, state_z, tail_k, tail_v, tail_g, tail_len):
    return None


@torch.library.custom_op("power_transformers::decode_qkvg", mutates_args=())
def _decode_qkvg_op(
    x: Tensor, norm_weight: Tensor, eps: float, wq: Tensor, wk: Tensor, wv: Tensor, wg: Optional[Tensor],
    bq: Optional[Tensor], bk: Optional[Tensor], bv: Optional[Tensor], bg: Optional[Tensor],
    q_norm_weight: Optional[Tensor], k_norm_weight: Optional[Tensor], qk_eps: float, positions: Optional[Tensor],
    inv_freq: Optional[Tensor], rope_scale: float, num_heads: int, num_kv_heads: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q [B,1,Hq,d], k, v [B,1,Hk,d], log_g [B,1,Hk] fp32, empty without wg) from x [B, hidden]."""
    with _on_device_of(x):
        return project_qkvg(x, norm_weight, eps, wq, wk, wv, wg, bq, bk, bv, bg, q_norm_weight, k_norm_weight, qk_eps,
                            positions, inv_freq, rope_scale, num_heads, num_kv_heads)


@_decode_qkvg_op.register_fake
def _(x, norm_weight, eps, wq, wk, wv, wg, bq, bk, bv, bg, q_norm_weight, k_norm_weight, qk_eps, positions, inv_freq,
      rope_scale, num_heads, num_kv_heads):
    b, d = x.shape[0], wq.shape[0] // num_heads
    return (x.new_empty(b, 1, num_heads, d), x.new_empty(b, 1, num_kv_heads, d), x.new_empty(b, 1, num_kv_heads, d),
            x.new_empty(b, 1, num_kv_heads if wg is not None else 0, dtype=torch.float32))


@torch.library.custom_op("power_transformers::decode_linear", mutates_args=())
def _decode_linear_op(x: Tensor, norm_weight: Optional[Tensor], eps: float, w: Tensor, bias: Optional[Tensor],
                      w2: Optional[Tensor], bias2: Optional[Tensor], residual: Optional[Tensor]) -> Tensor:
    """[B, N]: (residual +) f(x' w^T + bias), triton_decode_layer.linear."""
    with _on_device_of(x):
        return linear(x, norm_weight, eps, w, bias, w2, bias2, residual)


@_decode_linear_op.register_fake
def _(x, norm_weight, eps, w, bias, w2, bias2, residual):
    return x.new_empty(x.shape[0], w.shape[0])


# ----------------------------------------------------------------------------------
# Public entry points (what dispatch.py calls)
# ----------------------------------------------------------------------------------


def _scale(scale: Optional[float], head_dim: int) -> float:
    return float(head_dim**-0.5 if scale is None else scale)


#: Up to this T (at d = 64; it scales with d^2, the ratio of the chunked form's O(d^3) work per
#: token to the attention form's O(T d)) a sequence without a state in or out runs in the
#: attention form, the same numbers up to rounding. On the H100 (benchmarks/RESULTS.md, run E:
#: 64k tokens, 16 heads, bf16, fwd+bwd) the attention form took 4.9 / 11.5 / 20.3 / 37.9 ms at
#: T = 1k / 4k / 8k / 16k against the chunked form's 28.0 / 25.8 / 25.2 / 25.2: they cross
#: between 8k and 16k. POWER_TRITON_ATTENTION_MAX_T overrides it (0: always chunked).
ATTENTION_FORM_MAX_T = 8192


#: A forward that will be differentiated keeps its chunk states for the backward, instead of a
#: second state pass there, when D <= KEEP_STATES_MAX_D_PER_CHUNK x C. The kept states take D d / C
#: elements per token and kv head (in the operand dtype): at d = 64, C = 128 (D / C = 16) four
#: times the head's q, k, v and y together, about the activations of a transformer layer (so too
#: at d = 128, C = 512, default_chunk's choice); at d = 128, C = 64 (D / C = 129) thirty times, so
#: that one recomputes. keep_states=True / False
#: or POWER_TRITON_KEEP_STATES=1 / 0 decides instead.
KEEP_STATES_MAX_D_PER_CHUNK = 32


def _keep_states(head_dim: int, chunk_size: int, keep_states: Optional[bool]) -> bool:
    if keep_states is not None:
        return keep_states
    forced = os.environ.get("POWER_TRITON_KEEP_STATES")
    if forced in ("0", "1"):
        return forced == "1"
    return expanded_dim(head_dim, 2) <= KEEP_STATES_MAX_D_PER_CHUNK * kernel_tiles(chunk_size, head_dim)[0]


def _attention_form_max_t(head_dim: int) -> int:
    at_64 = int(os.environ.get("POWER_TRITON_ATTENTION_MAX_T", ATTENTION_FORM_MAX_T))
    return at_64 * head_dim * head_dim // 4096


def power_attention(
    q: Tensor, k: Tensor, v: Tensor, log_g: Optional[Tensor] = None, *, degree: int = 2, scale: Optional[float] = None,
    eps: float = 1e-6, chunk_size: Optional[int] = None, initial_state: Optional[State] = None,
    output_final_state: bool = False, keep_states: Optional[bool] = None,
) -> tuple[Tensor, Optional[State]]:
    """Power attention over a sequence with the Triton kernels: y [B, T, Hq, d] and the final state if asked.

    Differentiable with respect to q, k, v, log_g and the initial state. Short sequences without
    a state in or out run in the attention form (see ATTENTION_FORM_MAX_T), the rest chunked:
    `chunk_size` is rounded to a power of two in [16, 1024] (triton_chunk.kernel_tiles); None runs
    the fastest measured for the head size and group (triton_chunk.default_chunk). Either choice
    changes only rounding. keep_states: whether a differentiated forward keeps its chunk
    states for the backward (faster, more memory); None: by KEEP_STATES_MAX_D_PER_CHUNK.
    """
    check_supported(q, degree, k, v, log_g, initial_state)
    if chunk_size is None:
        chunk_size = default_chunk(q.shape[-1], q.shape[2] // k.shape[2])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if initial_state is None and not output_final_state and q.shape[1] <= _attention_form_max_t(q.shape[-1]):
        y, _ = _attention_forward_op(q.contiguous(), k.contiguous(), v.contiguous(),
                                     None if log_g is None else log_g.contiguous(), _scale(scale, q.shape[-1]), float(eps))
        return y, None
    s0 = z0 = None
    if initial_state is not None:
        s0, z0 = initial_state[0].contiguous(), initial_state[1].contiguous()
    keep = (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, log_g, s0, z0))
            and _keep_states(q.shape[-1], chunk_size, keep_states))
    y, _, s_final, z_final, _, _ = _chunk_forward_op(
        q.contiguous(), k.contiguous(), v.contiguous(), None if log_g is None else log_g.contiguous(),
        s0, z0, _scale(scale, q.shape[-1]), float(eps), int(chunk_size), keep)
    return y, ((s_final, z_final) if output_final_state else None)


def _check_decode_state(state: DecodeState) -> None:
    s, z, tail_k, tail_v, tail_g, tail_len = state
    b, hk, _, d = s.shape
    cap = tail_k.shape[2] if tail_k.dim() == 4 else 0
    if cap < 2 or cap & (cap - 1):
        raise ValueError(f"the decode state's tail must hold a power of two >= 2 of tokens, got shape {tuple(tail_k.shape)}")
    for name, x, want in (("tail_k", tail_k, (b, hk, cap, d)), ("tail_v", tail_v, (b, hk, cap, d)),
                          ("tail_g", tail_g, (b, hk, cap)), ("tail_len", tail_len, (b, hk))):
        if tuple(x.shape) != want:
            raise ValueError(f"the decode state's {name} has shape {tuple(x.shape)}, expected {want}")
        if x.dtype != (torch.int32 if name == "tail_len" else torch.float32):
            raise ValueError(f"the decode state's {name} has dtype {x.dtype}")
    if not all(x.is_contiguous() for x in state):
        raise ValueError("the decode state's tensors must be contiguous: they are updated in place")


def fold_tail(state: DecodeState) -> None:
    """Fold every non-empty tail of `state` into (S, z), in place; the tails become empty."""
    _check_decode_state(state)
    _fold_tail_op(*state)


def power_attention_decode_(
    q: Tensor, k: Tensor, v: Tensor, log_g: Optional[Tensor], state: State | DecodeState, *, degree: int = 2,
    scale: Optional[float] = None, eps: float = 1e-6,
) -> Tensor:
    """New tokens against `state`, updated in place; y [B, t, Hq, d]. With a DecodeState one token
    at a time goes through its tail (tail_decode_); several tokens fold the tail first and go
    through (S, z) as with a plain state (S, z)."""
    check_supported(q, degree, k, v, log_g, state[:2])
    if isinstance(state, DecodeState):
        _check_decode_state(state)
        if q.shape[1] == 1:
            return _tail_decode_op(q.contiguous(), k.contiguous(), v.contiguous(),
                                   None if log_g is None else log_g.contiguous(), *state,
                                   _scale(scale, q.shape[-1]), float(eps))
        fold_tail(state)
    s, z = state[:2]
    if not (s.is_contiguous() and z.is_contiguous()):
        raise ValueError("the decode state (S, z) must be contiguous: it is updated in place")
    return _decode_op(q.contiguous(), k.contiguous(), v.contiguous(), None if log_g is None else log_g.contiguous(),
                      s, z, _scale(scale, q.shape[-1]), float(eps))


def decode_layer_problem(x: Tensor, tensors: dict, head_dim: Optional[int] = None) -> Optional[str]:
    """Why the fused step's kernels cannot take the hidden states x [B, K] with `tensors` (name ->
    tensor or None), or None if they can: B <= DECODE_LAYER_MAX_BATCH, a supported dtype and head
    size, and every tensor contiguous, of x's dtype and device (the kernels index them as dense
    arrays of one type). The model asks it to fall back; the entry points raise it."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= DECODE_LAYER_MAX_BATCH:
        return f"the fused decode step takes x [batch <= {DECODE_LAYER_MAX_BATCH}, hidden], got {tuple(x.shape)}"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported by the fused decode step (supported: fp16, bf16, fp32)"
    if head_dim is not None and head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head size {head_dim} is not supported by the fused decode step (supported: {SUPPORTED_HEAD_DIMS})"
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != x.dtype or t.device != x.device:
            return f"{name} is {t.dtype} on {t.device} but the hidden states are {x.dtype} on {x.device}"
        if not t.is_contiguous():
            return f"{name} must be contiguous for the fused decode step"
    return None


def _check_decode_layer_inputs(x: Tensor, tensors: dict, head_dim: Optional[int] = None) -> None:
    problem = decode_layer_problem(x, tensors, head_dim)
    if problem is not None:
        raise ValueError(problem)


def decode_qkvg(x: Tensor, norm_weight: Tensor, eps: float, wq: Tensor, wk: Tensor, wv: Tensor, wg: Optional[Tensor],
                bq: Optional[Tensor], bk: Optional[Tensor], bv: Optional[Tensor], bg: Optional[Tensor],
                q_norm_weight: Optional[Tensor], k_norm_weight: Optional[Tensor], qk_eps: float,
                positions: Optional[Tensor], inv_freq: Optional[Tensor], rope_scale: float, num_heads: int,
                num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """A power layer's one-token inputs from its hidden states x [B, K]: RMSNorm (norm_weight, eps),
    q/k/v projections (weights [H d, K], biases or None), q/k RMSNorm per head (or None), RoPE at
    integer `positions` ([B, 1], [B], or one for every row) with inverse frequencies inv_freq [d/2]
    and scale rope_scale, as PowerRotaryEmbedding's tables (positions None: no RoPE),
    log_g = logsigmoid(x' wg^T + bg) (None without wg).
    Returns q [B, 1, Hq, d], k, v [B, 1, Hk, d] in x's dtype and log_g [B, 1, Hk] fp32 or None."""
    d = wq.shape[0] // num_heads
    if positions is not None:
        positions = positions.reshape(-1)
        if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.numel() not in (1, x.shape[0]):
            raise ValueError(f"positions must be integers, one per row of x or one for all ({x.shape[0]} rows), got "
                             f"{positions.dtype} {tuple(positions.shape)}")
        if inv_freq is None or not inv_freq.dtype.is_floating_point or tuple(inv_freq.shape) != (d // 2,):
            raise ValueError(f"RoPE needs inv_freq [{d // 2}] (floating point), got "
                             f"{None if inv_freq is None else (inv_freq.dtype, tuple(inv_freq.shape))}")
        for name, t in (("positions", positions), ("inv_freq", inv_freq)):
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but the hidden states are on {x.device}")
        positions, inv_freq = positions.contiguous(), inv_freq.contiguous()
    for name, w, rows in (("wq", wq, num_heads * d), ("wk", wk, num_kv_heads * d), ("wv", wv, num_kv_heads * d),
                          ("wg", wg, num_kv_heads)):
        if w is not None and tuple(w.shape) != (rows, x.shape[-1]):
            raise ValueError(f"{name} has shape {tuple(w.shape)}, expected {(rows, x.shape[-1])}")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight go together")
    if not (bq is None) == (bk is None) == (bv is None):
        raise ValueError("bq, bk and bv go together (the attention biases: all or none)")
    if wg is not None and bg is None:
        raise ValueError("the gate projection needs its bias bg")
    _check_decode_layer_inputs(x, dict(x=x, norm_weight=norm_weight, wq=wq, wk=wk, wv=wv, wg=wg, bq=bq, bk=bk, bv=bv, bg=bg,
                                       q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight), d)
    q, k, v, log_g = _decode_qkvg_op(x, norm_weight, float(eps), wq, wk, wv, wg, bq, bk, bv, bg, q_norm_weight,
                                     k_norm_weight, float(qk_eps), positions, inv_freq, float(rope_scale), int(num_heads),
                                     int(num_kv_heads))
    return q, k, v, (log_g if wg is not None else None)


def decode_linear(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, *, norm_weight: Optional[Tensor] = None,
                  eps: float = 0.0, w2: Optional[Tensor] = None, bias2: Optional[Tensor] = None,
                  residual: Optional[Tensor] = None) -> Tensor:
    """(residual +) f(x' w^T + bias) [B, N] for a one-token step: x [B, K], x' its
    RMSNorm when norm_weight is given, f = silu(.) * (x' w2^T + bias2) when w2 is given."""
    if w.dim() != 2 or w.shape[1] != x.shape[-1] or (w2 is not None and w2.shape != w.shape):
        raise ValueError(f"weights {tuple(w.shape)}{'' if w2 is None else ', ' + str(tuple(w2.shape))} do not "
                         f"match x {tuple(x.shape)}")
    if bias2 is not None and w2 is None:
        raise ValueError("bias2 is the bias of w2: it needs w2")
    if residual is not None and tuple(residual.shape) != (x.shape[0], w.shape[0]):
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {(x.shape[0], w.shape[0])}")
    _check_decode_layer_inputs(x, dict(x=x, norm_weight=norm_weight, w=w, bias=bias, w2=w2, bias2=bias2,
                                       residual=residual))
    return _decode_linear_op(x, norm_weight, float(eps), w, bias, w2, bias2, residual)
