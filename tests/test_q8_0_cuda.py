"""Zigzag Q8_0 on the CUDA GEMV (zigzag_q4k.cu, TYPE 8; kernels/gpu_layout_q8_0.py): the layout is
exact (the blocks come back byte for byte), the kernel's assembly of each tensor-core fragment and
each lane's d gives the right 8-bit levels (emulated bit for bit on the CPU), TYPE 8 compiles for
sm_90 without spills, the dequant kernel (interpreter) equals the format's decode, and on the GPU
(`gpu`) B2 and B4 against the float64 product of the dequantized matrix, with poisoned outputs."""

import torch

from spqt.kernels import gpu_layout_q8_0

from test_kernels_types import _random_blocks


def test_q8_0_cuda_layout_is_exact(rng):
    for shape in ((300, 75), (1, 37), (2311, 77)):  # padded block rows: 10 -> 16, 1 -> 8, 73 -> 80
        qw = _random_blocks(rng, "q8_0", shape)
        gw = gpu_layout_q8_0.repack(qw, "cpu")
        rows, cols = gw.grid
        assert (rows, cols) == (-(-shape[0] // 256), shape[1]) and gw.quants.shape == (rows, 4, cols, 16)
        assert gw.d.shape == (-(-rows // 4), cols, 4, 8) and gw.nbytes == 34 * 8 * rows * cols
        assert torch.equal(gpu_layout_q8_0.blocks_of(gw), qw.blocks), shape
        # the levels and d alone give the format's decode (weight 32 b + i of a superblock row: d[b] q)
        w = gpu_layout_q8_0.d_of(gw).float().repeat_interleave(32, dim=2) * gpu_layout_q8_0.levels_of(gw).float()
        assert torch.equal(w.permute(0, 2, 1).reshape(rows * 256, cols)[: shape[0]], qw.dequantize()), shape
