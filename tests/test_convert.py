"""Checkpoint conversion: every supported source family, through files and the Auto classes.

Each source is a tiny random checkpoint made with transformers' own class. Converted with every
layer kept as softmax, its logits must equal the source's (that proves the weight mapping);
converted to power attention, they differ, while the token-by-token (state) form and the full
forward (attention / chunked form) agree. Bad inputs raise a clear error and leave nothing behind.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import power_transformers  # noqa: F401  (registers the Auto classes)
from power_transformers.compat import CACHE_NAME
from power_transformers.convert_scripts import ConversionError, convert_checkpoint
from power_transformers.convert_scripts.__main__ import main as convert_cli

VOCAB = 61
LAYERS = 3
LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

SOURCES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE, head_dim=8, attention_bias=True, mlp_bias=True)),
    "llama3-rope": lambda: LlamaForCausalLM(
        LlamaConfig(
            **LLAMA_LIKE,
            head_dim=8,
            rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        )
    ),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_LIKE, head_dim=8)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE, tie_word_embeddings=True)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**LLAMA_LIKE, head_dim=16, rope_theta=1000.0)),
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    ),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over VOCAB made-up words (no download needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_source(arch: str, folder) -> torch.nn.Module:
    """Save a tiny random `arch` checkpoint (with tokenizer and generation config) into `folder`."""
    torch.manual_seed(0)
    model = SOURCES[arch]().eval()
    with torch.no_grad():  # make norms and biases non-trivial, so a wrong mapping shows
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=7).save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "source"
    return request.param, folder, make_source(request.param, folder)


IDS = torch.tensor([[1, 5, 9, 33, 12, 7, 60, 4, 18, 22, 41], [1, 8, 8, 30, 2, 44, 19, 6, 51, 10, 27]])


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def token_by_token_logits(model, ids=IDS) -> torch.Tensor:
    """Logits from feeding one token at a time through the cache (the recurrent form)."""
    out, cache = [], None
    with torch.no_grad():
        for t in range(ids.shape[1]):
            step = model(input_ids=ids[:, t : t + 1], use_cache=True, **{CACHE_NAME: cache})
            cache = getattr(step, CACHE_NAME)
            out.append(step.logits)
    return torch.cat(out, dim=1)


def test_all_softmax_conversion_reproduces_source(source, tmp_path):
    arch, folder, model = source
    out = tmp_path / "softmax"
    assert convert_cli([str(folder), str(out), "--keep-softmax-layers", ",".join(map(str, range(LAYERS)))]) == 0
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(converted).__name__ == "PowerForCausalLM"
    assert converted.config.power_layer_indices == []
    torch.testing.assert_close(logits(converted), logits(model), rtol=1e-5, atol=1e-5)


def test_power_conversion_loads_generates_and_forms_agree(source, tmp_path):
    arch, folder, model = source
    out = convert_checkpoint(folder, tmp_path / "power", chunk_size=4, keep_softmax_layers=[1])
    record = json.loads((out / "conversion.json").read_text())
    assert record["source_model_type"] == model.config.model_type
    assert record["softmax_layers"] == [1] and record["power_layers"] == [0, 2]

    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert converted.config.converted_from["source_model_type"] == model.config.model_type
    assert converted.config.chunk_size == 4
    full = logits(converted)
    assert not torch.allclose(full, logits(model), atol=1e-3)  # power attention is not softmax
    torch.testing.assert_close(token_by_token_logits(converted), full, rtol=1e-4, atol=1e-4)

    gate = converted.model.layers[0].self_attn.g_proj
    assert torch.all(gate.weight == 0) and torch.all(torch.sigmoid(gate.bias) > 0.99)

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer(["w5 w9 w33"], return_tensors="pt")
    generated = converted.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, prompt.input_ids.shape[1] + 6) or generated[0, -1] == 2
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7


def test_dtype_option(tmp_path):
    folder = tmp_path / "src"
    make_source("llama", folder)
    out = convert_checkpoint(folder, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "conversion.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Bad inputs: a clear error, and nothing left in the output's folder
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def llama_source(tmp_path):
    folder = tmp_path / "src"
    make_source("llama", folder)
    return folder


def assert_fails_cleanly(source, out, match, **options):
    before = set(os.listdir(out.parent))
    with pytest.raises(ConversionError, match=match):
        convert_checkpoint(source, out, **options)
    assert set(os.listdir(out.parent)) == before


def test_unknown_architecture(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2)).save_pretrained(folder)
    assert_fails_cleanly(folder, tmp_path / "out", "cannot convert architecture 'opt'")


def test_existing_output(llama_source, tmp_path):
    (tmp_path / "out").mkdir()
    assert_fails_cleanly(llama_source, tmp_path / "out", "already exists")


def test_missing_weights(llama_source, tmp_path):
    (llama_source / "model.safetensors").unlink()
    assert_fails_cleanly(llama_source, tmp_path / "out", "no weights")


def test_corrupt_weights(llama_source, tmp_path):
    weights = llama_source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_fails_cleanly(llama_source, tmp_path / "out", "corrupt weight file")


def test_missing_tensor(llama_source, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = llama_source / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    assert_fails_cleanly(llama_source, tmp_path / "out", "missing .*layers.1.mlp.up_proj")


def test_bad_options(llama_source, tmp_path):
    assert_fails_cleanly(llama_source, tmp_path / "out", "out of range", keep_softmax_layers="0,7")
    assert_fails_cleanly(llama_source, tmp_path / "out", "unknown dtype", dtype="int8")
    assert_fails_cleanly(tmp_path / "nowhere", tmp_path / "out", "does not exist")
    with pytest.raises(ConversionError, match="does not exist"):
        convert_checkpoint(llama_source, tmp_path / "no" / "out")
    assert not (tmp_path / "no").exists()


def test_cli_reports_errors_without_traceback(llama_source, tmp_path, capsys):
    assert convert_cli([str(llama_source), str(tmp_path / "out"), "--degree", "3"]) == 2
    assert "power-convert: error:" in capsys.readouterr().err and not (tmp_path / "out").exists()
