"""generate() itself on the GPU, through the fused layer step and through the modules.

    python benchmarks/check_generate.py

The generation benchmark's power model (12 layers, hidden 768, 12 heads of 64, random weights):
- fp32, dynamic cache, batch 2 with one row left-padded, 64 greedy tokens: are the tokens the same
  with config.fused_decode_step on and off?
- bf16, `generate(cache_implementation="static")` as a user calls it (transformers compiles the
  step with its default settings), batch 1, a 4096-token prompt, 512 new tokens: seconds and
  tokens/s, prefill included, fused on, off, on again. bench_generate.py times the compiled step
  alone; this shows what generate() adds around it.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # after PYTHONPATH: a tree named there is the one imported
from power_transformers import PowerConfig, PowerForCausalLM  # noqa: E402


def main():
    config = PowerConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, head_dim=64, max_position_embeddings=140_000)
    torch.manual_seed(0)
    model = PowerForCausalLM(config).cuda().eval()
    ids = torch.randint(100, 32000, (2, 4096), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :100] = 0  # row 1 left-padded
    tokens = {}
    for fused in (True, False):
        model.config.fused_decode_step = fused
        tokens[fused] = model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)[:, ids.shape[1]:]
    first = [int((a != b).nonzero()[0]) if (a != b).any() else None for a, b in zip(tokens[True], tokens[False])]
    print(f"{torch.cuda.get_device_name()}: fp32 dynamic cache, batch 2 (one row left-padded), 64 greedy tokens: "
          f"identical fused / modules: {torch.equal(tokens[True], tokens[False])}; first difference per row: {first}",
          flush=True)

    model = model.to(torch.bfloat16)
    new = 512
    # exactly `new` tokens: no end-of-sequence token to stop at (min_new_tokens would add a logits
    # processor that cost about 0.3 ms a token on the H100, more than the fused step saves)
    settings = dict(max_new_tokens=new, do_sample=False, cache_implementation="static", eos_token_id=None)
    for fused in (True, False, True):
        model.config.fused_decode_step = fused
        model.generate(ids[:1], **settings)  # compilation and graph capture
        torch.cuda.synchronize()
        start = time.perf_counter()
        made = model.generate(ids[:1], **settings).shape[1] - ids.shape[1]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"bf16 generate(cache_implementation='static'), batch 1, 4096-token prompt, {made} new tokens, "
              f"fused={fused}: {seconds:.3f} s, {made / seconds:.0f} tokens/s (prefill included)", flush=True)


if __name__ == "__main__":
    main()
