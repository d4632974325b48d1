"""Triton kernels against their torch twins: on the CPU through the Triton interpreter (CI, small
shapes) and the same tests on the GPU (`gpu` marker, model shapes). Outputs are poisoned before
every launch, inputs are fresh random data, shapes are not multiples of the block size."""

import numpy as np
import pytest
import torch

import spqt
from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gemv as kg
from spqt.kernels import gpu_layout, q4k_tiles, reference
from spqt.kernels.collect import collect
from spqt.kernels.gpu_layout import dequantize_gpu_layout, repack

from conftest import save_quantized
from kernel_inputs import (assert_kept_residual_finish, assert_within_fp32_sum, guarded_out, min_part, random_x as _x,
                           rms_norm_inputs)

CPU_SHAPES = [(300, 130), (64, 40), (513, 24)]
GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1024, 4096), (576, 192), (1000, 1000), (2311, 777)]
SPARSITIES = [0.0, 0.25, 0.5, 0.9, 1.0]

DEVICES = [pytest.param("cpu", id="interp"), pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)]


def shapes_for(device):
    return CPU_SHAPES if device == "cpu" else GPU_SHAPES


def dtypes_for(device):
    return [torch.float32, torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16]


def _weights(rng, shape, layout, device, scale: float = 1.0):
    """Random (N, K) weights (standard normal times scale) quantized to Q4_K: (QuantizedWeight, kernel layout)."""
    w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * scale).to(device)
    qw = QuantizedWeight(spqt.quantize(w, "q4_k", layout), "q4_k", layout, shape)
    return qw, repack(qw, device)


_REFERENCES = {}


def _reference_matrices(qw: QuantizedWeight):
    """(W, |W| + 2 |dmin*m|) in float64, computed once per matrix (kept alive with it)."""
    if id(qw) not in _REFERENCES:
        if len(_REFERENCES) > 4:
            _REFERENCES.clear()
        w_ref = qw.dequantize().double()
        _REFERENCES[id(qw)] = (qw, w_ref, w_ref.abs() + 2 * min_part(qw).double().abs())
    return _REFERENCES[id(qw)][1:]


# Relative error of one product in the tensor-core zigzag kernel, from holding x d sc in 16-bit
# terms (zigzag_mma.py): one fp16 term, two bf16 terms, three bf16 terms for fp32 x.
ZIGZAG_INPUT_EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-17, torch.float32: 2.0**-24}


def assert_close_fp32_accum(y, qw, x_used, what, input_eps=0.0):
    """|y - W x| within the worst-case fp32 error of summing K products (kernel_inputs), the
    magnitudes added being the kernel's scale part d*sc*q and min part dmin*m, each at most
    |w| + |dmin*m|; input_eps: the kernel's rounding of each product's factors."""
    w_ref, w_mag = _reference_matrices(qw)
    assert_within_fp32_sum(y, w_ref, w_mag, x_used, what, input_eps)


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_layout_repack_is_exact(rng, device):
    for shape in shapes_for(device)[:3]:
        for layout in ("row", "zigzag"):
            qw, gw = _weights(rng, shape, layout, device)
            assert torch.equal(dequantize_gpu_layout(gw), qw.dequantize())
            out = torch.full(shape, float("nan"), dtype=torch.float32, device=device)
            kg.dequantize(gw, torch.float32, out=out)
            assert torch.equal(out, qw.dequantize()), f"dequant kernel {layout} {shape}"
            if layout == "zigzag":  # heads of 4 superblock rows of a column side by side, padding rows zero
                rows, cols = gw.grid
                # quants in planes: plane p holds bytes pb p .. pb (p + 1) of each block's levels
                planes, pb = gpu_layout.PLANES, 128 // gpu_layout.PLANES
                assert gw.quants.shape == (rows, planes, cols, pb // 4)
                blocks = gpu_layout.from_planes(gw.quants).contiguous().view(torch.uint8).reshape(rows, cols, 128)
                assert torch.equal(gpu_layout.to_planes(gpu_layout.from_planes(gw.quants)), gw.quants)
                for p in range(planes):
                    plane = gw.quants[:, p].contiguous().view(torch.uint8).reshape(rows, cols, pb)
                    assert torch.equal(plane, blocks[:, :, pb * p: pb * (p + 1)])
                canonical = qw.blocks.to(device)[..., :16].contiguous().view(torch.int32)  # (rows, cols, 4)
                assert gw.head.shape == (-(-rows // 4), cols, 4, 4)
                for r in range(rows):
                    assert torch.equal(gw.head[r // 4, :, r % 4], canonical[r])
                assert not gw.head.permute(0, 2, 1, 3).reshape(-1, cols, 4)[rows:].any()


@pytest.mark.parametrize("device", DEVICES)
def test_tile_dequantization_every_tile(rng, device):
    """q4k_tiles.dequantize (gemv.dequantize's zigzag Q4_K path, the prefill's fp16 / bf16 weights for cuBLAS) with
    every tile width and a short, a partial and a whole column block, into poisoned outputs with poisoned rows after
    them: the reference's weights rounded to the output's dtype, padding rows cut off (1025 rows: two head groups,
    the last superblock row one row; bf16 on the GPU: the interpreter truncates to it; the interpreter runs each
    tile in fp32 and the shipped one in fp16 too, the rounding being the store's alone)."""
    shapes = [(300, 130), (1025, 24)] if device == "cpu" else [(2311, 777), (4096, 4096), (11008, 4096)]
    dtypes = (torch.float16, torch.float32) if device == "cpu" else (torch.float16, torch.bfloat16, torch.float32)
    for shape in shapes:
        qw, gw = _weights(rng, shape, "zigzag", device)
        ref = qw.dequantize().to(device)
        for wn, bk in ((4, 128), (8, 16), (16, 32), (32, 64)):
            for dtype in dtypes if device != "cpu" else (torch.float32,):
                out, guard = guarded_out(shape, dtype, device)
                q4k_tiles.dequantize(gw, dtype, out, wn, bk)
                assert torch.equal(out, ref.to(dtype)), f"{shape} WN {wn} BK {bk} {dtype}"
                assert guard.isnan().all(), f"{shape} WN {wn} BK {bk}: written past row N"
        assert torch.equal(kg.dequantize(gw, dtypes[-2]), ref.to(dtypes[-2]))  # the shipped tile, fp16 / bf16
    with pytest.raises(ValueError, match="runs zigzag Q4_K"):
        q4k_tiles.dequantize(_weights(rng, (64, 40), "row", device)[1])
    with pytest.raises(ValueError, match="contiguous"):
        q4k_tiles.dequantize(gw, torch.float16, torch.empty(shape[1], shape[0], device=device).t())
    with pytest.raises(ValueError, match="contiguous"):
        q4k_tiles.dequantize(gw, torch.float16, torch.empty(shape[0], shape[1] + 1, device=device))
    with pytest.raises(ValueError, match="words of a block"):
        q4k_tiles.dequantize(gw, torch.float16, wn=64)
    row = _weights(rng, (64, 256), "row", device)[1]
    with pytest.raises(ValueError, match="contiguous"):  # the row layout's kernel takes the same out
        kg.dequantize(row, torch.float32, torch.empty(256, 64, device=device).t())


_DEQUANT_SM90 = """
import json
from spqt.kernels import q4k_tiles, sass
sig = {"q_ptr": "*i32", "h_ptr": "*i64", "out_ptr": "*fp16", "N": "i32", "K": "i32", "WN": "constexpr",
       "BK": "constexpr"}
kernel = sass.compile_sm90(q4k_tiles._dequant_kernel, sig, {"WN": q4k_tiles.DEQUANT_WN, "BK": q4k_tiles.DEQUANT_BK}, 5,
                           {"num_warps": 4})
listing, registers, stack = sass.disassemble(kernel.asm["cubin"])
stores = [sass.opcode(line) for line in sass.instructions(listing) if "STG" in line]
print(json.dumps([registers, stack, stores]))
"""


def test_tile_dequantization_fills_the_sm_for_sm90():
    """What made the tile dequantization 1.7x the block kernel's rate on the H200 (scripts/dequant_probe.py): the
    shipped tile compiled for sm_90 here (no GPU; a child process, as TRITON_INTERPRET replaces the compiler; N and K
    multiples of 16 as a model's maps specialize) takes at most 32 registers a thread (16 programs of 4 warps an SM,
    every warp slot) and stores 16 bytes a lane at a time, without spills."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _DEQUANT_SM90], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    registers, stack, stores = json.loads(run.stdout.splitlines()[-1])
    assert registers <= 32 and stack == 0, (registers, stack)
    assert stores and all(op == "STG.E.128" for op in stores), stores


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_collect_equals_nonzero(rng, device, sparsity):
    for k in ([37, 1024, 2100] if device == "cpu" else [192, 4096, 11008, 28672, 30001]):
        x, t = _x(rng, k, torch.float16, device, sparsity)
        idx = torch.full((k,), -7777, dtype=torch.int32, device=device)
        count = torch.full((), -1, dtype=torch.int32, device=device)
        collect(x, t, idx, count)
        expect = torch.nonzero(x.float().abs() > t).flatten()
        assert int(count) == expect.numel()
        assert torch.equal(idx[: int(count)].long(), expect)
        ref_idx, ref_count = reference.collect(x, t)
        assert int(ref_count) == int(count) and torch.equal(ref_idx[: int(count)], idx[: int(count)])
        idx.fill_(-7777)
        count.fill_(-1)
        collect(x, t, idx, count, segment=256)  # several programs, each counting the ones before it
        assert int(count) == expect.numel() and torch.equal(idx[: int(count)].long(), expect)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_collect_wina_scale_equals_reference(rng, device, dtype):
    """WINA: collect with the per-input scale keeps exactly the indices the reference path keeps
    (|x| * ||W[:, k]|| > t), thresholds at several quantiles of the score."""
    for k in ([37, 1024, 2100] if device == "cpu" else [192, 4096, 11008, 30001]):
        w = torch.from_numpy(rng.standard_normal((61, k)).astype(np.float32)) * torch.from_numpy(
            rng.uniform(0.1, 3.0, k).astype(np.float32))
        scale = torch.linalg.vector_norm(w.double(), dim=0).float().to(device)
        x = torch.from_numpy(rng.standard_normal(k).astype(np.float32)).to(device=device, dtype=dtype)
        score = x.float().abs() * scale
        for q in (0.0, 0.3, 0.5, 0.9):
            t = torch.quantile(score.cpu(), q).to(device) if q else torch.tensor(-1.0, device=device)
            for segment in (256, 1024):
                idx = torch.full((k,), -7777, dtype=torch.int32, device=device)
                count = torch.full((), -1, dtype=torch.int32, device=device)
                collect(x, t, idx, count, segment=segment, scale=scale)
                ref_idx, ref_count = reference.collect(x, t, scale)
                n = int(ref_count)
                assert int(count) == n, f"K={k} q={q}: count {int(count)} vs reference {n}"
                assert torch.equal(idx[:n], ref_idx[:n]), f"K={k} q={q}: indices differ"
                assert torch.equal(idx[:n].long(), torch.nonzero(reference.keep_mask(x, t, scale)).flatten())
            # the scale changes the choice: TEAL's indices at the same count differ (not asked of 37 inputs, where
            # the two sets coincide by chance: seed 2772945199080793791)
            if 0 < q < 0.9 and k >= 192:
                teal = torch.nonzero(x.float().abs() > torch.quantile(x.float().abs().cpu(), q).to(device)).flatten()
                assert not torch.equal(teal, idx[: int(count)].long())


def _zigzag_configs(device):
    """(split, launch config): the interpreter runs 1, 2 and 4 warps (the lane and warp index
    logic), 1 or 2 chunks a step and both finishes (fused, reduction kernel) at small shapes; the
    GPU every warp count, chunk count and prefetch distance, with splits that leave some programs
    without columns, both finishes, the L2 prefetch 0-2 steps ahead (clamped at the share's end,
    B4's past the list's; the interpreter has no L2 and runs without it), and one config with its
    registers capped (spills); both run 2, 4 and 16 accumulators (B masked by lane group or not)
    and the loads one step ahead (pipe) with and without the masked B."""
    if device == "cpu":
        return [(1, {"num_warps": 1, "chunks": 1, "acc": 2, "fused": False}),
                (3, {"num_warps": 2, "chunks": 1, "acc": 4, "pipe": 1, "fused": False}),
                (2, {"num_warps": 4, "chunks": 2, "fused": True})]
    # every (warps, chunks, ahead) the tuner may pick once (each is a compile: a fresh GPU machine
    # spent most of 9 minutes compiling when every split met every config), 4 and 8 warps once
    return [(1, {"num_warps": 1, "chunks": 1, "ahead": 1, "acc": 2, "pipe": 1, "fused": False}),
            (7, {"num_warps": 2, "chunks": 2, "ahead": 0, "fused": True}),
            (64, {"num_warps": 1, "chunks": 2, "ahead": 0, "maxnreg": 96, "fused": False}),
            (64, {"num_warps": 2, "chunks": 1, "ahead": 1, "pipe": 1, "fused": False}),
            (7, {"num_warps": 4, "chunks": 2, "ahead": 2, "acc": 4, "fused": False}),
            (64, {"num_warps": 8, "chunks": 1, "ahead": 1, "fused": True})]


def _split_by_config(configs: int) -> list:
    """(device, sparsity, config) cases: the interpreter an item a level (config None: its own selection), the GPU an
    item a launch config (sparsity None: every level in it), so that no two GPU items compile the same GEMV config
    and -n 8 compiles the configs side by side (conftest.COMPILE_HEAVY puts these items first). An item a level
    compiled every config in the first to run on a worker: 153-254 s on a fresh H100, sometimes two at once."""
    return ([pytest.param("cpu", s, None, id=f"{s}-interp") for s in SPARSITIES]
            + [pytest.param("cuda", None, c, id=f"gpu-config{c}", marks=pytest.mark.gpu) for c in range(configs)])


@pytest.mark.parametrize("device, sparsity, config", _split_by_config(len(_zigzag_configs("cuda"))))
def test_zigzag_variants(rng, device, sparsity, config):
    levels = [sparsity] if device == "cpu" else SPARSITIES
    for shape in shapes_for(device):
        qw, gw = _weights(rng, shape, "zigzag", device)
        for di, dtype in enumerate(dtypes_for(device)):
            for sparsity in levels:
                x, t = _x(rng, shape[1], dtype, device, sparsity)
                x_dense = x.float()
                x_sparse = reference.sparsify(x, t).float()
                configs = list(enumerate(_zigzag_configs(device)))
                if device == "cpu" and sparsity != 0.5:
                    configs = configs[1:2]  # the interpreter is slow: every config at 50 % only
                if device != "cpu":
                    configs = configs[config:config + 1]
                for ci, (split, cfg) in configs:
                    if device == "cpu" and (ci + di + SPARSITIES.index(sparsity)) % 2:
                        continue  # and one dtype per config and level, alternating (498 -> ~250 s of CI)
                    ws = kg.ZigzagWorkspace(gw, split, dtype)
                    for mode, x_used, name in ((kg.MODE_DENSE, x_dense, "B2"), (kg.MODE_STATIC, x_sparse, "B3"),
                                               (kg.MODE_INDEXED, x_sparse, "B4")):
                        if device == "cpu" and name == "B2" and sparsity not in (0.25, 0.5):
                            continue  # B2 ignores the level: the interpreter runs it at 25 and 50 % (every config
                            # at 50 %, config 1 at both: each dtype once)
                        ws.y.fill_(float("nan"))
                        ws.partials.fill_(float("nan"))
                        kw = dict(cfg)
                        if mode == kg.MODE_STATIC:
                            kw["threshold"] = t
                        if mode == kg.MODE_INDEXED:
                            ws.idx.fill_(-7777)
                            kw["idx"], kw["count"] = collect(x, t, ws.idx, ws.count)
                        y = kg.gemv_zigzag(gw, x, mode, ws, **kw).clone()
                        assert_close_fp32_accum(y, qw, x_used,
                                                f"{name} {shape} {dtype} split {split} {cfg} s={sparsity}",
                                                ZIGZAG_INPUT_EPS[dtype])
                        assert not ws.counters.any(), f"{name}: the arrival counters are not reset"
                        if device == "cpu" and ci != configs[0][0]:
                            continue  # the interpreter runs programs one by one: the second call (the workspace
                            # reused, the same bits) once a level, for the level's first config (-110 s of CI)
                        again = kg.gemv_zigzag(gw, x, mode, ws, **kw)
                        assert torch.equal(y, again), f"{name} not deterministic"


ROW_GPU_CONFIGS = [{"block_n": b * w, "num_warps": w} for w in (1, 2, 4) for b in (4, 8)]


@pytest.mark.parametrize("device, sparsity, config", _split_by_config(len(ROW_GPU_CONFIGS)))
def test_row_variants(rng, device, sparsity, config):
    levels = [sparsity] if device == "cpu" else SPARSITIES
    for shape in shapes_for(device):
        qw, gw = _weights(rng, shape, "row", device)
        dtypes = dtypes_for(device)
        for sparsity in levels:
            level = SPARSITIES.index(sparsity)
            # the interpreter: one dtype a level, alternating
            for dtype in dtypes if device != "cpu" else dtypes[level % 2:][:1]:
                x, t = _x(rng, shape[1], dtype, device, sparsity)
                for threshold, x_used, name in ((None, x.float(), "B0"), (t, reference.sparsify(x, t).float(), "B1")):
                    if device == "cpu" and name == "B0" and level > 1:
                        continue  # B0 ignores the level: the interpreter runs it at the first two levels (each dtype
                        # once)
                    for cfg in [{}] if device == "cpu" else ROW_GPU_CONFIGS[config:config + 1]:
                        out = torch.full((shape[0],), float("nan"), dtype=dtype, device=device)
                        y = kg.gemv_row(gw, x, threshold=threshold, out=out, **cfg).clone()
                        assert_close_fp32_accum(y, qw, x_used, f"{name} {shape} {dtype} s={sparsity} {cfg}")
                        assert torch.equal(y, kg.gemv_row(gw, x, threshold=threshold, out=out, **cfg))


@pytest.mark.parametrize("device, shape, dtypes", [
    pytest.param("cpu", (300, 130), None, id="interp"),
    # one test item a GPU shape and dtype: -n 8 runs them side by side (94 s as one on the H100, forty-second session;
    # 3000x777 in both dtypes 187 s, forty-ninth)
    *(pytest.param("cuda", shape, [dtype], id=f"gpu-{shape[0]}x{shape[1]}-{str(dtype)[6:]}", marks=pytest.mark.gpu)
      for shape in ((22016, 4096), (3000, 777)) for dtype in dtypes_for("cuda"))])
def test_zigzag_fused_epilogues(rng, device, shape, dtypes):
    """residual + W x and silu(gate) * up, done by the last program of each output tile (fused) or
    by the reduction kernel, equal the same kernel's fp32 partial sums with the epilogue done in
    torch: bit for bit (residual, one split: the partials are the sums), else within the output
    dtype's rounding (exp may differ by an ulp; several splits are summed in another order in
    torch). N / 2 not a multiple of 256: a tile's up rows span two superblock rows, one of them
    shared with gate rows."""
    qw, gw = _weights(rng, shape, "zigzag", device)
    n, k = shape
    for dtype in dtypes or dtypes_for(device):
        x, t = _x(rng, k, dtype, device, 0.5)
        r = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(device, dtype)
        eps = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        for split, fused in ((1, True), (3, True), (3, False)):
            if device == "cpu" and split > 1 and dtype != torch.float32:
                continue  # the interpreter is slow: several splits in fp32 only
            ws = kg.ZigzagWorkspace(gw, split, dtype)
            for mode in (kg.MODE_DENSE, kg.MODE_INDEXED):
                what = f"{shape} {dtype} split {split} fused {fused} mode {mode}"
                kw = {"num_warps": 2, "chunks": 1 if split == 1 else 2, "fused": fused}
                if mode == kg.MODE_INDEXED:
                    kw["idx"], kw["count"] = collect(x, t, ws.idx, ws.count)
                kg.gemv_zigzag(gw, x, mode, ws, **kw)
                y32 = ws.partials[:, :n].sum(0)
                ws.y.fill_(float("nan"))
                got = kg.gemv_zigzag(gw, x, mode, ws, residual=r, **kw)
                want = (r.float() + y32).to(dtype)
                if split == 1:
                    assert torch.equal(got, want), f"residual {what}"
                else:
                    torch.testing.assert_close(got, want, rtol=eps, atol=eps * float(want.abs().max()),
                                               msg=f"residual {what}")
                ws.y.fill_(float("nan"))
                got = kg.gemv_zigzag(gw, x, mode, ws, swiglu=True, **kw)
                gate, up = y32[: n // 2], y32[n // 2 :]
                want = torch.nn.functional.silu(gate) * up
                assert got.shape == (n // 2,)
                torch.testing.assert_close(got.float(), want, rtol=eps, atol=eps * float(want.abs().max()),
                                           msg=f"swiglu {what}")
                assert not ws.counters.any(), f"counters not reset {what}"


@pytest.mark.parametrize("device", DEVICES)
def test_reduction_writes_sums_of_squares(rng, device):
    """The reduction kernel of a residual map also writes each program's sum of its stored outputs' squares
    (the next map's folded RMSNorm reads them): poisoned first, every entry written, equal to torch's sums over
    the same blocks of y; the finishes that cannot write them refuse."""
    shape = (300, 130) if device == "cpu" else (4098, 4096)
    qw, gw = _weights(rng, shape, "zigzag", device)
    n, k = shape
    x, _ = _x(rng, k, torch.float16, device, 0.0)
    r = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 4).to(device, torch.float16)
    split = 3
    ws = kg.ZigzagWorkspace(gw, split, torch.float16)
    ws.sumsq.fill_(float("nan"))
    y = kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, num_warps=2, chunks=2, residual=r, sumsq=True).float()
    block = kg.reduce_block(split)
    assert ws.sumsq.numel() == -(-n // block)
    want = torch.nn.functional.pad(y * y, (0, ws.sumsq.numel() * block - n)).reshape(-1, block).sum(1)
    torch.testing.assert_close(ws.sumsq, want, rtol=1e-5, atol=0.0)
    with pytest.raises(ValueError, match="sums of squares"):
        kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, num_warps=2, chunks=2, swiglu=True, sumsq=True)
    with pytest.raises(ValueError, match="sums of squares"):
        kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, num_warps=2, chunks=2, residual=r, fused=True, sumsq=True)
    if device == "cpu":  # the Triton GEMV does not fold a norm
        with pytest.raises(ValueError, match="folded RMSNorm"):
            kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, norm=(x, ws.sumsq, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
def test_triton_linear_matches_reference(rng, device):
    """The GPU linear map (one token: fused epilogues; several tokens: dequantize + matmul, epilogue
    in torch), dense and sparse (TEAL, and WINA with the column norms as scale), with a residual or
    SwiGLU, against the reference linear map."""
    from spqt.kernels.gpu_linear import TritonLinear
    from spqt.kernels.reference import ReferenceLinear

    shape = (300, 130)
    for layout in ("zigzag", "row"):
        qw, _ = _weights(rng, shape, layout, device)
        fast, ref = TritonLinear(qw, torch.float32, device), ReferenceLinear(qw, torch.float32, device)
        t = torch.tensor(0.5, device=device)
        c = torch.linalg.vector_norm(qw.dequantize().double(), dim=0).float().to(device)
        t_wina = t * c.median()  # about as many kept as TEAL's
        for tokens in (1, 3):
            x = torch.from_numpy(rng.standard_normal((1, tokens, 130)).astype(np.float32)).to(device)
            r = torch.from_numpy(rng.standard_normal((1, tokens, 300)).astype(np.float32)).to(device)
            for kw in ({}, {"residual": r}, {"swiglu": True}):
                # (outputs live in the map's workspace until its next call: copied at once)
                cases = [("dense", fast.dense(x, **kw).clone(), ref.dense(x, **kw)),
                         ("sparse", fast.sparse(x, t, **kw).clone(), ref.sparse(x, t, **kw))]
                if layout == "zigzag" and tokens == 1:  # the one path where the scale reaches a kernel (collect)
                    cases.append(("sparse-wina", fast.sparse(x, t_wina, scale=c, **kw).clone(),
                                  ref.sparse(x, t_wina, scale=c, **kw)))
                for name, a, b in cases:
                    assert a.shape == b.shape, f"{layout} {tokens} tokens {name} {list(kw)}"
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * float(b.abs().max()),
                                               msg=f"{layout} {tokens} tokens {name} {list(kw)}")
                if layout == "zigzag" and tokens == 1:  # the norm and the collection in one launch
                    from spqt import functional

                    w = torch.from_numpy(rng.standard_normal(130).astype(np.float32)).to(device)
                    fast.normed.fill_(float("nan"))
                    a, normed = fast.sparse_normed(x, w, 1e-5, t, **kw)
                    want_normed = functional.rms_norm(x, w, 1e-5)
                    torch.testing.assert_close(normed, want_normed, rtol=1e-6, atol=1e-6)
                    b = ref.sparse(normed, t, **kw)
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 * float(b.abs().max()),
                                               msg=f"sparse_normed {list(kw)}")


@pytest.mark.parametrize("device", DEVICES)
def test_all_zero_x(device):
    qw, gw = _weights(np.random.default_rng(), (300, 70), "zigzag", device)
    x = torch.zeros(70, dtype=torch.float16, device=device)
    ws = kg.ZigzagWorkspace(gw, 2, torch.float16)
    ws.y.fill_(float("nan"))
    idx, count = collect(x, torch.tensor(0.0, device=device), ws.idx, ws.count)
    assert int(count) == 0
    y = kg.gemv_zigzag(gw, x, kg.MODE_INDEXED, ws, idx=idx, count=count)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("device", DEVICES)
def test_contracts_are_checked(device):
    _, gw = _weights(np.random.default_rng(), (64, 50), "zigzag", device)
    ws = kg.ZigzagWorkspace(gw, 1, torch.float16)
    with pytest.raises(ValueError, match="one token"):
        kg.gemv_zigzag(gw, torch.zeros(2, 50, dtype=torch.float16, device=device), kg.MODE_DENSE, ws)
    with pytest.raises(ValueError, match="B4 needs"):
        kg.gemv_zigzag(gw, torch.zeros(50, dtype=torch.float16, device=device), kg.MODE_INDEXED, ws)
    with pytest.raises(ValueError, match="row layout"):
        kg.gemv_row(gw, torch.zeros(50, dtype=torch.float16, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_ops_match_torch_twins(rng, device):
    from spqt import functional
    from spqt.kernels import fused
    from spqt.model import rope_table
    from spqt.config import ModelConfig

    dtype = torch.float32 if device == "cpu" else torch.float16
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    x = torch.from_numpy(rng.standard_normal((3, 5, 576)).astype(np.float32)).to(device, dtype)
    w = torch.from_numpy(rng.standard_normal(576).astype(np.float32)).to(device)
    out = fused.rms_norm(x, w, 1e-5)
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * w).to(dtype)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    # q|k|v of 3 query heads and 1 kv head (hd 64), 2 sequences of 7 tokens at positions 10..16,
    # a strided view as in the model; the torch twin (CPU) writes its own caches
    cfg = ModelConfig(vocab_size=10, dim=192, n_layers=1, n_heads=3, n_kv_heads=1, ffn_dim=8, max_seq_len=64)
    table = rope_table(cfg, 64).to(device)
    positions = torch.arange(10, 17, device=device)
    qkv = torch.from_numpy(rng.standard_normal((2, 7, 330)).astype(np.float32)).to(device, dtype)[..., :320]
    caches = [torch.full((2, 1, 20, 64), float("nan"), dtype=dtype, device=device) for _ in range(2)]
    ref_caches = [c.clone().cpu() for c in caches]
    got = fused.rope_kv(qkv, table, positions, *caches, 3, 1)
    want = functional.rope_kv(qkv.cpu(), table.cpu(), positions.cpu(), *ref_caches, 3, 1)
    torch.testing.assert_close(got.cpu(), want, atol=tol, rtol=tol)
    for c, ref in zip(caches, ref_caches):
        torch.testing.assert_close(c.cpu()[:, :, 10:17], ref[:, :, 10:17], atol=tol, rtol=tol)
        assert c[:, :, :10].isnan().all() and c[:, :, 17:].isnan().all(), "wrote outside the positions"
    # a NoPE layer's identity table (Transformer.rope_for): q and k leave unrotated, bit for bit
    from spqt.model import identity_table

    got = fused.rope_kv(qkv, identity_table(cfg, 64).to(device), positions, *caches, 3, 1)
    assert torch.equal(got, qkv[..., :192].reshape(2, 7, 3, 64))
    assert torch.equal(caches[0][:, :, 10:17], qkv[..., 192:256].reshape(2, 7, 1, 64).transpose(1, 2))
    gu = torch.from_numpy(rng.standard_normal((4, 2 * 1500)).astype(np.float32)).to(device, dtype)
    torch.testing.assert_close(fused.silu_mul(gu, 1500),
                               (torch.nn.functional.silu(gu[:, :1500].float()) * gu[:, 1500:].float()).to(dtype),
                               atol=tol, rtol=tol)
    if device == "cuda":  # the model's dispatcher takes the fused path on CUDA
        torch.testing.assert_close(functional.silu_mul(gu, 1500), fused.silu_mul(gu, 1500))
    # Gemma's GeGLU (gates far out too: tanh's +-1) and its post-norms joining the residual, against torch's ops
    gu[0, :8] = torch.tensor([-60.0, -20.0, -5.0, -1e-4, 1e-4, 5.0, 20.0, 60.0], dtype=dtype)
    gelu = torch.nn.functional.gelu(gu[:, :1500].float(), approximate="tanh").to(dtype).float()
    torch.testing.assert_close(fused.gelu_tanh_mul(gu, 1500), (gelu * gu[:, 1500:].float()).to(dtype), atol=tol,
                               rtol=tol)
    x2, y2 = (torch.from_numpy(rng.standard_normal((3, 5, 577)).astype(np.float32)).to(device, dtype) for _ in range(2))
    w2 = torch.from_numpy(rng.uniform(0.5, 1.5, 577).astype(np.float32)).to(device)
    normed = (y2.float() * torch.rsqrt(y2.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w2).to(dtype)
    torch.testing.assert_close(fused.add_rms_norm(x2, y2, w2, 1e-6), (x2.float() + normed.float()).to(dtype), atol=tol,
                               rtol=tol)
    if device == "cuda":
        torch.testing.assert_close(functional.gelu_tanh_mul(gu, 1500), fused.gelu_tanh_mul(gu, 1500))
        assert torch.equal(functional.add_rms_norm(x2, y2, w2, 1e-6), x2 + fused.rms_norm(y2, w2, 1e-6))


def test_kept_route_from_the_table(rng, monkeypatch):
    """MODE_KEPT's crossovers in the table: with SPQT_SPARSE_KEPT=table a map tries MODE_KEPT first from
    "crossover_kept" ("_fused" norm-fed) on, and counts as sparse there (sparse_pays) even below the collected B4's
    crossover; =1 tries it for every sparse map, =norm / =plain for the norm-fed maps / the others (sparse where the
    collected B4 pays, as the routes were timed); unset (the default) the model's tuned step route (kept_route, "off"
    unless set), which a set variable overrides; where
    MODE_KEPT cannot run (here: no CUDA GEMV) the map falls back to the collected B4 if that pays, else runs dense (the
    exact dense product)."""
    from spqt.linear import Linear

    monkeypatch.setenv("SPQT_SPARSE_KEPT", "table")
    qw, _ = _weights(rng, (300, 130), "zigzag", "cpu")
    lin = Linear(qw, torch.float32, "cpu", backend="triton")
    ref = Linear(qw, torch.float32, "cpu", backend="reference")
    x = torch.from_numpy(rng.standard_normal((1, 1, 130)).astype(np.float32))
    t = float(torch.quantile(x.abs().flatten(), 0.5))
    for m in (lin, ref):
        m.set_threshold(t, level=0.5)
        m.sparse = True
    impl = lin.impl
    impl.cfg_sparse = {**impl.cfg_sparse, "crossover": 0.65, "crossover_fused": 0.4, "crossover_kept": 0.25,
                       "crossover_kept_fused": None}
    assert impl.kept_pays(0.5) and impl.kept_first(0.5) and impl.sparse_pays(0.5) and not impl.collected_pays(0.5)
    assert not impl.kept_pays(0.1) and not impl.sparse_pays(0.1)
    assert not impl.kept_pays(0.9, norm_fed=True) and not impl.kept_first(0.9, norm_fed=True)
    for off in ("0", ""):
        monkeypatch.setenv("SPQT_SPARSE_KEPT", off)
        assert not impl.kept_first(0.5) and not impl.sparse_pays(0.5)
    monkeypatch.setenv("SPQT_SPARSE_KEPT", "1")
    assert impl.kept_first(0.1, norm_fed=True) and not impl.sparse_pays(0.1)  # forced first, not forced sparse
    # sparse where the collected B4 pays (0.65; norm-fed 0.4), as the routes were timed: not from MODE_KEPT's 0.25
    assert impl.kept_first(0.9) and not impl.sparse_pays(0.5) and impl.sparse_pays(0.65)
    assert impl.sparse_pays(0.5, norm_fed=True) and not impl.sparse_pays(0.3, norm_fed=True)
    for setting, fed in (("norm", True), ("plain", False)):  # one kind of map first, by what feeds it
        monkeypatch.setenv("SPQT_SPARSE_KEPT", setting)
        assert impl.kept_first(0.1, norm_fed=fed) and not impl.kept_first(0.9, norm_fed=not fed)
        assert not impl.sparse_pays(0.5)
    # unset, the model's tuned step route decides (generate.set_kept_route); a set variable overrides it
    monkeypatch.delenv("SPQT_SPARSE_KEPT")
    impl.kept_route = "all"
    assert impl.kept_first(0.1) and impl.kept_first(0.9, norm_fed=True) and not impl.sparse_pays(0.5)
    impl.kept_route = "norm"
    assert impl.kept_first(0.5, norm_fed=True) and not impl.kept_first(0.5)
    monkeypatch.setenv("SPQT_SPARSE_KEPT", "0")
    assert not impl.kept_first(0.5, norm_fed=True)
    impl.kept_route = "off"
    monkeypatch.setenv("SPQT_SPARSE_KEPT", "table")
    calls = []
    real = type(impl).sparse_kept
    monkeypatch.setattr(type(impl), "sparse_kept", lambda self, *a, **kw: calls.append(real(self, *a, **kw)))
    dense = ref.impl.dense(x).clone()
    tol = dict(rtol=1e-4, atol=1e-3 * float(dense.abs().max()))
    lin.dense_fallback = True
    torch.testing.assert_close(lin(x).clone(), dense, **tol)  # MODE_KEPT tried (no GPU: None), B4 does not pay
    assert calls == [None]
    impl.cfg_sparse["crossover"] = 0.4  # B4 pays at 0.5: the fallback is the sparse product
    torch.testing.assert_close(lin(x).clone(), ref(x).clone(), **tol)
    assert calls == [None, None]
    # a level whose tuned step route is "dense" (no sparse step beat the dense one): every map dense, MODE_KEPT
    # not tried; SPQT_SPARSE_KEPT overrides the route (=dense forces it, =off runs the collected B4 where it pays)
    monkeypatch.delenv("SPQT_SPARSE_KEPT")
    impl.kept_route = "dense"
    assert impl.step_dense() and not impl.collected_pays(0.9) and not impl.sparse_pays(0.9)
    assert not impl.kept_first(0.9) and not impl.kept_first(0.9, norm_fed=True)
    torch.testing.assert_close(lin(x).clone(), dense, **tol)
    assert calls == [None, None] and not lin.runs_sparse()
    lin.dense_fallback = False  # every map as asked: sparse
    assert lin.runs_sparse()
    lin.dense_fallback = True
    monkeypatch.setenv("SPQT_SPARSE_KEPT", "off")
    assert not impl.step_dense() and impl.collected_pays(0.5) and lin.runs_sparse()
    impl.kept_route = "off"
    monkeypatch.setenv("SPQT_SPARSE_KEPT", "dense")
    assert impl.step_dense() and not lin.runs_sparse()


@pytest.mark.parametrize("device", DEVICES)
def test_dense_fallback_below_the_crossover(rng, device):
    """With dense_fallback on, a map whose level is below its shape's tuned crossover runs dense
    (the exact dense product), at or above it sparse; off, it always runs sparse; a table without a
    crossover (an older table) keeps every map sparse. The norm-fed crossover applies with norm=."""
    from spqt.linear import Linear
    from spqt.model import RMSNorm

    qw, _ = _weights(rng, (300, 130), "zigzag", device)
    lin = Linear(qw, torch.float32, device, backend="triton")
    ref = Linear(qw, torch.float32, device, backend="reference")
    x = torch.from_numpy(rng.standard_normal((1, 1, 130)).astype(np.float32)).to(device)
    t = float(torch.quantile(x.abs().flatten().cpu(), 0.5))
    norm = RMSNorm(130, 1e-5).to(device)
    for m in (lin, ref):
        m.set_threshold(t, level=0.5)
        m.sparse = True
    lin.impl.cfg_sparse = {**lin.impl.cfg_sparse, "crossover": 0.65, "crossover_fused": 0.4}
    dense = ref.impl.dense(x).clone()
    sparse = ref(x).clone()
    tol = dict(rtol=1e-4, atol=1e-3 * float(dense.abs().max()))
    lin.dense_fallback = True
    torch.testing.assert_close(lin(x).clone(), dense, **tol)  # 0.5 < 0.65: dense
    torch.testing.assert_close(lin(x, norm=norm).clone(), ref(x, norm=norm), **tol)  # 0.5 >= 0.4: sparse
    lin.set_threshold(t, level=0.65)
    torch.testing.assert_close(lin(x).clone(), sparse, **tol)
    lin.dense_fallback = False
    lin.set_threshold(t, level=0.1)
    torch.testing.assert_close(lin(x).clone(), sparse, **tol)
    lin.dense_fallback = True
    lin.impl.cfg_sparse = {k: v for k, v in lin.impl.cfg_sparse.items() if not k.startswith("crossover")}
    torch.testing.assert_close(lin(x).clone(), sparse, **tol)
    lin.impl.cfg_sparse["crossover"] = None  # B4 never won: always dense
    lin.set_threshold(t, level=0.9)
    torch.testing.assert_close(lin(x).clone(), dense, **tol)
    # WINA through the fused norm + collection: Linear hands its column norms to the kernel, and the
    # achieved-sparsity count (the unfused path) applies the same mask
    # (a spread-out scale: random matrices have nearly equal column norms, which would hide a lost scale)
    c = torch.from_numpy(rng.uniform(0.2, 3.0, 130).astype(np.float32)).to(device)
    for m in (lin, ref):
        m.set_scale(c)
        m.set_threshold(t * float(c.median()), level=0.5)
    lin.dense_fallback = False
    want = ref(x, norm=norm).clone()
    assert not torch.allclose(want, ref.impl.dense(norm(x)), **tol)  # the criterion drops something
    torch.testing.assert_close(lin(x, norm=norm).clone(), want, **tol)
    for m in (lin, ref):
        m.track = True
        m.counts.zero_()
        m(x, norm=norm)
    assert torch.equal(lin.counts, ref.counts) and 0 < float(lin.counts[0]) < 130


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_collect(rng, device):
    """One launch = fused.rms_norm (to one rounding) then collect() of what it wrote: the ascending
    list and the count, over several segments; nothing written past the count."""
    from spqt.kernels import fused

    for d in ([576, 130] if device == "cpu" else [576, 4096, 5120, 8192]):
        for dtype in dtypes_for(device):
            x = torch.from_numpy(rng.standard_normal(d).astype(np.float32) * 3).to(device, dtype)
            w = torch.from_numpy(rng.standard_normal(d).astype(np.float32)).to(device)
            want = fused.rms_norm(x, w, 1e-5)
            for sparsity in (0.0, 0.5, 1.0):
                _, t = _x(rng, d, dtype, device, sparsity)
                t = torch.quantile(want.float().abs().cpu(), sparsity).to(device) if 0 < sparsity < 1 else t
                out = torch.full((d,), float("nan"), dtype=dtype, device=device)
                idx = torch.full((d,), -7777, dtype=torch.int32, device=device)
                count = torch.full((), -1, dtype=torch.int32, device=device)
                fused.rms_norm_collect(x, w, 1e-5, t, out, idx, count, segment=256 if device == "cuda" else 64)
                tol = 2.0**-22 if dtype == torch.float32 else 2.0**-10  # one rounding of the output (a sum order)
                torch.testing.assert_close(out, want, rtol=tol, atol=tol, msg=f"normed values, d {d} {dtype}")
                expect = torch.nonzero(out.float().abs() > t).flatten()
                assert int(count) == expect.numel(), f"count d {d} {dtype} s={sparsity}"
                assert torch.equal(idx[: int(count)].long(), expect), f"indices d {d} {dtype} s={sparsity}"
                assert (idx[int(count):] == -7777).all(), "wrote past the count"
                if sparsity == 0.5:  # with a per-input scale (WINA): |out| * scale > t
                    scale = torch.from_numpy(rng.random(d).astype(np.float32) * 2).to(device)
                    fused.rms_norm_collect(x, w, 1e-5, t, out, idx, count, segment=64, scale=scale)
                    expect = torch.nonzero(out.float().abs() * scale > t).flatten()
                    assert int(count) == expect.numel() and torch.equal(idx[: int(count)].long(), expect)


class _Launches:
    """A Triton kernel's stand-in that counts its launches (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.mark.parametrize("device, group", [pytest.param("cpu", None, id="interp")] + [
    pytest.param("cuda", group, id=f"gpu-{group}", marks=pytest.mark.gpu) for group in ("plain", "windowed", "normed")])
def test_rope_attention_decode(rng, device, group, monkeypatch):
    """The decode attention (head dims 16 to 256, powers of two and not: 80, 96; 3 query heads a kv head among the
    grouped-query cases) equals
    rope_kv + torch's attention over the masked cache (grouped-query and plain, positions 0, 64 (a block holding only
    the new key) and inside the second and the fourth key block, whose blocks are combined by the last to finish;
    grouped-query cases past fused.ATTN_LONG_FROM (512) keys take the long spans' two launches (head dim 32 and more:
    a program per kv head and block, counted, then a merge per query head and 32-column slice); past 2048 keys the
    blocks are merged in groups (the per-head kernel's 32, and on the CPU 16 for the long spans' merge): keys past the
    first 2048 (or before them) scaled up, so that the later (or the first) group holds the highest score; spans with
    more blocks than the position has: idle programs); the output is NaN before the call (every row written); cache
    rows at and past the position are NaN before the call (they must not be read), row pos is written with the torch
    twin's k and v, no other row changes; a longer span on the same route (fused.decode_attention_route), or fewer
    programs a head, give the same bits (fixed key blocks; the later calls also need the first's arrival counters
    reset, which are zero after each call); spans past the cache are refused. With a sliding window (pos - window <
    key <= pos: one key, a window inside a block or across blocks, on both routes, one that does not cut yet) the cache
    rows below the window are NaN too (they must not be read), and the twin's mask cuts them. With q / k norms (Qwen3,
    Gemma 3; random weights) the twin norms each head first (functional.norm_heads), or all of q and all of k (OLMo 2's,
    on both routes; Olmo 3's, in a window too). The interpreter runs every case in one item, the GPU an item a group
    (plain, windowed, normed: -n 8 runs them side by side, conftest.COMPILE_HEAVY putting them first)."""
    from spqt import functional
    from spqt.config import ModelConfig
    from spqt.kernels import fused
    from spqt.model import rope_table

    dtype = torch.float32 if device == "cpu" else torch.float16
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    # the output's absolute bound in fp16: the kernel rounds q (normed, rotated) to fp16 for its dot products, the twin
    # keeps it in fp32; OLMo 2 32B's case (40 heads, 3,000 keys, the later ones loud) missed 2e-3 by 2.6e-3 at one
    # seed on an H100, and the interpreter gave the same error from the same draws (RESULTS, fifty-ninth session)
    out_atol = 1e-5 if dtype == torch.float32 else 4e-3
    long_group = 16 if device == "cpu" else fused.ATTN_LONG_COMBINE_GROUP  # the interpreter's spans: 35 blocks
    plain = ((4, 2, 64, 70, 1), (3, 3, 32, 5, 2), (2, 1, 32, 200, 2), (2, 1, 32, 0, 1), (1, 1, 32, 64, 1),
             (6, 2, 32, 130, 1), (4, 2, 16, 70, 1), (2, 1, 16, 2200, 1), (1, 1, 16, 2100, 1), (6, 2, 32, 2200, 2),
             (4, 2, 64, 600, 1), (4, 2, 96, 70, 1), (3, 3, 80, 5, 2), (4, 1, 80, 600, 1)) + (
        ((32, 8, 128, 1500, 1), (64, 8, 128, 1500, 1), (28, 4, 128, 300, 2), (32, 8, 128, 5000, 2),
         (64, 8, 128, 9100, 1), (32, 32, 96, 1500, 1)) if device == "cuda" else ())
    windowed = ((2, 1, 96, 200, 2, 20), (3, 3, 32, 130, 1, 1), (4, 2, 32, 100, 1, 40), (2, 1, 32, 1300, 1, 700),
                (1, 1, 16, 70, 1, 200)) + (  # (Mistral's, Gemma 3 1B's and 4B's, Phi-3-mini's and -medium's)
        ((32, 8, 128, 5000, 2, 4096), (4, 1, 256, 1500, 1, 512), (8, 4, 256, 3000, 1, 1024),
         (32, 32, 96, 3000, 1, 2047), (40, 10, 128, 3000, 1, 2047)) if device == "cuda" else ())
    normed = ((4, 2, 64, 70, 1, 0), (2, 1, 96, 700, 1, 0), (2, 1, 32, 200, 1, 20)) + (  # (Qwen3 8B's, Gemma 3 1B's)
        ((32, 8, 128, 1500, 1, 0), (4, 1, 256, 1500, 1, 512)) if device == "cuda" else ())
    # OLMo 2's norms over all of q and all of k: the per-head kernel (5 query heads a kv head; q's 1,280 values summed
    # in two chunks, the second partial), the long spans', Olmo 3's in a sliding layer; on CUDA OLMo 2 7B's and 32B's
    # heads, Olmo 3 7B's sliding layers (a window of 4,096)
    normed_whole = ((10, 2, 128, 3, 1, 0), (4, 2, 32, 600, 2, 0), (4, 2, 32, 100, 1, 40)) + (
        ((32, 32, 128, 1500, 1, 0), (40, 8, 128, 3000, 1, 0), (32, 32, 128, 5000, 1, 4096)) if device == "cuda" else ())
    groups = {"plain": [case + (0, None) for case in plain], "windowed": [case + (None,) for case in windowed],
              "normed": [case + ("head",) for case in normed] + [case + ("all",) for case in normed_whole]}
    cases = [case for name, members in groups.items() if group in (None, name) for case in members]
    for heads, kv, hd, pos, batch, window, qk in cases:
        monkeypatch.setattr(fused, "ATTN_LONG_COMBINE_GROUP", long_group)
        # a scratch of its own: a Generator's decode in this process made its entries under inference_mode, which the
        # poisoning below may not write
        monkeypatch.setattr(fused, "_ATTENTION_SCRATCH", {})
        launches = _Launches(fused._rope_attention_blocks_kernel)
        monkeypatch.setattr(fused, "_rope_attention_blocks_kernel", launches)
        L = pos + 100  # more blocks than the position's: idle programs
        cfg = ModelConfig(vocab_size=10, dim=heads * hd, n_layers=1, n_heads=heads, n_kv_heads=kv, ffn_dim=8,
                          max_seq_len=L)
        table = rope_table(cfg, L).to(device)
        qkv = torch.from_numpy(rng.standard_normal((batch, 1, (heads + 2 * kv) * hd)).astype(np.float32)).to(device, dtype)
        caches = []
        for _ in range(2):
            c = torch.from_numpy(rng.standard_normal((batch, kv, L, hd)).astype(np.float32)).to(device, dtype)
            if pos > 2048 and not caches:  # the groups' merge: the highest score in the later keys, or in the first
                loud = slice(2048, pos) if pos % 200 == 0 else slice(0, 2048)  # (2200, 5000: later)
                c[:, :, loud] *= 3
            c[:, :, pos:] = float("nan")
            c[:, :, :max(0, pos - window + 1) if window else 0] = float("nan")  # below the window
            caches.append(c)
        ref = [c.clone().cpu().float() for c in caches]
        for r in ref:  # the twin's mask hides them; NaN * 0 would still poison its sums
            r[r.isnan()] = 0
        positions = torch.tensor([pos], device=device)
        length = pos + 1
        mask = torch.zeros((1, length))
        if window:
            mask[:, :max(0, pos - window + 1)] = float("-inf")
        # q's and k's norms (their weights, eps) where the case has them: per head, or over all of q and of k
        sizes = (heads * hd, kv * hd) if qk == "all" else (hd, hd)
        norms = tuple(torch.from_numpy(rng.uniform(0.5, 1.5, n).astype(np.float32)).to(device) for n in sizes)
        qk_norm = (*norms, 1e-6) if qk else None
        want = functional.attention(qkv.cpu().float(), table.cpu(), positions.cpu(), *ref, heads, kv, mask, length,
                                    qk_norm=None if qk_norm is None else (norms[0].cpu(), norms[1].cpu(), 1e-6))
        poisoned = torch.full((batch, 1, heads, hd), float("nan"), dtype=dtype, device=device)  # every row written
        got = fused.rope_attention_decode(qkv, table, positions, *caches, heads, kv, length, window, qk_norm,
                                          out=poisoned)
        what = f"heads {heads} kv {kv} hd {hd} pos {pos} batch {batch} window {window} qk norm {qk}"
        assert launches.count == (fused.decode_attention_route(length, heads, kv, hd, window) == "long"), what
        torch.testing.assert_close(got.float().cpu(), want, atol=out_atol, rtol=tol, msg=lambda m: f"{what}: {m}")
        for c, r in zip(caches, ref):
            torch.testing.assert_close(c[:, :, pos].float().cpu(), r[:, :, pos], atol=tol, rtol=tol, msg=what)
            assert c[:, :, pos + 1:].isnan().all(), f"wrote past the position, {what}"
        again = fused.rope_attention_decode(qkv, table, positions, *caches, heads, kv, L, window, qk_norm)
        assert not any(c.any() for *_, c in fused._ATTENTION_SCRATCH.values()), f"counters not reset, {what}"
        assert torch.equal(again, got), f"a longer span changed the result, {what}"
        for programs in (1, 3):  # fewer programs than blocks: each walks several, the same bits
            monkeypatch.setattr(fused, "attention_programs", lambda blocks, *_: min(blocks, programs))
            for part, ml, _ in fused._ATTENTION_SCRATCH.values():  # the blocks' sums poisoned: each must be written
                part.fill_(float("nan"))
                ml.fill_(float("nan"))
            fewer = fused.rope_attention_decode(qkv, table, positions, *caches, heads, kv, length, window, qk_norm)
            assert torch.equal(fewer, got), f"{programs} programs a head changed the result, {what}"
        monkeypatch.undo()
    with pytest.raises(ValueError, match=f"cache's {L} keys"):
        fused.rope_attention_decode(qkv, table, positions, *caches, heads, kv, L + 1)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_attention_decode_soft_cap(rng, device, monkeypatch):
    """Gemma 2's soft-capped scores in the decode attention's kernels (SOFTCAP: cap * tanh(score / cap) before the
    softmax) equal rope_kv + the torch attention with the cap (functional._capped_attention) over the masked cache:
    the per-head kernel over one block and over several (combined by the last program), batch 2, a sliding window;
    the long spans' two launches (grouped queries past 512 keys, counted); on CUDA Gemma 2 2B's and 9B's heads at
    its 50 with their window of 4,096. q is scaled to give scores about twice the cap (tanh saturates for many: the
    uncapped attention differs); the output is NaN before the call and cache rows at and past the position (and below
    a window) are NaN (never read)."""
    from spqt import functional
    from spqt.config import ModelConfig
    from spqt.kernels import fused
    from spqt.model import rope_table

    dtype = torch.float32 if device == "cpu" else torch.float16
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    # (heads, kv, hd, pos, batch, window, cap)
    cases = [(3, 3, 16, 5, 2, 0, 0.5), (4, 2, 32, 150, 1, 0, 2.0), (2, 1, 32, 100, 1, 40, 1.0),
             (4, 2, 32, 600, 1, 0, 3.0)]
    if device == "cuda":
        cases += [(8, 4, 256, 3000, 1, 4096, 50.0), (16, 8, 256, 5000, 1, 4096, 50.0), (16, 8, 256, 700, 2, 0, 50.0)]
    for heads, kv, hd, pos, batch, window, cap in cases:
        monkeypatch.setattr(fused, "ATTN_LONG_COMBINE_GROUP", 16 if device == "cpu" else fused.ATTN_LONG_COMBINE_GROUP)
        monkeypatch.setattr(fused, "_ATTENTION_SCRATCH", {})  # (a scratch of its own, as test_rope_attention_decode)
        launches = _Launches(fused._rope_attention_blocks_kernel)
        monkeypatch.setattr(fused, "_rope_attention_blocks_kernel", launches)
        L = pos + 20
        cfg = ModelConfig(vocab_size=10, dim=heads * hd, n_layers=1, n_heads=heads, n_kv_heads=kv, ffn_dim=8,
                          max_seq_len=L)
        table = rope_table(cfg, L).to(device)
        qkv = rng.standard_normal((batch, 1, (heads + 2 * kv) * hd)).astype(np.float32)
        qkv[..., :heads * hd] *= 2 * cap  # scores about N(0, (2 cap)^2)
        qkv = torch.from_numpy(qkv).to(device, dtype)
        caches = []
        for _ in range(2):
            c = torch.from_numpy(rng.standard_normal((batch, kv, L, hd)).astype(np.float32)).to(device, dtype)
            c[:, :, pos:] = float("nan")
            c[:, :, :max(0, pos - window + 1) if window else 0] = float("nan")
            caches.append(c)
        ref = [c.clone().cpu().float().nan_to_num_(0.0) for c in caches]
        positions = torch.tensor([pos], device=device)
        mask = torch.zeros((1, pos + 1))
        if window:
            mask[:, :max(0, pos - window + 1)] = float("-inf")
        twin = [qkv.cpu().float(), table.cpu(), positions.cpu()]
        want = functional.attention(*twin, *[r.clone() for r in ref], heads, kv, mask, pos + 1, softcap=cap)
        uncapped = functional.attention(*twin, *[r.clone() for r in ref], heads, kv, mask, pos + 1)
        what = f"heads {heads} kv {kv} hd {hd} pos {pos} batch {batch} window {window} cap {cap}"
        assert float((uncapped - want).abs().max()) > 0.05, f"the cap does not bite, {what}"
        poisoned = torch.full((batch, 1, heads, hd), float("nan"), dtype=dtype, device=device)
        got = fused.rope_attention_decode(qkv, table, positions, *caches, heads, kv, pos + 1, window, out=poisoned,
                                          softcap=cap)
        assert launches.count == (fused.decode_attention_route(pos + 1, heads, kv, hd, window) == "long"), what
        torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol, msg=what)
        monkeypatch.undo()
    assert any(case[3] > fused.ATTN_LONG_FROM and case[0] > case[1] and not case[5] for case in cases)  # (long)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (the interpreter's numpy on inf: invalid values, NaN slices)
@pytest.mark.parametrize("device", DEVICES)
def test_rope_attention_decode_soft_cap_keeps_an_overflow(device, monkeypatch):
    """The decode attention's soft-cap (fused._soft_cap, both kernels) leaves a non-finite score non-finite, as
    functional.soft_cap does: with RoPE the identity (a [cos | sin] table of ones and zeros), every query head's
    first element 1 and the cached keys' +inf, every score but the new key's is +inf and every head's output
    non-finite (written over zeros, so a skipped write reads as finite); the same inputs with finite keys give
    functional.attention's output. The per-head kernel and the long spans' (grouped queries past ATTN_LONG_FROM
    keys)."""
    from spqt import functional
    from spqt.kernels import fused

    dtype = torch.float32 if device == "cpu" else torch.float16
    gen = torch.Generator().manual_seed(0)
    heads, kv, hd, cap = 4, 2, 32, 2.0
    for pos in (9, fused.ATTN_LONG_FROM + 40):
        monkeypatch.setattr(fused, "_ATTENTION_SCRATCH", {})
        L = pos + 8
        table = torch.cat([torch.ones(L, hd // 2), torch.zeros(L, hd // 2)], dim=1).to(device)
        qkv = torch.randn(1, 1, (heads + 2 * kv) * hd, generator=gen).to(dtype).float()  # (the kernel's values)
        qkv[0, 0, : heads * hd : hd] = 1.0
        caches = [torch.randn(1, kv, L, hd, generator=gen).to(dtype).float() for _ in range(2)]
        positions = torch.tensor([pos], device=device)
        want = functional.attention(qkv, table.cpu(), positions.cpu(), caches[0].clone(), caches[1].clone(), heads,
                                    kv, torch.zeros(1, pos + 1), pos + 1, softcap=cap)
        for overflow in (False, True):
            k = caches[0].clone()
            if overflow:
                k[:, :, :pos, 0] = float("inf")
            out = torch.zeros((1, 1, heads, hd), dtype=dtype, device=device)
            got = fused.rope_attention_decode(qkv.to(device, dtype), table, positions, k.to(device, dtype),
                                              caches[1].to(device, dtype), heads, kv, pos + 1, 0, out=out,
                                              softcap=cap).float().cpu()
            if overflow:
                assert not bool(torch.isfinite(got).any()), f"pos {pos}"
            else:
                torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3, msg=f"pos {pos}")
        monkeypatch.undo()


def test_decode_attention_compiles_for_hopper():
    """The decode attention's three kernels compile for sm_90 here (Triton's bundled ptxas, no GPU; the interpreter
    runs none of Triton's compile-time checks: a float constexpr in an `if` ran there and failed to compile), with
    every switch on (head dim 96 in masked lanes, a window, q / k norms, a soft-cap; bf16), with none (fp16, hd 128)
    and at Gemma's hd 256 (the long kernel's 8 warps), every one without spills (scripts/attention_sass.py, in a
    process without TRITON_INTERPRET)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root / "src") + os.pathsep + env.get("PYTHONPATH", "")
    configs = ["96,bf16,windowed,qknorm,softcap", "128,fp16", "256,bf16,windowed,softcap"]
    run = subprocess.run([sys.executable, str(root / "scripts" / "attention_sass.py"), *configs], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [ln for ln in run.stdout.splitlines() if " regs, " in ln]
    assert len(lines) == 9, run.stdout
    assert all("stack 0 B" in ln for ln in lines), run.stdout
    from spqt.kernels.fused import attention_long_warps

    assert (attention_long_warps(128), attention_long_warps(256)) == (4, 8)


def test_attention_kernels_chosen_alike_by_graphs_and_eager_steps(monkeypatch):
    """A decode graph's key bucket (Generator._kv_bucket: a power of two from KV_BUCKET_MIN, the cache's length at
    most) and an eager step's span (pos + 1 keys) take the same route (fused.decode_attention_route) at every position,
    for every cache length and kind of model (grouped queries or not, head dims 16 and 128; also with the long spans'
    kernels for every model, ATTN_LONG_GROUPED_ONLY 0): the graph and the eager step run the same kernels, hence the
    same bits. So they do for a sliding layer (a tiny window, Gemma 3's 512 and 1,024, Phi-3-medium-4k's odd 2,047,
    Mistral's 4,096; the fused kernels cut the window themselves, reading its blocks alone), whose route depends on the
    keys inside its window."""
    from types import SimpleNamespace

    from spqt.generate import KV_BUCKET_MIN, Generator
    from spqt.kernels import fused

    for edge in (fused.ATTN_LONG_FROM, fused.ATTN_PER_HEAD_MAX):
        assert edge & (edge - 1) == 0 and edge >= KV_BUCKET_MIN
    top = 2 * fused.ATTN_PER_HEAD_MAX
    for grouped_only in (1, 0):
        monkeypatch.setattr(fused, "ATTN_LONG_GROUPED_ONLY", grouped_only)
        edges = [fused.ATTN_LONG_FROM + 1, fused.ATTN_PER_HEAD_MAX + 1, 4 * top + 3]
        runs = [(max_len, 0) for max_len in list(range(1, top + 70, 37)) + edges]
        runs += [(3 * top, window) for window in (5, 300, 512, 1024, 2047, 4096)]
        for max_len, window in runs:
            gen = SimpleNamespace(max_len=max_len)
            for pos in range(max_len):
                keys = Generator._kv_bucket(gen, pos)
                assert pos < keys <= max_len, (max_len, pos, keys)
                for heads, kv, hd in ((32, 8, 128), (32, 32, 128), (4, 2, 16)):
                    graph = fused.decode_attention_route(keys, heads, kv, hd, window)
                    assert graph == fused.decode_attention_route(pos + 1, heads, kv, hd, window), \
                        (max_len, window, pos, heads, kv)


def test_decode_step_routes(tmp_path, monkeypatch):
    """The tuned step routes (spqt tune --routes): keyed by the model's geometry; a level runs the route chosen at
    the highest level timed at or below it (levels stored exactly), off below them all, for a geometry never timed
    and where the entry names no route; a kernel re-tune's entries leave them out; a route must beat "off" by the
    margin; SPQT_SPARSE_KEPT's values."""
    import json

    from spqt.bench_decode import SYNTHETIC, choose_route
    from spqt.config import ModelConfig
    from spqt.kernels import gpu_linear, tuning

    key = tuning.model_key(ModelConfig(**SYNTHETIC["llama2-7b"]), "q4_k")
    assert key == "q4_k:4096x11008x32x32x128x32"
    assert tuning.model_key(ModelConfig(**SYNTHETIC["llama2-70b"]), "q4_k") == "q4_k:8192x28672x64x8x128x80"
    path = tmp_path / "table.json"
    monkeypatch.setattr(tuning, "table_path", lambda key=None: path)
    monkeypatch.setattr(tuning, "device_key", lambda: "test-gpu")
    levels = {tuning.level_key(0.3): {"route": "dense"},
              tuning.level_key(0.4): {"route": "off"}, tuning.level_key(0.5): {"route": "all"},
              tuning.level_key(0.65): {"route": "norm"}, tuning.level_key(0.123456789): {"route": "all"},
              tuning.level_key(0.8): {"route": "plain"}}
    path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION,
                                "entries": {tuning.STEP_ROUTES: {key: {"levels": levels}}}}))
    tuning._load_table.cache_clear()
    for level, route in ((0.1, "off"), (0.123456789, "all"), (0.3, "dense"), (0.35, "dense"), (0.4, "off"),
                         (0.45, "off"), (0.5, "all"), (0.6, "all"), (0.65, "norm"), (0.79, "norm"),
                         (0.9, "off")):  # 0.8 names no route of STEP_ROUTE_NAMES
        assert tuning.decode_route(key, level) == route, level
    assert tuning.decode_route("q4_k:1x2x3x4x5x6", 0.5) == "off"
    assert tuning.STEP_ROUTES not in tuning.all_entries()  # a kernel re-tune keeps only routes of untouched models
    tuning._load_table.cache_clear()
    assert choose_route({"off": 100.0, "norm": 100.9, "all": 100.5}) == "off"  # within the margin
    assert choose_route({"off": 100.0, "norm": 103.0, "all": 106.0}) == "all"
    assert choose_route({"off": 106.4, "norm": 104.1, "all": 102.0}) == "off"
    # timed against the dense step: a sparse route must beat it by the margin too, else the level runs dense
    assert choose_route({"off": 100.0, "norm": 103.0, "all": 106.0, "dense": 104.0}) == "all"
    assert choose_route({"off": 100.0, "norm": 103.0, "all": 106.0, "dense": 105.5}) == "dense"
    assert choose_route({"off": 100.0, "norm": 100.5, "all": 100.2, "dense": 99.5}) == "dense"  # off +0.5 %
    assert choose_route({"off": 101.0, "norm": 100.5, "all": 100.2, "dense": 99.5}) == "off"
    for value, setting in (("", None), ("0", "off"), ("off", "off"), ("1", "all"), ("all", "all"), ("norm", "norm"),
                           ("plain", "plain"), ("table", "table"), ("dense", "dense"), ("junk", "off")):
        monkeypatch.setenv("SPQT_SPARSE_KEPT", value)
        assert gpu_linear.kept_setting() == setting, value


def test_tune_routes_times_each_route_and_merges(tiny_hf, tiny_spqt, tmp_path, monkeypatch, capsys):
    """spqt tune --routes (no GPU here: the child runs faked): a child per route and round with SPQT_SPARSE_KEPT
    naming the route, the median of the rounds decides; the table keeps the kernel entries and the levels timed
    before; a model the child skips (not zigzag) or whose rows carry other types is one error line; a synthetic model
    runs each of --types (its routes keyed by type), a file its own types (a mix's included), never with --types."""
    import json
    from argparse import Namespace

    import torch

    from spqt import bench_decode
    from spqt.cli import main
    from spqt.kernels import tuning

    rates = {(0.4, "off"): [100.0, 100.0, 100.0], (0.4, "norm"): [90.0, 130.0, 91.0],
             (0.4, "all"): [104.0, 102.0, 103.0], (0.4, "dense"): [100.5, 101.0, 99.0],
             (0.5, "off"): [95.0] * 3, (0.5, "norm"): [96.0] * 3, (0.5, "all"): [99.0] * 3}
    asked = []

    def child(args, model, fmt, layout, level, log, env=None):
        asked.append((model, level, env["SPQT_SPARSE_KEPT"]))
        if model == "row.spqt":
            return {"rows": [], "copy_gbps": 1.0}
        if model == "q6k.spqt":
            return {"rows": [{"tokens_per_s": 1.0, "model_key": "q6_k:" + model, "type": "q6_k"}], "copy_gbps": 1.0}
        return {"rows": [{"tokens_per_s": rates[level, env["SPQT_SPARSE_KEPT"]].pop(0), "model_key": "q4_k:" + model,
                          "type": "q4_k"}], "copy_gbps": 1.0}

    monkeypatch.setattr(bench_decode, "_row_in_child", child)
    args = Namespace(prompt_tokens=10, new_tokens=16, head="auto")
    found = bench_decode.tune_routes(args, [("m", "q4_k")], [0.4, 0.5], rounds=3, log=lambda line: None)
    # a round: the dense step once (at the first level: the same step at every level), then each level's routes
    assert asked == ([("m", 0.4, "dense")] + [("m", lv, r) for lv in (0.4, 0.5) for r in ("off", "norm", "all")]) * 3
    # 0.4: medians 100, 91, 103 (means 100, 103.7, 103; fastest rounds 100, 130, 104): the median's choice, which
    # beats the dense step's median 100.5 by the margin; 0.5: "all" (99) beats off but not the dense step: dense
    levels = found["q4_k:m"]["levels"]
    assert levels["0.4"]["route"] == "all" and levels["0.5"]["route"] == "dense"
    assert levels["0.5"]["tokens_per_s"] == {"off": 95.0, "norm": 96.0, "all": 99.0, "dense": 100.5}
    for other in ("row.spqt", "q6k.spqt"):  # the child skips a row model; another type's rows carry its type
        with pytest.raises(bench_decode.SpqtError, match="not a zigzag q4_k model"):
            bench_decode.tune_routes(args, [(other, "q4_k")], [0.5], rounds=1, log=lambda line: None)
    q6k_found = bench_decode.tune_routes(args, [("q6k.spqt", "q6_k")], [0.5], rounds=1, log=lambda line: None)
    assert list(q6k_found) == ["q6_k:q6k.spqt"]
    # the command: the old table's kernel entries and other levels kept, this level replaced
    path = tuning.user_table_path("test-gpu")  # the table in use, which spqt tune rewrites (conftest: SPQT_TUNED)
    monkeypatch.setattr(tuning, "device_key", lambda: "test-gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test-gpu")
    monkeypatch.setattr(tuning, "sm_count", lambda: 132)  # (torch.cuda "available" here, no device properties)
    kernels = {"zigzag_dense": {"64x64": {"split": 2, "num_warps": 4, "chunks": 1}}}
    old = {"q4_k:m": {"model": "m", "levels": {"0.4": {"route": "norm"}, "0.5": {"route": "off"}}}}
    path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION,
                                "entries": {**kernels, tuning.STEP_ROUTES: old}}))
    tuning._load_table.cache_clear()
    timed = []
    monkeypatch.setattr(bench_decode, "tune_routes", lambda args, models, levels, rounds: timed.append(models) or {
        "q4_k:m": {"model": "m", "levels": {"0.5": {"route": "all", "rounds": rounds}}}})
    assert main(["tune", "--routes", str(tiny_spqt), "--route-levels", "0.5", "--route-rounds", "2"]) == 0
    assert timed == [[(str(tiny_spqt), "q4_k")]]
    entries = json.loads(path.read_text())["entries"]
    assert entries["zigzag_dense"] == kernels["zigzag_dense"]
    assert entries[tuning.STEP_ROUTES]["q4_k:m"]["levels"] == {"0.4": {"route": "norm"},
                                                               "0.5": {"route": "all", "rounds": 2}}
    # a synthetic model in each of --types; a mix's file with its own types (its metadata read, not its tensors)
    mix = save_quantized(tiny_hf, tmp_path / "mix.spqt", "q3_k_m")
    assert main(["tune", "--routes", f"synthetic:llama2-7b,{mix}", "--route-levels", "0.5"]) == 0
    assert main(["tune", "--routes", "synthetic:llama2-7b", "--types", "q2_k,q6_k", "--route-levels", "0.5"]) == 0
    assert timed[1:] == [[("synthetic:llama2-7b", "q4_k"), (str(mix), "q5_k+q4_k+q3_k")],
                         [("synthetic:llama2-7b", "q2_k"), ("synthetic:llama2-7b", "q6_k")]]
    # a row-layout file, or a file with --types: one error line before any timing
    row = save_quantized(tiny_hf, tmp_path / "row.spqt", "q6_k", "row")
    monkeypatch.setattr(bench_decode, "tune_routes", lambda *a, **k: pytest.fail("timed"))
    assert main(["tune", "--routes", str(row)]) == 2
    assert "is q6_k-row, not a zigzag model" in capsys.readouterr().err
    assert main(["tune", "--routes", str(mix), "--types", "q4_k"]) == 2
    assert "brings its own types (q5_k+q4_k+q3_k-zigzag); --types is for synthetic models" in capsys.readouterr().err
    tuning._load_table.cache_clear()


def test_types_reach_the_crossovers_the_route_children_and_the_route_lookup(tiny_hf, tmp_path, monkeypatch, capsys):
    """The weight types a run names reach what it does (no GPU here: the timing faked): --crossover-only --types hands
    them to tune_crossover (and a model's name in --shapes its fused maps, as to a kernel tune), which refuses other
    types before any timing where their CUDA GEMV does not run; a route child gets --types for a synthetic model and
    none for a file (it brings its own: bench decode refuses --types there); a model's decode steps look their route
    up under its types' key (a Q2_K model, a Q3_K_M mix)."""
    import json
    import subprocess
    from argparse import Namespace

    import spqt.bench
    from spqt import bench_decode
    from spqt.checkpoint import load_spqt
    from spqt.cli import main
    from spqt.generate import Generator
    from spqt.kernels import tuning, zigzag_cuda

    path = tuning.user_table_path("test-gpu")  # the table in use, which spqt tune rewrites (conftest: SPQT_TUNED)
    monkeypatch.setattr(tuning, "device_key", lambda: "test-gpu")
    path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION, "entries": {}}))
    tuning._load_table.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test-gpu")
    monkeypatch.setattr(zigzag_cuda, "usable", lambda *a: False)
    real = spqt.bench.tune_crossover
    seen = []
    monkeypatch.setattr(spqt.bench, "tune_crossover", lambda shapes, types: seen.append((shapes, types)) or {})
    assert main(["tune", "--crossover-only", "--types", "q2_k,q3_k", "--shapes", "256x256"]) == 0
    assert seen == [([(256, 256)], ["q2_k", "q3_k"])]
    seen.clear()  # a model's name: its maps as the runtime runs them (q|k|v and gate|up fused) too
    assert main(["tune", "--crossover-only", "--types", "q2_k", "--shapes", "llama3-8b"]) == 0
    assert {(6144, 4096), (28672, 4096)} <= set(seen[0][0])
    timed = []
    monkeypatch.setattr(spqt.bench, "tune_types", lambda shapes, fmts, kinds: timed.append(shapes) or {})
    assert main(["tune", "--types", "q6_k", "--shapes", "llama3-8b"]) == 0
    assert {(6144, 4096), (28672, 4096)} <= set(timed[0])
    monkeypatch.setattr(spqt.bench, "tune_crossover", real)
    capsys.readouterr()
    assert main(["tune", "--crossover-only", "--types", "q4_k,q2_k", "--shapes", "256x256"]) == 2
    assert "the other types' crossovers are their CUDA GEMV's, which does not run here" in capsys.readouterr().err
    # the route children's command lines
    cmds = []

    class Child:
        def __init__(self, cmd):
            cmds.append(cmd)
            with open(cmd[cmd.index("--json") + 1], "w") as f:
                json.dump({"rows": [], "copy_gbps": 1.0}, f)
            self.stdout = iter(())

        def wait(self):
            return 0

        def poll(self):
            return 0

    real_popen = subprocess.Popen  # (other processes, e.g. the platform module's, run as they would)
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, *a, **kw: Child(cmd) if "spqt.cli" in cmd
                        else real_popen(cmd, *a, **kw))
    args = Namespace(prompt_tokens=10, new_tokens=16, head="auto")
    for model in ("synthetic:llama2-7b", "m.spqt"):
        bench_decode._row_in_child(args, model, "q2_k", "zigzag", 0.5, log=lambda line: None)
    assert cmds[0][cmds[0].index("--types") + 1] == "q2_k" and "--types" not in cmds[1]
    # the route a model's steps run: looked up under its types
    routes = {}
    monkeypatch.setattr(tuning, "table_entries", lambda variant: routes if variant == tuning.STEP_ROUTES else {})
    monkeypatch.setattr(Generator, "kept_possible", lambda self: True)
    for fmt, types in (("q2_k", "q2_k"), ("q3_k_m", "q5_k+q4_k+q3_k")):
        loaded = load_spqt(save_quantized(tiny_hf, tmp_path / f"{fmt}.spqt", fmt))
        routes.clear()
        geometry = tuning.model_key(loaded.config, "q4_k").split(":")[1]
        routes[f"{types}:{geometry}"] = {"levels": {"0.5": {"route": "all"}}}
        gen = Generator(loaded, "cpu")
        gen.set_sparsity(0.5, table=torch.full((loaded.config.n_layers, 4), 0.1), criterion="teal")
        assert gen.kept_route == "all", fmt
    tuning._load_table.cache_clear()


def test_tune_l2first_judges_each_shape_in_the_step(tmp_path, monkeypatch, capsys):
    """spqt tune --l2first (no GPU here: the step's timing faked): each CUDA dense shape with an entry of its own judged
    once over models, depths capped by the chunks a warp's share holds (none judged at one chunk, nor a borrowed entry,
    nor a Triton entry that a bf16 map runs on the CUDA GEMV), the shapes judged before running their new depth
    meanwhile and every map left as tuned after; the depth kept only beyond the margin, the shallowest within it of the
    best; the command keeps the kernel entries and the routes; a kernel re-tune that replaces a prefetching entry says
    so and drops only the step routes of models that now run another config (own or borrowed entry)."""
    import json
    from types import SimpleNamespace as NS

    import torch

    from spqt import bench_decode
    from spqt.cli import main
    from spqt.kernels import tuning

    cuda = {"impl": "cuda", "num_warps": 4, "chunks": 1}
    triton = {"impl": "triton", "num_warps": 2, "chunks": 1, "split": 4}
    # chunks a warp (64 columns a step of 4 warps): 768x256 split 1: 4; 256x256 split 2: 2; 256x512 split 8: 1
    own = {"768x256": cuda | {"split": 1}, "256x256": cuda | {"split": 2}, "256x512": cuda | {"split": 8},
           "1536x256": cuda | {"split": 1}, "1024x256": triton}
    shapes = {"synthetic:a": {"qkv": (768, 256), "o": (256, 256), "gate_up": (1024, 256), "down": (256, 512)},
              "synthetic:b": {"qkv": (640, 256), "o": (256, 256), "gate_up": (1536, 256), "down": (256, 512)}}
    path = tuning.user_table_path("test-gpu")  # the table in use, which spqt tune rewrites (conftest: SPQT_TUNED)
    monkeypatch.setattr(tuning, "device_key", lambda: "test-gpu")
    path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION, "entries": {"zigzag_dense": own}}))
    tuning._load_table.cache_clear()

    def model(name):
        def impl(kind):
            n, k = shapes[name][kind]
            # a's gate|up: its Triton entry as a bf16 map runs it (gpu_linear.bf16_on_cuda); b's 640x256 borrows a
            # neighbour's CUDA entry
            cfg = triton | {"impl": "cuda"} if kind == "gate_up" and name == "synthetic:a" else own.get(
                f"{n}x{k}", cuda | {"split": 1})
            return NS(n=n, k=k, cfg_dense=dict(cfg))
        return NS(layers=[NS(attention=NS(qkv=NS(impl=impl("qkv")), o=NS(impl=impl("o"))),
                             feed_forward=NS(gate_up=NS(impl=impl("gate_up")), down=NS(impl=impl("down"))))
                          for _ in range(2)])

    def maps(gen):
        return [m.impl for b in gen.model.layers
                for m in (b.attention.qkv, b.attention.o, b.feed_forward.gate_up, b.feed_forward.down)]

    gens = {}
    monkeypatch.setattr(bench_decode, "probe_generator", lambda name: (gens.setdefault(name, NS(model=model(name))), [1]))
    gain = {"768x256": {1: +5.0, 2: +9.0, 3: +20.0}, "256x256": {1: -10.0},
            "1536x256": {1: -6.0, 2: -7.0, 3: -1.0}}  # b's gate|up: 2 fastest, 1 within the margin of it
    runs = []

    def steps(gen, prompt, setups, rounds, reps):
        out = {}
        for depth, configure in setups.items():
            configure()
            on = {(f"{m.n}x{m.k}", m.cfg_dense["l2first"]) for m in maps(gen) if m.cfg_dense.get("l2first")}
            runs.append((depth, on))
            out[depth] = [1000.0 + sum(gain[shape][d] for shape, d in on)] * rounds
        return out

    monkeypatch.setattr(bench_decode, "alternating_step_us", steps)
    before = {name: [dict(m.cfg_dense) for m in maps(NS(model=model(name)))] for name in shapes}
    lines = []
    found = bench_decode.tune_l2first(["synthetic:a", "synthetic:b"], rounds=3, log=lines.append)
    assert [d for d, _ in runs] == [0, 1, 2, 3, 0, 1, 0, 1, 2, 3], "768x256, 256x256 in a; 1536x256 in b"
    assert {s: f["l2first"] for s, f in found.items()} == {"768x256": 0, "256x256": 1, "1536x256": 1}
    assert found["256x256"]["step_us"] == {"0": 1000.0, "1": 990.0} and found["256x256"]["model"] == "synthetic:a"
    assert all(("256x256", 1) in on for _, on in runs[6:]), "a's judged o ran its new depth while b's were judged"
    assert all(len(on - {("256x256", 1)}) <= 1 for _, on in runs), "more than the judged shape prefetched"
    assert any("256x512: not judged (a warp's share is one chunk)" in line for line in lines)
    assert any("640x256: not judged (no entry of its own" in line for line in lines)
    assert {name: [m.cfg_dense for m in maps(gens[name])] for name in shapes} == before, "the maps left as tuned"
    # the command: kernel entries and routes kept, the depth and its timing saved per shape
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test-gpu")
    monkeypatch.setattr(tuning, "sm_count", lambda: 132)  # (torch.cuda "available" here, no device properties)
    dense = {"256x256": {"split": 2, "num_warps": 4, "chunks": 1, "impl": "cuda"},
             "768x256": {"split": 1, "num_warps": 4, "chunks": 1, "impl": "cuda", "l2first": 2}}
    # tiny runs 256x256 (its o map); mid's 768x512 maps run the nearest N of K 512 (one entry: 256x512); the 7B none
    tiny, mid, big = "q4_k:256x768x4x2x64x2", "q4_k:512x256x4x2x64x2", "q4_k:4096x11008x32x32x128x32"
    assert tuning.model_shapes(tiny) == [(512, 256), (256, 256), (1536, 256), (256, 768)]
    q2k_tiny = "q2_k:" + tiny.split(":")[1]  # the same geometry in Q2_K, with an entry of its own type
    routes = {key: {"model": "m", "levels": {"0.5": {"route": "all"}}}
              for key in (tiny, q2k_tiny, mid, big, "q4_k:junk", "m")}
    path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION,
                                "entries": {"zigzag_dense": dense | {"256x512": cuda | {"split": 3}},
                                            "zigzag_dense_q2_k": {"256x256": cuda | {"split": 5}},
                                            tuning.STEP_ROUTES: routes}}))
    tuning._load_table.cache_clear()
    monkeypatch.setattr(bench_decode, "tune_l2first", lambda models: {
        "256x256": {"l2first": 1, "step_us": {"0": 1000.0, "1": 990.0}, "model": models[0]},
        "768x256": {"l2first": 0, "step_us": {"0": 1000.0, "1": 1005.0}, "model": models[0]}})
    assert main(["tune", "--l2first", "synthetic:llama2-7b"]) == 0
    entries = json.loads(path.read_text())["entries"]
    assert entries["zigzag_dense"]["256x256"] == dense["256x256"] | {"l2first": 1,
                                                                      "l2first_step_us": {"0": 1000.0, "1": 990.0}}
    assert "l2first" not in entries["zigzag_dense"]["768x256"] and entries[tuning.STEP_ROUTES] == routes
    assert tuning.launch_args(entries["zigzag_dense"]["256x256"])["extra"] == ("-DL2FIRST=1",)
    for bad in ("model.spqt", "synthetic:nope"):  # checked before any timing
        assert main(["tune", "--l2first", bad]) == 2
        assert "--l2first needs synthetic models" in capsys.readouterr().err
    # a kernel re-tune (the fake returns more shapes than asked): 256x256 the same config without its depth, 256x512
    # another split
    tuning._load_table.cache_clear()
    import spqt.bench

    monkeypatch.setattr(spqt.bench, "tune", lambda shapes, variants: {"zigzag_dense": {
        "256x256": dense["256x256"] | {"us": 9.0}, "256x512": cuda | {"split": 8}, "768x256": dense["768x256"]}})
    assert main(["tune", "--shapes", "256x256"]) == 0
    err = capsys.readouterr().err
    assert "L2 prefetch depths of the shapes whose entries this replaced (256x256) are dropped" in err
    # tiny: only its depth and a timing changed (the routes ignore both; its Q2_K twin's own entries did not change
    # either); mid borrows 256x512's changed entry
    assert "decode-step routes of m, q4_k:512x256x4x2x64x2, q4_k:junk were timed" in err
    entries = json.loads(path.read_text())["entries"]
    assert "l2first" not in entries["zigzag_dense"]["256x256"]
    assert sorted(entries[tuning.STEP_ROUTES]) == sorted([tiny, q2k_tiny, big])
    with pytest.raises(ValueError, match="l2first must be a chunk count"):
        tuning.launch_args({"num_warps": 4, "chunks": 1, "l2first": True})
    tuning._load_table.cache_clear()


def test_tune_pairs_judges_each_shape_in_the_step(tmp_path, monkeypatch, capsys):
    """spqt tune --pairs (no GPU here: the step's timing faked): each CUDA dense shape with an entry of its own at 8 or
    2 accumulators judged once, pairs on against off (the entry's setting first), the shapes judged before running
    their choice meanwhile and every map left as tuned after; the entry's setting kept unless the other beats it
    beyond the margin (pairs turned off where the entry had them and they lose); the command keeps the other keys and the routes, saves the choice and its step
    timings; a kernel re-tune that replaces step-judged pairs says so."""
    import json
    from types import SimpleNamespace as NS

    import torch

    from spqt import bench_decode
    from spqt.cli import main
    from spqt.kernels import tuning

    cuda = {"impl": "cuda", "num_warps": 4, "chunks": 1, "split": 2}
    own = {"768x256": cuda | {"acc": 2}, "256x256": cuda | {"acc": 16}, "1024x256": cuda | {"acc": 8, "pairs": True},
           "256x512": cuda | {"acc": 2, "l2first": 1}}
    shapes = {"qkv": (768, 256), "o": (256, 256), "gate_up": (1024, 256), "down": (256, 512)}
    path = tuning.user_table_path("test-gpu")  # the table in use, which spqt tune rewrites (conftest: SPQT_TUNED)
    monkeypatch.setattr(tuning, "device_key", lambda: "test-gpu")
    routes = {"q4_k:256x768x4x2x64x2": {"model": "m", "levels": {"0.5": {"route": "all"}}}}
    path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION,
                                "entries": {"zigzag_dense": own, tuning.STEP_ROUTES: routes}}))
    tuning._load_table.cache_clear()

    def impl(kind):
        n, k = shapes[kind]
        return NS(n=n, k=k, cfg_dense=dict(own[f"{n}x{k}"]))

    model = NS(layers=[NS(attention=NS(qkv=NS(impl=impl("qkv")), o=NS(impl=impl("o"))),
                          feed_forward=NS(gate_up=NS(impl=impl("gate_up")), down=NS(impl=impl("down"))))
                       for _ in range(2)])
    maps = [m.impl for b in model.layers for m in (b.attention.qkv, b.attention.o, b.feed_forward.gate_up,
                                                    b.feed_forward.down)]
    before = [dict(m.cfg_dense) for m in maps]
    monkeypatch.setattr(bench_decode, "probe_generator", lambda name: (NS(model=model), [1]))
    gain = {"768x256": -20.0, "1024x256": +8.0, "256x512": -2.0}  # us a step with pairs on (1,000 us: margin 5 us)
    runs = []

    def steps(gen, prompt, setups, rounds, reps):
        out = {}
        for option, configure in setups.items():
            configure()
            on = {f"{m.n}x{m.k}" for m in maps if m.cfg_dense.get("pairs")}
            runs.append((option, on))
            out[option] = [1000.0 + sum(gain[shape] for shape in on)] * rounds
        return out

    monkeypatch.setattr(bench_decode, "alternating_step_us", steps)
    lines = []
    found = bench_decode.tune_pairs(["synthetic:a"], rounds=3, log=lines.append)
    assert [o for o, _ in runs] == [False, True, True, False, False, True], "qkv, gate|up (pairs first), down"
    assert {s: f["pairs"] for s, f in found.items()} == {"768x256": True, "1024x256": False, "256x512": False}
    assert found["768x256"]["step_us"] == {"0": 1008.0, "1": 988.0}, "gate|up still on as the table has it"
    assert all("768x256" in on for _, on in runs[2:]) and all("1024x256" not in on for _, on in runs[4:])
    assert any("256x256: not judged (its accumulator count has no tile pairs)" in line for line in lines)
    assert [m.cfg_dense for m in maps] == before, "the maps left as tuned"
    # the command: the choices and their timings saved, the other keys (L2 depth) and the routes kept
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test-gpu")
    monkeypatch.setattr(tuning, "sm_count", lambda: 132)  # (torch.cuda "available" here, no device properties)
    monkeypatch.setattr(bench_decode, "tune_pairs", lambda models: found)
    assert main(["tune", "--pairs", "synthetic:llama2-7b"]) == 0
    entries = json.loads(path.read_text())["entries"]
    dense = entries["zigzag_dense"]
    assert dense["768x256"] == own["768x256"] | {"pairs": True, "pairs_step_us": {"0": 1008.0, "1": 988.0}}
    # within the margin the entry's own setting stays, on or off (off the reference turned the 70B's pairs off)
    assert bench_decode.choose_pairs({True: 1003.0, False: 1000.0}, True) is True
    assert bench_decode.choose_pairs({True: 997.0, False: 1000.0}, False) is False
    assert bench_decode.choose_pairs({True: 1006.0, False: 1000.0}, True) is False
    assert "pairs" not in dense["1024x256"] and dense["256x512"]["l2first"] == 1 and "pairs" not in dense["256x512"]
    assert dense["256x256"] == own["256x256"] and entries[tuning.STEP_ROUTES] == routes
    assert tuning.launch_args(dense["768x256"])["extra"] == ("-DPAIRS=1",)
    for bad in ("model.spqt", "synthetic:nope"):  # checked before any timing
        assert main(["tune", "--pairs", bad]) == 2
        assert "--pairs needs synthetic models" in capsys.readouterr().err
    assert bench_decode.choose_l2first({0: 1000.0, 1: 990.0, 2: 940.0}) == 2
    assert bench_decode.choose_l2first({0: 900.0, 1: 1000.0, 2: 1000.0}, reference=2) == 0  # another reference
    assert bench_decode.choose_l2first({0: 1000.0, 1: 997.0}) == 0
    assert main(["tune", "--pairs", "synthetic:llama2-7b", "--l2first", "synthetic:llama2-7b"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    # a route depends on an entry's pairs, not on their step timings
    key, entry = "q4_k:256x768x4x2x64x2", cuda | {"acc": 2}  # its maps: 512x256, 256x256, 1536x256, 256x768
    before = {"zigzag_dense": {"256x256": entry}}
    assert not tuning.route_touched(key, before, {"zigzag_dense": {"256x256": entry | {"pairs_step_us": {"0": 1.0}}}})
    assert tuning.route_touched(key, before, {"zigzag_dense": {"256x256": entry | {"pairs": True}}})
    # another type's or a mix's route also depends on its types' own entries (a Q2_K tune leaves Q4_K's routes)
    q2k = {"zigzag_dense_q2_k": {"256x256": entry | {"split": 3}}}
    for types, touched in (("q4_k", False), ("q2_k", True), ("q6_k+q2_k", True), ("q6_k+q4_k", False)):
        assert tuning.route_touched(f"{types}:256x768x4x2x64x2", before, before | q2k) == touched, types
    # a kernel re-tune of a shape drops its step-judged pairs and says so; the other shapes keep theirs
    tuning._load_table.cache_clear()
    import spqt.bench

    monkeypatch.setattr(spqt.bench, "tune",
                        lambda shapes, variants: {"zigzag_dense": {"768x256": cuda | {"acc": 2, "us": 9.0}}})
    assert main(["tune", "--shapes", "768x256"]) == 0
    assert "tile pairs judged in whole decode steps of 768x256 are replaced" in capsys.readouterr().err
    retuned = json.loads(path.read_text())["entries"]["zigzag_dense"]
    assert retuned["1024x256"] == dense["1024x256"] and retuned["256x512"] == dense["256x512"], "the others kept"
    tuning._load_table.cache_clear()


def test_tune_model_times_its_maps_and_keeps_the_table(tiny_hf, tiny_spqt, tmp_path, monkeypatch, capsys):
    """spqt tune --model (no GPU here: the timing faked): a mixed .spqt's maps, each type on its own shapes as stored
    with the variants it runs (Q4_K's zigzag maps dense and sparse through tune, Q6_K's through tune_types, the Q6_K
    head dense only; a row model's Q4_K maps row_dense); by default only the maps the table has no entries for,
    --retune all; the entries timed replace theirs and every other entry stays; the routes note for a zigzag model (a
    mix's included); generate's note on the maps without entries, gone after; bad uses get one clear error before any
    timing."""
    import json

    import torch

    import spqt.bench
    from spqt.cli import main
    from spqt.config import ModelConfig
    from spqt.kernels import tuning

    def saved(name, fmt, layout):
        return str(save_quantized(tiny_hf, tmp_path / name, fmt, layout))

    mix = saved("mix.spqt", "q4_k_m", "zigzag")  # layer 1's q|k|v and down q6_k, the head q6_k
    cfg = json.loads((tiny_hf / "config.json").read_text())
    c = ModelConfig(vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                    n_heads=cfg["num_attention_heads"], n_kv_heads=cfg["num_key_value_heads"],
                    ffn_dim=cfg["intermediate_size"])
    qkv, o, gate_up, down = c.map_shapes()
    key = lambda shape: f"{shape[0]}x{shape[1]}"  # noqa: E731
    path = tuning.user_table_path("test-gpu")  # the table in use, which spqt tune rewrites (conftest: SPQT_TUNED)
    monkeypatch.setattr(tuning, "device_key", lambda: "test-gpu")
    cuda = {"impl": "cuda", "num_warps": 4, "chunks": 1, "split": 2}
    crossed = {"crossover": None, "crossover_fused": 0.5}  # a sparse entry's measured crossovers (bench.crossover)
    # o has Q4_K entries of its own (not timed by default); the rest of the table is other shapes and types
    other = {"zigzag_dense": {"999x256": cuda | {"us": 1.0}, key(o): cuda | {"us": 8.8}},
             "zigzag_sparse": {key(o): cuda | crossed | {"us": 9.9}},
             "zigzag_dense_q6_k": {"999x256": cuda | {"us": 2.0}}, "zigzag_dense_q2_k": {key(qkv): cuda | {"us": 3.0}}}

    def start_table():
        path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION, "entries": other}))
        tuning._load_table.cache_clear()

    calls = []

    def fake_tune(shapes, variants):
        calls.append(("q4_k", tuple(variants), sorted(shapes)))
        return {v: {key(s): cuda | (crossed if "sparse" in v else {}) | {"us": 5.0} for s in shapes} for v in variants}

    def fake_tune_types(shapes, types, kinds):
        calls.append((tuple(types), tuple(kinds), sorted(shapes)))
        return {f"zigzag_{kind}_{t}": {key(s): cuda | (crossed if kind == "sparse" else {}) | {"us": 6.0}
                                       for s in shapes} for t in types for kind in kinds}

    monkeypatch.setattr(spqt.bench, "tune", fake_tune)
    monkeypatch.setattr(spqt.bench, "tune_types", fake_tune_types)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test-gpu")
    monkeypatch.setattr(tuning, "sm_count", lambda: 132)  # (torch.cuda "available" here, no device properties)
    start_table()
    from spqt.bench import untuned_note
    from spqt.checkpoint import load_spqt

    note = untuned_note(load_spqt(mix))  # what generate and serve say on CUDA before the tune
    assert note.startswith("6 of this model's map shapes have no tuned config") and f"tune --model {mix}" in note
    # a GGUF or an HF folder (quantized as it loads: no .spqt to name): the types and shapes to time, all of them
    import dataclasses
    import re

    from spqt.bench import parse_shapes

    as_gguf = dataclasses.replace(load_spqt(mix), path=tmp_path / "mix.gguf")
    found = re.search(r": spqt tune --types (\S+) --shapes (\S+) times them$", untuned_note(as_gguf))
    assert found and found[1] == "q4_k,q6_k", untuned_note(as_gguf)
    assert set(parse_shapes(found[2])) == {qkv, gate_up, down, (c.vocab_size, c.dim)}, found[2]
    assert main(["tune", "--model", mix]) == 0
    assert untuned_note(load_spqt(mix)) is None
    head = (c.vocab_size, c.dim)
    assert {(t, v, tuple(s)) for t, v, s in calls} == {
        ("q4_k", ("zigzag_dense", "zigzag_sparse"), tuple(sorted([qkv, gate_up, down]))),  # (o has entries)
        (("q6_k",), ("dense", "sparse"), tuple(sorted([qkv, down]))), (("q6_k",), ("dense",), (head,))}
    assert len(calls) == 3
    err = capsys.readouterr().err
    assert "maps that have entries of their own keep them" in err and f"tune --routes {mix} then" in err  # a mix too
    entries = json.loads(path.read_text())["entries"]
    for name, by_shape in other.items():  # the shapes and types not timed keep their entries
        assert entries[name] | by_shape == entries[name], name
    assert entries["zigzag_sparse"][key(down)]["us"] == 5.0 and entries["zigzag_dense_q6_k"][key(head)]["us"] == 6.0
    assert entries["zigzag_dense"][key(down)]["fallback"] == tuning.default_config("zigzag_dense", *down)  # no GPU
    assert key(head) not in entries.get("zigzag_sparse_q6_k", {})  # the head never runs sparse
    assert "row_dense" not in entries  # no row map
    # --retune: o too; all timed already: nothing to do
    calls.clear()
    start_table()
    assert main(["tune", "--model", mix, "--retune"]) == 0
    assert ("q4_k", ("zigzag_dense", "zigzag_sparse"), sorted([qkv, o, gate_up, down])) in calls
    calls.clear()
    import spqt.checkpoint
    from spqt.errors import SpqtError

    def read_only(path):
        raise SpqtError(f"cannot write {path}: Read-only file system")

    with monkeypatch.context() as m:  # nothing to time: no table written, so none checked (a read-only folder)
        m.setattr(spqt.checkpoint, "check_writable", read_only)
        assert main(["tune", "--model", mix]) == 0 and not calls
        assert f"has entries of its own in this GPU's table ({path})" in capsys.readouterr().err
        assert main(["tune", "--model", mix, "--retune"]) == 2 and not calls  # something to time: refused first
        assert "Read-only file system (this GPU's user table: set SPQT_TUNED" in capsys.readouterr().err
    # o's sparse entry from a table tuned before crossovers were measured (the H100's of 2026-11-23): o runs sparse at
    # every level, so the note names it and the tune times it
    other["zigzag_sparse"][key(o)] = cuda | {"us": 9.9}
    start_table()
    entries = json.loads(path.read_text())["entries"]
    for variant in ("zigzag_dense", "zigzag_sparse"):
        entries[variant] = {key(s): cuda | (crossed if "sparse" in variant else {}) | {"us": 5.0}
                            for s in (qkv, o, gate_up, down)}
    entries["zigzag_sparse"][key(o)] = cuda | {"us": 9.9}
    entries.update({v: other[v] for v in other if v not in ("zigzag_dense", "zigzag_sparse")})
    mixed = json.loads(path.read_text()) | {"entries": entries}
    path.write_text(json.dumps(mixed))
    tuning._load_table.cache_clear()
    assert tuning.uncrossed({("q4_k", ("zigzag_dense", "zigzag_sparse")): [qkv, o]}) == {
        ("q4_k", ("zigzag_dense", "zigzag_sparse")): [o]}
    note = untuned_note(load_spqt(mix))
    assert f"have no measured crossover on this GPU (q4_k {key(o)}): at any sparsity they run sparse" in note, note
    dense_note = untuned_note(load_spqt(mix), sparse=False)  # a dense run: nothing runs sparse (the q6_k maps here
    assert "crossover" not in dense_note and key(o) not in dense_note, dense_note  # have no entries: still named)
    # the tuner measures another type's crossover only where the CUDA GEMV runs it (tune_types): a Triton entry
    # without one is tuned
    assert tuning.measured("zigzag_sparse_q6_k", {"num_warps": 4, "split": 2})
    assert not tuning.measured("zigzag_sparse_q6_k", cuda) and not tuning.measured("zigzag_sparse", {"split": 2})
    assert tuning.measured("zigzag_dense", cuda) and not tuning.measured("zigzag_dense", None)
    calls.clear()
    assert main(["tune", "--model", mix]) == 0
    assert ("q4_k", ("zigzag_dense", "zigzag_sparse"), [o]) in calls
    # a zigzag Q4_K model: the routes note (with --output); a row model's Q4_K maps: row_dense, no routes note
    start_table()
    assert main(["tune", "--model", str(tiny_spqt), "--output", str(tmp_path / "out.json")]) == 0
    err = capsys.readouterr().err  # (the routes run times against the table in use: the note says so)
    assert f"tune --routes {tiny_spqt} then" in err and f"copy {tmp_path / 'out.json'} to {path} first" in err
    calls.clear()
    start_table()
    assert main(["tune", "--model", saved("row.spqt", "q4_k", "row")]) == 0
    # (its Q6_K head is row too: dequantize + cuBLAS, not timed)
    assert {(v, tuple(s)) for _, v, s in calls} == {(("row_dense",), tuple(sorted([qkv, o, gate_up, down])))}
    assert "tune --routes" not in capsys.readouterr().err
    # bad uses, each one line before any timing
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    junk = tmp_path / "junk.spqt"
    junk.write_bytes(bytes(range(256)) * 4)
    calls.clear()
    for argv, message in ((["--model", mix, "--shapes", "64x64"], "leave out --shapes and --types"),
                          (["--model", mix, "--types", "bogus"], "leave out --shapes and --types"),
                          (["--model", mix, "--routes", mix], "are runs of their own"),
                          (["--model", str(gguf)], "quantize it first"),
                          (["--model", str(tiny_hf)], "quantize it first"),
                          (["--model", str(tmp_path / "none.spqt")], "no such file"),
                          (["--model", str(junk)], "not a valid .spqt file"),
                          (["--model", ","], "--model needs .spqt files"),
                          (["--model", saved("row6.spqt", "q6_k", "row")], "no maps on the tuned kernels"),
                          (["--retune"], "--retune goes with --model"),
                          (["--shapes", ","], "--shapes needs NxK or names"),
                          (["--types", ""], "unknown GEMV types")):
        assert main(["tune", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("spqt: error:") and message in err[0], (argv, err)
    assert not calls
    tuning._load_table.cache_clear()


def test_bench_times_a_shapes_first_sequence_twice(monkeypatch):
    """bench.shape_timer: the first sequence of a shape is timed once untimed (10 replays), then timed; later sequences
    once; what it returns is the timed run's."""
    from spqt import bench

    runs = []

    def fake_time_graph(seq, replays=30, warmup=5):
        runs.append((seq, replays, warmup))
        return float(len(runs))

    monkeypatch.setattr(bench, "time_graph", fake_time_graph)
    timed = bench.shape_timer()
    assert timed(["b2"]) == 2.0 and timed(["b4"]) == 3.0
    assert runs == [(["b2"], 10, 2), (["b2"], 30, 5), (["b4"], 30, 5)]
    assert bench.shape_timer()(["next shape"]) == 5.0 and runs[-2] == (["next shape"], 10, 2)


def test_tuning_configs_and_stale_tables(tmp_path, monkeypatch):
    """Every config the tuner may pick is launchable (row: 4 words per thread, block >= 4 * warps;
    zigzag: 1-8 warps, 1 <= split <= K); a table written for another kernel version is ignored
    (defaults apply), a current one is used."""
    import json

    from spqt.kernels import tuning, zigzag_cuda

    for n, k in [(4096, 4096), (28672, 8192), (576, 192)]:
        monkeypatch.setattr(tuning, "_cuda_usable", lambda: False)  # the Triton candidates alone (a GPU adds CUDA's)
        for c in tuning.candidates("zigzag_dense", n, k) + [tuning.default_config("zigzag_dense", n, k)]:
            assert c["num_warps"] in (1, 2, 4, 8) and 1 <= c["split"] <= k and c["chunks"] in (1, 2)
            assert c["ahead"] in (0, 1) and c["acc"] in (2, 4, 16) and c["pipe"] in (0, 1)
            assert not (c["pipe"] and c["chunks"] != 1)  # gemv_zigzag refuses pipe with 2 chunks
            assert tuning.launch_args(c) == {key: c.get(key, 0) for key in ("num_warps", "chunks", "maxnreg", "ahead",
                                                                            "acc", "pipe")} | {"impl": "triton",
                                                                                               "fused": False,
                                                                                               "cluster": False,
                                                                                               "extra": ()}
        monkeypatch.setattr(tuning, "_cuda_usable", lambda: True)  # the configs a GPU machine would time
        monkeypatch.setattr(zigzag_cuda, "clusters_run", lambda device: True)  # an sm_90 one
        # the H200's programs an SM (4 warps: 7 with 2 accumulators, 72 registers; 4 with 16, 125)
        monkeypatch.setattr(zigzag_cuda, "programs_per_sm", lambda warps, mode, acc, bits, pairs=False: {2: 14, 4: 7, 8: 3}[warps]
                            if acc == 2 else {2: 8, 4: 4, 8: 2}[warps])
        monkeypatch.setattr(tuning, "sm_count", lambda: 132)
        cuda_configs = tuning.cuda_candidates("zigzag_dense", n, k) + tuning.cuda_candidates("zigzag_sparse", n, k)
        fitting = tuning.cuda_candidates("zigzag_dense", 10240, 8192)
        by_bits = {bits: tuning.cuda_candidates("zigzag_dense", 10240, 8192, bits) for bits in (2, 3, 5, 6, 8)}
        monkeypatch.undo()
        # each type's tile pairs among the candidates where the tuner times them (Q2_K, Q3_K at 8 accumulators; not
        # Q5_K's and Q6_K's, which the kernel has: tuning.PAIRS_CANDIDATE_BITS; none for Q8_0)
        for bits, configs in by_bits.items():
            assert {c["acc"] for c in configs if c.get("pairs")} == ({8} if bits in (2, 3) else set()), bits
            assert all(zigzag_cuda.pairs_run(bits, c["acc"]) for c in configs if c.get("pairs")), bits
        # a whole wave of 4-warp, 2-accumulator programs: 924 slots / 40 rows -> split 23 (24, a multiple, overflows)
        assert any((c["split"], c["num_warps"], c["acc"], c["pipe"], c["fused"]) == (23, 4, 2, 0, False) for c in fitting)
        assert len({(c["split"], c["num_warps"], c["acc"], c["pipe"], c["fused"], c.get("cluster", False),
                     c.get("pairs", False)) for c in fitting}) == len(fitting), "a candidate twice"
        # Q4_K's tile pairs at 8 and 2 accumulators among them, their PAIRS define through launch_args
        assert {c["acc"] for c in fitting if c.get("pairs")} == {8, 2}
        assert all("-DPAIRS=1" in tuning.launch_args(c)["extra"] for c in fitting if c.get("pairs"))
        assert cuda_configs and any(c.get("cluster") for c in cuda_configs)
        for c in cuda_configs:
            assert c["impl"] == "cuda" and c["num_warps"] in (1, 2, 4, 8) and 1 <= c["split"] <= k
            assert tuning.launch_args(c)["impl"] == "cuda" and c["pipe"] in (0, 1)
            assert tuning.launch_args(c)["fused"] == c["fused"]
            assert tuning.launch_args(c)["cluster"] == c.get("cluster", False)
            if c.get("cluster"):  # SwiGLU's cluster (2 x split) within the 16 programs sm_90 allows
                assert not c["fused"] and zigzag_cuda.cluster_dims(2 * 256, 2, c["split"]) is not None
        # a table entry without the acc / pipe knobs was tuned with the 16-accumulator kernel
        assert tuning.launch_args({"num_warps": 1, "chunks": 1})["acc"] == 16
        # an entry's L2 prefetch depth reaches the CUDA GEMV as its L2FIRST macro
        assert tuning.launch_args({"num_warps": 4, "chunks": 1, "l2first": 3})["extra"] == ("-DL2FIRST=3",)
        with pytest.raises(ValueError, match="pairs"):  # tile pairs: the CUDA GEMV at 8 or 2 accumulators only
            tuning.launch_args({"num_warps": 4, "chunks": 1, "impl": "cuda", "acc": 4, "pairs": True})
        for c in tuning.candidates("row_dense", n, k) + [tuning.default_config("row_dense", n, k)]:
            assert c["block_n"] >= 4 * c["num_warps"]
    path = tmp_path / "table.json"
    monkeypatch.setattr(tuning, "table_path", lambda key=None: path)
    monkeypatch.setattr(tuning, "device_key", lambda: "test-gpu")
    entry = {"split": 5, "num_warps": 4, "chunks": 2, "us": 1.0}
    for version, expect in ((tuning.KERNEL_VERSION - 1, tuning.default_config("zigzag_dense", 64, 64)),
                            (tuning.KERNEL_VERSION, {k: v for k, v in entry.items() if k != "us"})):
        path.write_text(json.dumps({"kernel_version": version, "entries": {"zigzag_dense": {"64x64": entry}}}))
        tuning._load_table.cache_clear()
        assert tuning.config("zigzag_dense", 64, 64) == expect
    # a missing shape borrows the nearest N of the same K, split scaled by the superblock rows, not its L2 prefetch
    entries = {"zigzag_dense": {"4096x4096": dict(entry, split=40, l2first=1),
                                "12288x4096": dict(entry, split=12, l2first=2, l2first_step_us={"0": 1.0})}}
    path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION, "entries": entries}))
    tuning._load_table.cache_clear()
    assert tuning.config("zigzag_dense", 11008, 4096) == {"split": 13, "num_warps": 4, "chunks": 2}
    assert tuning.config("zigzag_dense", 4096, 4096)["split"] == 40
    assert tuning.config("zigzag_dense", 4096, 4096)["l2first"] == 1  # its own entry's
    assert tuning.config("zigzag_dense", 4096, 8192) == tuning.default_config("zigzag_dense", 4096, 8192)
    # a CUDA entry: run where the CUDA GEMV can, else its Triton fallback (the crossovers kept)
    fallback = {"split": 9, "num_warps": 1, "chunks": 1}
    cuda = {"impl": "cuda", "split": 3, "num_warps": 8, "chunks": 1, "pipe": 0, "fallback": fallback, "us": 2.0}
    entries = {"zigzag_sparse": {"64x64": dict(cuda, crossover=0.4)}}
    path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION, "entries": entries}))
    tuning._load_table.cache_clear()
    monkeypatch.setattr(tuning, "_cuda_usable", lambda: False)
    assert tuning.config("zigzag_sparse", 64, 64) == dict(fallback, crossover=0.4)
    monkeypatch.setattr(tuning, "_cuda_usable", lambda: True)
    assert tuning.config("zigzag_sparse", 64, 64)["impl"] == "cuda"
    assert tuning.triton_config("zigzag_sparse", 64, 64) == fallback
    # a type's CUDA GEMV: its own CUDA entry (crossover kept), else Q4_K's config; its Triton kernel: the fallback
    type_fallback = {"split": 7, "num_warps": 2, "block_k": 16}
    entries["zigzag_sparse_q3_k"] = {"64x64": dict(cuda, split=5, fallback=type_fallback, crossover=0.25)}
    path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION, "entries": entries}))
    tuning._load_table.cache_clear()
    want = {k: v for k, v in cuda.items() if k != "us"} | {"split": 5, "fallback": type_fallback, "crossover": 0.25}
    assert tuning.cuda_type_config("sparse", "q3_k", 64, 64) == want
    assert tuning.cuda_type_config("sparse", "q8_0", 64, 64) == tuning.config("zigzag_sparse", 64, 64)
    assert tuning.triton_config("zigzag_sparse_q3_k", 64, 64) == type_fallback
    # Q4_K's L2 prefetch depth (judged in Q4_K steps, its planes' addresses) never reaches another type's GEMV
    entries["zigzag_dense"] = {"64x64": dict(cuda, l2first=1, l2first_step_us={"0": 1.0, "1": 0.9})}
    path.write_text(json.dumps({"kernel_version": tuning.KERNEL_VERSION, "entries": entries}))
    tuning._load_table.cache_clear()
    assert tuning.config("zigzag_dense", 64, 64)["l2first"] == 1
    assert tuning.cuda_type_config("dense", "q6_k", 64, 64) == {k: v for k, v in cuda.items() if k != "us"}
    tuning._load_table.cache_clear()


_COMPILE_SM90 = """
import sys
from spqt.kernels import zigzag_mma
print(zigzag_mma.compile_sm90(int(sys.argv[1]), int(sys.argv[2]), acc=int(sys.argv[3])).asm["ttgir"])
"""


@pytest.mark.parametrize("num_warps", [1, 2, 4, 8])
def test_mma_lane_layout(num_warps):
    """The tensor-core kernel's mma is warp-collective PTX, which the interpreter cannot run: its
    correctness on the CPU rests on thread i of the program holding row i of every (32 W, 4)
    operand (lane 4 g + t of warp w), with the 4 values in its registers. Compiled for sm_90
    here (no GPU needed; in a child process, as TRITON_INTERPRET replaces the compiler), every
    inline-asm operand must be in exactly that layout."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for mode, acc in ((0, 16), (2, 16), (0, 2)):  # dense, indexed; 16 accumulators, 2 (B masked by lane group)
        run = subprocess.run([sys.executable, "-c", _COMPILE_SM90, str(num_warps), str(mode), str(acc)], env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        ttgir = run.stdout
        layouts = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<.*>)$", ttgir, flags=re.M))
        # the mma tiles (the other inline asm: the L2 prefetch and grid-dependency waits of PDL)
        asm_ops = [ln for ln in ttgir.splitlines() if "tt.elementwise_inline_asm" in ln and "mma.sync" in ln]
        assert len(asm_ops) == 16, f"expected one mma per tile, found {len(asm_ops)}"
        want = (f"sizePerThread = [1, 4], threadsPerWarp = [32, 1], warpsPerCTA = [{num_warps}, 1], "
                "order = [1, 0]")
        for ln in asm_ops:
            # 8 operands (4 slots' words, the B pairs, C, the lane's group g) and the result
            types = re.findall(r"tensor<(\d+)x4x(?:i32|f32), (#\w+)>", ln)
            assert len(types) == 9 and {rows for rows, _ in types} == {str(32 * num_warps)}, ln[-300:]
            encodings = {enc for _, enc in types}
            assert len(encodings) == 1, f"operands in more than one layout: {encodings}"
            assert want in layouts[encodings.pop()], ln[-300:]


# (split, warps, pipe, fused) of the CUDA C++ GEMV on the GPU: one warp with one program a row, splits
# that leave programs without columns or a partial last chunk, every warp count, the next chunk (B4:
# step) loaded ahead or not, finished by the reduction kernel or by the last program of a tile
CUDA_CONFIGS = [(1, 1, 0, False, 16), (7, 2, 1, True, 16), (64, 4, 0, False, 16),
                # fewer accumulator tiles (tiles share one, B zero in the lanes of the other tiles' columns)
                (1, 4, 0, False, 2), (7, 8, 1, False, 4), (64, 2, 1, True, 2), (7, 4, 0, False, 8),
                (33, 8, 1, True, 16)]  # the last one also runs the epilogues below
# Q4_K's tile pairs (zigzag_q4k.cu's PAIRS; an entry's "pairs"): (split, warps, pipe, fused, acc)
PAIRS_CONFIGS = [(7, 4, 0, False, 8), (64, 2, 0, True, 2), (1, 8, 1, False, 2), (33, 2, 0, True, 8)]
# thread block cluster finish (sm_90): (split, warps, pipe, acc); split 7: SwiGLU's cluster of 14 (non-portable)
CLUSTER_CONFIGS = [(7, 4, 0, 2), (2, 8, 1, 16), (8, 2, 0, 16)]


def test_shipped_tables_launch():
    """Every zigzag entry of the shipped tuned tables gives the GEMV's launch arguments, and tile pairs only where
    the weight type's kernel has them at that accumulator count (the twenty-second session edited the H200 table's
    pairs by hand, from whole-step timings)."""
    import json
    from pathlib import Path

    from spqt.kernels import tuning, zigzag_cuda
    from spqt.kernels.gemv import TYPE_BITS

    paths = sorted((Path(tuning.__file__).parent / "tuned").glob("*.json"))
    assert paths
    for path in paths:
        doc = json.loads(path.read_text())
        assert doc["kernel_version"] == tuning.KERNEL_VERSION, path.name
        for variant, entries in doc["entries"].items():
            if not variant.startswith("zigzag_"):
                continue
            fmt = variant.split("_", 2)[2] if variant.count("_") == 2 else "q4_k"
            for shape, entry in entries.items():
                args = tuning.launch_args(entry)
                assert ("-DPAIRS=1" in args["extra"]) == bool(entry.get("pairs")), (path.name, variant, shape)
                if entry.get("pairs"):
                    assert zigzag_cuda.pairs_run(TYPE_BITS[fmt], entry["acc"]), (path.name, variant, shape)


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_zigzag_cuda_kernel(rng, sparsity, monkeypatch):
    """The CUDA C++ GEMV (zigzag_cuda.py, B2 and B4, fp16 x) against the reference, with the
    Triton kernel's tolerance; partials and y poisoned; deterministic; inside a CUDA graph; the
    residual and SwiGLU finishes, by the reduction kernel and by the GEMV's last program; B2 with the L2
    prefetch before the PDL wait (an entry's l2first) bit for bit as without."""
    from spqt.kernels import zigzag_cuda

    monkeypatch.delenv("SPQT_GEMV", raising=False)  # SPQT_GEMV=triton would test the Triton kernel

    for shape in GPU_SHAPES:
        qw, gw = _weights(rng, shape, "zigzag", "cuda")
        x, t = _x(rng, shape[1], torch.float16, "cuda", sparsity)
        x_sparse = reference.sparsify(x, t).float()
        assert zigzag_cuda.supports(x, kg.MODE_DENSE), "NVRTC or cuda-bindings missing on the GPU machine"
        clusters = zigzag_cuda.clusters_run(x.device)
        for split, warps, pipe, fused, acc, cluster, pairs in (
                [c + (False, False) for c in CUDA_CONFIGS] + [c + (False, True) for c in PAIRS_CONFIGS]
                + [(s, w, p, False, a, True, False) for s, w, p, a in CLUSTER_CONFIGS]
                + [(4, 8, 0, False, 2, True, True)]):  # the 7B gate|up's shipped cluster with pairs (H200 table)
            if cluster and not clusters:
                continue  # below sm_90 (the H200 runs them; the CPU test compiles them)
            ws = kg.ZigzagWorkspace(gw, split, torch.float16)
            for mode, x_used, name in ((kg.MODE_DENSE, x.float(), "B2"), (kg.MODE_INDEXED, x_sparse, "B4")):
                ws.y.fill_(float("nan"))
                ws.partials.fill_(float("nan"))
                kw = {"num_warps": warps, "pipe": pipe, "impl": "cuda", "fused": fused, "acc": acc, "cluster": cluster}
                pairs_define = ("-DPAIRS=1",) if pairs else ()
                if mode == kg.MODE_INDEXED:
                    ws.idx.fill_(-7777)
                    kw["idx"], kw["count"] = collect(x, t, ws.idx, ws.count)
                what = (f"cuda {name} {shape} split {split} warps {warps} pipe {pipe} fused {fused} acc {acc} "
                        f"cluster {cluster} pairs {pairs} s={sparsity}")
                y = kg.gemv_zigzag(gw, x, mode, ws, **kw, extra=pairs_define).clone()
                assert_close_fp32_accum(y, qw, x_used, what, ZIGZAG_INPUT_EPS[torch.float16])
                assert torch.equal(y, kg.gemv_zigzag(gw, x, mode, ws, **kw, extra=pairs_define)), \
                    f"{what}: not deterministic"
                if mode == kg.MODE_DENSE and split in (7, 33):  # an entry's l2first: prefetches alone, the same bits
                    ws.y.fill_(float("nan"))
                    l2first = kg.gemv_zigzag(gw, x, mode, ws, **kw, extra=pairs_define + ("-DL2FIRST=2",))
                    assert torch.equal(l2first, y), f"{what}: L2FIRST=2 changed the result"
                assert not ws.counters.any(), f"{what}: the arrival counters are not reset"
                if split == 7:  # launched inside a CUDA graph (as decode runs it), replayed: the same bits
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        out = kg.gemv_zigzag(gw, x, mode, ws, **kw, extra=pairs_define)
                    ws.y.fill_(float("nan"))
                    graph.replay()
                    assert torch.equal(out, y), f"{what}: graph replay differs"
        # the epilogues once per shape (B2, the last CUDA_CONFIGS entry, fused where N / 2 % 256 == 0, and the first
        # cluster config, a cluster where N / 2 % 256 == 0 for SwiGLU): the finish against torch on the plain output
        # (one more fp16 rounding there; SwiGLU's silu can amplify a relative error up to ~10x where the gate is
        # very negative)
        finishes = [(CUDA_CONFIGS[-1][0], {"num_warps": CUDA_CONFIGS[-1][1], "pipe": CUDA_CONFIGS[-1][2], "fused": True})]
        if clusters:
            split, warps, pipe, acc = CLUSTER_CONFIGS[0]
            finishes.append((split, {"num_warps": warps, "pipe": pipe, "acc": acc, "cluster": True}))
            finishes.append((4, {"num_warps": 8, "pipe": 0, "acc": 2, "cluster": True, "extra": ("-DPAIRS=1",)}))
        for split, kw in finishes if shape[0] % 2 == 0 else []:
            ws = kg.ZigzagWorkspace(gw, split, torch.float16)
            kw = kw | {"impl": "cuda"}
            ws.y.fill_(float("nan"))
            plain = kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, **kw).float()
            r = torch.randn(shape[0], device="cuda", dtype=torch.float16) * plain.abs().mean().half()
            ws.y.fill_(float("nan"))
            y = kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, **kw, residual=r).float()
            torch.testing.assert_close(y, plain + r.float(), rtol=2e-3, atol=2e-3 * float(plain.abs().max()))
            ws.y.fill_(float("nan"))
            y = kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, **kw, swiglu=True).float()
            f = shape[0] // 2
            want = (torch.nn.functional.silu(plain[:f]) * plain[f:]).half().float()
            # at fp16's largest finite value either side may round to inf where the other does not (the kernel's
            # product of fp32 sums, want's of their fp16 roundings): both saturated there; a NaN still fails
            sat = 65504.0
            torch.testing.assert_close(y.clamp(-sat, sat), want.clamp(-sat, sat), rtol=2e-2,
                                       atol=1e-3 * float(want.clamp(-sat, sat).abs().max()))


# split, warps, acc (and Q4_K's tile pairs where a fourth element is True)
NORM_CONFIGS = [(1, 4, 16), (7, 2, 16), (24, 4, 2), (64, 8, 2), (2, 1, 16), (24, 2, 2, True), (7, 4, 8, True)]


@pytest.mark.gpu
def test_cuda_gemv_folds_the_norm(rng, monkeypatch):
    """B2 on the CUDA GEMV with the RMSNorm folded in (NORM: rstd from partial sums of squares, the share of
    normed inputs in shared memory) equals B2 on the input normed in torch with that rstd, within one fp16
    unit of an input where the two rstd differ in the last bit, and the fp32 accumulation bound; y poisoned;
    deterministic; in a CUDA graph; with a fused and a cluster SwiGLU finish; a share wider than NORM_SHARE
    refused."""
    from spqt.kernels import zigzag_cuda

    monkeypatch.delenv("SPQT_GEMV", raising=False)
    eps = 1e-5
    for shape in ((4096, 4096), (11008, 4096), (2311, 777), (1024, 11008)):
        qw, gw = _weights(rng, shape, "zigzag", "cuda")
        n, k = shape
        x = torch.from_numpy(rng.standard_normal(k).astype(np.float32) * 6).to("cuda", torch.float16)
        gamma, sq, normed = rms_norm_inputs(rng, x, 37, eps)
        for split, warps, acc, *pairs in NORM_CONFIGS:
            ws = kg.ZigzagWorkspace(gw, split, torch.float16)
            kw = {"num_warps": warps, "acc": acc, "impl": "cuda", "extra": ("-DPAIRS=1",) if pairs else ()}
            what = f"{shape} split {split} warps {warps} acc {acc} pairs {bool(pairs)}"
            if zigzag_cuda.share(k, split, warps) > zigzag_cuda.NORM_SHARE:
                assert not zigzag_cuda.norm_fits(k, split, warps, x, gamma)
                with pytest.raises(ValueError, match="folded norm"):
                    kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, **kw, norm=(gamma, sq, eps))
                continue
            plain = kg.gemv_zigzag(gw, normed, kg.MODE_DENSE, ws, **kw).clone()
            ws.y.fill_(float("nan"))
            y = kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, **kw, norm=(gamma, sq, eps)).clone()
            assert_close_fp32_accum(y, qw, normed.float(), what, 2 * ZIGZAG_INPUT_EPS[torch.float16])
            torch.testing.assert_close(y, plain, rtol=2e-3, atol=2e-3 * float(plain.abs().max()), msg=what)
            assert torch.equal(y, kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, **kw, norm=(gamma, sq, eps))), what
            if split == 7:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = kg.gemv_zigzag(gw, x, kg.MODE_DENSE, ws, **kw, norm=(gamma, sq, eps))
                ws.y.fill_(float("nan"))
                graph.replay()
                assert torch.equal(out, y), f"{what}: graph replay differs"
            if split == 24 and n % 512 == 0:  # the norm with the GEMV's own SwiGLU finish, and a cluster's
                finishes = [{"fused": True}] + ([{"cluster": True}] if zigzag_cuda.clusters_run(x.device) else [])
                for finish in finishes:
                    fws = ws if "fused" in finish else kg.ZigzagWorkspace(gw, 4, torch.float16)
                    want = kg.gemv_zigzag(gw, normed, kg.MODE_DENSE, fws, **kw, **finish, swiglu=True).float().clone()
                    fws.y.fill_(float("nan"))
                    got = kg.gemv_zigzag(gw, x, kg.MODE_DENSE, fws, **kw, **finish, swiglu=True,
                                         norm=(gamma, sq, eps)).float()
                    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3 * float(want.abs().max()),
                                               msg=f"{what} {finish}")


# MODE_KEPT (split, warps, pipe, acc): one program a row (8 warps: a share of 4096 columns with the norm, the most
# shared memory beside the largest static), a partial last chunk (777 = 48 x 16 + 9), every warp count, the next chunk
# loaded ahead or not, 16 or 2 accumulators, Q4_K's tile pairs (a fifth element True)
KEPT_CONFIGS = [(1, 8, 0, 16), (7, 2, 1, 2), (24, 4, 0, 2), (64, 1, 1, 16), (7, 4, 0, 8, True), (24, 2, 1, 2, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_cuda_kept_mode(rng, sparsity, monkeypatch):
    """MODE_KEPT (each program lists its share's inputs with |x| (scale) > t and multiplies those) against the
    reference on the sparsified input, with B4's tolerance; y and partials poisoned; deterministic; in a CUDA graph;
    WINA's scale; the fused residual and the cluster SwiGLU finishes; with the RMSNorm folded (the kept inputs
    chosen on the normed values) against the norm in torch; a share over NORM_SHARE refused."""
    from spqt.kernels import zigzag_cuda

    monkeypatch.delenv("SPQT_GEMV", raising=False)
    eps = 1e-5
    for shape in ((4096, 4096), (11008, 4096), (2311, 777), (1024, 11008), (576, 192)):
        qw, gw = _weights(rng, shape, "zigzag", "cuda")
        n, k = shape
        x, t = _x(rng, k, torch.float16, "cuda", sparsity)
        scale = torch.from_numpy(0.5 + rng.random(k).astype(np.float32)).to("cuda")
        gamma, sq, normed = rms_norm_inputs(rng, x, 37, eps)
        for split, warps, pipe, acc, *pairs in KEPT_CONFIGS:
            ws = kg.ZigzagWorkspace(gw, split, torch.float16)
            kw = {"num_warps": warps, "pipe": pipe, "acc": acc, "impl": "cuda", "threshold": t,
                  "extra": ("-DPAIRS=1",) if pairs else ()}
            what = f"kept {shape} split {split} warps {warps} pipe {pipe} acc {acc} pairs {bool(pairs)} s={sparsity}"
            if zigzag_cuda.share(k, split, warps) > zigzag_cuda.NORM_SHARE:
                assert not zigzag_cuda.kept_fits(k, split, warps)
                with pytest.raises(ValueError, match="MODE_KEPT"):
                    kg.gemv_zigzag(gw, x, kg.MODE_KEPT, ws, **kw)
                continue
            cases = [({}, reference.sparsify(x, t).float(), ZIGZAG_INPUT_EPS[torch.float16]),
                     ({"scale": scale}, reference.sparsify(x, t, scale).float(), ZIGZAG_INPUT_EPS[torch.float16]),
                     ({"norm": (gamma, sq, eps)}, reference.sparsify(normed, t).float(),
                      2 * ZIGZAG_INPUT_EPS[torch.float16])]
            for more, x_used, input_eps in cases:
                ws.y.fill_(float("nan"))
                ws.partials.fill_(float("nan"))
                y = kg.gemv_zigzag(gw, x, kg.MODE_KEPT, ws, **kw, **more).clone()
                case = f"{what} {sorted(more)}"
                if "norm" in more:  # the kernel's rstd may differ from torch's in the last bit: a normed input
                    # next to t may be kept on one side only; compare where both keep the same inputs
                    plain = kg.gemv_zigzag(gw, normed, kg.MODE_KEPT, ws, **kw).float()
                    torch.testing.assert_close(y.float(), plain, rtol=2e-3, atol=2e-3 * float(plain.abs().max()) + 1e-6,
                                               msg=case)
                else:
                    assert_close_fp32_accum(y, qw, x_used, case, input_eps)
                again = kg.gemv_zigzag(gw, x, kg.MODE_KEPT, ws, **kw, **more)
                assert torch.equal(y, again), f"{case}: not deterministic"
            if split == 7:  # in a CUDA graph, replayed: the same bits
                want = kg.gemv_zigzag(gw, x, kg.MODE_KEPT, ws, **kw).clone()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = kg.gemv_zigzag(gw, x, kg.MODE_KEPT, ws, **kw)
                ws.y.fill_(float("nan"))
                graph.replay()
                assert torch.equal(out, want), f"{what}: graph replay differs"
            if split == 24 and n % 512 == 0:  # the finishes: residual by the last program, SwiGLU by a cluster
                assert_kept_residual_finish(gw, x, ws, kw, what)
                if zigzag_cuda.clusters_run(x.device):
                    cws = kg.ZigzagWorkspace(gw, 4, torch.float16)
                    ckw = kw | {"cluster": True}
                    want = kg.gemv_zigzag(gw, x, kg.MODE_KEPT, cws, **kw).float().clone()
                    cws.y.fill_(float("nan"))
                    got = kg.gemv_zigzag(gw, x, kg.MODE_KEPT, cws, **ckw, swiglu=True).float()
                    f = n // 2
                    silu = (torch.nn.functional.silu(want[:f]) * want[f:]).half().float()
                    torch.testing.assert_close(got, silu, rtol=2e-2,
                                               atol=1e-3 * float(silu[silu.isfinite()].abs().max()) + 1e-4,
                                               msg=f"{what} cluster swiglu")


# bf16 x on the CUDA GEMV (split, warps, pipe, acc, Q4_K's tile pairs): 16 accumulators with the next chunk loaded
# ahead, and tile pairs at 2 accumulators
BF16_CONFIGS = [(7, 2, 1, 16, False), (24, 4, 0, 2, True)]


@pytest.mark.gpu
def test_cuda_gemv_runs_bf16(rng, monkeypatch):
    """bf16 x on the CUDA GEMV (XBF16: B = x d sc rounded from fp32 to one fp16 term, y bf16): B2, the collected B4 and
    MODE_KEPT at 50 %, B2 and MODE_KEPT with the RMSNorm folded, against the float64 product within the fp32 sum's
    bound (2^-11 a product, y's bf16 rounding); inputs far past fp16's range (|x| up to ~2^19, weights scaled so that
    x d sc stays in it); y and partials poisoned; deterministic; in a CUDA graph; the residual and SwiGLU finishes by
    the last program and SwiGLU's by a cluster."""
    from spqt.kernels import zigzag_cuda

    monkeypatch.delenv("SPQT_GEMV", raising=False)
    eps = 1e-5
    for shape in ((4096, 4096), (2311, 777), (1024, 11008)):
        qw, gw = _weights(rng, shape, "zigzag", "cuda", scale=2.0**-7)
        n, k = shape
        x = torch.from_numpy(rng.standard_normal(k) * np.exp2(rng.uniform(-3, 17, k))).to("cuda", torch.bfloat16)
        assert x.float().abs().max() > 65504  # values fp16 cannot hold
        t = torch.quantile(x.abs().float(), 0.5).reshape(())
        gamma, sq, normed = rms_norm_inputs(rng, x, 37, eps)
        t_normed = torch.quantile(normed.abs().float(), 0.5).reshape(())
        assert zigzag_cuda.supports(x, kg.MODE_DENSE), "NVRTC or cuda-bindings missing on the GPU machine"
        for split, warps, pipe, acc, pairs in BF16_CONFIGS:
            kw = {"num_warps": warps, "pipe": pipe, "acc": acc, "impl": "cuda",
                  "extra": ("-DPAIRS=1",) if pairs else ()}
            ws = kg.ZigzagWorkspace(gw, split, torch.bfloat16)
            what = f"bf16 {shape} split {split} warps {warps} pipe {pipe} acc {acc} pairs {pairs}"
            kept = zigzag_cuda.kept_fits(k, split, warps)
            runs = [(kg.MODE_DENSE, {}, x.float(), "B2"), (kg.MODE_INDEXED, {}, reference.sparsify(x, t).float(), "B4")]
            if kept:
                runs.append((kg.MODE_KEPT, {"threshold": t}, reference.sparsify(x, t).float(), "kept"))
            for mode, more, x_used, name in runs:
                ws.y.fill_(float("nan"))
                ws.partials.fill_(float("nan"))
                if mode == kg.MODE_INDEXED:
                    ws.idx.fill_(-7777)
                    idx, count = collect(x, t, ws.idx, ws.count)
                    more = {"idx": idx, "count": count}
                y = kg.gemv_zigzag(gw, x, mode, ws, **kw, **more).clone()
                assert y.dtype == torch.bfloat16
                assert_close_fp32_accum(y, qw, x_used, f"{what} {name}", ZIGZAG_INPUT_EPS[torch.float16])
                again = kg.gemv_zigzag(gw, x, mode, ws, **kw, **more)
                assert torch.equal(y, again), f"{what} {name}: not deterministic"
                if split == 7 and mode == kg.MODE_DENSE:  # in a CUDA graph, replayed: the same bits
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        out = kg.gemv_zigzag(gw, x, mode, ws, **kw)
                    ws.y.fill_(float("nan"))
                    graph.replay()
                    assert torch.equal(out, y), f"{what}: graph replay differs"
            # the RMSNorm folded (the kernel's rstd may differ from torch's in the last bit: an input one bf16 unit
            # apart), B2 against the product on torch's normed input, MODE_KEPT against MODE_KEPT on it
            for mode, more in [(kg.MODE_DENSE, {})] + ([(kg.MODE_KEPT, {"threshold": t_normed})] if kept else []):
                plain = kg.gemv_zigzag(gw, normed, mode, ws, **kw, **more).float().clone()
                ws.y.fill_(float("nan"))
                y = kg.gemv_zigzag(gw, x, mode, ws, **kw, **more, norm=(gamma, sq, eps)).clone()
                if mode == kg.MODE_DENSE:
                    assert_close_fp32_accum(y, qw, normed.float(), f"{what} norm", 2.0**-11 + 2.0**-8)
                torch.testing.assert_close(y.float(), plain, rtol=1e-2, atol=1e-2 * float(plain.abs().max()),
                                           msg=f"{what} norm mode {mode}")
            if n % 512 == 0:  # the last program's finishes (and a cluster's SwiGLU on sm_90)
                finishes = [(ws, kw | {"fused": True})]
                if zigzag_cuda.clusters_run(x.device):
                    finishes.append((kg.ZigzagWorkspace(gw, 4, torch.bfloat16), kw | {"cluster": True}))
                for fws, fkw in finishes:
                    plain = kg.gemv_zigzag(gw, x, kg.MODE_DENSE, fws, **kw).float().clone()
                    r = (torch.randn(n, device="cuda") * plain.abs().mean()).bfloat16()
                    fws.y.fill_(float("nan"))
                    y = kg.gemv_zigzag(gw, x, kg.MODE_DENSE, fws, **fkw, residual=r).float()
                    torch.testing.assert_close(y, plain + r.float(), rtol=1e-2, atol=1e-2 * float(plain.abs().max()),
                                               msg=f"{what} residual {sorted(fkw)}")
                    fws.y.fill_(float("nan"))
                    y = kg.gemv_zigzag(gw, x, kg.MODE_DENSE, fws, **fkw, swiglu=True).float()
                    want = (torch.nn.functional.silu(plain[: n // 2]) * plain[n // 2:]).bfloat16().float()
                    torch.testing.assert_close(y, want, rtol=5e-2, atol=1e-2 * float(want.abs().max()),
                                               msg=f"{what} swiglu {sorted(fkw)}")
                    assert not fws.counters.any(), f"{what}: the arrival counters are not reset"


@pytest.mark.gpu
def test_linear_folds_the_norm_of_a_residual_maps_output(rng, monkeypatch):
    """A residual map's output carries its reduction's sums of squares; the next map, handed the RMSNorm,
    runs it inside its CUDA B2 (no norm launch) and gives what it gives on the norm module's output;
    SPQT_NORM_FOLD=0 runs the module."""
    from spqt.functional import NORM_SUMS
    from spqt.kernels import gpu_linear
    from spqt.linear import Linear
    from spqt.model import RMSNorm

    monkeypatch.setenv("SPQT_GEMV", "cuda")
    dim = 4096
    producer = Linear(_weights(rng, (dim, 2048), "zigzag", "cuda")[0], torch.float16, "cuda", backend="triton")
    consumer = Linear(_weights(rng, (3072, dim), "zigzag", "cuda")[0], torch.float16, "cuda", backend="triton")
    norm = RMSNorm(dim, 1e-5).to("cuda")  # fp32 weight, as the runtime keeps it
    norm.weight.copy_(torch.from_numpy(1 + 0.3 * rng.standard_normal(dim).astype(np.float32)))
    x = torch.from_numpy(rng.standard_normal((1, 1, 2048)).astype(np.float32)).to("cuda", torch.float16)
    r = torch.from_numpy(rng.standard_normal((1, 1, dim)).astype(np.float32) * 4).to("cuda", torch.float16)
    folds = []
    real = gpu_linear.TritonLinear.dense_normed
    monkeypatch.setattr(gpu_linear.TritonLinear, "dense_normed",
                        lambda self, *a, **kw: folds.append(real(self, *a, **kw)) or folds[-1])
    for fold in ("1", "0"):
        monkeypatch.setenv("SPQT_NORM_FOLD", fold)
        gpu_linear.norm_fold_on.cache_clear()
        folds.clear()
        h = producer(x, residual=r)
        sums = getattr(h, NORM_SUMS, None)
        if fold == "1":
            torch.testing.assert_close(sums.sum(), (h.float() ** 2).sum(), rtol=1e-5, atol=0.0)
        else:
            assert sums is None
        y = consumer(h, norm=norm).clone()
        want = consumer(norm(h)).clone()  # the module's output carries no sums: plain B2
        assert (len(folds) == 1 and folds[0] is not None) if fold == "1" else not folds
        torch.testing.assert_close(y, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    gpu_linear.norm_fold_on.cache_clear()


def test_gathered_loads_add_32_bit_offsets(tmp_path, monkeypatch):
    """The gathered loads (MODE_KEPT, the other types' B4, B2's partial chunk) add each column's byte offset to the
    row's pointer as an unsigned 32-bit number: no shift pair (LEA, LEA.HI.X) or 64-bit multiply-add (IMAD.WIDE; B4's
    reads of its list keep theirs) per weight load in their loops, and fewer instructions than with the signed form
    (OFFSETS32=0, what Q4_K's collected B4 keeps: 3 % faster than the offsets on the H200's 132 / 264 MB shapes,
    docs/RESULTS.md, twenty-sixth session; for the other types the signed form here is close to, not the same as, the
    code before the change)."""
    from spqt.kernels import nvrtc, zigzag_cuda
    from spqt.kernels.sass import disassemble, main_loop, opcode

    monkeypatch.setenv("SPQT_CACHE", str(tmp_path))
    nvrtc.compile_cubin.cache_clear()
    source = zigzag_cuda.SOURCE.read_text()

    def loop_ops(mode: int, bits: int, extra: tuple = ()) -> list[str]:
        sass, _, stack = disassemble(nvrtc.compile_cubin(source, zigzag_cuda.options(8, mode, 0, -1, extra, acc=2,
                                                                                     bits=bits), "sm_90"))
        assert stack == 0
        return [opcode(ln) for ln in main_loop(sass, "HMMA")]

    for mode, bits in ((zigzag_cuda.MODE_KEPT, 4), (zigzag_cuda.MODE_KEPT, 6), (zigzag_cuda.MODE_INDEXED, 3),
                       (zigzag_cuda.MODE_INDEXED, 8)):
        with_offsets, signed = loop_ops(mode, bits), loop_ops(mode, bits, ("-DOFFSETS32=0",))
        assert "LEA.HI.X" not in with_offsets and "LEA.HI.X" in signed, (mode, bits)
        assert with_offsets.count("IMAD.WIDE") < max(1, signed.count("IMAD.WIDE")), (mode, bits)  # B4: its list's
        assert len(with_offsets) < len(signed), (mode, bits, len(with_offsets), len(signed))
    q4k_collected = loop_ops(zigzag_cuda.MODE_INDEXED, 4)
    assert q4k_collected == loop_ops(zigzag_cuda.MODE_INDEXED, 4, ("-DOFFSETS32=0",)) and "LEA.HI.X" in q4k_collected


@pytest.mark.gpu
def test_cuda_programs_per_sm():
    """What the tuner's wave-fitting splits count in: the programs an SM holds, from the driver's occupancy of the
    compiled kernel; at least one, never fewer with fewer warps or with 2 accumulators (72 registers, not 125)."""
    from spqt.kernels import zigzag_cuda

    for mode in (zigzag_cuda.MODE_DENSE, zigzag_cuda.MODE_INDEXED):
        held = {(w, a): zigzag_cuda.programs_per_sm(w, mode, a) for w in (2, 4, 8) for a in (16, 2)}
        assert zigzag_cuda.programs_per_sm(4, mode, 2, bits=6) >= 1  # another type's kernel
        assert zigzag_cuda.programs_per_sm(4, mode, 8, pairs=True) >= held[4, 16]  # Q4_K's tile pairs (95 registers)
        assert all(1 <= h <= 32 for h in held.values()), held
        assert all(held[w, 2] >= held[w, 16] for w in (2, 4, 8)), held
        assert held[2, 2] >= held[4, 2] >= held[8, 2] and held[2, 16] >= held[4, 16] >= held[8, 16], held


def test_cuda_gemv_compiles_for_sm90(tmp_path, monkeypatch):
    """zigzag_q4k.cu compiles with NVRTC for sm_90 (no GPU needed): every warp count, each mode, pipe
    and finish (partials, plain, residual, SwiGLU), without spills (PDL's release after the wait, or with the
    RELEASE_LATE probe after the last store), and its B2 loop stays lean: at most 240 instructions per chunk and
    lane (223 when written; the Triton kernel's is 335), 16 of them mma; 260 with the next chunk's
    loads ahead in registers (249: the copy of the loaded registers at the end of the loop)."""
    from spqt.kernels import nvrtc, zigzag_cuda
    from spqt.kernels.sass import disassemble, main_loop, opcode

    monkeypatch.setenv("SPQT_CACHE", str(tmp_path))  # compiled here, not read from a cache
    nvrtc.compile_cubin.cache_clear()
    # sm_80 too (the kernel's floor; PDL compiled out below sm_90)
    nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(), zigzag_cuda.options(4, zigzag_cuda.MODE_INDEXED, 1, 2), "sm_80")

    variants = ((zigzag_cuda.MODE_DENSE, 0, -1, 16), (zigzag_cuda.MODE_DENSE, 1, 0, 16),
                (zigzag_cuda.MODE_INDEXED, 0, 1, 16), (zigzag_cuda.MODE_INDEXED, 1, 2, 16),
                (zigzag_cuda.MODE_DENSE, 0, -1, 2), (zigzag_cuda.MODE_INDEXED, 1, 0, 4))
    for warps in (1, 2, 4, 8):  # every variant at 4 warps, the plain B2 at the others (NVRTC: ~1 s a compile)
        for mode, pipe, epilogue, acc in (variants if warps == 4 else variants[:1]):
            options = zigzag_cuda.options(warps, mode, pipe, epilogue, acc=acc)
            if warps == 4 and pipe == 0 and acc == 2:  # Q5_K (TYPE 5: the fifth bits), without spills
                q5 = nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(), zigzag_cuda.options(warps, mode, 0, -1, acc=2,
                                                                                            bits=5), "sm_90")
                q5_sass, _, q5_stack = disassemble(q5)
                assert q5_stack == 0 and sum("HMMA" in ln for ln in main_loop(q5_sass, "HMMA")) == 16
            cubin = nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(), options, "sm_90")
            sass, regs, stack = disassemble(cubin)
            assert stack == 0, f"warps {warps} mode {mode} pipe {pipe}: {stack} bytes of stack (spills)"
            loop = main_loop(sass, "HMMA")
            assert sum("HMMA" in ln for ln in loop) == 16
            if mode == zigzag_cuda.MODE_DENSE:  # fewer accumulators: a select a class of tiles (at 2: 24 a chunk)
                limit = (240, 260)[pipe] + (0 if acc == 16 else 24)
                assert len(loop) <= limit, f"warps {warps} pipe {pipe} acc {acc}: B2 loop of {len(loop)} instructions"
                if acc < 16:
                    assert regs <= 80, f"acc {acc}: {regs} registers a thread (125 with 16 accumulators)"
    # Q4_K's tile pairs: no permutes in the levels' assembly (the 8 left decode the scales); at 8 accumulators no
    # selects (215-217 loop instructions when written), at 2 one a pair q and slot (230, 71 registers); no spills in
    # any mode or finish
    for warps, mode, acc, epilogue in ((2, zigzag_cuda.MODE_DENSE, 8, -1), (4, zigzag_cuda.MODE_DENSE, 8, -1),
                                       (8, zigzag_cuda.MODE_DENSE, 8, -1), (4, zigzag_cuda.MODE_INDEXED, 8, 1),
                                       (4, zigzag_cuda.MODE_KEPT, 8, -1), (2, zigzag_cuda.MODE_DENSE, 2, -1),
                                       (4, zigzag_cuda.MODE_DENSE, 2, 2), (4, zigzag_cuda.MODE_INDEXED, 2, -1)):
        sass, regs, stack = disassemble(nvrtc.compile_cubin(
            zigzag_cuda.SOURCE.read_text(), zigzag_cuda.options(warps, mode, 0, epilogue, ("-DPAIRS=1",), acc=acc),
            "sm_90"))
        loop = main_loop(sass, "HMMA")
        assert stack == 0 and sum("HMMA" in ln for ln in loop) == 16, (warps, mode, acc)
        if mode == zigzag_cuda.MODE_DENSE and epilogue == -1:
            ops = [opcode(ln) for ln in loop]
            want = (220, 1, 100) if acc == 8 else (236, 16, 80)  # loop, selects, registers at most
            assert len(loop) <= want[0] and ops.count("SEL") <= want[1] and ops.count("PRMT") <= 8 \
                and regs <= want[2], (warps, acc, len(loop), ops.count("SEL"), ops.count("PRMT"), regs)
    with pytest.raises(Exception, match="PAIRS"):  # Q4_K's alone, at 8 or 2 accumulators
        nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(),
                            zigzag_cuda.options(4, zigzag_cuda.MODE_DENSE, 0, -1, ("-DPAIRS=1",), acc=4), "sm_90")
    for warps, acc in ((4, 2), (1, 16)):  # the folded norm: no spills, the B2 loop no longer (x from shared memory)
        sass, _, stack = disassemble(nvrtc.compile_cubin(
            zigzag_cuda.SOURCE.read_text(), zigzag_cuda.options(warps, zigzag_cuda.MODE_DENSE, 0, -1, acc=acc, norm=True),
            "sm_90"))
        loop = main_loop(sass, "HMMA")
        assert stack == 0 and sum("HMMA" in ln for ln in loop) == 16 and len(loop) <= 240 + (0 if acc == 16 else 24)
    # an entry's l2first (the o maps' table entries): L2 prefetches (CCTL.E.PF2) before the PDL wait, none in the loop,
    # no spills, the loop no longer
    for warps, acc, depth in ((8, 16, 1), (4, 16, 1), (8, 2, 2)):
        sass, _, stack = disassemble(nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(), zigzag_cuda.options(
            warps, zigzag_cuda.MODE_DENSE, 0, -1, (f"-DL2FIRST={depth}",), acc=acc), "sm_90"))
        loop = main_loop(sass, "HMMA")
        listing = [ln for ln in sass.splitlines() if "/*" in ln and "*/" in ln]
        wait = next(i for i, ln in enumerate(listing) if "ACQBULK" in ln)  # griddepcontrol.wait
        prefetches = [i for i, ln in enumerate(listing) if "CCTL.E.PF2" in ln]
        assert stack == 0 and len(loop) <= 240 + (0 if acc == 16 else 24) and not any("CCTL" in ln for ln in loop)
        assert prefetches and max(prefetches) < wait, f"warps {warps}: the L2 prefetches after the PDL wait"
    # with the cluster finish (the 7B gate|up's table entry): dynamic shared memory beside the cluster's
    sass, _, stack = disassemble(nvrtc.compile_cubin(
        zigzag_cuda.SOURCE.read_text(), zigzag_cuda.options(8, zigzag_cuda.MODE_DENSE, 0, 2, acc=2, cluster=True,
                                                            norm=True), "sm_90"))
    assert stack == 0 and "UCGABAR_WAIT" in sass
    # MODE_KEPT (the share's own list): plain, the next chunk ahead with the residual finish and the norm, the SwiGLU
    # cluster finish with the norm; no spills, one mma a tile in its loop
    for warps, pipe, epilogue, acc, norm, cluster in ((4, 0, -1, 16, False, False), (8, 1, 1, 2, True, False),
                                                      (8, 0, 2, 2, True, True)):
        sass, _, stack = disassemble(nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(), zigzag_cuda.options(
            warps, zigzag_cuda.MODE_KEPT, pipe, epilogue, acc=acc, norm=norm, cluster=cluster), "sm_90"))
        assert stack == 0 and sum("HMMA" in ln for ln in main_loop(sass, "HMMA")) == 16, (warps, pipe, epilogue)
    with pytest.raises(RuntimeError, match="NORM folds the RMSNorm into B2"):  # B4's norm runs with its collection
        nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(),
                            zigzag_cuda.options(4, zigzag_cuda.MODE_INDEXED, 0, -1, norm=True), "sm_90")
    for mode, epilogue in ((zigzag_cuda.MODE_DENSE, 2), (zigzag_cuda.MODE_INDEXED, 1)):  # the cluster finish
        cubin = nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(), zigzag_cuda.options(4, mode, 0, epilogue, acc=2,
                                                                                        cluster=True), "sm_90")
        sass, regs, stack = disassemble(cubin)
        assert stack == 0 and sum("HMMA" in ln for ln in main_loop(sass, "HMMA")) == 16
        assert "UCGABAR_WAIT" in sass, "no cluster barrier in the cluster finish"
    # PDL's release (PREEXIT): after the wait, or (RELEASE_LATE, a probe) after the program's stores of its sums:
    # the partials (B2, B4), the sums before the fused finish's arrival (ATOMG) or the cluster's (shared memory)
    # before its first barrier
    for mode, epilogue, cluster, after in ((zigzag_cuda.MODE_DENSE, -1, False, None),
                                           (zigzag_cuda.MODE_INDEXED, -1, False, None),
                                           (zigzag_cuda.MODE_DENSE, 1, False, "ATOMG"),
                                           (zigzag_cuda.MODE_DENSE, 0, True, "UCGABAR")):
        for late in (0, 1):
            sass, _, _ = disassemble(nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(), zigzag_cuda.options(
                4, mode, 0, epilogue, (f"-DRELEASE_LATE={late}",), acc=2, cluster=cluster), "sm_90"))
            listing = [ln for ln in sass.splitlines() if "/*" in ln and "*/" in ln]
            what = f"mode {mode} epilogue {epilogue} cluster {cluster}, RELEASE_LATE={late}"
            release = next((i for i, ln in enumerate(listing) if "PREEXIT" in ln), None)
            assert release is not None, f"{what}: no PREEXIT"
            if after is None:  # the partials are the program's last stores
                assert (release > max(i for i, ln in enumerate(listing) if "STG" in ln)) == bool(late), what
            else:
                finish = next(i for i, ln in enumerate(listing) if after in ln)
                stores = [i for i, ln in enumerate(listing) if ("STG" in ln or "STS" in ln) and i < finish]
                assert (release > max(stores, default=-1)) == bool(late) and release < finish, f"{what}: {release}"
    # cluster shapes: (1, split), SwiGLU (2, split) where N / 2 is a multiple of 256, at most 16 programs
    assert zigzag_cuda.cluster_dims(4096, 0, 16) == (1, 16) and zigzag_cuda.cluster_dims(4096, 2, 8) == (2, 8)
    assert zigzag_cuda.cluster_dims(4096, 2, 9) is None and zigzag_cuda.cluster_dims(4096, -1, 4) is None
    assert zigzag_cuda.cluster_dims(1000, 2, 2) is None and zigzag_cuda.cluster_dims(1000, 1, 2) == (1, 2)


def test_cuda_gemv_compiles_for_bf16(tmp_path, monkeypatch):
    """The bf16 GEMV (XBF16: bf16 x, residual and y, B still fp16) compiles with NVRTC for sm_90 and sm_80, without
    spills, and costs nothing over fp16's: the same registers or fewer and no more instructions in the main loop
    (a bf16 widens to fp32 by a shift, an fp16 by a conversion), in B2, B4 with the residual finish and MODE_KEPT with
    the norm folded and SwiGLU's finish, across types."""
    from spqt.kernels import nvrtc, zigzag_cuda
    from spqt.kernels.sass import disassemble, main_loop

    monkeypatch.setenv("SPQT_CACHE", str(tmp_path))
    nvrtc.compile_cubin.cache_clear()
    source = zigzag_cuda.SOURCE.read_text()
    nvrtc.compile_cubin(source, zigzag_cuda.options(4, zigzag_cuda.MODE_INDEXED, 1, 2, bf16=True), "sm_80")
    for mode, epilogue, norm, bits in ((zigzag_cuda.MODE_DENSE, -1, False, 4), (zigzag_cuda.MODE_INDEXED, 1, False, 2),
                                       (zigzag_cuda.MODE_KEPT, 2, True, 6)):
        cost = {}
        for bf16 in (False, True):
            options = zigzag_cuda.options(4, mode, 0, epilogue, acc=2, bits=bits, norm=norm, bf16=bf16)
            assert ("-DXBF16=1" in options) == bf16
            sass, registers, stack = disassemble(nvrtc.compile_cubin(source, options, "sm_90"))
            assert stack == 0, (mode, bits, bf16)
            cost[bf16] = (registers, len(main_loop(sass, "HMMA")))
            # y and the normed share rounded to bf16 (F2FP.BF16) in the bf16 build alone (B2 without a finish or a
            # norm rounds nothing to x's type)
            assert ("F2FP.BF16" in sass) == (bf16 and (epilogue >= 0 or norm)), (mode, bits, bf16)
        assert cost[True][0] <= cost[False][0] and cost[True][1] <= cost[False][1], (mode, bits, cost)


def test_bf16_maps_run_triton_entries_on_the_cuda_gemv(monkeypatch):
    """A bf16 Q4_K map runs a table's Triton entry on the CUDA GEMV (the entry's split, warps and accumulators) where
    that runs; fp16, fp32, a CPU device, a CUDA entry, SPQT_GEMV=triton / =cuda and a GPU without the CUDA GEMV leave
    the entry as it is."""
    from spqt.kernels import gpu_linear, tuning, zigzag_cuda

    monkeypatch.delenv("SPQT_GEMV", raising=False)
    monkeypatch.setattr(zigzag_cuda, "usable", lambda device=None: True)
    triton_entry = {"split": 7, "num_warps": 2, "chunks": 1, "acc": 4, "fused": False}
    cuda_entry = triton_entry | {"impl": "cuda", "acc": 2, "pairs": True}
    for device in ("cuda", "cuda:0"):
        got = gpu_linear.bf16_on_cuda(triton_entry, torch.bfloat16, device)
        assert got == triton_entry | {"impl": "cuda"} and tuning.launch_args(got)["impl"] == "cuda"
    for dtype, device in ((torch.float16, "cuda"), (torch.float32, "cuda"), (torch.bfloat16, "cpu")):
        assert gpu_linear.bf16_on_cuda(triton_entry, dtype, device) is triton_entry, (dtype, device)
    assert gpu_linear.bf16_on_cuda(cuda_entry, torch.bfloat16, "cuda") is cuda_entry
    for choice in ("triton", "cuda"):
        monkeypatch.setenv("SPQT_GEMV", choice)
        assert gpu_linear.bf16_on_cuda(triton_entry, torch.bfloat16, "cuda") is triton_entry, choice
    monkeypatch.delenv("SPQT_GEMV")
    monkeypatch.setattr(zigzag_cuda, "usable", lambda device=None: False)
    assert gpu_linear.bf16_on_cuda(triton_entry, torch.bfloat16, "cuda") is triton_entry


def test_fused_choice_env(monkeypatch):
    """SPQT_GEMV_FUSED overrides the tuned config's fused finish both ways; unset, the config decides."""
    from spqt.kernels import zigzag_cuda

    for value, want in (("1", (True, True)), ("0", (False, False)), ("", (True, False))):
        monkeypatch.setenv("SPQT_GEMV_FUSED", value)
        zigzag_cuda._fused_env.cache_clear()
        assert (zigzag_cuda.fused_choice(True), zigzag_cuda.fused_choice(False)) == want, value
    zigzag_cuda._fused_env.cache_clear()
