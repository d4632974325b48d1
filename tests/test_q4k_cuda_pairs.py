"""Zigzag Q4_K and Q5_K on the CUDA GEMV with tile pairs (zigzag_q4k.cu, PAIRS: one mma multiplies two tiles of the
same 8 columns, no permutes), emulated on the CPU bit for bit at 8 accumulators (no selects) and 2 (B zero outside the
pair's lanes): the lanes' A registers from their level words (Q5_K: ORed with the fifth bits of their word), B in the
lane's half, the 16 mma into the accumulators and program_sums' map of accumulator registers to rows. On the GPU:
test_kernels.py's CUDA test (PAIRS_CONFIGS), test_kquant_cuda.py's (Q5_K)."""

import numpy as np
import pytest
import torch

from spqt.kernels import gpu_layout, gpu_layout_q5k
from spqt.kernels.gpu_layout_types import q5_k_levels

from cuda_emulation import byte_perm, fp16_halves
from test_kernels_types import _random_blocks


def fifth_bits(hb: int, q: int, e: int) -> tuple[int, int]:
    """compute()'s Q5_K fifth bits of pair (q, e) from a lane's word hb of one column: (row g's, at bits 4 and 20;
    row g + 8's, at 8 and 24), byte q spread by the multiply and shifted by e."""
    z = ((byte_perm(hb, 0, 0x4440 | q) * 0x40010) & 0xFFFFFFFF) >> e
    return z & 0x00100010, z & 0x01000100


def pair_chunk_rows(words: np.ndarray, v: np.ndarray, acc: int, fifth: np.ndarray | None = None) -> np.ndarray:
    """One chunk as compute() and program_sums() take it at PAIRS and ACC acc (8 or 2): words (16 columns, 32) uint32
    zigzag level words, v (8 sub-blocks g, 16 columns) the B value lane group g multiplies column c by, fifth (Q5_K;
    16 columns, 8 lane groups) uint32 fifth-bit words; -> the 256 row sums (float64) before the min term."""
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
                        fa, fb = ((0, 0), (0, 0)) if fifth is None else (
                            fifth_bits(int(fifth[cols[2 * hs], g]), q, e),
                            fifth_bits(int(fifth[cols[2 * hs + 1], g]), q, e))
                        a_mat[g, 2 * t: 2 * t + 2] = fp16_halves((wa & 0x000F000F) | fa[0])
                        a_mat[g + 8, 2 * t: 2 * t + 2] = fp16_halves((wa & 0x00F000F0) | fa[1])
                        a_mat[g, 2 * t + 8: 2 * t + 10] = fp16_halves((wb & 0x000F000F) | fb[0])
                        a_mat[g + 8, 2 * t + 8: 2 * t + 10] = fp16_halves((wb & 0x00F000F0) | fb[1])
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


@pytest.mark.parametrize("acc", [8, 2])
def test_q5k_cuda_tile_pairs_emulated(rng, acc):
    """Q5_K's tile pairs: every row of a chunk gets sum_c level[c, row] v[row / 32, c] with its five-bit levels exactly
    (random blocks through the layout the kernel reads: gpu_layout_q5k), each row written once; a fifth bit flipped in
    one column changes its row alone."""
    qw = _random_blocks(rng, "q5_k", (256, 16))
    gw = gpu_layout_q5k.repack(qw, "cpu")
    levels = q5_k_levels(qw.blocks.reshape(-1, 176)).reshape(16, 256).numpy()  # column c's block, weight order
    assert levels.max() > 15  # fifth bits set (what the test is about)
    words = gpu_layout.from_planes(gw.quants)[0].numpy().view(np.uint32)  # (16 columns, 32 words)
    fifth = gw.fifth[0].numpy().view(np.uint32).copy()  # (16 columns, 8 lane groups)
    v = rng.integers(-64, 64, size=(8, 16)) / 8.0  # fp16-exact B values
    v[v == 0] = 0.5
    want = np.array([sum(int(levels[c, r]) * v[r // 32, c] for c in range(16)) for r in range(256)])
    got = pair_chunk_rows(words, v, acc, fifth)
    np.testing.assert_array_equal(got, want)
    # row 16 m + 8 + g of tile m = 4 q + s is bit s + 4 of byte q of lane group g's word: m 13 (q 3, s 1), g 5
    fifth[9, 5] ^= 1 << (8 * 3 + 1 + 4)
    changed = np.nonzero(pair_chunk_rows(words, v, acc, fifth) != got)[0]
    assert list(changed) == [16 * 13 + 8 + 5]
