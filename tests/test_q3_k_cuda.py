"""Zigzag Q3_K on the CUDA GEMV (zigzag_q4k.cu, TYPE 3; kernels/gpu_layout_q3k.py): the layout is
exact (the blocks come back byte for byte), the kernel's assembly of each tensor-core fragment and of
each lane's two scales gives the right 3-bit levels and signed scales (emulated bit for bit on the CPU,
and deliberately broken variants of it fail), TYPE 3 compiles for sm_90 without spills; the dequant
kernel, B2 / B4 and the finishes on the GPU: test_kquant_cuda.py."""

import numpy as np
import pytest
import torch

from spqt.kernels import gpu_layout_q3k
from spqt.kernels.gpu_layout_types import q3_k_levels

from cuda_emulation import (PAIRS, assert_pair_levels, assert_pairs_compile, assert_type_compiles, byte_perm,
                            check_emulation, check_pairs_emulation, pairs_outputs, parity_epilogue)
from test_kernels_types import _random_blocks


def test_q3_k_cuda_layout_is_exact(rng):
    for shape in ((300, 75), (1, 37), (1100, 9)):
        qw = _random_blocks(rng, "q3_k", shape)
        gw = gpu_layout_q3k.repack(qw, "cpu")
        rows, cols = gw.grid
        flat = qw.blocks.reshape(-1, 110)
        assert gw.quants.shape == (rows, 2, cols, 8) and gw.high.shape == (rows, cols, 8)
        assert gw.head.shape == (-(-rows // 4), cols, 4, 4) and gw.nbytes == 112 * rows * cols
        assert torch.equal(gpu_layout_q3k.levels_of(gw), q3_k_levels(flat)), shape
        assert torch.equal(gpu_layout_q3k.blocks_of(gw), qw.blocks), shape


def _lop3_select(a: int, b: int, mask: int) -> int:
    return (a & mask) | (b & ~mask & 0xFFFFFFFF)


# the kernel's constants (zigzag_q4k.cu, TYPE 3); the broken variants below change one each
KERNEL = {"h_shift": 1, "odd_next": 1, "odd_mask": (0x001C001C, 0x01C001C0), "odd_scale": (2.0**22, 2.0**18),
          "funnel": 30, "offset": 4.0, "even_select": 0x33333333}


def _lanes(gw, x, row, k=KERNEL):
    """Each lane (g, t)'s inputs of one chunk (16 columns) of superblock row `row`, read through the kernel's pointer
    formulas (uint2 / u32 / uint4 units), its scale decode and level words, bit for bit: {(g, t): (slot columns, the
    slots' four level words lv (even / odd tiles 0-7, 8-15), fp16 B of parity 0 and 1 (4 slots each, float64))}, and
    the -4 term bias[parity, g] (float64)."""
    rows, cols = gw.grid
    q2 = gw.quants.numpy().reshape(-1).view(np.uint32).reshape(-1, 2)  # uint2
    high = gw.high.numpy().reshape(-1).view(np.uint32)
    heads = gw.head.numpy().reshape(-1).view(np.uint32).reshape(-1, 4)  # uint4
    lanes, bias = {}, np.zeros((2, 8))
    for g in range(8):
        qr = (2 * row + (g >> 2)) * cols * 4 + (g & 3)
        hq = row * cols * 8 + g
        hr = (row >> 2) * cols * 4 + (row & 3)
        for t in range(4):
            cols_ = [4 * i + t for i in range(4)]
            w = [q2[qr + c * 4] for c in cols_]
            hb = [int(high[hq + c * 8]) for c in cols_]
            hv = [heads[hr + c * 4] for c in cols_]
            be, bo = [], []
            for i in range(4):
                hx, hy, hz, hw = (int(v) for v in hv[i])
                v = byte_perm(hx, hy, g | (g << 12))
                f = ((((hz >> (4 * g)) << 32) | v) >> k["funnel"]) & 0xFFFFFFFF
                se, so = (v & 63) - 32, (f & 63) - 32
                d = np.array([hw & 0xFFFF], dtype=np.uint16).view(np.float16).astype(np.float32)[0]
                xd = np.float32(x[cols_[i]]) * d
                be.append(np.float32(xd * np.float32(se)))
                bo.append(np.float32(xd * np.float32(so)))
            b16 = [np.array(b, dtype=np.float32).astype(np.float16).astype(np.float64) for b in (be, bo)]
            for e in range(2):
                bias[e, g] += k["offset"] * b16[e].sum()
            lv = []
            for i in range(4):
                hs = hb[i] >> k["h_shift"]
                sel0, sel1 = k["even_select"], ~k["even_select"] & 0xFFFFFFFF
                lv.append([_lop3_select(int(w[i][0]), hb[i], sel0), _lop3_select(int(w[i][0]), hb[i], sel1),
                           _lop3_select(int(w[i][1]), hs, sel0), _lop3_select(int(w[i][1]), hs, sel1)])
            lanes[g, t] = cols_, lv, b16
    return lanes, bias


def _b_fp16(lanes) -> np.ndarray:
    """The lanes' fp16 B values b[parity][g][column]."""
    b_fp16 = np.zeros((2, 8, 16))
    for (g, t), (cols_, _, b16) in lanes.items():
        for e in range(2):
            b_fp16[e, g, cols_] = b16[e]
    return b_fp16


def _emulate(gw, x, row, k=KERNEL, check_levels=True):
    """zigzag_q4k.cu's compute() and epilogue at TYPE 3 for superblock row `row` of one chunk (16 columns), bit for
    bit on the register values: (the 256 outputs in float64, the fp16 B values b[parity][g][column]). With
    check_levels every A half is also checked against the format's level of its row and column."""
    rows, cols = gw.grid
    levels = gpu_layout_q3k.levels_of(gw).reshape(rows, cols, 256).numpy() if check_levels else None
    lanes, bias = _lanes(gw, x, row, k)
    a_regs = {}
    for (g, t), (cols_, lv, b16) in lanes.items():
        for m in range(16):
            q = 2 * (m >> 3) + (m & 1)
            u = (m >> 1) & 3
            u1 = (u + k["odd_next"]) & 3 if m & 1 else u
            sel = u | (u1 << 4) | ((4 + u) << 8) | ((4 + u1) << 12)
            mg, mg8 = k["odd_mask"] if m & 1 else (0x00070007, 0x00700070)
            regs = []
            for pair in (0, 2):
                p = byte_perm(lv[pair][q], lv[pair + 1][q], sel)
                regs += [p & mg, p & mg8]
            a_regs[g, t, m] = regs
            if check_levels:
                assert_pair_levels(regs, levels, row, cols_, g, t, m)
    y = parity_epilogue(a_regs, lambda g, t, m: lanes[g, t][2][m & 1], k["odd_scale"], bias)
    return y, _b_fp16(lanes)


# Q3_K's tile pairs: word 2 W + p rotated by 8 e (broken variants change it or cuda_emulation.PAIRS' constants)
PAIRS_Q3K = dict(PAIRS, rotate=True)


def _rotr(v: int, n: int) -> int:
    return ((v >> n) | (v << (32 - n))) & 0xFFFFFFFF if n else v


def _emulate_pairs(gw, x, row, k=KERNEL, kp=PAIRS_Q3K, check_levels=True):
    """compute() (parity_pairs_mma) and program_sums() at TYPE 3, PAIRS, ACC 8, bit for bit: the word of pair (W, e,
    p) is the lane's lv[2 W + p] rotated right by 8 e (an odd tile's row g + 8 takes bit 0 of the next byte, byte 0 for
    byte 3) -> (the 256 outputs in float64, the fp16 B values b[parity][g][column])."""
    lanes, bias = _lanes(gw, x, row, k)

    def word(g, t, slot, wi, p, e):
        v = lanes[g, t][1][slot][2 * wi + p]
        return _rotr(v, 8 * e) if kp["rotate"] else v >> (8 * e)

    y = pairs_outputs(word, lambda g, t, p, slot: lanes[g, t][2][p][slot], ((0x00070007, 0x00700070), k["odd_mask"]),
                      k["odd_scale"], bias, kp)
    return y, _b_fp16(lanes)


def _emulation_error(gw, x, qw, row, k=KERNEL, check_levels=True, emulate=_emulate) -> None:
    """Asserts the emulated outputs of superblock row `row` equal sum_c (q - 4) fp16(x d (s - 32)) (float64), the
    fp16 B values checked against the format's scales and d."""
    y, b16 = emulate(gw, x, row, k, check_levels=check_levels)
    blocks = qw.blocks[row, :16].numpy()  # (16 columns, 110)
    from spqt.formats import q3_k

    s = q3_k.unpack_scales(torch.from_numpy(blocks[:, 96:108].copy())).numpy() - 32  # (16 columns, 16 tiles)
    d = blocks[:, 108:110].copy().view(np.float16)[:, 0].astype(np.float32)
    b_want = ((x.astype(np.float32) * d)[:, None] * s.astype(np.float32)).astype(np.float16).astype(np.float64)
    for e in range(2):  # lane g's B of parity e is tile 2 g + e's
        np.testing.assert_array_equal(b16[e], b_want[:, e::2].T, err_msg=f"B of parity {e}")
    q = q3_k_levels(qw.blocks[row, :16].reshape(-1, 110)).numpy().reshape(16, 16, 16)  # [column, tile, row in tile]
    want = np.einsum("cmi,cm->mi", (q - 4).astype(np.float64), b_want).reshape(256)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12 * np.abs(want).max(), err_msg=f"row {row}")


def test_q3_k_cuda_fragments_emulated(rng):
    """Every lane (g, t), tile m and slot of one chunk (columns 0-15 of 19, read through the kernel's pointer formulas)
    of every superblock row (5: the last 76 rows): each A half holds
    the slot's 3-bit level at the kernel's bits (even tiles row g at 0, row g + 8 at 4; odd at 2 and 6), each lane's B
    of parity e is fp16(x d (s[2 g + e] - 32)); the emulated mma products, the epilogue's per-parity scales and the
    -4 term per tile give sum (q - 4) b exactly (float64). Broken variants (the third bits' shift for tiles 8-15, the
    odd tiles' next byte, their masks, their epilogue scale, the scale funnel shift, the offset, swapped selects)
    fail."""
    broken = [{"h_shift": 2}, {"odd_next": 0}, {"odd_mask": (0x000C000C, 0x01C001C0)},
              {"odd_scale": (2.0**24, 2.0**18)}, {"funnel": 28}, {"offset": 3.0}, {"even_select": 0xCCCCCCCC}]
    check_emulation(rng, "q3_k", gpu_layout_q3k.repack, _emulation_error, KERNEL, broken)


def test_q3_k_cuda_tile_pairs_emulated(rng):
    """The tile pairs (PAIRS, ACC 8) of every superblock row of one chunk give the same exact sums as the 16-tile
    assembly (every row written once: a row missed stays NaN); broken variants (a shift instead of the rotation, the
    lane's half of B, a B selector, the pair's second tile, the odd tiles' masks) fail."""
    broken = [{"rotate": False}, {"upper": lambda g: g & 1}, {"tile1": 2}, {"sel": {**PAIRS["sel"], (1, 1): 0x1044}}]
    check_pairs_emulation(rng, "q3_k", gpu_layout_q3k.repack, _emulate_pairs, _emulation_error, KERNEL, PAIRS_Q3K,
                          broken)
    qw = _random_blocks(rng, "q3_k", (600, 19))  # the odd tiles' masks: KERNEL's, which the pairs share
    x = rng.standard_normal(16).astype(np.float16)
    with pytest.raises(AssertionError):
        _emulation_error(gpu_layout_q3k.repack(qw, "cpu"), x, qw, 1, dict(KERNEL, odd_mask=(0x000C000C, 0x01C001C0)),
                         check_levels=False, emulate=_emulate_pairs)


def test_q3_k_cuda_compiles_for_sm90(tmp_path, monkeypatch):
    """TYPE 3 compiles with NVRTC for sm_90 (and sm_80) in each mode, pipe, accumulator count and finish, cluster
    included, without spills, 16 mma in the main loop; its B2 loop (PIPE 0, 16 accumulators) holds 250 instructions
    a chunk and lane when written, 133 registers (Q4_K's: 224, 125): 16 bit selects complete the levels, 96
    instructions assemble the A fragments (per tile two permutes and four ANDs, Q4_K's)."""
    assert_type_compiles(3, (256, 290, 285), 135, 140, tmp_path, monkeypatch)
    # tile pairs (ACC 8): 250 loop instructions at 8 warps, 246 at 4, 97-98 registers when written (282 at ACC 2
    # with 32 selects, 263 at 8 with class selects)
    assert_pairs_compile(3, 254, 104)
