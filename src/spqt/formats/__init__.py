"""Quantization formats: block sizes as data, encode/decode on (n_blocks, bytes_per_block) arrays.

| format | weights per block | bytes per block | bits per weight |
|--------|-------------------|-----------------|-----------------|
| q4_k   | 256               | 144             | 4.5             |
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockFormat:
    """How one format stores a block: `block_size` weights in `block_bytes` bytes."""

    name: str
    block_size: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_size


Q4_K = BlockFormat("q4_k", block_size=256, block_bytes=2 + 2 + 12 + 128)

FORMATS = {Q4_K.name: Q4_K}


def get_format(name: str) -> BlockFormat:
    from spqt.errors import SpqtError

    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise SpqtError(f"unsupported quantization type {name!r}; supported: {', '.join(FORMATS)}") from None
