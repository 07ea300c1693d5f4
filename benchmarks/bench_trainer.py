"""Trainer fine-tuning on one GPU at 16k context: a power model against a Llama of the same shape.

    python benchmarks/bench_trainer.py [--seq-len 16384] [--warmup 2] [--steps 10] [--out DIR]

Both models have the shape of bench_generate.py (12 layers, hidden 768, 12 heads of 64, MLP 2048,
vocab 32k, random init) and go through the same `Trainer` run: bf16 mixed precision, gradient
checkpointing, AdamW, one sequence of `--seq-len` tokens per step, consecutive windows of *Emma*
(UTF-8 bytes as token ids). The power model uses the Triton kernels (`--backend`), the Llama
SDPA (attn_implementation="sdpa", with the backend SDPA picks: no backend is forced). Measured per model:

    tokens/s   over the `--steps` steps after `--warmup` steps (which take the Triton compilation
               and the allocator's growth), from a callback that synchronises the GPU at each step end
    peak GiB   torch.cuda.max_memory_allocated over those steps (reset after warm-up)

Prints a markdown table and writes it, with the raw figures as JSON, under --out.
`--smoke` runs a tiny shape for a few steps (on CPU too) to check the script.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainerCallback, TrainingArguments

sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # after PYTHONPATH: a tree named there is the one imported
import power_transformers  # noqa: E402
from power_transformers import PowerConfig  # noqa: E402
from power_transformers.data import load_text  # noqa: E402
from power_transformers.data import TokenWindows, byte_ids  # noqa: E402
from power_transformers.train import CHECKPOINTING_ARG  # noqa: E402

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, head_dim=64)
SMOKE_SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=64)
BACKEND_NAMES = {"triton": "power, Triton kernels", "reference": "power, PyTorch reference", "auto": "power, auto dispatch"}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step's end (GPU synchronised); resets the memory peak after warm-up."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        if state.global_step == self.warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def build(kind: str, shape: dict, seq_len: int, backend: str, chunk_size: int):
    if kind == "power":
        config = PowerConfig(**shape, max_position_embeddings=seq_len, attention_backend=backend, chunk_size=chunk_size,
                             bos_token_id=None, eos_token_id=None)
        return AutoModelForCausalLM.from_config(config)
    config = LlamaConfig(**shape, max_position_embeddings=seq_len)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def run(kind: str, args: argparse.Namespace, shape: dict, data: TokenWindows, scratch: str) -> dict:
    torch.manual_seed(0)
    model = build(kind, shape, args.seq_len, args.backend, args.chunk_size)
    parameters = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    timer = StepTimer(args.warmup)
    training = TrainingArguments(
        output_dir=scratch, per_device_train_batch_size=1, max_steps=args.warmup + args.steps, learning_rate=1e-4,
        bf16=True, **{CHECKPOINTING_ARG: True}, train_sampling_strategy="sequential", logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training, train_dataset=data, callbacks=[timer])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    measured = timer.ends[args.warmup:]
    seconds = timer.ends[-1] - timer.ends[args.warmup - 1]
    result = {
        "model": kind,
        "attention": BACKEND_NAMES[args.backend] if kind == "power" else "softmax, SDPA",
        "parameters_M": round(parameters / 1e6, 1),
        "non_embedding_M": round((parameters - embedding) / 1e6, 1),
        "tokens_per_s": round(len(measured) * args.seq_len / seconds),
        "ms_per_step": round(1000 * seconds / len(measured), 1),
        "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "warmup_s": round(timer.ends[args.warmup - 1] - start, 1),
        "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
    }
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def table(results: list[dict], header: str) -> str:
    lines = [header, "", "| model | attention | params (non-embedding) | tokens/s | ms/step | peak memory | warm-up | loss first → last |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} | | | | | | |")
            continue
        peak = "n/a" if r["peak_GiB"] is None else f"{r['peak_GiB']:.2f} GiB"
        lines.append(f"| {r['model']} | {r['attention']} | {r['parameters_M']}M ({r['non_embedding_M']}M) | "
                     f"{r['tokens_per_s']:,} | {r['ms_per_step']} | {peak} | {r['warmup_s']} s | "
                     f"{r['loss_first_last'][0]} → {r['loss_first_last'][1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="triton", choices=("triton", "auto", "reference"))
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="the power model's chunk (default: PowerConfig's, the kernels' choice for the head size)")
    parser.add_argument("--models", default="llama,power", help="in this order (the baseline first)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, for checking the script (CPU too)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step compiles the kernels)")
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    data = TokenWindows(byte_ids(load_text("emma")), args.seq_len)
    needed = args.warmup + args.steps
    if len(data) < needed:
        raise SystemExit(f"Emma has {len(data)} windows of {args.seq_len} bytes, the run needs {needed}")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    header = (f"{device}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
              f"transformers {__import__('transformers').__version__}; power_transformers {power_transformers.__version__}; "
              f"seq {args.seq_len}, batch 1, power chunk {args.chunk_size or 'default'}, bf16, gradient checkpointing, {args.warmup} warm-up + {args.steps} measured steps")
    print(header, flush=True)
    results = []
    for kind in args.models.split(","):
        try:
            results.append(run(kind, args, shape, data, scratch=os.path.join(args.out or "/tmp", f"trainer-{kind}")))
        except Exception as err:  # one model failing (a kernel, memory) must not lose the other's figures
            results.append({"model": kind, "error": f"{type(err).__name__}: {str(err)[:300]}"})
        print(json.dumps(results[-1]), flush=True)
    text = table(results, header)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_trainer.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, "bench_trainer.json"), "w") as f:
            json.dump({"header": header, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
