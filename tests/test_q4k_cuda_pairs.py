"""Zigzag Q4_K on the CUDA GEMV with tile pairs (zigzag_q4k.cu, PAIRS: one mma multiplies two tiles of the same
8 columns, no permutes), emulated on the CPU bit for bit at 8 accumulators (no selects) and 2 (B zero outside the
pair's lanes): the lanes' A registers from their level words, B in the lane's half, the 16 mma into the accumulators
and program_sums' map of accumulator registers to rows. On the GPU: test_kernels.py's CUDA test (PAIRS_CONFIGS)."""

import numpy as np
import pytest
import torch

from spqt.kernels import gpu_layout

from cuda_emulation import fp16_halves


def pair_chunk_rows(words: np.ndarray, v: np.ndarray, acc: int) -> np.ndarray:
    """One chunk as compute() and program_sums() take it at PAIRS and ACC acc (8 or 2): words (16 columns, 32) uint32
    zigzag level words, v (8 sub-blocks g, 16 columns) the B value lane group g multiplies column c by; -> the 256 row
    sums (float64) before the min term."""
    c = np.zeros((acc, 16, 8))  # pair (q, e)'s accumulator: 2 q + e (ACC 8) or e (ACC 2); C (16 rows, 8 columns)
    for q in range(4):
        for e in range(2):
            for hs in range(2):
                a_mat, b_mat = np.zeros((16, 16)), np.zeros((16, 8))
                for g in range(8):
                    half_mask = 0xFFFF0000 if g & 1 else 0x0000FFFF
                    for t in range(4):
                        cols = [4 * i + t for i in range(4)]  # slot i's column
                        lane_words = [words[col, 4 * g: 4 * g + 4] for col in cols]  # the lane's uint4 of each slot
                        wa = int(lane_words[2 * hs][q]) >> (8 * e)
                        wb = int(lane_words[2 * hs + 1][q]) >> (8 * e)
                        a_mat[g, 2 * t: 2 * t + 2] = fp16_halves(wa & 0x000F000F)
                        a_mat[g + 8, 2 * t: 2 * t + 2] = fp16_halves(wa & 0x00F000F0)
                        a_mat[g, 2 * t + 8: 2 * t + 10] = fp16_halves(wb & 0x000F000F)
                        a_mat[g + 8, 2 * t + 8: 2 * t + 10] = fp16_halves(wb & 0x00F000F0)
                        mine = acc == 8 or (g >> 1) == q
                        for k0, slot in ((2 * t, 2 * hs), (2 * t + 8, 2 * hs + 1)):
                            bits = int(np.float16(v[g, cols[slot]]).view(np.uint16))
                            b_mat[k0: k0 + 2, g] = fp16_halves(((bits << 16) | bits) & half_mask if mine else 0)
                c[2 * q + e if acc == 8 else e] += a_mat @ b_mat
    rows = np.full(256, np.nan)
    for a in range(8):
        t = a >> 1
        t0 = 4 * (a >> 1) + (a & 1)
        ca = c[a if acc == 8 else a & 1]
        for g in range(8):
            rows[16 * t0 + g] = ca[g, 2 * t] * 2.0**24
            rows[16 * t0 + 8 + g] = ca[g + 8, 2 * t] * 2.0**20
            rows[16 * (t0 + 2) + g] = ca[g, 2 * t + 1] * 2.0**24
            rows[16 * (t0 + 2) + 8 + g] = ca[g + 8, 2 * t + 1] * 2.0**20
    return rows


@pytest.mark.parametrize("acc", [8, 2])
def test_q4k_cuda_tile_pairs_emulated(rng, acc):
    """Every row of a chunk gets sum_c level[c, row] v[row / 32, c] exactly, each row written once (a row missed stays
    NaN), and a level changed in one column changes its row alone."""
    levels = rng.integers(0, 16, size=(16, 256))  # column c's block, weight order
    words = gpu_layout.pack_levels(torch.from_numpy(levels), "zigzag").numpy().view(np.uint32)
    v = rng.integers(-64, 64, size=(8, 16)) / 8.0  # fp16-exact B values
    want = np.array([sum(levels[c, r] * v[r // 32, c] for c in range(16)) for r in range(256)])
    got = pair_chunk_rows(words, v, acc)
    np.testing.assert_array_equal(got, want)
    levels[5, 77] = (levels[5, 77] + 1) % 16
    words = gpu_layout.pack_levels(torch.from_numpy(levels), "zigzag").numpy().view(np.uint32)
    changed = np.nonzero(pair_chunk_rows(words, v, acc) != got)[0]
    assert list(changed) == ([77] if v[77 // 32, 5] else [])
