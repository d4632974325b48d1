"""Zigzag Q2_K on the CUDA GEMV (zigzag_q4k.cu, TYPE 2; kernels/gpu_layout_q2k.py): the layout is
exact (the blocks come back byte for byte), the kernel's assembly of each tensor-core fragment and of
each lane's two scales and mins gives the right 2-bit levels and factors (emulated bit for bit on the
CPU, and deliberately broken variants of it fail), TYPE 2 compiles for sm_90 without spills; the
dequant kernel, B2 / B4 and the finishes on the GPU: test_kquant_cuda.py."""

import numpy as np
import torch

from spqt.kernels import gpu_layout_q2k
from spqt.kernels.gpu_layout_types import q2_k_levels

from cuda_emulation import (PAIRS, assert_pair_levels, assert_pairs_compile, assert_type_compiles, byte_perm,
                            check_emulation, check_pairs_emulation, pairs_outputs, parity_epilogue)
from test_kernels_types import _random_blocks


def test_q2_k_cuda_layout_is_exact(rng):
    for shape in ((300, 75), (1, 37), (1100, 9)):
        qw = _random_blocks(rng, "q2_k", shape)
        gw = gpu_layout_q2k.repack(qw, "cpu")
        rows, cols = gw.grid
        flat = qw.blocks.reshape(-1, 84)
        assert gw.quants.shape == (rows, 2, cols, 8) and gw.d.shape == (rows, cols)
        assert gw.scales.shape == (-(-rows // 4), cols, 4, 4) and gw.nbytes == flat.numel() == 84 * rows * cols
        assert torch.equal(gpu_layout_q2k.levels_of(gw), q2_k_levels(flat)), shape
        assert torch.equal(gpu_layout_q2k.blocks_of(gw), qw.blocks), shape


# the kernel's constants (zigzag_q4k.cu, TYPE 2); the broken variants below change one each
KERNEL = {"half": 1, "sel": lambda g: (2 * (g & 3)) | ((2 * (g & 3) + 1) << 4), "odd_mask": (0x000C000C, 0x00C000C0),
          "odd_scale": (2.0**22, 2.0**18), "odd_b": 1}


def _lanes(gw, x, row, k=KERNEL):
    """Each lane (g, t)'s inputs of one chunk (16 columns) of superblock row `row`, read through the kernel's pointer
    formulas (uint2 / u32 units) and its scale decode, bit for bit: {(g, t): (slot columns, slot level words (uint2),
    fp16 B of parity 0 and 1 (4 slots each, float64))}, and the min term bias[parity, g] (float64)."""
    rows, cols = gw.grid
    q2 = gw.quants.numpy().reshape(-1).view(np.uint32).reshape(-1, 2)  # uint2
    s2 = gw.scales.numpy().reshape(-1).view(np.uint32).reshape(-1, 2)  # uint2
    dd = gw.d.numpy().reshape(-1).view(np.uint32)
    lanes, bias = {}, np.zeros((2, 8))
    for g in range(8):
        qr = (2 * row + (g >> 2)) * cols * 4 + (g & 3)
        hr = ((row >> 2) * cols * 4 + (row & 3)) * 2 + (g >> 2) * k["half"]  # the lane's 8 of the 16 scale bytes
        dr = row * cols
        for t in range(4):
            cols_ = [4 * i + t for i in range(4)]
            w = [q2[qr + c * 4] for c in cols_]
            hv = [s2[hr + c * 8] for c in cols_]
            be, bo = [], []
            for i in range(4):
                v = byte_perm(int(hv[i][0]), int(hv[i][1]), k["sel"](g))
                sce, mne, sco, mno = v & 15, (v >> 4) & 15, (v >> 8) & 15, (v >> 12) & 15
                dw = int(dd[dr + cols_[i]])
                f16 = np.array([dw & 0xFFFF, dw >> 16], dtype=np.uint16).view(np.float16)
                xd = np.float32(x[cols_[i]]) * f16[0].astype(np.float32)
                xm = np.float32(x[cols_[i]]) * f16[1].astype(np.float32)
                be.append(np.float32(xd * np.float32(sce)))
                bo.append(np.float32(xd * np.float32(sco)))
                bias[0, g] += float(xm) * mne
                bias[1, g] += float(xm) * mno
            b16 = [np.array(b, dtype=np.float32).astype(np.float16).astype(np.float64) for b in (be, bo)]
            lanes[g, t] = cols_, w, b16
    return lanes, bias


def _emulate(gw, x, row, k=KERNEL, check_levels=True):
    """zigzag_q4k.cu's compute() and epilogue at TYPE 2 for superblock row `row` of one chunk (16 columns), bit for
    bit on the register values: (the 256 outputs in float64, the fp16 B values b[parity][g][column])."""
    rows, cols = gw.grid
    levels = gpu_layout_q2k.levels_of(gw).reshape(rows, cols, 256).numpy() if check_levels else None
    lanes, bias = _lanes(gw, x, row, k)
    a_regs, b_regs = {}, {}
    b_fp16 = np.zeros((2, 8, 16))
    for (g, t), (cols_, w, b16) in lanes.items():
        for e in range(2):
            b_regs[g, t, e] = b16[e]
            b_fp16[e, g, cols_] = b16[e]
        for m in range(16):
            u = (m >> 1) & 3
            sel = u | (u << 4) | ((4 + u) << 8) | ((4 + u) << 12)
            mg, mg8 = k["odd_mask"] if m & 1 else (0x00030003, 0x00300030)
            regs = []
            for pair in (0, 2):
                p = byte_perm(int(w[pair][m >> 3]), int(w[pair + 1][m >> 3]), sel)
                regs += [p & mg, p & mg8]
            a_regs[g, t, m] = regs
            if check_levels:
                assert_pair_levels(regs, levels, row, cols_, g, t, m)
    return parity_epilogue(a_regs, lambda g, t, m: b_regs[g, t, (m & 1) * k["odd_b"]], k["odd_scale"], bias), b_fp16


# Q2_K's tile pairs: the word's shift for e (broken variants change it or cuda_emulation.PAIRS' constants)
PAIRS_Q2K = dict(PAIRS, shift=8, odd_mask=(0x000C000C, 0x00C000C0))


def _emulate_pairs(gw, x, row, k=KERNEL, kp=PAIRS_Q2K, check_levels=True):
    """compute() (parity_pairs_mma) and program_sums() at TYPE 2, PAIRS, ACC 8, bit for bit: the word of pair (W, e,
    p) is the lane's word W >> 8 e (both parities) -> (the 256 outputs in float64, the fp16 B values b[parity][g][column])."""
    lanes, bias = _lanes(gw, x, row, k)
    b_fp16 = np.zeros((2, 8, 16))
    for (g, t), (cols_, _, b16) in lanes.items():
        for p in range(2):
            b_fp16[p, g, cols_] = b16[p]
    y = pairs_outputs(lambda g, t, slot, wi, p, e: int(lanes[g, t][1][slot][wi]) >> (kp["shift"] * e),
                      lambda g, t, p, slot: lanes[g, t][2][p][slot], ((0x00030003, 0x00300030), kp["odd_mask"]),
                      k["odd_scale"], bias, kp)
    return y, b_fp16


def _emulation_error(gw, x, qw, row, k=KERNEL, check_levels=True, emulate=_emulate) -> None:
    """Asserts the emulated outputs of superblock row `row` equal sum_c q fp16(x d sc) - x dmin mn (float64), the
    fp16 B values checked against the format's scales and d."""
    y, b16 = emulate(gw, x, row, k, check_levels=check_levels)
    blocks = qw.blocks[row, :16].numpy()  # (16 columns, 84)
    sc, mn = (blocks[:, 0:16] & 15).astype(np.float32), (blocks[:, 0:16] >> 4).astype(np.float64)
    d = blocks[:, 80:82].copy().view(np.float16)[:, 0].astype(np.float32)
    dmin = blocks[:, 82:84].copy().view(np.float16)[:, 0].astype(np.float32)
    x32 = x.astype(np.float32)
    b_want = ((x32 * d)[:, None] * sc).astype(np.float16).astype(np.float64)  # (16 columns, 16 tiles)
    for e in range(2):  # lane g's B of parity e is tile 2 g + e's
        np.testing.assert_array_equal(b16[e], b_want[:, e::2].T, err_msg=f"B of parity {e}")
    q = q2_k_levels(qw.blocks[row, :16].reshape(-1, 84)).numpy().reshape(16, 16, 16).astype(np.float64)
    mins = ((x32 * dmin).astype(np.float64)[:, None] * mn).sum(axis=0)  # (16 tiles)
    want = (np.einsum("cmi,cm->mi", q, b_want) - mins[:, None]).reshape(256)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12 * np.abs(want).max(), err_msg=f"row {row}")


def test_q2_k_cuda_fragments_emulated(rng):
    """Every lane (g, t), tile m and slot of one chunk (columns 0-15 of 19, read through the kernel's pointer formulas)
    of every superblock row (5: the last 76 rows): each A half holds
    the slot's 2-bit level at the kernel's bits (even tiles row g at 0, row g + 8 at 4; odd at 2 and 6), each lane's B
    of parity e is fp16(x d sc[2 g + e]) and its min term x dmin mn[2 g + e]; the emulated mma products, the
    epilogue's per-parity scales and the min term per tile give sum q b - x dmin mn exactly (float64). Broken
    variants (the lane's half of the scale bytes, the scale permute, the odd tiles' masks, their epilogue scale,
    their B) fail."""
    broken = [{"half": 0}, {"sel": lambda g: (2 * (g & 3) + 1) | ((2 * (g & 3)) << 4)},
              {"odd_mask": (0x00030003, 0x00C000C0)}, {"odd_scale": (2.0**24, 2.0**18)}, {"odd_b": 0}]
    check_emulation(rng, "q2_k", gpu_layout_q2k.repack, _emulation_error, KERNEL, broken)


def test_q2_k_cuda_tile_pairs_emulated(rng):
    """The tile pairs (PAIRS, ACC 8) of every superblock row of one chunk give the same exact sums as the 16-tile
    assembly (every row written once: a row missed stays NaN); broken variants (the word's shift, the lane's half of
    B, a B selector, the pair's second tile, the odd tiles' masks) fail."""
    broken = [{"shift": 4}, {"upper": lambda g: g & 1}, {"tile1": 2}, {"sel": {**PAIRS["sel"], (1, 1): 0x1044}},
              {"odd_mask": (0x00030003, 0x00C000C0)}]
    check_pairs_emulation(rng, "q2_k", gpu_layout_q2k.repack, _emulate_pairs, _emulation_error, KERNEL, PAIRS_Q2K,
                          broken)


def test_q2_k_cuda_compiles_for_sm90(tmp_path, monkeypatch):
    """TYPE 2 compiles with NVRTC for sm_90 (and sm_80) in each mode, pipe, accumulator count and finish, cluster
    included, without spills, 16 mma in the main loop; its B2 loop (PIPE 0, 16 accumulators) holds 223 instructions
    a chunk and lane when written, 127 registers (Q4_K's: 224, 125): 80 of them assemble the A fragments (one
    permute per tile pair and slot pair, four ANDs a tile). Tile pairs at 8 accumulators, below."""
    assert_type_compiles(2, (230, 235, 285), 110, 128, tmp_path, monkeypatch)
    # tile pairs (ACC 8): 228 loop instructions at 8 warps, 234 at 4, 93-96 registers when written (262 at ACC 2
    # with 32 selects)
    assert_pairs_compile(2, 236, 100)
