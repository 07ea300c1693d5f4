"""Pure PyTorch power attention: every form of DESIGN.md, on any device.

These functions are the oracle for the Triton kernels and the fallback the model
uses wherever the kernels cannot run (CPU, unusual shapes).

Layout (the same as the kernels and the model's projections):

    q        [B, T, Hq, d]     query heads, Hq a multiple of Hk
    k, v     [B, T, Hk, d]     key / value heads
    log_g    [B, T, Hk]        per-token log-gates (<= 0), or None for no gating
    state    (S, z)            S [B, Hk, D, d] and z [B, Hk, D], fp32 (fp64 for fp64 inputs)

    A_ij = (scale * q_i . k_j)^p * exp(G_i - G_j)   (j <= i, G the running sum of log_g)
    y_i  = sum_j A_ij v_j / (sum_j A_ij + eps)

All arithmetic runs in fp32 (fp64 when the inputs are fp64); outputs are cast back to
the dtype of `v`.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch

State = tuple[torch.Tensor, torch.Tensor]

#: Tokens a decode state keeps beside (S, z) before folding them in (DESIGN.md: "any not yet
#: folded tail of the current chunk"). A one-token step then reads (S, z) without writing it
#: and attends over the tail; once the tail is full, it is folded into (S, z) before the next
#: token. On the H100 at batch 8, 16 heads, d = 64 (benchmarks/RESULTS.md, run F; graphed) a step
#: took 0.0447 ms, 1.9x the time of reading the state once, against 0.0577 ms (2.5x) for the
#: kernel that writes the state every token.
DECODE_TAIL = 64


class DecodeState(NamedTuple):
    """What one-token decoding carries per layer (all updated in place, shapes fixed):

    s, z      S [B, Hk, D, d], z [B, Hk, D]: every token up to the tail (fp32; fp64 for fp64)
    tail_k    [B, Hk, TAIL, d] keys of the tokens since the last fold (same dtype as s)
    tail_v    [B, Hk, TAIL, d] their values
    tail_g    [B, Hk, TAIL]    running log-gate since the last fold, at each tail token
    tail_len  [B, Hk] int32    tokens in the tail; TAIL means full and already folded into (S, z)
                               (the step that fills a tail folds it): the next step starts anew
    """

    s: torch.Tensor
    z: torch.Tensor
    tail_k: torch.Tensor
    tail_v: torch.Tensor
    tail_g: torch.Tensor
    tail_len: torch.Tensor


# ----------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------


def check_degree(degree: int) -> None:
    """Raise unless `degree` is a positive even integer (odd degrees give negative scores)."""
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 2 or degree % 2:
        raise ValueError(f"degree must be a positive even integer, got {degree!r}")


def expanded_dim(head_dim: int, degree: int) -> int:
    """D = C(d + p - 1, p): the size of the symmetric power embedding."""
    return math.comb(head_dim + degree - 1, degree)


_PLANS: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _embedding_plan(head_dim: int, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tuples i1 <= ... <= ip ([D, p]) and the sqrt-multinomial weight of each ([D]).

    Kept in a plain dict (not lru_cache) so that torch.compile reads a built plan as a constant.
    """
    plan = _PLANS.get((head_dim, degree))
    if plan is None:
        index, weight = [], []
        for combo in itertools.combinations_with_replacement(range(head_dim), degree):
            multinomial = math.factorial(degree)
            for i in set(combo):
                multinomial //= math.factorial(combo.count(i))
            index.append(combo)
            weight.append(math.sqrt(multinomial))
        plan = torch.tensor(index, dtype=torch.long), torch.tensor(weight, dtype=torch.float64)
        _PLANS[(head_dim, degree)] = plan
    return plan


def symmetric_power_embedding(x: torch.Tensor, degree: int) -> torch.Tensor:
    """phi_p(x): [..., d] -> [..., D] with phi_p(a) . phi_p(b) == (a . b)^p."""
    check_degree(degree)
    index, weight = _embedding_plan(x.shape[-1], degree)
    index, weight = index.to(x.device), weight.to(device=x.device, dtype=x.dtype)
    return x[..., index].prod(dim=-1) * weight


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_g: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, time, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree in batch, time or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if log_g is not None and log_g.shape != k.shape[:3]:
        raise ValueError(f"log_g must be [batch, time, kv_heads] = {tuple(k.shape[:3])}, got {tuple(log_g.shape)}")


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, T, Hq, d] -> [B, T, Hk, G, d]: query heads grouped by the key/value head they share."""
    b, t, hq, d = q.shape
    return q.reshape(b, t, num_kv_heads, hq // num_kv_heads, d)


def _log_scores(q: torch.Tensor, k: torch.Tensor, degree: int, scale: float) -> torch.Tensor:
    """p * log|scale q.k| for grouped q [B, Tq, Hk, G, d], k [B, Tk, Hk, d] -> [B, Hk, G, Tq, Tk].

    Exact zeros map to -inf with a zero (not NaN) gradient.
    """
    dot = torch.einsum("bihgd,bjhd->bhgij", q, k) * scale
    zero = dot == 0
    safe = torch.where(zero, torch.ones_like(dot), dot)
    return torch.where(zero, torch.full_like(dot, -math.inf), degree * torch.log(safe.abs()))


def empty_state(batch: int, num_kv_heads: int, head_dim: int, degree: int, device=None, dtype=torch.float32) -> State:
    """A zero state (S [B, Hk, D, d], z [B, Hk, D]), fp32 by default: what a new sequence starts from."""
    check_degree(degree)
    dim = expanded_dim(head_dim, degree)
    return (
        torch.zeros(batch, num_kv_heads, dim, head_dim, dtype=dtype, device=device),
        torch.zeros(batch, num_kv_heads, dim, dtype=dtype, device=device),
    )


def empty_decode_state(batch: int, num_kv_heads: int, head_dim: int, degree: int, device=None, dtype=torch.float32,
                       tail: int | None = None) -> DecodeState:
    """A zero state with an empty tail of `tail` tokens (default DECODE_TAIL; a power of two for the kernels)."""
    tail = DECODE_TAIL if tail is None else tail
    s, z = empty_state(batch, num_kv_heads, head_dim, degree, device=device, dtype=dtype)
    return DecodeState(s, z, torch.zeros(batch, num_kv_heads, tail, head_dim, dtype=dtype, device=device),
                       torch.zeros(batch, num_kv_heads, tail, head_dim, dtype=dtype, device=device),
                       torch.zeros(batch, num_kv_heads, tail, dtype=dtype, device=device),
                       torch.zeros(batch, num_kv_heads, dtype=torch.int32, device=device))


# ----------------------------------------------------------------------------------
# Form 1: attention, O(T^2 d)
# ----------------------------------------------------------------------------------


def power_attention_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor | None = None,
    *,
    degree: int = 2,
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The attention form: y [B, T, Hq, d] from the full T x T score matrix."""
    check_degree(degree)
    _check_shapes(q, k, v, log_g)
    b, t, hq, d = q.shape
    hk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    cdt = _compute_dtype(v)
    qg, k32, v32 = _grouped(q, hk).to(cdt), k.to(cdt), v.to(cdt)

    log_a = _log_scores(qg, k32, degree, scale)  # [B, Hk, G, T, T]
    if log_g is not None:
        # Differences of a running sum: computed in fp64 so that long contexts keep their digits.
        cum = log_g.to(torch.float64).cumsum(dim=1).transpose(1, 2)  # [B, Hk, T]
        log_a = log_a + (cum[..., :, None] - cum[..., None, :]).to(cdt)[:, :, None]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    log_a = log_a.masked_fill(~causal, -math.inf)
    y = _normalised_output(log_a, v32, None, None, eps)
    return y.reshape(b, hk, -1, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, hq, d).to(v.dtype)


def _normalised_output(
    log_a: torch.Tensor,
    v: torch.Tensor,
    inter_num: torch.Tensor | None,
    inter_log_den: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float,
) -> torch.Tensor:
    """sum_j A_ij v_j / (sum_j A_ij + eps), in a scale that cannot overflow.

    log_a [B, Hk, G, Tq, Tk] holds log A_ij for the (chunk-local) keys, v [B, Tk, Hk, d].
    inter_num [B, Hk, G, Tq, d] and inter_log_den = (den [B, Hk, G, Tq], log_decay [B, Hk, G, Tq])
    add the contribution of the state carried from earlier chunks, already multiplied by
    phi(q), and the log of its decay from the chunk start.
    Every term is divided by exp(m_i), m_i = max(0, row max of log A): the largest local
    term becomes 1 and nothing grows past it.
    """
    m = log_a.amax(dim=-1).detach().clamp_min(0.0)  # [B, Hk, G, Tq]
    a = torch.exp(log_a - m[..., None])
    num = torch.einsum("bhgij,bjhd->bhgid", a, v)
    den = a.sum(dim=-1)
    eps_term = eps * torch.exp(-m)
    if inter_num is not None:
        state_den, log_decay = inter_log_den
        w = torch.exp(log_decay - m)  # <= 1: log_decay <= 0 <= m
        num = num + w[..., None] * inter_num
        den = den + w * state_den
    return num / (den + eps_term)[..., None]  # [B, Hk, G, Tq, d]


# ----------------------------------------------------------------------------------
# Form 2: recurrent, one token at a time, O(T D d)
# ----------------------------------------------------------------------------------


def power_attention_decode_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor | None,
    state: State,
    *,
    degree: int = 2,
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Feed t tokens through the recurrence, updating `state` (S, z) in place; y [B, t, Hq, d].

    S_t = e^{g_t} S_{t-1} + phi(k_t) v_t^T,  z_t = e^{g_t} z_{t-1} + phi(k_t),
    y_t = phi(s q_t)^T S_t / (phi(s q_t)^T z_t + eps).
    """
    check_degree(degree)
    _check_shapes(q, k, v, log_g)
    b, t, hq, d = q.shape
    hk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    s_state, z_state = state
    cdt = s_state.dtype
    outputs = []
    for i in range(t):
        phi_q = symmetric_power_embedding(_grouped(q[:, i : i + 1], hk)[:, 0].to(cdt) * scale, degree)  # [B, Hk, G, D]
        phi_k = symmetric_power_embedding(k[:, i].to(cdt), degree)  # [B, Hk, D]
        if log_g is not None:
            decay = torch.exp(log_g[:, i].to(cdt))  # [B, Hk]
            s_state.mul_(decay[..., None, None])
            z_state.mul_(decay[..., None])
        s_state.add_(phi_k[..., :, None] * v[:, i].to(cdt)[..., None, :])
        z_state.add_(phi_k)
        num = torch.einsum("bhgD,bhDd->bhgd", phi_q, s_state)
        den = torch.einsum("bhgD,bhD->bhg", phi_q, z_state)
        outputs.append((num / (den + eps)[..., None]).reshape(b, hq, d))
    return torch.stack(outputs, dim=1).to(v.dtype)


def power_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor | None = None,
    *,
    degree: int = 2,
    scale: float | None = None,
    eps: float = 1e-6,
    initial_state: State | None = None,
) -> tuple[torch.Tensor, State]:
    """The recurrent form over a whole sequence: (y [B, T, Hq, d], final state). Inputs untouched."""
    check_degree(degree)
    b, _, _, d = q.shape
    hk = k.shape[2]
    if initial_state is None:
        state = empty_state(b, hk, d, degree, device=q.device, dtype=_compute_dtype(v))
    else:
        state = (initial_state[0].clone(), initial_state[1].clone())
    y = power_attention_decode_(q, k, v, log_g, state, degree=degree, scale=scale, eps=eps)
    return y, state


def _at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, Hk, TAIL] at a tail position per (row, head), index [B, Hk] -> [B, Hk]."""
    return x.gather(-1, index.long()[..., None])[..., 0]


def fold_tail_(state: DecodeState, *, degree: int = 2, full_only: bool = False) -> None:
    """Fold the tail's tokens into (S, z), in place: S = e^{G} S + sum_j e^{G - G_j} phi(k_j) v_j^T
    (z likewise; G the running log-gate at the tail's last token).

    full_only: only the tails that a decode step just filled (TAIL tokens), and the length stays
    TAIL, which marks them folded (what a decode step does last). Otherwise every tail with tokens
    not yet folded (1 to TAIL - 1), and the lengths become 0 (before a multi-token forward, or to
    read the state out).
    """
    s, z, tail_k, tail_v, tail_g, tail_len = state
    cap = tail_k.shape[2]
    fold = tail_len == cap if full_only else (tail_len >= 1) & (tail_len < cap)  # [B, Hk]
    if not torch.compiler.is_compiling() and not bool(fold.any()):
        # nothing to fold (63 steps in 64): skip the embedding of the whole tail (a compiled
        # step cannot branch on data, and computes the masked fold instead)
        if not full_only:
            tail_len.zero_()
        return
    valid = torch.arange(cap, device=tail_len.device) < tail_len[..., None]  # [B, Hk, TAIL]
    g_last = _at(tail_g, (tail_len - 1).clamp(min=0))
    decay = torch.where(valid, torch.exp(g_last[..., None] - tail_g), 0.0)  # (unused positions may hold stale gates)
    phi_k = symmetric_power_embedding(tail_k, degree) * decay[..., None]  # [B, Hk, TAIL, D]
    carry = torch.exp(g_last)
    s.copy_(torch.where(fold[..., None, None], carry[..., None, None] * s + phi_k.transpose(-1, -2) @ tail_v, s))
    z.copy_(torch.where(fold[..., None], carry[..., None] * z + phi_k.sum(2), z))
    if not full_only:
        tail_len.zero_()


def power_attention_tail_decode_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor | None,
    state: DecodeState,
    *,
    degree: int = 2,
    scale: float | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """One token against (S, z) and the tail, which takes the token; y [B, 1, Hq, d]. The same
    numbers as power_attention_decode_ up to rounding (Form 2 with its sum split at the last fold):

        y = [e^{G_m} phi(s q)^T S + sum_{j<=m} (s q.k_j)^p e^{G_m - G_j} v_j] / (same with z, 1 + eps)

    over the m tokens of the tail and the new one at position m. The step that fills the tail
    folds it in (its length stays TAIL; the next step starts at m = 0).
    """
    check_degree(degree)
    _check_shapes(q, k, v, log_g)
    if q.shape[1] != 1:
        raise ValueError(f"a tail decode step takes one token, got {q.shape[1]}")
    b, _, hq, d = q.shape
    hk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    s, z, tail_k, tail_v, tail_g, tail_len = state
    cdt = s.dtype
    m = torch.where(tail_len == tail_k.shape[2], 0, tail_len)  # a full tail is folded already
    g_m = torch.where(m > 0, _at(tail_g, (m - 1).clamp(min=0)), 0.0)
    if log_g is not None:
        g_m = g_m + log_g[:, 0].to(cdt)
    at_m = m.long()[..., None, None]
    tail_k.scatter_(2, at_m.expand(-1, -1, 1, d), k[:, 0, :, None].to(cdt))
    tail_v.scatter_(2, at_m.expand(-1, -1, 1, d), v[:, 0, :, None].to(cdt))
    tail_g.scatter_(2, at_m[..., 0], g_m[..., None])
    qs = _grouped(q, hk)[:, 0].to(cdt) * scale  # [B, Hk, G, d]
    phi_q = symmetric_power_embedding(qs, degree)
    carry = torch.exp(g_m)
    num = carry[..., None, None] * torch.einsum("bhgD,bhDd->bhgd", phi_q, s)
    den = carry[..., None] * torch.einsum("bhgD,bhD->bhg", phi_q, z)
    valid = torch.arange(tail_k.shape[2], device=m.device) <= m[..., None]
    decay = torch.where(valid, torch.exp(g_m[..., None] - tail_g), 0.0)  # [B, Hk, TAIL]
    a = torch.einsum("bhgd,bhtd->bhgt", qs, tail_k) ** degree * decay[:, :, None, :]
    num = num + torch.einsum("bhgt,bhtd->bhgd", a, tail_v)
    den = den + a.sum(-1)
    tail_len.copy_(m + 1)
    fold_tail_(state, degree=degree, full_only=True)
    return (num / (den + eps)[..., None]).reshape(b, 1, hq, d).to(v.dtype)


# ----------------------------------------------------------------------------------
# Form 3: chunked, O(T (C d + D d))
# ----------------------------------------------------------------------------------

#: the chunk when none is given: the chunk size changes only rounding, so this one only trades the
#: chunk-local [C, C] products against the number of state steps on the CPU
DEFAULT_CHUNK = 64


def power_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor | None = None,
    *,
    degree: int = 2,
    scale: float | None = None,
    eps: float = 1e-6,
    chunk_size: int | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, State | None]:
    """The chunked form: attention inside each chunk of `chunk_size` (None: DEFAULT_CHUNK), the state
    between chunks.

    Returns y [B, T, Hq, d] and, when `output_final_state`, the state after the last token.
    T need not be a multiple of `chunk_size`: the last chunk is simply shorter.
    Differentiable with respect to q, k, v, log_g (and the initial state).
    """
    check_degree(degree)
    _check_shapes(q, k, v, log_g)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, t, hq, d = q.shape
    hk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    cdt = _compute_dtype(v)
    qg, kc, vc = _grouped(q, hk).to(cdt), k.to(cdt), v.to(cdt)
    gc = None if log_g is None else log_g.to(cdt)
    if initial_state is None:
        s_state, z_state = empty_state(b, hk, d, degree, device=q.device, dtype=cdt)
    else:
        s_state, z_state = initial_state[0].to(cdt), initial_state[1].to(cdt)

    outputs = []
    for start in range(0, t, chunk_size):
        end = min(start + chunk_size, t)
        q_c, k_c, v_c = qg[:, start:end], kc[:, start:end], vc[:, start:end]
        n = end - start
        log_a = _log_scores(q_c, k_c, degree, scale)  # [B, Hk, G, n, n]
        if gc is None:
            local = torch.zeros(b, hk, n, dtype=cdt, device=q.device)
        else:
            local = gc[:, start:end].cumsum(dim=1).transpose(1, 2)  # [B, Hk, n]: G_i - G_chunk_start
            log_a = log_a + (local[..., :, None] - local[..., None, :])[:, :, None]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        log_a = log_a.masked_fill(~causal, -math.inf)

        # The state from earlier chunks, seen by each query: phi(s q)^T S and phi(s q)^T z.
        phi_q = symmetric_power_embedding(q_c * scale, degree)  # [B, n, Hk, G, D]
        inter_num = torch.einsum("bihgD,bhDd->bhgid", phi_q, s_state)
        inter_den = torch.einsum("bihgD,bhD->bhgi", phi_q, z_state)
        log_decay = local[:, :, None, :].expand_as(inter_den)
        y_c = _normalised_output(log_a, v_c, inter_num, (inter_den, log_decay), eps)
        outputs.append(y_c.permute(0, 3, 1, 2, 4).reshape(b, n, hq, d))

        # Fold the chunk into the state: decay the old state by the chunk's total gate, add
        # each key weighted by its own decay to the chunk end (all exponents <= 0).
        total = local[..., -1]  # [B, Hk]
        w = torch.exp(total[..., None] - local).transpose(1, 2)  # [B, n, Hk]
        phi_k = symmetric_power_embedding(k_c, degree)  # [B, n, Hk, D]
        s_state = torch.exp(total)[..., None, None] * s_state + torch.einsum("bjhD,bjhd->bhDd", phi_k * w[..., None], v_c)
        z_state = torch.exp(total)[..., None] * z_state + (phi_k * w[..., None]).sum(dim=1)

    y = torch.cat(outputs, dim=1).to(v.dtype) if outputs else torch.zeros_like(q, dtype=v.dtype)
    return y, ((s_state, z_state) if output_final_state else None)
