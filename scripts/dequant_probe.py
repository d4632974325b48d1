"""The prefill's dequantization of zigzag maps on CUDA (its fp16 write is most of a 33-2,048-token prefill's time on a
7B-sized model), every type in the layout the runtime runs: the shipped path (gemv.dequantize: q4k_tiles for Q4_K,
type_tiles for the others) against the block kernels it replaced and other tiles, GB/s read plus written, beside a
plain write (fill) and a copy of as many bytes.

    python3 scripts/dequant_probe.py [--shapes 12288x4096,4096x4096,22016x4096,4096x11008] [--variants ...]
        [--types q4_k,q5_k,...] [--json OUT]
    python3 scripts/dequant_probe.py --ncu VARIANT SHAPE [--types TYPE]   (two eager launches, for Nsight Compute)

Variants: deq (gemv.dequantize as the runtime calls it); blocks:B:W (the type's block kernel, kept here since the
tiles replaced it: B whole 256-row column blocks a program, W warps; gemv's zigzag path until 2b11204 for Q4_K and
until the type tiles for the others, at blocks:16:4); tile:WN:BK:W (a program 8 WN rows x BK columns, W warps:
q4k_tiles._dequant_kernel at WN words, type_tiles' kernel of the type at WN / 4 lane groups; tile:4:128:4 ships).
Times: CUDA-graph replays of 16+ calls over rotated weight copies (4x the L2 cache), median of 30 (bench.time_graph).
"""

import argparse
import json

import torch
import triton
import triton.language as tl

import spqt
from spqt.bench import copy_bandwidth, git_commit, make_type_operands, time_graph, weight_copies
from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gemv as kg
from spqt.kernels import q4k_tiles as qt
from spqt.kernels import type_tiles, zigzag_mma
from spqt.kernels.gpu_layout import repack
from spqt.kernels.q4k_bits import load_head, unpack_scales
from spqt.kernels.zigzag_mma import PLANES

DEFAULT_VARIANTS = "deq,blocks:16:4,blocks:32:4,blocks:64:8,tile:4:128:4,tile:4:256:4,tile:8:64:4,tile:8:128:4"


# ---------------------------------------------------------------- the block kernels the tiles replaced

@triton.jit
def _blocks_nibbles_kernel(q_ptr, h_ptr, out_ptr, N, K, COLS, TOTAL, BLOCK_B: tl.constexpr, f_ptr=None,
                           FIFTH: tl.constexpr = False, d_ptr=None, SIX: tl.constexpr = False):
    """Zigzag Q4_K (Q5_K with FIFTH, Q6_K with SIX) blocks -> out (N, K) row-major in out's dtype. Block bid = (grid
    row rr, grid col cc); weight e = 16 m + 8 h + g of a block is byte 16 g + m of its levels, bits 4 h (gpu_layout.py),
    head grouped (zigzag_mma.head_index). FIFTH (gpu_layout_q5k.py): the level's fifth bit from word g of the block's
    fifth-bit words, bit 8 (m // 4) + m % 4 + 4 h. SIX (gpu_layout_q6k.py): the top bit pair from word 2 g + m // 8
    of f_ptr's (R, K, 16) int32, bits 8 ((m // 2) % 4) + 2 (m % 2) + 4 h; h_ptr the grouped scales as int8 (16 a
    block at unit head_index), d_ptr (R, K) fp16; w = d sc[m] (q - 32)."""
    bid = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = bid < TOTAL
    rr = bid // COLS
    cc = bid % COLS
    e = (tl.arange(0, 8)[:, None] * 32 + tl.arange(0, 32)[None, :])[None, :, :]  # (1, 8 j, 32 i)
    byte = 16 * (e % 8) + e // 16
    word = byte // 4
    shift = 8 * (byte % 4) + 4 * ((e // 8) % 2)
    PW: tl.constexpr = 32 // PLANES  # planes (gpu_layout.to_planes): word w of block (rr, cc) in plane w // PW
    words = tl.load(q_ptr + ((rr[:, None, None] * PLANES + word // PW) * COLS + cc[:, None, None]) * PW + word % PW,
                    mask=mb[:, None, None], other=0)
    level = (words >> shift) & 15
    if FIFTH:
        fw = tl.load(f_ptr + bid[:, None, None] * 8 + e % 8, mask=mb[:, None, None], other=0)
        m16 = e // 16
        level = level | (((fw >> (8 * (m16 // 4) + m16 % 4 + 4 * ((e // 8) % 2))) & 1) << 4)
    if SIX:
        m16 = e // 16
        hw = tl.load(f_ptr + bid[:, None, None] * 16 + 2 * (e % 8) + m16 // 8, mask=mb[:, None, None], other=0)
        level = level | (((hw >> (8 * ((m16 // 2) % 4) + 2 * (m16 % 2) + 4 * ((e // 8) % 2))) & 3) << 4)
        unit = zigzag_mma.head_index(rr, cc, COLS)
        sc6 = tl.load(h_ptr + unit[:, None, None] * 16 + m16, mask=mb[:, None, None], other=0).to(tl.float32)
        d6 = tl.load(d_ptr + bid, mask=mb, other=0.0).to(tl.float32)
        w = (d6[:, None, None] * sc6) * (level - 32).to(tl.float32)  # formats/q6_k.decode's order: exact
    else:
        d, dmin, w1, w2, w3 = load_head(h_ptr, zigzag_mma.head_index(rr, cc, COLS), mb)
        sc, mn = unpack_scales(w1[:, None], w2[:, None], w3[:, None], tl.arange(0, 8)[None, :])
        w = (d[:, None] * sc)[:, :, None] * level.to(tl.float32) - (dmin[:, None] * mn)[:, :, None]
    row = rr[:, None, None] * 256 + e
    col = cc[:, None, None] + e * 0
    tl.store(out_ptr + row * K + col, w.to(out_ptr.dtype.element_ty), mask=mb[:, None, None] & (row < N) & (col < K))


@triton.jit
def _column_superblocks(COLS, TOTAL, BLOCK_B: tl.constexpr):
    """The program's BLOCK_B column-superblocks bid = (superblock row rr, column cc) of a CUDA GEMV type layout,
    and the mask bid < TOTAL: (bid, mask, rr, cc)."""
    bid = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    return bid, bid < TOTAL, bid // COLS, bid % COLS


@triton.jit
def _store_column_superblocks(out_ptr, w, rr, cc, e, mbk, N, K):
    """w (BLOCK_B, ...): weight e of column-superblock (rr, cc) -> out[256 rr + e, cc] in out's dtype (rows past N
    and masked superblocks skipped; mbk the mask broadcast as e)."""
    row = rr[:, None, None] * 256 + e
    col = cc[:, None, None] + e * 0
    tl.store(out_ptr + row * K + col, w.to(out_ptr.dtype.element_ty), mask=mbk & (row < N))


@triton.jit
def _low_pairs(q_ptr, rr, cc, COLS, e, mbk):
    """The bit pair of weight e = 16 m + 8 h + g (tile m, lane group g) in Q3_K's low-pair planes (Q2_K's levels;
    gpu_layout_q3k.py): word 2 (g % 4) + m // 8 of plane g // 4 (q_ptr (R, 2, K, 8) int32) at bit 8 u + 2 (m % 2)
    + 4 h, u = (m // 2) % 4."""
    m16 = e // 16
    g8 = e % 8
    lw = tl.load(q_ptr + ((rr[:, None, None] * 2 + g8 // 4) * COLS + cc[:, None, None]) * 8 + 2 * (g8 % 4) + m16 // 8,
                 mask=mbk, other=0)
    return (lw >> (8 * ((m16 // 2) % 4) + 2 * (m16 % 2) + 4 * ((e // 8) % 2))) & 3


@triton.jit
def _blocks_q8_0_kernel(q_ptr, d_ptr, out_ptr, N, K, COLS, TOTAL, BLOCK_B: tl.constexpr):
    """Zigzag Q8_0 in the CUDA GEMV's layout (gpu_layout_q8_0.py) -> out (N, K) row-major in out's dtype.
    Column-superblock bid = (superblock row rr, column cc); its weight e = 16 m + 8 h + g (tile m, lane group
    g) is byte 16 (g % 4) + 2 (m % 8) + h of the column's 64 bytes in plane 2 (m // 8) + g // 4 (q_ptr int32),
    u = q + 128; d of block e // 32 at fp16 8 head_index + e // 32 (d_ptr, grouped as Q4_K's heads);
    w = d (u - 128), formats/q8_0.decode's product."""
    bid, mb, rr, cc = _column_superblocks(COLS, TOTAL, BLOCK_B)
    e = (tl.arange(0, 8)[:, None] * 32 + tl.arange(0, 32)[None, :])[None, :, :]  # (1, 8 blocks, 32)
    m16 = e // 16
    g8 = e % 8
    byte = 16 * (g8 % 4) + 2 * (m16 % 8) + (e // 8) % 2
    plane = 2 * (m16 // 8) + g8 // 4
    words = tl.load(q_ptr + ((rr[:, None, None] * 4 + plane) * COLS + cc[:, None, None]) * 16 + byte // 4,
                    mask=mb[:, None, None], other=0)
    u = (words >> (8 * (byte % 4))) & 255
    unit = zigzag_mma.head_index(rr, cc, COLS)
    d = tl.load(d_ptr + unit[:, None, None] * 8 + e // 32, mask=mb[:, None, None], other=0.0).to(tl.float32)
    w = d * (u - 128).to(tl.float32)
    _store_column_superblocks(out_ptr, w, rr, cc, e, mb[:, None, None], N, K)


@triton.jit
def _blocks_q3k_kernel(q_ptr, hb_ptr, h_ptr, out_ptr, N, K, COLS, TOTAL, BLOCK_B: tl.constexpr):
    """Zigzag Q3_K in the CUDA GEMV's layout (gpu_layout_q3k.py) -> out (N, K) row-major in out's dtype.
    Column-superblock bid = (superblock row rr, column cc); its weight e = 16 m + 8 h + g (tile m, lane group g):
    low pair in word 2 (g % 4) + m // 8 of plane g // 4 (q_ptr (R, 2, K, 8) int32) at bit 8 u + 2 (m % 2) + 4 h,
    u = (m // 2) % 4; third bit in word g of hb_ptr (R, K, 8) at bit 8 u + 2 + 4 h (even m) or 8 u + 4 / 8 (u + 1)
    % 4 (odd m, h = 0 / 1), plus 1 for m >= 8; scale s[m] and d from the grouped head (h_ptr int32, unit
    head_index): s[2 j] = byte j & 63, s[2 j + 1] = byte j >> 6 | nibble j of word 2 << 2, d word 3's low half;
    w = (d (s - 32)) (q - 4), formats/q3_k.decode's order."""
    bid, mb, rr, cc = _column_superblocks(COLS, TOTAL, BLOCK_B)
    e = (tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :])[None, :, :]  # (1, 16 tiles, 16)
    m16 = e // 16
    g8 = e % 8
    h = (e // 8) % 2
    u = (m16 // 2) % 4
    odd = m16 % 2
    mbk = mb[:, None, None]
    low = _low_pairs(q_ptr, rr, cc, COLS, e, mbk)
    hw = tl.load(hb_ptr + (rr[:, None, None] * COLS + cc[:, None, None]) * 8 + g8, mask=mbk, other=0)
    hbit = tl.where(odd == 0, 8 * u + 2 + 4 * h, tl.where(h == 0, 8 * u + 4, 8 * ((u + 1) % 4))) + m16 // 8
    q = low | (((hw >> hbit) & 1) << 2)
    unit = zigzag_mma.head_index(rr, cc, COLS)[:, None, None] * 4
    j = m16 // 2
    pair = (tl.load(h_ptr + unit + j // 4, mask=mbk, other=0) >> (8 * (j % 4))) & 255
    top = (tl.load(h_ptr + unit + 2, mask=mbk, other=0) >> (4 * j)) & 15
    s = tl.where(odd == 0, pair & 63, (pair >> 6) | (top << 2))
    dw = tl.load(h_ptr + unit + 3, mask=mbk, other=0)
    d = (dw & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    w = (d * (s - 32).to(tl.float32)) * (q - 4).to(tl.float32)
    _store_column_superblocks(out_ptr, w, rr, cc, e, mbk, N, K)


@triton.jit
def _blocks_q2k_kernel(q_ptr, s_ptr, d_ptr, out_ptr, N, K, COLS, TOTAL, BLOCK_B: tl.constexpr):
    """Zigzag Q2_K in the CUDA GEMV's layout (gpu_layout_q2k.py) -> out (N, K) row-major in out's dtype.
    Column-superblock bid = (superblock row rr, column cc); its weight e = 16 m + 8 h + g: level in word
    2 (g % 4) + m // 8 of plane g // 4 (q_ptr (R, 2, K, 8) int32) at bit 8 u + 2 (m % 2) + 4 h, u = (m // 2) % 4;
    scale byte m of the grouped unit head_index (s_ptr int32: sc low nibble, mn high); d | dmin << 16 at d_ptr
    bid; w = (d sc) q - dmin mn, formats/q2_k.decode's order."""
    bid, mb, rr, cc = _column_superblocks(COLS, TOTAL, BLOCK_B)
    e = (tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :])[None, :, :]  # (1, 16 tiles, 16)
    m16 = e // 16
    mbk = mb[:, None, None]
    q = _low_pairs(q_ptr, rr, cc, COLS, e, mbk)
    unit = zigzag_mma.head_index(rr, cc, COLS)[:, None, None] * 4
    byte = (tl.load(s_ptr + unit + m16 // 4, mask=mbk, other=0) >> (8 * (m16 % 4))) & 255
    dw = tl.load(d_ptr + bid, mask=mb, other=0)[:, None, None]
    d = (dw & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((dw >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    w = (d * (byte & 15).to(tl.float32)) * q.to(tl.float32) - dmin * (byte >> 4).to(tl.float32)
    _store_column_superblocks(out_ptr, w, rr, cc, e, mbk, N, K)


# ---------------------------------------------------------------- variants

# The block kernels' arrays before out, by type (Q4_K, Q5_K, Q6_K: _blocks_nibbles_kernel's)
_BLOCKS = {"q8_0": (_blocks_q8_0_kernel, ("quants", "d")), "q2_k": (_blocks_q2k_kernel, ("quants", "scales", "d")),
           "q3_k": (_blocks_q3k_kernel, ("quants", "high", "head"))}


def run_blocks(w, out, block_b: int, warps: int):
    """The type's block kernel (BLOCK_B column blocks a program): out (N, K) fp16."""
    n, k = w.shape
    rows, cols = w.grid
    grid = (triton.cdiv(rows * cols, block_b),)
    if w.fmt in _BLOCKS:
        kernel, arrays = _BLOCKS[w.fmt]
        kernel[grid](*(getattr(w, a) for a in arrays), out, n, k, cols, rows * cols, BLOCK_B=block_b, num_warps=warps)
    elif w.fmt == "q6_k":
        _blocks_nibbles_kernel[grid](w.quants, w.scales.view(torch.int8), out, n, k, cols, rows * cols,
                                     BLOCK_B=block_b, num_warps=warps, f_ptr=w.high, d_ptr=w.d, SIX=True)
    else:
        fifth = getattr(w, "fifth", None)
        _blocks_nibbles_kernel[grid](w.quants, w.head.view(torch.int64), out, n, k, cols, rows * cols,
                                     BLOCK_B=block_b, num_warps=warps, f_ptr=fifth, FIFTH=fifth is not None)


def launcher(spec: str):
    """A variant's name -> fn(w, out)."""
    kind, *nums = spec.split(":")
    vals = [int(v) for v in nums]
    if kind == "deq" and not vals:
        return lambda w, out: kg.dequantize(w, torch.float16, out)
    if kind == "blocks" and len(vals) == 2:
        return lambda w, out: run_blocks(w, out, *vals)
    if kind == "tile" and len(vals) == 3:
        wn, bk, warps = vals

        def run(w, out):
            n, k = w.shape
            if w.fmt == "q4_k":
                grid = (w.grid[0] * (qt.WORDS // wn), triton.cdiv(k, bk))
                qt._dequant_kernel[grid](w.quants, w.head.view(torch.int64), out, n, k, WN=wn, BK=bk, num_warps=warps)
            elif warps == 4:
                type_tiles.dequantize(w, torch.float16, out, wn // 4, bk)
            else:
                raise SystemExit(f"{spec}: type_tiles launches 4 warps")
        return run
    raise SystemExit(f"unknown variant {spec!r}")


def make(shape, fmt: str = "q4_k"):
    """Random zigzag weights of one shape and type in the layout the runtime runs on CUDA."""
    if fmt != "q4_k":
        return make_type_operands(shape, fmt, 0)[0][0]  # (and one copy, dropped: time_shape makes its own)
    n, k = shape
    w = torch.randn(n, k, device="cuda") * k**-0.5
    return repack(QuantizedWeight(spqt.quantize(w, "q4_k", "zigzag"), "q4_k", "zigzag", (n, k)), "cuda")


def time_shape(fmt: str, shape, variants, props) -> dict:
    """Every variant on one shape: a row, also printed. A variant is "exact" where its output equals the shipped
    gemv.dequantize's bit for bit (whose own equality with the format's decode the tests hold)."""
    n, k = shape
    gw = make(shape, fmt)
    ref = kg.dequantize(gw, torch.float16)
    copies = weight_copies(gw, max(2, triton.cdiv(4 * props.L2_cache_size, gw.nbytes)))
    outs = [torch.empty((n, k), dtype=torch.float16, device="cuda") for _ in range(2)]
    nbytes = gw.nbytes + 2 * n * k
    fill_us = 1e6 * time_graph([lambda o=outs[i % 2]: o.fill_(1.0) for i in range(16)])
    row = {"type": fmt, "shape": f"{n}x{k}", "bytes": nbytes, "fill_us": fill_us,
           "fill_gbps": 2 * n * k / fill_us / 1e3, "variants": {}}
    line = [f"{fmt} {n:>5d}x{k:<5d} ({nbytes / 1e6:6.1f} MB): fill {row['fill_gbps']:6.0f} GB/s"]
    for spec in variants:
        run = launcher(spec)
        check = torch.full((n, k), float("nan"), dtype=torch.float16, device="cuda")
        run(gw, check)
        exact = bool(torch.equal(check, ref))
        us = 1e6 * time_graph([lambda w=copies[i % len(copies)], o=outs[i % 2]: run(w, o)
                               for i in range(max(16, len(copies)))])
        row["variants"][spec] = {"us": us, "gbps": nbytes / us / 1e3, "exact": exact}
        line.append(f"{spec} {us:7.1f} us {nbytes / us / 1e3:6.0f} GB/s{'' if exact else ' WRONG'}")
    print("; ".join(line), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="12288x4096,4096x4096,22016x4096,4096x11008")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--types", default="q4_k,q5_k,q6_k,q8_0,q3_k,q2_k")
    ap.add_argument("--ncu", nargs=2, metavar=("VARIANT", "SHAPE"))
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.ncu:
        gw = make(tuple(int(v) for v in args.ncu[1].split("x")), args.types.split(",")[0])
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
