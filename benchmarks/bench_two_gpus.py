"""Fine-tuning on two GPUs against one (issue 8): DDP and FSDP2 through power-train, one call.

    python benchmarks/bench_two_gpus.py [--steps 200] [--seq-len 16384] [--global-batch 4] [--out DIR]

A power model of the trainer benchmark's shape (12 layers, hidden 768, 12 heads of 64, vocab
32k, ~110M parameters) from the same seed, trained on the shipped Emma text as bytes, bf16,
gradient checkpointing, Triton kernels, the same global batch and data order in every run:

    one GPU       python -m power_transformers.train ...
    DDP           torchrun --nproc_per_node 2 -m power_transformers.train ...
    FSDP2         torchrun --nproc_per_node 2 -m power_transformers.train --engine fsdp2 ...

(the README's launch lines). A short one-GPU run first fills Triton's kernel cache, so that no
timed run compiles. Prints one table: tokens/s (all GPUs, and per GPU against one GPU: the
scaling efficiency), peak memory per GPU, the largest loss difference from the one-GPU run over
all steps, and the logits of each consolidated checkpoint reloaded on one device against the
trained model's own (power-train --final-logits: up to 512 tokens of the first window).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # after PYTHONPATH: a tree named there is the one imported
from power_transformers import PowerConfig  # noqa: E402
from bench_trainer import SHAPE, SMOKE_SHAPE  # noqa: E402  (the trainer benchmark's model, beside this file)


def launch(cmd: list[str], log: str, env: dict) -> str:
    """Run one training command, its output to `log` and returned; raise if it failed."""
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    with open(log, "w") as f:
        f.write(proc.stdout + proc.stderr)
    print(f"{' '.join(cmd[:4])} ...: exit {proc.returncode} after {time.time() - start:.0f} s", flush=True)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed; the end of its output:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout + proc.stderr


def losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "trainer_state.json")) as f:
        return {e["step"]: e["loss"] for e in json.load(f)["log_history"] if "loss" in e}


def reload_difference(out: str, device: str) -> tuple[float, str]:
    """Largest difference between the logits of the consolidated checkpoint in `out`, loaded on one
    device in the dtype the trained model's forward produced, and that forward's (power-train
    --final-logits); raises on missing or unexpected weights."""
    from transformers import AutoModelForCausalLM

    final = torch.load(os.path.join(out, "final_logits.pt"))
    dtype = final["dtype"]
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"{out}: the checkpoint does not load cleanly: {bad}")
    model.to(device).eval()
    with torch.no_grad():
        logits = model(final["input_ids"].to(device)).logits.float().cpu()
    return (logits - final["logits"]).abs().max().item(), str(dtype).removeprefix("torch.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and no GPU requirement (checks the script)")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/two_gpus"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cuda = torch.cuda.is_available()
    if not args.smoke and (not cuda or torch.cuda.device_count() < args.gpus):
        raise SystemExit(f"needs {args.gpus} GPUs, found {torch.cuda.device_count() if cuda else 0}")
    config = os.path.join(args.out, "config.json")
    PowerConfig(**(SMOKE_SHAPE if args.smoke else SHAPE), tie_word_embeddings=True).to_json_file(config)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    common = ["--config", config, "--text", "emma", "--seq-len", str(args.seq_len), "--global-batch-size",
              str(args.global_batch), "--lr", "3e-4", "--warmup-steps", "10", "--data-order", "sequential",
              "--seed", "0", "--logging-steps", "1", "--gradient-checkpointing", "--final-logits",
              str(min(512, args.seq_len))] + ([] if args.smoke else ["--bf16"])
    one = [sys.executable, "-m", "power_transformers.train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.gpus), "-m",
                "power_transformers.train"]
    single = dict(env, CUDA_VISIBLE_DEVICES="0") if cuda else env
    launch(one + common + ["--steps", "3", "--output", os.path.join(args.out, "warmup")], os.path.join(args.out, "warmup.log"),
           single)

    runs = [("one GPU", one, [], single, 1), ("DDP", torchrun, [], env, args.gpus),
            ("FSDP2", torchrun, ["--engine", "fsdp2"], env, args.gpus)][: 3 if cuda else 2]  # FSDP runs only on GPUs
    results = []
    for name, cmd, extra, run_env, gpus in runs:
        out = os.path.join(args.out, name.replace(" ", "_").lower())
        text = launch(cmd + common + extra + ["--steps", str(args.steps), "--output", out], out + ".log", run_env)
        tps = float(re.search(r"([\d,]+) tokens/s", text).group(1).replace(",", ""))
        peaks = [float(x) for x in re.findall(r"peak GPU memory ([\d.]+) GiB", text)]
        engine = re.search(r"engine: (.*?), global batch", text).group(1)
        results.append((name, out, gpus, tps, peaks, engine))

    base_losses = losses(results[0][1])
    lines = [f"Device: {torch.cuda.get_device_name() if cuda else 'CPU'} x {args.gpus}; torch {torch.__version__}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"Model: {SMOKE_SHAPE if args.smoke else SHAPE}, tied embeddings; "
             f"{args.steps} steps of {args.global_batch} x {args.seq_len} tokens (Emma, bytes), "
             f"{'fp32' if args.smoke else 'bf16'}, gradient checkpointing, lr 3e-4",
             "",
             "| run | engine | tokens/s (all GPUs) | tokens/s per GPU / one GPU | peak memory per GPU (GiB) | "
             "first / last loss | largest loss difference from one GPU | checkpoint reloaded on one device: largest logit "
             "difference from the trained model's (dtype) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, out, gpus, tps, peaks, engine in results:
        run_losses = losses(out)
        diff = max(abs(run_losses[s] - base_losses[s]) for s in base_losses)
        logit_diff, dtype = reload_difference(out, "cuda" if cuda else "cpu")
        steps = sorted(run_losses)
        lines.append(f"| {name} | {engine} | {tps:,.0f} | {tps / gpus / results[0][3]:.2f} | "
                     f"{' / '.join(f'{p:.2f}' for p in peaks)} | {run_losses[steps[0]]:.4f} / {run_losses[steps[-1]]:.4f} | "
                     f"{diff:.2e} | {logit_diff:.2e} ({dtype}) |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "two_gpus.md"), "w") as f:
        f.write(table + "\n")
    curves = {name: losses(out) for name, out, *_ in results}
    with open(os.path.join(args.out, "loss_curves.json"), "w") as f:
        json.dump(curves, f)


if __name__ == "__main__":
    main()
