"""PowerCache: the generation cache of a power model.

Per power layer it holds the recurrent state of DESIGN.md, S [B, Hk, D, d] and z [B, Hk, D] in fp32,
plus a count of tokens seen; its size is fixed by the config, whatever the context length.
Per softmax layer of a hybrid it holds an ordinary growing KV cache (transformers' `DynamicLayer`).

`PowerStateLayer` subclasses `DynamicLayer` (not transformers' `LinearAttentionLayer`): every
supported transformers version then treats it as a layer with a sequence length, which
`generate()` asks for on 5.15-5.17 (FACTS.md / the API notes).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .configuration_power import POWER_LAYER
from .kernels import empty_state, expanded_dim


class PowerStateLayer(DynamicLayer):
    """The recurrent state of one power layer: (S, z) updated in place, and the tokens seen.

    `keys` / `values` stay None: a power layer keeps no per-token history.
    """

    _layer_type = "power_attention"  # registers the class with transformers' cache mappings
    is_croppable = False
    is_compileable = False

    def __init__(self, num_key_value_heads: int | None = None, head_dim: int | None = None, degree: int = 2, **kwargs):
        super().__init__()
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.degree = degree
        self.state_s: torch.Tensor | None = None
        self.state_z: torch.Tensor | None = None
        self.seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Allocate a zero state for key_states [B, T, Hk, d]."""
        batch, _, heads, head_dim = key_states.shape
        self.device = key_states.device
        dtype = torch.float64 if key_states.dtype == torch.float64 else torch.float32
        self.state_s, self.state_z = empty_state(batch, heads, head_dim, self.degree, device=key_states.device, dtype=dtype)
        self.is_initialized = True

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.state_s, self.state_z

    def set_state(self, state: tuple[torch.Tensor, torch.Tensor], num_new_tokens: int) -> None:
        """Store the state after `num_new_tokens` more tokens (copied in place once allocated)."""
        if self.state_s is None or self.state_s.shape != state[0].shape:
            self.state_s, self.state_z = state[0].contiguous(), state[1].contiguous()
        else:
            self.state_s.copy_(state[0])
            self.state_z.copy_(state[1])
        self.is_initialized = True
        self.seen_tokens += num_new_tokens

    def advance(self, num_new_tokens: int) -> None:
        """Count tokens whose contribution was written into the state in place."""
        self.seen_tokens += num_new_tokens

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a power layer keeps a recurrent state, not keys and values: use its state / set_state")

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.state_s is not None:
            self.state_s.zero_()
            self.state_z.zero_()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError(
                "a power attention layer's recurrent state cannot be cropped: tokens folded into it cannot be "
                "removed (assisted / speculative decoding and DoLa-style rollbacks are not supported)"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes the state of row beam_idx[i] (in place, storage kept)."""
        if self.state_s is not None:
            beam_idx = beam_idx.to(self.state_s.device)
            self.state_s.copy_(self.state_s.index_select(0, beam_idx))
            self.state_z.copy_(self.state_z.index_select(0, beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state_s is not None:
            self.state_s = self.state_s.repeat_interleave(repeats, dim=0)
            self.state_z = self.state_z.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state_s is not None:
            self.state_s = self.state_s[indices].contiguous()
            self.state_z = self.state_z[indices].contiguous()

    def offload(self) -> None:
        if self.state_s is not None:
            self.state_s = self.state_s.to("cpu", non_blocking=True)
            self.state_z = self.state_z.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        if self.state_s is not None and self.state_s.device != self.device:
            self.state_s = self.state_s.to(self.device, non_blocking=True)
            self.state_z = self.state_z.to(self.device, non_blocking=True)

    def nbytes(self) -> int:
        return 0 if self.state_s is None else self.state_s.nbytes + self.state_z.nbytes


class PowerCache(Cache):
    """The cache `generate()` uses for a [`PowerForCausalLM`]: one layer per entry of `config.layer_types`.

    Example:
        >>> cache = PowerCache(model.config)
        >>> out = model(input_ids, cache=cache, use_cache=True)   # `past_key_values=` on transformers < 5.24
    """

    def __init__(self, config, **kwargs):
        text_config = config.get_text_config(decoder=True)
        layers = [
            PowerStateLayer(text_config.num_key_value_heads, text_config.head_dim, text_config.degree)
            if kind == POWER_LAYER
            else DynamicLayer()
            for kind in text_config.layer_types
        ]
        super().__init__(layers=layers)
        self.config = text_config

    @property
    def is_croppable(self) -> bool:  # a property on 5.24's Cache, a plain attribute before
        return False

    def crop(self, max_length: int) -> None:
        if max_length < 0 or max_length < self.get_seq_length():
            for layer in self.layers:
                layer.crop(-1)  # power layers raise the explanation

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (every layer has seen the same tokens)."""
        return self.layers[layer_idx].get_seq_length() if self.layers else 0

    def nbytes(self) -> int:
        """Bytes held: the fixed power states plus any softmax layers' keys and values."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, PowerStateLayer):
                total += layer.nbytes()
            elif layer.is_initialized and layer.keys is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def power_state_bytes_per_row(self) -> int:
        """fp32 bytes of one sequence's power states: fixed by the config, independent of context."""
        c = self.config
        per_layer = c.num_key_value_heads * expanded_dim(c.head_dim, c.degree) * (c.head_dim + 1) * 4
        return per_layer * sum(isinstance(layer, PowerStateLayer) for layer in self.layers)


__all__ = ["PowerCache", "PowerStateLayer"]
