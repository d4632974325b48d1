"""The CPU's fast linear map (backend "cpu-fp16"): an fp16 copy of W and torch's fp16 GEMV.

One decode token on the CPU reads every weight once, so bytes decide: the fp32 reference
(ReferenceLinear) reads 525 MB a token for the default model, this map half that. torch's CPU
fp16 GEMV accumulates in fp32 and splits its rows over the intra-op threads; MKL's fp32 GEMV
runs on one thread. On the 2-core AVX2 EPYC (idle), one token's GEMVs of the default model:
fp16 17.5 ms on 2 threads, 29.8 on 1; fp32 36 ms best layout, either thread count (issue 18).

Numerics (what the tests bound): W rounded to fp16 (the default model's tied head is stored
fp16, so it stays exact; dequantized Q4_K weights move by at most 2^-11 relative), the input
rounded to fp16, products summed in fp32, the output rounded to fp16, then returned in the
compute dtype. Sparse: the reference's mask, decided on the fp32 input as the reference decides
it (Linear applies it on the CPU), then the same GEMV.
"""

import torch

from spqt.checkpoint import QuantizedWeight
from spqt.kernels.reference import ReferenceLinear


class HalfGemvLinear(ReferenceLinear):
    """W (N, K) fp16 on the CPU; x (..., K) in the compute dtype -> (..., N) same dtype. The
    dense / sparse / SwiGLU dispatch is the reference's; only the product differs."""

    def __init__(self, weight, dtype: torch.dtype, device: str):
        w = weight.dequantize() if isinstance(weight, QuantizedWeight) else weight
        # (N, K): torch's fp16 GEMV reads this layout 10-60x faster than (K, N) here
        self.weight = w.to(dtype=torch.float16).contiguous()
        self.weight_t = self.weight.t()  # (K, N) view: what F.linear hands to mm
        self.dtype = dtype

    def sparse_pays(self, level: float | None, norm_fed: bool = False) -> bool:
        """Never: the sparse product masks x and runs this same GEMV over every weight (a row of W holds every
        input's weight), so it is never faster than the dense one, and the mask costs a pass over x. With the dense
        fallback on, the map runs dense."""
        return False

    def product(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # torch.mm itself, the kernel F.linear reaches through 11 aten calls (linear, t, matmul,
        # views: ~15 us a map on the 2-core VM, 121 maps a step); bit-identical to F.linear
        y = torch.mm(x.reshape(-1, x.shape[-1]).to(torch.float16), self.weight_t).view(*x.shape[:-1], -1)
        if residual is not None and residual.dtype == self.dtype == torch.float32:
            return residual + y  # the add widens y exactly: one op fewer than widening first (bf16 + fp16 is fp32)
        y = y.to(self.dtype)
        return y if residual is None else residual + y
