"""Q4_K's reference encoder in C (q4_k_encode.c): the bytes of the torch encoder in q4_k.py,
several times faster on the CPU, compiled on first use (spqt/native.py).

Flags: -ffp-contract=off and no fast-math, so that the compiler neither fuses a multiply and an
add nor reorders a sum (either would round differently and change bytes); -O3 -march=native
still vectorizes, over the 8 sub-blocks of a block. tests/test_q4k_native_encoder.py checks the
bytes against the torch encoder.
"""

import ctypes
from pathlib import Path

import torch

from spqt import native

SOURCE = Path(__file__).with_name("q4_k_encode.c")
# -fno-math-errno: sqrt becomes the instruction alone (the same value; no call into libm)
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-shared", "-fPIC", "-std=c11")
_state: dict = {}


def _declare(lib: ctypes.CDLL) -> None:
    lib.spqt_q4k_encode.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.spqt_q4k_encode.restype = None
    lib.spqt_float_to_half.argtypes = [ctypes.c_float]
    lib.spqt_float_to_half.restype = ctypes.c_uint16


def library():
    """The loaded encoder (built once per process), or a string saying why there is none."""
    return native.load(SOURCE, FLAGS, _declare, _state)


def encode(x: torch.Tensor) -> torch.Tensor | None:
    """q4_k.encode(x, "reference") in C: x (n_blocks, 256) float32 on the CPU -> (n_blocks, 144)
    uint8, or None where the C encoder cannot serve (no compiler; a GPU tensor; a non-finite
    weight, whose NaN paths are left to the torch code). Runs on torch's current thread count
    (quantize_source's workers set 1 each)."""
    if x.device.type != "cpu":
        return None
    lib = library()
    if isinstance(lib, str):
        return None
    x = x.to(torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        return None
    out = torch.empty((x.shape[0], 144), dtype=torch.uint8)
    threads = torch.get_num_threads() if _state.get("openmp") else 1
    lib.spqt_q4k_encode(x.data_ptr(), x.shape[0], out.data_ptr(), threads)
    return out
