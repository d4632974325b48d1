"""Zigzag Q8_0 on the CUDA GEMV (zigzag_q4k.cu, TYPE 8; kernels/gpu_layout_q8_0.py): the layout is
exact (the blocks come back byte for byte), the kernel's assembly of each tensor-core fragment and
each lane's d gives the right 8-bit levels (emulated bit for bit on the CPU), TYPE 8 compiles for
sm_90 without spills, the dequant kernel (interpreter) equals the format's decode, and on the GPU
(`gpu`) B2 and B4 against the float64 product of the dequantized matrix, with poisoned outputs."""

import numpy as np
import pytest
import torch

from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gemv as kg
from spqt.kernels import gpu_layout_q8_0, reference
from spqt.kernels.collect import collect

from kernel_inputs import assert_within_fp32_sum, random_x
from test_kernels_types import _random_blocks
from test_q5k_cuda import FP16_X_EPS, _byte_perm


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


@pytest.mark.parametrize("device", [pytest.param("cpu", id="interp"),
                                    pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)])
def test_q8_0_planes_dequant_kernel(rng, device, monkeypatch):
    """kg.dequantize on the Q8_0 CUDA layout (the prefill GEMM's first half) equals the format's own decode."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    for shape in ((300, 75), (1, 37)) if device == "cpu" else ((4096, 4096), (2311, 777)):
        qw = _random_blocks(rng, "q8_0", shape)
        qw = QuantizedWeight(qw.blocks.to(device), "q8_0", "zigzag", shape)
        gw = gpu_layout_q8_0.repack(qw, device)
        out = torch.full(shape, float("nan"), dtype=torch.float32, device=device)
        kg.dequantize(gw, torch.float32, out=out)
        assert torch.equal(out, qw.dequantize()), shape


def _fp16_halves(v: int) -> np.ndarray:
    """A 32-bit register's two fp16 (bits 0-15, 16-31) as float64."""
    return np.array([v & 0xFFFF, v >> 16], dtype=np.uint16).view(np.float16).astype(np.float64)


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
                        p = _byte_perm(int(wh[pair][q]), int(wh[pair + 1][q]), sel)
                        regs += [p & 0x00FF00FF, _byte_perm(p, 0, 0x4341)]
                    a0, a1, a2, a3 = regs
                    for half, slot in ((0, 0), (1, 1)):
                        for reg, row, pair in ((a0, g, 0), (a1, g + 8, 0), (a2, g, 2), (a3, g + 8, 2)):
                            c = cols_[pair + slot]
                            want = int(q_ref[8 * r + m // 2, c, 16 * (m % 2) + row]) + 128
                            assert (reg >> (16 * half)) & 0xFFFF == want, (r, g, t, m, slot, row)
                    a_regs[g, t, m] = regs
        y = np.zeros(256)
        for m in range(16):  # the mma: A (16 rows, k), B (k, 8 columns n = g), k = 2 t + slot (+ 6 for slots 2, 3)
            a_mat, b_mat = np.zeros((16, 16)), np.zeros((16, 8))
            for g in range(8):
                for t in range(4):
                    a0, a1, a2, a3 = a_regs[g, t, m]
                    a_mat[g, 2 * t: 2 * t + 2], a_mat[g + 8, 2 * t: 2 * t + 2] = _fp16_halves(a0), _fp16_halves(a1)
                    a_mat[g, 2 * t + 8: 2 * t + 10] = _fp16_halves(a2)
                    a_mat[g + 8, 2 * t + 8: 2 * t + 10] = _fp16_halves(a3)
                    b_mat[[2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9], g] = b_regs[g, t]
            y[16 * m: 16 * m + 16] = (a_mat @ b_mat)[:, m // 2] * 2.0**24
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
    from spqt.kernels import nvrtc, zigzag_cuda
    from spqt.kernels.sass import disassemble, main_loop, opcode

    monkeypatch.setenv("SPQT_CACHE", str(tmp_path))  # compiled here, not read from a cache
    nvrtc.compile_cubin.cache_clear()
    source = zigzag_cuda.SOURCE.read_text()
    nvrtc.compile_cubin(source, zigzag_cuda.options(4, zigzag_cuda.MODE_INDEXED, 1, 2, bits=8), "sm_80")
    dense, indexed = zigzag_cuda.MODE_DENSE, zigzag_cuda.MODE_INDEXED
    # (mode, pipe, epilogue, acc, cluster, B2 loop limit)
    for mode, pipe, epilogue, acc, cluster, limit in ((dense, 0, -1, 16, False, 185), (dense, 1, 0, 16, False, 212),
                                                      (dense, 0, 2, 2, True, 205), (indexed, 0, 1, 16, False, None),
                                                      (indexed, 1, 2, 2, False, None)):
        options = zigzag_cuda.options(4, mode, pipe, epilogue, acc=acc, bits=8, cluster=cluster)
        sass, regs, stack = disassemble(nvrtc.compile_cubin(source, options, "sm_90"))
        what = f"mode {mode} pipe {pipe} epilogue {epilogue} acc {acc} cluster {cluster}"
        assert stack == 0, f"{what}: {stack} bytes of stack (spills)"
        loop = main_loop(sass, "HMMA")
        assert sum("HMMA" in ln for ln in loop) == 16, what
        if limit is not None:
            assert len(loop) <= limit, f"{what}: B2 loop of {len(loop)} instructions"
        if (mode, pipe, acc) == (dense, 0, 16):
            assembly = sum(opcode(ln) in ("PRMT", "LOP3.LUT") for ln in loop)
            assert assembly <= 100 and regs <= 128, f"{assembly} permutes and logic ops, {regs} registers"
        if cluster:
            assert "UCGABAR_WAIT" in sass, "no cluster barrier in the cluster finish"


GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1000, 1000), (2311, 777)]
CONFIGS = [(1, 4, 0, 16), (7, 2, 1, 2), (64, 8, 0, 2), (33, 4, 1, 16)]  # (split, warps, pipe, acc)


def _gpu_weights(rng, shape):
    """Random Q8_0 blocks with d of either sign in 2^-9 .. 2^-6 (x d a normal fp16 for most x, as in a real matrix;
    _random_blocks' smaller factors would test fp16's subnormals instead)."""
    qw = _random_blocks(rng, "q8_0", shape)
    blocks = qw.blocks.numpy()
    v = np.exp2(rng.uniform(-9, -6, blocks.shape[:2])) * rng.choice([-1, 1], blocks.shape[:2])
    blocks[..., 0:2] = v.astype(np.float16)[..., None].view(np.uint8)
    return QuantizedWeight(torch.from_numpy(blocks).cuda(), "q8_0", "zigzag", shape)


def _magnitudes(qw):
    """(W, |W| + 2 |-128 d|) in float64: the kernel adds (q + 128) d x and -128 d x apart, each at most
    |w| + 128 |d|."""
    blocks = qw.blocks.clone()
    blocks[..., 2:] = 0x80  # q = -128: every weight -128 d
    offset = QuantizedWeight(blocks, qw.fmt, qw.layout, qw.shape).dequantize().double()
    w_ref = qw.dequantize().double()
    return w_ref, w_ref.abs() + 2 * offset.abs()


def _assert_near_model(y, qw, x_used, w_mag, what):
    """The kernel's arithmetic with its one input rounding kept: sum_k q fp16(x_k d) (B as the tensor cores get
    it, the -128 term from the same values) in float64; y within the fp32 sums' worst case and y's rounding. Tighter
    than the float64 product's test (no 2^-11 of the 128 |d x| offset: the B rounding cancels in q = u - 128)."""
    n, k = qw.shape
    blocks = qw.blocks.reshape(-1, k, 34)
    q = blocks[..., 2:].contiguous().view(torch.int8).permute(0, 2, 1).reshape(-1, k)[:n].double()
    d = blocks[..., :2].contiguous().view(torch.float16).reshape(-1, k).repeat_interleave(32, dim=0)[:n]
    b = (x_used.float()[None, :] * d.float()).half().double()
    model = (q * b).sum(dim=1)
    tol = (k + 4) * 2.0**-24 * (w_mag @ x_used.double().abs()) + 2.0**-11 * model.abs() + 1e-30
    err = (y.double() - model).abs()
    assert not (err > tol).any(), f"{what}: {int((err > tol).sum())} outputs off the fp16-B model"


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_zigzag_cuda_q8_0(rng, sparsity):
    """B2 and B4 of every config on poisoned workspaces against the float64 product, then bit-identical on a rerun."""
    from spqt.kernels import zigzag_cuda

    for shape in GPU_SHAPES:
        qw = _gpu_weights(rng, shape)
        gw = gpu_layout_q8_0.repack(qw, "cuda")
        refs = _magnitudes(qw)
        x, t = random_x(rng, shape[1], torch.float16, "cuda", sparsity)
        x_sparse = reference.sparsify(x, t).float()
        assert zigzag_cuda.supports(x, kg.MODE_DENSE), "NVRTC or cuda-bindings missing on the GPU machine"
        for split, warps, pipe, acc in CONFIGS:
            ws = kg.ZigzagWorkspace(gw, split, torch.float16)
            for mode, x_used, name in ((kg.MODE_DENSE, x.float(), "B2"), (kg.MODE_INDEXED, x_sparse, "B4")):
                ws.y.fill_(float("nan"))
                ws.partials.fill_(float("nan"))
                kw = {"num_warps": warps, "pipe": pipe, "acc": acc, "impl": "cuda"}
                if mode == kg.MODE_INDEXED:
                    ws.idx.fill_(-7777)
                    kw["idx"], kw["count"] = collect(x, t, ws.idx, ws.count)
                what = f"q8_0 cuda {name} {shape} split {split} warps {warps} pipe {pipe} acc {acc} s={sparsity}"
                y = kg.gemv_zigzag(gw, x, mode, ws, **kw).clone()
                assert_within_fp32_sum(y, *refs, x_used, what, FP16_X_EPS)
                _assert_near_model(y, qw, x_used, refs[1], what)
                assert torch.equal(y, kg.gemv_zigzag(gw, x, mode, ws, **kw)), f"{what}: not deterministic"


@pytest.mark.gpu
def test_zigzag_cuda_q8_0_finishes(rng):
    """TYPE 8's own finishes (the last program's, and on sm_90 the thread block cluster's; B2 and B4 at 50 %):
    plain, residual and SwiGLU against torch on the reduction kernel's plain output, as the Q4_K CUDA test."""
    from spqt.kernels import zigzag_cuda

    n, k = 2048, 1000  # SwiGLU: F = 1024, a multiple of 256
    gw = gpu_layout_q8_0.repack(_gpu_weights(rng, (n, k)), "cuda")
    x, t = random_x(rng, k, torch.float16, "cuda", 0.5)
    finishes = [{"fused": True}] + ([{"cluster": True}] if zigzag_cuda.clusters_run(x.device) else [])
    for finish in finishes:
        for split, acc in ((1, 16), (7, 2)):  # split 7: SwiGLU's cluster of 14 programs
            ws = kg.ZigzagWorkspace(gw, split, torch.float16)
            for mode in (kg.MODE_DENSE, kg.MODE_INDEXED):
                kw = {"num_warps": 4, "acc": acc, "impl": "cuda"}
                if mode == kg.MODE_INDEXED:
                    kw["idx"], kw["count"] = collect(x, t, ws.idx, ws.count)
                what = f"q8_0 cuda {finish} split {split} mode {mode}"
                ws.y.fill_(float("nan"))
                plain = kg.gemv_zigzag(gw, x, mode, ws, **kw).float().clone()
                atol = 2e-3 * float(plain.abs().max())
                ws.y.fill_(float("nan"))
                y = kg.gemv_zigzag(gw, x, mode, ws, **kw, **finish).float()
                torch.testing.assert_close(y, plain, rtol=2e-3, atol=atol, msg=lambda m: f"{what} plain: {m}")
                r = torch.randn(n, device="cuda", dtype=torch.float16) * plain.abs().mean().half()
                ws.y.fill_(float("nan"))
                y = kg.gemv_zigzag(gw, x, mode, ws, **kw, **finish, residual=r).float()
                torch.testing.assert_close(y, plain + r.float(), rtol=2e-3, atol=atol,
                                           msg=lambda m: f"{what} residual: {m}")
                ws.y.fill_(float("nan"))
                y = kg.gemv_zigzag(gw, x, mode, ws, **kw, **finish, swiglu=True).float()
                want = (torch.nn.functional.silu(plain[: n // 2]) * plain[n // 2:]).half().float()
                torch.testing.assert_close(y, want, rtol=2e-2, atol=1e-3 * float(want.abs().max()),
                                           msg=lambda m: f"{what} swiglu: {m}")
                assert not ws.counters.any(), f"{what}: the arrival counters are not reset"
