"""Every quantization type through the layouts, the reference linear map, the .spqt file and the
CLI; llama.cpp-style mixes (the formats' bytes themselves: test_formats.py and test_q4_k.py)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

import spqt
from spqt.checkpoint import QuantizedWeight, load_spqt
from spqt.cli import main
from spqt.formats import FORMATS
from spqt.linear import Linear
from spqt.errors import SpqtError
from spqt.generate import build_model
from spqt.mixes import formats_of, group_types, head_type
from conftest import sqnr_db

TYPES = list(FORMATS)
# Gaussian weights: SQNR each type reaches with margin (measured 45.4 / 35.0 / 28.8 / 22.9 /
# 16.5 / 10.6 dB on 2,000 blocks of scaled Gaussians).
MIN_SQNR = {"q8_0": 42, "q6_k": 32, "q5_k": 26, "q4_k": 20, "q3_k": 14, "q2_k": 8}


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("shape", [(300, 17), (33, 70)])
def test_layouts_round_trip_and_zigzag_is_row_of_transpose(rng, name, shape):
    """Zigzag block (r, k) holds W[B r : B r + B, k]: exactly the row layout of W transposed, with
    the same zero padding; both round-trip to W within the type's accuracy."""
    n, k = shape
    fmt = FORMATS[name]
    w = rng.standard_normal(shape).astype(np.float32)
    row = spqt.quantize(w, name, layout="row")
    zig = spqt.quantize(w, name, layout="zigzag")
    assert row.shape == (n, -(-k // fmt.block_size), fmt.block_bytes)
    assert zig.shape == (-(-n // fmt.block_size), k, fmt.block_bytes)
    np.testing.assert_array_equal(zig.transpose(1, 0, 2), spqt.quantize(np.ascontiguousarray(w.T), name, layout="row"))
    for layout, blocks in (("row", row), ("zigzag", zig)):
        back = spqt.dequantize(blocks, name, layout=layout, shape=shape)
        assert back.shape == shape
        assert sqnr_db(torch.from_numpy(w), torch.from_numpy(back)) > MIN_SQNR[name], layout


def test_quantize_takes_numpy_arrays_of_either_byte_order():
    """A big-endian float array (np.fromfile of '>f4' data) gives the native array's blocks (torch.from_numpy takes
    the machine's byte order alone: it was a ValueError)."""
    w = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    blocks = spqt.quantize(w, "q6_k", "zigzag")
    for order in (">", "<"):
        assert np.array_equal(spqt.quantize(w.astype(f"{order}f4"), "q6_k", "zigzag"), blocks)
        assert np.array_equal(spqt.quantize(w.astype(f"{order}f8"), "q6_k", "zigzag"), blocks)


def test_quantize_refuses_a_complex_matrix():
    """A complex matrix has no K-quant form: a TypeError, not blocks of its real parts (the float32 cast dropped
    the imaginary parts with a warning alone)."""
    w = np.random.default_rng(0).standard_normal((4, 256)) * (1 + 1j)
    for given in (w.astype(np.complex64), torch.from_numpy(w)):
        with pytest.raises(TypeError, match="expects a real matrix, got complex"):
            spqt.quantize(given, "q8_0", "row")


def test_a_type_that_is_not_a_name_is_refused_as_an_unknown_one():
    """fmt None or 4 is the unknown-type error naming it (as a layout or search of None is), not AttributeError."""
    w = np.zeros((2, 256), np.float32)
    for fmt in (None, 4):
        with pytest.raises(SpqtError, match=f"unsupported quantization type {fmt!r}"):
            spqt.quantize(w, fmt)
        with pytest.raises(SpqtError, match=f"unsupported quantization type {fmt!r}"):
            spqt.dequantize(np.zeros((2, 1, 144), np.uint8), fmt, "row", (2, 256))


def test_dequantize_refuses_a_shape_that_is_not_two_sizes():
    """dequantize's shape is (N, K), two integers >= 0 (numpy's too): a missing, negative, fractional or not
    2-long one is a ValueError that names it, not an unpacking error or blocks 'of a -40x300 matrix'."""
    w = np.random.default_rng(0).standard_normal((40, 300)).astype(np.float32)
    blocks = spqt.quantize(w, "q4_k", "row")
    assert spqt.dequantize(blocks, "q4_k", "row", (np.int64(40), np.int32(300))).shape == (40, 300)
    for bad in (None, (-40, 300), (40, -300), (40.0, 300), (40,), (40, 300, 1), 40, "40x300"):
        with pytest.raises(ValueError, match=r"shape=\(N, K\), two integers >= 0, got"):
            spqt.dequantize(blocks, "q4_k", "row", bad)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("layout", ["row", "zigzag"])
def test_reference_linear_equals_gguf_dequantized_matmul(rng, name, layout):
    """The CPU path's y = W x against W decoded by the gguf package (row: the blocks are a GGUF
    tensor; zigzag: its blocks are the row blocks of W^T), in float64."""
    n, k = 70, 300
    w = rng.standard_normal((n, k)).astype(np.float32)
    blocks = spqt.quantize(w, name, layout=layout)
    qtype = getattr(GGMLQuantizationType, name.upper())
    if layout == "row":
        wq = gguf_dequantize(blocks.reshape(n, -1), qtype)[:, :k]
    else:
        wq = gguf_dequantize(np.ascontiguousarray(blocks.transpose(1, 0, 2)).reshape(k, -1), qtype)[:, :n].T
    lin = Linear(QuantizedWeight(torch.from_numpy(blocks), name, layout, (n, k)), torch.float32, "cpu")
    x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32))
    expect = x.double() @ torch.from_numpy(np.ascontiguousarray(wq)).double().T
    got = lin(x).double()
    # fp32 dot products of length 300: rounding ~ sqrt(300) * 2^-24 * sum|w x|
    tol = 1e-6 * float((x.abs().double() @ torch.from_numpy(np.abs(wq)).double().T).max())
    assert (got - expect).abs().max() <= tol, f"worst {(got - expect).abs().max():.3g} > {tol:.3g}"


def test_mix_rules_follow_llamacpp():
    t = group_types("q4_k_m", 30)
    wide = [i for i in range(30) if t[f"layers.{i}.down"] == "q6_k"]
    assert wide == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert all(t[f"layers.{i}.qkv"] == t[f"layers.{i}.down"] for i in range(30))  # q|k|v widens with v
    assert {t[f"layers.{i}.{g}"] for i in range(30) for g in ("o", "gate_up")} == {"q4_k"}
    t = group_types("q3_k_m", 32)
    assert [t[f"layers.{i}.qkv"] for i in (0, 1, 2)] == ["q5_k", "q5_k", "q4_k"]
    assert [t[f"layers.{i}.down"] for i in (0, 1, 2)] == ["q5_k", "q5_k", "q4_k"]
    assert t["layers.7.o"] == "q4_k" and t["layers.7.gate_up"] == "q3_k"
    t = group_types("q4_k_s", 30)  # attn_v in Q5_K in layers 0-3, ffn_down in the first eighth (30 // 8 = 3)
    assert [t[f"layers.{i}.qkv"] for i in range(6)] == ["q5_k"] * 4 + ["q4_k"] * 2
    assert [t[f"layers.{i}.down"] for i in range(5)] == ["q5_k"] * 3 + ["q4_k"] * 2
    assert {t[f"layers.{i}.{g}"] for i in range(30) for g in ("o", "gate_up")} == {"q4_k"}
    t = group_types("Q3_K_L", 30)
    assert {t[f"layers.{i}.{g}"] for i in range(30) for g in ("qkv", "o", "down")} == {"q5_k"}
    assert {t[f"layers.{i}.gate_up"] for i in range(30)} == {"q3_k"}
    assert group_types("q5_k_s", 4) == group_types("q5_k", 4) and group_types("q3_k_s", 4) == group_types("q3_k", 4)
    assert set(group_types("q6_k", 3).values()) == {"q6_k"}
    assert formats_of("q3_k_m") == ("q5_k", "q4_k", "q3_k") and formats_of("Q3_K_S") == formats_of("q3_k") == ("q3_k",)


def test_cli_mix_quantize_inspect_and_cpu_run(tiny_hf, tmp_path, capsys):
    """A mixed model: per-matrix types in the .spqt, shown by inspect, run by the CPU runtime."""
    out = tmp_path / "mix.spqt"
    assert main(["quantize", str(tiny_hf), "-o", str(out), "--type", "Q4_K_M", "--device", "cpu"]) == 0
    loaded = load_spqt(out)
    types = {name: w.fmt for name, w in loaded.weights.items() if isinstance(w, QuantizedWeight)}
    assert types == group_types("q4_k_m", 2) | {"output": "q6_k"}  # the head: llama.cpp's recipe
    assert types["layers.1.down"] == "q6_k" and types["layers.0.down"] == "q4_k"
    assert loaded.kind == "q6_k+q4_k-zigzag" and loaded.provenance["quantization"] == "q4_k_m"
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "down     q6_k in layers 1; q4_k in layers 0" in text
    assert main(["generate", str(out), "-p", "the quick", "-n", "4", "--device", "cpu"]) == 0
    err = capsys.readouterr().err  # generate's model line and speeds go to stderr
    assert "q6_k+q4_k-zigzag" in err and "decode: 4 tokens" in err


def test_head_type_follows_llamacpp():
    """llama.cpp's output.weight: Q6_K, Q8_0 in a Q8_0 model; --head fp16 keeps it float, a type as given."""
    assert head_type("q4_k") == head_type("Q4_K_M") == head_type("q2_k") == head_type("q6_k") == "q6_k"
    assert head_type("q8_0") == "q8_0" and head_type("q4_k", "fp16") is None and head_type("q4_k", "Q5_K") == "q5_k"
    assert head_type("q4_k", tied=True) is None and head_type("q4_k", "q6_k", tied=True) == "q6_k"
    with pytest.raises(SpqtError, match="unknown head type"):
        head_type("q4_k", "q9_k")


def test_cli_quantized_head(tiny_hf, tmp_path, capsys):
    """spqt quantize stores an untied head as --head says (auto: Q6_K, in the model's layout), inspect shows it, and
    the runtime's head multiplies by its dequantized blocks; --head fp16 keeps the float head, the layers alike; a
    bad --head is one error line and exit 2, nothing written."""
    quant, flt, bad = tmp_path / "q.spqt", tmp_path / "f.spqt", tmp_path / "bad.spqt"
    assert main(["quantize", str(tiny_hf), "-o", str(quant), "--device", "cpu"]) == 0
    assert main(["quantize", str(tiny_hf), "-o", str(flt), "--device", "cpu", "--head", "fp16"]) == 0
    q, f = load_spqt(quant), load_spqt(flt)
    c = q.config
    assert not c.tie_embeddings
    head = q.weights["output"]
    assert isinstance(head, QuantizedWeight) and (head.fmt, head.layout, head.shape) == ("q6_k", "zigzag",
                                                                                     (c.vocab_size, c.dim))
    assert f.weights["output"].dtype == torch.float16
    assert (q.provenance["head"], f.provenance["head"]) == ("q6_k", "fp16") and q.kind == f.kind == "q4_k-zigzag"
    assert all(torch.equal(q.weights[n].blocks, f.weights[n].blocks) for n in q.parts if n.startswith("layers."))
    assert "output" not in q.ensure_column_norms()  # never thresholded
    float_head = f.weights["output"].float()
    assert sqnr_db(float_head, head.dequantize()) > MIN_SQNR["q6_k"] - 6  # a 64-column matrix: fewer blocks
    x = torch.randn(2, c.dim)
    torch.testing.assert_close(build_model(q).output(x), x @ head.dequantize().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(build_model(f).output(x), x @ float_head.T, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(["inspect", str(quant)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("output ")]
    assert len(line) == 1 and "q6_k zigzag" in line[0] and f"{c.vocab_size}x{c.dim}" in line[0], line
    # the head's format is version 3 (an older spqt refuses it with its one error line); a float head's stays 2
    from safetensors import safe_open
    import json

    versions = [json.loads(safe_open(str(f_), "pt").metadata()["spqt"])["format_version"] for f_ in (quant, flt)]
    assert versions == [3, 2]
    # a bad --head is refused before the source is read (a missing source would be the other error)
    assert main(["quantize", str(tmp_path / "missing"), "-o", str(bad), "--head", "q9_k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown head type" in err[0] and not bad.exists(), err


def test_tied_head_stays_fp16_unless_a_type_is_named(tmp_path, capsys):
    """A head tied to the embedding: no head tensor by default (the fp16 embedding is the head); --head q6_k stores a
    quantized copy beside the fp16 embedding, which the runtime's head multiplies by and inspect shows."""
    from conftest import make_hf_checkpoint

    hf = make_hf_checkpoint(tmp_path / "tied", n_layers=1, tie=True)
    plain, copy = tmp_path / "p.spqt", tmp_path / "c.spqt"
    assert main(["quantize", str(hf), "-o", str(plain), "--device", "cpu"]) == 0
    assert main(["quantize", str(hf), "-o", str(copy), "--device", "cpu", "--head", "q6_k"]) == 0
    p, c = load_spqt(plain), load_spqt(copy)
    assert p.config.tie_embeddings and "output" not in p.weights and p.head() is p.weights["tok_embeddings"]
    head = c.weights["output"]
    assert (head.fmt, head.shape) == ("q6_k", (c.config.vocab_size, c.config.dim)) and c.head() is head
    assert torch.equal(c.weights["tok_embeddings"], p.weights["tok_embeddings"])  # the lookups' fp16 rows kept
    x = torch.randn(2, c.config.dim)
    torch.testing.assert_close(build_model(c).output(x), x @ head.dequantize().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(build_model(p).output(x), x @ p.weights["tok_embeddings"].float().T, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(["inspect", str(copy)]) == 0
    assert any(ln.startswith("output ") and "q6_k" in ln for ln in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize("bad", ["q9_k", "q4_k_x"])
def test_cli_bad_type(tiny_hf, tmp_path, capsys, bad):
    out = tmp_path / "o.spqt"
    assert main(["quantize", str(tiny_hf), "-o", str(out), "--type", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spqt: error: unknown quantization type or mix") and "q4_k_m" in err[0], err
    assert not out.exists()


@pytest.mark.gpu
def test_cuda_runs_other_types_through_dequantize(rng):
    """Several tokens (and the row layout of types without row kernels) run dequantize + cuBLAS
    on CUDA, equal to the CPU path (one token of zigzag Q8_0 / Q6_K / Q5_K: tests/test_kernels_types.py)."""
    w = rng.standard_normal((300, 70)).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((2, 70)).astype(np.float32))
    for name, layout in (("q6_k", "zigzag"), ("q8_0", "zigzag"), ("q3_k", "zigzag"), ("q6_k", "row")):
        qw = QuantizedWeight(torch.from_numpy(spqt.quantize(w, name, layout)), name, layout, w.shape)
        cpu = Linear(qw, torch.float32, "cpu")(x)
        gpu = Linear(qw, torch.float32, "cuda", backend="triton")(x.cuda()).cpu()
        torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", TYPES)
def test_gpu_encoder_gives_cpu_bytes(rng, name):
    w = torch.from_numpy((rng.standard_normal((300, 530)) * rng.uniform(1e-3, 10, (300, 1))).astype(np.float32))
    cpu = spqt.quantize(w, name, layout="zigzag")
    gpu = spqt.quantize(w.cuda(), name, layout="zigzag").cpu()
    assert torch.equal(cpu, gpu), f"{(cpu != gpu).any(-1).sum()} blocks differ"
