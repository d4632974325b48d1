"""Sparse-index collection: the ascending indices k with |x_k| > t, and their count, on the GPU.

One launch, no atomics, no host synchronisation. Program p owns segment p of x (SEGMENT
entries); it counts the kept entries of the segments before it (x is small and L2-resident),
scans its own mask (tl.cumsum) and writes its kept indices at that offset. Program 0 also writes
the total count. The output is the same list in the same order every run. Entries of idx past
the count are not written.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _collect_kernel(x_ptr, t_ptr, idx_ptr, count_ptr, K, SEGMENT: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(t_ptr)
    offs = tl.arange(0, SEGMENT)
    before = 0
    for seg in range(0, pid):
        k = seg * SEGMENT + offs
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        before += tl.sum((tl.abs(x) > t).to(tl.int32), axis=0)
    k = pid * SEGMENT + offs
    x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    keep = (tl.abs(x) > t) & (k < K)
    keep_i = keep.to(tl.int32)
    position = before + tl.cumsum(keep_i, axis=0) - 1
    tl.store(idx_ptr + position, k.to(tl.int32), mask=keep)
    # The total: the last program knows all segments before it plus its own.
    if pid == tl.num_programs(0) - 1:
        tl.store(count_ptr, before + tl.sum(keep_i, axis=0))


def collect(x: torch.Tensor, threshold: torch.Tensor, idx: torch.Tensor | None = None,
            count: torch.Tensor | None = None, segment: int = 1024):
    """x: (K,) fp16/bf16/fp32 contiguous; threshold: () fp32 on the device.
    Returns (idx (K,) int32, count () int32), written into the given buffers when passed."""
    if x.dim() != 1 or not x.is_contiguous():
        raise ValueError(f"collect expects a contiguous (K,) vector, got {tuple(x.shape)}")
    K = x.shape[0]
    idx = torch.empty(K, dtype=torch.int32, device=x.device) if idx is None else idx
    count = torch.empty((), dtype=torch.int32, device=x.device) if count is None else count
    _collect_kernel[(triton.cdiv(K, segment),)](x, threshold, idx, count, K, SEGMENT=segment, num_warps=4)
    return idx, count
