"""The scale searches that llama.cpp's reference quantizers share, vectorized over groups.

Every function takes the weights of many groups at once as (n, G) float32 tensors: column g holds
group g's n weights, so a sum over dim 0 can be accumulated one element at a time in the C order
(:func:`sequential_sum`) and the float32 results match the C code bit for bit (built without
fused multiply-adds). The operation order of each C expression is kept: ``w*x*l`` is ``(w*x)*l``.
"""

import numpy as np
import torch

# ggml-quants.c: a group whose largest |x| is below this quantizes to all-zero.
GROUP_MAX_EPS = 1e-15


def f32(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 scalar on `like`'s device (so a Python float is rounded to float32 first)."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 one element at a time, in order, as the C loops do. terms: (n, ...) -> (...).

    torch's sum (cascaded) and CPU cumsum (float64 accumulator) change the last bit. On the CPU,
    numpy's add.reduce over the leading axis of a C-ordered array runs the binary add row by row,
    which is this order, in one call instead of n - 1 (tests/test_q4_k.py checks it bitwise). With
    fewer than 8 columns numpy may fold the reduction into its pairwise 1-D sum, so those loop."""
    if terms.device.type == "cpu" and terms.dtype == torch.float32 and terms[0].numel() >= 8:
        return torch.from_numpy(np.add.reduce(terms.contiguous().numpy(), axis=0))
    total = terms[0].clone()
    for i in range(1, terms.shape[0]):
        total.add_(terms[i])
    return total


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``nearest_int``: add 1.5 * 2^23 in float32 and read the low mantissa bits.

    Round half to even for |x| < 2^22; kept literally so that out-of-range values (and NaN, which
    gives 0) come out as the C code's do. float32 -> int64, same shape."""
    val = (x.to(torch.float32) + f32(12582912.0, x)).view(torch.int32).to(torch.int64)
    return (val & 0x007FFFFF) - 0x00400000


_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23


def round_levels_(t: torch.Tensor, nmax: int) -> torch.Tensor:
    """In place: t -> clamp(round_half_even(t), 0, nmax), C's ``MAX(0, MIN(nmax, nearest_int(t)))``.

    Adding and removing 1.5 * 2^23 rounds a float32 to the nearest integer, ties to even, exactly
    for |t| < 2^22 (the searches' levels stay below ~1.2 nmax): the C code's own trick, and about
    20x cheaper than torch.round on the CPU (1.1 ms against 51 us per 262,144 floats, measured)."""
    return t.add_(_ROUND_MAGIC).sub_(_ROUND_MAGIC).clamp_(0, nmax)


def round_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf``: halves away from zero (torch.round rounds them to even). float32 -> float32."""
    t = torch.trunc(x)
    frac = x - t  # exact in float32
    return torch.where(frac.abs() >= 0.5, t + torch.sign(x), t)


def first_abs_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax (G,), the signed value of the first element reaching it (G,)) for x: (n, G)."""
    ax = x.abs()
    idx = ax.argmax(dim=0)  # the first maximal index, as the C loop's strict `>` keeps
    return ax.gather(0, idx[None])[0], x.gather(0, idx[None])[0]


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool):
    """llama.cpp's ``make_qkx2_quants``: an asymmetric (scale, min) search with weighted refits.

    x, weights: (n, G) float32. Returns (scale (G,), the_min (G,) >= 0, levels (n, G) float32
    in 0..nmax); a weight is approximated by ``scale * level - the_min``.

    Every (n, G) temporary is allocated once and reused in place across the nstep + 1 candidate
    scales (fresh 16 MB temporaries cost more in page faults than in arithmetic), and the three
    sums of a candidate run as one sequential sum over a stacked (n, 3, G) buffer.
    """
    one = f32(1.0, x)
    fmax = f32(float(nmax), x)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    n, g = x.shape
    lo = x.amin(dim=0)
    hi = x.amax(dim=0)
    stacked = torch.empty((n, 3, g), dtype=torch.float32, device=x.device)
    stacked[:, 0] = weights
    torch.mul(weights, x, out=stacked[:, 1])
    sum_w, sum_x = sequential_sum(stacked[:, :2])
    lo = torch.where(lo > 0, zero, lo)
    flat = hi == lo
    keep_going = ~flat

    def error_(diff):
        """In place: diff -> weights * |diff| or weights * diff^2; returns its sum over dim 0."""
        if use_mad:
            diff.abs_()
        else:
            diff.mul_(diff)
        return sequential_sum(diff.mul_(weights))

    span = torch.where(flat, one, hi - lo)
    iscale = fmax / span
    scale = one / iscale
    levels = round_levels_(torch.sub(x, lo).mul_(iscale), nmax)
    diff = torch.mul(scale, levels)
    best_error = error_(diff.add_(lo).sub_(x))

    trial = torch.empty_like(x)
    for step in range(nstep + 1):
        # C evaluates (rmin + rdelta*is) + nmax in float32.
        numerator = (f32(rmin, x) + f32(rdelta, x) * f32(float(step), x)) + fmax
        # The C code reads the running `min` here, which earlier steps may have replaced.
        span = torch.where(flat, one, hi - lo)
        iscale = numerator / span
        round_levels_(torch.sub(x, lo, out=trial).mul_(iscale), nmax)
        wl = torch.mul(weights, trial, out=stacked[:, 0])
        torch.mul(wl, trial, out=stacked[:, 1])
        torch.mul(wl, x, out=stacked[:, 2])
        sum_l, sum_l2, sum_xl = sequential_sum(stacked)
        det = sum_w * sum_l2 - sum_l * sum_l
        usable = det > 0
        safe_det = torch.where(usable, det, one)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive_min = this_min > 0
        safe_l2 = torch.where(sum_l2 > 0, sum_l2, one)
        this_scale = torch.where(positive_min, sum_xl / safe_l2, this_scale)
        this_min = torch.where(positive_min, zero, this_min)
        torch.mul(this_scale, trial, out=diff)
        cur_error = error_(diff.add_(this_min).sub_(x))
        better = usable & keep_going & (cur_error < best_error)
        torch.where(better, trial, levels, out=levels)
        best_error = torch.where(better, cur_error, best_error)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)

    levels.masked_fill_(flat, 0.0)
    scale = torch.where(flat, zero, scale)
    return scale, -lo, levels


def make_qx_quants_rmse1(x: torch.Tensor, nmax: int):
    """llama.cpp's ``make_qx_quants`` with rmse_type 1 and no importance (Q6_K's search): a
    symmetric scale tried at 19 values of nmax +- 0.1 i, weights x^2, least-squares refit.

    x: (n, G) float32. Returns (scale (G,), levels (n, G) int64 in 0..2 nmax - 1); a weight is
    ``scale * (level - nmax)``. All-zero groups: scale 0, levels 0.
    """
    amax, mx = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, f32(1.0, x), mx)
    w = x * x
    wx = w * x

    def trial(numerator):
        l = torch.clamp(nearest_int((numerator / mx) * x), -nmax, nmax - 1)
        lf = l.to(torch.float32)
        return l, sequential_sum(wx * lf), sequential_sum((w * lf) * lf)

    l, sumlx, suml2 = trial(f32(float(-nmax), x))
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, f32(1.0, x)), f32(0.0, x))
    best = scale * sumlx
    levels = l + nmax
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = trial(-(f32(float(nmax), x) + f32(0.1, x) * f32(float(step), x)))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = torch.where(better, l + nmax, levels)
        scale = torch.where(better, sumlx / torch.where(better, suml2, f32(1.0, x)), scale)
        best = torch.where(better, scale * sumlx, best)
    levels = torch.where(zero, torch.zeros_like(levels), levels)
    scale = torch.where(zero, f32(0.0, x), scale)
    return scale, levels


def make_q3_quants_rmse(x: torch.Tensor, nmax: int):
    """llama.cpp's ``make_q3_quants`` with do_rmse (Q3_K's search): a symmetric scale, then up to
    five passes that move one level at a time while the weighted fit (weights x^2) improves.

    x: (n, G) float32. Returns (scale (G,), levels (n, G) int64 in 0..2 nmax - 1); a weight is
    ``scale * (level - nmax)``. All-zero groups: scale 0, levels 0.
    """
    amax, mx = first_abs_max(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, f32(1.0, x), mx)
    levels = torch.clamp(nearest_int((f32(float(-nmax), x) / mx) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = levels.to(torch.float32)
    sumlx = sequential_sum(wx * lf)
    suml2 = sequential_sum((w * lf) * lf)
    # The C loop stops after a pass that changes nothing; such a pass leaves the state as it was,
    # so running all five passes for every group gives the same result.
    for _ in range(5):
        for i in range(x.shape[0]):
            li = levels[i].to(torch.float32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (w[i] * li) * li
            can = slx > 0
            new_l = torch.clamp(nearest_int((x[i] * sl2) / torch.where(can, slx, f32(1.0, x))), -nmax, nmax - 1)
            nf = new_l.to(torch.float32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + (w[i] * nf) * nf
            accept = can & (new_l != levels[i]) & (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            levels[i] = torch.where(accept, new_l, levels[i])
            sumlx = torch.where(accept, slx, sumlx)
            suml2 = torch.where(accept, sl2, suml2)
    scale = sumlx / suml2  # 0/0 = NaN where every weight squares to zero, as in C
    levels = torch.where(zero, torch.zeros_like(levels), levels + nmax)
    scale = torch.where(zero, f32(0.0, x), scale)
    return scale, levels
