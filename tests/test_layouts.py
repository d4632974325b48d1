"""Row and zigzag layouts: shapes, padding, block contents, round trips."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

import spqt
import spqt.errors
from spqt.formats import q4_k
from conftest import sqnr_db

SHAPES = [(576, 192), (1536, 576), (256, 256), (300, 17), (1, 700), (513, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["row", "zigzag"])
def test_round_trip(rng, shape, layout):
    n, k = shape
    w = rng.standard_normal(shape).astype(np.float32)
    blocks = spqt.quantize(w, "q4_k", layout=layout)
    expect = (n, -(-k // 256), 144) if layout == "row" else (-(-n // 256), k, 144)
    assert blocks.shape == expect and blocks.dtype == np.uint8
    back = spqt.dequantize(blocks, "q4_k", layout=layout, shape=shape)
    assert back.shape == shape and back.dtype == np.float32
    # 4-bit with 6-bit sub-block scales: about 20 dB on Gaussian data; padding must not hurt it.
    assert sqnr_db(torch.from_numpy(w), torch.from_numpy(back)) > 18.0


def test_torch_in_torch_out(rng):
    w = torch.from_numpy(rng.standard_normal((64, 300)).astype(np.float32))
    blocks = spqt.quantize(w, "q4_k", layout="zigzag")
    assert isinstance(blocks, torch.Tensor)
    assert torch.equal(blocks, torch.from_numpy(spqt.quantize(w.numpy(), "q4_k", layout="zigzag")))
    assert isinstance(spqt.dequantize(blocks, "q4_k", layout="zigzag", shape=(64, 300)), torch.Tensor)


def test_row_bytes_are_a_gguf_tensor(rng):
    n, k = 96, 512
    w = rng.standard_normal((n, k)).astype(np.float32)
    blocks = spqt.quantize(w, "q4_k", layout="row")
    theirs = gguf_dequantize(blocks.reshape(n, -1), GGMLQuantizationType.Q4_K)
    np.testing.assert_array_equal(spqt.dequantize(blocks, "q4_k", layout="row", shape=(n, k)), theirs)


def test_row_padding_is_zero_columns(rng):
    n, k = 8, 300
    w = rng.standard_normal((n, k)).astype(np.float32)
    padded = np.concatenate([w, np.zeros((n, 512 - k), np.float32)], axis=1)
    np.testing.assert_array_equal(spqt.quantize(w, "q4_k", layout="row"), spqt.quantize(padded, "q4_k", layout="row"))


@pytest.mark.parametrize("shape", [(576, 192), (300, 40)])
def test_zigzag_block_is_a_column_slice(rng, shape):
    """Block (r, k) is the quantization of W[256r : 256r+256, k] (zero padded)."""
    n, k = shape
    w = rng.standard_normal(shape).astype(np.float32)
    blocks = spqt.quantize(w, "q4_k", layout="zigzag")
    padded = np.zeros((-(-n // 256) * 256, k), np.float32)
    padded[:n] = w
    for r, col in [(0, 0), (0, k - 1), (blocks.shape[0] - 1, k // 2), (blocks.shape[0] - 1, k - 1)]:
        column = torch.from_numpy(padded[256 * r : 256 * r + 256, col].copy())[None]
        np.testing.assert_array_equal(blocks[r, col], q4_k.encode(column).numpy()[0])


def test_bad_layout_and_format(rng):
    w = rng.standard_normal((4, 4)).astype(np.float32)
    with pytest.raises(spqt.errors.SpqtError):
        spqt.quantize(w, "q4_k", layout="diagonal")
    with pytest.raises(spqt.errors.SpqtError):
        spqt.quantize(w, "q3_x", layout="row")


def test_dequantize_names_the_blocks_it_expects(rng):
    """Blocks of another shape or format are refused with the block array's expected shape (they were met
    as decoded values, '768x256', or as a reshape error)."""
    blocks = spqt.quantize(rng.standard_normal((576, 192)).astype(np.float32), "q4_k", layout="zigzag")
    with pytest.raises(spqt.errors.SpqtError, match=r"q4_k zigzag blocks of a 999x192 matrix are uint8 "
                                                     r"\(4, 192, 144\), got uint8 \(3, 192, 144\)"):
        spqt.dequantize(blocks, "q4_k", layout="zigzag", shape=(999, 192))
    with pytest.raises(spqt.errors.SpqtError, match=r"q6_k zigzag blocks .* are uint8 \(3, 192, 210\)"):
        spqt.dequantize(blocks, "q6_k", layout="zigzag", shape=(576, 192))
    with pytest.raises(spqt.errors.SpqtError, match="got float32"):
        spqt.dequantize(blocks.astype(np.float32), "q4_k", layout="zigzag", shape=(576, 192))


def test_dequantize_refuses_blocks_of_the_other_layout(rng):
    """576x192 in Q4_K is 3 x 192 zigzag blocks or 576 x 1 row blocks: the same byte count, so zigzag blocks
    passed with layout="row" were decoded as row blocks and returned a wrong matrix of the right shape."""
    blocks = spqt.quantize(rng.standard_normal((576, 192)).astype(np.float32), "q4_k", layout="zigzag")
    with pytest.raises(spqt.errors.SpqtError, match=r"q4_k row blocks of a 576x192 matrix are uint8 "
                                                     r"\(576, 1, 144\), got uint8 \(3, 192, 144\)"):
        spqt.dequantize(blocks, "q4_k", layout="row", shape=(576, 192))


@pytest.mark.gpu
def test_gpu_quantization_gives_cpu_bytes(rng):
    w = torch.from_numpy(rng.standard_normal((1024, 1100)).astype(np.float32))
    for layout in ("row", "zigzag"):
        cpu = spqt.quantize(w, "q4_k", layout=layout)
        gpu = spqt.quantize(w.cuda(), "q4_k", layout=layout).cpu()
        assert torch.equal(cpu, gpu), f"{layout}: {(cpu != gpu).any(-1).sum()} blocks differ"
