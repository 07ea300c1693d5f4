"""Fine-tuning with the Trainer and with PEFT LoRA on real text (Jane Austen, shipped in the package)."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from power_transformers.data import TokenWindows, byte_ids, load_text

from helpers import HYBRID, tiny_model


def byte_windows(name: str, max_chars: int, window: int) -> TokenWindows:
    """Windows of the UTF-8 bytes of a shipped text (vocab 256)."""
    return TokenWindows(byte_ids(load_text(name, max_chars=max_chars)), window)


def held_out_loss(model, data):
    model.eval()
    with torch.no_grad():
        batch = torch.stack([data[i]["input_ids"] for i in range(len(data))])
        return model(batch, labels=batch).loss.item()


def make_model(layer_types=None):
    return tiny_model(vocab_size=256, hidden_size=64, num_hidden_layers=2, chunk_size=16, layer_types=layer_types)


@pytest.mark.parametrize("layer_types", [None, HYBRID[:2]])
def test_trainer_lowers_the_loss_on_real_text(tmp_path, layer_types):
    train = byte_windows("emma", 24_000, 64)
    held_out = byte_windows("persuasion", 4_000, 64)
    model = make_model(layer_types)
    before = held_out_loss(model, held_out)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=30, learning_rate=3e-3,
        logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert held_out_loss(model, held_out) < before - 0.5  # from ~5.5 (uniform over 256) towards byte statistics


def test_lora_on_attention_and_gate_trains_and_merges(tmp_path):
    peft = pytest.importorskip("peft")
    train = byte_windows("emma", 12_000, 64)
    model = make_model()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "g_proj"], task_type="CAUSAL_LM")
    lora = peft.get_peft_model(model, config)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("g_proj.lora_A" in n for n in trainable) and all("lora_" in n for n in trainable)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=15, learning_rate=5e-3,
                             report_to=[], save_strategy="no", use_cpu=True, seed=0)
    trainer = Trainer(model=lora, args=args, train_dataset=train)
    trainer.train()
    losses = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
    assert losses
    ids = train[0]["input_ids"][None]
    lora.eval()
    with torch.no_grad():
        adapted = lora(ids).logits
    merged = lora.merge_and_unload()
    assert type(merged).__name__ == "PowerForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-4)
    before = make_model()
    with torch.no_grad():
        assert not torch.allclose(before(ids).logits, adapted, atol=1e-3)  # the adapters changed the model
