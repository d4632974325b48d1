"""Zigzag Q4_K times several fp16 or bf16 tokens on the tensor cores in CUDA C++ (zigzag_q4k.cu under GEMM, compiled by
NVRTC): Y = X W^T, the prefill's product for a short prompt.

The tokens are the mma's n (8 a token tile); the weights are its A operand straight from the level bytes, as in the
decode GEMV (zigzag_cuda), so a weight costs about the GEMV's instructions for 8 tokens where the Triton GEMM (gemm_q4k)
decodes it into a tile for tl.dot. A program takes one superblock row (256 outputs), TOKT token tiles and a share of the
columns; with RING each warp keeps its next RING - 1 chunks in flight as asynchronous copies into shared memory (no
registers held: 1.1-1.5x faster at 16-32 tokens than loads into registers, thirty-second session). The shares' float32
partial sums are added by the GEMV's reduction kernel (one launch, a fixed tree: deterministic), or with one share the
program writes y (x's dtype) itself. (The last share to arrive at a tile adding them instead ran 1.6-2x slower,
thirty-first session; the shares adding them in a thread block cluster 1.1-1.4x slower, thirty-second: docs/RESULTS.md.)
The mma is fp16's in both (A's subnormal levels need fp16's exponent): bf16 x is staged as fp16(x / 16) beside d sc
times 16 (the .cu file's XBF16), so it needs |x| <= 65504 * 16, a sub-block's range of weights below ~61,000 and
|x d sc| <= 65504, the bound fp16 x has.
"""

import torch
import triton

from spqt.kernels import gemv as kg
from spqt.kernels import nvrtc, zigzag_cuda
from spqt.kernels.gemm_q4k import config_override, sm_count
from spqt.kernels.gpu_layout import GpuQ4K

TOKTS = (1, 2, 4)  # token tiles of 8 a program (the .cu file's TOKT)
WARPS = (1, 2, 4)  # warps a program (a multiple of TOKT; its shared sums take 8.3 KB a warp)
RINGS = tuple(range(2, 9))  # chunks a warp's ring of asynchronous copies may hold (RING; 0: none)
KEYS = ("TOKT", "WARPS", "SPLIT", "PIPE", "RING", "RESIDENT")
# Where it runs in the prefill (gpu_linear.cuda_gemm_runs), from one H200 (docs/RESULTS.md thirty-first and
# thirty-second sessions): with the rule's ring (eba0840), at 16 rows (a prompt of 1-16 tokens pads to the bucket of
# 16) a 7B's and a 70B's maps 1.45-1.65x faster than gemm_q4k; at 32 rows (two programs of 16 tokens, RING 4) 1.03-1.38x
# on a 7B's, 0.96 / 1.04x on a 70B's gate|up / down (1.02 / 1.11x in the other call, 29ed516: within the calls' spread);
# at 64 behind dequantize + cuBLAS or gemm_q4k; the 135M model's maps (0.3-1.8 M weights, thirty-first session) ran
# 2.6-4.4x slower than either. More rows or smaller maps: gemm_q4k or dequantize + cuBLAS.
MAX_TOKENS = 32
MIN_WEIGHTS = 1 << 23


def options(cfg: dict, bf16: bool = False) -> tuple:
    """NVRTC options of one configuration (bf16: x and y bf16)."""
    return ("-DGEMM=1", f"-DTOKT={cfg['TOKT']}", f"-DWARPS={cfg['WARPS']}", f"-DPIPE={cfg['PIPE']}",
            f"-DRING={cfg.get('RING', 0)}", f"-DRESIDENT={resident(cfg)}", "-DTYPE=4") \
        + (("-DXBF16=1",) if bf16 else ())  # (as zigzag_cuda.options)


def resident(cfg: dict) -> int:
    """Programs an SM must hold at cfg (RESIDENT, the build's __launch_bounds__ minimum: at most 65536 / (32 WARPS
    RESIDENT) registers a thread). Where cfg leaves it out: 1 with the pipe (152-172 registers at 4 warps), 3 at TOKT 4
    without a ring (4 would spill), else 4; none of these spills (tests/test_gemm_cuda.py)."""
    if "RESIDENT" in cfg:
        return cfg["RESIDENT"]
    if cfg["PIPE"]:
        return 1
    return 3 if cfg["TOKT"] == 4 and not cfg.get("RING", 0) else 4


MAX_SHARED = 48 * 1024  # dynamic shared memory a program may take without opting in
SUM_BYTES = 8320  # shared memory of a warp's sums (8 tokens x 260 floats a token tile: the .cu file's SUM_STRIDE)


def ring_bytes(cfg: dict) -> int:
    """Shared memory of a program's rings: RING stages a warp of its level words (2 KB / TOKT) and 16 heads."""
    return cfg["WARPS"] * cfg.get("RING", 0) * (2048 // cfg["TOKT"] + 256)


def max_share(cfg: dict) -> int:
    """Columns a share may hold: its tokens' x (8 TOKT tokens, 2 bytes a column) beside the rings in MAX_SHARED."""
    return (MAX_SHARED - ring_bytes(cfg)) // (16 * cfg["TOKT"]) // 16 * 16


def shared_bytes(cfg: dict, share: int) -> int:
    """Dynamic shared memory of a program: its tokens' share of x and its warps' rings, then (the same space) its
    warps' sums."""
    return max(16 * cfg["TOKT"] * share + ring_bytes(cfg), SUM_BYTES * cfg["WARPS"])


def rule_split(m: int, n: int, k: int, sms: int, cfg: dict) -> int:
    """The rule's shares of K for cfg: until the grid is about one wave of its resident programs an SM, a share at
    least 256 columns and at most max_share (its tokens' x beside the rings)."""
    programs = triton.cdiv(n, 256) * triton.cdiv(m, 8 * cfg["TOKT"])
    fits = triton.cdiv(k, max_share(cfg)) if max_share(cfg) >= 16 else 1  # (check_config refuses the latter)
    return max(1, min(round(resident(cfg) * sms / programs), k // 256), fits)


def config(m: int, n: int, k: int, sms: int) -> dict:
    """Launch parameters for M tokens of an (N, K) map on a GPU of `sms` SMs: TOKT, WARPS, SPLIT (column shares),
    PIPE, RING, RESIDENT. SPQT_CUDA_GEMM_CONFIG=TOKT,WARPS,SPLIT,PIPE,RING,RESIDENT overrides (a 0 keeps the rule's
    value; -1 for 0); without SPLIT there, the rule's split for the config set."""
    chosen = {"TOKT": 1 if m <= 8 else 2 if m <= 32 else 4, "WARPS": 4, "PIPE": 0, "RING": 2 if m <= 16 else 4}
    override = config_override("SPQT_CUDA_GEMM_CONFIG", KEYS, "TOKT,WARPS,SPLIT,PIPE,RING,RESIDENT; 0 keeps the "
                               "rule's, -1 turns PIPE or RING off")
    return completed(m, n, k, sms, chosen | {key: max(value, 0) for key, value in override.items()}, set(override))


def completed(m: int, n: int, k: int, sms: int, cfg: dict, given: set) -> dict:
    """cfg made whole for M tokens of an (N, K) map: RESIDENT the bound its build needs (resident()) and SPLIT the
    rule's for it (rule_split) where `given` does not name them; ValueError for a config the kernel cannot run
    (checked before the split, which divides by TOKT and the share)."""
    chosen = {key: v for key, v in cfg.items() if key != "RESIDENT" or "RESIDENT" in given}
    chosen["RESIDENT"] = resident(chosen)  # given, else the bound the config needs (4 for the rule's)
    check_config(chosen | {"SPLIT": 1})
    if "SPLIT" not in given:
        chosen["SPLIT"] = rule_split(m, n, k, sms, chosen)
    return {key: chosen[key] for key in KEYS}


def check_config(cfg: dict) -> None:
    """A config the kernel runs, or ValueError: TOKT in TOKTS, WARPS in WARPS and a multiple of TOKT, SPLIT >= 1,
    PIPE 0 or 1, RING 0 or 2 to 8 (not with PIPE), its rings leaving x a share of 16 columns, RESIDENT 1 to 4."""
    ring = cfg.get("RING", 0)
    if cfg["TOKT"] not in TOKTS or cfg["WARPS"] not in WARPS or cfg["WARPS"] % cfg["TOKT"] or cfg["SPLIT"] < 1 \
            or cfg["PIPE"] not in (0, 1) or ring not in (0, *RINGS) or (ring and cfg["PIPE"]) or max_share(cfg) < 16 \
            or resident(cfg) not in (1, 2, 3, 4):
        raise ValueError(f"the CUDA GEMM cannot run the config {cfg}: TOKT in {TOKTS}, WARPS in {WARPS} and a multiple "
                         f"of TOKT, SPLIT >= 1, PIPE 0 or 1, RING 0 or in {RINGS} without PIPE, the rings in "
                         f"{MAX_SHARED} bytes of shared memory, RESIDENT 1 to 4")


def partials_spec(w: GpuQ4K, m: int, cfg: dict) -> tuple[tuple[int, int, int], int]:
    """((shares, M, N), columns a share) of the kernel's float32 partial sums for M tokens: cfg's SPLIT shares of K in
    multiples of 16 columns (fewer shares where the rounding leaves one empty; with one share none are written)."""
    n, k = w.shape
    share = triton.cdiv(triton.cdiv(k, cfg["SPLIT"]), 16) * 16
    return (triton.cdiv(k, share), m, n), share


def pays(n: int, k: int, rows: int) -> bool:
    """Whether `rows` rows of x times an (N, K) map measured faster here than gemm_q4k and dequantize + cuBLAS (at
    most MAX_TOKENS rows, at least MIN_WEIGHTS weights)."""
    return rows <= MAX_TOKENS and n * k >= MIN_WEIGHTS


def runs(w, x: torch.Tensor) -> bool:
    """Whether this kernel can run x (M, K) times w here: a zigzag Q4_K GpuQ4K, fp16 or bf16 x (zigzag_cuda.X_DTYPES)
    on an sm_80+ CUDA device with NVRTC (zigzag_cuda.usable), SPQT_GEMV not "triton"."""
    return (isinstance(w, GpuQ4K) and w.layout == "zigzag" and w.fmt == "q4_k" and x.is_cuda
            and x.dtype in zigzag_cuda.X_DTYPES and zigzag_cuda.runs(x.device))


def gemm(w: GpuQ4K, x: torch.Tensor, cfg: dict | None = None, partials: torch.Tensor | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) fp16 or bf16 contiguous times the zigzag Q4_K matrix w (N, K) transposed: (M, N) of x's dtype (into
    out when given).
    cfg: config()'s keys (check_config); partials: the kernel's float32 partial sums (partials_spec; tests poison it
    and out), allocated when None; unused with one share."""
    n, k = w.shape
    m = x.shape[0]
    if w.layout != "zigzag" or w.fmt != "q4_k":
        raise ValueError(f"the CUDA GEMM runs zigzag Q4_K, not {w.layout} {w.fmt}")
    if x.dim() != 2 or x.shape[1] != k or not x.is_contiguous() or x.dtype not in zigzag_cuda.X_DTYPES:
        raise ValueError(f"the CUDA GEMM needs x (M, {k}) fp16 or bf16 contiguous on CUDA, got {tuple(x.shape)} "
                         f"{x.dtype}")
    rows = w.grid[0]
    if tuple(w.quants.shape) != (rows, 2, k, 16) or tuple(w.head.shape) != (triton.cdiv(rows, 4), k, 4, 4) \
            or not (w.quants.is_contiguous() and w.head.is_contiguous()):
        raise ValueError("the CUDA GEMM reads the zigzag planes (rows, 2, K, 16) and grouped heads, contiguous")
    if m == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device) if out is None else out
    cfg = config(m, n, k, sm_count(x.device)) if cfg is None else cfg
    check_config(cfg)
    shape, share = partials_spec(w, m, cfg)
    if share > max_share(cfg):
        raise ValueError(f"the CUDA GEMM's share of {share} columns does not fit shared memory at TOKT {cfg['TOKT']} "
                         f"RING {cfg.get('RING', 0)} (at most {max_share(cfg)}: a larger SPLIT)")
    if not x.is_cuda or w.quants.device != x.device or w.head.device != x.device \
            or w.quants.dtype != torch.int32 or w.head.dtype != torch.int32:
        raise ValueError(f"the CUDA GEMM needs x (M, {k}) fp16 or bf16 contiguous on CUDA and w's int32 blocks on "
                         f"its device, got x on {x.device}, w on {w.quants.device}")
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if x.data_ptr() % 16:
        x = x.clone()  # 16-byte loads of x
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"the CUDA GEMM's out must be ({m}, {n}) {x.dtype} contiguous")
    one = shape[0] == 1  # the program writes the product itself: no partial sums
    if one:
        partials = out
    elif partials is None:
        partials = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif partials.shape != shape or partials.dtype != torch.float32 or not partials.is_contiguous():
        raise ValueError(f"the CUDA GEMM's partials must be {shape} float32 contiguous")
    kernel = zigzag_cuda.compiled(index, options(cfg, x.dtype == torch.bfloat16), "zigzag_q4k_gemm")
    P, I = nvrtc.POINTER, nvrtc.INT
    args = [(w.quants.data_ptr(), P), (w.head.data_ptr(), P), (x.data_ptr(), P), (partials.data_ptr(), P), (m, I),
            (n, I), (k, I), (share, I), (int(one), I)]
    kernel.launch((triton.cdiv(m, 8 * cfg["TOKT"]), rows, shape[0]), 32 * cfg["WARPS"], args,
                  torch.cuda.current_stream(x.device), shared=shared_bytes(cfg, share))
    if not one:
        kg.sum_shares(partials, out, m * n, m * n, shape[0])
    return out


def cubin_sm90(cfg: dict, bf16: bool = False) -> bytes:
    """The kernel of a config compiled for Hopper here (NVRTC needs no GPU): for the CPU tests' SASS checks."""
    check_config(cfg)
    return nvrtc.compile_cubin(zigzag_cuda.SOURCE.read_text(), options(cfg, bf16), "sm_90")
