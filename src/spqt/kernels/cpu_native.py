"""The CPU's native linear maps (backend "cpu-native"): zigzag Q4_K blocks multiplied as stored,
and an fp16 GEMV for float matrices, in C (cpu_native.c).

A decode token reads every weight once, and torch's fp16 GEMV on the 2-core AVX2 EPYC runs at the
rate the CPU converts fp16 (8-9 GB/s of weights: docs/RESULTS.md, issue 18), so an fp16 copy of
the default model costs >= 31 ms a token. Read as Q4_K blocks, the same maps are 3.6x fewer bytes.

The C source is compiled on first use with the machine's C compiler (spqt/native.py):
``-O3 -march=native``, with OpenMP when the compiler has it, cached. Without a compiler,
``available()`` says why and the CLI falls back to the fp16 GEMV (cpu_fp16.py).

Numerics: sums over k in ascending order in fp32, the same for any thread count; Q4_K weights
are the format's exact values (no fp16 rounding of W); the output stays fp32.
"""

import ctypes
from pathlib import Path

import torch

from spqt import native
from spqt.checkpoint import QuantizedWeight
from spqt.kernels.cpu_fp16 import HalfGemvLinear
from spqt.kernels.reference import ReferenceLinear

SOURCE = Path(__file__).with_name("cpu_native.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11")
_state: dict = {}


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("spqt_q4k_zigzag", "spqt_half_gemm"):
        getattr(lib, name).argtypes = [p, i64, i64, p, i64, p, p, i32]
        getattr(lib, name).restype = None
    lib.spqt_openmp.restype = i32


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


def _threads() -> int:
    # the count torch uses now (cpu_threads.DecodeThreads moves it between 1 and all)
    return torch.get_num_threads() if _state.get("openmp") else 1


class _NativeMap(ReferenceLinear):
    """The product through a C routine; the dense / sparse / SwiGLU dispatch is the reference's
    (a sparse map's masked input has exact zeros, which the C loops skip)."""

    def _call(self, fn, weight_ptr: int, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        # a decode step makes 121 of these calls: each torch op here costs 1-3 us on the 2-core VM
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        y = torch.empty(x.shape[:-1] + (self.out_features,), dtype=torch.float32)
        res = None
        if residual is not None:
            if residual.dtype != torch.float32 or not residual.is_contiguous():
                residual = residual.to(torch.float32).contiguous()
            res = residual.data_ptr()
        fn(weight_ptr, self.out_features, self.in_features, x.data_ptr(), x.numel() // self.in_features,
           y.data_ptr(), res, _threads())
        return y if self.dtype == torch.float32 else y.to(self.dtype)


class NativeQ4KLinear(_NativeMap):
    """Zigzag Q4_K W (N, K), its blocks (ceil(N / 256), K, 144) uint8 as stored; x (..., K) -> (..., N)."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype, device: str):
        self.blocks = weight.blocks.contiguous()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.transposed = False

    def product(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._call(_library().spqt_q4k_zigzag, self.blocks.data_ptr(), x, residual)


class NativeHalfLinear(_NativeMap):
    """A float W (N, K) kept as fp16 (N, K) row-major; x (..., K) -> (..., N). Rounds W to fp16
    as cpu_fp16 does (the default model's tied head is fp16: exact)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, device: str):
        self.weight = weight.to(dtype=torch.float16).contiguous()
        self.out_features, self.in_features = self.weight.shape
        self.dtype = dtype
        self.transposed = False

    def product(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._call(_library().spqt_half_gemm, self.weight.data_ptr(), x, residual)


def make_native_linear(weight, dtype: torch.dtype, device: str):
    """The native map for zigzag Q4_K and float matrices; other formats get the fp16 GEMV."""
    if str(device) != "cpu":
        raise ValueError("the cpu-native backend runs on the CPU")
    if isinstance(weight, QuantizedWeight):
        if weight.fmt == "q4_k" and weight.layout == "zigzag":
            return NativeQ4KLinear(weight, dtype, device)
        return HalfGemvLinear(weight, dtype, device)
    return NativeHalfLinear(weight, dtype, device)
