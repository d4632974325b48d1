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
import re
import subprocess
import tempfile
from pathlib import Path

import triton

from spqt.kernels import tuning
from spqt.kernels import zigzag_types as zt

BIN = Path(triton.__file__).parent / "backends/nvidia/bin"


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest loop (a backward branch closes a loop) of nvdisasm's listing."""
    lines, labels, best = [], {}, []
    for ln in sass.splitlines():
        label = re.match(r"^(\.L_\w+):", ln.strip())
        if label:
            labels[label.group(1)] = len(lines)
        elif re.search(r"/\*[0-9a-f]{4}\*/", ln):
            lines.append(ln)
            target = re.search(r"BRA\s+(?:`\()?(\.L_\w+)", ln)
            if target and target.group(1) in labels and len(lines) - labels[target.group(1)] > len(best):
                best = lines[labels[target.group(1)]:]
    return best


def report(fmt: str, mode: int, warps: int, block_k: int, dtype: str) -> dict:
    compiled = zt.compile_sm90(fmt, mode, dtype, num_warps=warps, block_k=block_k)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    loop = main_loop(sass)
    ops = collections.Counter()
    for ln in loop:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", ln)
        if m:
            ops[m.group(1)] += 1
    loads = collections.Counter({op: n for op, n in ops.items() if op.startswith(("LDG", "LD."))})
    weights = block_k * 256  # a step: block_k columns of one 256-output block row (Q8_0: rows x 32)
    return {"regs": re.search(r"REG:(\d+)", usage).group(1), "spills": re.search(r"STACK:(\d+)", usage).group(1),
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
