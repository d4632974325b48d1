"""Zigzag Q4_K, Q5_K and Q6_K on the CUDA GEMV with tile pairs (zigzag_q4k.cu, PAIRS: one mma multiplies two tiles of
the same 8 columns, no permutes), emulated on the CPU bit for bit at 8 accumulators (no selects) and 2 (B zero outside
the pair's lanes): the lanes' A registers from their level words (Q5_K, Q6_K: ORed with the high bits of their words:
nibble_pairs_mma), B in the lane's half (Q6_K: by the pair's tile parity), the 16 mma into the accumulators and
program_sums' map of accumulator registers to rows. On the GPU: test_kernels.py's CUDA test (PAIRS_CONFIGS),
test_kquant_cuda.py's (Q5_K, Q6_K)."""

import numpy as np
import pytest
import torch

from spqt.kernels import gpu_layout, gpu_layout_q5k, gpu_layout_q6k
from spqt.kernels.gpu_layout_types import q5_k_levels, q6_k_levels

from cuda_emulation import byte_perm, fp16_halves
from test_kernels_types import _random_blocks


def _cu_constants() -> dict:
    """The constants of compute()'s Q5_K / Q6_K pair expressions, read from zigzag_q4k.cu itself (the emulation below
    runs them, so a changed constant or shift there fails here; an expression rewritten so that these patterns no
    longer match fails too, and the patterns must follow it)."""
    import re

    from spqt.kernels import zigzag_cuda

    source, hexa = zigzag_cuda.SOURCE.read_text(), r"(0x[0-9A-F]+)u"
    found = {
        "q5": re.search(rf"__byte_perm\(ch\.hb\[slot\], 0u, {hexa} \| q\) \* {hexa}\) >> e;\s*"
                        rf"return z & \(row8 \? {hexa} : {hexa}\);", source),
        "q6": re.search(rf"const int b0 = 2 \* \(q & 1\);\s*const u32 z = __byte_perm\(\(q >> 1\) \? "
                        rf"ch\.hb\[slot\]\.y : ch\.hb\[slot\]\.x, 0u,\s*b0 \| {hexa} \| \(\(b0 \+ 1\) << 8\) \| "
                        rf"{hexa}\) << \(4 - 2 \* e\);\s*return z & \(row8 \? {hexa} : {hexa}\);", source),
        "q6_b": re.search(rf"void half_b\(u32 b01, u32 b23, bool upper, u32\* out\) \{{\s*"
                          rf"const u32 sel_lo = upper \? {hexa} : {hexa}, sel_hi = upper \? {hexa} : {hexa};\s*"
                          r"out\[0\] = __byte_perm\(b01, 0u, sel_lo\);\s*out\[1\] = __byte_perm\(b01, 0u, sel_hi\);\s*"
                          r"out\[2\] = __byte_perm\(b23, 0u, sel_lo\);\s*out\[3\] = __byte_perm\(b23, 0u, sel_hi\);.*?"
                          r"half_b\(b01e, b23e, lane_g & 1, bpe\);\s*half_b\(b01o, b23o, lane_g & 1, bpo\);.*?"
                          r"\[&\]\(int e, int slot\) \{ return e \? bpo\[slot\] : bpe\[slot\]; \}", source, re.S),
    }
    assert all(found.values()), [name for name, m in found.items() if not m]
    return {name: [int(v, 16) for v in m.groups()] for name, m in found.items()}


CU = _cu_constants()


def fifth_bits(hb: int, q: int, e: int) -> tuple[int, int]:
    """compute()'s Q5_K fifth bits of pair (q, e) from a lane's word hb of one column: (row g's, at bits 4 and 20;
    row g + 8's, at 8 and 24), byte q spread by the multiply and shifted by e."""
    sel, mult, mask8, mask = CU["q5"]
    z = ((byte_perm(hb, 0, sel | q) * mult) & 0xFFFFFFFF) >> e
    return z & mask, z & mask8


def top_pairs(hb: tuple[int, int], q: int, e: int) -> tuple[int, int]:
    """compute()'s Q6_K top bit pairs of pair (q, e) from a lane's two words hb of one column: (row g's, at bits 4-5
    and 20-21; row g + 8's, at 8-9 and 24-25), bytes 2 (q % 2) and 2 (q % 2) + 1 of word q / 2 at bytes 0 and 2,
    shifted by 4 - 2 e."""
    sel1, sel3, mask8, mask = CU["q6"]
    b0 = 2 * (q & 1)
    z = (byte_perm(hb[q >> 1], 0, b0 | sel1 | ((b0 + 1) << 8) | sel3) << (4 - 2 * e)) & 0xFFFFFFFF
    return z & mask, z & mask8


def q6_b_register(bits: tuple[int, int], g: int, slot: int) -> int:
    """compute()'s Q6_K B register of a slot: the fp16 bits of its slot pair (b01 / b23: slots 2 (slot / 2) and + 1,
    the tile parity's values) byte-permuted into lane g's half by sel0 (even slot) or sel1 (odd), zeros elsewhere."""
    odd0, even0, odd1, even1 = CU["q6_b"]
    sel = (odd1 if g & 1 else even1) if slot & 1 else (odd0 if g & 1 else even0)
    return byte_perm(bits[0] | (bits[1] << 16), 0, sel)


def pair_chunk_rows(words: np.ndarray, v, acc: int, high=None, b_register=None) -> np.ndarray:
    """One chunk as compute() and program_sums() take it at PAIRS and ACC acc (8 or 2): words (16 columns, 32) uint32
    zigzag level words, v(g, e, c) the B value lane group g multiplies column c by in pair (q, e) (Q4_K, Q5_K: its
    sub-block g's; Q6_K: tile 2 g + e's), high(c, g, q, e) (Q5_K, Q6_K) the bits above the nibbles of column c's A
    registers (row g's, row g + 8's), b_register(bits, g, slot) (Q6_K) a slot's B register from the fp16 bits of its
    slot pair (else Q4_K's: the slot's fp16 in both halves, masked to lane g's); -> the 256 row sums (float64) before
    the min / offset term."""
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
                        fa, fb = ((0, 0), (0, 0)) if high is None else (high(cols[2 * hs], g, q, e),
                                                                           high(cols[2 * hs + 1], g, q, e))
                        a_mat[g, 2 * t: 2 * t + 2] = fp16_halves((wa & 0x000F000F) | fa[0])
                        a_mat[g + 8, 2 * t: 2 * t + 2] = fp16_halves((wa & 0x00F000F0) | fa[1])
                        a_mat[g, 2 * t + 8: 2 * t + 10] = fp16_halves((wb & 0x000F000F) | fb[0])
                        a_mat[g + 8, 2 * t + 8: 2 * t + 10] = fp16_halves((wb & 0x00F000F0) | fb[1])
                        mine = acc == 8 or (g >> 1) == q
                        pair_bits = [int(np.float16(v(g, e, cols[slot])).view(np.uint16))
                                     for slot in (2 * hs, 2 * hs + 1)]
                        for k0, slot in ((2 * t, 2 * hs), (2 * t + 8, 2 * hs + 1)):
                            bits = pair_bits[slot & 1]
                            reg = ((bits << 16) | bits) & half_mask if b_register is None else b_register(
                                pair_bits, g, slot)
                            b_mat[k0: k0 + 2, g] = fp16_halves(reg if mine else 0)
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
    got = pair_chunk_rows(words, lambda g, e, c: v[g, c], acc)
    np.testing.assert_array_equal(got, want)
    levels[5, 77] = (levels[5, 77] + 1) % 16
    words = gpu_layout.pack_levels(torch.from_numpy(levels), "zigzag").numpy().view(np.uint32)
    changed = np.nonzero(pair_chunk_rows(words, lambda g, e, c: v[g, c], acc) != got)[0]
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
    got = pair_chunk_rows(words, lambda g, e, c: v[g, c], acc, lambda c, g, q, e: fifth_bits(int(fifth[c, g]), q, e))
    np.testing.assert_array_equal(got, want)
    # row 16 m + 8 + g of tile m = 4 q + s is bit s + 4 of byte q of lane group g's word: m 13 (q 3, s 1), g 5
    fifth[9, 5] ^= 1 << (8 * 3 + 1 + 4)
    changed = np.nonzero(pair_chunk_rows(words, lambda g, e, c: v[g, c], acc,
                                         lambda c, g, q, e: fifth_bits(int(fifth[c, g]), q, e)) != got)[0]
    assert list(changed) == [16 * 13 + 8 + 5]


@pytest.mark.parametrize("acc", [8, 2])
def test_q6k_cuda_tile_pairs_emulated(rng, acc):
    """Q6_K's tile pairs: every row of a chunk gets sum_c level[c, row] v[row / 16, c] with its six-bit levels and a
    B per tile (its parity's) exactly (random blocks through gpu_layout_q6k), each row written once; a top bit flipped
    in one column changes its row alone."""
    qw = _random_blocks(rng, "q6_k", (256, 16))
    gw = gpu_layout_q6k.repack(qw, "cpu")
    levels = q6_k_levels(qw.blocks.reshape(16, 210)).numpy()  # column c's block, weight order
    assert levels.max() > 47  # top pairs set (what the test is about)
    words = gpu_layout.from_planes(gw.quants)[0].numpy().view(np.uint32)  # (16 columns, 32 words)
    high = gw.high[0].numpy().view(np.uint32).copy()  # (16 columns, 16 words): words 2 g, 2 g + 1 of lane group g
    v = rng.integers(-64, 64, size=(16, 16)) / 8.0  # B of tile m (16 rows) and column c, fp16-exact
    v[v == 0] = 0.5
    want = np.array([sum(int(levels[c, r]) * v[r // 16, c] for c in range(16)) for r in range(256)])

    def rows():
        return pair_chunk_rows(words, lambda g, e, c: v[2 * g + e, c], acc,
                               lambda c, g, q, e: top_pairs((int(high[c, 2 * g]), int(high[c, 2 * g + 1])), q, e),
                               q6_b_register)

    got = rows()
    np.testing.assert_array_equal(got, want)
    # tile m's row g + 8 pair: bits 4 + 2 (m % 2) of byte (m / 2) % 4 of word m / 8: m 11 (word 1, byte 1, bits 6, 7),
    # g 2
    high[6, 2 * 2 + 1] ^= 1 << (8 * 1 + 6)
    changed = np.nonzero(rows() != got)[0]
    assert list(changed) == [16 * 11 + 8 + 2]
