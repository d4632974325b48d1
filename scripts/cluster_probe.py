"""How much longer runs of kept columns would make a sparse map faster (issue 14: sparsity that pays): the sparse
GEMVs at 50 % on inputs whose kept columns (about half: |x| above the matching quantile) are a random half, a random half of blocks of
16 / 64 / 256 contiguous columns, or the first half of the columns; B2 beside them (device machine).

A column order fixed offline (rows of gate|up with the columns of down, v's head dims with o's, the residual stream's
channels for q|k|v and gate|up) could make the kept inputs of a real model run longer; this bounds what that could
gain before anything is built. "first half" is the bound for the collected B4 (its list is balanced across programs);
for MODE_KEPT (B4K, B4KS: a program a share of columns) it leaves half the programs with nothing to do.

    python3 scripts/cluster_probe.py [--shapes 4096x11008,22016x4096,57344x8192] [--variants B4,B4K,B4KS]

`spqt bench gemv`'s timing (bench.bench_shape: graphs of >= 16 calls over weight copies larger than 4x L2, median of
30), a line per shape, pattern and variant.
"""

import argparse

import torch

from spqt.bench import bench_shape, copy_bandwidth, make_operands, parse_shapes

PATTERNS = ("random", "blocks16", "blocks64", "blocks256", "first half")


def kept_pattern(k: int, pattern: str, g: torch.Generator) -> torch.Tensor:
    """(K,) bool: the columns kept at 50 % under the pattern (about half of them)."""
    if pattern == "first half":
        return torch.arange(k, device="cuda") < k // 2
    block = 1 if pattern == "random" else int(pattern.removeprefix("blocks"))
    blocks = -(-k // block)
    chosen = torch.randperm(blocks, device="cuda", generator=g)[: blocks // 2]
    kept_blocks = torch.zeros(blocks, dtype=torch.bool, device="cuda")
    kept_blocks[chosen] = True
    return kept_blocks.repeat_interleave(block)[:k]


def x_with(kept: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """fp16 x whose kept columns have |x| in [1, 3) and the others in [0, 0.9): random signs."""
    k = kept.numel()
    mag = torch.where(kept, 1 + 2 * torch.rand(k, device="cuda", generator=g),
                      0.9 * torch.rand(k, device="cuda", generator=g))
    sign = torch.where(torch.rand(k, device="cuda", generator=g) < 0.5, -1.0, 1.0)
    return (mag * sign).half()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="12288x4096,4096x4096,22016x4096,4096x11008,57344x8192,8192x28672")
    ap.add_argument("--variants", default="B4,B4K,B4KS", help="sparse variants (B2 is timed once a shape)")
    args = ap.parse_args()
    variants = args.variants.split(",")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"{torch.cuda.get_device_name()}: copy {copy_bandwidth():.0f} GB/s; us a call, 50 % of the columns kept")
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in parse_shapes(args.shapes):
        ops = make_operands(shape, l2)
        dense = bench_shape(ops, [0.0], ["B2"])[0]["us"]  # B2 reads every column whatever x holds
        print(f"{shape[0]}x{shape[1]} B2 {dense:.2f}", flush=True)
        for pattern in PATTERNS:
            kept = kept_pattern(shape[1], pattern, g)
            ops.x = x_with(kept, g)
            level = 1.0 - float(kept.float().mean())  # the quantile whose threshold keeps exactly these columns
            rows = bench_shape(ops, [level], [v for v in variants if v != "B2"])
            cells = [f"{r['variant']} {r['us']:.2f} ({dense / r['us']:.2f}x)" for r in rows]
            active = rows[0]["active"] if rows else float("nan")
            print(f"{shape[0]}x{shape[1]} {pattern:<10} kept {1 - level:.3f} (active {active:.3f}): " + "; ".join(cells),
                  flush=True)
        del ops
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
