"""The prefill's product on CUDA: zigzag Q4_K times M tokens, dequantize + cuBLAS against the GEMMs that read the
blocks (kernels/gemm_q4k.py in Triton, kernels/gemm_cuda.py in CUDA), per map shape and token count; with --sweep,
gemm_q4k's rule against one-factor variations of its tile (which way each knob pays); with --configs, against the
tiles listed (six integers each, 0 keeps the rule's value, as SPQT_GEMM_CONFIG); with --cuda-configs, the CUDA GEMM's
rule against the configs listed (TOKT,WARPS,SPLIT,PIPE,RING,RESIDENT; 0 keeps the rule's value, -1 for 0; without
a SPLIT the rule's split for the config listed).

    python3 scripts/prefill_gemm_probe.py [--shapes 12288x4096,4096x4096,22016x4096,4096x11008]
        [--tokens 16,32,64,256,1024] [--sweep [--sweep-max 64]] [--configs WN,BM,BK,SPLIT,WARPS,STAGES;...]
        [--cuda-configs TOKT,WARPS,SPLIT,PIPE,RING,RESIDENT;...] [--no-triton] [--dtype fp16|bf16] [--json OUT]

Times: CUDA-graph replays of 16+ calls over rotated weight copies (4x the L2 cache), median of 30 (bench.time_graph).
"""

import argparse
import json

import torch
import triton

import spqt
from spqt.bench import git_commit, time_graph, weight_copies
from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gemm_cuda as gc
from spqt.kernels import gemm_q4k as gq
from spqt.kernels import gemv as kg
from spqt.kernels.gpu_layout import repack


def variants(base: dict) -> list[tuple[str, dict]]:
    """One-factor variations of a config: (label, config)."""
    out = []
    for key, values in (("WN", (4, 8, 16)), ("BK", (32, 64, 128)), ("num_warps", (8,)), ("num_stages", (2, 4)),
                        ("BM", (base["BM"] // 2, base["BM"] * 2)), ("SPLIT", (max(1, base["SPLIT"] // 2),
                                                                              base["SPLIT"] * 2))):
        for v in values:
            if v != base[key] and not (key == "BM" and not 16 <= v <= 128):
                out.append((f"{key}={v}", base | {key: v}))
    return out


def config_list(text: str, flag: str, fields: str) -> list[list[int]]:
    """A flag's configs: `fields`' count of integers each, configs separated by ;; else exit with one line."""
    try:
        listed = [[int(v) for v in c.split(",")] for c in text.split(";") if c]
    except ValueError:
        listed = [[]]
    if any(len(c) != len(fields.split(",")) for c in listed):
        raise SystemExit(f"{flag}: {len(fields.split(','))} integers a config ({fields}), configs separated by ;")
    return listed


def listed_cuda(rule: dict, fields: list[int], m: int, n: int, k: int, sms: int) -> dict:
    """The CUDA GEMM's rule with a listed config's non-zero fields (-1: 0), made whole as config() makes an override
    (gemm_cuda.completed: without a RESIDENT the bound the config needs, without a SPLIT the rule's split for it)."""
    given = {key for key, v in zip(gc.KEYS, fields) if v}
    try:
        return gc.completed(m, n, k, sms, rule | {key: max(v, 0) for key, v in zip(gc.KEYS, fields) if v}, given)
    except ValueError as err:
        raise SystemExit(f"--cuda-configs: {err}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="12288x4096,4096x4096,22016x4096,4096x11008")
    ap.add_argument("--tokens", default="16,32,64,256,1024")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-max", type=int, default=64, help="sweep token counts up to this")
    ap.add_argument("--configs", default="", help="tiles to time beside the rule: WN,BM,BK,SPLIT,WARPS,STAGES;...")
    ap.add_argument("--cuda-configs", default="",
                    help="CUDA GEMM configs beside its rule: TOKT,WARPS,SPLIT,PIPE,RING,RESIDENT;...")
    ap.add_argument("--no-triton", action="store_true", help="leave gemm_q4k out (dequantize + cuBLAS and CUDA only)")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="x's and y's dtype")
    ap.add_argument("--json")
    args = ap.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    cuda_listed = config_list(args.cuda_configs, "--cuda-configs", "TOKT,WARPS,SPLIT,PIPE,RING,RESIDENT")
    listed = config_list(args.configs, "--configs", "WN,BM,BK,SPLIT,WARPS,STAGES")
    keys = ("WN", "BM", "BK", "SPLIT", "num_warps", "num_stages")
    for c in listed:  # a tile the kernel cannot run stops here, not after the shapes before it
        try:
            gq.check_config({key: v or 16 for key, v in zip(keys, c)})
        except ValueError as err:
            raise SystemExit(f"--configs: {err}")
    props = torch.cuda.get_device_properties(0)
    l2, sms = props.L2_cache_size, props.multi_processor_count
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda") * k**-0.5
        gw = repack(QuantizedWeight(spqt.quantize(w, "q4_k", "zigzag"), "q4_k", "zigzag", (n, k)), "cuda")
        del w
        copies = weight_copies(gw, max(2, triton.cdiv(4 * l2, gw.nbytes)))
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, k, device="cuda").to(dtype)
            ref = torch.nn.functional.linear(x, kg.dequantize(gw, dtype)).float()
            rule = gq.config(m, n, k, sms)
            err = float("nan") if args.no_triton else float(
                (gq.gemm_q4k(gw, x, rule).float() - ref).abs().max() / ref.abs().max())

            def timed(fn):
                return 1e6 * time_graph([lambda w=copies[i % len(copies)]: fn(w) for i in range(max(16, len(copies)))])

            base_us = timed(lambda w: torch.nn.functional.linear(x, kg.dequantize(w, dtype)))
            rule_us = float("nan") if args.no_triton else timed(lambda w: gq.gemm_q4k(w, x, rule))
            row = {"shape": shape, "tokens": m, "dtype": args.dtype, "dequant_cublas_us": base_us,
                   "gemm_us": rule_us, "rule": rule, "rel_err": err, "variants": {}}
            cuda_rule = gc.config(m, n, k, sms)
            cuda_cfgs = [("rule", cuda_rule)] + [(",".join(str(v) for v in c), listed_cuda(cuda_rule, c, m, n, k, sms))
                                                 for c in cuda_listed]
            row["cuda"] = {}
            for label, cfg in cuda_cfgs:
                try:  # gemm refuses, before launching, a config or share it cannot run
                    cerr = float((gc.gemm(gw, x, cfg).float() - ref).abs().max() / ref.abs().max())
                except ValueError as why:
                    print(f"{shape:>11s} {m:5d} tok: CUDA GEMM {label:>12s} skipped: {why}", flush=True)
                    continue
                cus = timed(lambda w, cfg=cfg: gc.gemm(w, x, cfg))
                row["cuda"][label] = {"us": cus, "rel_err": cerr, "config": cfg}
                print(f"{shape:>11s} {m:5d} tok: CUDA GEMM {label:>12s} {cus:8.1f} us ({base_us / cus:5.2f}x over "
                      f"dequant+cuBLAS {base_us:.1f}; "
                      + ",".join(f"{key}={cfg[key]}" for key in gc.KEYS) + f"; err {cerr:.1e})", flush=True)
            if args.no_triton:
                rows.append(row)
                continue
            best = ("rule", rule_us)
            tried = variants(rule) if args.sweep and m <= args.sweep_max else []
            for c in listed:
                cfg = rule | {key: v for key, v in zip(keys, c) if v}
                tried.append((",".join(str(cfg[key]) for key in keys), cfg))
            if tried:
                for label, cfg in tried:
                    us = timed(lambda w, cfg=cfg: gq.gemm_q4k(w, x, cfg))
                    row["variants"][label] = us
                    best = min(best, (label, us), key=lambda b: b[1])
            rows.append(row)
            tiles = ",".join(f"{key}={rule[key]}" for key in ("WN", "BM", "BK", "SPLIT", "num_warps", "num_stages"))
            print(f"{shape:>11s} {m:5d} tok: dequant+cuBLAS {base_us:8.1f} us, gemm_q4k {rule_us:8.1f} us "
                  f"({base_us / rule_us:5.2f}x; {tiles}; err {err:.1e})"
                  + (f"; best {best[0]} {best[1]:.1f} us" if tried else ""), flush=True)
            if tried:
                print("      " + ", ".join(f"{label} {us:.1f}" for label, us in row["variants"].items()), flush=True)
        copies = gw = None  # freed before the next shape's
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"commit": git_commit(), "device": props.name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
