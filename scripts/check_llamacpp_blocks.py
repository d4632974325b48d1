"""Compare our encoders with llama.cpp's reference quantizers on the default model's real matrices.

Needs a driver built OUTSIDE this repository from llama.cpp's ggml-quants.c (tests/data/GOLDEN.md
says how): ``driver TYPE in.bin out.bin`` quantizes float32 weights with quantize_row_<type>_ref.
For each chosen layer, each fused linear map (q|k|v, o, gate|up, down as the .spqt stores them),
each layout and each type, the same float32 blocks go through both encoders; prints the share of
byte-identical blocks and, for the rest, which fields differ.

    python scripts/check_llamacpp_blocks.py --driver /tmp/golden/driver --layers 0,29
"""

import argparse
import os
import subprocess
import tempfile

import numpy as np
import torch

from spqt.checkpoint import LINEAR_GROUPS
from spqt.default_model import default_gguf
from spqt.formats import FORMATS, codec
from spqt.layouts import matrix_to_blocks
from spqt.sources import open_source


def llamacpp_blocks(driver: str, name: str, values: np.ndarray) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.bin"), os.path.join(tmp, "out.bin")
        values.astype(np.float32).tofile(src)
        subprocess.run([driver, name, src, dst], check=True)
        return np.fromfile(dst, dtype=np.uint8).reshape(values.shape[0], -1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--driver", required=True)
    ap.add_argument("--layers", default="0,29")
    ap.add_argument("--types", default=",".join(FORMATS))
    args = ap.parse_args()
    source = open_source(default_gguf())
    layers = [int(v) for v in args.layers.split(",")]
    totals: dict = {}
    for name in args.types.split(","):
        fmt = FORMATS[name]
        encode = codec(name)[0]
        for layout in ("row", "zigzag"):
            same = total = 0
            for i in layers:
                for group, members in LINEAR_GROUPS.items():
                    w = torch.cat([source.tensor(f"layers.{i}.{m}") for m in members], dim=0)
                    values = matrix_to_blocks(w, layout, fmt.block_size)
                    ours = encode(values).numpy()
                    theirs = llamacpp_blocks(args.driver, name, values.numpy())
                    diff = (ours != theirs).any(axis=1)
                    same += int((~diff).sum())
                    total += len(diff)
                    for b in np.nonzero(diff)[0][:3]:
                        print(f"  {name} {layout} layers.{i}.{group} block {b}: bytes {np.nonzero(ours[b] != theirs[b])[0].tolist()}")
            totals[(name, layout)] = (same, total)
            print(f"{name:5s} {layout:6s} {same}/{total} blocks identical ({100 * same / total:.3f} %)", flush=True)


if __name__ == "__main__":
    main()
