"""What reading a zigzag matrix costs without the arithmetic: the read ceiling B2 is measured against.

Per shape, in one run, over rotating weight copies (> 4x L2), CUDA-graph replays:
  copy       torch device-to-device copy, GB/s read + written (the bench's denominator)
  stream     every byte of quants and heads read once, contiguous 16-byte loads, grid-stride
             (best of a few grid sizes and tile widths): what a read-only kernel reaches
  torch-sum  torch.sum over the quants and the heads (a vendor read-only kernel)
  pattern    B2's programs and per-lane addresses (tuned split, warps, chunks) with the
             arithmetic replaced by an XOR: B2's access pattern and grid, nothing else
  B2         the real kernel with its reduction (spqt's zigzag_dense)
  B2-gemv    B2's GEMV launch alone (partials written, no reduction)
Run on the device machine: python3 scripts/stream_probe.py [NxK ...]."""

import sys

import torch
import triton
import triton.language as tl

from spqt.bench import copy_bandwidth, make_operands, time_graph
from spqt.kernels import gemv as kg
from spqt.kernels import tuning, zigzag_mma


@triton.jit
def _stream_kernel(q_ptr, n_words, out_ptr, BLOCK: tl.constexpr):
    """XOR of every int32 of q (grid-stride over BLOCK-word tiles) -> out[pid]."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(pid * BLOCK, n_words, tl.num_programs(0) * BLOCK):
        acc ^= tl.load(q_ptr + start + offs, mask=start + offs < n_words, other=0)
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


@triton.jit
def _pattern_kernel(q_ptr, h_ptr, out_ptr, K, SPLIT, W: tl.constexpr, CHUNKS: tl.constexpr):
    """B2's grid (rows, SPLIT), share bounds and per-lane loads (16 quant bytes + the 16-byte head
    of 4 columns per chunk), XOR-folded into one value a lane."""
    r = tl.program_id(0)
    s = tl.program_id(1)
    STEP: tl.constexpr = 16 * W
    STEPS: tl.constexpr = STEP * CHUNKS
    lanes = tl.arange(0, 32 * W)
    gi = (lanes // 4) % 8
    li = tl.arange(0, 4)
    base = 16 * (lanes // 32) + 2 * (lanes % 4)
    per = tl.cdiv(tl.cdiv(K, SPLIT), STEPS) * STEPS
    first = s * per
    hi = tl.minimum(K, first + per)
    acc = tl.zeros((32 * W, 4), dtype=tl.int32)
    hacc = tl.zeros((32 * W,), dtype=tl.int64)
    for j in range(first, hi, STEPS):
        for c in tl.static_range(CHUNKS):
            for off in tl.static_range(4):
                col = j + c * STEP + base + (off // 2) * 8 + off % 2
                col = tl.where(col < hi, col, 0)
                # the zigzag planes (gpu_layout.to_planes: (R, 2, K, 16) int32), as the GEMV reads them
                acc ^= tl.load(q_ptr + (((r * 2 + gi // 4) * K + col) * 16 + (gi % 4) * 4)[:, None] + li[None, :])
                hb = zigzag_mma.head_index(r, col, K)
                hacc ^= tl.load(h_ptr + hb * 2) ^ tl.load(h_ptr + hb * 2 + 1)
    v = tl.xor_sum(acc, axis=1) ^ (hacc & 0xFFFFFFFF).to(tl.int32) ^ (hacc >> 32).to(tl.int32)
    tl.store(out_ptr + (r * SPLIT + s) * 32 * W + lanes, v)


def main(shapes):
    props = torch.cuda.get_device_properties(0)
    copy = copy_bandwidth()
    print(f"{props.name}: copy {copy:.0f} GB/s (read + write), L2 {props.L2_cache_size >> 20} MB, "
          f"{props.multi_processor_count} SMs")
    out = torch.empty(1 << 22, dtype=torch.int32, device="cuda")
    for shape in shapes:
        n, k = shape
        ops = make_operands(shape, props.L2_cache_size)
        nbytes = ops.zig[0].nbytes
        res = {}
        best = None
        for block in (1024, 2048, 4096):
            for warps in (4, 8):
                for per_sm in (2, 4, 8, 16):
                    grid = per_sm * props.multi_processor_count

                    def call(w, block=block, warps=warps, grid=grid):
                        _stream_kernel[(grid,)](w.quants, w.quants.numel(), out, BLOCK=block, num_warps=warps)
                        _stream_kernel[(grid,)](w.head, w.head.numel(), out[grid:], BLOCK=block, num_warps=warps)

                    us = time_graph([lambda w=w: call(w) for w in ops.zig] * 2) * 1e6
                    if best is None or us < best[0]:
                        best = (us, f"block {block}, {warps} warps, {per_sm}/SM")
        res["stream"] = best
        res["torch-sum"] = (time_graph([lambda w=w: (w.quants.sum(), w.head.sum()) for w in ops.zig] * 2) * 1e6,
                            "")
        cfg = tuning.config("zigzag_dense", n, k)
        split, warps, chunks = cfg["split"], cfg["num_warps"], cfg.get("chunks", 1)
        rows = ops.zig[0].quants.shape[0]
        res["pattern"] = (time_graph([lambda w=w: _pattern_kernel[(rows, split)](
            w.quants, w.head.view(torch.int64), out, k, split, W=warps, CHUNKS=chunks, num_warps=warps)
            for w in ops.zig] * 2) * 1e6, f"split {split}, {warps} warps, {chunks} chunks")
        ws = kg.ZigzagWorkspace(ops.zig[0], split, torch.float16)
        args = tuning.launch_args(cfg)
        res["B2"] = (time_graph([lambda w=w: kg.gemv_zigzag(w, ops.x, kg.MODE_DENSE, ws, **args)
                                 for w in ops.zig] * 2) * 1e6, "with its reduction")
        pdl = zigzag_mma.uses_pdl(ops.x.device)
        res["B2-gemv"] = (time_graph([lambda w=w: zigzag_mma.launch(
            w.quants, w.head.view(torch.int64), ops.x, ops.x, ws.count, ws.count, ws.partials, ws.y, ws.y,
            ws.counters, n, k, ws.np, split, kg.MODE_DENSE, args["num_warps"], args["chunks"], 0, False, pdl)
            for w in ops.zig] * 2) * 1e6, "partials only")
        for name, (us, how) in res.items():
            gbs = nbytes / us / 1e3
            print(f"{n}x{k} {nbytes / 1e6:.1f} MB  {name:<9} {us:7.2f} us  {gbs:6.0f} GB/s  {gbs / copy:5.1%} of copy"
                  f"  {how}")
        ops = None  # this shape's weights freed before the next shape's
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main([tuple(int(v) for v in a.split("x")) for a in sys.argv[1:]] or [(28672, 8192), (8192, 28672), (8192, 8192)])
