"""Torch twins of the kernels: the same semantics, on any device. The CPU path IS this module.

Shapes: x (..., K) fp16/bf16/fp32; thresholds 0-dim fp32; weights (N, K) after dequantization;
scale (K,) fp32 or None: the per-input weight of the WINA criterion (column norms of W).
"""

import torch

from spqt.checkpoint import QuantizedWeight
from spqt.functional import linear_epilogue


def sparsify(x: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x * keep_mask(x, t, scale): the activation-sparsity mask. Same shape and dtype as x."""
    return x * keep_mask(x, threshold, scale)  # bool promotes to x's dtype: the same product, one op


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

    Trades memory for speed (a float copy of W); the GPU path reads the blocks instead. On the CPU,
    a map with more outputs than inputs keeps W transposed, (K, N) contiguous: MKL's one-token
    GEMV reads that layout faster on the 2-core AVX2 EPYC (fp32, one thread: gate_up 3072x576
    11.0 against 19.6 ms for 30 maps, head 49152x576 5.0 against 9.8 ms, qkv 960x576 4.4 against
    6.0; down 576x1536 the other way, 6.7 against 8.7 ms; docs/RESULTS.md, issue 18).
    """

    def __init__(self, weight, dtype: torch.dtype, device: str):
        w = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight
        n, k = w.shape
        # fp32 only: torch's own fp16/bf16 GEMV reads (K, N) 10-60x slower than (N, K)
        self.transposed = str(device) == "cpu" and n > k and dtype == torch.float32
        w = w.to(device=device, dtype=dtype)
        # weight: (N, K), or (K, N) when transposed
        self.weight = (w.t() if self.transposed else w).contiguous()

    def product(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(..., K) -> residual + W x, or W x; the residual added by the GEMM itself (beta = 1)."""
        wt = self.weight if self.transposed else self.weight.t()
        if residual is None:
            return torch.matmul(x, wt)
        if x.dim() == 2:
            return torch.addmm(residual, x, wt)
        return torch.addmm(residual.reshape(-1, wt.shape[1]), x.reshape(-1, wt.shape[0]), wt).view(residual.shape)

    def dense(self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
        if swiglu:
            return linear_epilogue(self.product(x), None, True)
        return self.product(x, residual)

    masks = True  # sparse(x) is dense(sparsify(x)): Linear may mask once and call dense

    def sparse(self, x: torch.Tensor, threshold: torch.Tensor, residual: torch.Tensor | None = None,
               swiglu: bool = False, scale: torch.Tensor | None = None) -> torch.Tensor:
        return self.dense(sparsify(x, threshold, scale), residual, swiglu)

    def sparse_pays(self, level: float | None, norm_fed: bool = False) -> bool:
        """The reference is the semantics, not a speed: it always runs what it is asked to."""
        return True
