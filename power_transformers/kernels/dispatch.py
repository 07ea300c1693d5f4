"""The entry points the model calls; they pick an implementation by device and backend.

`backend`:
    "auto"       the Triton kernels on CUDA tensors they support, the PyTorch reference elsewhere
    "reference"  always the PyTorch reference (also forced by POWER_ATTENTION_BACKEND=reference)
    "triton"     the Triton kernels, or an error naming why they cannot run
"""

from __future__ import annotations

import os
import warnings

import torch

from . import reference
from .reference import DecodeState, State

BACKENDS = ("auto", "reference", "triton")


def _resolve_backend(backend: str) -> str:
    forced = os.environ.get("POWER_ATTENTION_BACKEND")
    if forced:
        backend = forced
    if backend not in BACKENDS:
        raise ValueError(f"power attention backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _triton_module():
    """The Triton implementation, or None where it is not installed / not written yet."""
    try:
        from . import triton_power  # noqa: F401  (optional: needs triton and a GPU)
    except ImportError:
        return None
    return triton_power


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Warn about a fallback to the reference once per distinct reason (not on every layer and step)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"power attention falls back to the PyTorch reference: {message}", stacklevel=3)


def _use_triton(backend: str, q: torch.Tensor, degree: int, k=None, v=None, log_g=None, state=None) -> bool:
    backend = _resolve_backend(backend)
    if backend == "reference":
        return False
    if backend == "auto" and not q.is_cuda:
        return False  # "auto" uses the kernels on CUDA tensors only (and imports nothing for the CPU)
    module = _triton_module()
    if backend == "triton":
        if module is None:
            raise RuntimeError("backend='triton' was asked for but the Triton kernels are not available (pip install triton)")
        module.check_supported(q, degree, k, v, log_g, None if state is None else state[:2])  # raises with the reason
        return True
    if module is None:
        _warn_once("Triton is not installed (pip install triton)")
        return False
    try:
        module.check_supported(q, degree, k, v, log_g, None if state is None else state[:2])
    except ValueError as err:
        _warn_once(str(err))
        return False
    return True


def power_attention(
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
    backend: str = "auto",
    keep_states: bool | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Power attention over a sequence (training and prefill), chunked form.

    q [B, T, Hq, d], k/v [B, T, Hk, d], log_g [B, T, Hk] or None; initial_state (S [B, Hk, D, d],
    z [B, Hk, D]) fp32 or None. Returns y [B, T, Hq, d] (dtype of v) and the final state when
    `output_final_state`. chunk_size changes only rounding; None: each backend's own (the kernels'
    fastest measured for the head size and group, triton_chunk.default_chunk; the reference's
    reference.DEFAULT_CHUNK). keep_states: whether the Triton kernels keep their chunk states for the
    backward (None: where they are small; triton_power.KEEP_STATES_MAX_D_PER_CHUNK); the
    reference's autograd keeps what it needs anyway.
    """
    if _use_triton(backend, q, degree, k, v, log_g, initial_state):
        return _triton_module().power_attention(
            q, k, v, log_g, degree=degree, scale=scale, eps=eps, chunk_size=chunk_size,
            initial_state=initial_state, output_final_state=output_final_state, keep_states=keep_states,
        )
    return reference.power_attention_chunked(
        q, k, v, log_g, degree=degree, scale=scale, eps=eps, chunk_size=chunk_size,
        initial_state=initial_state, output_final_state=output_final_state,
    )


def power_attention_decode_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_g: torch.Tensor | None,
    state: State | DecodeState,
    *,
    degree: int = 2,
    scale: float | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """A few new tokens against the recurrent state, which is updated in place.

    q [B, t, Hq, d], k/v [B, t, Hk, d], log_g [B, t, Hk] or None; state (S, z) fp32, or a
    DecodeState (S, z and a tail of tokens not yet folded in: what the model's cache carries),
    with which one token at a time is read against (S, z) without writing it (see reference.
    DECODE_TAIL). Returns y [B, t, Hq, d]. The state keeps its shapes and storage (static caches
    rely on it).
    """
    if _use_triton(backend, q, degree, k, v, log_g, state):
        return _triton_module().power_attention_decode_(q, k, v, log_g, state, degree=degree, scale=scale, eps=eps)
    if isinstance(state, DecodeState):
        if q.shape[1] == 1:
            return reference.power_attention_tail_decode_(q, k, v, log_g, state, degree=degree, scale=scale, eps=eps)
        reference.fold_tail_(state, degree=degree)
        state = state[:2]
    return reference.power_attention_decode_(q, k, v, log_g, state, degree=degree, scale=scale, eps=eps)


def fold_tail_(state: DecodeState, *, degree: int = 2, backend: str = "auto") -> None:
    """Fold every not yet folded tail token of `state` into (S, z), in place (tails become empty):
    before (S, z) is read as the state of every token so far."""
    # The tail's keys [B, Hk, TAIL, d] stand for the inputs: the decode step's head size, device
    # and (state) dtype, so the fold takes the kernels exactly where the step does.
    if _use_triton(backend, state.tail_k, degree):
        _triton_module().fold_tail(state)
    else:
        reference.fold_tail_(state, degree=degree)


def fused_decode_kernels(backend: str, x: torch.Tensor):
    """The Triton module whose `decode_qkvg` and `decode_linear` run the rest of a power layer's
    one-token step (norms, projections, RoPE, gate, MLP), or None where they cannot run on the
    hidden states x: the reference backend, a CPU tensor under "auto" (under "triton" only with
    TRITON_INTERPRET=1), or no Triton. The model then runs its modules' own forward."""
    backend = _resolve_backend(backend)
    if backend == "reference" or (backend == "auto" and not x.is_cuda):
        return None
    module = _triton_module()
    if module is None or not (x.is_cuda or module.interpreting()):
        return None
    return module
