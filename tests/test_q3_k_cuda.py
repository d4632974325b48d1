"""Zigzag Q3_K on the CUDA GEMV (kernels/gpu_layout_q3k.py): the layout is exact (the blocks come back
byte for byte)."""

import torch

from spqt.kernels import gpu_layout_q3k
from spqt.kernels.gpu_layout_types import q3_k_levels

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
