"""The kernels' copy of a Q4_K matrix: the canonical 144-byte blocks split into two arrays.

On disk a block is GGUF's 144 bytes. For the kernels we repack at load time (torch, any device):

* ``head``: (..., 4) int32 per block = the first 16 bytes unchanged: word 0 = d | dmin << 16
  (fp16 bits), words 1-3 = the 12 packed 6-bit scale/min bytes.
* ``quants``: 32 int32 words per block, the 256 4-bit levels in an order that depends on the
  layout (``pack_levels`` and ``unpack_levels`` convert from and to weight order; zigzag blocks
  are then split into planes, below):
  - row: nibble n (bits 4n..4n+3) of word p holds weight ``8 p + n``, eight to a word. Word p
    lies in sub-block ``p // 4``, so a thread that owns four consecutive words (one 16-byte load)
    needs one scale for 32 weights (the row kernels).
  - zigzag: byte ``16 g + m`` holds weight ``16 m + g`` (low nibble) and ``16 m + 8 + g`` (high
    nibble), g < 8, m < 16: the 16 bytes of group g are lane group g's share of every 16-row
    tile of the tensor-core kernels (zigzag_mma.py, zigzag_q4k.cu), one 16-byte load per column.

Zigzag quants are stored in PLANES = 2 planes, (R, 2, K, 16) int32: plane p of superblock row r
holds bytes 64 p .. 64 p + 63 (lane groups 4 p .. 4 p + 3) of every column's block, column after
column. The CUDA kernel's dense 16-byte load phase (8 lanes: groups 2 s, 2 s + 1 of 4
consecutive columns) then touches two 128-byte lines where the (R, K, 32) order made it touch
four (the Triton kernel's lanes take columns 2 t, 2 t + 1, ...: still four; H200,
Nsight Compute, 57344x8192: the L1's load wavefronts at 76 % of peak for 61 % of DRAM's
bandwidth), and a sparse kernel still reads a column's block as whole 64-byte pieces. (Four
planes of 32 bytes, one line a phase: B2 another 3-5 % faster, but B4 at 50 % 15-23 % slower,
a lone 32-byte sector costing DRAM more than its bytes; benchmarks/results/session4.)
Row layout blocks keep their 128 bytes together. Heads: row layout
(N, Kb, 4), neighbouring blocks of a row side by side. Zigzag (ceil(R / 4), K, 4, 4): the heads
of HEAD_GROUP = 4 superblock rows of one column are one 64-byte unit (DRAM's access size), all
needed whenever the column is active; side by side by column, a sparse kernel read the heads of
inactive neighbours too (H100, 28672x8192 at 50 %: 72.5 MB read for 66.1 MB of active blocks).
Shapes: zigzag quants (R, PLANES, K, 32 / PLANES), row (N, Kb, 32); GpuQ4K.grid = (R, K) or (N, Kb).
"""

from dataclasses import dataclass

import torch

from spqt.checkpoint import QuantizedWeight

HEAD_GROUP = 4  # zigzag: superblock rows whose heads of one column are stored together
PLANES = 2  # zigzag: planes a block's 128 level bytes are split into (to_planes)


@dataclass
class GpuQ4K:
    """A Q4_K matrix in kernel layout. quants int32, row layout (rows, cols, 32), zigzag planes
    (rows, PLANES, cols, 32 / PLANES); head int32, row layout (rows, cols, 4), zigzag (ceil(rows / 4), cols,
    4, 4) (group_heads)."""

    quants: torch.Tensor
    head: torch.Tensor
    layout: str
    shape: tuple[int, int]
    fmt: str = "q4_k"

    @property
    def grid(self) -> tuple[int, int]:
        """(block rows, block columns) of the layout's grid."""
        if self.layout == "zigzag":
            return self.quants.shape[0], self.quants.shape[2]
        return self.quants.shape[0], self.quants.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks (144 each; a zigzag head group's padding rows not counted)."""
        rows, cols = self.grid
        return 144 * rows * cols


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
    quants = pack_levels(levels, weight.layout).reshape(rows, cols, 32)
    if weight.layout == "zigzag":
        quants = to_planes(quants)
    head = group_heads(head) if weight.layout == "zigzag" else head.contiguous()
    return GpuQ4K(quants, head, weight.layout, tuple(weight.shape))


def to_planes(quants: torch.Tensor) -> torch.Tensor:
    """Zigzag block words (R, K, 32) int32 -> planes (R, PLANES, K, 32 / PLANES)."""
    rows, cols, _ = quants.shape
    return quants.reshape(rows, cols, PLANES, 32 // PLANES).permute(0, 2, 1, 3).contiguous()


def from_planes(planes: torch.Tensor) -> torch.Tensor:
    """The inverse of to_planes: (R, K, 32) int32, block after block."""
    rows, _, cols, _ = planes.shape
    return planes.permute(0, 2, 1, 3).reshape(rows, cols, 32)


def group_heads(head: torch.Tensor) -> torch.Tensor:
    """Zigzag heads (R, K, 4) int32 -> (ceil(R / 4), K, 4, 4): [group, column, row in group, word],
    padding rows zero."""
    rows, cols, _ = head.shape
    pad = -rows % HEAD_GROUP
    padded = torch.cat([head, head.new_zeros(pad, cols, 4)]) if pad else head
    return padded.reshape(-1, HEAD_GROUP, cols, 4).permute(0, 2, 1, 3).contiguous()


def ungroup_heads(grouped: torch.Tensor, rows: int) -> torch.Tensor:
    """The inverse of group_heads: (R, K, 4) int32."""
    cols = grouped.shape[1]
    return grouped.permute(0, 2, 1, 3).reshape(-1, cols, 4)[:rows]


def pack_levels(levels: torch.Tensor, layout: str) -> torch.Tensor:
    """Levels (n, 256) in weight order (uint8 0..15) -> (n, 32) int32 words of the layout."""
    lv = levels.to(torch.int64)
    if layout == "zigzag":
        by_tile = lv.reshape(-1, 16, 2, 8)  # [block, m, h, g] = weight 16 m + 8 h + g
        byts = (by_tile[:, :, 0, :] | (by_tile[:, :, 1, :] << 4)).permute(0, 2, 1)  # [block, g, m]
        return byts.reshape(-1, 128).to(torch.uint8).view(torch.int32)
    by_word = lv.reshape(-1, 32, 8)  # [block, word p, nibble n] = weight 8p + n
    shifts = (4 * torch.arange(8, device=lv.device, dtype=torch.int64))[None, None, :]
    return (by_word << shifts).sum(dim=2).to(torch.uint32).view(torch.int32)  # nibbles do not overlap


def unpack_levels(words: torch.Tensor, layout: str) -> torch.Tensor:
    """(n, 32) int32 words of the layout -> levels (n, 256) int64 in weight order."""
    if layout == "zigzag":
        byts = words.contiguous().view(torch.uint8).reshape(-1, 8, 16).to(torch.int64)  # [block, g, m]
        both = torch.stack([byts & 0xF, byts >> 4], dim=1)  # [block, h, g, m]
        return both.permute(0, 3, 1, 2).reshape(-1, 256)  # weight 16 m + 8 h + g
    w64 = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (4 * torch.arange(8, device=words.device, dtype=torch.int64))[None, None, :]
    return ((w64[:, :, None] >> shifts) & 0xF).reshape(-1, 256)


def dequantize_gpu_layout(w: GpuQ4K) -> torch.Tensor:
    """Torch twin of the dequant kernel: GpuQ4K -> float32 (N, K)."""
    from spqt.formats import q4_k
    from spqt.layouts import blocks_to_matrix

    rows, cols = w.grid
    words = from_planes(w.quants) if w.layout == "zigzag" else w.quants
    levels = unpack_levels(words.reshape(-1, 32), w.layout).float()  # (n, 256) in weight order
    head = ungroup_heads(w.head, rows) if w.layout == "zigzag" else w.head
    head = head.reshape(-1, 4).contiguous().view(torch.uint8)  # (n, 16)
    d = head[:, 0:2].contiguous().view(torch.float16).float()
    dmin = head[:, 2:4].contiguous().view(torch.float16).float()
    sc, mn = q4_k.unpack_scales(head[:, 4:16])
    values = ((d * sc.float())[..., None] * levels.reshape(-1, 8, 32) - (dmin * mn.float())[..., None]).reshape(-1, 256)
    return blocks_to_matrix(values, w.layout, w.shape, 256)
