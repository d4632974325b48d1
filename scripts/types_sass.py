"""SASS instruction counts per weight of the zigzag GEMV kernels of the other types
(kernels/zigzag_types.py) for Hopper, compiled here without a GPU (Triton's bundled ptxas and
nvdisasm): per type and mode, registers, stack bytes (spills), the instructions of the main loop (one step
= block_k columns x 256 outputs) and per weight (loop instructions x threads / weights a step),
the loop's global loads by width and its I2F, SHFL and shared-memory / barrier counts.

    python scripts/types_sass.py [--types q6_k,q5_k] [--warps N] [--block-k N] [--dtype fp16]
    (default: every type at its default_config warps and block_k, fp16; run without TRITON_INTERPRET)
"""

import argparse
import collections

import triton

from spqt.kernels import tuning
from spqt.kernels import zigzag_types as zt
from spqt.kernels.sass import disassemble, main_loop, opcode


def report(fmt: str, mode: int, warps: int, block_k: int, dtype: str) -> dict:
    compiled = zt.compile_sm90(fmt, mode, dtype, num_warps=warps, block_k=block_k)
    sass, regs, stack = disassemble(compiled.asm["cubin"])
    loop = main_loop(sass)
    ops = collections.Counter(op for op in map(opcode, loop) if op)
    loads = collections.Counter({op: n for op, n in ops.items() if op.startswith(("LDG", "LD."))})
    weights = block_k * 256  # a step: block_k columns of one 256-output block row (Q8_0: rows x 32)
    return {"regs": regs, "spills": stack,
            "loop": len(loop),
            "per_weight": len(loop) * 32 * warps / weights,
            "loads": ", ".join(f"{op} {n}" for op, n in sorted(loads.items())),
            "i2f": sum(n for op, n in ops.items() if op.startswith("I2F")),
            "shfl": sum(n for op, n in ops.items() if op.startswith("SHFL")),
            "smem": sum(n for op, n in ops.items() if op.startswith(("LDS", "STS", "BAR")))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default=",".join(tuning.TYPE_FORMATS))
    p.add_argument("--warps", type=int, default=0, help="0: each variant's default_config")
    p.add_argument("--block-k", type=int, default=0, help="0: each variant's default_config")
    p.add_argument("--dtype", default="fp16")
    args = p.parse_args()
    print(f"triton {triton.__version__}, sm_90, x {args.dtype}; loop = SASS instructions of the main loop "
          "(one step), per weight = loop x threads / weights a step")
    print("| type | mode | warps | block_k | regs | stack | loop | per weight | I2F | SHFL | LDS/STS/BAR | loop loads |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for fmt in args.types.split(","):
        for mode, kind in ((zt.MODE_DENSE, "dense"), (zt.MODE_INDEXED, "sparse")):
            cfg = tuning.default_config(f"zigzag_{kind}_{fmt}", 4096, 4096)
            warps = args.warps or cfg["num_warps"]
            block_k = args.block_k or cfg["block_k"]
            r = report(fmt, mode, warps, block_k, args.dtype)
            print(f"| {fmt} | {'B2' if mode == zt.MODE_DENSE else 'B4'} | {warps} | {block_k} | {r['regs']} | "
                  f"{r['spills']} | {r['loop']} | {r['per_weight']:.2f} | {r['i2f']} | {r['shfl']} | "
                  f"{r['smem']} | {r['loads']} |")


if __name__ == "__main__":
    main()
