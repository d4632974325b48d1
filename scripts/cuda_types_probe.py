"""Zigzag Q2_K, Q3_K, Q5_K, Q6_K or Q8_0: the CUDA GEMV (zigzag_q4k.cu, TYPE 2 / 3 / 5 / 6 / 8) against the Triton type kernel
(zigzag_types.py, its shipped or default config), B2 dense and B4 at 50 % (collection and reduction
included, as `spqt bench gemv` times them), on the same random matrices (the type's encoder on
N(0, 1/K) weights): the best CUDA config of a sweep (splits of tuning.cuda_candidates, 2-8 warps,
16, 8, 4 or 2 accumulators; Q2_K's tile pairs at 8, and its best with and without them), us, GB/s of the bytes
read, % of copy, B4 over B2.

    python scripts/cuda_types_probe.py [--type q2_k|q3_k|q5_k|q6_k|q8_0] [--shapes 28672x8192,...] [--json out.json]
"""

import argparse
import json

import torch

import spqt
from spqt import bench
from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gemv as kg
from spqt.kernels import tuning, zigzag_cuda
from spqt.kernels.collect import collect
from spqt.kernels.gpu_layout_types import repack as repack_types

SHAPES = "4096x4096,22016x4096,4096x11008,28672x8192,8192x28672,57344x8192"

parser = argparse.ArgumentParser()
parser.add_argument("--type", default="q5_k", choices=("q2_k", "q3_k", "q5_k", "q6_k", "q8_0"))
parser.add_argument("--shapes", default=SHAPES)
parser.add_argument("--xor", action="store_true",
                    help="also B2 at its best config with the arithmetic replaced by an XOR of the loaded words "
                         "(-DPROBE_XOR=1: the same loads, wrong sums): what the arithmetic costs")
parser.add_argument("--json")
args = parser.parse_args()
copy = bench.copy_bandwidth()
print(f"copy {copy:.0f} GB/s", flush=True)
l2 = torch.cuda.get_device_properties(0).L2_cache_size
rows = []
print("shape        MB | triton B2 us %copy  B4 us B4/B2 | cuda B2 us %copy  B4 us B4/B2 | B2 x  B4 x | cuda B2 / B4 config")
for spec in args.shapes.split(","):
    n, k = (int(v) for v in spec.split("x"))
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g) * k**-0.5
    qw = QuantizedWeight(spqt.quantize(w, args.type, "zigzag"), args.type, "zigzag", (n, k))
    del w
    x = torch.randn(k, device="cuda", generator=g).half()
    tri = repack_types(qw, "cuda")
    copies = max(2, -(-4 * l2 // tri.nbytes))
    tris = bench.weight_copies(tri, copies)
    res = {}
    for r in bench.bench_type_shape(tris, x, [0.0, 0.5], ("B2", "B4")):
        res["triton", r["variant"]] = r["us"]
    tris = None
    cu = zigzag_cuda.kquant_layout(args.type)[1](qw, "cuda")
    cus = bench.weight_copies(cu, copies)
    t = torch.quantile(x.float().abs(), 0.5).reshape(())
    cands = [dict(c, pipe=0) for c in tuning.cuda_candidates("zigzag_dense", n, k, bits=kg.TYPE_BITS[args.type])
             if c["num_warps"] > 1 and not c["pipe"] and not c["fused"]]
    wss = {c["split"]: kg.ZigzagWorkspace(cu, c["split"], torch.float16) for c in cands}

    def calls(cfg, mode):
        ws = wss[cfg["split"]]
        kw = {"num_warps": cfg["num_warps"], "acc": cfg["acc"], "impl": "cuda",
              "extra": tuning.launch_args(cfg)["extra"]}
        if mode == kg.MODE_DENSE:
            return [(lambda w=w: kg.gemv_zigzag(w, x, kg.MODE_DENSE, ws, **kw)) for w in cus]
        return [(lambda w=w: (collect(x, t, ws.idx, ws.count),
                              kg.gemv_zigzag(w, x, kg.MODE_INDEXED, ws, idx=ws.idx, count=ws.count, **kw))) for w in cus]

    for mode, name in ((kg.MODE_DENSE, "B2"), (kg.MODE_INDEXED, "B4")):
        us, cfg = bench._fastest(cands, lambda c, mode=mode: calls(c, mode))
        res["cuda", name] = us
        res["cuda", name, "cfg"] = {key: cfg[key] for key in ("split", "num_warps", "acc", "pairs") if key in cfg}
        if any(c.get("pairs") for c in cands):  # the type's tile pairs (Q2_K): the best config with and without
            for pairs in (False, True):
                us_p, cfg_p = bench._fastest([c for c in cands if c.get("pairs", False) == pairs],
                                             lambda c, mode=mode: calls(c, mode))
                print(f"{spec:11s} {name} best {'with' if pairs else 'without'} tile pairs: {us_p:.2f} us "
                      f"({100 * cu.nbytes / 1e3 / us_p / copy:.1f} % of copy) split {cfg_p['split']} warps "
                      f"{cfg_p['num_warps']} acc {cfg_p['acc']}", flush=True)
                res["cuda", name, "pairs" if pairs else "plain"] = round(us_p, 2)
    if args.xor:
        best = res["cuda", "B2", "cfg"]
        for name, extra in (("base", ()), ("xor", ("-DPROBE_XOR=1",))):
            ws = wss[best["split"]]
            kw = {"num_warps": best["num_warps"], "acc": best["acc"], "impl": "cuda",
                  "extra": extra + (("-DPAIRS=1",) if best.get("pairs") else ())}
            seq = bench._at_least_16([(lambda w=w: kg.gemv_zigzag(w, x, kg.MODE_DENSE, ws, **kw)) for w in cus])
            res["cuda", "B2", name] = bench.time_graph(seq, replays=10, warmup=2) * 1e6
    mb = cu.nbytes / 1e6
    row = {"shape": spec, "mb": mb}
    for impl in ("triton", "cuda"):
        b2, b4 = res[impl, "B2"], res[impl, "B4"]
        row[impl] = {"b2_us": round(b2, 2), "b4_us": round(b4, 2), "b2_pct_copy": round(100 * mb * 1e3 / b2 / copy, 1),
                     "b4_over_b2": round(b2 / b4, 3)}
    row["cuda"]["b2_cfg"], row["cuda"]["b4_cfg"] = res["cuda", "B2", "cfg"], res["cuda", "B4", "cfg"]
    for name in ("B2", "B4"):
        for kind in ("plain", "pairs"):
            if ("cuda", name, kind) in res:
                row["cuda"][f"{name.lower()}_{kind}_us"] = res["cuda", name, kind]
    if args.xor:  # the same config timed again, and with its arithmetic out
        for name in ("base", "xor"):
            us = res["cuda", "B2", name]
            row["cuda"][f"b2_{name}_us"], row["cuda"][f"b2_{name}_pct_copy"] = round(us, 2), round(100 * mb * 1e3 / us / copy, 1)
        print(f"{spec:11s} B2 at its config again {row['cuda']['b2_base_us']:.2f} us ({row['cuda']['b2_base_pct_copy']} % of "
              f"copy); arithmetic out (PROBE_XOR) {row['cuda']['b2_xor_us']:.2f} us ({row['cuda']['b2_xor_pct_copy']} %)",
              flush=True)
    rows.append(row)
    tr, c = row["triton"], row["cuda"]
    print(f"{spec:11s} {mb:6.1f} | {tr['b2_us']:9.2f} {tr['b2_pct_copy']:5.1f} {tr['b4_us']:6.2f} {tr['b4_over_b2']:5.2f} | "
          f"{c['b2_us']:10.2f} {c['b2_pct_copy']:5.1f} {c['b4_us']:6.2f} {c['b4_over_b2']:5.2f} | "
          f"{tr['b2_us'] / c['b2_us']:4.2f} {tr['b4_us'] / c['b4_us']:5.2f} | {c['b2_cfg']} / {c['b4_cfg']}", flush=True)
    cus = wss = None
    torch.cuda.empty_cache()
if args.json:
    with open(args.json, "w") as f:
        json.dump({"type": args.type, "copy_gbs": copy, "commit": bench.git_commit(), "rows": rows}, f, indent=1)
