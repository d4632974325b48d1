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

from conftest import count_calls
from kernel_inputs import assert_gemm_route, assert_within_fp32_sum

DEVICES = [pytest.param("cpu", id="interp"), pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)]

# (N, K, tokens): rows past the last whole superblock row, columns not a multiple of BK, one token and odd counts
CPU_CASES = [(300, 130, 3), (513, 70, 17), (64, 40, 1)]
GPU_CASES = [(4096, 4096, 16), (4096, 4096, 200), (11008, 4096, 5), (2311, 777, 33), (960, 576, 64)]
# explicit tiles beside the rule's: every WN (4 .. 32 words: both planes in one program), several shares (more than
# the BK steps: empty shares), BM 32 and 64
CONFIGS = [dict(WN=32, BM=16, BK=16, SPLIT=3, num_warps=4, num_stages=1),
           dict(WN=4, BM=32, BK=32, SPLIT=2, num_warps=4, num_stages=1),
           dict(WN=8, BM=16, BK=32, SPLIT=1, num_warps=4, num_stages=2),
           dict(WN=16, BM=64, BK=16, SPLIT=7, num_warps=4, num_stages=2)]


def _matrix(rng, n, k, device):
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)).to(device)
    qw = QuantizedWeight(spqt.quantize(w, "q4_k", "zigzag"), "q4_k", "zigzag", (n, k))
    return qw, repack(qw, device)


def _check(gw, x, w_used, cfg, what):
    """gemm_q4k(gw, x) with cfg (None: the rule's) into poisoned partials, against x @ w_used^T (float64)."""
    m = x.shape[0]
    rule = gq.config(m, *gw.shape, 132) if cfg is None else cfg
    shape, dtype, _ = gq.partials_spec(gw, m, rule, x.dtype)
    partials = torch.full(shape, float("nan"), dtype=dtype, device=x.device)
    y = gq.gemm_q4k(gw, x, rule, partials=partials)
    assert y.shape == (m, gw.shape[0]) and y.dtype == x.dtype, what
    w64 = w_used.double()
    assert_within_fp32_sum(y.T, w64, w64.abs(), x.T, what)


@pytest.mark.parametrize("device", DEVICES)
def test_gemm_q4k_equals_dequantized_matmul(rng, device):
    cases = CPU_CASES if device == "cpu" else GPU_CASES
    # bf16 on the GPU only: Triton 3.6's interpreter multiplies bf16 tl.dot operands as their bit patterns
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
    """TritonLinear's several-token product: gemm_q4k for fp16 zigzag Q4_K of at least MIN_WEIGHTS weights up to
    MAX_TOKENS tokens (the same sums as dequantize + matmul within their roundings), dequantize + matmul for fp32, the
    row layout, more tokens, a smaller map, or SPQT_PREFILL_GEMM=dequant."""
    from spqt.kernels import gpu_linear
    from spqt.kernels.gpu_linear import TritonLinear

    calls = count_calls(monkeypatch, gq, "gemm_q4k")
    qw, _ = _matrix(rng, 300, 130, device)
    lin = TritonLinear(qw, torch.float16, device)
    assert not gpu_linear.fused_gemm_runs(lin.w, torch.float16, 5)  # 39,000 weights
    monkeypatch.setattr(gq, "MIN_WEIGHTS", 300 * 130)
    x = torch.from_numpy(rng.standard_normal((1, 5, 130)).astype(np.float32)).to(device=device, dtype=torch.float16)
    assert_gemm_route(lin, x, calls, monkeypatch)
    assert gpu_linear.fused_gemm_runs(lin.w, torch.float16, gq.MAX_TOKENS)
    assert not gpu_linear.fused_gemm_runs(lin.w, torch.float16, gq.MAX_TOKENS + 1)
    monkeypatch.setattr(gq, "LARGE_WEIGHTS", 300 * 130)  # a map this large runs it to LARGE_MAX_TOKENS rows
    assert gpu_linear.fused_gemm_runs(lin.w, torch.float16, gq.LARGE_MAX_TOKENS)
    assert not gpu_linear.fused_gemm_runs(lin.w, torch.float16, gq.LARGE_MAX_TOKENS + 1)
    monkeypatch.setattr(gq, "LARGE_WEIGHTS", 300 * 130 + 1)
    assert not gpu_linear.fused_gemm_runs(lin.w, torch.float16, gq.MAX_TOKENS + 1)
    assert not gpu_linear.fused_gemm_runs(lin.w, torch.float32, 5)
    row = TritonLinear(QuantizedWeight(spqt.quantize(qw.dequantize(), "q4_k", "row"), "q4_k", "row", (300, 130)),
                       torch.float16, device)
    assert not gpu_linear.fused_gemm_runs(row.w, torch.float16, 5)


def test_rule_splits_the_7b_maps_as_measured():
    """config()'s shares on an H200 (132 SMs) for the 7B's maps at 16 and 32 tokens: the splits measured fastest
    (docs/RESULTS.md, twenty-ninth session); the 135M model's short maps (K < 2048) never split."""
    for (n, k), split in {(12288, 4096): 2, (4096, 4096): 4, (4096, 11008): 4, (22016, 4096): 1, (960, 576): 1,
                          (3072, 576): 1}.items():
        for m in (16, 32):
            assert gq.config(m, n, k, 132)["SPLIT"] == split, f"{n}x{k}, {m} tokens"


def test_gemm_routes_the_maps_measured_faster():
    """fused_gemm_runs on real maps' shapes (thirtieth session's measurements): to 32 tokens a 7B's and a 70B's maps,
    not the 135M model's; from 33 to 64 tokens only the 70B's gate|up (1.22x there; its q|k|v and o 0.79x, down
    1.01x, a 7B's maps behind the tile dequantization)."""
    from types import SimpleNamespace

    from spqt.kernels import gpu_linear

    def runs(n, k, rows):
        return gpu_linear.fused_gemm_runs(SimpleNamespace(layout="zigzag", fmt="q4_k", shape=(n, k)), torch.float16,
                                          rows)

    for n, k in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (10240, 8192), (57344, 8192)):
        assert runs(n, k, 32) and runs(n, k, 17), f"{n}x{k}"
        assert runs(n, k, 64) == ((n, k) == (57344, 8192)), f"{n}x{k} at 64 rows"
        assert not runs(n, k, 65)
    assert not runs(960, 576, 16) and not runs(1536, 576, 32)


def test_gemm_config_override(monkeypatch):
    """SPQT_GEMM_CONFIG replaces the rule's non-zero fields; anything but six integers is one clear error."""
    from spqt.errors import SpqtError

    rule = gq.config(16, 12288, 4096, 132)
    monkeypatch.setenv("SPQT_GEMM_CONFIG", "16,0,64,0,8,0")
    assert gq.config(16, 12288, 4096, 132) == rule | {"WN": 16, "BK": 64, "num_warps": 8}
    for bad in ("16,0,64", "a,b,c,d,e,f", "1,2,3,4,5,6,7"):
        monkeypatch.setenv("SPQT_GEMM_CONFIG", bad)
        with pytest.raises(SpqtError, match="SPQT_GEMM_CONFIG needs 6"):
            gq.config(16, 12288, 4096, 132)


def test_gemm_q4k_checks_its_contract():
    """fp32 or mis-shaped x, partials of the wrong shape, tiles the kernel cannot run (a WN past a block's words
    would launch no program and leave the output unwritten): one ValueError each."""
    rng = np.random.default_rng(3)
    _, gw = _matrix(rng, 64, 40, "cpu")
    x = torch.zeros(2, 40, dtype=torch.float16)
    for bad in ({"WN": 64}, {"WN": 2}, {"BK": 24}, {"BM": 8}, {"SPLIT": 0}):
        with pytest.raises(ValueError, match="cannot run the config"):
            gq.gemm_q4k(gw, x, CONFIGS[0] | bad)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        gq.gemm_q4k(gw, torch.zeros(2, 40))
    with pytest.raises(ValueError, match="fp16 or bf16"):
        gq.gemm_q4k(gw, torch.zeros(2, 41, dtype=torch.float16))
    with pytest.raises(ValueError, match="partials"):
        gq.gemm_q4k(gw, torch.zeros(2, 40, dtype=torch.float16), CONFIGS[0], partials=torch.zeros(1, 2, 64))


_COMPILE_SM90 = """
import json, sys
from spqt.kernels import gemm_q4k as gq
for m, n, k in ((16, 12288, 4096), (32, 4096, 11008), (32, 960, 576), (64, 4096, 4096)):
    cfg = gq.config(m, n, k, 132)
    out = "fp32" if cfg["SPLIT"] > 1 else sys.argv[1]
    ptx = gq.compile_sm90(cfg, sys.argv[1], out).asm["ptx"]
    print(json.dumps([m, n, k, ptx.count("mma.sync"), ptx.count("wgmma.mma_async")]))
"""


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gemm_q4k_compiles_for_sm90_on_the_tensor_cores(dtype):
    """The interpreter runs what the compiler may refuse (a global that is not a constexpr, a layout it cannot
    convert): the kernel compiled for sm_90 here (no GPU needed; a child process, as TRITON_INTERPRET replaces the
    compiler) with the rule's tiles for 16 and 32 tokens (what the runtime runs; one share and several: the partial
    sums in x's dtype and in fp32) and 64 (SPQT_PREFILL_GEMM=fused), its product on the tensor cores."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SM90, dtype], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 4
    for line in lines:
        m, n, k, mma, wgmma = json.loads(line)
        assert mma + wgmma > 0, f"{m} tokens of {n}x{k}: no tensor-core instruction in the PTX"
