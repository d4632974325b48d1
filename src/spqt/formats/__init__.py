"""Quantization formats: block sizes as data, encode/decode on (n_blocks, bytes_per_block) arrays.

| format | weights per block | bytes per block                              | bits per weight |
|--------|-------------------|----------------------------------------------|-----------------|
| q8_0   | 32                | 2 + 32 = 34                                  | 8.5             |
| q6_k   | 256               | 128 + 64 + 16 + 2 = 210                      | 6.5625          |
| q5_k   | 256               | 2 + 2 + 12 + 32 + 128 = 176                  | 5.5             |
| q4_k   | 256               | 2 + 2 + 12 + 128 = 144                       | 4.5             |
| q3_k   | 256               | 32 + 64 + 12 + 2 = 110                       | 3.4375          |
| q2_k   | 256               | 16 + 64 + 2 + 2 = 84                         | 2.625           |

Each format's module (q8_0.py, ...) draws its block and holds ``encode`` / ``decode``;
:func:`codec` returns that pair.

Encoder searches: every format's default, ``reference``, writes the bytes of llama.cpp's
``quantize_row_<type>_ref``; ``mse`` (Q4_K and Q5_K only, mse_search.py) searches for a lower
plain squared error per block and writes other bytes, read by the same decoders.

Grids (for gptq.py, which rounds weights itself): each module also holds ``CODE_MAX``; ``grid(blocks)``, the
per-weight ``(scale, offset, codes)``, each (n_blocks, block_size), a weight decoding to ``scale * code - offset``
(exactly where decode computes it so; up to one rounding where it computes ``scale * (code - bias)``: Q6_K, Q3_K,
Q8_0), codes integers in 0..CODE_MAX; and ``with_codes(blocks, codes)``, a copy of the blocks with other codes and
the same scales.
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


Q8_0 = BlockFormat("q8_0", block_size=32, block_bytes=2 + 32)
Q6_K = BlockFormat("q6_k", block_size=256, block_bytes=128 + 64 + 16 + 2)
Q5_K = BlockFormat("q5_k", block_size=256, block_bytes=2 + 2 + 12 + 32 + 128)
Q4_K = BlockFormat("q4_k", block_size=256, block_bytes=2 + 2 + 12 + 128)
Q3_K = BlockFormat("q3_k", block_size=256, block_bytes=32 + 64 + 12 + 2)
Q2_K = BlockFormat("q2_k", block_size=256, block_bytes=16 + 64 + 2 + 2)

# Widest first: the order mixes use to pick the wider of two types.
FORMATS = {f.name: f for f in (Q8_0, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K)}


def get_format(name: str) -> BlockFormat:
    from spqt.errors import SpqtError

    try:
        return FORMATS[name.lower()]
    except (KeyError, AttributeError):  # AttributeError: not a str (None, 4), named as layouts and searches are
        raise SpqtError(f"unsupported quantization type {name!r}; supported: {', '.join(FORMATS)}") from None


# The encoder searches, and the formats each one serves (None: all).
SEARCHES = {"reference": None, "mse": ("q5_k", "q4_k")}


def check_search(search: str, name: str | None = None) -> str:
    """`search` if it names an encoder search (that format `name` has, or one of mix `name`'s formats, when
    given), else SpqtError."""
    from spqt.errors import SpqtError

    if search not in SEARCHES:
        raise SpqtError(f"unknown encoder search {search!r}; choose one of {', '.join(SEARCHES)}")
    served = SEARCHES[search]
    if name is not None and served is not None:
        from spqt.mixes import formats_of

        if not set(formats_of(name)) & set(served):
            raise SpqtError(f"the {search} encoder search exists for {', '.join(served)} only, not {name}")
    return search


def format_module(name: str):
    """The module of a format (spqt.formats.q4_k, ...): its encode, decode, grid, with_codes, CODE_MAX."""
    import importlib

    return importlib.import_module(f"spqt.formats.{get_format(name).name}")


def codec(name: str, search: str = "reference"):
    """(encode, decode) of a format: (n_blocks, block_size) float32 <-> (n_blocks, block_bytes) uint8.

    search: the encoder's search (see above); SpqtError if the format has no such search."""
    import functools

    module = format_module(name)
    check_search(search, name)
    encode = module.encode if search == "reference" else functools.partial(module.encode, search=search)
    return encode, module.decode


def per_weight_grid(scale, offset, codes):
    """A module's ``grid`` from its sub-blocks: scale, offset (n, G) float32 and codes (n, G, S) -> per-weight
    scale, offset (n, G * S) float32 and codes (n, G * S) int64."""
    import torch

    n, groups, size = codes.shape
    return (scale[..., None].expand(n, groups, size).reshape(n, -1),
            offset[..., None].expand(n, groups, size).reshape(n, -1), codes.to(torch.int64).reshape(n, -1))


def replaced_codes(blocks, codes, put):
    """A module's ``with_codes``: a copy of blocks (n, bytes) uint8 with put(copy, codes) writing its codes."""
    out = blocks.clone()
    put(out, codes)
    return out
