"""The zigzag Q4_K GEMM that reads the blocks itself (kernels/gemm_q4k.py) against its torch twin, x times the
dequantized weights rounded to x's dtype: on the CPU through the Triton interpreter (small shapes) and on the GPU
(`gpu`), partial sums poisoned before every launch, shapes and token counts that are not multiples of the tiles."""

import numpy as np
import pytest
import torch

import spqt
from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gemm_q4k as gq
from spqt.kernels.gpu_layout import repack

from kernel_inputs import assert_within_fp32_sum

DEVICES = [pytest.param("cpu", id="interp"), pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)]

# (N, K, tokens): rows past the last whole superblock row, columns not a multiple of BK, one token and odd counts
CPU_CASES = [(300, 130, 3), (513, 70, 17)]
GPU_CASES = [(4096, 4096, 16), (4096, 4096, 200), (11008, 4096, 5), (2311, 777, 33), (960, 576, 64)]
# explicit tiles beside the rule's: every WN (4 .. 32 words: both planes in one program), several shares, BM 32
CONFIGS = [dict(WN=32, BM=16, BK=16, SPLIT=3, num_warps=4, num_stages=1),
           dict(WN=4, BM=32, BK=32, SPLIT=2, num_warps=4, num_stages=1),
           dict(WN=8, BM=16, BK=32, SPLIT=1, num_warps=4, num_stages=2)]


def _matrix(rng, n, k, device):
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)).to(device)
    qw = QuantizedWeight(spqt.quantize(w, "q4_k", "zigzag"), "q4_k", "zigzag", (n, k))
    return qw, repack(qw, device)


def _check(gw, x, w_used, cfg, what):
    """gemm_q4k(gw, x) with cfg (None: the rule's) into poisoned partials, against x @ w_used^T (float64)."""
    m = x.shape[0]
    rule = gq.config(m, *gw.shape, 132) if cfg is None else cfg
    shape, _ = gq.partials_shape(gw, m, rule)
    dtype = torch.float32 if shape[0] > 1 else x.dtype
    partials = torch.full(shape, float("nan"), dtype=dtype, device=x.device)
    y = gq.gemm_q4k(gw, x, rule, partials=partials)
    assert y.shape == (m, gw.shape[0]) and y.dtype == x.dtype, what
    w64 = w_used.double()
    assert_within_fp32_sum(y.T, w64, w64.abs(), x.T, what)


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_q4k_equals_dequantized_matmul(rng, device):
    cases = CPU_CASES if device == "cpu" else GPU_CASES
    dtypes = [torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16]
    for n, k, m in cases:
        qw, gw = _matrix(rng, n, k, device)
        w = qw.dequantize().to(device)
        for dtype in dtypes:
            x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(device=device, dtype=dtype)
            for cfg in [None] + CONFIGS:
                _check(gw, x, w.to(dtype), cfg, f"{n}x{k} {m} tokens {dtype} {cfg or 'rule'}")


@pytest.mark.parametrize("device", DEVICES)
def test_linear_runs_the_gemm_for_short_prompts(rng, device, monkeypatch):
    """TritonLinear's several-token product: gemm_q4k for fp16 zigzag Q4_K up to MAX_TOKENS tokens (the same sums
    as dequantize + matmul within their roundings), dequantize + matmul for fp32, the row layout, more tokens, or
    SPQT_PREFILL_GEMM=dequant."""
    from spqt.kernels import gpu_linear
    from spqt.kernels.gpu_linear import TritonLinear

    calls = []
    real = gpu_linear.gemm_q4k
    monkeypatch.setattr(gpu_linear, "gemm_q4k", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    qw, _ = _matrix(rng, 300, 130, device)
    lin = TritonLinear(qw, torch.float16, device)
    x = torch.from_numpy(rng.standard_normal((1, 5, 130)).astype(np.float32)).to(device=device, dtype=torch.float16)
    fused = lin.dense(x).clone()
    assert calls == [1] and fused.shape == (1, 5, 300)
    monkeypatch.setenv("SPQT_PREFILL_GEMM", "dequant")
    plain = lin.dense(x)
    assert calls == [1]
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-3, atol=2e-3 * float(plain.abs().max()))
    monkeypatch.delenv("SPQT_PREFILL_GEMM")
    assert gpu_linear.fused_gemm_runs(lin.w, torch.float16, gq.MAX_TOKENS)
    assert not gpu_linear.fused_gemm_runs(lin.w, torch.float16, gq.MAX_TOKENS + 1)
    assert not gpu_linear.fused_gemm_runs(lin.w, torch.float32, 5)
    row = TritonLinear(QuantizedWeight(spqt.quantize(qw.dequantize(), "q4_k", "row"), "q4_k", "row", (300, 130)),
                       torch.float16, device)
    assert not gpu_linear.fused_gemm_runs(row.w, torch.float16, 5)


def test_gemm_q4k_checks_its_contract():
    rng = np.random.default_rng(3)
    _, gw = _matrix(rng, 64, 40, "cpu")
    with pytest.raises(ValueError, match="fp16 or bf16"):
        gq.gemm_q4k(gw, torch.zeros(2, 40))
    with pytest.raises(ValueError, match="fp16 or bf16"):
        gq.gemm_q4k(gw, torch.zeros(2, 41, dtype=torch.float16))
    with pytest.raises(ValueError, match="partials"):
        gq.gemm_q4k(gw, torch.zeros(2, 40, dtype=torch.float16), CONFIGS[0], partials=torch.zeros(1, 2, 64))


_COMPILE_SM90 = """
import json, sys
from spqt.kernels import gemm_q4k as gq
for m in (16, 64, 256):
    ptx = gq.compile_sm90(gq.config(m, 12288, 4096, 132), sys.argv[1]).asm["ptx"]
    print(json.dumps([m, ptx.count("mma.sync"), ptx.count("wgmma.mma_async")]))
"""


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gemm_q4k_compiles_for_sm90_on_the_tensor_cores(dtype):
    """The interpreter runs what the compiler may refuse (a global that is not a constexpr, a layout it cannot
    convert): the kernel compiled for sm_90 here (no GPU needed; a child process, as TRITON_INTERPRET replaces the
    compiler) with the rule's tiles at 16, 64 and 256 tokens, its product on the tensor cores (mma or wgmma)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SM90, dtype], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    for line in run.stdout.splitlines():
        m, mma, wgmma = json.loads(line)
        assert mma + wgmma > 0, f"{m} tokens: no tensor-core instruction in the PTX"
