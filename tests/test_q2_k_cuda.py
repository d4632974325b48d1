"""Zigzag Q2_K on the CUDA GEMV (zigzag_q4k.cu, TYPE 2; kernels/gpu_layout_q2k.py): the layout is
exact (the blocks come back byte for byte), the kernel's assembly of each tensor-core fragment and of
each lane's two scales and mins gives the right 2-bit levels and factors (emulated bit for bit on the
CPU, and deliberately broken variants of it fail), TYPE 2 compiles for sm_90 without spills, the
dequant kernel (interpreter) equals the format's decode, and on the GPU (`gpu`) B2 and B4 against the
float64 product of the dequantized matrix, with poisoned outputs."""

import numpy as np
import pytest
import torch

from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gemv as kg
from spqt.kernels import gpu_layout_q2k, reference
from spqt.kernels.collect import collect
from spqt.kernels.gpu_layout_types import q2_k_levels

from kernel_inputs import assert_within_fp32_sum, random_x
from test_kernels_types import _random_blocks
from test_q5k_cuda import FP16_X_EPS, _byte_perm
from test_q8_0_cuda import _fp16_halves


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


@pytest.mark.parametrize("device", [pytest.param("cpu", id="interp"),
                                    pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)])
def test_q2_k_planes_dequant_kernel(rng, device, monkeypatch):
    """kg.dequantize on the Q2_K CUDA layout (the prefill GEMM's first half) equals the format's own decode."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    for shape in ((300, 75), (1, 37)) if device == "cpu" else ((4096, 4096), (2311, 777)):
        qw = _random_blocks(rng, "q2_k", shape)
        qw = QuantizedWeight(qw.blocks.to(device), "q2_k", "zigzag", shape)
        gw = gpu_layout_q2k.repack(qw, device)
        out = torch.full(shape, float("nan"), dtype=torch.float32, device=device)
        kg.dequantize(gw, torch.float32, out=out)
        assert torch.equal(out, qw.dequantize()), shape


# the kernel's constants (zigzag_q4k.cu, TYPE 2); the broken variants below change one each
KERNEL = {"half": 1, "sel": lambda g: (2 * (g & 3)) | ((2 * (g & 3) + 1) << 4), "odd_mask": (0x000C000C, 0x00C000C0),
          "odd_scale": (2.0**22, 2.0**18), "odd_b": 1}


def _emulate(gw, x, row, k=KERNEL, check_levels=True):
    """zigzag_q4k.cu's compute() and epilogue at TYPE 2 for superblock row `row` of one chunk (16 columns), bit for
    bit on the register values: (the 256 outputs in float64, the fp16 B values b[parity][g][column])."""
    rows, cols = gw.grid
    # the kernel's flat arrays and pointer formulas (uint2 / u32 units), for the chunk of columns 0-15
    q2 = gw.quants.numpy().reshape(-1).view(np.uint32).reshape(-1, 2)  # uint2
    s2 = gw.scales.numpy().reshape(-1).view(np.uint32).reshape(-1, 2)  # uint2
    dd = gw.d.numpy().reshape(-1).view(np.uint32)
    levels = gpu_layout_q2k.levels_of(gw).reshape(rows, cols, 256).numpy() if check_levels else None
    a_regs, b_regs, bias = {}, {}, np.zeros((2, 8))
    b_fp16 = np.zeros((2, 8, 16))
    for g in range(8):
        qr = (2 * row + (g >> 2)) * cols * 4 + (g & 3)
        hr = ((row >> 2) * cols * 4 + (row & 3)) * 2 + (g >> 2) * k["half"]  # the lane's 8 of the 16 scale bytes
        dr = row * cols
        for t in range(4):
            cols_ = [4 * i + t for i in range(4)]
            w = [q2[qr + c * 4] for c in cols_]
            hv = [s2[hr + c * 8] for c in cols_]
            be, bo = [], []
            for i in range(4):
                v = _byte_perm(int(hv[i][0]), int(hv[i][1]), k["sel"](g))
                sce, mne, sco, mno = v & 15, (v >> 4) & 15, (v >> 8) & 15, (v >> 12) & 15
                dw = int(dd[dr + cols_[i]])
                f16 = np.array([dw & 0xFFFF, dw >> 16], dtype=np.uint16).view(np.float16)
                xd = np.float32(x[cols_[i]]) * f16[0].astype(np.float32)
                xm = np.float32(x[cols_[i]]) * f16[1].astype(np.float32)
                be.append(np.float32(xd * np.float32(sce)))
                bo.append(np.float32(xd * np.float32(sco)))
                bias[0, g] += float(xm) * mne
                bias[1, g] += float(xm) * mno
            b16 = [np.array(b, dtype=np.float32).astype(np.float16).astype(np.float64) for b in (be, bo)]
            for e in range(2):
                b_regs[g, t, e] = b16[e]
                b_fp16[e, g, cols_] = b16[e]
            for m in range(16):
                u = (m >> 1) & 3
                sel = u | (u << 4) | ((4 + u) << 8) | ((4 + u) << 12)
                mg, mg8 = k["odd_mask"] if m & 1 else (0x00030003, 0x00300030)
                regs = []
                for pair in (0, 2):
                    p = _byte_perm(int(w[pair][m >> 3]), int(w[pair + 1][m >> 3]), sel)
                    regs += [p & mg, p & mg8]
                a_regs[g, t, m] = regs
                if check_levels:
                    shift = (2, 6) if m & 1 else (0, 4)
                    for (reg, h, pair) in ((regs[0], 0, 0), (regs[1], 1, 0), (regs[2], 0, 2), (regs[3], 1, 2)):
                        for hf in (0, 1):
                            c = cols_[pair + hf]
                            want = int(levels[row, c, 16 * m + 8 * h + g]) << shift[h]
                            assert (reg >> (16 * hf)) & 0xFFFF == want, (row, g, t, m, pair + hf, h)
    y = np.zeros(256)
    for m in range(16):  # the mma: A (16 rows, k), B (k, 8 columns n = g), k = 2 t + slot (+ 6 for slots 2, 3)
        a_mat, b_mat = np.zeros((16, 16)), np.zeros((16, 8))
        for g in range(8):
            for t in range(4):
                a0, a1, a2, a3 = a_regs[g, t, m]
                a_mat[g, 2 * t: 2 * t + 2], a_mat[g + 8, 2 * t: 2 * t + 2] = _fp16_halves(a0), _fp16_halves(a1)
                a_mat[g, 2 * t + 8: 2 * t + 10] = _fp16_halves(a2)
                a_mat[g + 8, 2 * t + 8: 2 * t + 10] = _fp16_halves(a3)
                b_mat[[2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9], g] = b_regs[g, t, (m & 1) * k["odd_b"]]
        scale = k["odd_scale"] if m & 1 else (2.0**24, 2.0**20)
        out = (a_mat @ b_mat)[:, m // 2]
        y[16 * m: 16 * m + 8] = out[:8] * scale[0]
        y[16 * m + 8: 16 * m + 16] = out[8:] * scale[1]
    i = np.arange(256)
    y -= bias[(i >> 4) & 1, i >> 5]
    return y, b_fp16


def _emulation_error(gw, x, qw, row, k=KERNEL, check_levels=True) -> None:
    """Asserts the emulated outputs of superblock row `row` equal sum_c q fp16(x d sc) - x dmin mn (float64), the
    fp16 B values checked against the format's scales and d."""
    y, b16 = _emulate(gw, x, row, k, check_levels)
    blocks = qw.blocks[row, :16].numpy()  # (16 columns, 84)
    sc, mn = (blocks[:, 0:16] & 15).astype(np.float32), (blocks[:, 0:16] >> 4).astype(np.float64)
    d = blocks[:, 80:82].copy().view(np.float16)[:, 0].astype(np.float32)
    dmin = blocks[:, 82:84].copy().view(np.float16)[:, 0].astype(np.float32)
    x32 = x.astype(np.float32)
    b_want = ((x32 * d)[:, None] * sc).astype(np.float16).astype(np.float64)  # (16 columns, 16 tiles)
    for e in range(2):  # lane g's B of parity e is tile 2 g + e's
        np.testing.assert_array_equal(b16[e], b_want[:, e::2].T, err_msg=f"B of parity {e}")
    q = q2_k_levels(qw.blocks[row, :16].reshape(-1, 84)).numpy().reshape(16, 16, 16).astype(np.float64)
    mins = ((x32 * dmin).astype(np.float64)[:, None] * mn).sum(axis=0)  # (16 tiles)
    want = (np.einsum("cmi,cm->mi", q, b_want) - mins[:, None]).reshape(256)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12 * np.abs(want).max(), err_msg=f"row {row}")


def test_q2_k_cuda_fragments_emulated(rng):
    """Every lane (g, t), tile m and slot of one chunk (columns 0-15 of 19, read through the kernel's pointer formulas)
    of every superblock row (5: the last 76 rows): each A half holds
    the slot's 2-bit level at the kernel's bits (even tiles row g at 0, row g + 8 at 4; odd at 2 and 6), each lane's B
    of parity e is fp16(x d sc[2 g + e]) and its min term x dmin mn[2 g + e]; the emulated mma products, the
    epilogue's per-parity scales and the min term per tile give sum q b - x dmin mn exactly (float64). Broken
    variants (the lane's half of the scale bytes, the scale permute, the odd tiles' masks, their epilogue scale,
    their B) fail."""
    shape = (1100, 19)
    qw = _random_blocks(rng, "q2_k", shape)
    gw = gpu_layout_q2k.repack(qw, "cpu")
    x = rng.standard_normal(16).astype(np.float16)  # the chunk's columns
    for row in range(gw.grid[0]):
        _emulation_error(gw, x, qw, row)
    broken = [{"half": 0}, {"sel": lambda g: (2 * (g & 3) + 1) | ((2 * (g & 3)) << 4)},
              {"odd_mask": (0x00030003, 0x00C000C0)}, {"odd_scale": (2.0**24, 2.0**18)}, {"odd_b": 0}]
    for change in broken:
        with pytest.raises(AssertionError):
            _emulation_error(gw, x, qw, 1, dict(KERNEL, **change), check_levels=False)


def test_q2_k_cuda_compiles_for_sm90(tmp_path, monkeypatch):
    """TYPE 2 compiles with NVRTC for sm_90 (and sm_80) in each mode, pipe, accumulator count and finish, cluster
    included, without spills, 16 mma in the main loop; its B2 loop (PIPE 0, 16 accumulators) holds 223 instructions
    a chunk and lane when written, 127 registers (Q4_K's: 224, 125): 80 of them assemble the A fragments (one
    permute per tile pair and slot pair, four ANDs a tile)."""
    from spqt.kernels import nvrtc, zigzag_cuda
    from spqt.kernels.sass import disassemble, main_loop, opcode

    monkeypatch.setenv("SPQT_CACHE", str(tmp_path))  # compiled here, not read from a cache
    nvrtc.compile_cubin.cache_clear()
    source = zigzag_cuda.SOURCE.read_text()
    nvrtc.compile_cubin(source, zigzag_cuda.options(4, zigzag_cuda.MODE_INDEXED, 1, 2, bits=2), "sm_80")
    dense, indexed = zigzag_cuda.MODE_DENSE, zigzag_cuda.MODE_INDEXED
    # (mode, pipe, epilogue, acc, cluster, B2 loop limit)
    for mode, pipe, epilogue, acc, cluster, limit in ((dense, 0, -1, 16, False, 230), (dense, 1, 0, 16, False, 235),
                                                      (dense, 0, 2, 2, True, 285), (indexed, 0, 1, 16, False, None),
                                                      (indexed, 1, 2, 2, False, None)):
        options = zigzag_cuda.options(4, mode, pipe, epilogue, acc=acc, bits=2, cluster=cluster)
        sass, regs, stack = disassemble(nvrtc.compile_cubin(source, options, "sm_90"))
        what = f"mode {mode} pipe {pipe} epilogue {epilogue} acc {acc} cluster {cluster}"
        assert stack == 0, f"{what}: {stack} bytes of stack (spills)"
        loop = main_loop(sass, "HMMA")
        assert sum("HMMA" in ln for ln in loop) == 16, what
        if limit is not None:
            assert len(loop) <= limit, f"{what}: B2 loop of {len(loop)} instructions"
        if (mode, pipe, acc) == (dense, 0, 16):
            assembly = sum(opcode(ln) in ("PRMT", "LOP3.LUT") for ln in loop)
            assert assembly <= 110 and regs <= 128, f"{assembly} permutes and logic ops, {regs} registers"
        if cluster:
            assert "UCGABAR_WAIT" in sass, "no cluster barrier in the cluster finish"


GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1000, 1000), (2311, 777)]
CONFIGS = [(1, 4, 0, 16), (7, 2, 1, 2), (64, 8, 0, 2), (33, 4, 1, 16)]  # (split, warps, pipe, acc)


def _gpu_weights(rng, shape):
    """Random Q2_K blocks with d and dmin in 2^-9 .. 2^-6 (x d sc a normal fp16 for most x, as in a real matrix;
    _random_blocks' smaller factors would test fp16's subnormals instead)."""
    qw = _random_blocks(rng, "q2_k", shape)
    blocks = qw.blocks.numpy()
    for at in (80, 82):
        v = np.exp2(rng.uniform(-9, -6, blocks.shape[:2]))
        blocks[..., at:at + 2] = v.astype(np.float16)[..., None].view(np.uint8)
    return QuantizedWeight(torch.from_numpy(blocks).cuda(), "q2_k", "zigzag", shape)


def _magnitudes(qw):
    """(W, |W| + 2 dmin mn) in float64: the kernel adds q d sc x and -dmin mn x apart, each at most |w| + dmin mn."""
    blocks = qw.blocks.clone()
    blocks[..., 16:80] = 0  # levels 0: every weight -dmin mn
    offset = QuantizedWeight(blocks, qw.fmt, qw.layout, qw.shape).dequantize().double()
    w_ref = qw.dequantize().double()
    return w_ref, w_ref.abs() + 2 * offset.abs()


def _assert_near_model(y, qw, x_used, w_mag, what):
    """The kernel's arithmetic with its input rounding kept: sum_k q fp16(x_k d sc) - x_k dmin mn in float64; y within
    the fp32 sums' worst case and y's rounding."""
    n, k = qw.shape
    flat = qw.blocks.reshape(-1, 84)
    q = q2_k_levels(flat).reshape(-1, k, 256).permute(0, 2, 1).reshape(-1, k)[:n].double()
    sb = flat[:, 0:16].to(torch.int64).reshape(-1, k, 16)
    dd = flat[:, 80:84].contiguous().view(torch.float16).float().reshape(-1, k, 2)
    b = ((x_used.float()[None, :] * dd[..., 0])[..., None] * (sb & 15).float()).half().double()  # (R, K, 16)
    mins = (x_used.float()[None, :] * dd[..., 1]).double()[..., None] * (sb >> 4).double()
    rows_of = lambda v: v.permute(0, 2, 1).repeat_interleave(16, dim=1).reshape(-1, k)[:n]  # noqa: E731
    model = (q * rows_of(b)).sum(dim=1) - rows_of(mins).sum(dim=1)
    tol = (k + 4) * 2.0**-24 * (w_mag @ x_used.double().abs()) + 2.0**-11 * model.abs() + 1e-30
    err = (y.double() - model).abs()
    assert not (err > tol).any(), f"{what}: {int((err > tol).sum())} outputs off the fp16-B model"


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_zigzag_cuda_q2_k(rng, sparsity):
    """B2 and B4 of every config on poisoned workspaces against the float64 product and the fp16-B model, then
    bit-identical on a rerun."""
    from spqt.kernels import zigzag_cuda

    for shape in GPU_SHAPES:
        qw = _gpu_weights(rng, shape)
        gw = gpu_layout_q2k.repack(qw, "cuda")
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
                what = f"q2_k cuda {name} {shape} split {split} warps {warps} pipe {pipe} acc {acc} s={sparsity}"
                y = kg.gemv_zigzag(gw, x, mode, ws, **kw).clone()
                assert_within_fp32_sum(y, *refs, x_used, what, FP16_X_EPS)
                _assert_near_model(y, qw, x_used, refs[1], what)
                assert torch.equal(y, kg.gemv_zigzag(gw, x, mode, ws, **kw)), f"{what}: not deterministic"


@pytest.mark.gpu
def test_zigzag_cuda_q2_k_finishes(rng):
    """TYPE 2's own finishes (the last program's; B2 and B4 at 50 %): plain, residual and SwiGLU against torch on the
    reduction kernel's plain output (gemv_zigzag runs the cluster finish for Q4_K only)."""
    n, k = 2048, 1000  # SwiGLU: F = 1024, a multiple of 256
    gw = gpu_layout_q2k.repack(_gpu_weights(rng, (n, k)), "cuda")
    x, t = random_x(rng, k, torch.float16, "cuda", 0.5)
    for split, acc in ((1, 16), (7, 2)):
        ws = kg.ZigzagWorkspace(gw, split, torch.float16)
        for mode in (kg.MODE_DENSE, kg.MODE_INDEXED):
            kw = {"num_warps": 4, "acc": acc, "impl": "cuda"}
            if mode == kg.MODE_INDEXED:
                kw["idx"], kw["count"] = collect(x, t, ws.idx, ws.count)
            what = f"q2_k cuda fused split {split} mode {mode}"
            ws.y.fill_(float("nan"))
            plain = kg.gemv_zigzag(gw, x, mode, ws, **kw).float().clone()
            atol = 2e-3 * float(plain.abs().max())
            ws.y.fill_(float("nan"))
            y = kg.gemv_zigzag(gw, x, mode, ws, **kw, fused=True).float()
            torch.testing.assert_close(y, plain, rtol=2e-3, atol=atol, msg=lambda m: f"{what} plain: {m}")
            r = torch.randn(n, device="cuda", dtype=torch.float16) * plain.abs().mean().half()
            ws.y.fill_(float("nan"))
            y = kg.gemv_zigzag(gw, x, mode, ws, **kw, fused=True, residual=r).float()
            torch.testing.assert_close(y, plain + r.float(), rtol=2e-3, atol=atol,
                                       msg=lambda m: f"{what} residual: {m}")
            ws.y.fill_(float("nan"))
            y = kg.gemv_zigzag(gw, x, mode, ws, **kw, fused=True, swiglu=True).float()
            want = (torch.nn.functional.silu(plain[: n // 2]) * plain[n // 2:]).half().float()
            torch.testing.assert_close(y, want, rtol=2e-2, atol=1e-3 * float(want.abs().max()),
                                       msg=lambda m: f"{what} swiglu: {m}")
            assert not ws.counters.any(), f"{what}: the arrival counters are not reset"
