"""The kernels' copy of a Q4_K matrix: the canonical 144-byte blocks split into two arrays.

On disk a block is GGUF's 144 bytes. For the kernels we repack at load time (torch, any device):

* ``head``: (..., 4) int32 per block = the first 16 bytes unchanged: word 0 = d | dmin << 16
  (fp16 bits), words 1-3 = the 12 packed 6-bit scale/min bytes.
* ``quants``: (..., 32) int32 per block; nibble n (bits 4n..4n+3) of word p holds weight
  ``8 p + n`` of the block: the block's 256 weights in order, eight to a word. Word p lies in
  sub-block ``p // 4``, so the eight weights of a word share one scale and one min: a kernel
  thread that owns four consecutive words (one 16-byte load) needs one scale for 32 weights.

A block's 128 quant bytes are 128-byte aligned (4 whole 32-byte sectors); heads of neighbouring
columns share sectors. Shapes keep the layout's grid: zigzag (R, K, ...), row (N, Kb, ...).
"""

from dataclasses import dataclass

import torch

from spqt.checkpoint import QuantizedWeight


@dataclass
class GpuQ4K:
    """A Q4_K matrix in kernel layout. quants (rows, cols, 32) int32, head (rows, cols, 4) int32."""

    quants: torch.Tensor
    head: torch.Tensor
    layout: str
    shape: tuple[int, int]
    fmt: str = "q4_k"

    @property
    def nbytes(self) -> int:
        return 4 * (self.quants.numel() + self.head.numel())


def repack(weight: QuantizedWeight, device: str | torch.device) -> GpuQ4K:
    """Canonical blocks -> kernel layout (exact: same weights, same scales)."""
    if weight.fmt != "q4_k":
        raise ValueError(f"GPU kernels support q4_k, not {weight.fmt}")
    blocks = weight.blocks.to(device)
    rows, cols, _ = blocks.shape
    flat = blocks.reshape(-1, 144)
    head = flat[:, :16].contiguous().view(torch.int32).reshape(rows, cols, 4)
    qs = flat[:, 16:].reshape(-1, 4, 32)
    # canonical: byte 32G + l = L[64G + l] | L[64G + 32 + l] << 4 -> levels L (n, 256)
    levels = torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(-1, 256)
    by_word = levels.reshape(-1, 32, 8).to(torch.int64)  # [block, word p, nibble n] = weight 8p + n
    shifts = (4 * torch.arange(8, device=levels.device, dtype=torch.int64))[None, None, :]
    words = (by_word << shifts).sum(dim=2)  # (n, 32), nibbles do not overlap
    quants = words.to(torch.uint32).view(torch.int32).reshape(rows, cols, 32).contiguous()
    return GpuQ4K(quants, head.contiguous(), weight.layout, tuple(weight.shape))


def dequantize_gpu_layout(w: GpuQ4K) -> torch.Tensor:
    """Torch twin of the dequant kernel: GpuQ4K -> float32 (N, K)."""
    from spqt.formats import q4_k
    from spqt.layouts import blocks_to_matrix

    rows, cols, _ = w.quants.shape
    words = w.quants.reshape(-1, 32).to(torch.int64) & 0xFFFFFFFF
    shifts = (4 * torch.arange(8, device=words.device, dtype=torch.int64))[None, None, :]
    levels = ((words[:, :, None] >> shifts) & 0xF).reshape(-1, 256).float()  # (n, 256) in weight order
    head = w.head.reshape(-1, 4).contiguous().view(torch.uint8)  # (n, 16)
    d = head[:, 0:2].contiguous().view(torch.float16).float()
    dmin = head[:, 2:4].contiguous().view(torch.float16).float()
    sc, mn = q4_k.unpack_scales(head[:, 4:16])
    values = ((d * sc.float())[..., None] * levels.reshape(-1, 8, 32) - (dmin * mn.float())[..., None]).reshape(-1, 256)
    return blocks_to_matrix(values, w.layout, w.shape, 256)
