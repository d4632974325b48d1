"""Zigzag Q8_0 on the CUDA GEMV (zigzag_q4k.cu, TYPE 8; kernels/gpu_layout_q8_0.py): the layout is
exact (the blocks come back byte for byte), the kernel's assembly of each tensor-core fragment and
each lane's d gives the right 8-bit levels (emulated bit for bit on the CPU), TYPE 8 compiles for
sm_90 without spills; the dequant kernel, B2 / B4 and the finishes on the GPU: test_kquant_cuda.py."""

import numpy as np
import torch

from spqt.kernels import gpu_layout_q8_0

from cuda_emulation import assert_type_compiles, byte_perm, mma_kept_columns
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


def test_q8_0_cuda_fragments_emulated(rng):
    """zigzag_q4k.cu's compute() at TYPE 8, emulated bit for bit for every lane (g, t), tile m and slot of one
    chunk (16 columns) of every superblock row: each A register holds the two slots' levels u = q + 128 as fp16
    subnormals u 2^-24 (row g: a0 / a2, row g + 8: a1 / a3), the lane's d is block g's of the slot's column;
    then the m16n8k16 products of those fragments, the kept column n = m / 2 of each tile, the epilogue's 2^24
    and the -128 d x term per 32-row block give sum_k q d x in fp16 B exactly (float64)."""
    shape = (1100, 16)  # 5 superblock rows (two d groups), the last one 76 rows
    qw = _random_blocks(rng, "q8_0", shape)
    gw = gpu_layout_q8_0.repack(qw, "cpu")
    rows, cols = gw.grid
    quants = gw.quants.numpy().view(np.uint32)  # (R, 4 planes, 16 columns, 16 words)
    d_bits = gw.d.reshape(-1).numpy().view(np.uint16)
    blocks = torch.cat([qw.blocks, qw.blocks.new_zeros(8 * rows - qw.blocks.shape[0], cols, 34)]).numpy()
    q_ref = blocks[..., 2:].view(np.int8).astype(np.int64)  # (8 R, 16, 32): block 8 r + b, column, row i
    d_ref = blocks[..., :2].copy().view(np.float16)[..., 0]  # (8 R, 16)
    x = rng.standard_normal(cols).astype(np.float16)
    for r in range(rows):
        a_regs, b_regs, bias = {}, {}, np.zeros(8)
        for g in range(8):
            for t in range(4):
                cols_ = [4 * i + t for i in range(4)]  # slot i's column
                # the lane's loads: uint4 (g % 4) of planes g // 4 (tiles 0-7) and 2 + g // 4 (tiles 8-15); d at
                # fp16 ((r / 4) K + col) 32 + 8 (r % 4) + g
                w = [quants[r, g >> 2, c, 4 * (g & 3): 4 * (g & 3) + 4] for c in cols_]
                h = [quants[r, 2 + (g >> 2), c, 4 * (g & 3): 4 * (g & 3) + 4] for c in cols_]
                d = [int(d_bits[((r >> 2) * cols + c) * 32 + 8 * (r & 3) + g]) for c in cols_]
                assert [np.uint16(v) for v in d] == [d_ref[8 * r + g, c].view(np.uint16) for c in cols_], (r, g, t)
                b = (x[cols_].astype(np.float32) * np.array(d, dtype=np.uint16).view(np.float16).astype(np.float32))
                b16 = b.astype(np.float16).astype(np.float64)  # pack_f16x2: slots 0 / 1 in b01, 2 / 3 in b23
                b_regs[g, t] = b16
                bias[g] += 128.0 * b16.sum()
                for m in range(16):
                    wh = h if m >> 3 else w
                    q = (m >> 1) & 3
                    sel = 0x7632 if m & 1 else 0x5410
                    regs = []
                    for pair in (0, 2):
                        p = byte_perm(int(wh[pair][q]), int(wh[pair + 1][q]), sel)
                        regs += [p & 0x00FF00FF, byte_perm(p, 0, 0x4341)]
                    a0, a1, a2, a3 = regs
                    for half, slot in ((0, 0), (1, 1)):
                        for reg, row, pair in ((a0, g, 0), (a1, g + 8, 0), (a2, g, 2), (a3, g + 8, 2)):
                            c = cols_[pair + slot]
                            want = int(q_ref[8 * r + m // 2, c, 16 * (m % 2) + row]) + 128
                            assert (reg >> (16 * half)) & 0xFFFF == want, (r, g, t, m, slot, row)
                    a_regs[g, t, m] = regs
        y = mma_kept_columns(a_regs, lambda g, t, m: b_regs[g, t]).reshape(256) * 2.0**24
        y -= np.repeat(bias, 32)
        # sum_k q d x with x d rounded to fp16 (what B carries), rows 32 b + i
        b_all = (x.astype(np.float32)[None, :] * d_ref[8 * r: 8 * r + 8].astype(np.float32)).astype(np.float16)
        want = np.einsum("bci,bc->bi", q_ref[8 * r: 8 * r + 8], b_all.astype(np.float64)).reshape(256)
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12 * np.abs(want).max(), err_msg=f"row {r}")


def test_q8_0_cuda_compiles_for_sm90(tmp_path, monkeypatch):
    """TYPE 8 compiles with NVRTC for sm_90 (and sm_80) in each mode, pipe, accumulator count and finish, cluster
    included, without spills, 16 mma in the main loop; its B2 loop (PIPE 0, 16 accumulators) holds 178
    instructions a chunk and lane when written, 127 registers (Q4_K's: 224, 125): 96 of them assemble the A
    fragments (per tile two permutes for the slot pairs, two ANDs for rows g, two permutes for rows g + 8),
    against Q4_K's 96 and its scale decode."""
    assert_type_compiles(8, (185, 212, 205), 100, 128, tmp_path, monkeypatch)
