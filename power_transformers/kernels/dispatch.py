"""The two entry points the model calls; they pick an implementation by device and backend.

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
from .reference import State

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
        module.check_supported(q, degree, k, v, log_g, state)  # raises with the reason
        return True
    if module is None:
        _warn_once("Triton is not installed (pip install triton)")
        return False
    try:
        module.check_supported(q, degree, k, v, log_g, state)
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
    chunk_size: int = 64,
    initial_state: State | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, State | None]:
    """Power attention over a sequence (training and prefill), chunked form.

    q [B, T, Hq, d], k/v [B, T, Hk, d], log_g [B, T, Hk] or None; initial_state (S [B, Hk, D, d],
    z [B, Hk, D]) fp32 or None. Returns y [B, T, Hq, d] (dtype of v) and the final state when
    `output_final_state`.
    """
    if _use_triton(backend, q, degree, k, v, log_g, initial_state):
        return _triton_module().power_attention(
            q, k, v, log_g, degree=degree, scale=scale, eps=eps, chunk_size=chunk_size,
            initial_state=initial_state, output_final_state=output_final_state,
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
    state: State,
    *,
    degree: int = 2,
    scale: float | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """A few new tokens against the recurrent state, which is updated in place.

    q [B, t, Hq, d], k/v [B, t, Hk, d], log_g [B, t, Hk] or None, state (S, z) fp32.
    Returns y [B, t, Hq, d]. The state keeps its shape and storage (static caches rely on it).
    """
    if _use_triton(backend, q, degree, k, v, log_g, state):
        return _triton_module().power_attention_decode_(q, k, v, log_g, state, degree=degree, scale=scale, eps=eps)
    return reference.power_attention_decode_(q, k, v, log_g, state, degree=degree, scale=scale, eps=eps)
