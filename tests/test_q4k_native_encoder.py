"""The Q4_K encoder in C (formats/q4_k_encode.c) against the torch encoder (formats/q4_k.py):
the same bytes on fresh random blocks of many scales and shapes of trouble, on real weights of
the default model, for any thread count, from the native and a portable build; the torch encoder alone still matches llama.cpp; the
fallback to torch without a compiler; the fp16 rounding of d and dmin against torch's."""

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from spqt import native as build_cache
from spqt.formats import q4_k, q4_k_native

GOLDEN = Path(__file__).parent / "data" / "q4_k_llamacpp_golden.npz"


@pytest.fixture(scope="module")
def native():
    lib = q4_k_native.library()
    if isinstance(lib, str):
        pytest.skip(f"no C encoder here: {lib}")
    return lib


def torch_encode(x: torch.Tensor) -> torch.Tensor:
    """q4_k.encode with the C encoder switched off (the torch ops alone)."""
    saved = q4_k_native._state
    q4_k_native._state = {"lib": "switched off by the test"}
    try:
        return q4_k.encode(x)
    finally:
        q4_k_native._state = saved


def _assert_same_bytes(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert ours.dtype == torch.uint8 and ours.shape == expected.shape
    bad = torch.nonzero((ours != expected).any(dim=1)).flatten()
    assert bad.numel() == 0, (f"{bad.numel()} of {len(ours)} blocks differ, first {int(bad[0])}: "
                              f"bytes {torch.nonzero(ours[bad[0]] != expected[bad[0]]).flatten().tolist()}")


def _hard_blocks(rng) -> np.ndarray:
    """Blocks that take the search's rarer paths, at several magnitudes."""
    blocks = []
    for scale in (1e-30, 1e-7, 1e-3, 0.05, 1.0, 300.0, 1e4, 1e8):
        g = rng.standard_normal((40, 256)) * scale
        g[0] = 0.0  # all zero
        g[1] = scale  # all equal, positive
        g[2] = -scale  # all equal, negative
        g[3] = -np.abs(g[3])  # negative only
        g[4] = np.abs(g[4])  # positive only
        g[5, 100] = 1000.0 * scale  # one outlier
        g[6, :32] = 0.0  # one zero sub-block beside normal ones
        g[7] = np.round(g[7] / scale * 2) * scale  # few distinct values
        g[8] = rng.standard_t(2, 256) * scale  # heavy tails
        g[9, ::2] = 0.0  # half zeros
        g[10] = rng.uniform(-1, 1, 256) * scale * rng.uniform(0, 1, 256) ** 8  # mostly tiny
        g[11] = np.repeat(rng.standard_normal(8), 32) * scale  # constant sub-blocks, different
        g[12] = -0.0  # negative zeros
        blocks.append(g)
    return np.concatenate(blocks).astype(np.float32)


def test_same_bytes_as_torch_on_random_blocks(native, rng, tmp_path):
    x = torch.from_numpy(np.concatenate([_hard_blocks(rng),
                                         (rng.standard_normal((700, 256)) * rng.uniform(1e-3, 3, (700, 1))).astype(np.float32)]))
    expected = torch_encode(x)
    _assert_same_bytes(q4_k.encode(x), expected)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):  # blocks are split over threads, never a block: the same bytes
            torch.set_num_threads(n)
            _assert_same_bytes(q4_k_native.encode(x), expected)
    finally:
        torch.set_num_threads(threads)
    # a portable build (-O2, no -march=native: other instructions, no OpenMP) writes them too
    portable = build_cache.build("cc", q4_k_native.SOURCE, ("-O2", "-ffp-contract=off", "-shared", "-fPIC", "-std=c11"),
                                 tmp_path / "portable.so")
    q4_k_native._declare(portable)
    out = torch.empty_like(expected)
    portable.spqt_q4k_encode(x.data_ptr(), x.shape[0], out.data_ptr(), 1)
    _assert_same_bytes(out, expected)


@pytest.mark.slow
def test_same_bytes_as_torch_on_default_model_weights(native, default_gguf):
    """A few real matrices (Q4_1 in the GGUF, dequantized), zigzag and row blocks."""
    import gguf

    from spqt import layouts

    tensors = {t.name: t for t in gguf.GGUFReader(str(default_gguf)).tensors}
    for name, layout in (("blk.0.attn_k.weight", "zigzag"), ("blk.17.attn_v.weight", "row"),
                         ("blk.29.attn_output.weight", "zigzag")):
        t = tensors[name]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))))
        values = layouts.matrix_to_blocks(w.float(), layout, q4_k.BLOCK_SIZE)
        _assert_same_bytes(q4_k.encode(values), torch_encode(values))


def test_torch_encoder_alone_matches_llamacpp():
    """test_q4_k.py's golden bytes from llama.cpp, through the torch ops alone (test_q4_k.py's
    q4_k.encode takes the C path where it can)."""
    golden = np.load(GOLDEN)
    _assert_same_bytes(torch_encode(torch.from_numpy(golden["x"])), torch.from_numpy(golden["blocks"]))


def test_fallback_without_compiler_encodes_with_torch(monkeypatch, rng):
    x = torch.from_numpy((rng.standard_normal((5, 256))).astype(np.float32))
    expected = q4_k.encode(x)  # whichever path this machine has
    monkeypatch.setattr(q4_k_native, "_state", {})
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert q4_k_native.encode(x) is None
    assert "no C compiler" in q4_k_native.library()
    _assert_same_bytes(q4_k.encode(x), expected)


def test_non_finite_weights_go_to_torch(native, rng):
    x = torch.from_numpy(rng.standard_normal((3, 256)).astype(np.float32))
    x[1, 7] = float("nan")
    assert q4_k_native.encode(x) is None
    assert q4_k.encode(x).shape == (3, 144)


def test_fp16_rounding_of_d_and_dmin(native, rng):
    """spqt_float_to_half against torch's .half(): every tie between neighbouring halves (normal and
    subnormal, both sides of the overflow to infinity), their neighbours, and random floats."""
    halves = np.arange(0, 0x7C01, dtype=np.uint16).view(np.float16).astype(np.float64)
    mids = (halves[:-1] + halves[1:]) / 2  # exact in float32
    f = np.concatenate([mids, np.nextafter(mids.astype(np.float32), np.float32(np.inf)).astype(np.float64),
                        np.nextafter(mids.astype(np.float32), np.float32(0)).astype(np.float64),
                        [65504.0, 65519.99, 65520.0, 1e6, np.inf, 2.0**-25, 2.0**-24, 2.0**-26]])
    f = np.concatenate([f, -f, rng.standard_normal(20000) * 10.0 ** rng.uniform(-9, 6, 20000)]).astype(np.float32)
    ours = np.array([native.spqt_float_to_half(ctypes.c_float(v)) for v in f.tolist()], dtype=np.uint16)
    expected = torch.from_numpy(f).half().view(torch.int16).numpy().view(np.uint16)
    bad = np.nonzero(ours != expected)[0]
    assert bad.size == 0, f"{bad.size} differ, first {f[bad[0]]!r}: {ours[bad[0]]:#06x} vs {expected[bad[0]]:#06x}"


def test_a_build_with_fused_multiply_adds_is_caught(native, rng, tmp_path):
    """The same source built with FMA contraction (-ffp-contract=fast) writes other bytes for some
    blocks: the comparisons above can tell, and q4_k_native.FLAGS must keep contraction off."""
    if "fma" not in open("/proc/cpuinfo").read().split():
        pytest.skip("this CPU has no fused multiply-add: contraction changes nothing here")
    assert "-ffp-contract=off" in q4_k_native.FLAGS
    flags = tuple(f for f in q4_k_native.FLAGS if f != "-ffp-contract=off") + ("-ffp-contract=fast",)
    fused = build_cache.build("cc", q4_k_native.SOURCE, flags, tmp_path / "fused.so")
    q4_k_native._declare(fused)
    x = torch.from_numpy((rng.standard_normal((2000, 256)) * rng.uniform(1e-3, 3, (2000, 1))).astype(np.float32))
    out = torch.empty((2000, 144), dtype=torch.uint8)
    fused.spqt_q4k_encode(x.data_ptr(), 2000, out.data_ptr(), 1)
    assert (out != q4_k_native.encode(x)).any(dim=1).sum() > 0
