"""PowerConfig: a Llama-style decoder whose attention layers are power attention layers."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .compat import PreTrainedConfig

POWER_LAYER = "linear_attention"  # transformers' own name for a recurrent layer (FACTS.md)
SOFTMAX_LAYER = "full_attention"
LAYER_KINDS = (POWER_LAYER, SOFTMAX_LAYER)
NORM_TYPES = ("rms_norm", "layer_norm")
MLP_TYPES = ("gated", "plain")
POSITION_EMBEDDING_TYPES = ("rope", "learned", "none")
ATTENTION_BACKENDS = ("auto", "reference", "triton")


@strict(accept_kwargs=True)
class PowerConfig(PreTrainedConfig):
    r"""
    Configuration of a [`PowerModel`]: a decoder-only transformer (RMSNorm, gated MLP, RoPE, GQA, as
    Llama) whose attention layers are power attention layers (arXiv 2507.04239): linear cost in the
    sequence length and a fixed-size recurrent state for generation.

    Llama's fields keep their meaning. Power attention adds:

        degree (`int`, 2): the even power p of the scores (s q.k)^p. The state per key/value head has
            C(head_dim + p - 1, p) x head_dim entries.
        chunk_size (`int`, None): tokens per chunk of the chunked form (training and prefill). It
            changes only rounding, not the result. None: the Triton kernels run the chunk that was
            fastest for the head size and the query heads per key/value head
            (`triton_chunk.default_chunk`: 256 at head size 64 with one, 128 with more and at head
            size 32, 512 at head size 128; H100, 64k tokens forward+backward,
            benchmarks/RESULTS.md, attention kernels, run L), and the reference runs 64.
        attention_scale (`float`, None): s in (s q.k)^p; None means 1/sqrt(head_dim).
        attention_eps (`float`, 1e-6): added to the normaliser, y = sum A v / (sum A + eps).
        use_gating (`bool`, True): a learned per-token, per-key/value-head forget gate
            g = logsigmoid(w.x + b) that decays the state.
        gate_bias_init (`float`, 4.0): the initial bias b of the gate; sigmoid(4) ~ 0.98, a slow decay.
        use_rope (`bool`, True): rotary position embeddings on q and k (in power and softmax layers).
        qk_norm (`bool`, False): RMSNorm on each head of q and k before RoPE (Qwen3 style).
        layer_types (`list[str]`): per layer, `"linear_attention"` (power) or `"full_attention"`
            (softmax, for hybrids). Default: every layer power.
        attention_backend (`str`, "auto"): "auto" (Triton on CUDA, PyTorch elsewhere), "reference"
            or "triton".
        keep_chunk_states (`bool`, None): whether the Triton kernels keep each layer's chunk states
            from the forward for the backward (faster training, more activation memory: D head_dim /
            chunk numbers per token and key/value head) or recompute them. None: kept where they
            are small (head size 64 at chunk 128 or more, head size 128 at 512 or more). The
            reference ignores it.
        fused_decode_step (`bool`, True): a one-token decode step of a power layer runs its norms,
            projections, RoPE, gate and MLP through fused Triton kernels (five launches a layer at
            batch 1 with the attention's, instead of about eleven) where they can take it: the Triton backend, batch <= 8, no gradient, and
            the layer's own modules (plain nn.Linear, RMSNorm, SiLU-gated MLP; a PEFT adapter or a
            quantized linear keeps the modules' forward). False: always the modules' forward.

    Fields that let converted GPT-2 style checkpoints be expressed faithfully:

        norm_type (`str`, "rms_norm"): "rms_norm" or "layer_norm" (with bias).
        mlp_type (`str`, "gated"): "gated" (down(act(gate(x)) * up(x))) or "plain" (down(act(up(x)))).
        position_embedding_type (`str`, None): "rope", "learned" (absolute, GPT-2) or "none";
            None follows `use_rope`.
        attention_bias / attention_output_bias / mlp_bias (`bool`): biases of q/k/v, of o (None:
            same as attention_bias) and of the MLP.
    """

    model_type = "power"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_output_bias: bool | None = None
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    # power attention
    degree: int = 2
    chunk_size: int | None = None
    attention_scale: float | None = None
    attention_eps: float = 1e-6
    use_gating: bool = True
    gate_bias_init: float = 4.0
    use_rope: bool = True
    qk_norm: bool = False
    layer_types: list[str] | None = None
    attention_backend: str = "auto"
    keep_chunk_states: bool | None = None
    fused_decode_step: bool = True
    # conversion of other families
    norm_type: str = "rms_norm"
    mlp_type: str = "gated"
    position_embedding_type: str | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_output_bias is None:
            self.attention_output_bias = self.attention_bias
        if self.position_embedding_type is None:
            self.position_embedding_type = "rope" if self.use_rope else "none"
        self.use_rope = self.position_embedding_type == "rope"
        if self.layer_types is None:
            self.layer_types = [POWER_LAYER] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        self._check_power_fields()
        super().__post_init__(**kwargs)

    def _check_power_fields(self) -> None:
        """Plain ValueErrors naming the field, raised at construction (strict validators raise other types)."""
        if not isinstance(self.degree, int) or self.degree < 2 or self.degree % 2:
            raise ValueError(f"degree must be a positive even integer (odd degrees make scores negative), got {self.degree!r}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.fused_decode_step not in (True, False):
            raise ValueError(f"fused_decode_step must be True or False, got {self.fused_decode_step!r}")
        if self.keep_chunk_states not in (None, True, False):
            raise ValueError(f"keep_chunk_states must be None, True or False, got {self.keep_chunk_states!r}")
        if self.num_attention_heads < 1 or self.num_key_value_heads < 1:
            raise ValueError("num_attention_heads and num_key_value_heads must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = sorted(set(self.layer_types) - set(LAYER_KINDS))
        if unknown:
            raise ValueError(f"layer_types may only contain {LAYER_KINDS}, got {unknown}")
        for field, allowed in (
            ("norm_type", NORM_TYPES),
            ("mlp_type", MLP_TYPES),
            ("position_embedding_type", POSITION_EMBEDDING_TYPES),
            ("attention_backend", ATTENTION_BACKENDS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")

    def validate_layer_type(self):
        """Our own check of `layer_types` (the base one runs again in `save_pretrained`)."""
        self._check_power_fields()

    @property
    def power_layer_indices(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == POWER_LAYER]


__all__ = ["PowerConfig", "POWER_LAYER", "SOFTMAX_LAYER"]
