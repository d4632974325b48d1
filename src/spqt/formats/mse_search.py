"""The ``mse`` encoder search for Q4_K and Q5_K blocks: a lower plain squared error than llama.cpp's.

The reference quantizer (``q4_k.encode_levels``) fits each 32-weight sub-block with importance
weights ``rms + |x|``, rounds the fitted scales and mins once to 6-bit codes under the block's fp16
``d`` and ``dmin``, and stops. In the zigzag layout all 256 weights of a block multiply the same
input x_k, so the block adds ``x_k^2 * sum (w - w_hat)^2`` to the output error: the PLAIN squared
error of the block is the quantity to make small. This search, for blocks of either type:

1. fits every sub-block without weights over a wider range of candidate scales than llama.cpp's
   (``make_qkx2_quants`` with unit weights, ``(nmax - 2 + 0.2 i) / range``, i = 0..25, which may
   clip the extremes);
2. stores them as the reference does: ``d = max scale / 63`` in fp16, 6-bit codes by rounding;
3. twice: moves each sub-block's (scale, min) code pair to the best of the 25 pairs within +-2 of
   it, judged by the exact decoded error with every weight at its nearest level; then refits the
   block's d and dmin by least squares given the codes and levels (rounded to fp16), kept for the
   blocks whose error drops; then the code pairs once more;
4. keeps, per block, llama.cpp's reference result wherever that has the lower error, so no block
   is ever worse than the reference encoder's.

Measured on 8,192 zigzag Q5_K blocks of the default model (layers 0, 15, 29; one thread), RMSE as
a share of the reference encoder's: 0.944 with a +-2 window and two rounds (whole model: 0.944,
docs/RESULTS.md, section "Issue 15: the mse encoder search"), in about 4x the reference's time; a
+-3 window and a third round, kept, take 0.3-0.4 % more RMSE off for 1.5x the time (the default
model's full-test perplexity, zigzag Q5_K, CPU: +3.0007 % over its GGUF with +-2 and two rounds,
+2.9925 % with +-3 and three; conversion 65.6 s and 97.0 s on 2 busy cores). A scan of d
and dmin over +-1 % gained 0.15 %; moving the scale and min codes one at a time instead of in
pairs reached only 0.950.
The float (scale, min) of step 1, before any 6-bit code, would give 0.918: the codes cost the rest.

Values are decoded as q4_k / q5_k decode them (``(d * sc) * q - (dmin * m)`` in float32), so the
errors compared here are those of the stored blocks (zero padding inside a sub-block, where a
zigzag matrix has N not a multiple of 32, counts like any weight, as in the reference). Unlike
the reference path, the bytes may differ between CPU and GPU in near ties (sums run in torch's
own order).
"""

import torch

from spqt.formats.search import make_qkx2_quants, round_levels_

SUB_BLOCKS = 8
SUB_BLOCK_SIZE = 32
CODE_MAX = 63  # 6-bit scale and min codes

# Step 1's candidate scales (nmax + _RMIN + _RDELTA * i) / range, i = 0.._NSTEP. On 8,192 zigzag
# Q5_K blocks of the default model (layers 0, 15, 29), after the same refinement: RMSE 0.9453 of
# the reference's with these 26 candidates, 0.9450 with 51 (-2, 0.1, 50) in 1.5x the time, 0.9508
# with llama.cpp's own 16 (-0.5, 0.1, 15); Q4_K 0.974-0.975 for all of them.
_RMIN = -2.0
_RDELTA = 0.2
_NSTEP = 25
# Step 3: code pairs within +-_WINDOW, _ROUNDS rounds of (pairs, refit), then pairs once more.
_WINDOW = 3
_ROUNDS = 3


def _levels_and_error(xs: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, nmax: int):
    """Nearest levels and the decoded squared error of every sub-block.

    xs: (n, 8, 32) float32; scale, offset: (n, 8) float32, a weight decodes to scale * q - offset.
    Returns q (n, 8, 32) float32 in 0..nmax (0 where scale is 0) and error (n, 8) float32."""
    nonzero = scale != 0
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    q = round_levels_((xs + offset[..., None]).mul_(inv[..., None]), nmax)
    diff = (scale[..., None] * q).sub_(offset[..., None]).sub_(xs)
    return q, diff.mul_(diff).sum(dim=-1)


def _block_error(xs, d, dmin, ls, lm, q) -> torch.Tensor:
    """(n, 8) squared error of sub-blocks decoded from d, dmin (n,), codes ls, lm (n, 8), q (n, 8, 32)."""
    diff = ((d[:, None] * ls)[..., None] * q).sub_((dmin[:, None] * lm)[..., None]).sub_(xs)
    return diff.mul_(diff).sum(dim=-1)


def _best_code_pairs(xs, d, dmin, ls, lm, err, nmax):
    """Per sub-block, the best (ls, lm) within +-_WINDOW of the current pair (current kept on ties;
    err: its error). The candidates' levels are not kept: the winners' are computed once at the end."""
    best_ls, best_lm = ls, lm
    for a in range(-_WINDOW, _WINDOW + 1):
        ls_try = (ls + a).clamp_(0, CODE_MAX)
        scale = d[:, None] * ls_try
        for b in range(-_WINDOW, _WINDOW + 1):
            if a == 0 and b == 0:
                continue
            lm_try = (lm + b).clamp_(0, CODE_MAX)
            _, err_try = _levels_and_error(xs, scale, dmin[:, None] * lm_try, nmax)
            better = err_try < err
            best_ls = torch.where(better, ls_try, best_ls)
            best_lm = torch.where(better, lm_try, best_lm)
            err = torch.where(better, err_try, err)
    q, err = _levels_and_error(xs, d[:, None] * best_ls, dmin[:, None] * best_lm, nmax)
    return best_ls, best_lm, q, err


def _refit_super_scales(xs, d, dmin, ls, lm, q, err, nmax):
    """Least-squares d and dmin for fixed codes and levels, rounded to fp16, kept per block where the
    error (with levels re-chosen) drops. Minimizes sum (d * ls_j * q_i - dmin * lm_j - x_i)^2."""
    sum_q = q.sum(-1)  # (n, 8)
    s_aa = (ls * ls * (q * q).sum(-1)).sum(1)
    s_ab = (ls * lm * sum_q).sum(1)
    s_bb = (lm * lm).sum(1) * SUB_BLOCK_SIZE
    s_ax = (ls * (q * xs).sum(-1)).sum(1)
    s_bx = (lm * xs.sum(-1)).sum(1)
    det = s_aa * s_bb - s_ab * s_ab
    usable = det > 0
    safe_det = torch.where(usable, det, torch.ones_like(det))
    d_new = ((s_ax * s_bb - s_ab * s_bx) / safe_det).to(torch.float16).float()
    dmin_new = ((s_ab * s_ax - s_aa * s_bx) / safe_det).to(torch.float16).float()
    # keep both fp16 fields finite and non-negative, as the reference encoder's are
    usable &= torch.isfinite(d_new) & torch.isfinite(dmin_new) & (d_new >= 0) & (dmin_new >= 0)
    d_new = torch.where(usable, d_new, d)
    dmin_new = torch.where(usable, dmin_new, dmin)
    q_new, err_new = _levels_and_error(xs, d_new[:, None] * ls, dmin_new[:, None] * lm, nmax)
    better = err_new.sum(1) < err.sum(1)
    return (torch.where(better, d_new, d), torch.where(better, dmin_new, dmin),
            torch.where(better[:, None, None], q_new, q), torch.where(better[:, None], err_new, err))


def _unweighted_start(x: torch.Tensor, nmax: int):
    """Step 1 and 2: (d, dmin) (n,) float32 holding fp16 values, codes ls, lm (n, 8) float32."""
    n = x.shape[0]
    groups = x.reshape(n * SUB_BLOCKS, SUB_BLOCK_SIZE).t().contiguous()
    scales, mins, _ = make_qkx2_quants(groups, torch.ones_like(groups), nmax, _RMIN, _RDELTA, _NSTEP, use_mad=False)
    scales = scales.reshape(n, SUB_BLOCKS)
    mins = mins.reshape(n, SUB_BLOCKS)

    def codes(values):
        top = values.amax(dim=1).clamp(min=0)
        step = (top / CODE_MAX).to(torch.float16).float()
        positive = step > 0
        ratio = values / torch.where(positive, step, torch.ones_like(step))[:, None]
        return step, torch.where(positive[:, None], round_levels_(ratio, CODE_MAX), torch.zeros_like(ratio))

    d, ls = codes(scales)
    dmin, lm = codes(mins)
    return d, dmin, ls, lm


def search_levels(x: torch.Tensor, nmax: int, reference):
    """The mse search for blocks x: (n, 256) float32, levels 0..nmax (15: Q4_K, 31: Q5_K).

    reference: the reference encoder's ``(d16, dmin16, ls, lm, q)`` for the same blocks (as
    ``q4_k.encode_levels`` returns them). Returns the same five, in the same dtypes and shapes
    (d16, dmin16 (n,) fp16; ls, lm (n, 8) int64 in 0..63; q (n, 8, 32) int64 in 0..nmax)."""
    x = x.to(torch.float32)
    n = x.shape[0]
    xs = x.reshape(n, SUB_BLOCKS, SUB_BLOCK_SIZE)
    d, dmin, ls, lm = _unweighted_start(x, nmax)
    q, err = _levels_and_error(xs, d[:, None] * ls, dmin[:, None] * lm, nmax)
    for _ in range(_ROUNDS):
        ls, lm, q, err = _best_code_pairs(xs, d, dmin, ls, lm, err, nmax)
        d, dmin, q, err = _refit_super_scales(xs, d, dmin, ls, lm, q, err, nmax)
    ls, lm, q, err = _best_code_pairs(xs, d, dmin, ls, lm, err, nmax)

    ref_d16, ref_dmin16, ref_ls, ref_lm, ref_q = reference
    ref_err = _block_error(xs, ref_d16.float(), ref_dmin16.float(), ref_ls.float(), ref_lm.float(), ref_q.float())
    ours = err.sum(1) < ref_err.sum(1)

    def pick(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
        return torch.where(ours.reshape(-1, *[1] * (theirs.dim() - 1)), mine.to(theirs.dtype), theirs)

    return (pick(d, ref_d16), pick(dmin, ref_dmin16), pick(ls, ref_ls), pick(lm, ref_lm), pick(q, ref_q))
