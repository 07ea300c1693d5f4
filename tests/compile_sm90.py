"""Compile the chunk kernels for an H100 (sm_90) without running them: Triton's front end, MLIR,
LLVM and ptxas (bundled with the triton wheel), on a machine without a GPU. This catches what the
CPU interpreter cannot: code the interpreter runs but the compiler rejects. Run by
tests/test_triton_kernels.py in a subprocess, without TRITON_INTERPRET (the interpreter replaces
the kernels). Prints one line per kernel variant; exit status 1 if any failed.

    TRITON_INTERPRET=0 python tests/compile_sm90.py
"""

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from power_transformers.kernels import triton_chunk as tc

INTS = {"T", "T_PAD", "NUM_CHUNKS", "HX", "HK", "HQ", "SLOT"}
FLOATS = {"scale", "eps"}
# tensors in the operand dtype (bf16 inputs): inputs, outputs and the stored chunk states
BF16 = {"X", "Y", "Q", "K", "V", "OUT", "STATES", "FSTATES", "DSTATES", "DO", "DQ", "DK", "DV"}


def compile_variant(name, fn, consts, launch):
    signature = {}
    for param in fn.params:
        arg = param.name
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in INTS:
            signature[arg] = "i32"
        elif arg in FLOATS:
            signature[arg] = "fp32"
        elif arg == "FLAGS":
            signature[arg] = "*i32"
        else:
            signature[arg] = "*bf16" if arg in BF16 else "*fp32"
    try:
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=launch)
    except Exception as err:  # noqa: BLE001
        print(f"FAILED {name}: {type(err).__name__}: {err}")
        return False
    print(f"ok {name} {launch}")
    return True


def main() -> int:
    d, op = 64, tl.bfloat16
    dim = d * (d + 1) // 2
    tuned = {k: {"num_warps": w, "num_stages": s} for k, (w, s) in tc.TUNED.items()}
    common = dict(HEAD_DIM=d, D=dim, OP=op)
    ok = True
    for chunk, block in ((128, 128), (512, 128)):
        share = dict(common, CHUNK=chunk, BLOCK=block)
        ok &= compile_variant(f"share C{chunk}", tc._chunk_share_kernel, dict(share, G=1, HAS_ZW=False), tuned["share"])
        ok &= compile_variant(f"share C{chunk} GQA dR", tc._chunk_share_kernel, dict(share, G=2, HAS_ZW=True),
                              tuned["share"])
        for reverse in (False, True):
            ok &= compile_variant(
                f"chain C{chunk} {'reverse with <dR, R>' if reverse else 'forward, initial state'}",
                tc._chunk_chain_kernel,
                dict(share, G=1, HAS_ZW=reverse, REVERSE=reverse, HAS_INIT=not reverse, HAS_DOT=reverse),
                tuned["share"])
        chunked = dict(common, CHUNK=chunk, BLOCK=block, HAS_GATE=True)
        ok &= compile_variant(f"fwd C{chunk}", tc._chunk_fwd_kernel, chunked, tuned["fwd"])
        ok &= compile_variant(f"bwd_q C{chunk}", tc._chunk_bwd_q_kernel, chunked, tuned["bwd_q"])
        ok &= compile_variant(f"bwd_kv C{chunk}", tc._chunk_bwd_kv_kernel, dict(chunked, QROWS=tc.BWD_KV_QUERY_ROWS),
                              tuned["bwd_kv"])
    ok &= compile_variant("scan reverse with <dR, R>", tc._state_scan_kernel,
                          dict(HEAD_DIM=d, D=dim, BLOCK_R=64, REVERSE=True, HAS_INIT=True, HAS_DOT=True),
                          {"num_warps": 4, "num_stages": 1})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
