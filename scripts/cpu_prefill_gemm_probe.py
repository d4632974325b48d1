"""A prefill's product on the CPU per zigzag type: the blocks multiplied row by row (spqt_zigzag) against x W^T
through torch's GEMM on W^T dequantized for the call (NativeZigzagLinear._gemm), at several row counts M.

The maps: the default model's four shapes (960x576 q|k|v, 576x576 o, 3072x576 gate|up, 576x1536 down), W's
blocks random bytes with finite fp16 scales (the speed does not depend on the values), or --shapes. Per type, M
and map: the median and min milliseconds over --rounds, the two paths alternating within a round. Prints a table
and, with --json, writes the rows; the crossover (the M from which the GEMM is faster on every map) sets
cpu_native.GEMM_ROWS.

    PYTHONPATH=src python scripts/cpu_prefill_gemm_probe.py [--types q4_k,q6_k] [--rows 32,64,128] [--json F]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cpu_types_bench import SHAPES, random_weight
from spqt.kernels import cpu_native


def millis(fn, x) -> float:
    start = time.perf_counter()
    fn(x, None)
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="q8_0,q6_k,q5_k,q4_k,q3_k,q2_k")
    parser.add_argument("--rows", default="16,32,64,128")
    parser.add_argument("--shapes", default=None, help="NxK,... (default: the default model's four maps)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slab", type=int, default=cpu_native.GEMM_SLAB, help="outputs of W^T dequantized at a time")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cpu_native.GEMM_SLAB = args.slab
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    rng = np.random.default_rng(0)
    print(f"torch threads {torch.get_num_threads()}; slab {args.slab} outputs; ms median (min) of {args.rounds} rounds", flush=True)
    print("| type | map | M | row by row | GEMM | row by row / GEMM |\n|---|---|---|---|---|---|")
    found = []
    for fmt in args.types.split(","):
        for n, k in shapes:
            impl = cpu_native.NativeZigzagLinear(random_weight(rng, fmt, n, k), torch.float32, "cpu")
            paths = {"rows": lambda x, r: impl._call(impl._product, impl.blocks.data_ptr(), x, r)[0],
                     "gemm": impl._gemm}
            for m in map(int, args.rows.split(",")):
                x = torch.randn(1, m, k)
                want = paths["rows"](x, None)
                got = paths["gemm"](x, None)  # and warm
                assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()), (fmt, n, k, m)
                times = {name: [] for name in paths}
                for _ in range(args.rounds):
                    for name, fn in paths.items():
                        times[name].append(millis(fn, x))
                med = {name: statistics.median(t) for name, t in times.items()}
                row = {"type": fmt, "n": n, "k": k, "m": m, **{f"{name}_ms": med[name] for name in med},
                       **{f"{name}_min_ms": min(t) for name, t in times.items()}}
                found.append(row)
                print(f"| {fmt} | {n}x{k} | {m} | {med['rows']:.2f} ({min(times['rows']):.2f}) | "
                      f"{med['gemm']:.2f} ({min(times['gemm']):.2f}) | {med['rows'] / med['gemm']:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "slab": args.slab, "rows": found}, indent=1))


if __name__ == "__main__":
    main()
