"""Zigzag Q4_K times several tokens on the tensor cores, reading the blocks themselves: Y = X W^T.

The prefill's other path dequantizes a whole map to X's dtype and hands it to cuBLAS: for a short prompt it writes
and reads back 3.6 bytes a weight where the blocks hold 0.56. Here each program decodes a tile of the weights in
registers (q4k_tiles: WN of a block's words for every column of its share of K, so 8 WN output rows, permuted; the
dequantization's float32 arithmetic, rounded to X's dtype: the same weights) and multiplies BM tokens by it with
tl.dot; the permutation is undone in the store.

Split-K. Short prompts give few tiles (a 7B's q|k|v at 16 tokens: 96), so the columns are cut into SPLIT shares whose
float32 partial sums the caller adds in a fixed order (torch's sum over the share axis): deterministic."""

import functools
import os

import torch
import triton
import triton.language as tl

from spqt.errors import SpqtError
from spqt.kernels.gpu_layout import GpuQ4K
from spqt.kernels.q4k_tiles import WORDS, decode_tile, tile_setup

MAX_TOKENS = 32  # more rows: dequantize + cuBLAS (gpu_linear.fused_gemm_runs)
# smaller maps: dequantize + cuBLAS (at 32 rows the 135M model's maps, 0.3-1.8 M weights, ran slower here: 1.75 against
# 1.36 ms of a prefill's GPU time; a 7B's, 16.8 M and more, 1.2-2.1x faster; none measured between)
MIN_WEIGHTS = 1 << 23
# and up to 64 rows for maps of 2^28 weights and more (a 70B's gate|up, 470 M: 467.5 against 570.4 us at 64 tokens
# with the tile dequantization; its q|k|v and o ran 0.79x, down 1.01x, a 7B's maps behind: 8c8ac31, thirtieth session)
LARGE_MAX_TOKENS = 64
LARGE_WEIGHTS = 1 << 28


@triton.jit
def _gemm_q4k_kernel(x_ptr, q_ptr, h_ptr, out_ptr, M, N, K, SHARE, WN: tl.constexpr, BM: tl.constexpr,
                     BK: tl.constexpr):
    """x (M, K) fp16 / bf16 row-major; q the zigzag planes (R, 2, K, 16) int32; h the grouped heads as int64 pairs;
    out (SPLIT, M, N) row-major (float32 partial sums, or x's dtype when SPLIT is 1). Program (tile, token block,
    share): words w0 .. w0 + WN - 1 of superblock row r (tile = r * 32 / WN + w0 / WN), tokens BM pid_m ..,
    columns SHARE s .. SHARE (s + 1) - 1."""
    r, word, shifts, row = tile_setup(WN)
    tokens = tl.program_id(1) * BM + tl.arange(0, BM)
    k_lo = tl.program_id(2) * SHARE
    k_hi = tl.minimum(k_lo + SHARE, K)
    acc = tl.zeros((BM, 8 * WN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        cols = k0 + tl.arange(0, BK)
        live = cols < k_hi
        w = decode_tile(q_ptr, h_ptr, r, word, cols, live, shifts, K, WN, BK)
        xs = tl.load(x_ptr + tokens[:, None] * K + cols[None, :], mask=(tokens[:, None] < M) & live[None, :],
                     other=0.0)
        acc = tl.dot(xs, w.to(x_ptr.dtype.element_ty), acc)
    out = out_ptr + (tl.program_id(2) * M + tokens[:, None]) * N + row[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(tokens[:, None] < M) & (row[None, :] < N))


def config(m: int, n: int, k: int, sms: int) -> dict:
    """Launch parameters for M tokens of an (N, K) map on a GPU of `sms` SMs: WN (words a tile: 8 WN rows), BM
    (tokens a program), BK (columns a step), SPLIT (column shares), num_warps, num_stages. SPQT_GEMM_CONFIG=
    WN,BM,BK,SPLIT,WARPS,STAGES overrides (a 0 keeps the rule's value; scripts/prefill_gemm_probe.py)."""
    bm = min(64, max(16, triton.next_power_of_2(m)))
    wn, bk, stages = (8, 128, 3) if bm <= 32 else (16, 32, 2)
    tiles = triton.cdiv(n, 256) * (WORDS // wn) * triton.cdiv(m, bm)
    # shares where the tiles are too few for 2 programs an SM and K is long (their partial sums cost a launch to add):
    # a 7B's q|k|v (192 tiles at 16 and 32 tokens) 2, its o and down maps (64 tiles) 4, gate|up (344) 1, the splits
    # measured fastest on the H200 (ad44689, 687247f: 5 shares of 4096 columns left one short and ran 4-7 % slower)
    split = 1 if k < 2048 or tiles >= 2 * sms else max(2, min(round(2 * sms / tiles), k // (4 * bk)))
    chosen = {"WN": wn, "BM": bm, "BK": bk, "SPLIT": split, "num_warps": 4, "num_stages": stages}
    return chosen | config_override("SPQT_GEMM_CONFIG", tuple(chosen),
                                    "WN,BM,BK,SPLIT,WARPS,STAGES; 0 keeps the rule's")


def config_override(variable: str, keys: tuple, fields: str) -> dict:
    """The non-zero values of the environment variable `variable` (comma-separated integers, one a key of `keys` in
    order; `fields` names them in the error) as {key: value}; {} where it is unset. Anything else is one SpqtError."""
    text = os.environ.get(variable, "")
    if not text:
        return {}
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != len(keys):
        raise SpqtError(f"{variable} needs {len(keys)} comma-separated integers ({fields}), got {text!r}")
    return {key: v for key, v in zip(keys, values) if v}


def check_config(cfg: dict) -> None:
    """A config the kernel tiles correctly, or ValueError: WN 4, 8, 16 or 32 (a tile a whole number of a block's
    words, its sub-block view whole), BM and BK powers of two from 16 (tl.dot), SPLIT, warps and stages positive."""
    if cfg["WN"] not in (4, 8, 16, 32) or any(cfg[key] < 16 or cfg[key] & (cfg[key] - 1) for key in ("BM", "BK")) \
            or min(cfg["SPLIT"], cfg["num_warps"], cfg["num_stages"]) < 1:
        raise ValueError(f"gemm_q4k cannot run the config {cfg}: WN in 4, 8, 16, 32; BM, BK powers of two >= 16")


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The device's SMs (the GEMMs' splits); 132 (an H100 / H200) off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemm_q4k(w: GpuQ4K, x: torch.Tensor, cfg: dict | None = None, partials: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp16 or bf16, contiguous, times the zigzag Q4_K matrix w (shape (N, K)) transposed: (M, N) in x's
    dtype. cfg: config()'s keys (tests pick small tiles; check_config). partials: the kernel's output (partials_spec),
    allocated when None (tests poison it)."""
    n, k = w.shape
    m = x.shape[0]
    if w.layout != "zigzag" or w.fmt != "q4_k":
        raise ValueError(f"gemm_q4k runs zigzag Q4_K, not {w.layout} {w.fmt}")
    if x.dim() != 2 or x.shape[1] != k or not x.is_contiguous() or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"gemm_q4k needs x (M, {k}) fp16 or bf16 contiguous, got {tuple(x.shape)} {x.dtype}")
    cfg = config(m, n, k, sm_count(x.device)) if cfg is None else cfg
    check_config(cfg)
    shape, dtype, share = partials_spec(w, m, cfg, x.dtype)
    if partials is None:
        partials = torch.empty(shape, dtype=dtype, device=x.device)
    elif partials.shape != shape or partials.dtype != dtype or not partials.is_contiguous():
        raise ValueError(f"gemm_q4k's partials must be {shape} {dtype} contiguous")
    grid = (w.grid[0] * (WORDS // cfg["WN"]), triton.cdiv(m, cfg["BM"]), shape[0])
    _gemm_q4k_kernel[grid](x, w.quants, w.head.view(torch.int64), partials, m, n, k, share, WN=cfg["WN"],
                           BM=cfg["BM"], BK=cfg["BK"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return partials[0] if shape[0] == 1 else partials.sum(0).to(x.dtype)


def partials_spec(w: GpuQ4K, m: int, cfg: dict, x_dtype: torch.dtype) -> tuple[tuple[int, int, int], torch.dtype, int]:
    """((shares, M, N), dtype, columns a share) of gemm_q4k's partial sums for M tokens: cfg's SPLIT shares of K
    rounded up to whole BK steps (fewer shares where the rounding leaves one empty); float32 for several shares, x's
    dtype for one (the kernel writes the product itself)."""
    n, k = w.shape
    share = triton.cdiv(triton.cdiv(k, cfg["SPLIT"]), cfg["BK"]) * cfg["BK"]
    shares = triton.cdiv(k, share)
    return (shares, m, n), torch.float32 if shares > 1 else x_dtype, share


def compile_sm90(cfg: dict, dtype: str = "fp16", out: str = "fp32"):
    """The kernel compiled for Hopper here, without a GPU (Triton's bundled ptxas), for a config's tiles, x in
    `dtype` and the partial sums in `out` (x's dtype for one share): the compiled object (.asm["ttgir"], ["ptx"],
    ["cubin"]). For tests (tests/test_gemm_q4k.py); needs TRITON_INTERPRET unset."""
    from spqt.kernels.sass import compile_sm90 as compile_for_sm90

    sig = {"x_ptr": f"*{dtype}", "q_ptr": "*i32", "h_ptr": "*i64", "out_ptr": f"*{out}", "M": "i32", "N": "i32",
           "K": "i32", "SHARE": "i32", "WN": "constexpr", "BM": "constexpr", "BK": "constexpr"}
    const = {"WN": cfg["WN"], "BM": cfg["BM"], "BK": cfg["BK"]}
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return compile_for_sm90(_gemm_q4k_kernel, sig, const, 8, options)
