"""The one place that picks an implementation for a linear map, by backend, device and layout."""

import os

import torch

from spqt.errors import SpqtError

BACKENDS = ("reference", "triton", "cpu-fp16", "cpu-native")
# Formats with Triton GEMV kernels: Q4_K in both layouts, the others in the zigzag layout only
# (zigzag_types.py; no row kernels). Everything else runs dequantize + cuBLAS on the GPU.
TRITON_FORMATS = ("q4_k", "q8_0", "q6_k", "q5_k", "q3_k", "q2_k")


def has_kernels(fmt: str, layout: str) -> bool:
    """Whether a matrix of this format and layout runs on Triton kernels."""
    return fmt in TRITON_FORMATS and (fmt == "q4_k" or layout == "zigzag")


def make_linear_impl(weight, dtype: torch.dtype, device: str, backend: str):
    """An object with .dense(x, residual, swiglu) and .sparse(x, t, residual, swiglu, scale), (..., K) -> (..., N)."""
    if backend == "reference":
        from spqt.kernels.reference import ReferenceLinear

        return ReferenceLinear(weight, dtype, device)
    if backend == "cpu-fp16":
        if str(device) != "cpu":
            raise SpqtError("the cpu-fp16 backend runs on the CPU")
        from spqt.kernels.cpu_fp16 import HalfGemvLinear

        return HalfGemvLinear(weight, dtype, device)
    if backend == "cpu-native":
        if str(device) != "cpu":
            raise SpqtError("the cpu-native backend runs on the CPU")
        from spqt.kernels import cpu_native

        why = cpu_native.available()
        if why:
            raise SpqtError(f"the cpu-native backend cannot run here: {why}")
        return cpu_native.make_native_linear(weight, dtype, device)
    if backend == "triton":
        if not str(device).startswith("cuda") and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise SpqtError("the triton backend needs a CUDA device (or TRITON_INTERPRET=1, for tests)")
        from spqt.checkpoint import QuantizedWeight

        if isinstance(weight, QuantizedWeight) and not has_kernels(weight.fmt, weight.layout):
            # No kernels for this format yet: dequantize once into the compute dtype and let cuBLAS
            # multiply (correct and graph-capturable, but a float copy of W: no memory or
            # bandwidth saving, and sparsity only masks).
            from spqt.kernels.reference import ReferenceLinear

            return ReferenceLinear(weight, dtype, device)
        from spqt.kernels.gpu_linear import CudaKQuantLinear, TritonLinear, TritonZigzagTypesLinear

        from spqt.kernels.gpu_layout_types import GpuZigzag

        if isinstance(weight, QuantizedWeight) and weight.layout == "zigzag" and str(device).startswith("cuda"):
            from spqt.kernels import zigzag_cuda

            if (dtype in zigzag_cuda.X_DTYPES and zigzag_cuda.kquant_layout(weight.fmt) is not None
                    and zigzag_cuda.runs(torch.device(device))):
                return CudaKQuantLinear(weight, dtype, device)
        if isinstance(weight, GpuZigzag) or (isinstance(weight, QuantizedWeight) and weight.fmt != "q4_k"):
            return TritonZigzagTypesLinear(weight, dtype, device)
        return TritonLinear(weight, dtype, device)
    raise SpqtError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
