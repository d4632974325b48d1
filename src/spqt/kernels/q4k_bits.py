"""Bit-level decoding of Q4_K blocks shared by the Triton kernels: the 16-byte head (d, dmin and
the packed 6-bit scales and mins) and the 4-bit levels, all without int->float conversions."""

import triton
import triton.language as tl

MAGIC = 0x4B000000  # the bits of float32 2^23, see nibble_at


@triton.jit
def load_head(h_ptr, blk, m):
    """The 16-byte heads of blocks `blk` (h_ptr: the head array viewed as int64 pairs, two 8-byte
    loads instead of four 4-byte ones), decoded by split_head."""
    lo = tl.load(h_ptr + blk * 2 + 0, mask=m, other=0)
    hi = tl.load(h_ptr + blk * 2 + 1, mask=m, other=0)
    return split_head(lo, hi)


@triton.jit
def load_words(h_ptr, blk, m):
    """The four int32 words of the 16-byte units `blk` (h_ptr viewed as int64 pairs, as load_head; the other
    K-quants' grouped scales and heads)."""
    lo = tl.load(h_ptr + blk * 2 + 0, mask=m, other=0)
    hi = tl.load(h_ptr + blk * 2 + 1, mask=m, other=0)
    return lo.to(tl.int32), (lo >> 32).to(tl.int32), hi.to(tl.int32), (hi >> 32).to(tl.int32)


@triton.jit
def split_head(lo, hi):
    """A head as two int64 -> d and dmin as float32, and the packed scale words 1-3 (int32)."""
    w0 = lo.to(tl.int32)
    w1 = (lo >> 32).to(tl.int32)
    w2 = hi.to(tl.int32)
    w3 = (hi >> 32).to(tl.int32)
    # d and dmin as half_to_float would give them, written out: the row GEMV's registers are allocated as before
    d = (w0 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return d, dmin, w1, w2, w3


@triton.jit
def half_to_float(bits):
    """The fp16 in the low 16 bits of int32 `bits` as float32."""
    return (bits & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def small_to_float(v):
    """Non-negative int32 below 2^23 -> the same value as float32, exactly: OR into the mantissa of
    2^23 and subtract 2^23 (two full-rate ops instead of a quarter-rate int->float)."""
    return small_minus(v, 0)


@triton.jit
def small_minus(v, BIAS: tl.constexpr):
    """Non-negative int32 v below 2^23, less the integer BIAS, as float32, exactly: small_to_float with the bias in
    its one subtract (Q6_K's q - 32, Q8_0's u - 128, Q3_K's q - 4 and s - 32)."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + BIAS)


@triton.jit
def unpack_scales(w1, w2, w3, J):
    """6-bit scale and min of sub-block J (int32 tensor of 0..7, broadcast against the packed head
    words w1..w3 of the same blocks) as float32."""
    s8 = 8 * (J & 3)
    lo = J < 4
    sc = tl.where(lo, (w1 >> s8) & 63, ((w3 >> s8) & 15) | (((w1 >> (s8 + 6)) & 3) << 4))
    mn = tl.where(lo, (w2 >> s8) & 63, ((w3 >> (s8 + 4)) & 15) | (((w2 >> (s8 + 6)) & 3) << 4))
    return small_to_float(sc), small_to_float(mn)


@triton.jit
def nibble_at(words, P: tl.constexpr, magic):
    """Bits P..P+3 of int32 words (P <= 16) as the exact float32 nibble * 2^P: one AND-OR puts them
    where they are into the mantissa of 2^23, one subtraction removes the 2^23; no shift.
    magic = 0x4B000000 (the bits of 2^23) comes in as a kernel argument: held in a register, the
    AND-OR is one LOP3 (a literal would make two immediates, which ptxas splits into two LOP3s)."""
    return ((words & (15 << P)) | magic).to(tl.float32, bitcast=True) - 8388608.0
