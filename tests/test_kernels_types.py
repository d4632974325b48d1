"""Zigzag GEMV kernels of Q8_0, Q6_K, Q5_K, Q3_K and Q2_K (kernels/zigzag_types.py) against the
float64 product of the dequantized matrix (QuantizedWeight.dequantize): on the CPU through the
Triton interpreter (small shapes, few configs) and the same tests on the GPU (`gpu` marker,
larger shapes and more configs). Fresh random blocks and inputs, shapes that are not multiples
of the block size, outputs and partials poisoned with NaN before every launch."""

import numpy as np
import pytest
import torch

import spqt
from spqt.checkpoint import QuantizedWeight
from spqt.kernels import reference
from spqt.kernels import zigzag_types as zt
from spqt.kernels.collect import collect
from spqt.kernels.gpu_layout_types import Q8_ROW_GROUP, TYPES, dequantize_kernel_layout, repack

from kernel_inputs import assert_within_fp32_sum, random_x as _x

DEVICES = [pytest.param("cpu", id="interp"), pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)]
SPARSITIES = [0.0, 0.25, 0.5, 0.9, 1.0]
# CPU: 300 rows (not a multiple of 32 or 256), K = 75 (not a multiple of a step); a one-row edge
CPU_SHAPES = [(300, 75), (1, 37)]
GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (2311, 777), (1, 4096)]


def _shapes(device):
    return CPU_SHAPES if device == "cpu" else GPU_SHAPES


def _dtypes(device, sparsity=0.0):
    """The x dtypes of a case: the GPU all three; the interpreter fp32 and fp16 at 0 and 50 %, one
    of them at the other levels (its time budget)."""
    if device != "cpu":
        return [torch.float16, torch.bfloat16, torch.float32]
    if sparsity in (0.0, 0.5):
        return [torch.float32, torch.float16]
    return [torch.float16] if sparsity in (0.25, 1.0) else [torch.float32]


def _configs(fmt, device):
    """(split, launch kwargs). CPU: the default-like config everywhere, a second one (1 split,
    8-column steps, 2 warps, Q8_0 with 2 block rows a program) at 50 % only. GPU: splits that
    leave programs without columns, every block_k and warp count once, Q8_0 every row count."""
    rows = {"rows": 2} if fmt == "q8_0" else {}
    if device == "cpu":
        return [(3, {"num_warps": 4, "block_k": 16}), (1, {"num_warps": 2, "block_k": 8, **rows})]
    cfgs = [(1, {"num_warps": 4, "block_k": 16}), (64, {"num_warps": 4, "block_k": 32}),
            (7, {"num_warps": 2, "block_k": 8}), (200, {"num_warps": 8, "block_k": 64}),
            (33, {"num_warps": 1, "block_k": 16})]
    if fmt == "q8_0":
        cfgs += [(16, {"num_warps": 4, "block_k": 16, "rows": r}) for r in (1, 2, 4)]
    return cfgs


# Byte offsets of each type's fp16 factors: (d fields that may be negative, d / dmin fields >= 0)
FP16_FIELDS = {"q8_0": ((0,), ()), "q6_k": ((208,), ()), "q5_k": ((), (0, 2)), "q3_k": ((108,), ()),
               "q2_k": ((), (80, 82))}
# The largest |scale x level| of a block (Q6_K 128 * 32, Q5_K 63 * 31, ...): random d below its
# inverse keeps the weights below 1, as real blocks are
LARGEST = {"q8_0": 127, "q6_k": 4096, "q5_k": 1953, "q3_k": 128, "q2_k": 45}


def _random_blocks(rng, fmt, shape, layout="zigzag"):
    """Random GGUF blocks of a matrix: every level, scale and bit pattern, the fp16 factors
    random finite values (2^-6 .. 1 times 1 / LARGEST in magnitude, d of the signed types of
    either sign).
    Faster than the encoders (a Q6_K / Q2_K 300x75 takes ~2 s to encode here) and a wider test."""
    from spqt.formats import get_format
    from spqt.layouts import grid_shape

    spec = get_format(fmt)
    rows, cols = grid_shape(layout, shape, spec.block_size)
    blocks = rng.integers(0, 256, (rows, cols, spec.block_bytes), dtype=np.uint8)
    signed, unsigned = FP16_FIELDS[fmt]
    for at, sign in [(a, True) for a in signed] + [(a, False) for a in unsigned]:
        v = np.exp2(rng.uniform(-6, 0, (rows, cols))) / LARGEST[fmt] * (rng.choice([-1, 1], (rows, cols)) if sign else 1)
        blocks[..., at:at + 2] = v.astype(np.float16)[..., None].view(np.uint8)
    return QuantizedWeight(torch.from_numpy(blocks), fmt, layout, shape)


def _weights(rng, fmt, shape, device):
    qw = _random_blocks(rng, fmt, shape)
    qw = QuantizedWeight(qw.blocks.to(device), fmt, "zigzag", shape)
    return qw, repack(qw, device)


LEVEL_BYTES = {"q5_k": slice(16, 176), "q2_k": slice(16, 80)}  # the types with a min term


def _min_part(qw: QuantizedWeight) -> torch.Tensor:
    """Q5_K, Q2_K: -dmin*m of every weight (its levels zeroed), (N, K) float32; other types: zeros."""
    if qw.fmt not in LEVEL_BYTES:
        return torch.zeros(qw.shape, device=qw.blocks.device)
    blocks = qw.blocks.clone()
    blocks[..., LEVEL_BYTES[qw.fmt]] = 0
    return QuantizedWeight(blocks, qw.fmt, qw.layout, qw.shape).dequantize()


def _references(qw):
    """(W, |W| + 2 |dmin m|) in float64: the matrix and the magnitudes the kernel adds per weight
    (its scale part d sc q and min part dmin m are each at most |w| + |dmin m|)."""
    w_ref = qw.dequantize().double()
    return w_ref, w_ref.abs() + 2 * _min_part(qw).double().abs()


def assert_close_fp32_accum(y, refs, x_used, what):
    """|y - W x| within the worst case of fp32 arithmetic (kernel_inputs); refs: _references(qw)."""
    assert_within_fp32_sum(y, *refs, x_used, what)


def _launch(gw, x, mode, ws, cfg, t=None):
    """One launch on a poisoned workspace (B4: a poisoned list, then collect())."""
    ws.y.fill_(float("nan"))
    ws.partials.fill_(float("nan"))
    kw = dict(cfg)
    if mode == zt.MODE_INDEXED:
        ws.idx.fill_(-7777)
        ws.count.fill_(-1)
        kw["idx"], kw["count"] = collect(x, t, ws.idx, ws.count)
    return zt.gemv(gw, x, mode, ws, **kw).clone(), kw


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", TYPES)
def test_repack_is_exact(rng, device, fmt):
    """The kernel layout holds the same weights (its torch decode equals the format's) and every
    block's arrays are contiguous, its level bytes 16-byte aligned; Q8_0's rows padded with zeros.
    Random blocks, and one encoded matrix (the encoders' zero padding)."""
    w = torch.from_numpy(rng.standard_normal((40, 20)).astype(np.float32)).to(device)
    encoded = QuantizedWeight(spqt.quantize(w, fmt, "zigzag"), fmt, "zigzag", (40, 20))
    for shape in _shapes(device)[:2] + [(513, 5), (40, 20)]:
        qw, gw = _weights(rng, fmt, shape, device) if shape != (40, 20) else (encoded, repack(encoded, device))
        assert torch.equal(dequantize_kernel_layout(gw), qw.dequantize()), f"{fmt} {shape}"
        assert torch.equal(zt.dequantize(gw, torch.float32), qw.dequantize())
        rows = -(-shape[0] // (32 if fmt == "q8_0" else 256))
        for a in (gw.quants, gw.high, gw.scales, gw.head, gw.d):
            if a is not None:
                assert a.is_contiguous() and a.shape[1] == shape[1]
        assert gw.quants[0, 0].numel() * gw.quants.element_size() % 16 == 0
        if fmt == "q8_0":
            assert gw.rows % Q8_ROW_GROUP == 0 and gw.rows >= rows
            assert not gw.quants[rows:].any() and not gw.d[rows:].float().any()
        else:
            assert gw.rows == rows
        assert gw.nbytes == qw.nbytes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_zigzag_types_b2_b4(rng, device, fmt, sparsity):
    """B4 at every sparsity (0 %: the list holds every column; 100 %: none) and B2 against
    W x in float64; two launches equal (deterministic); the torch twin within the same bound.
    The interpreter runs B2 at 0 and 50 % only (it does not depend on the sparsity), the second
    config and the determinism check at 50 % on its larger shape only (fp32 for the config)."""
    for shape in _shapes(device):
        qw, gw = _weights(rng, fmt, shape, device)
        refs = _references(qw)
        for dtype in _dtypes(device, sparsity):
            x, t = _x(rng, shape[1], dtype, device, sparsity)
            x_sparse = reference.sparsify(x, t).float()
            configs = _configs(fmt, device)
            if device == "cpu" and (sparsity != 0.5 or shape != CPU_SHAPES[0] or dtype != torch.float32):
                configs = configs[:1]
            elif device == "cuda" and (sparsity != 0.5 or dtype == torch.bfloat16):
                configs = configs[:2]  # each config is a compile per dtype and mode: all of them at 50 % only
            for split, cfg in configs:
                ws = zt.TypesWorkspace(gw, split, dtype)
                modes = [(zt.MODE_INDEXED, x_sparse, "B4")]
                if device == "cuda" or sparsity in (0.0, 0.5):
                    modes.append((zt.MODE_DENSE, x.float(), "B2"))
                for mode, x_used, name in modes:
                    what = f"{fmt} {name} {shape} {dtype} split {split} {cfg} s={sparsity}"
                    y, kw = _launch(gw, x, mode, ws, cfg, t)
                    assert y.shape == (shape[0],) and y.dtype == dtype
                    assert_close_fp32_accum(y, refs, x_used, what)
                    if device == "cuda" or (shape == CPU_SHAPES[0] and sparsity == 0.5):
                        again = zt.gemv(gw, x, mode, ws, **kw)
                        assert torch.equal(y, again), f"{what}: not deterministic"
                    if split == configs[0][0]:
                        twin = zt.gemv_twin(gw, x, mode, kw.get("idx"), kw.get("count"))
                        assert_close_fp32_accum(twin, refs, x_used, f"twin of {what}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", TYPES)
def test_zigzag_types_epilogues(rng, device, fmt):
    """residual + W x and silu(gate) * up from the reduction kernel equal the same launch's fp32
    partial sums with the epilogue in torch, within one rounding of the output dtype (and a
    different summation order of the splits); B2 and B4. N / 2 = 150 (GPU 1155): gate and up
    share a block row."""
    n, k = (300, 75) if device == "cpu" else (2310, 777)
    qw, gw = _weights(rng, fmt, (n, k), device)
    for dtype in _dtypes(device)[:1] if device == "cpu" else _dtypes(device):
        x, t = _x(rng, k, dtype, device, 0.5)
        r = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(device, dtype)
        eps = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        ws = zt.TypesWorkspace(gw, 3, dtype)
        for mode in (zt.MODE_DENSE, zt.MODE_INDEXED):
            what = f"{fmt} {dtype} mode {mode}"
            kw = {}
            if mode == zt.MODE_INDEXED:
                kw["idx"], kw["count"] = collect(x, t, ws.idx, ws.count)
            zt.gemv(gw, x, mode, ws, **kw)
            y32 = ws.partials[:, :n].sum(0)
            ws.y.fill_(float("nan"))
            got = zt.gemv(gw, x, mode, ws, residual=r, **kw)
            want = (r.float() + y32).to(dtype)
            torch.testing.assert_close(got, want, rtol=eps, atol=eps * float(want.abs().max()), msg=f"residual {what}")
            torch.testing.assert_close(zt.gemv_twin(gw, x, mode, residual=r, **kw), want, rtol=8 * eps,
                                       atol=8 * eps * float(want.abs().max()), msg=f"twin residual {what}")
            ws.y.fill_(float("nan"))
            got = zt.gemv(gw, x, mode, ws, swiglu=True, **kw)
            want = torch.nn.functional.silu(y32[: n // 2]) * y32[n // 2:]
            assert got.shape == (n // 2,)
            torch.testing.assert_close(got.float(), want, rtol=eps, atol=eps * float(want.abs().max()),
                                       msg=f"swiglu {what}")


def test_zigzag_types_bad_input(rng):
    """Wrong layouts, shapes, dtypes and options are refused before any launch."""
    qw, gw = _weights(rng, "q6_k", (40, 20), "cpu")
    ws = zt.TypesWorkspace(gw, 2, torch.float32)
    x = torch.ones(20)
    for bad, match in ((lambda: zt.gemv(gw, torch.ones(21), zt.MODE_DENSE, ws), "one token"),
                       (lambda: zt.gemv(gw, x.half(), zt.MODE_DENSE, ws), "workspace output"),
                       (lambda: zt.gemv(gw, x.long(), zt.MODE_DENSE, ws), "fp16/bf16/fp32"),
                       (lambda: zt.gemv(gw, x, zt.MODE_INDEXED, ws), "B4 needs"),
                       (lambda: zt.gemv(gw, x, 1, ws), "mode must be"),
                       (lambda: zt.gemv(gw, x, zt.MODE_DENSE, ws, block_k=12), "block_k"),
                       (lambda: zt.gemv(gw, x, zt.MODE_DENSE, ws, swiglu=True, residual=torch.ones(40)), "swiglu"),
                       (lambda: zt.TypesWorkspace(gw, 0, torch.float32), "split")):
        with pytest.raises(ValueError, match=match):
            bad()
    row = QuantizedWeight(spqt.quantize(torch.ones(40, 20), "q6_k", "row"), "q6_k", "row", (40, 20))
    with pytest.raises(ValueError, match="zigzag"):
        repack(row, "cpu")
    with pytest.raises(ValueError, match="zigzag"):
        repack(QuantizedWeight(spqt.quantize(torch.ones(40, 20), "q4_k", "zigzag"), "q4_k", "zigzag", (40, 20)), "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_triton_linear_runs_the_types(rng, device):
    """Linear on the triton backend picks these kernels for zigzag Q8_0 ... Q2_K (row layout:
    dequantize + matmul) and equals the reference backend: dense, sparse with a residual, SwiGLU,
    the norm fused with the collection (WINA scale included), and several tokens (the GEMM path)."""
    from spqt.kernels.gpu_linear import TritonZigzagTypesLinear
    from spqt.kernels.reference import ReferenceLinear
    from spqt.linear import Linear
    from spqt.model import RMSNorm

    n, k = (300, 75) if device == "cpu" else (2310, 777)
    # the interpreter: one type of each kernel family (8-bit; 5-bit with a min; 2-bit with a min)
    for fmt in (("q8_0", "q5_k", "q2_k") if device == "cpu" else TYPES):
        qw = _random_blocks(rng, fmt, (n, k))
        lin = Linear(qw, torch.float32, device, backend="triton")
        ref = Linear(qw, torch.float32, device, backend="reference")
        assert isinstance(lin.impl, TritonZigzagTypesLinear) and lin.impl.cfg_dense["split"] >= 1
        row = _random_blocks(rng, fmt, (n, k), "row")
        assert isinstance(Linear(row, torch.float32, device, backend="triton").impl, ReferenceLinear)
        x = torch.from_numpy(rng.standard_normal((1, 1, k)).astype(np.float32)).to(device)
        r = torch.from_numpy(rng.standard_normal((1, 1, n)).astype(np.float32)).to(device)
        tol = dict(rtol=1e-4, atol=1e-4 * float(ref(x).abs().max()))
        torch.testing.assert_close(lin(x).clone(), ref(x), **tol, msg=f"{fmt} dense")
        torch.testing.assert_close(lin(x, swiglu=True).clone(), ref(x, swiglu=True), **tol, msg=f"{fmt} swiglu")
        t = float(torch.quantile(x.abs().flatten().cpu(), 0.5))
        norm = RMSNorm(k, 1e-5).to(device)
        for m in (lin, ref):
            m.set_threshold(t, level=0.5)
            m.sparse = True
        want = ref(x, residual=r).clone()
        assert not torch.allclose(want, ref.impl.dense(x, r), **tol)  # the threshold drops something
        torch.testing.assert_close(lin(x, residual=r).clone(), want, **tol, msg=f"{fmt} sparse + residual")
        torch.testing.assert_close(lin(x, norm=norm).clone(), ref(x, norm=norm), **tol, msg=f"{fmt} norm + sparse")
        c = torch.from_numpy(rng.uniform(0.2, 3.0, k).astype(np.float32)).to(device)
        for m in (lin, ref):
            m.set_scale(c)
        torch.testing.assert_close(lin(x, norm=norm).clone(), ref(x, norm=norm), **tol, msg=f"{fmt} WINA")
        if device == "cuda":  # a decode step is a CUDA graph: nothing here may synchronise with the host
            static = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                lin(static, norm=norm, residual=r)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = lin(static, norm=norm, residual=r)
            x2 = torch.from_numpy(rng.standard_normal((1, 1, k)).astype(np.float32)).to(device)
            static.copy_(x2)
            graph.replay()
            torch.testing.assert_close(out, ref(x2, norm=norm, residual=r), **tol, msg=f"{fmt} CUDA graph")
        xs = torch.from_numpy(rng.standard_normal((2, 3, k)).astype(np.float32)).to(device)
        lin.sparse = ref.sparse = False
        torch.testing.assert_close(lin(xs), ref(xs), **tol, msg=f"{fmt} several tokens")


def test_type_variants_fall_back_to_defaults():
    """The tuned table has no entry for the new variants: config() gives default_config, whose
    launch arguments zigzag_types.gemv accepts; every candidate the tuner would time is valid;
    the Q4_K variants (what `spqt tune` times by default) are unchanged."""
    from spqt.kernels import tuning

    assert tuning.VARIANTS == ("zigzag_dense", "zigzag_sparse", "row_dense")
    for fmt in TYPES:
        for kind in ("dense", "sparse"):
            variant = f"zigzag_{kind}_{fmt}"
            for n, k in [(4096, 4096), (28672, 8192), (1, 37), (300, 75)]:
                cfg = tuning.config(variant, n, k)
                assert cfg == tuning.default_config(variant, n, k)
                for c in tuning.candidates(variant, n, k) + [cfg]:
                    args = tuning.types_launch_args(c)
                    assert 1 <= c["split"] <= max(1, -(-k // 16)) and args["num_warps"] in (1, 2, 4, 8)
                    assert args["block_k"] in (8, 16, 32, 64) and args.get("rows", 8) in (1, 2, 4, 8)
                    assert ("rows" in args) == (fmt == "q8_0")


_COMPILE_SM90 = """
import collections, json, os, re, subprocess, sys, tempfile
from spqt.kernels import zigzag_types as zt
from spqt.kernels import tuning
from spqt.kernels.sass import main_loop, opcode, tool
for fmt in ("q8_0", "q6_k", "q5_k", "q3_k", "q2_k"):
    # B4 for every type; B2 (which differs only in the column shares) for Q5_K
    for mode in ((zt.MODE_DENSE, zt.MODE_INDEXED) if fmt == "q5_k" else (zt.MODE_INDEXED,)):
        warps = tuning.default_config(f"zigzag_dense_{fmt}", 4096, 4096)["num_warps"]
        compiled = zt.compile_sm90(fmt, mode, sys.argv[1], num_warps=warps)
        ptx = compiled.asm["ptx"]
        with tempfile.TemporaryDirectory() as d:
            open(os.path.join(d, "k.ptx"), "w").write(ptx)
            v = subprocess.run([tool("ptxas"), "-v", "--gpu-name", "sm_90a", os.path.join(d, "k.ptx"),
                                "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
            assert v.returncode == 0, v.stderr[-2000:]
            sass = subprocess.run([tool("nvdisasm"), "-c", os.path.join(d, "k.cubin")],
                                  capture_output=True, text=True).stdout
        loop = main_loop(sass)
        ops = collections.Counter(op.split(".")[0] for op in map(opcode, loop) if op)
        loads = collections.Counter(re.findall(r"ld[.]global[.][.\\w]*", ptx))
        print(json.dumps({"what": f"{fmt} mode {mode}", "regs": re.findall(r"Used (\\d+) registers", v.stderr),
                          "spills": re.findall(r"(\\d+) bytes spill stores", v.stderr),
                          "v4_loads": sum(n for k, n in loads.items() if ".v4." in k),
                          "per_weight": len(loop) * 32 * warps / (16 * 256),
                          "slow": {op: n for op, n in ops.items()
                                   if op in ("I2F", "I2FP", "SHFL", "BAR", "LDS", "STS")}}))
    zt.compile_dequant_sm90(fmt)  # prefill's dequantize kernel builds too
"""


def test_kernels_compile_for_sm90():
    """The GPU code, which the interpreter does not build: every type's B4 (and Q5_K's B2) and
    dequantize kernel compile for sm_90 at the default warps (Triton's bundled ptxas, in a child process: TRITON_INTERPRET
    replaces the compiler) without register spills, and reads the level bytes with 16-byte loads; the main loop
    (nvdisasm) stays within 6.5 SASS instructions a weight (issue 15: 4.4-5.8 today, 13-33 before) with at most
    2 I2F (Q6_K's two scales), no I2FP and no shuffle, barrier or shared-memory access."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SM90, "fp16"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    reports = [json.loads(ln) for ln in run.stdout.splitlines()]
    assert len(reports) == len(TYPES) + 1, run.stdout
    for r in reports:
        assert len(r["regs"]) == 1 and set(r["spills"]) <= {"0"}, r
        assert r["v4_loads"] >= 1, f"no 16-byte load: {r}"
        assert r["per_weight"] <= 6.5 and r["slow"].get("I2F", 0) <= 2 and set(r["slow"]) <= {"I2F"}, r


def _tuned_on_cuda() -> bool:
    """Whether the tuner times the CUDA GEMV of the types here (the H200, the H100), else the Triton one."""
    from spqt.kernels import zigzag_cuda

    return zigzag_cuda.usable() and zigzag_cuda.choice() != "triton"


# spqt bench gemv --types and spqt tune --types, in three tests that run in parallel (-n 8: one of 137 s on the
# H100 set the gpu suite's wall, forty-second session)
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["q8_0", "q2_k", "q6_k"])  # an item a type: run side by side (110 s as one item)
def test_tune_types(fmt):
    """`spqt tune --types` for the other types: the tuner times (two) candidates of B2 and B4 per type and shape and
    returns table entries (where the CUDA GEMV runs: its configs, the Triton fallback and the crossovers, MODE_KEPT's
    included)."""
    from spqt import bench
    from spqt.kernels import tuning

    on_cuda = _tuned_on_cuda()

    def two(variant, n, k):
        return (tuning.cuda_type_candidates if on_cuda else tuning.candidates)(variant, n, k)[:2]

    entries = bench.tune_types([(576, 192)], [fmt], log=lambda *a: None, candidates=two)
    assert set(entries) == {f"zigzag_{kind}_{fmt}" for kind in ("dense", "sparse")}
    for variant, found in entries.items():
        entry = found["576x192"]
        assert entry["us"] > 0 and entry["split"] >= 1
        assert (entry.get("impl") == "cuda") == on_cuda, entry  # timed on the kernel the runtime runs here
        if on_cuda:  # the Triton type kernel's config as the table had it (untimed here)
            assert entry["impl"] == "cuda" and entry["fallback"] == tuning.triton_config(variant, 576, 192), entry
            assert ("crossover" in entry) == ("sparse" in variant) == ("crossover_kept_fused" in entry), entry


@pytest.mark.gpu
def test_tune_types_crossovers_alone():
    """`spqt tune --crossover-only --types` where the CUDA GEMV runs the types: the crossovers alone, the configs kept
    (Q4_K's, borrowed, with the type's Triton config as the fallback and no timing of its own)."""
    from spqt import bench
    from spqt.kernels import tuning

    if not _tuned_on_cuda():
        pytest.skip("the CUDA GEMV does not run the types on this GPU: no crossovers of their own to tune")
    table = bench.tune_crossover([(576, 192)], log=lambda *a: None, types=("q2_k",))
    entry = table["zigzag_sparse_q2_k"]["576x192"]
    assert {"crossover", "crossover_fused", "crossover_kept", "crossover_kept_fused"} <= set(entry), entry
    assert entry["split"] == tuning.cuda_type_config("sparse", "q2_k", 576, 192)["split"]
    assert entry["fallback"] == tuning.triton_config("zigzag_sparse_q2_k", 576, 192) and "us" not in entry


@pytest.mark.gpu
def test_bench_gemv_types(tmp_path):
    """`spqt bench gemv --types`: B2 and B4 rows per type next to Q4_K's, every one timed, the JSON written."""
    from spqt import bench

    report = bench.run_gemv_benchmark([(576, 192)], [0.0, 0.5], ["B2", "B4"], json_path=tmp_path / "gemv.json",
                                      log=lambda *a: None, types=["q4_k", "q6_k"])
    rows = {(r["type"], r["variant"], r["sparsity"]) for r in report["rows"]}
    assert {("q6_k", "B2", 0.0), ("q6_k", "B4", 0.0), ("q6_k", "B4", 0.5), ("q4_k", "B4", 0.5)} <= rows
    assert all(r["us"] > 0 and r["gbps"] > 0 for r in report["rows"]) and (tmp_path / "gemv.json").is_file()
