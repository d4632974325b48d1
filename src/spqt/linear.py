"""The linear map of the runtime: holds a stored matrix (float or quantized blocks), applies the
activation-sparsity threshold when told to, and calls the kernel that the dispatcher picks.

Sparse semantics (the reference that every kernel matches): ``y = W (x * (|x| > t))`` (TEAL),
or ``y = W (x * (|x| * c > t))`` when a per-input scale c is set (WINA: c_i = ||W[:, i]||_2, the
column norms of the stored matrix), only while ``sparse`` is on (the runtime turns it on for
decode steps and off for prefill). An output bias b (Qwen2's q, k, v) is added after the GEMV,
``y = W (x * keep) + b``: it never meets the threshold, and the epilogue (residual, SwiGLU) follows it (one token's
bias alone joins as the epilogue's residual: the same sum, in the map's own launch).

Sparsity that pays: an implementation may know, per shape and device, the lowest sparsity at
which its sparse kernel beats its dense one (`spqt tune` measures it). Below it, with
``dense_fallback`` on, the map runs dense: faster, and the exact dense product.
"""

import torch
import torch.nn.functional as F
from torch import nn

from spqt.direct_call import DirectCallModule, hooked
from spqt.functional import NORM_SUMS, linear_epilogue
from spqt.kernels import dispatch
from spqt.kernels.reference import keep_mask


class Linear(DirectCallModule):
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
        if bias is not None and hasattr(self.impl, "norm_sums"):
            # a biased map's output feeds no folded norm (one token's bias comes as the epilogue's residual: no sums
            # of squares for it; with a residual of its own the bias is added in torch, which carries none)
            self.impl.norm_sums = False
        self.sparse = False
        self.register_buffer("threshold", None, persistent=False)
        # The sparsity the threshold was calibrated for (None: unknown), and whether a level the
        # implementation cannot run faster than dense runs dense instead.
        self.level: float | None = None
        self.dense_fallback = False
        self.register_buffer("scale", None, persistent=False)  # (K,) fp32 or None
        # Achieved sparsity, counted on device without host synchronisation: [dropped, seen].
        self.register_buffer("counts", torch.zeros(2, dtype=torch.float64, device=device), persistent=False)
        self.track = False
        # Called with the map's actual input (after the norm): hooks on it observe what W multiplies.
        self.input_tap = nn.Identity()
        # The CPU's native zigzag maps: a sparse product that masks as it reads and counts, in one C call
        self._sparse_counted = getattr(self.impl, "sparse_counted", None)

    def set_threshold(self, t: float | None, level: float | None = None) -> None:
        """Thresholds are updated in place, so a captured CUDA graph sees the new value."""
        self.level = level
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

    def runs_sparse(self, norm_fed: bool = False, kept: bool = True) -> bool:
        """Whether the next forward thresholds its input (sparse on, a threshold, and it pays).
        norm_fed: the input comes through a norm that the implementation may fuse its collection into.
        kept False: whether it pays without MODE_KEPT (the collected B4 only: where MODE_KEPT cannot run)."""
        if not self.sparse or self.threshold is None:
            return False
        pays = self.impl.sparse_pays if kept else self.impl.collected_pays
        return not self.dense_fallback or pays(self.level, norm_fed)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, swiglu: bool = False,
                norm: nn.Module | None = None) -> torch.Tensor:
        """residual (..., N): returns residual + W x. swiglu: W is gate|up stacked (N = 2F); returns
        silu(gate) * up, (..., F). norm: an RMSNorm applied to x first. Kernels may fuse the norm with
        the sparse index collection, and the residual or SwiGLU into the GEMV's last step (not when
        a bias must come first: then W x comes back plain, and the bias and epilogue run in torch,
        which a CUDA graph captures like any other op). A bias alone on one token (Qwen2's q|k|v in a decode step)
        is the residual of the kernels' epilogue instead: W x + b in the map's own launch, one kernel less a layer."""
        if self.bias is not None:
            if residual is None and not swiglu and x.numel() == self.in_features:
                return self._product(x, self.bias.view(*x.shape[:-1], self.out_features), False, norm)
            return linear_epilogue(self._product(x, None, False, norm) + self.bias, residual, swiglu)
        return self._product(x, residual, swiglu, norm)

    def _product(self, x: torch.Tensor, residual: torch.Tensor | None, swiglu: bool,
                 norm: nn.Module | None) -> torch.Tensor:
        if self._sparse_counted is not None and self.sparse and self.threshold is not None:
            y = self._sparse_on_cpu(x, residual, swiglu, norm)
            if y is not None:
                return y
        fused = self.impl.sparse_normed if norm is not None and getattr(self.impl, "fuses_norm", False) else None
        sparse = self.runs_sparse(norm_fed=fused is not None)
        kept_first = getattr(self.impl, "kept_first", None)
        if sparse and not self.track and kept_first is not None and kept_first(self.level, fused is not None):
            kept = self._sparse_kept(x, norm, residual, swiglu)
            if kept is not None:
                return kept
            # MODE_KEPT cannot run here (no sums for the norm, a hook): the collected B4 where it pays, else dense
            sparse = self.runs_sparse(norm_fed=fused is not None, kept=False)
        if norm is not None:
            if sparse and not self.track and fused is not None and x.numel() == self.in_features:
                y, normed = fused(x, norm.weight, norm.eps, self.threshold, residual, swiglu, scale=self.scale)
                self.input_tap(normed)
                return y
            folded = None if sparse else self._norm_folded(x, norm, residual, swiglu)
            if folded is not None:
                return folded
            # an implementation with its own RMSNorm (the CPU's native maps) runs it; else the module
            native_norm = getattr(self.impl, "rms_norm", None)
            x = native_norm(x, norm.weight, norm.eps) if native_norm is not None else norm(x)
        if hooked(self.input_tap):  # an unobserved tap is skipped: 120 module calls a CPU decode step
            x = self.input_tap(x)
        if sparse and getattr(self.impl, "masks", False) and x.device.type == "cpu":
            return self._masked_on_cpu(x, residual, swiglu)
        if sparse:
            if self.track:
                self.counts[0] += (~keep_mask(x, self.threshold, self.scale)).sum(dtype=torch.float64)
                self.counts[1] += x.numel()
            return self.impl.sparse(x, self.threshold, residual, swiglu, scale=self.scale)
        if self.track:
            self._count_dense(x.numel())
        return self.impl.dense(x, residual, swiglu)

    def _sparse_on_cpu(self, x: torch.Tensor, residual: torch.Tensor | None, swiglu: bool,
                       norm: nn.Module | None) -> torch.Tensor | None:
        """The sparse forward of the CPU's native zigzag maps in few Python steps (each costs ~0.3-1 us on the 2-core
        VM, and a decode step runs 120 maps): the native norm, one C call that masks as it reads and counts. The
        general path's semantics (the dense fallback, a hooked input tap, the norm in C); None where it is not
        taken."""
        if (self.dense_fallback and not self.impl.sparse_pays(self.level)) or hooked(self.input_tap):
            return None
        t = float(self.threshold)  # read each call: thresholds may be changed in place
        if t < 0 or x.dtype != torch.float32:
            return None
        if norm is not None:
            x = self.impl.rms_norm(x, norm.weight, norm.eps)
        done = self._sparse_counted(x, t, self.scale, residual, swiglu)
        if done is None:  # x not contiguous, a scale not fp32: the general path, on the normed input
            return self._product(x, residual, swiglu, None) if norm is not None else None
        self._count(x.numel(), done[1])
        return done[0]

    def _sparse_kept(self, x: torch.Tensor, norm: nn.Module | None, residual: torch.Tensor | None,
                     swiglu: bool) -> torch.Tensor | None:
        """The sparse map in one launch where the implementation can (the GPU's MODE_KEPT: each program lists its
        share's kept inputs, the norm folded where x carries its sums of squares) and no hook observes the input
        or the norm; else None."""
        run = getattr(self.impl, "sparse_kept", None)
        if run is None or hooked(self.input_tap) or (norm is not None and hooked(norm)):
            return None
        if norm is None:
            return run(x, self.threshold, residual, swiglu, scale=self.scale)
        sums = getattr(x, NORM_SUMS, None)
        if sums is None:
            return None
        return run(x, self.threshold, residual, swiglu, scale=self.scale, norm=(norm.weight, norm.eps, sums))

    def _norm_folded(self, x: torch.Tensor, norm: nn.Module, residual: torch.Tensor | None,
                     swiglu: bool) -> torch.Tensor | None:
        """W norm(x) with the norm inside the GEMV (the GPU's CUDA B2), where x carries the sums of squares of
        the reduction that wrote it (functional.NORM_SUMS) and no hook observes the norm or the normed input;
        else None."""
        sums = getattr(x, NORM_SUMS, None)
        fold = getattr(self.impl, "dense_normed", None)
        if sums is None or fold is None or hooked(self.input_tap) or hooked(norm):
            return None
        y = fold(x, norm.weight, norm.eps, sums, residual, swiglu)
        if y is not None and self.track:
            self._count_dense(x.numel())
        return y

    def _masked_on_cpu(self, x: torch.Tensor, residual: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
        """The sparse forward of a map whose sparse product is the dense product of the masked
        input (the CPU's maps), in few small ops: each costs 3-8 us on the 2-core machine, and a
        decode step runs 120 of these maps. The native zigzag maps mask as they read, in one C call
        that also counts; other native maps mask and count in C, then multiply. Otherwise TEAL's
        mask x * (|x| > t) is torch's hardshrink (the same values; a dropped input becomes +0); a
        threshold is never negative, so the kept inputs are the nonzero ones, counted by one
        count_nonzero."""
        t = float(self.threshold)  # read each call: thresholds may be changed in place
        counted = getattr(self.impl, "sparse_counted", None)  # the CPU's native zigzag maps: one C call
        done = counted(x, t, self.scale, residual, swiglu) if counted is not None else None
        if done is not None:
            self._count(x.numel(), done[1])
            return done[0]
        native = getattr(self.impl, "mask", None)
        masked = native(x, t, self.scale) if native is not None else None
        if masked is not None:  # the CPU's other native maps: mask and count in one C call
            self._count(x.numel(), masked[1])
            return self.impl.dense(masked[0], residual, swiglu)
        if self.scale is None and t >= 0:
            xs = F.hardshrink(x, t)
        else:
            xs = x * keep_mask(x, self.threshold, self.scale)
        if self.track:
            kept = int(torch.count_nonzero(xs)) if t >= 0 else int(keep_mask(x, self.threshold, self.scale).sum())
            self._count(xs.numel(), kept)
        return self.impl.dense(xs, residual, swiglu)

    def _count_dense(self, seen: int) -> None:
        """Count `seen` inputs, none dropped (a dense product while tracking): on the CPU through _count, on a GPU by
        a kernel (no host synchronisation)."""
        if self.counts.is_cuda:
            self.counts[1] += seen
        else:
            self._count(seen, seen)

    def _count(self, seen: int, kept: int) -> None:
        """Add to the achieved-sparsity counters (CPU) when tracking, through their numpy view (1.5 us;
        a torch.tensor of the two numbers and an add_ took 13 us)."""
        if not self.track:
            return
        counts = self.counts.numpy()
        counts[0] += seen - kept
        counts[1] += seen
