"""What the CUDA GEMV's layouts of the zigzag types (gpu_layout_q2k, _q3k, _q5k, _q6k, _q8_0) share: the grid
and byte count of a matrix whose ``quants`` are (R, planes, K, ...) superblock rows by columns, and repack's
check of its input."""

from typing import ClassVar

import torch

from spqt.checkpoint import QuantizedWeight


class ColumnSuperblocks:
    """Base of a type's dataclass (GpuQ5KPlanes ...): ``quants`` (R, planes, K, ...) and BYTES, the bytes the
    kernel reads a column-superblock (a column's 256 rows of one superblock row)."""

    BYTES: ClassVar[int]
    quants: torch.Tensor

    @property
    def grid(self) -> tuple[int, int]:
        """(superblock rows R, columns K)."""
        return self.quants.shape[0], self.quants.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the whole matrix: BYTES a column-superblock."""
        rows, cols = self.grid
        return self.BYTES * rows * cols


def zigzag_blocks(weight: QuantizedWeight, fmt: str, device: str | torch.device) -> torch.Tensor:
    """repack's input: the GGUF blocks (rows, K, block bytes) of a zigzag `fmt` matrix on `device`; ValueError for
    another format or layout."""
    if weight.fmt != fmt or weight.layout != "zigzag":
        raise ValueError(f"the {fmt.upper()} CUDA layout takes zigzag {fmt}, not {weight.layout} {weight.fmt}")
    return weight.blocks.to(device)
