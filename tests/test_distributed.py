"""Multi-process fine-tuning on CPU (gloo): `power_transformers.train` under torchrun and accelerate launch.

Each distributed run trains a small saved model for a few Trainer steps on 2 processes and is held
against a single-process run of the same script on the same global batch (sequential data order):

- the logged loss of every step agrees within LOSS_TOL (fp32: what differs is only the order of
  float additions in the gradient reduction) or LOSS_TOL_BF16 (an FSDP2 run in bf16);
- the consolidated checkpoint it saved (one model.safetensors, full fp32 tensors) reloads in this
  process with `from_pretrained` and gives the logits of the single-process model within
  LOGITS_TOL (LOGITS_TOL_BF16);
- the script reports the engine that actually wrapped the model (DDP or FSDP2).

Bad input (a wrap class the model lacks, a global batch the world size does not divide) must raise
a ValueError before any step, as must FSDP where accelerate would silently fall back to DDP.
One torchrun run takes ~10 s on 2 cores; the file about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from power_transformers import train
from power_transformers.data import load_text
from power_transformers.distributed import (
    check_launch_config,
    check_world_size,
    fsdp2_settings,
    gradient_accumulation_steps,
    layer_classes_to_wrap,
)

from helpers import HYBRID, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # one run takes ~10 s; a hang (a rank waiting for its peer) must fail, not stall CI
LOSS_TOL = 1e-5  # fp32: measured 5e-7 (DDP), 0 (FSDP2)
LOGITS_TOL = 1e-4  # after 3 steps at lr 3e-3: measured 6e-6 (DDP), 2e-6 (FSDP2)
# FSDP2 in bf16 (bf16 parameters in compute, fp32 master weights) against the fp32 reference: a sanity
# bound (bf16 keeps ~3 digits and Adam amplifies small gradient differences; measured 8e-3 on the
# losses, 0.33 on the logits), below what a wrong gradient reduction or an unconsolidated
# checkpoint gives (logits off by whole units)
LOSS_TOL_BF16 = 5e-2
LOGITS_TOL_BF16 = 1.0
# the bf16 checkpoint reloaded against the same model's bf16 forward under FSDP2: the same weights and
# the same arithmetic (measured 0 on CPU), so far below LOGITS_TOL_BF16
RELOAD_TOL_BF16 = 0.1

# 3 steps of 8 windows x 64 bytes of Emma, in file order, so that both runs see the same batches.
TRAIN_ARGS = ["--text", "emma", "--max-chars", "20000", "--seq-len", "64", "--global-batch-size", "8", "--steps", "3",
              "--lr", "3e-3", "--logging-steps", "1", "--data-order", "sequential"]
MODELS = {  # vocab 256 (bytes); chunk 16 so that a window spans 4 chunks and the state carries across them
    "power": dict(layer_types=None),
    "hybrid": dict(layer_types=HYBRID, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, overrides in MODELS.items():
        paths[name] = root / name
        tiny_model(vocab_size=256, hidden_size=64, num_hidden_layers=3, chunk_size=16, **overrides).save_pretrained(paths[name])
    return paths


def losses(output: Path) -> list[float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.fixture(scope="module")
def single_process(saved_models, tmp_path_factory):
    """The reference: the same script in this process (world size 1, fp32), once per model."""
    runs = {}

    def run(model: str) -> Path:
        if model not in runs:
            runs[model] = tmp_path_factory.mktemp(f"single-{model}")
            train.main(["--model", str(saved_models[model]), "--output", str(runs[model]), *TRAIN_ARGS])
        return runs[model]

    return run


def launch(command: list[str], output: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(command + ["--output", str(output)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return result


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", "0"]
SCRIPT = ["-m", "power_transformers.train"]
# accelerate enables FSDP only on GPUs; this launcher puts its FSDP2 plugin back on CPU (see the file)
FSDP_ON_CPU = [str(ROOT / "tests" / "fsdp_on_cpu.py")]

RUNS = {
    # name: (command, model, bf16, engine the script must report)
    "torchrun-ddp-hybrid": (TORCHRUN + SCRIPT + ["--gradient-checkpointing"], "hybrid", False, "DDP"),
    # per-device 2 x 2 processes x 2 accumulation = global batch 8; FSDP's own activation checkpointing
    "torchrun-fsdp2-hybrid": (TORCHRUN + FSDP_ON_CPU + ["--engine", "fsdp2", "--gradient-checkpointing", "--per-device-batch-size", "2"],
                              "hybrid", False, "FSDP2"),
    # the shipped accelerate config as it is (FSDP2 with bf16 parameters, activation checkpointing)
    "accelerate-fsdp2-bf16-power": (ACCELERATE + ["--config_file", str(ROOT / "examples/accelerate/fsdp2.yaml")] + FSDP_ON_CPU,
                                    "power", True, "FSDP2"),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_match_one(name, saved_models, single_process, tmp_path):
    command, model, bf16, engine = RUNS[name]
    output = tmp_path / "out"
    result = launch(command + ["--model", str(saved_models[model]), *TRAIN_ARGS, "--final-logits", "24"], output)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert f"engine: {engine} on 2 process(es)" in result.stdout, result.stdout[-3000:]

    reference = single_process(model)
    got, want = losses(output), losses(reference)
    assert len(got) == len(want) == 3
    assert got[-1] < got[0]  # it trained
    loss_gap = max(abs(a - b) for a, b in zip(got, want))
    assert loss_gap < (LOSS_TOL_BF16 if bf16 else LOSS_TOL), (got, want)

    # One consolidated safetensors file: every tensor whole and fp32, as the single-process run saved it.
    # (FSDP2's gathered state dict no longer shares the tied lm_head with the embedding, so
    # save_pretrained writes both; from_pretrained ties them again.)
    with safe_open(output / "model.safetensors", "pt") as saved, safe_open(reference / "model.safetensors", "pt") as ref:
        extra = set(saved.keys()) - set(ref.keys())
        assert set(ref.keys()) <= set(saved.keys()) and extra <= {"lm_head.weight"}, extra
        for key in ref.keys():
            assert saved.get_slice(key).get_shape() == ref.get_slice(key).get_shape(), key
            assert saved.get_slice(key).get_dtype() == ref.get_slice(key).get_dtype() == "F32", key
        for key in extra:
            assert torch.equal(saved.get_tensor(key), saved.get_tensor("model.embed_tokens.weight"))
    reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
    expected = AutoModelForCausalLM.from_pretrained(reference).eval()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected_logits = reloaded(ids).logits, expected(ids).logits
    print(f"{name}: losses {got} vs {want} (max gap {loss_gap:.1e}), logits max gap {(logits - expected_logits).abs().max():.1e}")
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=LOGITS_TOL_BF16 if bf16 else LOGITS_TOL)

    # The checkpoint is the model that trained: reloaded on one device (in the dtype the engine's
    # forward produced), its logits are the trained model's own, as the engine computed them.
    final = torch.load(output / "final_logits.pt")
    assert final["input_ids"].shape == (1, 24)
    dtype = final["dtype"]
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(output, dtype=dtype).eval()(final["input_ids"]).logits.float()
    print(f"{name}: reloaded against the trained model's own logits ({dtype}): {(again - final['logits']).abs().max():.1e}")
    torch.testing.assert_close(again, final["logits"], rtol=0, atol=RELOAD_TOL_BF16 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("flags, message", [
    # a wrap class the model lacks: before the Trainer exists
    (["--fsdp-wrap", "LlamaDecoderLayer"], "ValueError: the FSDP wrap policy names ['LlamaDecoderLayer']"),
    # plain accelerate on CPU processes would drop FSDP and train with DDP: refused before training
    ([], "ValueError: FSDP was asked for but accelerate did not enable it"),
], ids=["bad-wrap-class", "fsdp-without-accelerator"])
def test_fsdp_misconfiguration_fails_under_torchrun_before_any_step(flags, message, saved_models, tmp_path):
    output = tmp_path / "out"
    result = launch(TORCHRUN + SCRIPT + ["--model", str(saved_models["hybrid"]), *TRAIN_ARGS, "--engine", "fsdp2", *flags], output)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]
    assert "'loss'" not in result.stdout and not (output / "trainer_state.json").exists()


def test_bad_inputs_raise_before_training(saved_models, tmp_path, monkeypatch):
    model = tiny_model(layer_types=HYBRID)
    assert layer_classes_to_wrap(model) == ["PowerDecoderLayer"]
    assert fsdp2_settings(model)["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["PowerDecoderLayer"]
    with pytest.raises(ValueError, match=r"names \['PowerDecoderLayr'\], which PowerForCausalLM does not contain"):
        fsdp2_settings(model, "PowerDecoderLayer,PowerDecoderLayr")

    assert gradient_accumulation_steps(64, 4, 8) == 2
    with pytest.raises(ValueError, match="global batch 10 is not divisible by the world size 4"):
        gradient_accumulation_steps(10, 1, 4)
    with pytest.raises(ValueError, match="per-device batch 3 x world size 2"):
        gradient_accumulation_steps(8, 3, 2)

    # What `accelerate launch --config_file` puts in the environment is checked the same way.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    with pytest.raises(ValueError, match="does not contain"):
        check_launch_config(model)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")

    # A Trainer that sees fewer processes than were launched (CPU without use_cpu=True).
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="launcher started 2 processes but the Trainer sees 1"):
        check_world_size(SimpleNamespace(world_size=1))

    # The script raises from the batch arithmetic before it loads anything.
    with pytest.raises(ValueError, match="global batch 7 is not divisible by the world size 2"):
        train.main(["--model", str(saved_models["power"]), "--output", str(tmp_path / "out"), *TRAIN_ARGS, "--global-batch-size", "7"])
    with pytest.raises(ValueError, match="--final-logits 65: the tokens must fit one training window"):
        train.main(["--model", str(saved_models["power"]), "--output", str(tmp_path / "out"), *TRAIN_ARGS, "--final-logits", "65"])
    assert not (tmp_path / "out").exists()


def test_script_takes_a_text_file_and_a_tokenizer_and_saves_it(saved_models, tmp_path):
    """One process: a user's own text file, tokenised by a tokenizer that is saved beside the checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    text = tmp_path / "text.txt"
    text.write_text(load_text("persuasion", max_chars=6000), encoding="utf-8")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator([text.read_text(encoding="utf-8")], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>").save_pretrained(tmp_path / "tokenizer")

    output = tmp_path / "out"
    train.main(["--model", str(saved_models["power"]), "--text", str(text), "--tokenizer", str(tmp_path / "tokenizer"),
                "--seq-len", "32", "--global-batch-size", "4", "--steps", "2", "--logging-steps", "1", "--output", str(output)])
    assert len(losses(output)) == 2
    assert AutoTokenizer.from_pretrained(output).get_vocab() == PreTrainedTokenizerFast.from_pretrained(tmp_path / "tokenizer").get_vocab()
    assert AutoModelForCausalLM.from_pretrained(output).config.vocab_size == 256
