"""The linear map of the runtime: holds a stored matrix (float or quantized blocks), applies the
activation-sparsity threshold when told to, and calls the kernel that the dispatcher picks.

Sparse semantics (the reference that every kernel matches): ``y = W (x * (|x| > t))`` (TEAL),
or ``y = W (x * (|x| * c > t))`` when a per-input scale c is set (WINA: c_i = ||W[:, i]||_2, the
column norms of the stored matrix), only while ``sparse`` is on (the runtime turns it on for
decode steps and off for prefill).
"""

import torch
from torch import nn

from spqt.kernels import dispatch
from spqt.kernels.reference import keep_mask


class Linear(nn.Module):
    """y = W x for W (N, K). x: (..., K) in the compute dtype -> y: (..., N) same dtype."""

    def __init__(self, weight, dtype: torch.dtype, device: str, backend: str = "reference"):
        super().__init__()
        self.out_features, self.in_features = tuple(weight.shape)
        self.impl = dispatch.make_linear_impl(weight, dtype, device, backend)
        self.sparse = False
        self.register_buffer("threshold", None, persistent=False)
        self.register_buffer("scale", None, persistent=False)  # (K,) fp32 or None
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

    def set_scale(self, scale: torch.Tensor | None) -> None:
        """scale: (K,) column norms for the WINA criterion, or None for TEAL's |x|. Updated in
        place when one is already set, so a captured CUDA graph sees the new value."""
        if scale is None:
            self.scale = None
            return
        if tuple(scale.shape) != (self.in_features,):
            raise ValueError(f"scale of shape {tuple(scale.shape)} for a linear map with {self.in_features} inputs")
        if self.scale is None:
            self.scale = scale.to(device=self.counts.device, dtype=torch.float32).contiguous()
        else:
            self.scale.copy_(scale)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
        """residual (..., N): returns residual + W x. swiglu: W is gate|up stacked (N = 2F); returns
        silu(gate) * up, (..., F). Kernels may fuse either into the GEMV's last step."""
        if self.sparse and self.threshold is not None:
            if self.track:
                self.counts[0] += (~keep_mask(x, self.threshold, self.scale)).sum(dtype=torch.float64)
                self.counts[1] += x.numel()
            return self.impl.sparse(x, self.threshold, residual, swiglu, scale=self.scale)
        return self.impl.dense(x, residual, swiglu)
