"""One decode token's GEMVs on the CPU per zigzag type: the native map (cpu_native.NativeZigzagLinear)
against the fp16 copy (cpu_fp16.HalfGemvLinear), both through their `product`.

The default model's maps: 960x576 (q|k|v), 576x576 (o), 3072x576 (gate|up), 576x1536 (down), 30 of each,
each a distinct random matrix (so the 120 maps stream from memory as a token's do); W's blocks are random
bytes with finite fp16 scales (the speed does not depend on the values). Prints, per type, the native and
fp16 milliseconds of the 120 maps (median and min over the rounds), their alternation interleaved.

    PYTHONPATH=src python scripts/cpu_types_bench.py [--types q8_0,q6_k,q5_k,q4_k] [--rounds 15]
"""

import argparse
import statistics
import time

import numpy as np
import torch

from spqt.checkpoint import QuantizedWeight
from spqt.formats import get_format
from spqt.kernels import cpu_native
from spqt.kernels.cpu_fp16 import HalfGemvLinear
from spqt.layouts import grid_shape

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HALVES = {"q4_k": (0, 2), "q8_0": (0,), "q6_k": (208,), "q5_k": (0, 2), "q3_k": (108,), "q2_k": (80, 82)}


def random_weight(rng, fmt: str, n: int, k: int) -> QuantizedWeight:
    block = get_format(fmt)
    rows, cols = grid_shape("zigzag", (n, k), block.block_size)
    blocks = rng.integers(0, 256, (rows, cols, block.block_bytes), dtype=np.uint8)
    for at in HALVES[fmt]:
        blocks[:, :, at:at + 2] = (rng.uniform(-1, 1, (rows, cols)) * 1e-3).astype(np.float16)[..., None].view(np.uint8)
    return QuantizedWeight(torch.from_numpy(blocks), fmt, "zigzag", (n, k))


def token_ms(maps, inputs) -> float:
    start = time.perf_counter()
    for lin, x in zip(maps, inputs):
        lin.product(x)
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="q8_0,q6_k,q5_k,q4_k")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"torch threads {torch.get_num_threads()}")
    for fmt in args.types.split(","):
        weights = [random_weight(rng, fmt, n, k) for n, k in SHAPES for _ in range(30)]
        native = [cpu_native.make_native_linear(w, torch.float32, "cpu") for w in weights]
        assert all(isinstance(m, cpu_native.NativeZigzagLinear) for m in native)
        half = [HalfGemvLinear(w, torch.float32, "cpu") for w in weights]
        inputs = [torch.randn(1, w.shape[1]) for w in weights]
        token_ms(native, inputs), token_ms(half, inputs)  # warm
        times = {"native": [], "fp16": []}
        for _ in range(args.rounds):
            times["native"].append(token_ms(native, inputs))
            times["fp16"].append(token_ms(half, inputs))
        mb = sum(w.nbytes for w in weights) / 1e6
        line = ", ".join(f"{name} median {statistics.median(t):.2f} ms min {min(t):.2f}" for name, t in times.items())
        ratio = statistics.median(times["fp16"]) / statistics.median(times["native"])
        print(f"{fmt}: {mb:.1f} MB of blocks; {line}; fp16 / native {ratio:.2f}x", flush=True)


if __name__ == "__main__":
    main()
