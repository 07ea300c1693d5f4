"""Power attention kernels: the PyTorch reference of every form, the Triton kernels, one dispatch."""

from .dispatch import BACKENDS, fold_tail_, fused_decode_kernels, power_attention, power_attention_decode_
from .reference import (
    DECODE_TAIL,
    DecodeState,
    check_degree,
    empty_decode_state,
    empty_state,
    expanded_dim,
    power_attention_chunked,
    power_attention_quadratic,
    power_attention_recurrent,
    symmetric_power_embedding,
)

__all__ = [
    "BACKENDS",
    "DECODE_TAIL",
    "DecodeState",
    "check_degree",
    "empty_decode_state",
    "empty_state",
    "fold_tail_",
    "fused_decode_kernels",
    "expanded_dim",
    "power_attention",
    "power_attention_chunked",
    "power_attention_decode_",
    "power_attention_quadratic",
    "power_attention_recurrent",
    "symmetric_power_embedding",
]
