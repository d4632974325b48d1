"""The kernels' copy of a Q4_K matrix: the canonical 144-byte blocks split into two arrays.

On disk a block is GGUF's 144 bytes. For the kernels we repack at load time (torch, any device):

* ``head``: (..., 4) int32 per block = the first 16 bytes unchanged: word 0 = d | dmin << 16
  (fp16 bits), words 1-3 = the 12 packed 6-bit scale/min bytes.
* ``quants``: (..., 128) uint8 per block, nibbles regrouped so that byte ``32g + l`` holds weight
  ``32g + l`` (sub-block g) in its low nibble and weight ``128 + 32g + l`` (sub-block g + 4) in
  its high nibble. Then the low nibbles of a block are its first 128 weights and use the scales
  of sub-blocks 0-3, which sit in bytes 0-3 / 4-7 of the packing without any bit gathering, and
  the high nibbles are the last 128 weights with sub-blocks 4-7.

A block's 128 quant bytes are 128-byte aligned (4 whole 32-byte sectors); heads of neighbouring
columns share sectors. Shapes keep the layout's grid: zigzag (R, K, ...), row (N, Kb, ...).
"""

from dataclasses import dataclass

import torch

from spqt.checkpoint import QuantizedWeight


@dataclass
class GpuQ4K:
    """A Q4_K matrix in kernel layout. quants (rows, cols, 128) uint8, head (rows, cols, 4) int32."""

    quants: torch.Tensor
    head: torch.Tensor
    layout: str
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.quants.numel() + 4 * self.head.numel()


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
    quants = (levels[:, :128] | (levels[:, 128:] << 4)).reshape(rows, cols, 128).contiguous()
    return GpuQ4K(quants, head.contiguous(), weight.layout, tuple(weight.shape))


def dequantize_gpu_layout(w: GpuQ4K) -> torch.Tensor:
    """Torch twin of the dequant kernel: GpuQ4K -> float32 (N, K)."""
    from spqt.formats import q4_k
    from spqt.layouts import blocks_to_matrix

    rows, cols, _ = w.quants.shape
    q = w.quants.reshape(-1, 128)
    levels = torch.cat([q & 0xF, q >> 4], dim=1).float()  # (n, 256) in weight order
    head = w.head.reshape(-1, 4).contiguous().view(torch.uint8)  # (n, 16)
    d = head[:, 0:2].contiguous().view(torch.float16).float()
    dmin = head[:, 2:4].contiguous().view(torch.float16).float()
    sc, mn = q4_k.unpack_scales(head[:, 4:16])
    values = ((d * sc.float())[..., None] * levels.reshape(-1, 8, 32) - (dmin * mn.float())[..., None]).reshape(-1, 256)
    return blocks_to_matrix(values, w.layout, w.shape, 256)
