"""The prefill's dequantization of zigzag Q4_K maps on CUDA (its fp16 write is most of a 33-2,048-token prefill's
time on a 7B-sized model): the shipped block kernel against variants, GB/s read plus written, beside a plain write
(fill) and a copy of as many bytes.

    python3 scripts/dequant_probe.py [--shapes 12288x4096,4096x4096,22016x4096,4096x11008] [--variants ...] [--json OUT]
    python3 scripts/dequant_probe.py --ncu VARIANT SHAPE    (two eager launches, for Nsight Compute)

Variants: blocks:B:W (gemv._dequant_kernel, B blocks a program, W warps; blocks:16:4 ships), tile:WN:BK:W
(gemm_q4k's tile decoding, a program WN words x BK columns, the tile's rows stored BK columns wide).
Times: CUDA-graph replays of 16+ calls over rotated weight copies (4x the L2 cache), median of 30 (bench.time_graph).
"""

import argparse
import json

import torch
import triton
import triton.language as tl

import spqt
from spqt.bench import copy_bandwidth, git_commit, time_graph, weight_copies
from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gemm_q4k as gq
from spqt.kernels import gemv as kg
from spqt.kernels.gpu_layout import repack

DEFAULT_VARIANTS = "blocks:16:4,blocks:32:4,blocks:64:8,tile:16:64:4,tile:8:64:4,tile:4:128:4,tile:4:256:4,tile:16:32:4"


@triton.jit
def _tile_dequant_kernel(q_ptr, h_ptr, out_ptr, N, K, WN: tl.constexpr, BK: tl.constexpr):
    """out (N, K) row-major: program (tile, column block) decodes words w0 .. w0 + WN - 1 of superblock row r in
    columns BK c .. BK c + BK - 1 (gemm_q4k._decode_tile) and stores them, each row's BK columns contiguous."""
    r, word, shifts, row = gq._tile_setup(WN)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    live = cols < K
    w = gq._decode_tile(q_ptr, h_ptr, r, word, cols, live, shifts, K, WN, BK)
    tl.store(out_ptr + row[None, :] * K + cols[:, None], w.to(out_ptr.dtype.element_ty),
             mask=live[:, None] & (row[None, :] < N))


def launcher(spec: str):
    """A variant's name -> fn(w, out)."""
    kind, *nums = spec.split(":")
    vals = [int(v) for v in nums]
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
            grid = (w.grid[0] * (gq.WORDS // wn), triton.cdiv(k, bk))
            _tile_dequant_kernel[grid](w.quants, w.head.view(torch.int64), out, n, k, WN=wn, BK=bk,
                                       num_warps=warps)
        return run
    raise SystemExit(f"unknown variant {spec!r}")


def make(shape):
    n, k = shape
    w = torch.randn(n, k, device="cuda") * k**-0.5
    gw = repack(QuantizedWeight(spqt.quantize(w, "q4_k", "zigzag"), "q4_k", "zigzag", (n, k)), "cuda")
    return gw


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="12288x4096,4096x4096,22016x4096,4096x11008")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
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
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        gw = make((n, k))
        ref = kg.dequantize(gw, torch.float16)
        copies = weight_copies(gw, max(2, triton.cdiv(4 * props.L2_cache_size, gw.nbytes)))
        outs = [torch.empty((n, k), dtype=torch.float16, device="cuda") for _ in range(2)]
        nbytes = gw.nbytes + 2 * n * k
        fill_us = 1e6 * time_graph([lambda o=outs[i % 2]: o.fill_(1.0) for i in range(16)])
        row = {"shape": shape, "bytes": nbytes, "fill_us": fill_us, "fill_gbps": 2 * n * k / fill_us / 1e3,
               "variants": {}}
        line = [f"{shape:>11s} ({nbytes / 1e6:6.1f} MB): fill {row['fill_gbps']:6.0f} GB/s"]
        for spec in args.variants.split(","):
            run = launcher(spec)
            check = torch.full((n, k), float("nan"), dtype=torch.float16, device="cuda")
            run(gw, check)
            exact = bool(torch.equal(check, ref))
            us = 1e6 * time_graph([lambda w=copies[i % len(copies)], o=outs[i % 2]: run(w, o)
                                   for i in range(max(16, len(copies)))])
            row["variants"][spec] = {"us": us, "gbps": nbytes / us / 1e3, "exact": exact}
            line.append(f"{spec} {us:7.1f} us {nbytes / us / 1e3:6.0f} GB/s{'' if exact else ' WRONG'}")
        rows.append(row)
        print("; ".join(line), flush=True)
        copies = gw = outs = ref = None
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"commit": git_commit(), "device": props.name, "copy_gbps": copy, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
