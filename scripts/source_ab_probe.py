"""Two versions of the CUDA GEMV's source (zigzag_q4k.cu) timed side by side in one process (device machine): the
GEMVs of `spqt bench gemv` (bench.bench_shape / bench_type_shape: graphs of >= 16 calls over weight copies larger
than 4x L2, median of 30) with the kernels compiled from each file in turn, alternating for --rounds rounds, the same
weights and x. What a kernel change does to each variant, with the machine's state shared.

    python3 scripts/source_ab_probe.py --before .old/src/spqt/kernels/zigzag_q4k.cu [--shapes 57344x8192,...]
        [--types q4_k,q3_k] [--variants B2,B4,B4K] [--sparsity 0.5] [--rounds 2]

A line per shape, type and variant: us before / after in each round, and after's median over before's.
"""

import argparse
import statistics
from pathlib import Path

import torch

from spqt.bench import bench_shape, bench_type_shape, make_operands, make_type_operands, parse_shapes
from spqt.kernels import zigzag_cuda


def use_source(path: Path) -> None:
    """Compile the CUDA GEMV from `path` from now on (the loaded kernels dropped)."""
    zigzag_cuda.SOURCE = path
    zigzag_cuda.compiled.cache_clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True, help="the other zigzag_q4k.cu (this tree's is 'after')")
    ap.add_argument("--shapes", default="12288x4096,22016x4096,4096x11008,4096x4096,57344x8192,8192x28672")
    ap.add_argument("--types", default="q4_k")
    ap.add_argument("--variants", default="B2,B4,B4K")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    after = zigzag_cuda.SOURCE
    sources = {"before": args.before.resolve(), "after": after}
    variants = args.variants.split(",")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name()}: us a call, {args.variants} at {args.sparsity} (B2 at 0)", flush=True)
    for shape in parse_shapes(args.shapes):
        for fmt in args.types.split(","):
            if fmt == "q4_k":
                ops = make_operands(shape, l2)
                bench = lambda levels, vs: bench_shape(ops, levels, vs)  # noqa: E731
            else:
                ws, x = make_type_operands(shape, fmt, l2)
                bench = lambda levels, vs: bench_type_shape(ws, x, levels, vs)  # noqa: E731
            dense, sparse = [v for v in variants if v == "B2"], [v for v in variants if v != "B2"]
            times = {}  # (variant, sparsity) -> {source: [us a round]}
            for _ in range(args.rounds):
                for name, path in sources.items():
                    use_source(path)
                    rows = (bench([0.0], dense) if dense else []) + (bench([args.sparsity], sparse) if sparse else [])
                    for r in rows:
                        times.setdefault((r["variant"], r["sparsity"]), {}).setdefault(name, []).append(r["us"])
            for (v, s), by in times.items():
                b, a = statistics.median(by["before"]), statistics.median(by["after"])
                print(f"{shape[0]}x{shape[1]} {fmt} {v} s={s:.2f}: before {', '.join(f'{t:.2f}' for t in by['before'])}"
                      f"; after {', '.join(f'{t:.2f}' for t in by['after'])}; after / before {a / b:.3f}", flush=True)
            torch.cuda.empty_cache()
    use_source(after)


if __name__ == "__main__":
    main()
