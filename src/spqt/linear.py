"""The linear map of the runtime: holds a stored matrix (float or quantized blocks), applies the
activation-sparsity threshold when told to, and calls the kernel that the dispatcher picks.

Sparse semantics (the reference that every kernel matches): ``y = W (x * (|x| > t))``, only
while ``sparse`` is on (the runtime turns it on for decode steps and off for prefill). An output
bias b (Qwen2's q, k, v) is added after the GEMV, ``y = W (x * (|x| > t)) + b``: it never meets
the threshold, and the epilogue (residual, SwiGLU) follows it.
"""

import torch
from torch import nn

from spqt.functional import linear_epilogue
from spqt.kernels import dispatch


class Linear(nn.Module):
    """y = W x (+ b) for W (N, K). x: (..., K) in the compute dtype -> y: (..., N) same dtype.
    bias: (N,) float or None, kept in the compute dtype."""

    def __init__(self, weight, dtype: torch.dtype, device: str, backend: str = "reference",
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = tuple(weight.shape)
        self.impl = dispatch.make_linear_impl(weight, dtype, device, backend)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} for a ({self.out_features}, {self.in_features}) map")
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=dtype), persistent=False)
        self.sparse = False
        self.register_buffer("threshold", None, persistent=False)
        # Achieved sparsity, counted on device without host synchronisation: [dropped, seen].
        self.register_buffer("counts", torch.zeros(2, dtype=torch.float64, device=device), persistent=False)
        self.track = False

    def set_threshold(self, t: float | None) -> None:
        """Thresholds are updated in place, so a captured CUDA graph sees the new value."""
        if t is None:
            self.threshold = None
        elif self.threshold is None:
            self.threshold = torch.tensor(float(t), dtype=torch.float32, device=self.counts.device)
        else:
            self.threshold.fill_(float(t))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
        """residual (..., N): returns residual + W x. swiglu: W is gate|up stacked (N = 2F); returns
        silu(gate) * up, (..., F). Kernels may fuse either into the GEMV's last step (not when a
        bias must come first: then W x comes back plain, and the bias and epilogue run in torch,
        which a CUDA graph captures like any other op)."""
        if self.bias is not None:
            return linear_epilogue(self._product(x, None, False) + self.bias, residual, swiglu)
        return self._product(x, residual, swiglu)

    def _product(self, x: torch.Tensor, residual: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
        if self.sparse and self.threshold is not None:
            if self.track:
                self.counts[0] += (x.float().abs() <= self.threshold).sum(dtype=torch.float64)
                self.counts[1] += x.numel()
            return self.impl.sparse(x, self.threshold, residual, swiglu)
        return self.impl.dense(x, residual, swiglu)
