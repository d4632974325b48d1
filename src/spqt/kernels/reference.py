"""Torch twins of the kernels: the same semantics, on any device. The CPU path IS this module.

Shapes: x (..., K) fp16/bf16/fp32; thresholds 0-dim fp32; weights (N, K) after dequantization.
"""

import torch

from spqt.checkpoint import QuantizedWeight
from spqt.functional import linear_epilogue


def sparsify(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """x * (|x| > t): the activation-sparsity mask (TEAL). Same shape and dtype as x.

    |x| is compared in float32 (a 0-dim fp32 threshold would otherwise be rounded to x's dtype)."""
    return x * keep_mask(x, threshold).to(x.dtype)


def keep_mask(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """|x| > t in float32, the comparison every kernel makes."""
    return x.float().abs() > threshold


def collect(x: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (K,) -> (idx (K,) int32, count () int32): the ascending k with |x_k| > t first, then
    padding (-1). The count stays on the device."""
    keep = keep_mask(x, threshold)
    count = keep.sum(dtype=torch.int32)
    order = torch.arange(x.shape[0], device=x.device, dtype=torch.int32)
    # Stable: kept indices ascending, then the dropped ones; dropped slots become -1.
    key = torch.where(keep, order, order + x.shape[0])
    idx = torch.sort(key).values
    idx = torch.where(idx < x.shape[0], idx, torch.full_like(idx, -1))
    return idx, count


class ReferenceLinear:
    """The CPU / reference implementation: dequantize once into the compute dtype, then matmul.

    Trades memory for speed (a float copy of W); the GPU path reads the blocks instead.
    """

    def __init__(self, weight, dtype: torch.dtype, device: str):
        w = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight
        self.weight = w.to(device=device, dtype=dtype).contiguous()

    def dense(self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
        return linear_epilogue(torch.nn.functional.linear(x, self.weight), residual, swiglu)

    def sparse(self, x: torch.Tensor, threshold: torch.Tensor, residual: torch.Tensor | None = None,
               swiglu: bool = False) -> torch.Tensor:
        return self.dense(sparsify(x, threshold), residual, swiglu)

    def sparse_pays(self, level: float | None, norm_fed: bool = False) -> bool:
        """The reference is the semantics, not a speed: it always runs what it is asked to."""
        return True
