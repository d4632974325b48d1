"""Torch twins of the kernels: the same semantics, on any device. The CPU path IS this module.

Shapes: x (..., K) fp16/bf16/fp32; thresholds 0-dim fp32; weights (N, K) after dequantization;
scale (K,) fp32 or None: the per-input weight of the WINA criterion (column norms of W).
"""

import torch

from spqt.checkpoint import QuantizedWeight
from spqt.functional import linear_epilogue


def sparsify(x: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x * keep_mask(x, t, scale): the activation-sparsity mask. Same shape and dtype as x."""
    return x * keep_mask(x, threshold, scale).to(x.dtype)


def keep_mask(x: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """|x| > t (TEAL), or |x| * scale > t (WINA), in float32: the comparison every kernel makes
    (one fp32 product, so the kernels' choice is bit-identical). A 0-dim fp32 threshold would
    otherwise be rounded to x's dtype."""
    a = x.float().abs()
    return (a if scale is None else a * scale) > threshold


def collect(x: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (K,) -> (idx (K,) int32, count () int32): the ascending k kept by keep_mask first, then
    padding (-1). The count stays on the device."""
    keep = keep_mask(x, threshold, scale)
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
               swiglu: bool = False, scale: torch.Tensor | None = None) -> torch.Tensor:
        return self.dense(sparsify(x, threshold, scale), residual, swiglu)

    def sparse_pays(self, level: float | None, norm_fed: bool = False) -> bool:
        """The reference is the semantics, not a speed: it always runs what it is asked to."""
        return True
