"""Sparse-index collection: the ascending indices k with |x_k| > t (TEAL) or |x_k| * s_k > t
(WINA, s the per-input scale), and their count, on the GPU.

One launch, no atomics, no host synchronisation. Program p owns segment p of x (SEGMENT
entries); it counts the kept entries of the segments before it with one masked load of the whole
vector (x is small and L2-resident; no loop over segments), scans its own mask (tl.cumsum) and
writes its kept indices at that offset. The last program also writes the total count. The output
is the same list in the same order every run. Entries of idx past the count are not written.
With programmatic dependent launch (sm_90) it starts while the kernel before it finishes (and
reads x only after that kernel is done), and lets the GEMV after it start likewise. (Measured on
the H100: a loop over the earlier segments took 3.3 / 5.5 / 10.9 us at K = 4096 / 11008 / 28672;
one program scanning the whole vector 3.8 / 10.3 / 27.4 us.)
"""

import torch
import triton
import triton.language as tl

from spqt.kernels.zigzag_mma import uses_pdl


@triton.jit
def _collect_kernel(x_ptr, t_ptr, idx_ptr, count_ptr, K, scale_ptr, SEGMENT: tl.constexpr, K_P2: tl.constexpr,
                    PDL: tl.constexpr, HAS_SCALE: tl.constexpr):
    pid = tl.program_id(0)
    if PDL:  # launched while the kernel before it finishes: x is read after it is written
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.load(t_ptr)
    start = pid * SEGMENT
    # kept entries before this segment: one masked load of the whole vector (L2-resident), so
    # every program finishes after one round trip whatever its position
    before_k = tl.arange(0, K_P2)
    before_m = before_k < start
    ab = tl.abs(tl.load(x_ptr + before_k, mask=before_m, other=0.0).to(tl.float32))
    if HAS_SCALE:  # WINA: |x| * s in fp32, the product the torch reference forms
        ab = ab * tl.load(scale_ptr + before_k, mask=before_m, other=0.0)
    before = tl.sum(((ab > t) & before_m).to(tl.int32), axis=0)
    k = start + tl.arange(0, SEGMENT)
    a = tl.abs(tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32))
    if HAS_SCALE:
        a = a * tl.load(scale_ptr + k, mask=k < K, other=0.0)
    keep = (a > t) & (k < K)
    keep_i = keep.to(tl.int32)
    position = before + tl.cumsum(keep_i, axis=0) - 1
    tl.store(idx_ptr + position, k.to(tl.int32), mask=keep)
    # The total: the last program knows all segments before it plus its own.
    if pid == tl.num_programs(0) - 1:
        tl.store(count_ptr, before + tl.sum(keep_i, axis=0))


def collect(x: torch.Tensor, threshold: torch.Tensor, idx: torch.Tensor | None = None,
            count: torch.Tensor | None = None, segment: int = 256, scale: torch.Tensor | None = None):
    """x: (K,) fp16/bf16/fp32 contiguous; threshold: () fp32 on the device; scale: (K,) fp32
    contiguous or None (WINA's column norms: keep |x_k| * scale_k > t).
    Returns (idx (K,) int32, count () int32), written into the given buffers when passed."""
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"collect expects a contiguous (K,) vector, got {tuple(x.shape)}")
    K = x.shape[0]
    if scale is not None and (scale.shape != (K,) or scale.dtype != torch.float32 or not scale.is_contiguous()):
        raise ValueError(f"collect expects a contiguous fp32 ({K},) scale, got {scale.dtype} {tuple(scale.shape)}")
    idx = torch.empty(K, dtype=torch.int32, device=x.device) if idx is None else idx
    count = torch.empty((), dtype=torch.int32, device=x.device) if count is None else count
    k_p2 = triton.next_power_of_2(K)
    pdl = uses_pdl(x.device)
    _collect_kernel[(triton.cdiv(K, segment),)](x, threshold, idx, count, K, x if scale is None else scale,
                                                SEGMENT=segment, K_P2=k_p2, PDL=pdl, HAS_SCALE=scale is not None,
                                                num_warps=max(4, min(16, k_p2 // 2048)), launch_pdl=pdl)
    return idx, count
