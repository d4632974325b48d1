"""Zigzag Q5_K on the CUDA GEMV (zigzag_q4k.cu, TYPE 5; kernels/gpu_layout_q5k.py): the layout is
exact, the kernel's assembly of each tensor-core fragment from it gives every lane the right five
bits (emulated here bit for bit, on the CPU); the dequant kernel and B2 / B4 on the GPU:
test_kquant_cuda.py. The runtime's CudaKQuantLinear (Q2_K, Q3_K, Q5_K, Q6_K and Q8_0) on the CPU
interpreter (several tokens) and on the GPU (`gpu`)."""

import numpy as np
import pytest
import torch

from spqt.kernels import gpu_layout, gpu_layout_q5k
from spqt.kernels.gpu_layout_types import q5_k_levels

from cuda_emulation import byte_perm
from test_kernels_types import _random_blocks


def test_q5k_cuda_layout_is_exact(rng):
    qw = _random_blocks(rng, "q5_k", (300, 75))  # 2 block rows (the second 44 rows), 75 columns
    gw = gpu_layout_q5k.repack(qw, "cpu")
    flat = qw.blocks.reshape(-1, 176)
    assert torch.equal(gpu_layout_q5k.levels_of(gw), q5_k_levels(flat))
    rows, cols = gw.grid
    heads = gpu_layout.ungroup_heads(gw.head, rows).reshape(-1, 4).contiguous().view(torch.uint8)
    assert torch.equal(heads, flat[:, :16])
    assert gw.nbytes == flat.numel() and gw.fifth.shape == (rows, cols, 8)


def test_q5k_cuda_fragment_bits(rng):
    """zigzag_q4k.cu's compute() at TYPE 5, emulated: for lane (g, t), tile m = 4 q + s and the slot
    pairs (0, 1), (2, 3), the A registers a0 / a2 (rows g) and a1 / a3 (rows g + 8) hold the two
    slots' levels as fp16 subnormal bits: level << 0 (row g) and level << 4 (row g + 8)."""
    qw = _random_blocks(rng, "q5_k", (256, 16))
    gw = gpu_layout_q5k.repack(qw, "cpu")
    levels = q5_k_levels(qw.blocks.reshape(-1, 176)).reshape(16, 256)  # column c's block
    quants = gpu_layout.from_planes(gw.quants)[0].numpy().view(np.uint32)  # (16 columns, 32 words)
    fifth = gw.fifth[0].numpy().view(np.uint32)  # (16 columns, 8 words)
    for g in range(8):
        for t in range(4):
            cols = [4 * i + t for i in range(4)]  # slot i's column
            w = [quants[c, 4 * g: 4 * g + 4] for c in cols]  # the lane's 16 bytes: its uint4 of the block
            hb = [int(fifth[c, g]) for c in cols]
            for m in range(16):
                q, s = m >> 2, m & 3
                sel = s | (s << 4) | ((4 + s) << 8) | ((4 + s) << 12)
                selq = q | (q << 4) | ((4 + q) << 8) | ((4 + q) << 12)
                for pair in (0, 2):
                    p = byte_perm(int(w[pair][q]), int(w[pair + 1][q]), sel)
                    tt = (byte_perm(hb[pair], hb[pair + 1], selq) << (4 - s)) & 0xFFFFFFFF
                    a_g = (p & 0x000F000F) | (tt & 0x00100010)
                    a_g8 = (p & 0x00F000F0) | (tt & 0x01000100)
                    for half, slot in ((0, pair), (1, pair + 1)):
                        c = cols[slot]
                        assert (a_g >> (16 * half)) & 0xFFFF == levels[c, 16 * m + g], (g, t, m, slot)
                        assert (a_g8 >> (16 * half)) & 0xFFFF == levels[c, 16 * m + 8 + g] << 4, (g, t, m, slot)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["q2_k", "q3_k", "q5_k", "q6_k", "q8_0"])
def test_q5k_linear_runs_on_the_cuda_gemv(rng, fmt):
    """A zigzag Q2_K / Q3_K / Q5_K / Q6_K / Q8_0 map on CUDA in fp16 or bf16 runs on the CUDA GEMV (CudaKQuantLinear):
    one token (B2) and several (dequantize + cuBLAS) equal the float64 product within the rounding of x, W x and y."""
    import spqt
    from spqt.checkpoint import QuantizedWeight
    from spqt.kernels import zigzag_cuda
    from spqt.kernels.gpu_linear import CudaKQuantLinear
    from spqt.linear import Linear

    w = rng.standard_normal((1000, 777)).astype(np.float32) / 28
    qw = QuantizedWeight(torch.from_numpy(spqt.quantize(w, fmt, "zigzag")), fmt, "zigzag", w.shape)
    ref = qw.dequantize().double()
    for dtype in (torch.float16, torch.bfloat16):
        lin = Linear(qw, dtype, "cuda", backend="triton")
        assert isinstance(lin.impl, CudaKQuantLinear) and isinstance(lin.impl.w, zigzag_cuda.kquant_layout(fmt)[0])
        for tokens in (1, 3):
            x = torch.from_numpy(rng.standard_normal((tokens, 777)).astype(np.float32)).to(dtype)
            y = lin(x.cuda())
            assert y.dtype == dtype
            want = x.double() @ ref.T
            torch.testing.assert_close(y.double().cpu(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()),
                                       msg=lambda m: f"{dtype} {tokens} tokens: {m}")


@pytest.mark.parametrize("fmt", ["q2_k", "q3_k", "q5_k", "q6_k", "q8_0"])
def test_kquant_linear_prefill_interp(rng, fmt, monkeypatch):
    """CudaKQuantLinear on the CPU (interpreter): the weight lands in its type's CUDA layout, and several
    tokens (the dequant kernel, then the GEMM) equal the GEMM on the format's own decode exactly."""
    from spqt.kernels import zigzag_cuda
    from spqt.kernels.gpu_linear import CudaKQuantLinear

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qw = _random_blocks(rng, fmt, (300, 77))
    lin = CudaKQuantLinear(qw, torch.float16, "cpu")
    assert zigzag_cuda.in_kquant_layout(lin.w) and lin.w.fmt == fmt
    x = torch.from_numpy(rng.standard_normal((3, 77)).astype(np.float32)).half()
    assert torch.equal(lin.dense(x), torch.nn.functional.linear(x, qw.dequantize().half()))
    assert CudaKQuantLinear(qw, torch.bfloat16, "cpu").ws_dense.y.dtype == torch.bfloat16  # the CUDA GEMV's bf16
    with pytest.raises(ValueError, match="fp16 or bf16"):
        CudaKQuantLinear(qw, torch.float32, "cpu")


def test_type_linears_take_their_tuned_configs(rng, tmp_path, monkeypatch):
    """A type's tuned CUDA entry reaches CudaKQuantLinear (config and crossover), its "fallback" the Triton type
    kernel's linear; a shape without a type entry runs Q4_K's config of the shape (the same CUDA kernel)."""
    import json

    from spqt.kernels import tuning
    from spqt.kernels.gpu_linear import CudaKQuantLinear, TritonZigzagTypesLinear

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fallback = {"split": 7, "num_warps": 2, "block_k": 16}
    cuda = {"impl": "cuda", "split": 5, "num_warps": 8, "chunks": 1, "pipe": 0, "fused": False, "acc": 2,
            "fallback": fallback, "us": 1.0}
    q4k = {"impl": "cuda", "split": 3, "num_warps": 4, "chunks": 1, "pipe": 0, "fused": False, "acc": 16, "us": 2.0}
    entries = {"zigzag_dense_q3_k": {"300x77": cuda}, "zigzag_sparse_q3_k": {"300x77": dict(cuda, crossover=0.25)},
               "zigzag_dense": {"300x77": q4k}, "zigzag_sparse": {"300x77": dict(q4k, crossover=0.4)}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION, "entries": entries}))
    monkeypatch.setattr(tuning, "table_path", lambda key=None: path)
    monkeypatch.setattr(tuning, "device_key", lambda: "test-gpu")
    monkeypatch.setattr(tuning, "_cuda_usable", lambda: True)  # as on a GPU machine with NVRTC
    tuning._load_table.cache_clear()
    try:
        for fmt, want, crossover in (("q3_k", cuda, 0.25), ("q2_k", q4k, 0.4)):
            lin = CudaKQuantLinear(_random_blocks(rng, fmt, (300, 77)), torch.float16, "cpu")
            assert lin.cfg_dense["split"] == want["split"] and lin.cfg_dense["acc"] == want["acc"], (fmt, lin.cfg_dense)
            assert lin.cfg_sparse["crossover"] == crossover and lin.sparse_pays(0.25) == (crossover <= 0.25)
        triton = TritonZigzagTypesLinear(_random_blocks(rng, "q3_k", (300, 77)), torch.float16, "cpu")
        assert triton.cfg_dense == fallback and triton.cfg_sparse == fallback
        # Q4_K's tile pairs stay Q4_K's: a type borrowing that entry runs the kernel's own assembly
        entries["zigzag_dense"]["300x77"] = dict(q4k, acc=8, pairs=True, pairs_step_us={"0": 2.0, "1": 1.9})
        path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION, "entries": entries}))
        tuning._load_table.cache_clear()
        lin = CudaKQuantLinear(_random_blocks(rng, "q2_k", (300, 77)), torch.float16, "cpu")
        assert lin.cfg_dense["acc"] == 8 and not set(tuning.PAIRS_KEYS) & set(lin.cfg_dense)
        assert tuning.launch_args(lin.cfg_dense)["extra"] == ()
        # a type's own entry keeps its own tile pairs (Q2_K's, at 8 accumulators)
        entries["zigzag_dense_q2_k"] = {"300x77": dict(cuda, acc=8, pairs=True)}
        path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION, "entries": entries}))
        tuning._load_table.cache_clear()
        lin = CudaKQuantLinear(_random_blocks(rng, "q2_k", (300, 77)), torch.float16, "cpu")
        assert lin.cfg_dense["pairs"] and tuning.launch_args(lin.cfg_dense)["extra"] == ("-DPAIRS=1",)
        # MODE_KEPT runs a B2 entry without its pairs (gpu_linear.sparse_kept: the config its routes were timed with)
        assert tuning.without_pairs(dict(q4k, acc=8, pairs=True, pairs_step_us={"0": 2.0})) == dict(q4k, acc=8)
    finally:
        tuning._load_table.cache_clear()
