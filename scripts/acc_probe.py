"""B2 / B4 of the zigzag kernel over a config sweep on a few shapes: the best time per shape, GB/s,
% of copy, B4 (50 %, collection included) over B2. Run it on two trees in one call to compare
kernels (PYTHONPATH picks the tree; a tree whose kernel lacks a knob ignores it).

    python scripts/acc_probe.py [--shapes 4096x4096,...] [--knobs acc,maxnreg] [--json out.json]
"""

import argparse
import inspect
import itertools
import json


from spqt import bench
from spqt.kernels import gemv as kg

SHAPES = "4096x4096,12288x4096,22016x4096,4096x11008,28672x8192,57344x8192,8192x28672"

parser = argparse.ArgumentParser()
parser.add_argument("--shapes", default=SHAPES)
parser.add_argument("--json")
parser.add_argument("--tag", default="")
args = parser.parse_args()

knobs = inspect.signature(kg.gemv_zigzag).parameters
has_acc = "acc" in knobs
has_pipe = "pipe" in knobs


def candidates(variant, n, k):
    rows = -(-n // 256)
    base = -(-132 // rows)
    splits = sorted({max(1, min(int(base * f), -(-k // 16))) for f in (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24)})
    out = []
    for s, w, c, a in itertools.product(splits, (1, 2), (1, 2), (0, 1)):
        for acc in ((2, 4) if has_acc else (None,)):
            for pipe in ((0, 1) if has_pipe and c == 1 else (None,)):
                cfg = {"split": s, "num_warps": w, "chunks": c, "ahead": a}
                if acc:
                    cfg["acc"] = acc
                if pipe is not None:
                    cfg["pipe"] = pipe
                out.append(cfg)
    return out


copy = bench.copy_bandwidth()
print(f"{args.tag} copy {copy:.0f} GB/s, acc knob: {has_acc}", flush=True)
shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
entries = bench.tune(shapes, log=lambda m: print(args.tag, m, flush=True), variants=("zigzag_dense", "zigzag_sparse"),
                     candidates=candidates)
rows = []
print(f"\n{args.tag} shape      MB   B2 us  GB/s  %copy | B4@50 us  B4/B2 | B2 cfg")
for n, k in shapes:
    key = f"{n}x{k}"
    mb = 144 * -(-n // 256) * k / 1e6
    d, s = entries["zigzag_dense"][key], entries["zigzag_sparse"][key]
    gbs = mb * 1e3 / d["us"]
    rows.append({"shape": key, "mb": mb, "b2_us": d["us"], "b4_us": s["us"], "b2_cfg": d, "b4_cfg": s,
                 "pct_copy": 100 * gbs / copy})
    print(f"{args.tag} {key:11s} {mb:5.1f} {d['us']:7.2f} {gbs:5.0f} {100 * gbs / copy:5.1f} | {s['us']:8.2f} "
          f"{d['us'] / s['us']:6.2f} | {d} / {s}")
if args.json:
    with open(args.json, "w") as f:
        json.dump({"copy_gbs": copy, "rows": rows}, f, indent=1)
