"""Q8_0, Q6_K, Q5_K, Q3_K, Q2_K blocks: bit-exact with llama.cpp's reference encoders and with
the gguf package's decoders (Q4_K has its own file, test_q4_k.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from spqt.formats import FORMATS, codec

DATA = Path(__file__).parent / "data"
TYPES = ["q8_0", "q6_k", "q5_k", "q3_k", "q2_k"]


def test_format_table():
    bits = {name: f.bits_per_weight for name, f in FORMATS.items()}
    assert bits == {"q8_0": 8.5, "q6_k": 6.5625, "q5_k": 5.5, "q4_k": 4.5, "q3_k": 3.4375, "q2_k": 2.625}


@pytest.mark.parametrize("name", TYPES)
def test_encoder_matches_llamacpp_bytes(name):
    """The q4_k golden inputs (normal, heavy-tailed, one-signed, integer-valued, tiny, all-zero,
    constant blocks) and the bytes llama.cpp's quantize_row_<type>_ref wrote (tests/data/GOLDEN.md)."""
    x = np.load(DATA / "q4_k_llamacpp_golden.npz")["x"].reshape(-1, FORMATS[name].block_size)
    expected = np.load(DATA / "kquants_llamacpp_golden.npz")[name]
    ours = codec(name)[0](torch.from_numpy(x)).numpy()
    bad = np.nonzero((ours != expected).any(axis=1))[0]
    assert bad.size == 0, f"{bad.size} blocks differ, first {bad[0]}: bytes {np.nonzero(ours[bad[0]] != expected[bad[0]])[0]}"


@pytest.mark.parametrize("name", TYPES)
def test_decode_equals_gguf_package(rng, name):
    """Our blocks, and random bytes with a sane fp16 scale, decode to the gguf package's values."""
    encode, decode = codec(name)
    fmt = FORMATS[name]
    x = rng.standard_normal((67, fmt.block_size)) * rng.uniform(1e-3, 300, (67, 1))
    ours_blocks = encode(torch.from_numpy(x.astype(np.float32))).numpy()
    raw = rng.integers(0, 256, size=(64, fmt.block_bytes), dtype=np.uint8)
    # every fp16 field (d, dmin) gets a finite value, so NaN never compares unequal
    fp16_at = {"q8_0": [0], "q6_k": [208], "q5_k": [0, 2], "q3_k": [108], "q2_k": [80, 82]}[name]
    for at in fp16_at:
        raw[:, at:at + 2] = np.abs(rng.standard_normal((64, 1))).astype(np.float16).view(np.uint8)
    for blocks in (ours_blocks, raw):
        ours = decode(torch.from_numpy(blocks)).numpy()
        theirs = gguf_dequantize(blocks, getattr(GGMLQuantizationType, name.upper())).reshape(ours.shape)
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", TYPES)
def test_zero_block_decodes_to_zero(name):
    size = FORMATS[name].block_size
    encode, decode = codec(name)
    assert torch.equal(decode(encode(torch.zeros(3, size))), torch.zeros(3, size))
