"""B2 with the level planes streamed through a shared-memory ring of bulk copies (zigzag_q4k.cu's BULK, the
TMA) against B2 at its shipped config, per shape and type: the GEMV alone (no reduction when the config is
fused), CUDA graphs over rotated weight copies (bench._fastest), % of copy of the bytes read.

Per shape: the shipped config timed; the same config with a ring of 2, 3, 4, 6 chunks, pipe 0 / 1; then a sweep
of the CUDA candidates' splits x 2 / 4 / 8 warps x 2 / 16 accumulators with rings of 2 and 4 (reduction finish).
The best ring config's output is checked bit for bit against the same config without the ring (the arithmetic
is the same, only where the level words come from differs).

    python scripts/bulk_probe.py [--shapes 28672x8192,...] [--types q4_k,q6_k] [--json out.json]
"""

import argparse
import json

import torch

from spqt import bench
from spqt.kernels import gemv as kg
from spqt.kernels import tuning, zigzag_cuda

SHAPES = "10240x8192,8192x8192,57344x8192,8192x28672,28672x8192,12288x4096,22016x4096,4096x11008,4096x4096"

parser = argparse.ArgumentParser()
parser.add_argument("--shapes", default=SHAPES)
parser.add_argument("--types", default="q4_k")
parser.add_argument("--depths", default="2,4", help="ring depths of the sweep")
parser.add_argument("--json")
args = parser.parse_args()
copy = bench.copy_bandwidth()
print(f"copy {copy:.0f} GB/s, commit {bench.git_commit()}", flush=True)
props = torch.cuda.get_device_properties(0)
rows = []
for fmt in args.types.split(","):
    for spec in args.shapes.split(","):
        n, k = (int(v) for v in spec.split("x"))
        if fmt == "q4_k":
            ops = bench.make_operands((n, k), props.L2_cache_size)
            weights, x = ops.zig, ops.x
            cfg = tuning.config("zigzag_dense", n, k)
        else:
            weights, x = bench.make_type_operands((n, k), fmt, props.L2_cache_size)
            cfg = tuning.cuda_type_config("dense", fmt, n, k)
        if cfg.get("impl") != "cuda":
            cfg = {"impl": "cuda", "split": cfg["split"], "num_warps": 4, "chunks": 1, "pipe": 0, "acc": 2}
        nbytes = weights[0].nbytes
        workspaces = {}

        def calls(c):
            if c["split"] not in workspaces:
                workspaces[c["split"]] = kg.ZigzagWorkspace(weights[0], c["split"], torch.float16)
            ws = workspaces[c["split"]]
            return [(lambda w=w: kg.gemv_zigzag(w, x, kg.MODE_DENSE, ws, **tuning.launch_args(c))) for w in weights]

        def record(label, us, c):
            rows.append({"type": fmt, "shape": spec, "mb": round(nbytes / 1e6, 1), "variant": label,
                         "config": {key: c.get(key) for key in ("split", "num_warps", "acc", "pipe", "fused",
                                                                "cluster", "bulk")},
                         "us": round(us, 2), "pct_copy": round(100 * nbytes / 1e3 / us / copy, 1)})
            r = rows[-1]
            print(f"{fmt} {spec:11s} {r['mb']:6.1f} MB {label:26s} {us:8.2f} us {r['pct_copy']:5.1f} % of copy  "
                  f"{r['config']}", flush=True)

        base_us, _ = bench._fastest([cfg], calls)
        record("shipped", base_us, cfg)
        best = (base_us, cfg)
        for depth in (2, 3, 4, 6):
            for pipe in (0, 1):
                c = cfg | {"bulk": depth, "pipe": pipe}
                us, _ = bench._fastest([c], calls)
                record(f"shipped + ring {depth} pipe {pipe}", us, c)
                best = min(best, (us, c), key=lambda b: b[0])
        bits = kg.TYPE_BITS[fmt]
        sweep = [c | {"bulk": d} for c in tuning.cuda_candidates("zigzag_dense", n, k, bits)
                 if c["num_warps"] > 1 and not c["pipe"] and not c["fused"] and not c.get("cluster")
                 for d in (int(v) for v in args.depths.split(","))]
        us, c = bench._fastest(sweep, calls)
        record("best of the ring sweep", us, c)
        best = min(best, (us, c), key=lambda b: b[0])
        if best[1].get("bulk"):
            c = best[1]
            ws = kg.ZigzagWorkspace(weights[0], c["split"], torch.float16)
            ws.y.fill_(float("nan"))
            ring = kg.gemv_zigzag(weights[0], x, kg.MODE_DENSE, ws, **tuning.launch_args(c)).clone()
            ws.y.fill_(float("nan"))
            plain = kg.gemv_zigzag(weights[0], x, kg.MODE_DENSE, ws, **tuning.launch_args(c | {"bulk": 0})).clone()
            same = torch.equal(ring, plain) and bool(ring.isfinite().all())
            print(f"{fmt} {spec}: best {best[0]:.2f} us against shipped {base_us:.2f} ({base_us / best[0]:.3f}x); "
                  f"ring output equals the plain kernel's: {same}", flush=True)
            rows.append({"type": fmt, "shape": spec, "check_equal": same})
        weights = x = None
        workspaces.clear()
        torch.cuda.empty_cache()
if args.json:
    with open(args.json, "w") as f:
        json.dump({"copy_gbs": copy, "commit": bench.git_commit(), "rows": rows}, f, indent=1)
