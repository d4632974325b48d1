"""The CUDA GEMM of zigzag Q4_K times several fp16 or bf16 tokens (kernels/gemm_cuda.py, zigzag_q4k.cu under GEMM)
against x times the dequantized weights: on the GPU (`gpu`) with every token-tile count, warp count, pipe and several
shares (bf16: the rule's and a config of each TOKT), its output poisoned with a guard after it, shapes and token counts
that are not multiples of its tiles; on the CPU the kernel compiled for sm_90 by NVRTC (its loop's tensor-core
instructions, no local memory; bf16's loop as fp16's), the rule and the checks."""

import numpy as np
import pytest
import torch

import spqt
from spqt.checkpoint import QuantizedWeight
from spqt.kernels import gemm_cuda as gc
from spqt.kernels.gpu_layout import repack

from conftest import count_calls
from kernel_inputs import assert_gemm_route, assert_within_fp32_sum, min_part

# B = fp16(x fp16(d sc)) and A's min row fp16(dmin mn): at most two fp16 roundings of a product's factors (bf16 x:
# fp16(x / 16) fp16(16 d sc), the same roundings where x / 16 is an fp16 normal)
INPUT_EPS = 2.0**-10
# bf16 x beside the scales (x, weights) of its first two cases: past fp16's range (x to ~2^17, |x d sc| ~2^10: staged
# unshifted, x / 1, it fails), and small (|x| ~2^-8, some x / 16 fp16 subnormals; a shift of 256 passes too, its
# error on small x below bf16's own rounding of y: H100, forty-sixth session)
BF16_SCALES = [(2.0**15, 2.0**-5), (2.0**-8, 1.0)]

# (N, K, tokens): rows past the last whole superblock row, K not a multiple of 16, one token, token counts past a
# tile of 8 and past 32 (two programs of TOKT 4 a superblock row), a 7B's map
CASES = [(300, 130, 3), (513, 777, 17), (2311, 1000, 33), (960, 576, 64), (4096, 4096, 8), (11008, 4096, 1)]
# beside the rule's: every TOKT and warp count, pipe on and off, rings of several depths (empty copy groups past a
# warp's last chunk; warps with no full chunk at K = 130, SPLIT 8), more shares than 16-column steps (fewer shares run)
CONFIGS = [dict(TOKT=1, WARPS=1, SPLIT=3, PIPE=0, RING=0), dict(TOKT=1, WARPS=4, SPLIT=1, PIPE=1, RING=0),
           dict(TOKT=2, WARPS=2, SPLIT=5, PIPE=1, RING=0), dict(TOKT=2, WARPS=4, SPLIT=1, PIPE=0, RING=0),
           dict(TOKT=4, WARPS=4, SPLIT=7, PIPE=1, RING=0), dict(TOKT=4, WARPS=4, SPLIT=100, PIPE=0, RING=0),
           dict(TOKT=1, WARPS=2, SPLIT=2, PIPE=0, RING=2), dict(TOKT=2, WARPS=4, SPLIT=3, PIPE=0, RING=4),
           dict(TOKT=4, WARPS=4, SPLIT=2, PIPE=0, RING=3), dict(TOKT=2, WARPS=2, SPLIT=1, PIPE=0, RING=8),
           dict(TOKT=1, WARPS=4, SPLIT=8, PIPE=0, RING=3)]


def _matrix(rng, n, k, device, scale: float = 1.0):
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32) * scale).to(device)
    qw = QuantizedWeight(spqt.quantize(w, "q4_k", "zigzag"), "q4_k", "zigzag", (n, k))
    return qw, repack(qw, device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_gemm_equals_dequantized_matmul(rng, dtype):
    from spqt.kernels import zigzag_cuda

    if not zigzag_cuda.usable():
        pytest.fail("the CUDA GEMM cannot run on this GPU (NVRTC, sm_80+ needed)")
    # bf16: the rule's config and one of each TOKT, with a pipe, rings and many shares (its compiles are the cost)
    configs = CONFIGS if dtype == torch.float16 else [CONFIGS[i] for i in (0, 7, 4, 5)]
    for case, (n, k, m) in enumerate(CASES):
        x_scale, w_scale = BF16_SCALES[case] if dtype == torch.bfloat16 and case < len(BF16_SCALES) else (1.0, 1.0)
        qw, gw = _matrix(rng, n, k, "cuda", w_scale)
        w_ref = qw.dequantize().double().cuda()
        w_mag = w_ref.abs() + 2 * min_part(qw).double().abs().cuda()
        # x inside a NaN buffer (a read past its rows or columns poisons the output); every other case 2 bytes off
        # 16-byte alignment (the launcher copies it)
        xbuf = torch.full(((m + 2) * k + 8,), float("nan"), dtype=dtype, device="cuda")
        at = 8 if case % 2 == 0 else k + 1
        x = xbuf[at:at + m * k].view(m, k)
        x.copy_(torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32) * x_scale))
        assert x_scale <= 1 or float(x.abs().max()) > 65504
        for cfg in [gc.config(m, n, k, 132)] + configs:
            what = f"{n}x{k} {m} tokens {cfg} {dtype} x scaled by {x_scale}"
            shape, share = gc.partials_spec(gw, m, cfg)
            if share > gc.max_share(cfg):  # its tokens' x would not fit shared memory
                with pytest.raises(ValueError, match="does not fit shared memory"):
                    gc.gemm(gw, x, cfg)
                continue
            buf = torch.full((shape[0] * m * n + 4096,), float("nan"), device="cuda")
            partials, part_guard = buf[:-4096].view(shape), buf[-4096:]
            ybuf = torch.full((m * n + 4096,), float("nan"), dtype=dtype, device="cuda")
            out, guard = ybuf[:-4096].view(m, n), ybuf[-4096:]
            y = gc.gemm(gw, x, cfg, partials=partials, out=out)
            assert y.data_ptr() == out.data_ptr(), what
            assert torch.isnan(guard).all() and torch.isnan(part_guard).all(), f"{what}: written past the output"
            assert_within_fp32_sum(y.T, w_ref, w_mag, x.T, what, INPUT_EPS)
            again = gc.gemm(gw, x, cfg)
            assert torch.equal(again, y), f"{what}: not deterministic"


@pytest.mark.gpu
def test_cuda_gemm_edge_cases(rng):
    """No tokens: an empty product, no launch; w on another device than x: one ValueError."""
    qw, gw = _matrix(rng, 300, 130, "cuda")
    assert gc.gemm(gw, torch.zeros(0, 130, dtype=torch.float16, device="cuda")).shape == (0, 300)
    _, cpu_w = _matrix(rng, 300, 130, "cpu")
    with pytest.raises(ValueError, match="on its device"):
        gc.gemm(cpu_w, torch.zeros(2, 130, dtype=torch.float16, device="cuda"))


@pytest.mark.gpu
def test_linear_runs_the_cuda_gemm_for_short_prompts(rng, monkeypatch):
    """TritonLinear's several-token product: the CUDA GEMM for fp16 and bf16 zigzag Q4_K of at least MIN_WEIGHTS
    weights up to MAX_TOKENS tokens (the same sums as dequantize + matmul within their roundings); SPQT_PREFILL_GEMM=
    dequant does not run it."""
    from spqt.kernels import gpu_linear
    from spqt.kernels.gpu_linear import TritonLinear

    calls = count_calls(monkeypatch, gc, "gemm")
    qw, _ = _matrix(rng, 300, 130, "cuda")
    lin = TritonLinear(qw, torch.float16, "cuda")
    x = torch.from_numpy(rng.standard_normal((1, 5, 130)).astype(np.float32)).to("cuda", torch.float16)
    assert not gpu_linear.cuda_gemm_runs(lin.w, x, 5)  # 39,000 weights
    monkeypatch.setattr(gc, "MIN_WEIGHTS", 300 * 130)
    assert gpu_linear.cuda_gemm_runs(lin.w, x, gc.MAX_TOKENS)
    assert not gpu_linear.cuda_gemm_runs(lin.w, x, gc.MAX_TOKENS + 1)
    assert_gemm_route(lin, x, calls, monkeypatch)
    bf16 = TritonLinear(qw, torch.bfloat16, "cuda")
    assert gpu_linear.cuda_gemm_runs(bf16.w, x.bfloat16(), gc.MAX_TOKENS)
    assert_gemm_route(bf16, x.bfloat16(), calls, monkeypatch)


def test_cuda_gemm_rule_and_override(monkeypatch):
    """config(): TOKT and the ring by the token count, shares until about a wave of resident programs an SM (at least
    256 columns a share, at most max_share: the tokens' x beside the rings in shared memory);
    SPQT_CUDA_GEMM_CONFIG replaces the rule's non-zero fields (PIPE or RING -1: off; without SPLIT the rule's split
    for the config set); anything but six integers is one clear error; check_config refuses what the kernel cannot
    run."""
    from spqt.errors import SpqtError

    assert [gc.config(m, 12288, 4096, 132)["TOKT"] for m in (1, 8, 9, 16, 17, 32, 33, 64)] == [1, 1, 2, 2, 2, 2, 4, 4]
    assert [gc.config(m, 12288, 4096, 132)["RING"] for m in (1, 16, 17, 64)] == [2, 2, 4, 4]
    assert gc.config(8, 12288, 4096, 132)["SPLIT"] == 11  # 48 superblock rows: 528 programs, 4 an SM
    assert gc.config(32, 12288, 4096, 132)["SPLIT"] == 6  # 96 programs of 16 tokens
    assert gc.config(8, 960, 576, 132)["SPLIT"] == 2  # K // 256
    assert gc.config(64, 57344, 8192, 132)["SPLIT"] == 15  # 32 tokens' x of 576 columns beside the rings
    rule = gc.config(16, 12288, 4096, 132)
    monkeypatch.setenv("SPQT_CUDA_GEMM_CONFIG", "4,0,3,-1,-1,3")
    assert gc.config(16, 12288, 4096, 132) == rule | {"TOKT": 4, "SPLIT": 3, "PIPE": 0, "RING": 0, "RESIDENT": 3}
    for fields in ("4,0,0,0,0,0", "1,0,0,0,4,0"):  # the rule's split for the TOKT or rings set: one that fits
        monkeypatch.setenv("SPQT_CUDA_GEMM_CONFIG", fields)
        cfg = gc.config(8, 4096, 11008, 132)
        assert cfg["SPLIT"] >= -(-11008 // gc.max_share(cfg)), fields
    monkeypatch.setenv("SPQT_CUDA_GEMM_CONFIG", "0,0,0,0,0,2")  # half the resident programs: about half the shares
    assert gc.config(8, 12288, 4096, 132)["SPLIT"] == 6
    # the bound the config set needs where RESIDENT is not set (the pipe's registers, TOKT 4 without a ring), not 4
    for fields, bound in (("0,0,0,1,-1,0", 1), ("4,0,0,0,-1,0", 3), ("0,0,0,0,3,0", 4)):
        monkeypatch.setenv("SPQT_CUDA_GEMM_CONFIG", fields)
        assert gc.config(16, 12288, 4096, 132)["RESIDENT"] == bound, fields
    for bad in ("1,2", "a,b,c,d,e,f", "1,2,3,4,5", "1,2,3,4,5,6,7"):
        monkeypatch.setenv("SPQT_CUDA_GEMM_CONFIG", bad)
        with pytest.raises(SpqtError, match="SPQT_CUDA_GEMM_CONFIG needs 6"):
            gc.config(16, 12288, 4096, 132)
    for bad in ({"TOKT": 8}, {"TOKT": 4, "WARPS": 2}, {"WARPS": 8}, {"SPLIT": 0}, {"PIPE": 2}, {"RING": 1},
                {"RING": 9}, {"RING": 2}, {"TOKT": 1, "WARPS": 4, "PIPE": 0, "RING": 8}, {"RESIDENT": 5},
                {"RESIDENT": 0}):
        with pytest.raises(ValueError, match="cannot run the config"):
            gc.check_config(CONFIGS[1] | bad)
    monkeypatch.delenv("SPQT_CUDA_GEMM_CONFIG")
    for m, n, k in ((64, 4096, 14336), (16, 8192, 28672), (8, 960, 576), (32, 57344, 8192)):
        cfg = gc.config(m, n, k, 132)
        share = -(-k // cfg["SPLIT"])
        assert share <= gc.max_share(cfg) and gc.shared_bytes(cfg, share) <= gc.MAX_SHARED, (m, n, k)


def test_cuda_gemm_routes_the_maps_measured_faster():
    """pays() on real maps' shapes (thirty-first and thirty-second sessions' measurements, H200): a 7B's and a 70B's
    maps up to 32 rows (the prefill's buckets of 16 and 32), not at 33 (64: dequantize + cuBLAS or gemm_q4k were as
    fast or faster), nor the 135M model's maps at any count."""
    for n, k in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (57344, 8192), (8192, 28672)):
        assert gc.pays(n, k, 16) and gc.pays(n, k, 1) and gc.pays(n, k, 32) and not gc.pays(n, k, 33), f"{n}x{k}"
    for n, k in ((960, 576), (576, 576), (3072, 576), (576, 1536)):
        assert not gc.pays(n, k, 16), f"{n}x{k}"


def test_cuda_gemm_checks_its_contract():
    """fp32 or mis-shaped x, x off CUDA, a row-layout matrix, a share too wide for shared memory: one ValueError each
    (before any launch, so on the CPU too)."""
    rng = np.random.default_rng(5)
    qw, gw = _matrix(rng, 64, 40, "cpu")
    for x in (torch.zeros(2, 40, dtype=torch.float16), torch.zeros(2, 40, device="meta"),
              torch.zeros(2, 41, dtype=torch.bfloat16, device="meta")):
        with pytest.raises(ValueError, match="fp16 or bf16 contiguous on CUDA"):
            gc.gemm(gw, x)
    row = repack(QuantizedWeight(spqt.quantize(qw.dequantize(), "q4_k", "row"), "q4_k", "row", (64, 40)), "cpu")
    with pytest.raises(ValueError, match="zigzag Q4_K"):
        gc.gemm(row, torch.zeros(2, 40, dtype=torch.float16))
    assert not gc.runs(row, torch.zeros(2, 40, dtype=torch.float16))
    assert not gc.runs(gw, torch.zeros(2, 40, dtype=torch.float16))  # not on CUDA
    _, wide = _matrix(rng, 64, 4000, "cpu")
    with pytest.raises(ValueError, match="does not fit shared memory"):  # 8 x 4 tokens' x of 4000 columns: 128 KB
        gc.gemm(wide, torch.zeros(2, 4000, dtype=torch.float16, device="meta"), dict(TOKT=4, WARPS=4, SPLIT=1, PIPE=0))


def _compiled_loop(cfg: dict, bf16: bool) -> tuple[str, list[str]]:
    """(the kernel's SASS, its chunk loop's opcodes) of cfg compiled for sm_90 here: with a ring its shortest loop
    that runs the mma and asks for copies (not the longer one through __syncwarp's divergent path back into it)."""
    from spqt.kernels import nvrtc
    from spqt.kernels.sass import disassemble, loops, main_loop, opcode

    try:
        cubin = gc.cubin_sm90(cfg, bf16)
    except nvrtc.NvrtcUnavailable as exc:
        pytest.fail(f"NVRTC is a test dependency here: {exc}")
    sass, _, _ = disassemble(cubin)
    gemm = next(part for part in sass.split("//--------------------- .text.")
                if part.startswith("zigzag_q4k_gemm "))  # nvdisasm's section of this function
    if cfg["RING"]:
        loop = min((lp for lp in loops(gemm) if any("HMMA" in ln for ln in lp)
                    and any("LDGSTS" in ln for ln in lp)), key=len)
    else:
        loop = main_loop(gemm, "HMMA")
    return gemm, [opcode(line) or "" for line in loop if "@!PT" not in line]  # not the never-run LDS padding


@pytest.mark.parametrize("tokt", gc.TOKTS)
def test_cuda_gemm_compiles_for_sm90(tokt):
    """Each TOKT's kernel compiled for sm_90 here (NVRTC needs no GPU), pipe on and off and with a ring: the chunk
    loop runs 16 + TOKT mma (16 tiles times TOKT token tiles a warp's part, and the min term's TOKT), shuffles the
    sub-blocks' scales (16 / TOKT), reads x from shared memory and keeps everything else in registers (no local
    memory); with a ring its loop asks for a chunk by 5 asynchronous copies (4 slots' levels, a head) and loads
    nothing into registers from global memory, reading the chunk from shared memory (GW level vectors, 4 heads).
    Each build is bounded to gemm_cuda.resident() programs an SM (__launch_bounds__) and spills nothing under it.
    bf16 (x staged as fp16(x / 16)): the same loop but for 4 multiplications (the 4 slots' d sc times 16) and at
    most 2 register moves, its output rounded to bf16, no local memory."""
    from collections import Counter

    from spqt.kernels.sass import opcode

    for pipe, ring in ((0, 0), (1, 0), (0, 2), (0, 4)):  # the rule runs rings of 2 (up to 16 rows) and 4
        cfg = dict(TOKT=tokt, WARPS=4, SPLIT=1, PIPE=pipe, RING=ring)
        gemm, ops = _compiled_loop(cfg, bf16=False)
        what = f"TOKT {tokt} pipe {pipe} ring {ring}"
        assert sum(op.startswith("HMMA") for op in ops) == 16 + tokt, what
        assert sum(op.startswith("SHFL") for op in ops) == 16 // tokt, what
        if ring:
            assert sum(op.startswith("LDGSTS") for op in ops) == 5, what
            assert not any(op.startswith("LDG.") for op in ops), what
            assert sum(op.startswith("LDS") for op in ops) == 4 // tokt + 4 + tokt, what
        else:
            assert sum(op.startswith("LDS") for op in ops) == tokt, what
        bf16_gemm, bf16_ops = _compiled_loop(cfg, bf16=True)
        fp16_count, bf16_count = Counter(ops), Counter(bf16_ops)
        assert bf16_count["FMUL"] == fp16_count["FMUL"] + 4, what
        for kind in ("HMMA", "SHFL", "LDS", "LDG", "LDGSTS", "LOP3", "PRMT", "HMUL2", "F2FP"):
            assert sum(n for op, n in bf16_count.items() if op.startswith(kind)) \
                == sum(n for op, n in fp16_count.items() if op.startswith(kind)), f"{what}: {kind}"
        assert len(bf16_ops) <= len(ops) + 6, f"{what}: {len(bf16_ops)} instructions against {len(ops)}"
        assert "F2FP.BF16" in bf16_gemm and "F2FP.BF16" not in gemm, what
        for sass in (gemm, bf16_gemm):
            assert not any((opcode(line) or "").startswith(("LDL", "STL")) for line in sass.splitlines()), \
                f"{what}: local memory"
