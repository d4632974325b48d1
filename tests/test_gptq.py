"""Error-compensating quantization (gptq.py) and the formats' grids it rounds to (grid / with_codes)."""

import gc
import importlib
import weakref

import pytest
import torch

from spqt import gptq
from spqt.formats import FORMATS, codec
from spqt.layouts import grid_shape
from spqt.quant import dequantize, quantize

TYPES = list(FORMATS)


def _blocks_of(rng, n: int, size: int) -> torch.Tensor:
    """n random blocks of weights on varied scales, with a few zero and constant sub-blocks."""
    x = torch.from_numpy(rng.standard_normal((n, size)).astype("float32")) * torch.from_numpy(
        rng.uniform(0.001, 2.0, (n, 1)).astype("float32"))
    x[0] = 0.0
    x[1, : size // 2] = 0.25
    return x


@pytest.mark.parametrize("fmt", TYPES)
def test_grid_gives_the_decoded_values_and_with_codes_moves_only_the_codes(fmt, rng):
    module = importlib.import_module(f"spqt.formats.{fmt}")
    encode, decode = codec(fmt)
    blocks = encode(_blocks_of(rng, 37, FORMATS[fmt].block_size))
    scale, offset, codes = module.grid(blocks)
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0 and int(codes.max()) <= module.CODE_MAX
    values = decode(blocks)
    if fmt in ("q4_k", "q5_k", "q2_k"):  # decode computes scale * code - offset itself: the same bits
        assert torch.equal(scale * codes - offset, values)
    else:  # decode computes scale * (code - bias): the same value up to one rounding
        assert torch.allclose(scale * codes - offset, values, rtol=0, atol=1e-6 * float(values.abs().max()))
    assert torch.equal(module.with_codes(blocks, codes), blocks)
    before = blocks.clone()
    new = torch.from_numpy(rng.integers(0, module.CODE_MAX + 1, codes.shape))
    changed = module.with_codes(blocks, new)
    assert torch.equal(blocks, before)  # a copy
    scale2, offset2, codes2 = module.grid(changed)
    assert torch.equal(codes2, new) and torch.equal(scale2, scale) and torch.equal(offset2, offset)
    assert torch.allclose(decode(changed), scale * new - offset, rtol=0, atol=1e-6 * float(values.abs().max() + 1))


def _inputs_hessian(rng, k: int, count: int = 3000) -> torch.Tensor:
    """X^T X / n of correlated inputs with uneven energies, float64 (k, k)."""
    mix = torch.from_numpy(rng.standard_normal((k, k)) * 0.3) + torch.eye(k, dtype=torch.float64)
    x = torch.from_numpy(rng.standard_normal((count, k))) @ mix * torch.from_numpy(rng.uniform(0.1, 3.0, k))
    return x.T @ x / count


# zigzag: N not a multiple of 256 (or 32); row: K not a multiple of 256
SHAPES = {"zigzag": (300, 72), "row": (40, 300)}


@pytest.mark.parametrize("layout", ["zigzag", "row"])
@pytest.mark.parametrize("fmt", TYPES)
def test_compensation_lowers_the_output_error(fmt, layout, rng):
    n, k = SHAPES[layout]
    w = torch.from_numpy(rng.standard_normal((n, k)).astype("float32")) * 0.05
    h = _inputs_hessian(rng, k)
    blocks = gptq.quantize_compensated(w, h, fmt, layout, batch=32)
    size = FORMATS[fmt].block_size
    assert blocks.shape == (*grid_shape(layout, (n, k), size), FORMATS[fmt].block_bytes)
    plain = quantize(w, fmt, layout)
    error = gptq.output_error(w, dequantize(blocks, fmt, layout, (n, k)), h)
    plain_error = gptq.output_error(w, dequantize(plain, fmt, layout, (n, k)), h)
    assert error < 0.8 * plain_error, (error, plain_error)
    result = gptq.quantize_map(w, h, fmt, layout)
    assert result.error == pytest.approx(gptq.output_error(w, dequantize(result.blocks, fmt, layout, (n, k)), h))
    assert result.plain_error == pytest.approx(plain_error)


@pytest.mark.parametrize("layout", ["zigzag", "row"])
def test_the_blocks_do_not_depend_on_the_scale_of_h(layout, rng):
    """H and c * H describe the same inputs up to a gain: the same blocks (the damping is a share of H's diagonal,
    and padding columns must not weigh in it)."""
    n, k = SHAPES[layout]
    w = torch.from_numpy(rng.standard_normal((n, k)).astype("float32"))
    h = _inputs_hessian(rng, k)
    first = gptq.quantize_compensated(w, h, "q4_k", layout, batch=32)
    for gain in (4.0**-6, 4.0**3):  # even powers of two: every float step scales exactly, square roots too
        assert torch.equal(gptq.quantize_compensated(w, gain * h, "q4_k", layout, batch=32), first), gain


@pytest.mark.parametrize("layout", ["zigzag", "row"])
@pytest.mark.parametrize("fmt", ["q4_k", "q5_k", "q2_k"])
def test_uncorrelated_inputs_leave_the_plain_encoders_bytes(fmt, layout, rng):
    """With a diagonal H no error moves to another column, and these formats' encoders round every weight to the
    nearest point of the grid they chose, as the compensation's rounding does: the same bytes."""
    n, k = SHAPES[layout]
    w = torch.from_numpy(rng.standard_normal((n, k)).astype("float32"))
    h = torch.diag(torch.from_numpy(rng.uniform(0.1, 3.0, k)))
    assert torch.equal(gptq.quantize_compensated(w, h, fmt, layout, batch=16), quantize(w, fmt, layout))


def test_quantize_source_compensates_every_layer(tmp_path):
    """The conversion with calibration tokens: every map compensated, the record in the provenance, and the
    quantized model's logits nearer the float model's on other tokens of the same kind than the plain one's
    (fixed seeds: the same model and tokens every run)."""
    from conftest import make_hf_checkpoint
    from spqt.checkpoint import fused_float_weights, quantize_source
    from spqt.generate import build_model
    from spqt.sources import open_source

    source = open_source(make_hf_checkpoint(tmp_path / "m", n_layers=2, dim=64, ffn_dim=160))
    vocab = source.config.vocab_size
    g = torch.Generator().manual_seed(1)
    calibration = torch.randint(0, vocab, (4 * 512,), generator=g).tolist()
    threads = torch.get_num_threads()
    compensated = quantize_source(source, "q3_k", "zigzag", calibration=calibration, calibration_tokens=2048)
    assert torch.get_num_threads() == threads
    record = compensated.provenance["gptq"]
    assert record["tokens"] == 2048 and record["maps"] == 8 and record["maps_compensated"] == 8
    assert record["mean_output_error_vs_plain"] < 0.9
    plain = quantize_source(source, "q3_k", "zigzag")
    assert list(compensated.weights) == list(plain.weights)
    assert list(compensated.column_norms) == list(plain.column_norms)
    tokens = torch.randint(0, vocab, (2, 64), generator=g)

    def logits(loaded):
        model = build_model(loaded)
        model.setup_cache(2, 64, torch.float32)
        with torch.no_grad():
            return model(tokens, torch.arange(64), kv_len=64)

    reference = logits(fused_float_weights(source))
    # a random model's inputs are nearly uncorrelated, so little error can move: lower, by 8 % on these tokens
    assert (logits(compensated) - reference).pow(2).mean() < 0.97 * (logits(plain) - reference).pow(2).mean()


def test_quantize_layers_holds_one_layer_of_float_weights(tmp_path):
    """quantize_layers asks for a layer's float weights only when that layer's turn comes, once each, in order, and
    lets them go once the layer is done (a large model's float32 weights are never held whole); it yields each
    layer's four maps in their shapes."""
    from conftest import make_hf_checkpoint
    from spqt.checkpoint import LINEAR_GROUPS, fused_layer_weights
    from spqt.mixes import group_types
    from spqt.sources import open_source

    source = open_source(make_hf_checkpoint(tmp_path / "m", n_layers=3, dim=64, ffn_dim=160))
    cfg = source.config
    calibration = torch.randint(0, cfg.vocab_size, (2, 512), generator=torch.Generator().manual_seed(2))
    asked, alive = [], {}

    def layer_weights(i):
        asked.append(i)
        weights = fused_layer_weights(source, i)
        alive[i] = [weakref.ref(w) for name, w in weights.items() if name.rsplit(".", 1)[1] in LINEAR_GROUPS]
        return weights

    types = group_types("q4_k", cfg.n_layers)
    shapes = {"qkv": (cfg.q_dim + 2 * cfg.kv_dim, cfg.dim), "o": (cfg.dim, cfg.q_dim),
              "gate_up": (2 * cfg.ffn_dim, cfg.dim), "down": (cfg.dim, cfg.ffn_dim)}
    spec = FORMATS["q4_k"]
    layers = gptq.quantize_layers(cfg, source.tensor("tok_embeddings"), layer_weights, calibration, types, "zigzag")
    for i, results in layers:
        assert asked == list(range(i + 1))
        gc.collect()
        assert not any(ref() is not None for ref in alive[i]), "a finished layer's float weights are still held"
        assert sorted(results) == sorted(f"layers.{i}.{g}" for g in shapes)
        for name, result in results.items():
            assert result.shape == shapes[name.rsplit(".", 1)[1]]
            assert result.blocks.shape == grid_shape("zigzag", result.shape, spec.block_size) + (spec.block_bytes,)
    assert asked == [0, 1, 2]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["zigzag", "row"])
@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "q8_0"])
def test_compensation_on_the_gpu(fmt, layout, rng):
    """The same method on a CUDA tensor (spqt quantize --device cuda --gptq): blocks on the GPU, as much gained as
    on the CPU (the bytes may differ in near ties: sums run in another order)."""
    n, k = SHAPES[layout]
    w = torch.from_numpy(rng.standard_normal((n, k)).astype("float32")) * 0.05
    h = _inputs_hessian(rng, k)
    on_gpu = gptq.quantize_compensated(w.cuda(), h.cuda(), fmt, layout, batch=32)
    assert on_gpu.is_cuda
    on_cpu = gptq.quantize_compensated(w, h, fmt, layout, batch=32)
    error = gptq.output_error(w, dequantize(on_gpu.cpu(), fmt, layout, (n, k)), h)
    cpu_error = gptq.output_error(w, dequantize(on_cpu, fmt, layout, (n, k)), h)
    assert error == pytest.approx(cpu_error, rel=0.02)


def test_a_mix_with_the_mse_search(tmp_path):
    """A mix's types without the mse search (q6_k here) fall back to the reference, as in the plain conversion."""
    from conftest import make_hf_checkpoint
    from spqt.checkpoint import quantize_source
    from spqt.sources import open_source

    source = open_source(make_hf_checkpoint(tmp_path / "m", n_layers=2, dim=64, ffn_dim=160))
    calibration = torch.randint(0, source.config.vocab_size, (1024,), generator=torch.Generator().manual_seed(2))
    model = quantize_source(source, "q4_k_m", "zigzag", search="mse", calibration=calibration.tolist(),
                            calibration_tokens=1024)
    assert {w.fmt for name, w in model.weights.items() if name.startswith("layers.") and hasattr(w, "fmt")} \
        == {"q4_k", "q6_k"}
    assert model.provenance["gptq"]["maps"] == 8 and model.provenance["encoder_search"] == "mse"


def _naive_gptq(w: torch.Tensor, h: torch.Tensor, step: float, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ written plainly, float64: columns in `order`, each rounded to the grid step * (code - 128), code in
    0..255, its error moved onto every later column at once (no lazy batches). Returns the codes (N, K) and each
    code's distance from a rounding tie (N, K; 0.5 where the value sat on a code, 0 on a tie), in column order."""
    w = w.double()[:, order].clone()
    h = h[order][:, order].clone()
    h.diagonal().add_(gptq.DAMP * float(h.diagonal().mean()))
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(w.shape, dtype=torch.int64)
    ties = torch.empty(w.shape, dtype=torch.float64)
    for j in range(w.shape[1]):
        value = (w[:, j] + 128 * step) / step
        code = torch.clamp(torch.round(value), 0, 255)
        codes[:, j] = code.long()
        ties[:, j] = (value - value.floor() - 0.5).abs()
        err = (w[:, j] - (step * code - 128 * step)) / upper[j, j]
        w[:, j + 1:] -= err[:, None] * upper[j, j + 1:][None, :]
    out, out_ties = torch.empty_like(codes), torch.empty_like(ties)
    out[:, order], out_ties[:, order] = codes, ties
    return out, out_ties


@pytest.mark.parametrize("layout", ["zigzag", "row"])
def test_lazy_batches_equal_the_plain_method(layout, rng, monkeypatch):
    """With one fixed grid for every block (a stub Q8_0 encoder: d = 2^-7), the batched, reordered code gives the
    codes of GPTQ written plainly, whatever the batch; zigzag columns go by decreasing H[j, j]."""
    from spqt.formats import q8_0

    step = 2.0**-7

    def fixed_grid(values: torch.Tensor) -> torch.Tensor:
        blocks = torch.zeros((values.shape[0], q8_0.BLOCK_BYTES), dtype=torch.uint8)
        blocks[:, 0:2] = torch.tensor([step], dtype=torch.float16).view(torch.uint8)
        return blocks

    monkeypatch.setattr(gptq, "codec", lambda name, search="reference": (fixed_grid, q8_0.decode))
    n, k = (64, 72) if layout == "zigzag" else (40, 96)  # whole blocks: padding has its own test above
    w = torch.from_numpy(rng.standard_normal((n, k)).astype("float32")) * 0.3
    h = _inputs_hessian(rng, k)
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if layout == "zigzag" else torch.arange(k)
    expected, ties = _naive_gptq(w, h, step, order)
    for batch in (1, 7, k):
        blocks = gptq.quantize_compensated(w, h, "q8_0", layout, batch=batch)
        codes = torch.from_numpy(dequantize(blocks, "q8_0", layout, (n, k)).numpy()).double() / step + 128
        differ = (codes.round().long() != expected)[:, order]  # in the order the columns were rounded
        # float32 against float64 may round a near-tie the other way; the row's later columns then carry another
        # error and may differ too. So each row equals the plain codes up to its first difference, which sits on a
        # near-tie, and few rows differ at all.
        rows = differ.any(1).nonzero().flatten()
        first = differ.float().argmax(1)[rows]
        assert len(rows) <= max(1, n // 16), (batch, len(rows))
        assert (ties[:, order][rows, first] < 1e-3).all(), (batch, ties[:, order][rows, first])
        if layout == "row":
            break  # row batches are whole blocks, whatever the batch argument
