"""Zigzag Q2_K on the CUDA GEMV (kernels/gpu_layout_q2k.py): the layout is exact (the blocks come back
byte for byte)."""

import torch

from spqt.kernels import gpu_layout_q2k
from spqt.kernels.gpu_layout_types import q2_k_levels

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
