"""Zigzag Q6_K on the CUDA GEMV (zigzag_q4k.cu, TYPE 6; kernels/gpu_layout_q6k.py): the layout is
exact, the kernel's assembly of each tensor-core fragment and of each lane's two scales gives the
right six-bit levels and signed scales (emulated bit for bit on the CPU); the dequant kernel and B2 / B4
on the GPU: test_kquant_cuda.py."""

import numpy as np
import torch

from spqt.kernels import gpu_layout, gpu_layout_q6k
from spqt.kernels.gpu_layout_types import q6_k_levels

from cuda_emulation import byte_perm
from test_kernels_types import _random_blocks


def test_q6k_cuda_layout_is_exact(rng):
    qw = _random_blocks(rng, "q6_k", (300, 75))
    gw = gpu_layout_q6k.repack(qw, "cpu")
    flat = qw.blocks.reshape(-1, 210)
    rows, cols = gw.grid
    assert torch.equal(gpu_layout_q6k.levels_of(gw), q6_k_levels(flat))
    scales = gpu_layout.ungroup_heads(gw.scales, rows).reshape(-1, 4).contiguous().view(torch.uint8)
    assert torch.equal(scales, flat[:, 192:208])
    assert torch.equal(gw.d.reshape(-1).view(torch.uint8).reshape(-1, 2), flat[:, 208:210])
    assert gw.nbytes == flat.numel() and gw.high.shape == (rows, cols, 16)


def _signed_byte(v: int) -> int:
    return v - 256 if v >= 128 else v


def test_q6k_cuda_fragment_bits_and_scales(rng):
    """zigzag_q4k.cu's compute() at TYPE 6, emulated: for lane (g, t) and tile m, the A registers
    hold the slots' 6-bit levels as fp16 subnormal bits (row g: level, row g + 8: level << 4), and
    the lane's two scales are the signed bytes 2 g and 2 g + 1 of the block's 16 (tiles 2 g, 2 g + 1,
    whose rows 32 g .. 32 g + 31 the epilogue's offset term takes by parity)."""
    qw = _random_blocks(rng, "q6_k", (256, 16))
    gw = gpu_layout_q6k.repack(qw, "cpu")
    flat = qw.blocks.reshape(16, 210)
    levels = q6_k_levels(flat)  # column c's block
    quants = gpu_layout.from_planes(gw.quants)[0].numpy().view(np.uint32)  # (16 columns, 32 words)
    high = gw.high[0].numpy().view(np.uint32)  # (16 columns, 16 words)
    scale_words = gpu_layout.ungroup_heads(gw.scales, 1)[0].numpy().view(np.uint32)  # (16 columns, 4 words)
    for g in range(8):
        for t in range(4):
            cols = [4 * i + t for i in range(4)]
            w = [quants[c, 4 * g: 4 * g + 4] for c in cols]
            hb = [(int(high[c, 2 * g]), int(high[c, 2 * g + 1])) for c in cols]
            for c in cols:  # the scales: word g / 2, then the half of lane g
                wv = int(scale_words[c, g >> 1])
                pair = (wv >> (16 * (g & 1))) & 0xFFFFFFFF
                assert _signed_byte(pair & 0xFF) == _signed_byte(int(flat[c, 192 + 2 * g]))
                assert _signed_byte((pair >> 8) & 0xFF) == _signed_byte(int(flat[c, 192 + 2 * g + 1]))
            for m in range(16):
                q, s = m >> 2, m & 3
                sel = s | (s << 4) | ((4 + s) << 8) | ((4 + s) << 12)
                bq, n = (m >> 1) & 3, m & 1
                selb = bq | (bq << 4) | ((4 + bq) << 8) | ((4 + bq) << 12)
                for pair_ in (0, 2):
                    p = byte_perm(int(w[pair_][q]), int(w[pair_ + 1][q]), sel)
                    tt = (byte_perm(hb[pair_][m >> 3], hb[pair_ + 1][m >> 3], selb) << (4 - 2 * n)) & 0xFFFFFFFF
                    a_g = (p & 0x000F000F) | (tt & 0x00300030)
                    a_g8 = (p & 0x00F000F0) | (tt & 0x03000300)
                    for half, slot in ((0, pair_), (1, pair_ + 1)):
                        c = cols[slot]
                        assert (a_g >> (16 * half)) & 0xFFFF == levels[c, 16 * m + g], (g, t, m, slot)
                        assert (a_g8 >> (16 * half)) & 0xFFFF == levels[c, 16 * m + 8 + g] << 4, (g, t, m, slot)
