"""Q4_K blocks, byte-compatible with llama.cpp / GGUF, encoded and decoded in torch (CPU or GPU).

One block holds 256 weights in 144 bytes (4.5 bits per weight)::

    bytes   0..1    d      fp16   scale of the 6-bit sub-block scales
    bytes   2..3    dmin   fp16   scale of the 6-bit sub-block mins
    bytes   4..15   8 x (scale sc_j, min m_j), 6 bits each, packed as
                      byte j     (j < 4): bits 0-5 sc_j      bits 6-7 sc_{j+4} >> 4
                      byte j + 4 (j < 4): bits 0-5 m_j       bits 6-7 m_{j+4} >> 4
                      byte j + 8 (j < 4): bits 0-3 sc_{j+4} & 15, bits 4-7 m_{j+4} & 15
    bytes  16..143  quants: 4 groups of 32 bytes; byte l of group g holds weight l of
                    sub-block 2g in its low nibble and weight l of sub-block 2g+1 in its high one

Weight i of sub-block j (32 weights each) is ``d * sc_j * q_i - dmin * m_j``.

The encoder follows llama.cpp's reference algorithm (``quantize_row_q4_K_ref`` with its
``make_qkx2_quants`` search: importance weights ``rms + |x|``, 21 candidate scales, a weighted
least-squares refit of scale and min), written as vectorized float32 tensor ops that reproduce
the C code's operation order: every sum is accumulated element by element in the C order, and
no multiply-add is fused. Eager torch does the same IEEE float32 operations on CPU and GPU, so
both give the same bytes. ``search="mse"`` runs the optional search of mse_search.py on top of
it instead (lower plain squared error, other bytes). On the CPU, the reference search runs in C
where a compiler is at hand (q4_k_native.py: the same operations, the same bytes).
"""

import torch

from spqt.formats import check_search, per_weight_grid, q4_k_native, replaced_codes
from spqt.formats.mse_search import search_levels
from spqt.formats.search import f32, make_qkx2_quants, nearest_int, sequential_sum

BLOCK_SIZE = 256
BLOCK_BYTES = 144
SUB_BLOCKS = 8
SUB_BLOCK_SIZE = 32

# make_qkx2_quants' search for Q4_K: 21 candidate scales, (nmax + rmin + rdelta * i) / range.
_NMAX = 15
_RMIN = -1.0
_RDELTA = 0.1
_NSTEP = 20


def _nearest_uint8(x: torch.Tensor) -> torch.Tensor:
    """C's ``(uint8_t) nearest_int(x)``: round half to even, wrap to 8 bits."""
    return nearest_int(x) & 0xFF


def encode(x: torch.Tensor, search: str = "reference") -> torch.Tensor:
    """Quantize blocks. x: (n_blocks, 256) float32 (any device) -> (n_blocks, 144) uint8.

    search: "reference" (llama.cpp's bytes) or "mse" (formats/mse_search.py)."""
    check_search(search, "q4_k")
    if x.dim() != 2 or x.shape[1] != BLOCK_SIZE:
        raise ValueError(f"q4_k.encode expects (n_blocks, {BLOCK_SIZE}), got {tuple(x.shape)}")
    if search == "reference":
        # the same bytes from C, 5x faster a thread (docs/RESULTS.md, issue 18), where a compiler works
        native = q4_k_native.encode(x)
        if native is not None:
            return native
    levels = encode_levels(x, _NMAX, _RMIN, _RDELTA, _NSTEP)
    if search == "mse":
        levels = search_levels(x, _NMAX, levels)
    d16, dmin16, ls, lm, q = levels
    n_blocks = x.shape[0]
    out = torch.empty((n_blocks, BLOCK_BYTES), dtype=torch.uint8, device=x.device)
    out[:, 0:2] = d16.reshape(n_blocks, 1).view(torch.uint8)
    out[:, 2:4] = dmin16.reshape(n_blocks, 1).view(torch.uint8)
    out[:, 4:16] = pack_scales(ls, lm)
    _put_codes(out, q)
    return out


def _put_codes(out: torch.Tensor, q: torch.Tensor) -> None:
    """Write 4-bit codes q (n, 256) or (n, 8, 32), int in 0..15, into the quants of blocks out (n, 144) in place."""
    q = q.to(torch.uint8).reshape(out.shape[0], 4, 2, SUB_BLOCK_SIZE)
    out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(out.shape[0], 128)


def encode_levels(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The scale / min part shared by Q4_K and Q5_K (their reference quantizers differ only in
    nmax and the search's candidates): per sub-block of 32 a make_qkx2_quants search with
    importance ``rms + |x|``, 6-bit scales and mins under fp16 d and dmin, then every weight
    requantized against the stored values.

    x: (n_blocks, 256). Returns d16 (n,) fp16, dmin16 (n,) fp16, ls (n, 8) and lm (n, 8) int64
    in 0..63, q (n, 8, 32) int64 in 0..nmax.
    """
    x = x.to(torch.float32)
    n_blocks = x.shape[0]
    # (32, n_blocks * 8): one column per sub-block, so sums over dim 0 run in the C order.
    groups = x.reshape(n_blocks * SUB_BLOCKS, SUB_BLOCK_SIZE).t().contiguous()
    sum_x2 = sequential_sum(groups * groups)
    # sqrtf is correctly rounded; torch's float32 CPU sqrt is not always, float64 sqrt rounded to
    # float32 is (53 >= 2*24 + 2 bits), on CPU and GPU alike.
    av_x = torch.sqrt((sum_x2 / f32(32.0, x)).double()).float()
    weights = groups.abs().add_(av_x)
    scales, mins, levels = make_qkx2_quants(groups, weights, nmax, rmin, rdelta, nstep, use_mad=False)
    scales = scales.reshape(n_blocks, SUB_BLOCKS)
    mins = mins.reshape(n_blocks, SUB_BLOCKS)

    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    # C keeps the running maximum from 0 and replaces it only when larger: -0.0 never wins.
    max_scale = scales.max(dim=1).values
    max_scale = torch.where(max_scale > 0, max_scale, zero)
    max_min = mins.max(dim=1).values
    max_min = torch.where(max_min > 0, max_min, zero)
    c63 = f32(63.0, x)
    inv_scale = torch.where(max_scale > 0, c63 / torch.where(max_scale > 0, max_scale, c63), zero)
    inv_min = torch.where(max_min > 0, c63 / torch.where(max_min > 0, max_min, c63), zero)
    ls = torch.clamp(_nearest_uint8(inv_scale[:, None] * scales), max=63)
    lm = torch.clamp(_nearest_uint8(inv_min[:, None] * mins), max=63)
    d16 = (max_scale / c63).to(torch.float16)
    dmin16 = (max_min / c63).to(torch.float16)

    # Requantize every weight against the 6-bit scales actually stored.
    d_sub = d16.float()[:, None] * ls.float()  # (n_blocks, 8)
    dm_sub = dmin16.float()[:, None] * lm.float()
    xs = x.reshape(n_blocks, SUB_BLOCKS, SUB_BLOCK_SIZE)
    safe_d = torch.where(d_sub != 0, d_sub, torch.ones_like(d_sub))
    requant = torch.clamp(nearest_int((xs + dm_sub[..., None]) / safe_d[..., None]), 0, nmax)
    first_pass = levels.t().reshape(n_blocks, SUB_BLOCKS, SUB_BLOCK_SIZE).to(torch.int64)
    q = torch.where((d_sub != 0)[..., None], requant, first_pass)
    return d16, dmin16, ls, lm, q


def pack_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """(n, 8) 6-bit scales and mins (int) -> (n, 12) uint8, the packing drawn above."""
    ls = ls.to(torch.int64)
    lm = lm.to(torch.int64)
    low = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    high = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([low, mid, high], dim=1).to(torch.uint8)


def unpack_scales(packed: torch.Tensor):
    """(n, 12) uint8 -> (scales (n, 8), mins (n, 8)) as int64 in 0..63."""
    p = packed.to(torch.int64)
    low, mid, high = p[:, 0:4], p[:, 4:8], p[:, 8:12]
    sc = torch.cat([low & 63, (high & 0xF) | ((low >> 6) << 4)], dim=1)
    mn = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc, mn


def _parts(blocks: torch.Tensor):
    """blocks (n, 144) uint8 -> per sub-block scale and offset (n, 8) float32, codes (n, 8, 32) uint8."""
    n_blocks = blocks.shape[0]
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()  # (n, 1)
    dmin = blocks[:, 2:4].contiguous().view(torch.float16).float()
    sc, mn = unpack_scales(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(n_blocks, 4, 1, SUB_BLOCK_SIZE)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n_blocks, SUB_BLOCKS, SUB_BLOCK_SIZE)
    return d * sc.float(), dmin * mn.float(), q


def decode(blocks: torch.Tensor) -> torch.Tensor:
    """Dequantize. blocks: (n_blocks, 144) uint8 -> (n_blocks, 256) float32, same device."""
    if blocks.dim() != 2 or blocks.shape[1] != BLOCK_BYTES or blocks.dtype != torch.uint8:
        raise ValueError(f"q4_k.decode expects uint8 (n_blocks, {BLOCK_BYTES}), got {blocks.dtype} {tuple(blocks.shape)}")
    scale, offset, q = _parts(blocks)
    return (scale[..., None] * q.float() - offset[..., None]).reshape(blocks.shape[0], BLOCK_SIZE)


CODE_MAX = 15


def grid(blocks: torch.Tensor):
    """The grid each weight lies on: blocks (n, 144) uint8 -> scale, offset (n, 256) float32 and codes (n, 256)
    int64 in 0..CODE_MAX, a weight decoding to scale * code - offset (formats/__init__.py: grids)."""
    return per_weight_grid(*_parts(blocks))


def with_codes(blocks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A copy of blocks (n, 144) with every weight's code replaced by codes (n, 256), int in 0..CODE_MAX."""
    return replaced_codes(blocks, codes, _put_codes)
