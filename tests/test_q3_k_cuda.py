"""Zigzag Q3_K on the CUDA GEMV (zigzag_q4k.cu, TYPE 3; kernels/gpu_layout_q3k.py): the layout is
exact (the blocks come back byte for byte), the kernel's assembly of each tensor-core fragment and of
each lane's two scales gives the right 3-bit levels and signed scales (emulated bit for bit on the CPU,
and deliberately broken variants of it fail), TYPE 3 compiles for sm_90 without spills, the dequant
kernel (interpreter) equals the format's decode, and on the GPU (`gpu`) B2 and B4 against the float64
product of the dequantized matrix, with poisoned outputs."""

import numpy as np
import pytest
import torch

from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gemv as kg
from spqt.kernels import gpu_layout_q3k, reference
from spqt.kernels.collect import collect
from spqt.kernels.gpu_layout_types import q3_k_levels

from kernel_inputs import assert_within_fp32_sum, random_x
from test_kernels_types import _random_blocks
from test_q5k_cuda import FP16_X_EPS, _byte_perm
from test_q8_0_cuda import _fp16_halves


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


@pytest.mark.parametrize("device", [pytest.param("cpu", id="interp"),
                                    pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)])
def test_q3_k_planes_dequant_kernel(rng, device, monkeypatch):
    """kg.dequantize on the Q3_K CUDA layout (the prefill GEMM's first half) equals the format's own decode."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    for shape in ((300, 75), (1, 37)) if device == "cpu" else ((4096, 4096), (2311, 777)):
        qw = _random_blocks(rng, "q3_k", shape)
        qw = QuantizedWeight(qw.blocks.to(device), "q3_k", "zigzag", shape)
        gw = gpu_layout_q3k.repack(qw, device)
        out = torch.full(shape, float("nan"), dtype=torch.float32, device=device)
        kg.dequantize(gw, torch.float32, out=out)
        assert torch.equal(out, qw.dequantize()), shape


def _lop3_select(a: int, b: int, mask: int) -> int:
    return (a & mask) | (b & ~mask & 0xFFFFFFFF)


# the kernel's constants (zigzag_q4k.cu, TYPE 3); the broken variants below change one each
KERNEL = {"h_shift": 1, "odd_next": 1, "odd_mask": (0x001C001C, 0x01C001C0), "odd_scale": (2.0**22, 2.0**18),
          "funnel": 30, "offset": 4.0, "even_select": 0x33333333}


def _emulate(gw, x, row, k=KERNEL, check_levels=True):
    """zigzag_q4k.cu's compute() and epilogue at TYPE 3 for superblock row `row` of one chunk (16 columns), bit for
    bit on the register values: (the 256 outputs in float64, the fp16 B values b[parity][g][column]). With
    check_levels every A half is also checked against the format's level of its row and column."""
    rows, cols = gw.grid
    # the kernel's flat arrays and pointer formulas (uint2 / u32 / uint4 units), for the chunk of columns 0-15
    q2 = gw.quants.numpy().reshape(-1).view(np.uint32).reshape(-1, 2)  # uint2
    high = gw.high.numpy().reshape(-1).view(np.uint32)
    heads = gw.head.numpy().reshape(-1).view(np.uint32).reshape(-1, 4)  # uint4
    levels = gpu_layout_q3k.levels_of(gw).reshape(rows, cols, 256).numpy() if check_levels else None
    a_regs, b_regs, bias = {}, {}, np.zeros((2, 8))
    b_fp16 = np.zeros((2, 8, 16))
    for g in range(8):
        qr = (2 * row + (g >> 2)) * cols * 4 + (g & 3)
        hq = row * cols * 8 + g
        hr = (row >> 2) * cols * 4 + (row & 3)
        for t in range(4):
            cols_ = [4 * i + t for i in range(4)]
            w = [q2[qr + c * 4] for c in cols_]
            hb = [int(high[hq + c * 8]) for c in cols_]
            hv = [heads[hr + c * 4] for c in cols_]
            be, bo = [], []
            for i in range(4):
                hx, hy, hz, hw = (int(v) for v in hv[i])
                v = _byte_perm(hx, hy, g | (g << 12))
                f = ((((hz >> (4 * g)) << 32) | v) >> k["funnel"]) & 0xFFFFFFFF
                se, so = (v & 63) - 32, (f & 63) - 32
                d = np.array([hw & 0xFFFF], dtype=np.uint16).view(np.float16).astype(np.float32)[0]
                xd = np.float32(x[cols_[i]]) * d
                be.append(np.float32(xd * np.float32(se)))
                bo.append(np.float32(xd * np.float32(so)))
            b16 = [np.array(b, dtype=np.float32).astype(np.float16).astype(np.float64) for b in (be, bo)]
            for e in range(2):
                b_regs[g, t, e] = b16[e]
                bias[e, g] += k["offset"] * b16[e].sum()
                b_fp16[e, g, cols_] = b16[e]
            lv = []
            for i in range(4):
                hs = hb[i] >> k["h_shift"]
                sel0, sel1 = k["even_select"], ~k["even_select"] & 0xFFFFFFFF
                lv.append([_lop3_select(int(w[i][0]), hb[i], sel0), _lop3_select(int(w[i][0]), hb[i], sel1),
                           _lop3_select(int(w[i][1]), hs, sel0), _lop3_select(int(w[i][1]), hs, sel1)])
            for m in range(16):
                q = 2 * (m >> 3) + (m & 1)
                u = (m >> 1) & 3
                u1 = (u + k["odd_next"]) & 3 if m & 1 else u
                sel = u | (u1 << 4) | ((4 + u) << 8) | ((4 + u1) << 12)
                mg, mg8 = k["odd_mask"] if m & 1 else (0x00070007, 0x00700070)
                regs = []
                for pair in (0, 2):
                    p = _byte_perm(lv[pair][q], lv[pair + 1][q], sel)
                    regs += [p & mg, p & mg8]
                a_regs[g, t, m] = regs
                if check_levels:
                    shift = (2, 6) if m & 1 else (0, 4)
                    for (reg, h, pair) in ((regs[0], 0, 0), (regs[1], 1, 0), (regs[2], 0, 2), (regs[3], 1, 2)):
                        for half in (0, 1):
                            c = cols_[pair + half]
                            want = int(levels[row, c, 16 * m + 8 * h + g]) << shift[h]
                            assert (reg >> (16 * half)) & 0xFFFF == want, (row, g, t, m, pair + half, h)
    y = np.zeros(256)
    for m in range(16):  # the mma: A (16 rows, k), B (k, 8 columns n = g), k = 2 t + slot (+ 6 for slots 2, 3)
        a_mat, b_mat = np.zeros((16, 16)), np.zeros((16, 8))
        for g in range(8):
            for t in range(4):
                a0, a1, a2, a3 = a_regs[g, t, m]
                a_mat[g, 2 * t: 2 * t + 2], a_mat[g + 8, 2 * t: 2 * t + 2] = _fp16_halves(a0), _fp16_halves(a1)
                a_mat[g, 2 * t + 8: 2 * t + 10] = _fp16_halves(a2)
                a_mat[g + 8, 2 * t + 8: 2 * t + 10] = _fp16_halves(a3)
                b_mat[[2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9], g] = b_regs[g, t, m & 1]
        scale = k["odd_scale"] if m & 1 else (2.0**24, 2.0**20)
        out = (a_mat @ b_mat)[:, m // 2]
        y[16 * m: 16 * m + 8] = out[:8] * scale[0]
        y[16 * m + 8: 16 * m + 16] = out[8:] * scale[1]
    i = np.arange(256)
    y -= bias[(i >> 4) & 1, i >> 5]
    return y, b_fp16


def _emulation_error(gw, x, qw, row, k=KERNEL, check_levels=True) -> None:
    """Asserts the emulated outputs of superblock row `row` equal sum_c (q - 4) fp16(x d (s - 32)) (float64), the
    fp16 B values checked against the format's scales and d."""
    y, b16 = _emulate(gw, x, row, k, check_levels)
    blocks = qw.blocks[row, :16].numpy()  # (16 columns, 110)
    from spqt.formats import q3_k

    s = q3_k.unpack_scales(torch.from_numpy(blocks[:, 96:108].copy())).numpy() - 32  # (16 columns, 16 tiles)
    d = blocks[:, 108:110].copy().view(np.float16)[:, 0].astype(np.float32)
    b_want = ((x.astype(np.float32) * d)[:, None] * s.astype(np.float32)).astype(np.float16).astype(np.float64)
    for e in range(2):  # lane g's B of parity e is tile 2 g + e's
        np.testing.assert_array_equal(b16[e], b_want[:, e::2].T, err_msg=f"B of parity {e}")
    q = q3_k_levels(qw.blocks[row, :16].reshape(-1, 110)).numpy().reshape(16, 16, 16)  # [column, tile, row in tile]
    want = np.einsum("cmi,cm->mi", (q - 4).astype(np.float64), b_want).reshape(256)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12 * np.abs(want).max(), err_msg=f"row {row}")


def test_q3_k_cuda_fragments_emulated(rng):
    """Every lane (g, t), tile m and slot of one chunk (columns 0-15 of 19, read through the kernel's pointer formulas)
    of every superblock row (5: the last 76 rows): each A half holds
    the slot's 3-bit level at the kernel's bits (even tiles row g at 0, row g + 8 at 4; odd at 2 and 6), each lane's B
    of parity e is fp16(x d (s[2 g + e] - 32)); the emulated mma products, the epilogue's per-parity scales and the
    -4 term per tile give sum (q - 4) b exactly (float64). Broken variants (the third bits' shift for tiles 8-15, the
    odd tiles' next byte, their masks, their epilogue scale, the scale funnel shift, the offset, swapped selects)
    fail."""
    shape = (1100, 19)
    qw = _random_blocks(rng, "q3_k", shape)
    gw = gpu_layout_q3k.repack(qw, "cpu")
    x = rng.standard_normal(16).astype(np.float16)  # the chunk's columns
    for row in range(gw.grid[0]):
        _emulation_error(gw, x, qw, row)
    broken = [{"h_shift": 2}, {"odd_next": 0}, {"odd_mask": (0x000C000C, 0x01C001C0)},
              {"odd_scale": (2.0**24, 2.0**18)}, {"funnel": 28}, {"offset": 3.0}, {"even_select": 0xCCCCCCCC}]
    for change in broken:
        with pytest.raises(AssertionError):
            _emulation_error(gw, x, qw, 1, dict(KERNEL, **change), check_levels=False)


def test_q3_k_cuda_compiles_for_sm90(tmp_path, monkeypatch):
    """TYPE 3 compiles with NVRTC for sm_90 (and sm_80) in each mode, pipe, accumulator count and finish, cluster
    included, without spills, 16 mma in the main loop; its B2 loop (PIPE 0, 16 accumulators) holds 250 instructions
    a chunk and lane when written, 133 registers (Q4_K's: 224, 125): 16 bit selects complete the levels, 96
    instructions assemble the A fragments (per tile two permutes and four ANDs, Q4_K's)."""
    from spqt.kernels import nvrtc, zigzag_cuda
    from spqt.kernels.sass import disassemble, main_loop, opcode

    monkeypatch.setenv("SPQT_CACHE", str(tmp_path))  # compiled here, not read from a cache
    nvrtc.compile_cubin.cache_clear()
    source = zigzag_cuda.SOURCE.read_text()
    nvrtc.compile_cubin(source, zigzag_cuda.options(4, zigzag_cuda.MODE_INDEXED, 1, 2, bits=3), "sm_80")
    dense, indexed = zigzag_cuda.MODE_DENSE, zigzag_cuda.MODE_INDEXED
    # (mode, pipe, epilogue, acc, cluster, B2 loop limit)
    for mode, pipe, epilogue, acc, cluster, limit in ((dense, 0, -1, 16, False, 256), (dense, 1, 0, 16, False, 290),
                                                      (dense, 0, 2, 2, True, 285), (indexed, 0, 1, 16, False, None),
                                                      (indexed, 1, 2, 2, False, None)):
        options = zigzag_cuda.options(4, mode, pipe, epilogue, acc=acc, bits=3, cluster=cluster)
        sass, regs, stack = disassemble(nvrtc.compile_cubin(source, options, "sm_90"))
        what = f"mode {mode} pipe {pipe} epilogue {epilogue} acc {acc} cluster {cluster}"
        assert stack == 0, f"{what}: {stack} bytes of stack (spills)"
        loop = main_loop(sass, "HMMA")
        assert sum("HMMA" in ln for ln in loop) == 16, what
        if limit is not None:
            assert len(loop) <= limit, f"{what}: B2 loop of {len(loop)} instructions"
        if (mode, pipe, acc) == (dense, 0, 16):
            assembly = sum(opcode(ln) in ("PRMT", "LOP3.LUT") for ln in loop)
            assert assembly <= 135 and regs <= 140, f"{assembly} permutes and logic ops, {regs} registers"
        if cluster:
            assert "UCGABAR_WAIT" in sass, "no cluster barrier in the cluster finish"


GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1000, 1000), (2311, 777)]
CONFIGS = [(1, 4, 0, 16), (7, 2, 1, 2), (64, 8, 0, 2), (33, 4, 1, 16)]  # (split, warps, pipe, acc)


def _gpu_weights(rng, shape):
    """Random Q3_K blocks with d of either sign in 2^-9 .. 2^-6 (x d (s - 32) a normal fp16 for most x, as in a
    real matrix; _random_blocks' smaller factors would test fp16's subnormals instead)."""
    qw = _random_blocks(rng, "q3_k", shape)
    blocks = qw.blocks.numpy()
    v = np.exp2(rng.uniform(-9, -6, blocks.shape[:2])) * rng.choice([-1, 1], blocks.shape[:2])
    blocks[..., 108:110] = v.astype(np.float16)[..., None].view(np.uint8)
    return QuantizedWeight(torch.from_numpy(blocks).cuda(), "q3_k", "zigzag", shape)


def _magnitudes(qw):
    """(W, |W| + 2 |-4 d (s - 32)|) in float64: the kernel adds q d (s - 32) x and -4 d (s - 32) x apart, each at
    most |w| + 4 |d (s - 32)|."""
    blocks = qw.blocks.clone()
    blocks[..., 0:96] = 0  # levels 0: every weight -4 d (s - 32)
    offset = QuantizedWeight(blocks, qw.fmt, qw.layout, qw.shape).dequantize().double()
    w_ref = qw.dequantize().double()
    return w_ref, w_ref.abs() + 2 * offset.abs()


def _assert_near_model(y, qw, x_used, w_mag, what):
    """The kernel's arithmetic with its input rounding kept: sum_k (q - 4) fp16(x_k d (s - 32)) (B as the tensor cores
    get it, the -4 term from the same values) in float64; y within the fp32 sums' worst case and y's rounding."""
    n, k = qw.shape
    from spqt.formats import q3_k

    flat = qw.blocks.reshape(-1, 110)
    q = q3_k_levels(flat).reshape(-1, k, 256).permute(0, 2, 1).reshape(-1, k)[:n].double()
    s = (q3_k.unpack_scales(flat[:, 96:108]) - 32).float().reshape(-1, k, 16)  # (R, K, 16)
    d = flat[:, 108:110].contiguous().view(torch.float16).float().reshape(-1, k)
    xd = x_used.float()[None, :] * d  # (R, K), fp32 as the kernel
    b = (xd[..., None] * s).half().double()  # (R, K, 16)
    b = b.permute(0, 2, 1).repeat_interleave(16, dim=1).reshape(-1, k)[:n]  # row 16 m + i of superblock row r
    model = ((q - 4) * b).sum(dim=1)
    tol = (k + 4) * 2.0**-24 * (w_mag @ x_used.double().abs()) + 2.0**-11 * model.abs() + 1e-30
    err = (y.double() - model).abs()
    assert not (err > tol).any(), f"{what}: {int((err > tol).sum())} outputs off the fp16-B model"


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_zigzag_cuda_q3_k(rng, sparsity):
    """B2 and B4 of every config on poisoned workspaces against the float64 product and the fp16-B model, then
    bit-identical on a rerun."""
    from spqt.kernels import zigzag_cuda

    for shape in GPU_SHAPES:
        qw = _gpu_weights(rng, shape)
        gw = gpu_layout_q3k.repack(qw, "cuda")
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
                what = f"q3_k cuda {name} {shape} split {split} warps {warps} pipe {pipe} acc {acc} s={sparsity}"
                y = kg.gemv_zigzag(gw, x, mode, ws, **kw).clone()
                assert_within_fp32_sum(y, *refs, x_used, what, FP16_X_EPS)
                _assert_near_model(y, qw, x_used, refs[1], what)
                assert torch.equal(y, kg.gemv_zigzag(gw, x, mode, ws, **kw)), f"{what}: not deterministic"


@pytest.mark.gpu
def test_zigzag_cuda_q3_k_finishes(rng):
    """TYPE 3's own finishes (the last program's; B2 and B4 at 50 %): plain, residual and SwiGLU against torch on the
    reduction kernel's plain output, as the Q8_0 CUDA test (gemv_zigzag runs the cluster finish for Q4_K only)."""
    n, k = 2048, 1000  # SwiGLU: F = 1024, a multiple of 256
    gw = gpu_layout_q3k.repack(_gpu_weights(rng, (n, k)), "cuda")
    x, t = random_x(rng, k, torch.float16, "cuda", 0.5)
    for split, acc in ((1, 16), (7, 2)):
        ws = kg.ZigzagWorkspace(gw, split, torch.float16)
        for mode in (kg.MODE_DENSE, kg.MODE_INDEXED):
            kw = {"num_warps": 4, "acc": acc, "impl": "cuda"}
            if mode == kg.MODE_INDEXED:
                kw["idx"], kw["count"] = collect(x, t, ws.idx, ws.count)
            what = f"q3_k cuda fused split {split} mode {mode}"
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
