"""The CPU decode path (issue 18): the reference's GEMV layouts, the fp16 fast path against exact
products and against the reference, the one-mask sparse path, the decode thread choice."""

import time

import pytest
import torch
import torch.nn.functional as F

from spqt import functional
from spqt.cpu_threads import DecodeThreads
from spqt.generate import Generator, build_model
from spqt.kernels.cpu_fp16 import HalfGemvLinear
from spqt.kernels.reference import ReferenceLinear, sparsify
from spqt.linear import Linear

FP32_U = 2.0 ** -24  # unit roundoff of fp32
FP16_U = 2.0 ** -11  # unit roundoff of fp16
# odd shapes, both sides of the transposed layout (N > K) and square
SHAPES = [(37, 19), (19, 37), (64, 64), (96, 40)]


def _data(rng, n, k, tokens=1):
    w = torch.from_numpy(rng.standard_normal((n, k))).float() / k ** 0.5
    x = torch.from_numpy(rng.standard_normal((1, tokens, k))).float()
    return w, x


def _bound(w, x, unit):
    """|sum of products| error bound per output: unit * sum_k |w_nk| |x_k|, plus fp32's own summation."""
    mag = x.abs().double() @ w.abs().double().t()
    return ((unit + w.shape[1] * FP32_U) * mag).float()


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_reference_layouts_equal_plain_products(rng, n, k, tokens):
    """W^T stored for N > K (what MKL's one-token GEMV reads faster) changes only the summation order."""
    w, x = _data(rng, n, k, tokens)
    ref = ReferenceLinear(w, torch.float32, "cpu")
    assert ref.transposed == (n > k)
    assert not ReferenceLinear(w, torch.float16, "cpu").transposed  # fp16 reads (N, K) faster
    exact = (x.double() @ w.double().t()).float()
    residual = torch.from_numpy(rng.standard_normal((1, tokens, n))).float()
    tol = _bound(w, x, 0) + FP32_U * residual.abs()
    assert ((ref.dense(x) - exact).abs() <= tol).all()
    assert ((ref.dense(x, residual) - (residual + exact)).abs() <= tol + FP32_U * exact.abs()).all()
    if n % 2 == 0:
        want = F.silu(exact[..., : n // 2]) * exact[..., n // 2:]
        torch.testing.assert_close(ref.dense(x, swiglu=True), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,k", SHAPES)
def test_half_gemv_within_fp16_rounding(rng, n, k):
    """W, x and the output each rounded to fp16 once, products summed in fp32: within 3 fp16 units of
    sum |w||x| of the exact product (plus fp16's subnormal spacing for tiny weights)."""
    w, x = _data(rng, n, k)
    fast = HalfGemvLinear(w, torch.float32, "cpu")
    exact = (x.double() @ w.double().t()).float()
    y = fast.dense(x)
    assert y.dtype == torch.float32 and y.shape == exact.shape
    tol = _bound(w, x, 3 * FP16_U) + 2.0 ** -24 * x.abs().sum()
    assert ((y - exact).abs() <= tol).all()
    assert (y - exact).abs().max() > 0  # it does round: the test can tell fp16 from fp32
    residual = torch.from_numpy(rng.standard_normal((1, 1, n))).float()
    assert torch.equal(fast.dense(x, residual), residual + y)
    t = torch.tensor(float(x.abs().median()))
    assert torch.equal(fast.sparse(x, t), fast.dense(sparsify(x, t)))


@pytest.mark.parametrize("dim", [7, 64, 576])
def test_cpu_norm_is_torch_rms_norm_bit_for_bit(rng, dim):
    """functional.rms_norm on the CPU (torch's arithmetic in 7 aten calls, not 24) equals F.rms_norm
    bit for bit: decode rows and prefill rows, small and large magnitudes, two eps."""
    for tokens, scale, eps in [(1, 1.0, 1e-5), (5, 1e-3, 1e-6), (3, 40.0, 1e-5)]:
        x = torch.from_numpy(rng.standard_normal((1, tokens, dim)) * scale).float()
        w = torch.from_numpy(rng.uniform(0.1, 2.0, dim)).float()
        assert torch.equal(functional.rms_norm(x, w, eps), F.rms_norm(x, (dim,), w, eps))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_rope_is_the_rotate_half_formula_bit_for_bit(rng, dtype):
    """rope_kv on the CPU (x * [cos|cos] + roll(x) * [-sin|sin] from a rotation table cached per RoPE
    table) returns q and writes k and v exactly as x1 cos - x2 sin | x2 cos + x1 sin in fp32 would,
    prefill and decode, and follows an in-place change of the table."""
    heads, kv, hd, length = 3, 1, 16, 12
    table = torch.from_numpy(rng.standard_normal((length, hd))).float()
    for step in range(3):
        positions = torch.arange(5) if step == 0 else torch.tensor([4 + step])
        qkv = torch.from_numpy(rng.standard_normal((1, len(positions), (heads + 2 * kv) * hd)) * 3).to(dtype)
        caches = [torch.zeros(1, kv, length, hd, dtype=dtype) for _ in range(2)]
        q = functional.rope_kv(qkv, table, positions, *caches, heads, kv)
        x = qkv.float().reshape(1, len(positions), heads + 2 * kv, hd)
        cos, sin = table[positions][None, :, None].chunk(2, dim=-1)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        want = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)
        assert torch.equal(q, want[:, :, :heads])
        assert torch.equal(caches[0][:, :, positions].transpose(1, 2), want[:, :, heads:heads + kv])
        assert torch.equal(caches[1][:, :, positions].transpose(1, 2), qkv.reshape(x.shape)[:, :, heads + kv:])
        table.mul_(0.5)  # the cached rotation table must follow


@pytest.mark.parametrize("backend", ["reference", "cpu-fp16", "cpu-native"])
@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_one_mask_sparse_path_equals_sparse_and_counts(rng, backend, criterion):
    """Linear masks once on the CPU (hardshrink for TEAL): the product of impl.sparse, and the
    dropped inputs counted, over two steps."""
    w, x = _data(rng, 48, 40)
    lin = Linear(w, torch.float32, "cpu", backend=backend)
    scale = torch.from_numpy(rng.uniform(0.5, 2.0, 40)).float() if criterion == "wina" else None
    lin.set_scale(scale)
    score = x.abs() * (1 if scale is None else scale)
    t = float(score.median())
    lin.set_threshold(t)
    lin.sparse, lin.track = True, True
    residual = torch.randn(1, 1, 48)
    for _ in range(2):
        y = lin(x, residual=residual)
        assert torch.equal(y, lin.impl.sparse(x, lin.threshold, residual, scale=lin.scale))
    dropped = int((score <= t).sum())
    assert lin.counts.tolist() == [2 * dropped, 80] and 0 < dropped < 40


@pytest.mark.parametrize("backend", ["reference", "cpu-fp16", "cpu-native"])
@pytest.mark.parametrize("stored", ["float", "q4_k"])
def test_cpu_sparse_path_follows_a_threshold_changed_in_place(rng, backend, stored):
    """A threshold changed in place (as a captured CUDA graph needs, and as tests nudge it) is what
    the next CPU forward masks with."""
    import spqt
    from spqt.checkpoint import QuantizedWeight

    w, x = _data(rng, 48, 40)
    if stored == "q4_k":
        w = QuantizedWeight(spqt.quantize(w, "q4_k", layout="zigzag"), "q4_k", "zigzag", tuple(w.shape))
    lin = Linear(w, torch.float32, "cpu", backend=backend)
    lin.set_threshold(float(x.abs().min()) / 2)
    lin.sparse = True
    low = lin(x)
    lin.threshold.fill_(float(x.abs().median()))
    assert torch.equal(lin(x), lin.impl.dense(x * (x.abs() > lin.threshold)))
    assert not torch.equal(lin(x), low)


def test_fast_model_close_to_reference(tiny_spqt):
    """The whole tiny model, prefill and then decode steps fed the same tokens: logits within a few
    fp16 units of the logit range; torch's thread count unchanged after a generation."""
    from spqt.checkpoint import load_spqt

    loaded = load_spqt(tiny_spqt)
    ids = torch.randint(0, loaded.config.vocab_size, (1, 38), generator=torch.Generator().manual_seed(7))
    logits = {}
    for backend in ("reference", "cpu-fp16", "cpu-native"):
        model = build_model(loaded, "cpu", torch.float32, backend)
        model.setup_cache(1, 38, torch.float32)
        with torch.no_grad():
            steps = [model(ids[:, :30], torch.arange(30), kv_len=30)]
            steps += [model(ids[:, p:p + 1], torch.tensor([p]), kv_len=p + 1) for p in range(30, 38)]
        logits[backend] = torch.cat(steps, dim=1)
    ref, fast = logits["reference"], logits["cpu-fp16"]
    span = float(ref.max() - ref.min())
    # each GEMV output is within 3 fp16 units; 2 layers of 4 maps and the head: 8 units of the range
    err = float((fast - ref).abs().max())
    assert 0 < err <= 8 * FP16_U * span, f"max |diff| {err:.3e}, logit range {span:.2f}"
    # the native maps sum the Q4_K values themselves in fp32 (only the tied head is rounded to fp16)
    err = float((logits["cpu-native"] - ref).abs().max())
    assert 0 < err <= 2 * FP16_U * span, f"native: max |diff| {err:.3e}, logit range {span:.2f}"
    threads = torch.get_num_threads()
    Generator(loaded, "cpu", backend="cpu-fp16", max_len=40).generate(ids[0, :30].tolist(), 4)
    assert torch.get_num_threads() == threads


@pytest.mark.slow
def test_default_model_fast_greedy_equals_reference(default_gguf):
    """The default model's weights: the fp16 and native fast paths decode the demo prompt's greedy
    tokens of the fp32 reference."""
    from spqt.checkpoint import load_model
    from spqt.tokenizer import TextTokenizer

    loaded = load_model(default_gguf)
    ids = TextTokenizer(loaded.tokenizer, loaded.config).encode("The three primary colors are")
    tokens = {b: Generator(loaded, "cpu", backend=b, max_len=64).generate(ids, 32).tokens
              for b in ("reference", "cpu-fp16", "cpu-native")}
    assert tokens["cpu-fp16"] == tokens["reference"]
    assert tokens["cpu-native"] == tokens["reference"]


@pytest.mark.parametrize("slow_at", ["all", "one"])
def test_decode_threads_keep_the_faster_count(slow_at):
    """The probe decides: all threads when they are faster, one when a busy core stalls them."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def probe():
            if (torch.get_num_threads() > 1) == (slow_at == "all"):
                time.sleep(0.003)

        choice = DecodeThreads(probe, every=4)
        assert choice.choose() == (1 if slow_at == "all" else 2) == torch.get_num_threads()
        choice.check(3)  # not a probing step: unchanged
        assert torch.get_num_threads() == choice.threads
        if slow_at == "one":
            # a core gets busy: a stalled step on 2 threads probes again at once
            choice.observe(0.01)
            choice.observe(0.012)
            assert choice.threads == 2
            slow_at = "all"
            choice.observe(0.5)
            assert choice.threads == 1 == torch.get_num_threads()
        choice.restore()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_levels_are_part_of_the_graph_key(tiny_spqt):
    """Which maps run dense (below their crossover) is decided when a decode step is captured as a
    CUDA graph, from each map's level: set_thresholds puts the levels into model.switches, which
    Generator._graph_at keys its graphs by, so a new level gets new graphs (a graph captured at
    one level was replayed at another before) and the same level keeps them."""
    from spqt.checkpoint import load_spqt
    from spqt.generate import set_thresholds

    loaded = load_spqt(tiny_spqt)
    model = build_model(loaded, "cpu", torch.float32, "reference")
    n = loaded.config.n_layers
    table = torch.full((n, 4), 0.1)
    keys = []
    for level in (0.25, 0.5, 0.5):
        set_thresholds(model, table, torch.full((n, 4), level))
        keys.append(tuple(sorted(model.switches.items())))
    assert keys[0] != keys[1] and keys[1] == keys[2]
    set_thresholds(model, None)
    assert dict(model.switches)["levels"] is None


def test_prefill_buckets():
    """The CUDA prefill's padded lengths (generate.Generator._prefill_bucket): every prompt fits its bucket, powers of
    two from 16 to 256, multiples of 256 past that (at most 255 tokens of padding), never past the cache."""
    from types import SimpleNamespace

    from spqt import generate as g

    for max_len in (10, 300, 4096):
        stub = SimpleNamespace(max_len=max_len)
        for n in range(1, min(max_len, g.PREFILL_GRAPH_MAX) + 1):
            b = g.Generator._prefill_bucket(stub, n)
            assert n <= b <= max_len, (max_len, n, b)
            if b < max_len:
                if b <= g.PREFILL_BUCKET_STEP:
                    assert b == max(g.PREFILL_BUCKET_MIN, 1 << (n - 1).bit_length()), (n, b)
                else:
                    assert b % g.PREFILL_BUCKET_STEP == 0 and b - n < g.PREFILL_BUCKET_STEP, (n, b)
    stub = SimpleNamespace(max_len=4096)
    assert sorted({g.Generator._prefill_bucket(stub, n) for n in range(1, 2049)}) == \
        [16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]


@pytest.mark.parametrize("layout, gemv", [("zigzag", "fp16"), ("row", "auto"), ("float", "auto")])
def test_fp16_gemv_maps_run_dense_at_a_level(tiny_hf, tmp_path, capsys, layout, gemv):
    """The fp16 GEMV's sparse product reads every weight (HalfGemvLinear / NativeHalfLinear.sparse_pays: never):
    with the dense fallback, a level runs these maps dense (the dense tokens, one note naming why);
    --no-dense-fallback runs them sparse, as asked. A row-layout map takes the fp16 GEMV on every CPU backend but
    the reference, and a float model (an HF folder or GGUF run in its own weights) the native fp16 maps."""
    import json

    from conftest import save_quantized
    from spqt.checkpoint import load_model, load_spqt, save_spqt
    from spqt.cli import main
    from spqt.kernels import cpu_native

    table = {"unified": {"0.5": [[0.3] * 4] * 2}}
    if layout == "float":
        model, path = load_model(tiny_hf), tiny_hf
        (tmp_path / "t.json").write_text(json.dumps({"thresholds": table}))
        extra_args = ["--thresholds", str(tmp_path / "t.json")]
        if cpu_native.available() is None:
            assert not cpu_native.NativeHalfLinear(model.weights["layers.0.o"], torch.float32, "cpu").sparse_pays(0.5)
    else:
        model = load_spqt(save_quantized(tiny_hf, tmp_path / "m.spqt", layout=layout))
        assert model.config.n_layers == 2
        model.thresholds, path, extra_args = table, tmp_path / "m.spqt", []
        save_spqt(model, path)
        assert not HalfGemvLinear(model.weights["layers.0.o"], torch.float32, "cpu").sparse_pays(0.5)
    runs = {}
    for level, extra in (("0", []), ("0.5", []), ("0.5", ["--no-dense-fallback"])):
        record = tmp_path / "gen.json"
        capsys.readouterr()
        assert main(["generate", str(path), "-p", "hello world", "-n", "8", "--device", "cpu", "--gemv", gemv,
                     "--sparsity", level, "--json", str(record), *extra_args, *extra]) == 0
        err, runs[level, bool(extra)] = capsys.readouterr().err, json.loads(record.read_text())
        dense = level == "0.5" and not extra
        assert ("every linear map runs dense: the fp16 GEMV (a float or row-layout map, or --gemv fp16) reads every"
                in err) == dense, err
    assert runs["0.5", False]["text"] == runs["0", False]["text"] and runs["0.5", False]["achieved_sparsity"] is None
    assert 0 < runs["0.5", True]["achieved_sparsity"]["all"] < 1


def test_soft_capped_logits_keep_an_overflow_not_finite(tiny_spqt, monkeypatch):
    """Gemma 2's soft-cap of the logits (cap tanh(z / cap)) would turn an fp16 overflow of the head (+-inf) into +-cap,
    a finite logit the generator's check passes: with the cap set and the head's fp16 outputs overflowing, generate()
    stops with the one non-finite error, greedy and sampling; the finite logits are capped (|z| < cap, and the head's
    small outputs kept to within tanh's rounding)."""
    import dataclasses

    from spqt.checkpoint import load_spqt
    from spqt.errors import SpqtError
    from spqt.generate import Sampling

    gen = Generator(load_spqt(tiny_spqt), "cpu", dtype=torch.float16, max_len=64)
    cap = 30.0
    monkeypatch.setattr(gen.model, "config", dataclasses.replace(gen.model.config, final_logit_softcap=cap))
    h = torch.randn(1, 3, gen.model.config.dim, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    with torch.no_grad():
        plain = gen.model.output(gen.model.norm(h)).float()
        capped = gen.model.logits(h)
    assert bool(torch.isfinite(capped).all()) and float(capped.abs().max()) < cap
    torch.testing.assert_close(capped, cap * torch.tanh(plain / cap))
    head = gen.model.output.forward
    monkeypatch.setattr(gen.model.output, "forward", lambda x: head(x) * 1e6)  # fp16: past 65504, +-inf
    with torch.no_grad():
        assert bool(torch.isinf(gen.model.logits(h)).any())
    for sampling in (Sampling(), Sampling(0.8, seed=1)):
        with pytest.raises(SpqtError, match=r"logits of the prompt are not finite numbers in fp16"):
            gen.generate([3, 17, 42], 4, sampling)


def test_logits_that_are_not_finite_stop_with_one_error(tiny_spqt, monkeypatch):
    """Activations that overflow fp16 with every weight finite (layer 0's attention norm weight scaled by 1e5: its
    outputs past 65504) stop generate() after the prefill, greedy or sampling (before a NaN probability would),
    and perplexity(), with one SpqtError naming fp16 and bf16; in fp32 and bf16 the same model generates. NaN logits
    that appear in a decode step alone stop the generation at that step, greedy or sampling, and leave the generator
    as a fresh one (maps dense, the KV cache anew): its next generation gives a fresh generator's tokens."""
    from spqt.checkpoint import load_spqt
    from spqt.errors import SpqtError
    from spqt.evaluate import perplexity
    from spqt.generate import Sampling

    for dtype in (torch.float16, torch.float32, torch.bfloat16):
        gen = Generator(load_spqt(tiny_spqt), "cpu", dtype=dtype, max_len=64)
        with torch.no_grad():
            gen.model.layers[0].attention_norm.weight.mul_(1e5)
        assert all(bool(torch.isfinite(t).all()) for t in gen.model.state_dict().values() if t.is_floating_point())
        if dtype == torch.float16:
            for sampling in (Sampling(), Sampling(0.8, seed=1)):
                with pytest.raises(SpqtError, match=r"logits of the prompt are not finite numbers in fp16: .*bf16"):
                    gen.generate([3, 17, 42], 4, sampling)
            with pytest.raises(SpqtError, match="logits of the text are not finite numbers in fp16"):
                perplexity(gen, list(range(3, 67)), ctx=32)
        else:
            assert len(gen.generate([3, 17, 42], 4).tokens) == 4, dtype
    loaded = load_spqt(tiny_spqt)
    want = Generator(loaded, "cpu", max_len=64).generate([3, 17, 42], 6).tokens
    gen = Generator(loaded, "cpu", max_len=64)
    real, steps = gen.decode_step, []

    def poisoned(token, pos):  # the second decode step's logits NaN
        steps.append(pos)
        out = real(token, pos)
        return out * float("nan") if len(steps) == 2 else out

    for sampling in (Sampling(), Sampling(0.8, seed=1)):
        steps.clear()
        monkeypatch.setattr(gen, "decode_step", poisoned)
        with pytest.raises(SpqtError, match="logits after 2 new tokens are not finite numbers in fp32: the activations"):
            gen.generate([3, 17, 42], 5, sampling)
        assert len(steps) == 2
        monkeypatch.setattr(gen, "decode_step", real)
        assert gen.generate([3, 17, 42], 6).tokens == want
