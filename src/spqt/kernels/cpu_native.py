"""The CPU's native linear maps (backend "cpu-native"): zigzag blocks of every type (Q8_0, Q6_K,
Q5_K, Q4_K, Q3_K, Q2_K) multiplied as stored, and an fp16 GEMV for float matrices, in C (cpu_native.c).

A decode token reads every weight once, and torch's fp16 GEMV on the 2-core AVX2 EPYC runs at the
rate the CPU converts fp16 (8-9 GB/s of weights: docs/RESULTS.md, issue 18), so an fp16 copy of
the default model costs >= 31 ms a token. Read as Q4_K blocks, the same maps are 3.6x fewer bytes.

The C source is compiled on first use with the machine's C compiler (spqt/native.py):
``-O3 -march=native``, with OpenMP when the compiler has it, cached. Without a compiler,
``available()`` says why and the CLI falls back to the fp16 GEMV (cpu_fp16.py).

Numerics: sums over k in ascending order in fp32, the same for any thread count; quantized
weights are the format's exact values (no fp16 rounding of W); the output stays fp32. A product of
GEMM_ROWS rows or more (a prefill's) sums in the order of torch's GEMM instead (the same values of W).
"""

import ctypes
import functools
import threading
from pathlib import Path

import torch

from spqt import functional, native
from spqt.checkpoint import QuantizedWeight
from spqt.formats import get_format
from spqt.kernels.cpu_fp16 import HalfGemvLinear
from spqt.kernels.reference import ReferenceLinear

SOURCE = Path(__file__).with_name("cpu_native.c")
# The lowest level at which a zigzag map's sparse product runs on the CPU (dense_fallback): its skipped blocks still
# stream (the hardware prefetcher takes them), so below this the masking costs more than it saves. The default model's
# decode step on the 2-core VM against dense (9.25 ms): every map at 25 % +1 %, 40 % -1 %, 50 % -3 %, 65 % -6 %;
# greedy thresholds at 25 % (maps at 0-50 %) +7 % (docs/RESULTS.md, thirty-third session).
SPARSE_FROM = 0.5
# Rows of x from which a zigzag map's product (a prefill's) runs as x W^T through torch's GEMM on W^T dequantized for
# the call, instead of the blocks multiplied row by row (which decodes every block again for each row; three rows at
# a time). At 128 rows the GEMM took 1/1.8 to 1/3.2 of the time on every type and map measured (the default
# model's four, a 7B's 4096 x 4096; scripts/cpu_prefill_gemm_probe.py); against the three-row products, Q8_0
# 1/1.03 to 1/1.13 (at 64 rows they win: 0.82-0.99), Q4_K 1/1.1 to 1/1.3, the other superblock types 1/1.4 to 1/2.1. At 32 rows it led by 0.93-1.9x there, but the default model's 40-token prefill through it ran 95-119 ms
# in some processes and 210-250 ms in others against 134-140 row by row (both threads busy in MKL's GEMM either way;
# not explained): docs/RESULTS.md, thirty-sixth session.
GEMM_ROWS = 128
# Outputs of W^T dequantized at a time (whole block rows), in this thread's scratch buffer (K x 256 fp32: 4 MB at
# K = 4,096). A 7B's 4096 x 4096 Q4_K map at 32 rows: 10.1 ms in slabs of 256, 11.5 / 13.0 / 13.7 / 15.5 at 512 /
# 1,024 / 2,048 / 4,096; the default model's 40-token prefill (K = 576, 1,536) 110-133 ms in slabs of 256, 97-110 or
# 224-273 (for minutes at a time) in slabs of 4 MB.
GEMM_SLAB = 256
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11")
_state: dict = {}
_scratch_held = threading.local()


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.spqt_zigzag_type.argtypes = [ctypes.c_char_p]
    lib.spqt_zigzag_type.restype = i32
    lib.spqt_zigzag.argtypes = [i32, p, i64, i64, p, i64, p, p, i32]
    lib.spqt_zigzag.restype = None
    lib.spqt_zigzag_dequant_t.argtypes = [i32, p, i64, i64, i64, i64, p, i32]
    lib.spqt_zigzag_dequant_t.restype = None
    lib.spqt_zigzag_sparse.argtypes = [i32, p, i64, i64, p, i64, p, p, i32, ctypes.c_float, p]
    lib.spqt_zigzag_sparse.restype = i64
    lib.spqt_half_gemm.argtypes = [p, i64, i64, p, i64, p, p, i32]
    lib.spqt_half_gemm.restype = None
    lib.spqt_rms_norm.argtypes = [p, i64, i64, p, ctypes.c_float, p]
    lib.spqt_rms_norm.restype = None
    lib.spqt_mask.argtypes = [p, i64, i64, ctypes.c_float, p, p]
    lib.spqt_mask.restype = i64
    lib.spqt_silu_mul.argtypes = [p, i64, i64, p]
    lib.spqt_silu_mul.restype = None
    lib.spqt_rope_attention_decode.argtypes = [p, p, i64, p, p, i64, i64, i64, i64, i64, p, ctypes.c_float, p, i32]
    lib.spqt_rope_attention_decode.restype = i32


def build(compiler: str, flags: tuple, path: Path) -> ctypes.CDLL:
    """Compile cpu_native.c with these flags into path (unless it is there) and load it. Raises
    OSError or subprocess.CalledProcessError (its stderr the compiler's) when either fails."""
    lib = native.build(compiler, SOURCE, flags, path)
    _declare(lib)
    return lib


def _library():
    """The loaded library (built once per process), or a string saying why there is none."""
    return native.load(SOURCE, FLAGS, _declare, _state)


def available() -> str | None:
    """None when the native maps can run here, else why not (one line)."""
    lib = _library()
    return lib if isinstance(lib, str) else None


def _scratch(count: int) -> torch.Tensor:
    """A flat fp32 buffer of `count` elements, this thread's, kept (and grown) for the thread's life: a prefill's W^T
    slab allocated afresh faults its pages in on every call (a fresh 64 MB buffer's first touch 19.9 ms; the
    dequantization of 4096 x 4096 into a reused one 1.5 ms). It holds K x GEMM_SLAB fp32 at most (29 MB at K =
    28,672). Inference only: an input that requires grad would keep a view of it for a backward pass."""
    held = getattr(_scratch_held, "buffer", None)
    if held is None or held.numel() < count:
        held = _scratch_held.buffer = torch.empty(count, dtype=torch.float32)
    return held[:count]


def _threads() -> int:
    # the count torch uses now (cpu_threads.DecodeThreads moves it between 1 and all)
    return torch.get_num_threads() if _state.get("openmp") else 1


class _NativeMap(ReferenceLinear):
    """The product through a C routine; the dense / sparse dispatch is the reference's (a sparse
    map's masked input has exact zeros, which the C loops skip; a dense product of several rows multiplies them
    in). The RMSNorm in front of a map
    (Linear calls rms_norm) and the SwiGLU after it run in C too: a decode step's 61 norms and 30
    SwiGLUs take 1 call each instead of 7 and 4 torch ops (3-12 us an op on the 2-core VM)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x (..., K) -> x / sqrt(eps + mean(x^2)) * weight, float32 (weight (K,) float32)."""
        if x.dtype != torch.float32 or not x.is_contiguous() or weight.dtype != torch.float32:
            return functional.rms_norm(x, weight, eps)
        out = torch.empty_like(x)
        _library().spqt_rms_norm(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], weight.data_ptr(), eps,
                                 out.data_ptr())
        return out

    def mask(self, x: torch.Tensor, threshold: float, scale: torch.Tensor | None) -> tuple[torch.Tensor, int] | None:
        """(x * keep_mask(x, t, scale), how many inputs were kept) in one C call (Linear's CPU sparse path:
        4-5 torch ops and a count otherwise); None where it does not apply (x not fp32, t < 0)."""
        if not _rule_applies(x, threshold, scale):
            return None
        out = torch.empty_like(x)
        kept = _library().spqt_mask(x.data_ptr(), x.numel(), x.shape[-1], threshold,
                                    None if scale is None else scale.data_ptr(), out.data_ptr())
        return out, kept

    def dense(self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
        if not swiglu:
            return self.product(x, residual)
        y = self.product(x)
        return self._silu_mul(y) if y.dtype == torch.float32 else functional.linear_epilogue(y, None, True)

    @staticmethod
    def _silu_mul(y: torch.Tensor) -> torch.Tensor:
        """(..., 2F) fp32 stacked gate|up -> silu(gate) * up (..., F), in C."""
        f = y.shape[-1] // 2
        out = torch.empty(y.shape[:-1] + (f,), dtype=torch.float32)
        _library().spqt_silu_mul(y.data_ptr(), y.numel() // y.shape[-1], f, out.data_ptr())
        return out

    def _call(self, fn, weight_ptr: int, x: torch.Tensor, residual: torch.Tensor | None, *rule):
        """fn(weight, N, K, x, M, y, residual, threads, *rule) on x (..., K) -> (y (..., N) fp32, fn's
        result). A decode step makes 121 of these calls: each torch op here costs 1-3 us on the 2-core VM."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        y = torch.empty(x.shape[:-1] + (self.out_features,), dtype=torch.float32)
        res = None
        if residual is not None:
            if residual.dtype != torch.float32 or not residual.is_contiguous():
                residual = residual.to(torch.float32).contiguous()
            res = residual.data_ptr()
        result = fn(weight_ptr, self.out_features, self.in_features, x.data_ptr(), x.numel() // self.in_features,
                    y.data_ptr(), res, _threads(), *rule)
        return y, result

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.dtype == torch.float32 else y.to(self.dtype)


def _rule_applies(x: torch.Tensor, threshold: float, scale: torch.Tensor | None) -> bool:
    """Whether the C sparse rule takes this input: fp32 contiguous x and scale, a threshold >= 0."""
    if x.dtype != torch.float32 or not x.is_contiguous() or threshold < 0:
        return False
    return scale is None or (scale.dtype == torch.float32 and scale.is_contiguous())


def zigzag_type(fmt: str) -> int:
    """The C routines' index of a zigzag format ("q4_k", "q8_0", ...), -1 where they have none."""
    return _library().spqt_zigzag_type(fmt.encode())


class NativeZigzagLinear(_NativeMap):
    """Zigzag W (N, K) of a type the C routines have (zigzag_type), its blocks (ceil(N / B), K, bytes)
    uint8 as stored; x (..., K) -> (..., N)."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype, device: str):
        self.blocks = weight.blocks.contiguous()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.transposed = False
        self.type = zigzag_type(weight.fmt)
        if weight.layout != "zigzag" or self.type < 0:
            raise ValueError(f"no native map for {weight.layout} {weight.fmt}")
        self.block_rows = get_format(weight.fmt).block_size  # outputs a zigzag block holds: 256, Q8_0 32
        self._product = functools.partial(_library().spqt_zigzag, self.type)
        self._sparse = functools.partial(_library().spqt_zigzag_sparse, self.type)

    def product(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.numel() >= GEMM_ROWS * self.in_features:
            return self._output(self._gemm(x, residual))
        return self._output(self._call(self._product, self.blocks.data_ptr(), x, residual)[0])

    def _gemm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """[residual +] x W^T (fp32) for many rows of x: W^T dequantized for this call, GEMM_SLAB outputs at a time,
        each slab multiplied by torch's GEMM into its columns of y."""
        x = x.to(torch.float32)
        n, k, rows = self.out_features, self.in_features, self.block_rows
        per_slab = GEMM_SLAB // rows  # block rows a slab
        slabs = range(0, (n + rows - 1) // rows, per_slab)
        y = None if len(slabs) == 1 else torch.empty(x.shape[:-1] + (n,), dtype=torch.float32)
        for r0 in slabs:
            n0, n1 = rows * r0, min(n, rows * (r0 + per_slab))
            wt = _scratch(k * (n1 - n0)).view(k, n1 - n0)
            _library().spqt_zigzag_dequant_t(self.type, self.blocks.data_ptr(), n, k, r0, r0 + per_slab,
                                             wt.data_ptr(), _threads())
            if y is None:
                y = torch.matmul(x, wt)
            else:
                y[..., n0:n1] = torch.matmul(x, wt)
        return y if residual is None else y.add_(residual.to(torch.float32))

    def sparse_pays(self, level: float | None, norm_fed: bool = False) -> bool:
        """Whether the sparse product is faster than the dense one at this level: from SPARSE_FROM on (an unknown
        level runs sparse, as asked)."""
        return level is None or level >= SPARSE_FROM

    def sparse_counted(self, x: torch.Tensor, threshold: float, scale: torch.Tensor | None,
                       residual: torch.Tensor | None, swiglu: bool) -> tuple[torch.Tensor, int] | None:
        """(sparse(x, t, residual, swiglu, scale), how many inputs were kept) in one C call that masks as
        it reads (Linear's CPU sparse path); None where it does not apply (x or scale not fp32)."""
        if not _rule_applies(x, threshold, scale):
            return None
        # SwiGLU's map has no residual (linear_epilogue drops it), so the C adds any residual itself
        y, kept = self._call(self._sparse, self.blocks.data_ptr(), x, None if swiglu else residual, threshold,
                             None if scale is None else scale.data_ptr())
        return self._output(self._silu_mul(y) if swiglu else y), kept


class NativeHalfLinear(_NativeMap):
    """A float W (N, K) kept as fp16 (N, K) row-major; x (..., K) -> (..., N). Rounds W to fp16
    as cpu_fp16 does (the default model's tied head is fp16: exact)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, device: str):
        self.weight = weight.to(dtype=torch.float16).contiguous()
        self.out_features, self.in_features = self.weight.shape
        self.dtype = dtype
        self.transposed = False

    def sparse_pays(self, level: float | None, norm_fed: bool = False) -> bool:
        """Never, as for cpu_fp16's GEMV: a row of W holds every input's weight, so the masked product reads every
        weight (a float model's maps, which a GGUF or HF model run in its own weights has)."""
        return False

    def product(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._output(self._call(_library().spqt_half_gemm, self.weight.data_ptr(), x, residual)[0])


def decode_attention_runs(qkv: torch.Tensor, cache_k: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether rope_attention_decode takes this step: one token of one sequence, fp32, contiguous."""
    return (qkv.shape[0] == 1 and qkv.shape[1] == 1 and qkv.dtype == torch.float32 and cache_k.dtype == torch.float32
            and mask.dtype == torch.float32 and qkv.is_contiguous() and cache_k.is_contiguous()
            and mask.is_contiguous() and not qkv.is_cuda and available() is None)


def rope_attention_decode(qkv: torch.Tensor, table: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
                          cache_v: torch.Tensor, n_heads: int, n_kv: int, mask: torch.Tensor,
                          length: int, softcap: float = 0.0) -> torch.Tensor:
    """functional.attention for one token (decode_attention_runs) in one C call: RoPE, the KV-cache
    write, softmax(q k^T / sqrt(hd) + mask) v, each score soft-capped first where softcap > 0 (Gemma 2: functional.
    soft_cap's, with C's tanhf). qkv (1, 1, (H + 2 Hkv) hd); table (L_max, hd) fp32;
    caches (1, Hkv, L, hd) fp32; mask (1, length) fp32 additive -> (1, 1, H, hd) fp32. A decode step's
    ~25 torch ops a layer for RoPE, the cache write and attention (~4 ms a token on the 2-core VM). In C each key
    and value row is read once for the query heads that share it, on every thread (the same bits for any count)."""
    hd = cache_k.shape[-1]
    out = torch.empty((1, 1, n_heads, hd), dtype=torch.float32)
    status = _library().spqt_rope_attention_decode(
        qkv.data_ptr(), table.data_ptr(), int(positions[0]), cache_k.data_ptr(), cache_v.data_ptr(), n_heads, n_kv,
        hd, cache_k.shape[2], length, mask.data_ptr(), softcap, out.data_ptr(), _threads())
    if status:
        raise MemoryError("no memory for the attention scores")
    return out


def make_native_linear(weight, dtype: torch.dtype, device: str):
    """The native map for zigzag matrices of the types the C routines have (zigzag_type) and float
    matrices; other formats and layouts get the fp16 GEMV. (dispatch.make_linear_impl checks the device.)"""
    if isinstance(weight, QuantizedWeight):
        if weight.layout == "zigzag" and zigzag_type(weight.fmt) >= 0:
            return NativeZigzagLinear(weight, dtype, device)
        return HalfGemvLinear(weight, dtype, device)
    return NativeHalfLinear(weight, dtype, device)
