"""Power attention decoder models: PowerModel and PowerForCausalLM.

A Llama-style decoder (RMSNorm, gated MLP, RoPE, GQA, optional q/k norm) whose attention layers are
power attention layers (DESIGN.md): A_ij = (s q_i.k_j)^p exp(G_i - G_j), y_i = sum_j A_ij v_j /
(sum_j A_ij + eps), with a learned per-token forget gate. Layers listed as "full_attention" in
`config.layer_types` keep ordinary softmax attention (hybrids, converted checkpoints).

Tensors inside the attention modules use the kernels' layout [batch, time, heads, head_dim].
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward
from transformers.utils import logging

from .cache_power import PowerCache
from .compat import CACHE_NAME, cache_output, pick_cache
from .configuration_power import POWER_LAYER, PowerConfig
from .kernels import fused_decode_kernels, power_attention, power_attention_decode_

logger = logging.get_logger(__name__)


class PowerRMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in fp32 (as Llama's)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def make_norm(config: PowerConfig, size: int) -> nn.Module:
    """The block norm the config asks for: RMSNorm (Llama) or LayerNorm with bias (GPT-2)."""
    if config.norm_type == "layer_norm":
        return nn.LayerNorm(size, eps=config.rms_norm_eps)
    return PowerRMSNorm(size, eps=config.rms_norm_eps)


class PowerRotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE; rope types other than "default" come from transformers' ROPE_INIT_FUNCTIONS."""

    inv_freq: torch.Tensor

    def __init__(self, config: PowerConfig, device=None):
        super().__init__()
        self.config = config
        self.rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: PowerConfig, device=None, seq_len=None) -> tuple[torch.Tensor, float]:
        """Plain RoPE: inverse frequencies theta^(-2i/d) ([d/2]) and no attention scaling."""
        theta = (config.rope_parameters or {}).get("rope_theta", 10000.0)
        dim = config.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
        return 1.0 / (theta**exponents), 1.0

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, head_dim] in x's dtype."""
        inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        positions = position_ids[:, None, :].float()
        device_type = x.device.type if x.device.type != "mps" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):  # fp32 angles
            freqs = (inv_freq @ positions).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class PowerMLP(nn.Module):
    """Gated MLP down(act(gate(x)) * up(x)) (Llama), or plain down(act(up(x))) (GPT-2)."""

    def __init__(self, config: PowerConfig):
        super().__init__()
        self.gated = config.mlp_type == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class PowerAttentionBase(nn.Module):
    """The projections both attention kinds share: q/k/v/o, optional q/k RMSNorm, RoPE.

    `project` maps hidden states [B, T, hidden] to q [B, T, Hq, d], k and v [B, T, Hk, d].
    """

    def __init__(self, config: PowerConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_output_bias)
        if config.qk_norm:
            self.q_norm = PowerRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = PowerRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def project(self, hidden_states: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(b, t, self.num_key_value_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(b, t, self.num_key_value_heads, self.head_dim)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        return q, k, v

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """[B, T, Hq, d] -> [B, T, hidden]."""
        return self.o_proj(attn.reshape(*attn.shape[:2], -1))


def mask_padding(k, v, log_g, padding_mask):
    """Zero the keys, values and log-gates [B, T, ...] of padded positions (padding_mask [B, T] == 0,
    or None for none): they add nothing to the state and do not decay it."""
    if padding_mask is None:
        return k, v, log_g
    keep = padding_mask[..., None].to(k.dtype)  # [B, T, 1]
    k, v = k * keep[..., None], v * keep[..., None]
    return k, v, (None if log_g is None else log_g * keep.to(log_g.dtype))


class PowerAttention(PowerAttentionBase):
    """A power attention layer: the q/k/v/o projections plus a forget-gate projection g_proj.

    Training and prefill run the chunked form; a one-token step with a cache runs the recurrent form
    against the layer's fixed-size state. Padded positions (padding_mask == 0) get zero keys, values
    and log-gates: they add nothing to the state and do not decay it.
    """

    def __init__(self, config: PowerConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.use_gating:
            self.g_proj = nn.Linear(config.hidden_size, self.num_key_value_heads, bias=True)
            self.g_proj.is_gate_projection = True  # _init_weights gives its bias gate_bias_init

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        padding_mask: torch.Tensor | None = None,
        cache: PowerCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        q, k, v = self.project(hidden_states, position_embeddings)
        # Under autocast RoPE's fp32 tables promote q and k while v stays in the autocast dtype: the
        # kernels take one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        log_g = F.logsigmoid(self.g_proj(hidden_states).float()) if self.config.use_gating else None
        k, v, log_g = mask_padding(k, v, log_g, padding_mask)
        if cache is None:
            attn, _ = power_attention(q, k, v, log_g, chunk_size=self.config.chunk_size,
                                      keep_states=self.config.keep_chunk_states, **self._kernel_options())
        else:
            attn = self.attend_cached(q, k, v, log_g, cache)
        return self.output(attn)

    def _kernel_options(self) -> dict:
        c = self.config
        return dict(degree=c.degree, scale=c.attention_scale, eps=c.attention_eps, backend=c.attention_backend)

    def attend_cached(self, q, k, v, log_g, cache: PowerCache) -> torch.Tensor:
        """q [B, T, Hq, d], k/v [B, T, Hk, d], log_g [B, T, Hk] or None through this layer's state in
        `cache`, which takes the new tokens; returns y [B, T, Hq, d]."""
        layer = cache.layers[self.layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(k)  # a zero state is an empty context
        if q.shape[1] == 1:  # through the tail: the state is read, written once every DECODE_TAIL tokens
            attn = power_attention_decode_(q, k, v, log_g, layer.decode_state, **self._kernel_options())
            layer.record_decode_step()
            return attn
        attn, state = power_attention(
            q, k, v, log_g, chunk_size=self.config.chunk_size, initial_state=layer.state, output_final_state=True,
            keep_states=self.config.keep_chunk_states, **self._kernel_options(),
        )
        layer.set_state(state, q.shape[1])
        return attn


class PowerSoftmaxAttention(PowerAttentionBase):
    """Ordinary softmax attention (a "full_attention" layer of a hybrid), through transformers' attention interface."""

    def __init__(self, config: PowerConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.scaling = self.head_dim**-0.5 if config.attention_scale is None else config.attention_scale
        self.is_causal = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None = None,
        cache: PowerCache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        q, k, v = (x.transpose(1, 2) for x in self.project(hidden_states, position_embeddings))  # [B, H, T, d]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        attn, _ = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.output(attn)  # interfaces return [B, T, H, d]


class PowerDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: PowerConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        attention_class = PowerAttention if self.layer_type == POWER_LAYER else PowerSoftmaxAttention
        self.self_attn = attention_class(config, layer_idx)
        self.mlp = PowerMLP(config)
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        padding_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: PowerCache | None = None,
        rotary: tuple | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """rotary: (position_ids, inv_freq, attention_scaling) of PowerRotaryEmbedding, from which the
        fused one-token step makes RoPE's tables itself (position_embeddings holds them made)."""
        if self.layer_type == POWER_LAYER and cache is not None:
            kernels = self._fused_decode_kernels(hidden_states)
            if kernels is not None:
                return self._fused_decode_step(kernels, hidden_states, rotary, padding_mask, cache)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.layer_type == POWER_LAYER:
            hidden_states = self.self_attn(hidden_states, position_embeddings, padding_mask=padding_mask, cache=cache)
        else:
            hidden_states = self.self_attn(hidden_states, position_embeddings, attention_mask=attention_mask, cache=cache, **kwargs)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states

    def _fused_decode_kernels(self, hidden_states: torch.Tensor):
        """The kernels (kernels.fused_decode_kernels) for a fused one-token step of this power layer,
        or None where the step keeps the modules' forward: config.fused_decode_step off, gradients on,
        more than one token or a larger batch than the kernels take, the reference backend or a CPU
        tensor, modules other than the ones the kernels read as plain weights (a PEFT adapter or a
        quantized linear wraps nn.Linear; LayerNorm and the plain MLP of converted GPT-2 checkpoints), or
        weights the kernels cannot read (triton_power.decode_layer_problem: another dtype or device,
        not contiguous)."""
        attn, mlp = self.self_attn, self.mlp
        config = attn.config
        if not config.fused_decode_step or hidden_states.shape[1] != 1 or torch.is_grad_enabled():
            return None
        kernels = fused_decode_kernels(config.attention_backend, hidden_states)
        if kernels is None or not mlp.gated or config.hidden_act != "silu":
            return None
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        linears += [attn.g_proj] if config.use_gating else []
        norms = [self.input_layernorm, self.post_attention_layernorm]
        norms += [attn.q_norm, attn.k_norm] if config.qk_norm else []
        if any(type(m) is not nn.Linear for m in linears) or any(type(m) is not PowerRMSNorm for m in norms):
            return None
        params = {f"{i}.{name}": p for i, m in enumerate(linears + norms) for name, p in m.named_parameters(recurse=False)}
        if any(type(p) is not nn.Parameter for p in params.values()):
            return None  # a tensor subclass (DTensor)
        # the kernels' own conditions (batch, dtype, head size; weights dense, of the hidden states' dtype and device)
        if kernels.decode_layer_problem(hidden_states[:, 0], params, config.head_dim) is not None:
            return None
        return kernels

    def _fused_decode_step(self, kernels, hidden_states, rotary, padding_mask, cache) -> torch.Tensor:
        """forward() of one token [B, 1, hidden] through the fused kernels (kernels.triton_decode_layer;
        with the attention's tail step, five launches at batch 1): the same computation as the modules',
        each output rounded where theirs is. RoPE's tables are made in the q/k/v kernel from `rotary`
        (forward()), so that a compiled step whose layers all take this path makes none."""
        attn, mlp = self.self_attn, self.mlp
        config = attn.config
        x = hidden_states.reshape(hidden_states.shape[0], -1).contiguous()
        positions, inv_freq, rope_scale = rotary if rotary is not None else (None, None, 1.0)
        gate = attn.g_proj if config.use_gating else None
        qk_norm = (None, None, 0.0)
        if config.qk_norm:  # one eps for both: both norms take config.rms_norm_eps
            qk_norm = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.variance_epsilon)
        q, k, v, log_g = kernels.decode_qkvg(
            x, self.input_layernorm.weight, self.input_layernorm.variance_epsilon,
            attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, None if gate is None else gate.weight,
            attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias, None if gate is None else gate.bias,
            *qk_norm, positions, inv_freq, rope_scale, attn.num_heads, attn.num_key_value_heads,
        )
        y = attn.attend_cached(q, *mask_padding(k, v, log_g, padding_mask), cache)
        h = kernels.decode_linear(y.reshape(x.shape[0], -1), attn.o_proj.weight, attn.o_proj.bias, residual=x)
        norm = self.post_attention_layernorm
        act = kernels.decode_linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias, norm_weight=norm.weight,
                                    eps=norm.variance_epsilon, w2=mlp.up_proj.weight, bias2=mlp.up_proj.bias)
        return kernels.decode_linear(act, mlp.down_proj.weight, mlp.down_proj.bias, residual=h).view_as(hidden_states)


class PowerPreTrainedModel(PreTrainedModel):
    config_class = PowerConfig
    config: PowerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PowerDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_flash_attn = False  # softmax layers take an additive 4D mask
    _supports_attention_backend = True
    _is_stateful = True  # generate() refuses assisted decoding (a recurrent state cannot be rolled back)
    _can_compile_fullgraph = True  # with a static PowerCache (cache_implementation="static")

    def _init_weights(self, module):
        super()._init_weights(module)
        if getattr(module, "is_gate_projection", False):
            # Gates start near 1 (sigmoid(4) ~ 0.98): the state forgets slowly until training says otherwise.
            init.constant_(module.bias, self.config.gate_bias_init)


def _positions(attention_mask: torch.Tensor | None, past: int, length: int, device) -> torch.Tensor:
    """Position ids [B or 1, T]: each row counts only its real tokens, so left padding shifts nothing."""
    if attention_mask is not None and attention_mask.shape[-1] == past + length:
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp_min(0)[:, -length:]
    return torch.arange(past, past + length, device=device)[None]


def _softmax_mask(attention_mask: torch.Tensor | None, batch: int, past: int, length: int, dtype, device) -> torch.Tensor:
    """Additive mask [B, 1, T, past + T] for softmax layers: causal, padded keys hidden.

    A query always sees itself, so rows of padding never become all -inf (NaN in softmax).
    """
    total = past + length
    query_pos = torch.arange(past, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None].expand(batch, -1, -1)
    if attention_mask is not None:
        keys = attention_mask[:, -total:].bool()[:, None, :]
        allowed = (allowed & keys) | (key_pos == query_pos)[None]
    mask = torch.zeros(batch, 1, length, total, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class PowerModel(PowerPreTrainedModel):
    """The decoder stack: embeddings, `num_hidden_layers` PowerDecoderLayers, a final norm."""

    def __init__(self, config: PowerConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList([PowerDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = make_norm(config, config.hidden_size)
        self.rotary_emb = PowerRotaryEmbedding(config) if config.use_rope else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: PowerCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: PowerCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """
        input_ids [B, T] or inputs_embeds [B, T, hidden]; attention_mask [B, past + T] (1 = token,
        0 = padding; left padding supported); cache: a PowerCache (`past_key_values=` is the same
        argument under its pre-5.24 name).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = pick_cache(cache, past_key_values)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # a cache is for generation; checkpointing recomputes the forward
        if not use_cache:
            cache = None
        elif cache is None:
            cache = PowerCache(self.config)
        elif not isinstance(cache, PowerCache):
            raise TypeError(f"power models need a PowerCache, got {type(cache).__name__}: build one with PowerCache(model.config)")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        static = cache is not None and cache.static
        if static and length == 1:
            # A generated token is never padding, and the prompt's padding is already in the cache:
            # the growing 2D mask is not needed, which keeps a compiled decode step's inputs static.
            attention_mask = None
        if cache is not None:
            cache.begin_step(attention_mask, batch, length, inputs_embeds.device)
        if position_ids is None:
            if static and attention_mask is None:
                position_ids = (cache.position + torch.arange(length, device=inputs_embeds.device))[None]
            else:
                past = cache.get_seq_length() if cache is not None else 0
                position_ids = _positions(attention_mask, past, length, inputs_embeds.device)

        hidden_states = inputs_embeds
        if self.config.position_embedding_type == "learned":
            hidden_states = hidden_states + self.embed_positions(position_ids)
        position_embeddings = rotary = None
        if self.rotary_emb is not None:
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
            rotary = (position_ids, self.rotary_emb.inv_freq, self.rotary_emb.attention_scaling)

        padding_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            padding_mask = attention_mask[:, -length:].bool()
        softmax_mask = None
        if any(kind != POWER_LAYER for kind in self.config.layer_types):
            if static:
                softmax_mask = cache.softmax_mask(length, hidden_states.dtype)
            else:
                past = cache.get_seq_length() if cache is not None else 0
                softmax_mask = _softmax_mask(attention_mask, batch, past, length, hidden_states.dtype, hidden_states.device)

        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                padding_mask=padding_mask,
                attention_mask=softmax_mask,
                cache=cache,
                rotary=rotary,
            )
        if cache is not None:
            cache.end_step(length)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden_states, **cache_output(cache))
        return output if return_dict else output.to_tuple()


class PowerForCausalLM(PowerPreTrainedModel, GenerationMixin):
    """PowerModel with a language-modelling head; `generate()` keeps a fixed-size PowerCache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: PowerConfig):
        super().__init__(config)
        self.model = PowerModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: PowerCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: PowerCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """
        labels [B, T]: next-token targets as in every transformers causal LM (shifted inside the loss,
        -100 ignored; `num_items_in_batch` in kwargs is honoured). logits_to_keep: compute logits only
        for the last n positions (0 = all).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **cache_output(getattr(outputs, CACHE_NAME))
        )
        return output if return_dict else output.to_tuple()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets a PowerCache: dynamic by default, static for cache_implementation="static"."""
        cache = model_kwargs.get(CACHE_NAME)
        if cache is None and generation_config.use_cache is not False:
            implementation = generation_config.cache_implementation
            if implementation in (None, "dynamic"):
                model_kwargs[CACHE_NAME] = PowerCache(self.config)
                return
            if implementation != "static":
                raise ValueError(
                    f"cache_implementation={implementation!r} is not supported by power models: use None (a dynamic "
                    "PowerCache) or 'static' (fixed buffers, for torch.compile / CUDA graphs)"
                )
        elif isinstance(cache, PowerCache) and cache.static and cache.max_cache_len < generation_config.max_length:
            if any(kind != POWER_LAYER for kind in self.config.layer_types):
                raise ValueError(
                    f"the static PowerCache holds {cache.max_cache_len} tokens per softmax layer but generation may "
                    f"reach {generation_config.max_length}: build it with a larger max_cache_len"
                )
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """Keep generate()'s 2D padding mask: the model builds its masks from it and from the PowerCache."""
        return attention_mask

    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, *args, **kwargs) -> PowerCache:
        """The static cache generate() asks for: a PowerCache with fixed buffers."""
        if cache_implementation != "static":
            raise ValueError(f"cache_implementation={cache_implementation!r} is not supported by power models")
        return PowerCache(self.config, max_cache_len=max_cache_len)


__all__ = ["PowerForCausalLM", "PowerModel", "PowerPreTrainedModel"]
