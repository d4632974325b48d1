"""Q4_K blocks: bit-exact with llama.cpp's reference encoder and with gguf's decoder."""

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from spqt.formats import Q4_K, q4_k
from spqt.formats.search import sequential_sum

GOLDEN = Path(__file__).parent / "data" / "q4_k_llamacpp_golden.npz"


def test_format_table():
    assert (Q4_K.block_size, Q4_K.block_bytes, Q4_K.bits_per_weight) == (256, 144, 4.5)


def test_encoder_matches_llamacpp_bytes():
    """96 blocks (normal, heavy-tailed, one-signed, integer-valued, tiny, all-zero, constant) and
    the bytes llama.cpp's quantize_row_q4_K_ref wrote for them (ggml-quants.c from llama.cpp as
    vendored by llama-cpp-python 0.3.36, built with gcc -O2 -ffp-contract=off)."""
    golden = np.load(GOLDEN)
    ours = q4_k.encode(torch.from_numpy(golden["x"])).numpy()
    expected = golden["blocks"]
    bad = np.nonzero((ours != expected).any(axis=1))[0]
    assert bad.size == 0, f"{bad.size} blocks differ, first {bad[0]}: bytes {np.nonzero(ours[bad[0]] != expected[bad[0]])[0]}"


@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0])
def test_decode_equals_gguf_package(rng, scale):
    x = (rng.standard_normal((257, 256)) * scale).astype(np.float32)
    blocks = q4_k.encode(torch.from_numpy(x)).numpy()
    ours = q4_k.decode(torch.from_numpy(blocks)).numpy()
    theirs = gguf_dequantize(blocks, GGMLQuantizationType.Q4_K).reshape(ours.shape)
    np.testing.assert_array_equal(ours, theirs)


def test_gguf_encoded_blocks_decode_identically(rng):
    """Blocks we did not write (random valid bytes) decode the same through both decoders."""
    raw = rng.integers(0, 256, size=(64, 144), dtype=np.uint8)
    raw[:, 0:4] = np.abs(rng.standard_normal((64, 2))).astype(np.float16).view(np.uint8)
    ours = q4_k.decode(torch.from_numpy(raw)).numpy()
    theirs = gguf_dequantize(raw, GGMLQuantizationType.Q4_K).reshape(ours.shape)
    np.testing.assert_array_equal(ours, theirs)


def test_scale_packing_round_trip(rng):
    ls = torch.from_numpy(rng.integers(0, 64, size=(50, 8)))
    lm = torch.from_numpy(rng.integers(0, 64, size=(50, 8)))
    sc, mn = q4_k.unpack_scales(q4_k.pack_scales(ls, lm))
    assert torch.equal(sc, ls) and torch.equal(mn, lm)


def test_zero_block_decodes_to_zero():
    blocks = q4_k.encode(torch.zeros(3, 256))
    assert torch.equal(q4_k.decode(blocks), torch.zeros(3, 256))


def test_each_weight_takes_its_nearest_level(rng):
    """After the scale search, every weight is rounded to the nearest of its sub-block's 16 levels
    d*sc*q - dmin*m (the levels stored in the block), as llama.cpp's final pass does."""
    x = torch.from_numpy((rng.standard_normal((300, 256)) * rng.uniform(0.01, 10, (300, 1))).astype(np.float32))
    blocks = q4_k.encode(x)
    y = q4_k.decode(blocks).reshape(300, 8, 32)
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    dmin = blocks[:, 2:4].contiguous().view(torch.float16).float()
    sc, mn = q4_k.unpack_scales(blocks[:, 4:16])
    levels = (d * sc)[..., None] * torch.arange(16.0) - (dmin * mn)[..., None]  # (300, 8, 16)
    nearest = (x.reshape(300, 8, 32, 1) - levels[:, :, None, :]).abs().min(-1).values
    err = (y - x.reshape(300, 8, 32)).abs()
    step = (d * sc)[..., None]
    worst = ((err - nearest) / step).max()
    assert bool((err <= nearest + 1e-5 * step).all()), f"worst excess over the nearest level: {worst:.2e} steps"


def test_sequential_sum_is_the_c_order(rng):
    """The encoder's sums run element by element in order (float32), as llama.cpp's loops do."""
    g = 1001
    terms = torch.from_numpy((rng.standard_normal((32, 3, g)) * rng.uniform(1e-3, 1e3, (1, 1, g))).astype(np.float32))
    expect = terms[0].clone()
    for i in range(1, 32):
        expect = expect + terms[i]
    got = sequential_sum(terms[:, 1:])  # a non-contiguous view too
    assert torch.equal(got.view(torch.int32), expect[1:].view(torch.int32))
    for narrow in (1, 5):  # few columns: numpy would fold these into its pairwise 1-D sum
        got = sequential_sum(terms[:, 0, :narrow])
        assert torch.equal(got.view(torch.int32), expect[0, :narrow].view(torch.int32))


def test_quantize_in_parallel_chunks_equals_one_call(rng):
    """spqt.quantize splits the blocks into chunks over worker threads; the bytes are those of one
    encode call over all blocks (2,200 blocks: three chunks)."""
    from spqt.layouts import matrix_to_blocks
    from spqt.quant import quantize

    w = torch.from_numpy(rng.standard_normal((300, 1100)).astype(np.float32))
    blocks = quantize(w, "q4_k", "zigzag")
    whole = q4_k.encode(matrix_to_blocks(w, "zigzag", 256))
    assert blocks.shape == (2, 1100, 144) and torch.equal(blocks.reshape(-1, 144), whole)
