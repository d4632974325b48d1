"""The prefill's dequantization of zigzag Q4_K maps on CUDA (its fp16 write is most of a 33-2,048-token prefill's
time on a 7B-sized model): the shipped block kernel against variants, GB/s read plus written, beside a plain write
(fill) and a copy of as many bytes.

    python3 scripts/dequant_probe.py [--shapes 12288x4096,4096x4096,22016x4096,4096x11008] [--variants ...]
        [--types q4_k,q5_k,...] [--json OUT]
    python3 scripts/dequant_probe.py --ncu VARIANT SHAPE    (two eager launches, for Nsight Compute)

Variants: blocks:B:W (gemv._dequant_kernel, B blocks a program, W warps; blocks:16:4 shipped until 2b11204),
tile:WN:BK:W (q4k_tiles._dequant_kernel, a program WN words x BK columns; tile:4:128:4 ships since); deq:B
(gemv.dequantize as the runtime calls it, its block kernels at B blocks a program: every type, the CUDA GEMV's
layout; --types' other types run the deq variants only).
Times: CUDA-graph replays of 16+ calls over rotated weight copies (4x the L2 cache), median of 30 (bench.time_graph).
"""

import argparse
import json

import torch
import triton

import spqt
from spqt.bench import copy_bandwidth, git_commit, make_type_operands, time_graph, weight_copies
from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gemv as kg
from spqt.kernels import q4k_tiles as qt
from spqt.kernels.gpu_layout import repack

DEFAULT_VARIANTS = "deq:16,deq:8,deq:4,blocks:16:4,blocks:32:4,blocks:64:8,tile:16:64:4,tile:8:64:4,tile:4:128:4,tile:4:256:4,tile:16:32:4"


def launcher(spec: str):
    """A variant's name -> fn(w, out)."""
    kind, *nums = spec.split(":")
    vals = [int(v) for v in nums]
    if kind == "deq":

        def run(w, out):
            kg.DEQUANT_BLOCKS = vals[0]
            kg.dequantize(w, torch.float16, out)
        return run
    if kind == "blocks":
        block_b, warps = vals

        def run(w, out):
            n, k = w.shape
            rows, cols = w.grid
            grid = (triton.cdiv(rows * cols, block_b),)
            kg._dequant_kernel[grid](w.quants, w.head.view(torch.int64), out, n, k, cols, rows * cols, ZIGZAG=True,
                                     BLOCK_B=block_b, num_warps=warps, f_ptr=None, FIFTH=False)
        return run
    if kind == "tile":
        wn, bk, warps = vals

        def run(w, out):
            n, k = w.shape
            grid = (w.grid[0] * (qt.WORDS // wn), triton.cdiv(k, bk))
            qt._dequant_kernel[grid](w.quants, w.head.view(torch.int64), out, n, k, WN=wn, BK=bk, num_warps=warps)
        return run
    raise SystemExit(f"unknown variant {spec!r}")


def make(shape, fmt: str = "q4_k"):
    """Random zigzag weights of one shape and type in the layout the runtime runs on CUDA."""
    if fmt != "q4_k":
        return make_type_operands(shape, fmt, 0)[0][0]
    n, k = shape
    w = torch.randn(n, k, device="cuda") * k**-0.5
    return repack(QuantizedWeight(spqt.quantize(w, "q4_k", "zigzag"), "q4_k", "zigzag", (n, k)), "cuda")


def time_shape(fmt: str, shape, variants, props) -> dict:
    """Every variant (deq only for a type other than q4_k) on one shape: a row, also printed."""
    n, k = shape
    gw = make(shape, fmt)
    ref = kg.dequantize(gw, torch.float16)
    copies = weight_copies(gw, max(2, triton.cdiv(4 * props.L2_cache_size, gw.nbytes)))
    outs = [torch.empty((n, k), dtype=torch.float16, device="cuda") for _ in range(2)]
    nbytes = gw.nbytes + 2 * n * k
    fill_us = 1e6 * time_graph([lambda o=outs[i % 2]: o.fill_(1.0) for i in range(16)])
    row = {"type": fmt, "shape": f"{n}x{k}", "bytes": nbytes, "fill_us": fill_us, "fill_gbps": 2 * n * k / fill_us / 1e3,
           "variants": {}}
    line = [f"{fmt} {n:>5d}x{k:<5d} ({nbytes / 1e6:6.1f} MB): fill {row['fill_gbps']:6.0f} GB/s"]
    for spec in variants:
        if fmt != "q4_k" and not spec.startswith("deq:"):
            continue
        run = launcher(spec)
        check = torch.full((n, k), float("nan"), dtype=torch.float16, device="cuda")
        run(gw, check)
        exact = bool(torch.equal(check, ref))
        us = 1e6 * time_graph([lambda w=copies[i % len(copies)], o=outs[i % 2]: run(w, o)
                               for i in range(max(16, len(copies)))])
        row["variants"][spec] = {"us": us, "gbps": nbytes / us / 1e3, "exact": exact}
        line.append(f"{spec} {us:7.1f} us {nbytes / us / 1e3:6.0f} GB/s{'' if exact else ' WRONG'}")
    kg.DEQUANT_BLOCKS = 16
    print("; ".join(line), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="12288x4096,4096x4096,22016x4096,4096x11008")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--types", default="q4_k")
    ap.add_argument("--ncu", nargs=2, metavar=("VARIANT", "SHAPE"))
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.ncu:
        gw = make(tuple(int(v) for v in args.ncu[1].split("x")))
        out = torch.empty(gw.shape, dtype=torch.float16, device="cuda")
        run = launcher(args.ncu[0])
        for _ in range(2):
            run(gw, out)
        torch.cuda.synchronize()
        return
    props = torch.cuda.get_device_properties(0)
    copy = copy_bandwidth()
    print(f"{props.name}: copy {copy:.0f} GB/s (read + written)")
    rows = []
    for fmt in args.types.split(","):
        for shape in args.shapes.split(","):
            rows.append(time_shape(fmt, tuple(int(v) for v in shape.split("x")), args.variants.split(","), props))
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"commit": git_commit(), "device": props.name, "copy_gbps": copy, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
