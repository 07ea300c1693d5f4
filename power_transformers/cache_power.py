"""PowerCache: the generation cache of a power model.

Per power layer it holds the recurrent state of DESIGN.md, S [B, Hk, D, d] and z [B, Hk, D] in fp32,
the tail of up to DECODE_TAIL decoded tokens not yet folded into it, and a count of tokens seen;
its size is fixed by the config, whatever the context length.
Per softmax layer of a hybrid it holds an ordinary growing KV cache (transformers' `DynamicLayer`).

`PowerStateLayer` subclasses `DynamicLayer` (not transformers' `LinearAttentionLayer`): every
supported transformers version then treats it as a layer with a sequence length, which
`generate()` asks for on 5.15-5.17 (FACTS.md / the API notes).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .configuration_power import POWER_LAYER
from .kernels import DecodeState, empty_decode_state, expanded_dim, fold_tail_, reference


class PowerStateLayer(DynamicLayer):
    """The recurrent state of one power layer, updated in place, and the tokens seen.

    state_s [B, Hk, D, d], state_z [B, Hk, D]: the state (S, z) of DESIGN.md (fp32; fp64 for fp64).
    tail_k, tail_v [B, Hk, TAIL, d], tail_g [B, Hk, TAIL], tail_len [B, Hk]: the last tokens of
    one-token decoding, not yet folded into (S, z) (kernels.DecodeState, kernels.DECODE_TAIL):
    a decode step reads the state without writing it, and folds a full tail in once every TAIL
    tokens. `state` folds what is pending and returns (S, z).

    `keys` / `values` stay None: a power layer keeps no per-token history beyond the tail.
    """

    _layer_type = "power_attention"  # registers the class with transformers' cache mappings
    _tensors = ("state_s", "state_z", "tail_k", "tail_v", "tail_g", "tail_len")
    is_croppable = False
    is_compileable = False

    def __init__(self, num_key_value_heads: int | None = None, head_dim: int | None = None, degree: int = 2, static: bool = False,
                 backend: str = "auto", **kwargs):
        super().__init__()
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.degree = degree
        self.backend = backend  # the model's attention_backend: a pending tail is folded where its steps ran
        self.static = static
        self.is_compileable = static
        for name in self._tensors:
            setattr(self, name, None)
        # True once a decode step may have left tokens in the tail (a host flag: folding an
        # empty tail would cost a launch or a CPU computation before every prefill)
        self.tail_pending = False
        # Dynamic mode counts tokens here; a static cache counts them in one device tensor
        # (PowerCache.position) so that a compiled step reads no Python int that changes.
        self.seen_tokens = 0

    def _present(self) -> list[str]:
        return [] if self.state_s is None else list(self._tensors)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Allocate a zero state and an empty tail for key_states [B, T, Hk, d]."""
        batch, _, heads, head_dim = key_states.shape
        self.device = key_states.device
        dtype = torch.float64 if key_states.dtype == torch.float64 else torch.float32
        state = empty_decode_state(batch, heads, head_dim, self.degree, device=key_states.device, dtype=dtype)
        for name, tensor in zip(self._tensors, state):
            setattr(self, name, tensor)
            if self.static and not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(tensor)  # CUDA graphs replay on these very buffers
        self.tail_pending = False
        self.is_initialized = True

    @property
    def decode_state(self) -> DecodeState:
        """What a one-token decode step reads and updates in place (the tail included)."""
        return DecodeState(*(getattr(self, name) for name in self._tensors))

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, z) with every token seen folded in (a pending tail is folded first)."""
        if self.tail_pending:
            fold_tail_(self.decode_state, degree=self.degree, backend=self.backend)
            self.tail_pending = False
        return self.state_s, self.state_z

    def set_state(self, state: tuple[torch.Tensor, torch.Tensor], num_new_tokens: int) -> None:
        """Store the state after `num_new_tokens` more tokens (copied in place once allocated).
        The tail must be empty (`state` empties it): the new state holds every token."""
        if self.tail_pending:  # a host flag: no sync to read it
            raise RuntimeError("set_state on a power layer whose decode tail may hold tokens: read `state` first, "
                               "which folds them in, and build the new state from it")
        if self.static and self.state_s is not None:
            if self.state_s.shape != state[0].shape:
                raise ValueError(f"a static PowerCache holds states of shape {tuple(self.state_s.shape)}, got {tuple(state[0].shape)}")
            self.state_s.copy_(state[0])  # keep the storage a compiled step reads
            self.state_z.copy_(state[1])
        else:
            # Dynamic: take the new tensors (an in-place copy would break autograd when training with a cache).
            self.state_s, self.state_z = state[0].contiguous(), state[1].contiguous()
        self.is_initialized = True
        self.advance(num_new_tokens)

    def record_decode_step(self) -> None:
        """Count one token that a decode step put into the tail (through `decode_state`); `state`
        folds it in before (S, z) is read."""
        self.tail_pending = True
        self.advance(1)

    def advance(self, num_new_tokens: int) -> None:
        """Count tokens whose contribution was written into the state in place."""
        if not self.static:
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
        for name in self._present():
            getattr(self, name).zero_()
        self.tail_pending = False
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError(
                "a power attention layer's recurrent state cannot be cropped: tokens folded into it cannot be "
                "removed (assisted / speculative decoding and DoLa-style rollbacks are not supported)"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes the state and tail of row beam_idx[i] (in place, storage kept)."""
        for name in self._present():
            tensor = getattr(self, name)
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in self._present():
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in self._present():
            setattr(self, name, getattr(self, name)[indices].contiguous())

    def offload(self) -> None:
        for name in self._present():
            setattr(self, name, getattr(self, name).to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.state_s is not None and self.state_s.device != self.device:
            for name in self._tensors:
                setattr(self, name, getattr(self, name).to(self.device, non_blocking=True))

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self._present())


class StaticKVLayer(DynamicLayer):
    """A softmax layer's keys and values in buffers of a fixed length, written at the cache's position.

    keys / values [B, H, max_cache_len, d]; entries past the position are masked out by
    `PowerCache.softmax_mask`. Our own class (not transformers' StaticLayer, whose update
    arguments differ between versions).
    """

    is_compileable = True
    is_croppable = False

    def __init__(self, max_cache_len: int, cache: "PowerCache"):
        super().__init__()
        self.max_cache_len = max_cache_len
        self._cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.device = key_states.device
        self.keys = torch.zeros(batch, heads, self.max_cache_len, head_dim, dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros_like(self.keys, dtype=value_states.dtype)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self._cache.position.to(self.device) + torch.arange(key_states.shape[2], device=self.device)
        self.keys.index_copy_(2, slots, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, slots, value_states.to(self.values.dtype))
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            beam_idx = beam_idx.to(self.device)
            self.keys.copy_(self.keys.index_select(0, beam_idx))
            self.values.copy_(self.values.index_select(0, beam_idx))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a static PowerCache cannot be cropped")


class PowerCache(Cache):
    """The cache `generate()` uses for a [`PowerForCausalLM`]: one layer per entry of `config.layer_types`.

    With `max_cache_len` it is static: every tensor is allocated once at its final shape and updated
    in place (power states, softmax layers' KV buffers of `max_cache_len`, a device-tensor token
    count), so a decode step can be compiled and replayed as one CUDA graph. `max_cache_len` only
    bounds the softmax layers of a hybrid: power layers hold any number of tokens.

    Example:
        >>> cache = PowerCache(model.config)
        >>> out = model(input_ids, cache=cache, use_cache=True)   # `past_key_values=` on transformers < 5.24
    """

    def __init__(self, config, max_cache_len: int | None = None, **kwargs):
        text_config = config.get_text_config(decoder=True)
        self.static = max_cache_len is not None
        # Not `self.max_cache_len`: 5.15-5.17's Cache has a read-only property of that name.
        self.capacity = max_cache_len
        self.position: torch.Tensor | None = None  # static mode: tokens seen, a 0-d long tensor
        self.key_valid: torch.Tensor | None = None  # static hybrids: [B, max_cache_len] real (not pad) keys
        layers = []
        for kind in text_config.layer_types:
            if kind == POWER_LAYER:
                layers.append(PowerStateLayer(text_config.num_key_value_heads, text_config.head_dim, text_config.degree,
                                              static=self.static, backend=text_config.attention_backend))
            else:
                layers.append(StaticKVLayer(max_cache_len, self) if self.static else DynamicLayer())
        super().__init__(layers=layers)
        self.config = text_config

    @property
    def is_compileable(self) -> bool:
        return self.static

    @property
    def max_cache_len(self) -> int | None:
        """Tokens a static cache's softmax layers hold (None for a dynamic cache)."""
        return self.capacity

    def get_max_length(self) -> int:
        return -1 if self.capacity is None else self.capacity

    def begin_step(self, attention_mask: torch.Tensor | None, batch: int, length: int, device) -> None:
        """Static mode, before a forward of `length` tokens: allocate, check room, record which keys are real."""
        if not self.static:
            return
        if self.position is None:
            self.position = torch.zeros((), dtype=torch.long, device=device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.position)
        has_softmax = any(isinstance(layer, StaticKVLayer) for layer in self.layers)
        if not has_softmax:
            return
        if not torch.compiler.is_compiling() and int(self.position) + length > self.capacity:
            raise ValueError(
                f"the static PowerCache holds {self.capacity} tokens per softmax layer; "
                f"{int(self.position)} are cached and {length} more were given"
            )
        if self.key_valid is None:
            self.key_valid = torch.zeros(batch, self.capacity, dtype=torch.bool, device=device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.key_valid)
        valid = torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None else attention_mask[:, -length:].bool()
        self.key_valid.index_copy_(1, self.position + torch.arange(length, device=device), valid)

    def softmax_mask(self, length: int, dtype) -> torch.Tensor:
        """Static mode: additive mask [B, 1, length, max_cache_len] for the softmax layers."""
        key_pos = torch.arange(self.capacity, device=self.position.device)[None, :]
        query_pos = self.position + torch.arange(length, device=self.position.device)[:, None]
        allowed = ((key_pos <= query_pos)[None] & self.key_valid[:, None, :]) | (key_pos == query_pos)[None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def end_step(self, length: int) -> None:
        """Static mode, after a forward: count the tokens (in place)."""
        if self.static:
            self.position.add_(length)

    def reset(self) -> None:
        super().reset()
        if self.position is not None:
            self.position.zero_()
        if self.key_valid is not None:
            self.key_valid.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_valid is not None:
            self.key_valid.copy_(self.key_valid.index_select(0, beam_idx.to(self.key_valid.device)))

    @property
    def is_croppable(self) -> bool:  # a property on 5.24's Cache, a plain attribute before
        return False

    def crop(self, max_length: int) -> None:
        if max_length < 0 or max_length < self.get_seq_length():
            for layer in self.layers:
                layer.crop(-1)  # power layers raise the explanation

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (every layer has seen the same tokens)."""
        if self.static:
            return 0 if self.position is None else int(self.position)
        return self.layers[layer_idx].get_seq_length() if self.layers else 0

    def nbytes(self) -> int:
        """Bytes held: the fixed power states plus any softmax layers' keys and values."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, PowerStateLayer):
                total += layer.nbytes()
            elif layer.is_initialized and layer.keys is not None and layer.keys.numel():
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def power_state_bytes_per_row(self) -> int:
        """fp32 bytes of one sequence's power states and tails: fixed by the config, independent of context."""
        c = self.config
        tail = reference.DECODE_TAIL * (2 * c.head_dim + 1) * 4 + 4  # keys, values, gates and the length
        per_layer = c.num_key_value_heads * (expanded_dim(c.head_dim, c.degree) * (c.head_dim + 1) * 4 + tail)
        return per_layer * sum(isinstance(layer, PowerStateLayer) for layer in self.layers)


__all__ = ["PowerCache", "PowerStateLayer", "StaticKVLayer"]
