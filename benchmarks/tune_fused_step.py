"""Tuning (GPU): the block sizes of the fused one-token layer step (kernels/triton_decode_layer.py).

    python benchmarks/tune_fused_step.py [--batches 1,8] [--targets 64,128,256,512,1024] [--elements 2048,4096,8192]
                                         [--warps 4]

For the generation benchmark's shape (hidden 768, 12 heads of 64, MLP 2048, bf16) and 12 sets of
weights (a model's layers: 170 MB, more than L2 holds), times each launch of the step, CUDA-graphed
(12 launches, one per layer, per graph), for each TARGET_PROGRAMS x PRODUCT_ELEMENTS setting, against
its floor (its weights read once at the copy bandwidth measured here). Also the same products
through torch (F.linear, cuBLAS) in one graph, for scale. And the model's LM head (vocab 32k) through
decode_linear and F.linear (not part of a layer's sum). POWER_PDL=0 launches the kernels without
programmatic dependent launch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # after PYTHONPATH: a tree named there is the one imported
sys.path.insert(0, os.path.dirname(__file__))
from bench_attention import ceilings, graphed_ms  # noqa: E402

from power_transformers.kernels import triton_decode_layer as tdl  # noqa: E402
from power_transformers.kernels import triton_power as tp  # noqa: E402

HIDDEN, HEADS, D, MLP, LAYERS, VOCAB = 768, 12, 64, 2048, 12, 32000


def layer_weights(g):
    def w(n, k):
        return torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) / k**0.5

    return dict(norm=torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16), wq=w(HIDDEN, HIDDEN), wk=w(HIDDEN, HIDDEN),
                wv=w(HIDDEN, HIDDEN), wg=w(HEADS, HIDDEN), bg=torch.zeros(HEADS, device="cuda", dtype=torch.bfloat16),
                wo=w(HIDDEN, HIDDEN), gate=w(MLP, HIDDEN), up=w(MLP, HIDDEN), down=w(HIDDEN, MLP))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--targets", default="64,128,256,512,1024")
    parser.add_argument("--elements", default="2048,4096,8192")
    parser.add_argument("--warps", default="4")
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    layers = [layer_weights(g) for _ in range(LAYERS)]
    heads = [torch.randn(VOCAB, HIDDEN, device="cuda", generator=g, dtype=torch.bfloat16) / HIDDEN**0.5 for _ in range(2)]
    for i, w in enumerate(layers):  # two LM heads in turn (98 MB, more than L2 holds), for the LM head row
        w["head"] = heads[i % 2]
    _, copy_tbs = ceilings()
    bytes_of = {"qkvg": 3 * HIDDEN * HIDDEN * 2, "o + residual": HIDDEN * HIDDEN * 2,
                "norm + gate/up": 2 * MLP * HIDDEN * 2, "down + residual": MLP * HIDDEN * 2,
                "LM head": VOCAB * HIDDEN * 2}
    floors = {name: b / (copy_tbs * 1e12) * 1e6 for name, b in bytes_of.items()}
    pdl = tdl.dependent_launch(torch.device("cuda"))
    print(torch.cuda.get_device_name(), f"PDL {pdl}; copy {copy_tbs:.2f} TB/s; us per launch (floor: "
          + ", ".join(f"{n} {f:.2f}" for n, f in floors.items()) + ")", flush=True)
    for batch in [int(x) for x in args.batches.split(",")]:
        x = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(batch, MLP, device="cuda", dtype=torch.bfloat16)
        positions = torch.randint(0, 65536, (batch,), device="cuda")
        inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, device="cuda") / D)
        launches = {
            "qkvg": lambda w: tp.decode_qkvg(x, w["norm"], 1e-6, w["wq"], w["wk"], w["wv"], w["wg"], None, None, None,
                                             w["bg"], None, None, 0.0, positions, inv_freq, 1.0, HEADS,
                                             HEADS),
            "o + residual": lambda w: tp.decode_linear(x, w["wo"], residual=x),
            "norm + gate/up": lambda w: tp.decode_linear(x, w["gate"], norm_weight=w["norm"], eps=1e-6, w2=w["up"]),
            "down + residual": lambda w: tp.decode_linear(a, w["down"], residual=x),
            "LM head": lambda w: tp.decode_linear(x, w["head"]),
        }
        torch_ops = {
            "qkvg": lambda w: [F.linear(x, w[k]) for k in ("wq", "wk", "wv", "wg")],
            "o + residual": lambda w: F.linear(x, w["wo"]),
            "norm + gate/up": lambda w: (F.linear(x, w["gate"]), F.linear(x, w["up"])),
            "down + residual": lambda w: F.linear(a, w["down"]),
            "LM head": lambda w: F.linear(x, w["head"]),
        }
        settings = [(int(t), int(e), int(w)) for t in args.targets.split(",") for e in args.elements.split(",")
                    for w in args.warps.split(",")]
        for target, elements, warps in settings:
            # every batch at `warps` warps (SMALL_BATCH_BLOCK 0: the one-warp rule off)
            tdl.TARGET_PROGRAMS, tdl.PRODUCT_ELEMENTS, tdl.NUM_WARPS, tdl.SMALL_BATCH_BLOCK = target, elements, warps, 0
            times = {name: graphed_ms(lambda: [fn(w) for w in layers], 1, rep=200) * 1e3 / LAYERS
                     for name, fn in launches.items()}
            print(f"batch {batch} programs ~{target} elements {elements} warps {warps}: " + ", ".join(
                f"{n} {t:.2f}" for n, t in times.items()) + f"; layer {sum(times.values()) - times['LM head']:.2f} us", flush=True)
        times = {name: graphed_ms(lambda: [fn(w) for w in layers], 1, rep=200) * 1e3 / LAYERS
                 for name, fn in torch_ops.items()}
        print(f"batch {batch} torch F.linear (products only, no norm/RoPE/residual): " + ", ".join(
            f"{n} {t:.2f}" for n, t in times.items()) + f"; layer {sum(times.values()) - times['LM head']:.2f} us", flush=True)


if __name__ == "__main__":
    main()
