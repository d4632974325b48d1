"""Zigzag Q2_K, Q3_K, Q5_K, Q6_K and Q8_0 on the CUDA GEMV (zigzag_q4k.cu, TYPE 2 / 3 / 5 / 6 / 8; their layouts
zigzag_cuda.kquant_layout), the tests every type has, parametrized over the types (each type's layout, fragment
emulation and compile tests: tests/test_q*_cuda.py): the dequant kernel (the prefill GEMM's first half, interpreter
and `gpu`) equals the format's decode; on the GPU (`gpu`) B2 and B4 of every config on poisoned workspaces against
the float64 product of the dequantized matrix (and, for Q2_K / Q3_K / Q8_0, the kernel's fp16-B model), then
bit-identical on a rerun; Q2_K / Q3_K / Q8_0's own finishes (plain, residual, SwiGLU)."""

import numpy as np
import pytest
import torch

from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gemv as kg
from spqt.kernels import reference
from spqt.kernels.collect import collect
from spqt.kernels.gpu_layout_types import q2_k_levels, q3_k_levels

from kernel_inputs import assert_kept_residual_finish, assert_within_fp32_sum, guarded_out, random_x, rms_norm_inputs
from test_kernels_types import FP16_FIELDS, _random_blocks

TYPES = ["q2_k", "q3_k", "q5_k", "q6_k", "q8_0"]
GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1000, 1000), (2311, 777)]
# (split, warps, pipe, acc): acc 8 and 4 with a select a class of tiles
CONFIGS = [(1, 4, 0, 16), (7, 2, 1, 2), (64, 8, 0, 2), (33, 4, 1, 16), (13, 4, 0, 8), (5, 2, 0, 4)]
# tile pairs (PAIRS; the low-pair types Q2_K, Q3_K at acc 8, Q5_K and Q6_K at 8 and 2): (split, warps, pipe, acc), run
# with -DPAIRS=1
LOW_PAIRS = [(13, 4, 0, 8), (64, 8, 1, 8), (3, 2, 0, 8)]
NIBBLE_PAIRS = [(13, 4, 0, 8), (64, 8, 1, 2), (3, 2, 0, 2)]
PAIRS_CONFIGS = {"q2_k": LOW_PAIRS, "q3_k": LOW_PAIRS, "q5_k": NIBBLE_PAIRS, "q6_k": NIBBLE_PAIRS}
PAIRS_TYPES = tuple(PAIRS_CONFIGS)


def _configs(fmt: str) -> list[tuple]:
    """(split, warps, pipe, acc, extra) of the type's GPU tests: CONFIGS, and for Q2_K / Q3_K / Q5_K / Q6_K their
    tile pairs."""
    return [c + ((),) for c in CONFIGS] + [c + (("-DPAIRS=1",),) for c in PAIRS_CONFIGS.get(fmt, [])]

FP16_X_EPS = 2.0**-11  # the kernel holds x d sc in fp16 (zigzag_q4k.cu), as for Q4_K
# The fp16 factors' exponent range on the GPU (x d sc a normal fp16 for most x, as in a real matrix;
# _random_blocks' smaller factors would test fp16's subnormals instead); Q6_K's d smaller (weights up to
# ~4 x 63 x 2^-9, as the encoder's)
GPU_EXPONENTS = {"q6_k": (-12, -9)}
# The level bytes and the byte that puts every weight at the offset term the kernel adds apart (levels 0:
# Q2_K / Q5_K -dmin mn, Q6_K -32 d sc, Q3_K -4 d (s - 32); Q8_0 q = -128: -128 d)
OFFSET_BYTES = {"q2_k": (slice(16, 80), 0), "q3_k": (slice(0, 96), 0), "q5_k": (slice(16, 176), 0),
                "q6_k": (slice(0, 192), 0), "q8_0": (slice(2, 34), 0x80)}


def _planes(qw: QuantizedWeight, device):
    """The matrix in its type's CUDA GEMV layout (zigzag_cuda.kquant_layout)."""
    from spqt.kernels import zigzag_cuda

    return zigzag_cuda.kquant_layout(qw.fmt)[1](qw, device)


def _gpu_weights(rng, fmt, shape):
    """Random blocks (on CUDA) with the fp16 factors in 2^GPU_EXPONENTS (2^-9 .. 2^-6 unless listed), d of the
    signed types of either sign."""
    qw = _random_blocks(rng, fmt, shape)
    blocks = qw.blocks.numpy()
    lo, hi = GPU_EXPONENTS.get(fmt, (-9, -6))
    signed, unsigned = FP16_FIELDS[fmt]
    for at, sign in [(a, True) for a in signed] + [(a, False) for a in unsigned]:
        v = np.exp2(rng.uniform(lo, hi, blocks.shape[:2]))
        if sign:
            v = v * rng.choice([-1, 1], blocks.shape[:2])
        blocks[..., at:at + 2] = v.astype(np.float16)[..., None].view(np.uint8)
    return QuantizedWeight(torch.from_numpy(blocks).cuda(), fmt, "zigzag", shape)


def _gpu_case(rng, fmt, shape):
    """A GPU test's matrix: (random blocks on CUDA (_gpu_weights), the same in the type's CUDA GEMV layout, their
    (W, |W| + 2 |offset|) magnitudes)."""
    qw = _gpu_weights(rng, fmt, shape)
    return qw, _planes(qw, "cuda"), _magnitudes(qw)


def _magnitudes(qw):
    """(W, |W| + 2 |offset|) in float64: the kernel adds the level term and the offset term (OFFSET_BYTES) of a
    weight apart, each at most |w| + |offset|."""
    levels, fill = OFFSET_BYTES[qw.fmt]
    blocks = qw.blocks.clone()
    blocks[..., levels] = fill
    offset = QuantizedWeight(blocks, qw.fmt, qw.layout, qw.shape).dequantize().double()
    w_ref = qw.dequantize().double()
    return w_ref, w_ref.abs() + 2 * offset.abs()


def _q8_0_model(qw, x_used):
    """sum_k q fp16(x_k d) (B as the tensor cores get it, the -128 term from the same values) in float64. Tighter
    than the float64 product's test (no 2^-11 of the 128 |d x| offset: the B rounding cancels in q = u - 128)."""
    n, k = qw.shape
    blocks = qw.blocks.reshape(-1, k, 34)
    q = blocks[..., 2:].contiguous().view(torch.int8).permute(0, 2, 1).reshape(-1, k)[:n].double()
    d = blocks[..., :2].contiguous().view(torch.float16).reshape(-1, k).repeat_interleave(32, dim=0)[:n]
    b = (x_used.float()[None, :] * d.float()).half().double()
    return (q * b).sum(dim=1)


def _q3_k_model(qw, x_used):
    """sum_k (q - 4) fp16(x_k d (s - 32)) (B as the tensor cores get it, the -4 term from the same values) in
    float64."""
    from spqt.formats import q3_k

    n, k = qw.shape
    flat = qw.blocks.reshape(-1, 110)
    q = q3_k_levels(flat).reshape(-1, k, 256).permute(0, 2, 1).reshape(-1, k)[:n].double()
    s = (q3_k.unpack_scales(flat[:, 96:108]) - 32).float().reshape(-1, k, 16)  # (R, K, 16)
    d = flat[:, 108:110].contiguous().view(torch.float16).float().reshape(-1, k)
    xd = x_used.float()[None, :] * d  # (R, K), fp32 as the kernel
    b = (xd[..., None] * s).half().double()  # (R, K, 16)
    b = b.permute(0, 2, 1).repeat_interleave(16, dim=1).reshape(-1, k)[:n]  # row 16 m + i of superblock row r
    return ((q - 4) * b).sum(dim=1)


def _q2_k_model(qw, x_used):
    """sum_k q fp16(x_k d sc) - x_k dmin mn in float64."""
    n, k = qw.shape
    flat = qw.blocks.reshape(-1, 84)
    q = q2_k_levels(flat).reshape(-1, k, 256).permute(0, 2, 1).reshape(-1, k)[:n].double()
    sb = flat[:, 0:16].to(torch.int64).reshape(-1, k, 16)
    dd = flat[:, 80:84].contiguous().view(torch.float16).float().reshape(-1, k, 2)
    b = ((x_used.float()[None, :] * dd[..., 0])[..., None] * (sb & 15).float()).half().double()  # (R, K, 16)
    mins = (x_used.float()[None, :] * dd[..., 1]).double()[..., None] * (sb >> 4).double()
    rows_of = lambda v: v.permute(0, 2, 1).repeat_interleave(16, dim=1).reshape(-1, k)[:n]  # noqa: E731
    return (q * rows_of(b)).sum(dim=1) - rows_of(mins).sum(dim=1)


# The kernel's arithmetic with its input rounding kept (the fp16-B model), for the types that have one
FP16_B_MODELS = {"q2_k": _q2_k_model, "q3_k": _q3_k_model, "q8_0": _q8_0_model}


def _assert_near_model(y, model, x_used, w_mag, what):
    """y within the fp32 sums' worst case and y's rounding of the fp16-B model (float64, (N,))."""
    k = x_used.shape[0]
    tol = (k + 4) * 2.0**-24 * (w_mag @ x_used.double().abs()) + 2.0**-11 * model.abs() + 1e-30
    err = (y.double() - model).abs()
    assert not (err > tol).any(), f"{what}: {int((err > tol).sum())} outputs off the fp16-B model"


# type_tiles' tiles (lane groups, columns) the dequant test runs beside the shipped one (TILES), with their dtypes
OTHER_TILES = [((2, 64), (torch.float32,)), ((4, 32), (torch.float16,))]


@pytest.mark.parametrize("device", [pytest.param("cpu", id="interp"),
                                    pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fmt", TYPES)
def test_cuda_planes_dequant_kernel(rng, fmt, device, monkeypatch):
    """kg.dequantize on the type's CUDA layout (the prefill GEMM's first half: type_tiles' kernel at its shipped
    tile) and the kernel at other tiles, into poisoned outputs (and rows after them) on shapes that are not
    multiples of 256 or of a tile (1025 rows: two head groups, the last superblock row one row), equal the format's
    own decode rounded to the output's dtype (bf16 on the GPU only: the interpreter truncates)."""
    from spqt.kernels import type_tiles

    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    shapes = ((300, 75), (1025, 24), (1, 37)) if device == "cpu" else ((4096, 4096), (2311, 777))
    dtypes = (torch.float32, torch.float16) if device == "cpu" else (torch.float32, torch.float16, torch.bfloat16)
    for shape in shapes:
        qw = _random_blocks(rng, fmt, shape)
        qw = QuantizedWeight(qw.blocks.to(device), fmt, "zigzag", shape)
        gw = _planes(qw, device)
        ref = qw.dequantize()
        for dtype in dtypes:
            out, guard = guarded_out(shape, dtype, device)
            kg.dequantize(gw, dtype, out=out)
            assert torch.equal(out, ref.to(dtype)), f"{shape} shipped tile {type_tiles.TILES[fmt]} {dtype}"
            assert guard.isnan().all(), f"{shape} shipped tile: written past row N"
        for (groups, bk), tile_dtypes in OTHER_TILES:
            for dtype in tile_dtypes if device == "cpu" else dtypes:
                out, guard = guarded_out(shape, dtype, device)
                type_tiles.dequantize(gw, dtype, out, groups, bk)
                assert torch.equal(out, ref.to(dtype)), f"{shape} {groups} lane groups x {bk} columns {dtype}"
                assert guard.isnan().all(), f"{shape} {groups} lane groups x {bk} columns: written past row N"
    with pytest.raises(ValueError, match="contiguous"):
        type_tiles.dequantize(gw, torch.float16, torch.empty(shape[0], 2 * shape[1], device=device)[:, ::2])
    for groups in (0, 8):
        with pytest.raises(ValueError, match="lane groups"):
            type_tiles.dequantize(gw, torch.float16, groups=groups)


_TILES_SM90 = """
import json
from spqt.kernels import sass, type_tiles
found = {}
for fmt in type_tiles.TILES:
    listing, registers, stack = sass.disassemble(type_tiles.compile_sm90(fmt).asm["cubin"])
    ops = [sass.opcode(line) for line in sass.instructions(listing)]
    found[fmt] = [registers, stack, [op for op in ops if op.startswith("STG")], [op for op in ops if op.startswith("LDG")]]
print(json.dumps(found))
"""


def test_type_tiles_fill_the_sm_for_sm90():
    """Each type's shipped tile (type_tiles.TILES) compiled for sm_90 here (one child process for all, without
    TRITON_INTERPRET; pointers, N and K multiples of 16 as a model's maps specialize), what made q4k_tiles' kernel
    fast on the H200 (tests/test_kernels.py::test_tile_dequantization_fills_the_sm_for_sm90): at most 32 registers a
    thread (every warp slot of an SM at 4 warps a program), no spills, 16-byte stores only, and each array a column
    needs read as one vector (at most 4 loads a thread: no load a weight)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _TILES_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.splitlines()[-1])
    assert sorted(found) == sorted(TYPES)
    for fmt, (registers, stack, stores, loads) in found.items():
        assert registers <= 32 and stack == 0, (fmt, registers, stack)
        assert stores and all(op == "STG.E.128" for op in stores), (fmt, stores)
        assert len(loads) <= 4, (fmt, loads)


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("fmt", TYPES)
def test_zigzag_cuda_types(rng, fmt, sparsity):
    """B2 and B4 of every config on poisoned workspaces against the float64 product (and the fp16-B model where
    the type has one), then bit-identical on a rerun."""
    from spqt.kernels import zigzag_cuda

    for shape in GPU_SHAPES:
        qw, gw, refs = _gpu_case(rng, fmt, shape)
        x, t = random_x(rng, shape[1], torch.float16, "cuda", sparsity)
        x_sparse = reference.sparsify(x, t).float()
        assert zigzag_cuda.supports(x, kg.MODE_DENSE), "NVRTC or cuda-bindings missing on the GPU machine"
        for split, warps, pipe, acc, extra in _configs(fmt):
            ws = kg.ZigzagWorkspace(gw, split, torch.float16)
            for mode, x_used, name in ((kg.MODE_DENSE, x.float(), "B2"), (kg.MODE_INDEXED, x_sparse, "B4")):
                ws.y.fill_(float("nan"))
                ws.partials.fill_(float("nan"))
                kw = {"num_warps": warps, "pipe": pipe, "acc": acc, "impl": "cuda", "extra": extra}
                if mode == kg.MODE_INDEXED:
                    ws.idx.fill_(-7777)
                    kw["idx"], kw["count"] = collect(x, t, ws.idx, ws.count)
                what = f"{fmt} cuda {name} {shape} split {split} warps {warps} pipe {pipe} acc {acc} {extra} s={sparsity}"
                y = kg.gemv_zigzag(gw, x, mode, ws, **kw).clone()
                assert_within_fp32_sum(y, *refs, x_used, what, FP16_X_EPS)
                if fmt in FP16_B_MODELS:
                    _assert_near_model(y, FP16_B_MODELS[fmt](qw, x_used), x_used, refs[1], what)
                assert torch.equal(y, kg.gemv_zigzag(gw, x, mode, ws, **kw)), f"{what}: not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", TYPES)
def test_this_gpus_type_entries_compute_the_product(rng, fmt):
    """Every entry of the type in this GPU's shipped table, B2 for a dense entry and B4 at 50 % for a sparse one, run
    as the runtime runs that shape (tuning.cuda_type_config: the entry's split, warps, accumulators, pairs; the plain
    finish) on a matrix of the entry's K (at most 1024 of its rows), poisoned, against the float64 product: the tuner
    times the configs it ships on its own shapes, which the other tests' fixed configs do not cover. (Not covered here:
    the epilogues, the folded norm and MODE_KEPT with these configs.)"""
    from spqt.kernels import tuning

    entries = {kind: {shape: entry for shape, entry in tuning.table_entries(f"zigzag_{kind}_{fmt}").items()
                      if entry.get("impl") == "cuda"} for kind in ("dense", "sparse")}
    if not any(entries.values()):
        pytest.skip(f"{tuning.device_key()}: no CUDA GEMV entries of {fmt} in this GPU's table")
    for kind, found in entries.items():
        for shape, entry in found.items():
            n, k = (int(v) for v in shape.split("x"))
            cfg = tuning.cuda_type_config(kind, fmt, n, k)
            assert cfg["split"] == entry["split"] and cfg["acc"] == entry["acc"], (shape, cfg, entry)
            qw, gw, refs = _gpu_case(rng, fmt, (min(n, 1024), k))
            x, t = random_x(rng, k, torch.float16, "cuda", 0.5 if kind == "sparse" else 0.0)
            ws = kg.ZigzagWorkspace(gw, cfg["split"], torch.float16)
            ws.y.fill_(float("nan"))
            ws.partials.fill_(float("nan"))
            kw = tuning.launch_args(cfg)
            mode, x_used = kg.MODE_DENSE, x.float()
            if kind == "sparse":
                ws.idx.fill_(-7777)
                mode, x_used = kg.MODE_INDEXED, reference.sparsify(x, t).float()
                kw["idx"], kw["count"] = collect(x, t, ws.idx, ws.count)
            y = kg.gemv_zigzag(gw, x, mode, ws, **kw).clone()
            assert_within_fp32_sum(y, *refs, x_used, f"{tuning.device_key()} {fmt} {kind} {shape}: {cfg}", FP16_X_EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["q2_k", "q3_k", "q5_k", "q6_k", "q8_0"])
def test_zigzag_cuda_types_finishes(rng, fmt):
    """The type's own finishes (the last program's; B2 and B4 at 50 %): plain, residual and SwiGLU against torch on
    the reduction kernel's plain output, as the Q4_K CUDA test. Q8_0 also with cluster=True on sm_90 (gemv_zigzag
    runs the cluster finish for Q4_K only: the finish as configured)."""
    from spqt.kernels import zigzag_cuda

    n, k = 2048, 1000  # SwiGLU: F = 1024, a multiple of 256
    gw = _planes(_gpu_weights(rng, fmt, (n, k)), "cuda")
    x, t = random_x(rng, k, torch.float16, "cuda", 0.5)
    finishes = [{"fused": True}]
    if fmt == "q8_0" and zigzag_cuda.clusters_run(x.device):
        finishes.append({"cluster": True})
    for finish in finishes:
        # split 7: SwiGLU's cluster of 14 programs; Q2_K, Q3_K, Q5_K and Q6_K also with their tile pairs
        for split, acc, extra in ((1, 16, ()), (7, 2, ())) + (((7, 8, ("-DPAIRS=1",)),) if fmt in PAIRS_TYPES else ()):
            ws = kg.ZigzagWorkspace(gw, split, torch.float16)
            for mode in (kg.MODE_DENSE, kg.MODE_INDEXED):
                kw = {"num_warps": 4, "acc": acc, "impl": "cuda", "extra": extra}
                if mode == kg.MODE_INDEXED:
                    kw["idx"], kw["count"] = collect(x, t, ws.idx, ws.count)
                what = f"{fmt} cuda {finish} split {split} acc {acc} {extra} mode {mode}"
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
                # at fp16's largest finite value either side may round to inf where the other does not (the kernel's
                # product of fp32 sums, want's of their fp16 roundings): both saturated there, as the Q4_K test does
                # (seed 3712409034774474100: want inf at a product of 65,520.6, the kernel's finite; the tolerance was
                # then inf too, of want's largest, passing any finite y); a NaN still fails
                sat = 65504.0
                want = want.clamp(-sat, sat)
                torch.testing.assert_close(y.clamp(-sat, sat), want, rtol=2e-2, atol=1e-3 * float(want.abs().max()),
                                           msg=lambda m: f"{what} swiglu: {m}")
                assert not ws.counters.any(), f"{what}: the arrival counters are not reset"


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", TYPES)
def test_zigzag_cuda_types_fold_the_norm(rng, fmt):
    """B2 with the RMSNorm folded in (NORM, as the Q4_K test in test_kernels.py): y poisoned, close to B2 on the
    input normed in torch with the same rstd, within the fp32 sum's bound on that input (inputs at most one fp16
    unit apart where the two rstd differ in the last bit), and bit-identical on a rerun; K not a multiple of 8
    (the share's scalar tail)."""
    eps = 1e-5
    for shape in ((4096, 4096), (2311, 777)):
        qw, gw, refs = _gpu_case(rng, fmt, shape)
        k = shape[1]
        x = torch.from_numpy(rng.standard_normal(k).astype(np.float32) * 6).to("cuda", torch.float16)
        gamma, sq, normed = rms_norm_inputs(rng, x, 29, eps)
        for split, warps, pipe, acc, extra in _configs(fmt):
            ws = kg.ZigzagWorkspace(gw, split, torch.float16)
            kw = {"num_warps": warps, "pipe": pipe, "acc": acc, "impl": "cuda", "extra": extra}
            what = f"{fmt} {shape} split {split} warps {warps} pipe {pipe} acc {acc} {extra}"
            plain = kg.gemv_zigzag(gw, normed, kg.MODE_DENSE, ws, **kw).clone()
            ws.y.fill_(float("nan"))
            y = kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, **kw, norm=(gamma, sq, eps)).clone()
            assert_within_fp32_sum(y, *refs, normed.float(), what, 2 * FP16_X_EPS)
            torch.testing.assert_close(y, plain, rtol=2e-3, atol=2e-3 * float(plain.abs().max()), msg=what)
            assert torch.equal(y, kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, **kw, norm=(gamma, sq, eps))), what


# MODE_KEPT of the types (split, warps, pipe, acc): one program a row at 8 warps (a share of 4096 columns with the
# norm), the next chunk loaded ahead, 8 and 2 accumulators; without tile pairs (gpu_linear.sparse_kept runs a B2
# entry without them)
KEPT_CONFIGS = [(1, 8, 0, 16), (7, 2, 1, 2), (24, 4, 0, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("fmt", TYPES)
def test_zigzag_cuda_types_kept_mode(rng, fmt, sparsity):
    """MODE_KEPT (each program lists its share's inputs with |x| (scale) > t and multiplies those) on the type's layout:
    y and partials poisoned, within the fp32 sum's bound of the product on the sparsified input (and near the fp16-B
    model where the type has one), with WINA's scale, with the RMSNorm folded (close to MODE_KEPT on the input normed
    in torch), bit-identical on a rerun; the residual finished by the last program; a partial last chunk (777
    columns)."""
    from spqt.kernels import zigzag_cuda

    eps = 1e-5
    for shape in ((4096, 4096), (2311, 777), (1024, 11008)):
        qw, gw, refs = _gpu_case(rng, fmt, shape)
        k = shape[1]
        x, t = random_x(rng, k, torch.float16, "cuda", sparsity)
        scale = torch.from_numpy(0.5 + rng.random(k).astype(np.float32)).to("cuda")
        gamma, sq, normed = rms_norm_inputs(rng, x, 37, eps)
        for split, warps, pipe, acc in KEPT_CONFIGS:
            if not zigzag_cuda.kept_fits(k, split, warps):
                continue
            ws = kg.ZigzagWorkspace(gw, split, torch.float16)
            kw = {"num_warps": warps, "pipe": pipe, "acc": acc, "impl": "cuda", "threshold": t}
            what = f"{fmt} kept {shape} split {split} warps {warps} pipe {pipe} acc {acc} s={sparsity}"
            for more, x_used in (({}, reference.sparsify(x, t).float()),
                                 ({"scale": scale}, reference.sparsify(x, t, scale).float()),
                                 ({"norm": (gamma, sq, eps)}, None)):
                ws.y.fill_(float("nan"))
                ws.partials.fill_(float("nan"))
                y = kg.gemv_zigzag(gw, x, kg.MODE_KEPT, ws, **kw, **more).clone()
                case = f"{what} {sorted(more)}"
                if x_used is None:  # the kernel's rstd may differ from torch's in the last bit: compare with
                    # MODE_KEPT on torch's normed input, where both keep the same inputs
                    plain = kg.gemv_zigzag(gw, normed, kg.MODE_KEPT, ws, **kw).float()
                    torch.testing.assert_close(y.float(), plain, rtol=2e-3, atol=2e-3 * float(plain.abs().max()) + 1e-6,
                                               msg=case)
                else:
                    assert_within_fp32_sum(y, *refs, x_used, case, FP16_X_EPS)
                    if fmt in FP16_B_MODELS:
                        _assert_near_model(y, FP16_B_MODELS[fmt](qw, x_used), x_used, refs[1], case)
                again = kg.gemv_zigzag(gw, x, kg.MODE_KEPT, ws, **kw, **more)
                assert torch.equal(y, again), f"{case}: not deterministic"
            if split == 24:  # the residual finished by the last program of a tile
                assert_kept_residual_finish(gw, x, ws, kw, what)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", TYPES)
def test_zigzag_cuda_types_run_bf16(rng, fmt):
    """bf16 x on the type's CUDA GEMV (XBF16: B rounded to fp16 as for fp16 x, y bf16): B2, the collected B4 and
    MODE_KEPT at 50 %, B2 with the RMSNorm folded, on poisoned workspaces within the fp32 sum's bound of the float64
    product (y's bf16 rounding); bit-identical on a rerun; the residual finished by the last program; a config without
    and (Q2_K, Q3_K, Q5_K, Q6_K) with tile pairs, a partial last chunk (777 columns)."""
    eps = 1e-5
    for shape in ((4096, 4096), (2311, 777)):
        qw, gw, refs = _gpu_case(rng, fmt, shape)
        k = shape[1]
        x, t = random_x(rng, k, torch.bfloat16, "cuda", 0.5)
        x_sparse = reference.sparsify(x, t).float()
        gamma, sq, normed = rms_norm_inputs(rng, x, 29, eps)
        # (the type's last tile-pairs config: the nibble types' at 2 accumulators, the finishes test runs 8)
        for split, warps, pipe, acc, extra in _configs(fmt)[1:2] + _configs(fmt)[len(CONFIGS):][-1:]:
            ws = kg.ZigzagWorkspace(gw, split, torch.bfloat16)
            kw = {"num_warps": warps, "pipe": pipe, "acc": acc, "impl": "cuda", "extra": extra}
            what = f"{fmt} bf16 {shape} split {split} warps {warps} pipe {pipe} acc {acc} {extra}"
            # MODE_KEPT without tile pairs (as gpu_linear.sparse_kept runs it)
            for mode, x_used, name in ((kg.MODE_DENSE, x.float(), "B2"), (kg.MODE_INDEXED, x_sparse, "B4"),
                                       (kg.MODE_KEPT, x_sparse, "kept"))[: 3 if extra == () else 2]:
                ws.y.fill_(float("nan"))
                ws.partials.fill_(float("nan"))
                more = {"threshold": t} if mode == kg.MODE_KEPT else {}
                if mode == kg.MODE_INDEXED:
                    ws.idx.fill_(-7777)
                    more["idx"], more["count"] = collect(x, t, ws.idx, ws.count)
                y = kg.gemv_zigzag(gw, x, mode, ws, **kw, **more).clone()
                assert y.dtype == torch.bfloat16
                assert_within_fp32_sum(y, *refs, x_used, f"{what} {name}", FP16_X_EPS)
                again = kg.gemv_zigzag(gw, x, mode, ws, **kw, **more)
                assert torch.equal(y, again), f"{what} {name}: not deterministic"
            ws.y.fill_(float("nan"))
            y = kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, **kw, norm=(gamma, sq, eps)).clone()
            # the kernel's rstd may differ from torch's in the last bit: a normed input one bf16 unit apart
            assert_within_fp32_sum(y, *refs, normed.float(), f"{what} norm", FP16_X_EPS + 2.0**-8)
            if extra == ():
                assert_kept_residual_finish(gw, x, ws, kw | {"threshold": t}, what)


@pytest.mark.parametrize("bits", [5, 6])
def test_nibble_tile_pairs_compile_for_sm90(bits, tmp_path, monkeypatch):
    """Q5_K's and Q6_K's tile pairs (PAIRS at 8 and 2 accumulators) compile with NVRTC for sm_90 without spills in B2,
    B4 and the SwiGLU finish, 16 mma in the main loop; B2's loop no longer than without pairs (when written: Q5_K 351 /
    339 instructions at 2 / 8 against 356 / 344, Q6_K 370 / 340 against 380 / 356), half the permutes or fewer (24:
    the scales, B and a byte or two of high bits a slot and word), at 8 no more selects than the scales' (Q6_K picks
    its scale word by lane); at 4 accumulators PAIRS does not compile."""
    from spqt.kernels import nvrtc, zigzag_cuda
    from spqt.kernels.sass import disassemble, main_loop, opcode

    monkeypatch.setenv("SPQT_CACHE", str(tmp_path))  # compiled here, not read from a cache
    nvrtc.compile_cubin.cache_clear()
    source = zigzag_cuda.SOURCE.read_text()
    for acc, epilogue, mode in ((8, -1, zigzag_cuda.MODE_DENSE), (2, -1, zigzag_cuda.MODE_DENSE),
                                (2, 1, zigzag_cuda.MODE_INDEXED), (8, 2, zigzag_cuda.MODE_DENSE)):
        loops = []
        for extra in ((), ("-DPAIRS=1",)):
            sass, regs, stack = disassemble(nvrtc.compile_cubin(
                source, zigzag_cuda.options(4, mode, 0, epilogue, extra, acc=acc, bits=bits), "sm_90"))
            loop = main_loop(sass, "HMMA")
            assert stack == 0 and sum("HMMA" in ln for ln in loop) == 16, (acc, epilogue, mode, extra)
            loops.append([opcode(ln) for ln in loop])
        if (mode, epilogue) == (zigzag_cuda.MODE_DENSE, -1):
            plain, pairs = loops
            assert len(pairs) <= len(plain) and pairs.count("PRMT") <= 24 < plain.count("PRMT"), (acc, len(pairs))
            assert pairs.count("SEL") <= {8: {5: 1, 6: 12}[bits], 2: plain.count("SEL")}[acc], (acc, pairs.count("SEL"))
    with pytest.raises(Exception, match="PAIRS"):
        nvrtc.compile_cubin(source, zigzag_cuda.options(4, zigzag_cuda.MODE_DENSE, 0, -1, ("-DPAIRS=1",), acc=4,
                                                        bits=bits), "sm_90")


@pytest.mark.parametrize("bits", [5, 6])
def test_kept_mode_compiles_for_q5_k_and_q6_k(bits, tmp_path, monkeypatch):
    """MODE_KEPT of TYPE 5 / 6 compiles with NVRTC for sm_90 as the runtime's sparse_kept runs it (pipe 0, the norm
    folded, the residual's last-program finish) without spills, 16 mma in the main loop (Q2_K, Q3_K, Q8_0:
    cuda_emulation.assert_type_compiles)."""
    from spqt.kernels import nvrtc, zigzag_cuda
    from spqt.kernels.sass import disassemble, main_loop

    monkeypatch.setenv("SPQT_CACHE", str(tmp_path))  # compiled here, not read from a cache
    nvrtc.compile_cubin.cache_clear()
    options = zigzag_cuda.options(4, zigzag_cuda.MODE_KEPT, 0, 1, acc=2, bits=bits, norm=True)
    sass, _, stack = disassemble(nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(), options, "sm_90"))
    assert stack == 0 and sum("HMMA" in ln for ln in main_loop(sass, "HMMA")) == 16


def test_kept_layout_names_the_cuda_gemv_layouts(rng):
    """MODE_KEPT runs a matrix in a zigzag layout of the CUDA GEMV (gpu_linear.kept_layout): Q4_K's and every type's
    planes; not the Triton type kernels' layout (no MODE_KEPT there) nor the row layout."""
    import spqt
    from spqt.kernels.gpu_layout import repack
    from spqt.kernels.gpu_layout_types import repack as repack_triton
    from spqt.kernels.gpu_linear import kept_layout

    for fmt in TYPES:
        qw = _random_blocks(rng, fmt, (300, 77))
        assert kept_layout(_planes(qw, "cpu")) and not kept_layout(repack_triton(qw, "cpu")), fmt
    w = torch.from_numpy(rng.standard_normal((300, 77)).astype(np.float32))
    for layout in ("zigzag", "row"):
        q4k = QuantizedWeight(spqt.quantize(w, "q4_k", layout), "q4_k", layout, (300, 77))
        assert kept_layout(repack(q4k, "cpu")) == (layout == "zigzag")
