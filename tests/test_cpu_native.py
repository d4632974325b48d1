"""The CPU's native maps (kernels/cpu_native.c): zigzag blocks of every type and fp16 matrices against
float64 products of the same weights, on fresh random data, odd shapes, poisoned outputs; the AVX2
build and the portable build; thread counts; the fallback when no compiler works."""

import json

import numpy as np
import pytest
import torch

from spqt.checkpoint import QuantizedWeight
from spqt.formats import get_format
from spqt.kernels import cpu_native
from spqt.layouts import grid_shape

# (N, K): N not a multiple of 32 / 64 / 256 (partial groups and superblock rows; 90: a last Q8_0
# group of one 32-row block row), K odd, K = 1, one superblock row, several
SHAPES = [(300, 77), (64, 1), (576, 576), (90, 33), (1000, 45)]
TYPES = ["q4_k", "q8_0", "q6_k", "q5_k", "q3_k", "q2_k"]


# where each format keeps its fp16 scales (d, dmin) in a block, and its largest |sub-block scale x quant|
HALVES = {"q4_k": (0, 2), "q8_0": (0,), "q6_k": (208,), "q5_k": (0, 2), "q3_k": (108,), "q2_k": (80, 82)}
LARGEST = {"q4_k": 63 * 15, "q8_0": 128, "q6_k": 128 * 32, "q5_k": 63 * 31, "q3_k": 32 * 4, "q2_k": 15 * 3}


def _zigzag(rng, fmt: str, n: int, k: int) -> QuantizedWeight:
    """Zigzag blocks of `fmt` for W (N, K): random bytes (every quant and sub-block scale pattern) with
    finite fp16 scales of either sign and different sizes (|W| < 1); their values are what decode says."""
    block = get_format(fmt)
    rows, cols = grid_shape("zigzag", (n, k), block.block_size)
    blocks = rng.integers(0, 256, (rows, cols, block.block_bytes), dtype=np.uint8)
    for at in HALVES[fmt]:
        d = rng.uniform(-1, 1, (rows, cols)) * 10.0 ** rng.uniform(-3, 0, (1, cols)) / LARGEST[fmt]
        blocks[:, :, at:at + 2] = d.astype(np.float16)[..., None].view(np.uint8)
    return QuantizedWeight(torch.from_numpy(blocks), fmt, "zigzag", (n, k))


def _input(rng, m: int, k: int, zeros: float) -> torch.Tensor:
    x = torch.from_numpy(rng.standard_normal((m, k))).float()
    x[torch.from_numpy(rng.random((m, k)) < zeros)] = 0.0  # a sparse step's masked inputs
    return x


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The build the runtime uses (-march=native, OpenMP) and a portable one (no SIMD paths)."""
    why = cpu_native.available()
    if why:
        pytest.skip(f"no native CPU build here: {why}")
    folder = tmp_path_factory.mktemp("native")
    portable = cpu_native.build("cc", ("-O2", "-shared", "-fPIC", "-std=c11", "-fopenmp"), folder / "portable.so")
    return {"native": cpu_native._library(), "portable": portable}


def _run(lib, fn: str, weight_ptr: int, n: int, k: int, x: torch.Tensor, residual, threads: int,
         fmt: str | None = None) -> torch.Tensor:
    y = torch.full((x.shape[0], n), float("nan"))  # poisoned: an output left unwritten fails
    head = () if fmt is None else (lib.spqt_zigzag_type(fmt.encode()),)
    getattr(lib, fn)(*head, weight_ptr, n, k, x.data_ptr(), x.shape[0], y.data_ptr(),
                     None if residual is None else residual.data_ptr(), threads)
    return y


@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("n,k", SHAPES)
def test_zigzag_matches_float64(builds, rng, fmt, n, k):
    """Both builds: y = residual + x W^T within fp32 rounding of the float64 product of the format's
    own values; every thread count gives the same bits; zero inputs skipped change nothing."""
    qw = _zigzag(rng, fmt, n, k)
    w64 = qw.dequantize().double()
    for lib in builds.values():
        assert lib.spqt_zigzag_type(fmt.encode()) >= 0
        for m, zeros in ((1, 0.0), (3, 0.5), (4, 0.2)):
            x = _input(rng, m, k, zeros)
            residual = torch.from_numpy(rng.standard_normal((m, n))).float()
            want = residual.double() + x.double() @ w64.t()
            bound = 1e-5 * float((x.double().abs() @ w64.abs().t()).max()) + 1e-6
            outs = [_run(lib, "spqt_zigzag", qw.blocks.data_ptr(), n, k, x, residual, t, fmt) for t in (1, 2, 3)]
            err = float((outs[0].double() - want).abs().max())
            assert err <= bound, f"max |diff| {err:.3e} > {bound:.3e}"
            assert all(torch.equal(outs[0], o) for o in outs[1:])
            plain = _run(lib, "spqt_zigzag", qw.blocks.data_ptr(), n, k, x, None, 2, fmt)
            assert torch.allclose(plain.double(), want - residual.double(), rtol=0, atol=2 * bound)


@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("n,k", [(300, 77), (513, 33), (44, 1)])
def test_rows_together_equal_each_row_alone(builds, rng, fmt, n, k):
    """Both builds, 2 to 7 rows (every type's AVX2 runs of ROWS_TOGETHER = 3: last runs of 1, 2 and 3
    rows; threads splitting a superblock row at various groups), a fifth of the inputs zero, a residual, 1
    to 3 threads: each output row's bits (signs of zero included) are that row's product alone, and the row after y
    is never written."""
    qw = _zigzag(rng, fmt, n, k)
    for lib in builds.values():
        code = lib.spqt_zigzag_type(fmt.encode())
        for m in range(2, 8):
            x = _input(rng, m, k, 0.2)
            residual = torch.from_numpy(rng.standard_normal((m, n))).float()
            alone = torch.cat([_run(lib, "spqt_zigzag", qw.blocks.data_ptr(), n, k, x[i : i + 1].contiguous(),
                                    residual[i : i + 1].contiguous(), 1, fmt) for i in range(m)])
            for threads in (1, 2, 3):
                y = torch.full((m + 1, n), float("nan"))  # a guard row after the output
                lib.spqt_zigzag(code, qw.blocks.data_ptr(), n, k, x.data_ptr(), m, y.data_ptr(), residual.data_ptr(),
                                threads)
                assert torch.equal(y[:m].view(torch.int32), alone.view(torch.int32)), (m, threads)
                assert bool(y[m].isnan().all())


@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("n,k", [(300, 77), (256, 64), (1000, 3), (80, 4), (4500, 3)])
def test_prefill_gemm_matches_float64(builds, rng, fmt, n, k):
    """A zigzag map's product of GEMM_ROWS rows or more (a prefill's) runs as x W^T through torch's GEMM on W^T
    dequantized for the call, a slab of block rows at a time: W^T (or a slab of it) is the format's own values
    exactly in both builds (every element written: the buffer poisoned; partial last block rows: 300, 1000, 80 and
    4500 outputs), every thread count the same bits; y within fp32 rounding of the float64 product, with a residual,
    through slabs of GEMM_SLAB outputs (the 4500-output map's eighteen) in the poisoned scratch buffer; fewer rows take
    the blocks row by row."""
    qw = _zigzag(rng, fmt, n, k)
    w64 = qw.dequantize().double()
    size = get_format(fmt).block_size
    rows = (n + size - 1) // size
    code = builds["native"].spqt_zigzag_type(fmt.encode())
    for lib in builds.values():
        for threads in (1, 2, 3):
            wt = torch.full((k, n), float("nan"))
            lib.spqt_zigzag_dequant_t(code, qw.blocks.data_ptr(), n, k, 0, rows, wt.data_ptr(), threads)
            assert torch.equal(wt.double(), w64.t())
        if rows > 1:  # block rows from the second on, past the last (r1 clipped to N)
            wt = torch.full((k, n - size), float("nan"))
            lib.spqt_zigzag_dequant_t(code, qw.blocks.data_ptr(), n, k, 1, rows + 3, wt.data_ptr(), 2)
            assert torch.equal(wt.double(), w64.t()[:, size:])
    impl = cpu_native.NativeZigzagLinear(qw, torch.float32, "cpu")
    for m, gemm in ((cpu_native.GEMM_ROWS, True), (cpu_native.GEMM_ROWS - 1, False)):
        cpu_native._scratch(k * cpu_native.GEMM_SLAB).fill_(float("nan"))  # a slab left unwritten fails
        x = _input(rng, m, k, 0.0).view(1, m, k)
        residual = torch.from_numpy(rng.standard_normal((1, m, n))).float()
        calls = []
        real = impl._gemm
        impl._gemm = lambda *a: calls.append(1) or real(*a)
        y = impl.product(x, residual)
        want = residual.double() + x.double() @ w64.t()
        bound = 1e-5 * float((x.double().abs() @ w64.abs().t()).max()) + 1e-6
        assert y.shape == (1, m, n) and bool(calls) == gemm
        assert float((y.double() - want).abs().max()) <= bound


@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_zigzag_sparse_masks_as_it_reads(builds, rng, fmt, criterion):
    """Both builds: the sparse product is the dense product of the reference's masked input, bit for
    bit, and the count of kept inputs, any thread count."""
    n, k, m = 300, 77, 2
    qw = _zigzag(rng, fmt, n, k)
    x = _input(rng, m, k, 0.1)
    scale = torch.from_numpy(rng.uniform(0.5, 2.0, k)).float() if criterion == "wina" else None
    score = x.abs() * (1 if scale is None else scale)
    t = float(score.median())
    keep = score > torch.tensor(t, dtype=torch.float32)
    masked = x * keep
    residual = torch.from_numpy(rng.standard_normal((m, n))).float()
    for lib in builds.values():
        code = lib.spqt_zigzag_type(fmt.encode())
        want = _run(lib, "spqt_zigzag", qw.blocks.data_ptr(), n, k, masked, residual, 1, fmt)
        for threads in (1, 2, 3):
            y = torch.full((m, n), float("nan"))
            kept = lib.spqt_zigzag_sparse(code, qw.blocks.data_ptr(), n, k, x.data_ptr(), m, y.data_ptr(),
                                          residual.data_ptr(), threads, t, None if scale is None else scale.data_ptr())
            assert kept == int(keep.sum()) and 0 < kept < m * k
            assert torch.equal(y, want)


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("n,k", [(37, 77), (130, 8), (64, 1), (200, 96)])
def test_half_gemm_matches_float64(builds, rng, build, n, k):
    """fp16 W (N, K): y = residual + x W^T within fp32 rounding, any thread count the same bits."""
    w = torch.from_numpy(rng.standard_normal((n, k))).half()
    x = _input(rng, 3, k, 0.2)
    residual = torch.from_numpy(rng.standard_normal((3, n))).float()
    want = residual.double() + x.double() @ w.double().t()
    bound = 1e-5 * float((x.double().abs() @ w.double().abs().t()).max()) + 1e-6
    outs = [_run(builds[build], "spqt_half_gemm", w.data_ptr(), n, k, x, residual, t) for t in (1, 2)]
    assert float((outs[0].double() - want).abs().max()) <= bound
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("fmt", TYPES)
def test_native_maps_through_linear(rng, fmt):
    """The runtime's maps: (..., K) inputs, a residual, SwiGLU, the sparse mask, fp16 compute dtype;
    a row-layout matrix keeps the fp16 GEMV."""
    if cpu_native.available():
        pytest.skip(cpu_native.available())
    from spqt.kernels.cpu_fp16 import HalfGemvLinear
    from spqt.linear import Linear

    qw = _zigzag(rng, fmt, 2 * 130, 70)
    w64 = qw.dequantize().double()
    lin = Linear(qw, torch.float32, "cpu", backend="cpu-native")
    assert isinstance(lin.impl, cpu_native.NativeZigzagLinear)
    rows, cols = qw.blocks.shape[:2]  # the same bytes read as a row-layout matrix
    row = QuantizedWeight(qw.blocks, fmt, "row", (rows, cols * get_format(fmt).block_size))
    assert isinstance(cpu_native.make_native_linear(row, torch.float32, "cpu"), HalfGemvLinear)
    x = torch.from_numpy(rng.standard_normal((1, 2, 70))).float()
    res = torch.from_numpy(rng.standard_normal((1, 2, 260))).float()
    full = x.double() @ w64.t()
    assert torch.allclose(lin(x, residual=res).double(), res.double() + full, atol=1e-4)
    gate, up = full[..., :130], full[..., 130:]
    assert torch.allclose(lin(x, swiglu=True).double(), torch.nn.functional.silu(gate) * up, atol=1e-4)
    lin.set_threshold(float(x.abs().median()))
    lin.sparse = True
    masked = x * (x.abs() > lin.threshold)
    assert torch.allclose(lin(x).double(), masked.double() @ w64.t(), atol=1e-4)
    half = Linear(qw, torch.float16, "cpu", backend="cpu-native")
    assert half(x.half()).dtype == torch.float16
    lin.sparse = False
    many = torch.from_numpy(rng.standard_normal((1, cpu_native.GEMM_ROWS, 70))).float()  # a prefill's rows
    full = many.double() @ w64.t()  # (through the GEMM), SwiGLU and the fp16 compute dtype
    gate, up = full[..., :130], full[..., 130:]
    assert torch.allclose(lin(many, swiglu=True).double(), torch.nn.functional.silu(gate) * up, atol=1e-4)
    got = half(many.half(), swiglu=True)
    assert got.dtype == torch.float16 and got.shape == (1, cpu_native.GEMM_ROWS, 130)
    head = Linear(torch.randn(50, 70), torch.float32, "cpu", backend="cpu-native")
    assert isinstance(head.impl, cpu_native.NativeHalfLinear)


def test_norm_and_swiglu_in_c(rng):
    """The native maps' RMSNorm in front (Linear's norm=) and SwiGLU after, dense and sparse, against the
    torch formulas in float64; the norm alone within fp32 rounding of torch's."""
    if cpu_native.available():
        pytest.skip(cpu_native.available())
    from spqt.linear import Linear
    from spqt.model import RMSNorm

    k, f = 77, 70
    qw = _zigzag(rng, "q4_k", 2 * f, k)
    w64 = qw.dequantize().double()
    norm = RMSNorm(k, 1e-5)
    norm.weight.data = torch.from_numpy(rng.uniform(0.5, 1.5, k)).float()
    lin = Linear(qw, torch.float32, "cpu", backend="cpu-native")
    x = torch.from_numpy(rng.standard_normal((1, 3, k)) * 3).float()
    x64 = x.double()
    normed = x64 / torch.sqrt(1e-5 + (x64 * x64).mean(-1, keepdim=True)) * norm.weight.double()
    c_normed = lin.impl.rms_norm(x, norm.weight, 1e-5)
    assert torch.allclose(c_normed.double(), normed, rtol=1e-6, atol=0)
    full = normed @ w64.t()
    want = torch.nn.functional.silu(full[..., :f]) * full[..., f:]
    bound = 1e-5 * float(want.abs().max())
    assert float((lin(x, norm=norm, swiglu=True).double() - want).abs().max()) <= bound
    lin.set_threshold(0.5)
    lin.sparse = True
    kept = normed * (c_normed.abs() > 0.5)  # the mask as the C norm's values decide it
    full = kept @ w64.t()
    want = torch.nn.functional.silu(full[..., :f]) * full[..., f:]
    assert float((lin(x, norm=norm, swiglu=True).double() - want).abs().max()) <= bound


@pytest.mark.parametrize("n_heads,n_kv,hd,pos,masked,softcap", [
    (6, 2, 16, 8, [3], 0.0), (4, 4, 16, 8, [3], 0.0), (9, 3, 64, 600, [3, 300], 0.0),
    (6, 2, 12, 530, list(range(256)), 0.0), (6, 2, 16, 8, [3], 1.5), (9, 3, 64, 600, [3, 300], 4.0)])
def test_decode_attention_in_c_matches_torch(rng, n_heads, n_kv, hd, pos, masked, softcap):
    """One token's RoPE, KV-cache write and attention in C against functional.attention's torch path:
    the caches' new rows and the output within fp32 rounding, the other cache rows untouched; masked keys
    ignored (a whole chunk of 256 keys in the last uncapped case); the spans of 601 and 531 keys take three chunks
    merged in order, the same bits on 1, 2 and 3 threads; hd 12 takes the scalar dot; prefill (T > 1) is not taken.
    With Gemma 2's soft-cap of the scores (small caps, which the scores here exceed: the capped output differs from
    the uncapped one), the C tanhf against torch's capped attention (functional._capped_attention)."""
    if cpu_native.available():
        pytest.skip(cpu_native.available())
    from spqt.functional import attention

    max_len = pos + 4
    table = torch.from_numpy(rng.standard_normal((max_len, hd))).float()
    qkv = torch.from_numpy(rng.standard_normal((1, 1, (n_heads + 2 * n_kv) * hd))).float()
    caches = [torch.from_numpy(rng.standard_normal((1, n_kv, max_len, hd))).float() for _ in range(2)]
    mask = torch.zeros(1, pos + 1)
    mask[0, masked] = float("-inf")
    positions = torch.tensor([pos])
    ref_k, ref_v = caches[0].clone(), caches[1].clone()
    want = attention(qkv, table, positions, ref_k, ref_v, n_heads, n_kv, mask, pos + 1, softcap=softcap)
    if softcap:  # (the cap bites)
        uncapped = attention(qkv, table, positions, ref_k.clone(), ref_v.clone(), n_heads, n_kv, mask, pos + 1)
        assert float((uncapped - want).abs().max()) > 0.05
    assert cpu_native.decode_attention_runs(qkv, caches[0], mask)
    runs, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(attention(qkv, table, positions, *caches, n_heads, n_kv, mask, pos + 1, native=True,
                                  softcap=softcap))
    finally:
        torch.set_num_threads(before)
    got = runs[0]
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(r, got) for r in runs[1:])
    assert torch.allclose(caches[0], ref_k, rtol=1e-6, atol=1e-6) and torch.equal(caches[1], ref_v)
    two = torch.cat([qkv, qkv], dim=1)
    assert not cpu_native.decode_attention_runs(two, caches[0], mask)


def test_soft_capped_attention_keeps_an_overflow_not_finite(rng):
    """Gemma 2's soft-cap of the scores leaves a non-finite score non-finite (tanh would cap an overflow into a finite
    score and hide it): functional.soft_cap on +-inf and NaN, and the attention, torch's capped route and the C one,
    with every cached key's score +inf (RoPE the identity, q's and the keys' first element 1 and +inf) is non-finite
    for every head, where it is finite at a finite score."""
    from spqt.functional import attention, soft_cap

    got = soft_cap(torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0, 100.0]), 30.0)
    assert got[0] == float("inf") and got[1] == -float("inf") and bool(torch.isnan(got[2]))
    torch.testing.assert_close(got[3:], 30.0 * torch.tanh(torch.tensor([1.0, 100.0]) / 30.0))
    n_heads, n_kv, hd, pos, cap = 4, 2, 16, 9, 2.0
    table = torch.cat([torch.ones(pos + 4, hd // 2), torch.zeros(pos + 4, hd // 2)], dim=1)  # [cos | sin]: no turn
    qkv = torch.from_numpy(rng.standard_normal((1, 1, (n_heads + 2 * n_kv) * hd))).float()
    qkv[0, 0, : n_heads * hd : hd] = 1.0  # every query head's first element
    caches = [torch.from_numpy(rng.standard_normal((1, n_kv, pos + 4, hd))).float() for _ in range(2)]
    mask, positions = torch.zeros(1, pos + 1), torch.tensor([pos])
    finite = attention(qkv, table, positions, caches[0].clone(), caches[1].clone(), n_heads, n_kv, mask, pos + 1,
                       softcap=cap)
    assert bool(torch.isfinite(finite).all())
    caches[0][:, :, :pos, 0] = float("inf")  # the cached keys' (the new one at pos is qkv's, finite)
    routes = [False, True] if cpu_native.available() is None else [False]  # (available(): why not, or None)
    for native in routes:
        if native:
            assert cpu_native.decode_attention_runs(qkv, caches[0], mask)
        out = attention(qkv, table, positions, caches[0].clone(), caches[1].clone(), n_heads, n_kv, mask, pos + 1,
                        native=native, softcap=cap)
        assert not bool(torch.isfinite(out).any()), f"native {native}"


def test_levels_below_the_cpu_crossover_run_dense(tiny_spqt, capsys, tmp_path):
    """On the CPU's native maps a level below cpu_native.SPARSE_FROM runs dense (the skipped blocks still stream, so
    the masking would cost more than it saves): generate says every map runs dense and why, counts nothing, and
    writes the dense run's text (the same level run sparse writes another); --no-dense-fallback runs them sparse; a
    level from SPARSE_FROM runs sparse; a level whose every map runs dense decodes as dense does. Per map: each map's
    own level decides (greedy thresholds give each its own), a map run dense while counting counts its inputs as
    kept, and a hooked input tap still sees the normed input."""
    if cpu_native.available():
        pytest.skip(cpu_native.available())
    from spqt.checkpoint import load_spqt, save_spqt
    from spqt.cli import main
    from spqt.generate import Generator, set_sparse, sparse_linears

    model = load_spqt(tiny_spqt)
    low = f"{cpu_native.SPARSE_FROM - 0.1:g}"
    model.thresholds = {"unified": {low: [[0.3] * 4] * model.config.n_layers,
                                    f"{cpu_native.SPARSE_FROM:g}": [[0.3] * 4] * model.config.n_layers}}
    save_spqt(model, tmp_path / "sparse.spqt")
    impl = cpu_native.NativeZigzagLinear(model.weights["layers.0.o"], torch.float32, "cpu")
    assert impl.sparse_pays(None) and impl.sparse_pays(cpu_native.SPARSE_FROM)
    assert not impl.sparse_pays(cpu_native.SPARSE_FROM - 0.01)
    runs = {}
    for level, extra in (("0", []), (low, []), (low, ["--no-dense-fallback"]), (f"{cpu_native.SPARSE_FROM:g}", [])):
        record = tmp_path / "gen.json"
        capsys.readouterr()
        assert main(["generate", str(tmp_path / "sparse.spqt"), "-p", "hello world", "-n", "8", "--device", "cpu",
                     "--gemv", "native", "--sparsity", level, "--json", str(record), *extra]) == 0
        err, doc = capsys.readouterr().err, json.loads(record.read_text())
        runs[level, bool(extra)] = doc
        dense = level == low and not extra
        assert ("every linear map runs dense: at this level their sparse kernel is not faster on the CPU" in err) \
            == dense, err
        achieved = doc["achieved_sparsity"]
        assert (achieved is None) if level == "0" or dense else 0 < achieved["all"] < 1, (level, extra, achieved)
    assert runs[low, True]["text"] != runs["0", False]["text"]  # the level drops enough to change the text
    assert runs[low, False]["text"] == runs["0", False]["text"]
    every_dense = Generator(model, "cpu", backend="cpu-native", sparsity=float(low), max_len=32)
    flags = []  # such a level decodes as dense does: no map in the sparse path, the answer's keys reusable
    out = every_dense.generate([5, 6, 7], 4, reuse=True, on_token=lambda t: flags.append(
        any(lin.sparse for _, _, lin in sparse_linears(every_dense.model)))).tokens
    assert flags == [False] * 4 and every_dense.reusable_prefix([5, 6, 7] + out + [1]) == 3 + 3
    from spqt.serve.engine import Engine  # a server counts only where a map runs sparse, as generate

    for level, counts in ((float(low), False), (cpu_native.SPARSE_FROM, True)):
        assert Engine(model, "cpu", level, ctx=16, backend="cpu-native").track == counts, level

    gen = Generator(model, "cpu", backend="cpu-native", max_len=16)
    maps = list(sparse_linears(gen.model))
    for i, (_, _, lin) in enumerate(maps):  # levels around the crossover, as greedy thresholds give them
        lin.set_threshold(0.3, level=cpu_native.SPARSE_FROM + (0.1 if i % 2 else -0.1))
    below = [f"layers.{layer}.{kind}" for i, (layer, kind, _) in enumerate(maps) if i % 2 == 0]
    assert gen.dense_fallbacks() == below and gen.dense_step_reason() is None
    seen = []
    lin = maps[0][2]  # below: dense, counted as kept, its tap still called
    lin.input_tap.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    set_sparse(gen.model, True, track=True)
    x = torch.randn(1, 1, lin.in_features)
    with torch.inference_mode():
        y = lin(x)
    assert torch.equal(y, lin.impl.dense(x)) and torch.equal(seen[0], x)
    assert lin.counts.tolist() == [0.0, float(lin.in_features)]


def test_no_compiler_is_one_line_and_the_cli_falls_back(tiny_spqt, monkeypatch, capsys):
    """Without a C compiler: --gemv auto notes it and runs the fp16 GEMV; --gemv native is one error line."""
    from spqt.cli import main

    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert "no C compiler" in cpu_native.available()
    assert main(["generate", str(tiny_spqt), "-p", "once upon", "-n", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "using the fp16 GEMV" in err and "fp16-gemv" in err
    assert main(["generate", str(tiny_spqt), "-p", "once upon", "-n", "2", "--device", "cpu", "--gemv", "native"]) == 2
    assert "--gemv native cannot run here: no C compiler" in capsys.readouterr().err


def test_a_failing_compiler_is_reported(monkeypatch, tmp_path):
    """A compiler that fails: the reason in one line, nothing left in the cache."""
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: no such option' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("SPQT_CACHE", str(tmp_path / "cache"))
    assert cpu_native.available() == "the C compiler failed: cc: error: no such option"
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_a_hanging_compiler_times_out(monkeypatch, tmp_path):
    """A compiler that does not finish: one line saying so, nothing left in the cache."""
    from spqt import native

    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setattr(native, "COMPILE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(cpu_native, "_state", {})
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("SPQT_CACHE", str(tmp_path / "cache"))
    assert cpu_native.available() == "the C compiler did not finish in 0.5 s"
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_compiled_kernels_share_the_cache_root(monkeypatch, tmp_path):
    """The C kernels, the CUDA kernels and the default model under one root: $SPQT_CACHE, else
    $XDG_CACHE_HOME/spqt (the CUDA kernels' cache ignored $XDG_CACHE_HOME before)."""
    from spqt import default_model, native
    from spqt.kernels import nvrtc

    monkeypatch.delenv("SPQT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "xdg" / "spqt"
    assert (default_model.cache_dir(), native.cache_dir(), nvrtc._cache_dir()) == (root, root / "cpu", root / "cuda")
    monkeypatch.setenv("SPQT_CACHE", str(tmp_path / "own"))
    assert nvrtc._cache_dir() == tmp_path / "own" / "cuda"


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_cache_root_ignores_an_empty_or_relative_xdg_cache_home(monkeypatch, tmp_path, xdg):
    """XDG_CACHE_HOME set but empty (or relative) is ignored, as the XDG spec asks and the tuned tables' folder does
    (tuning.user_table_path): it put the cache, the default model's conversion included, under the working
    directory ('spqt' or 'relative/cache/spqt')."""
    from spqt import default_model

    monkeypatch.delenv("SPQT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert default_model.cache_dir() == tmp_path / "home" / ".cache" / "spqt"
