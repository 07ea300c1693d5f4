"""Quickstart: build a small power model, fine-tune it on real text, save, reload, generate.

Runs on a CPU in about a minute with no downloads: the text is Jane Austen's *Emma*, shipped in the
package, tokenised as UTF-8 bytes (a 256-token vocabulary) so that no tokenizer is needed.

    python -m power_transformers.quickstart [--steps 60] [--output power-quickstart]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from . import PowerCache, PowerConfig, PowerForCausalLM
from .compat import CACHE_NAME
from .data import TokenWindows, byte_ids, load_text


def encode(text: str) -> torch.Tensor:
    return byte_ids(text)[None]


def decode(ids: torch.Tensor) -> str:
    return bytes(ids.tolist()).decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80, help="Trainer steps (default 80)")
    parser.add_argument("--output", default=None, help="where to save the model (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # 1. Build: 4 layers, the third a softmax layer (a hybrid), degree-2 power attention elsewhere.
    config = PowerConfig(
        vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, chunk_size=64, degree=2, bos_token_id=None, eos_token_id=None, pad_token_id=0,
        layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    )
    model = PowerForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, layers {config.layer_types}")

    # 2. Fine-tune with the Trainer on Emma.
    train = TokenWindows(byte_ids(load_text("emma", max_chars=400_000)), window=128)
    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=8, max_steps=args.steps, learning_rate=3e-3,
            warmup_steps=5, logging_steps=10, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
            disable_tqdm=False,
        )
        start = time.time()
        Trainer(model=model, args=training, train_dataset=train).train()
        print(f"trained {args.steps} steps on {args.steps * 8 * 128:,} tokens in {time.time() - start:.0f} s")

        # 3. Save (safetensors) and load back through the Auto classes.
        output = args.output or f"{scratch}/model"
        model.save_pretrained(output)
        loaded = AutoModelForCausalLM.from_pretrained(output).eval()
        print(f"saved to {output} and reloaded as {type(loaded).__name__}")

        # 4. Generate with the recurrent cache: its size is fixed, whatever the length.
        prompt = "Emma Woodhouse, handsome, clever, and rich,"
        cache = PowerCache(loaded.config)
        out = loaded.generate(encode(prompt), max_new_tokens=200, do_sample=True, top_k=10, **{CACHE_NAME: cache})
        print("generated:", decode(out[0]))
        print(f"cache after {out.shape[1]} tokens: {cache.nbytes() / 1e6:.2f} MB (the power states; the softmax layer's KV grows)")


if __name__ == "__main__":
    main()
