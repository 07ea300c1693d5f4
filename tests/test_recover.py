"""Quality recovery (attention transfer + LoRA fine-tune) end to end on a tiny model, and its patch file."""

from __future__ import annotations

import json

import torch
from test_convert import make_source  # tests/ is on sys.path under pytest
from transformers import AutoModelForCausalLM

import power_transformers  # noqa: F401
from power_transformers.convert_scripts import convert_model
from power_transformers.convert_scripts.recover import RECOVERED_FILE, TRANSFER_FILE, apply_patch, main


def test_recover_runs_and_its_patch_reproduces_the_model(tmp_path):
    source = make_source("llama", tmp_path / "src")
    out = tmp_path / "out"
    args = ["--source", str(tmp_path / "src"), "--output", str(out), "--device", "cpu", "--seq-len", "32",
            "--batch-size", "2", "--transfer-steps", "4", "--finetune-steps", "3", "--eval-chars", "3000",
            "--window", "32", "--sample-tokens", "3", "--keep-softmax-layers", "1", "--save-model"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    stages = list(results["perplexity"])
    assert stages[:3] == ["source (softmax)", "converted (no training)", "after attention transfer"]
    assert stages[3].startswith("after fine-tuning") and results["finetune"]["steps"] == 3
    assert results["attention_transfer"]["steps"] == 4 and (out / TRANSFER_FILE).is_file()

    tuned = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    rebuilt = convert_model(source, keep_softmax_layers=[1])
    apply_patch(rebuilt, out / RECOVERED_FILE)
    ids = torch.tensor([[1, 5, 9, 33, 12, 7, 60, 4]])
    with torch.no_grad():
        expected, got = tuned(ids).logits, rebuilt(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-2 * expected.abs().max().item(), rtol=0)


def test_demo_converts_and_generates(tmp_path, capsys):
    from power_transformers.convert_scripts import demo

    make_source("qwen3", tmp_path / "src")
    assert demo.main(["--source", str(tmp_path / "src"), "--prompt", "w5 w9", "--max-new-tokens", "4", "--transfer-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "[4/4] generating" in out and "tokens in" in out
