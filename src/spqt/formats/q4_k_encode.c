/* SpQt's Q4_K reference encoder in C: the bytes of formats/q4_k.py's encode(x, "reference")
 * (llama.cpp's quantize_row_q4_K_ref with its make_qkx2_quants search), several times faster
 * than the torch ops. Compiled on first use by formats/q4_k_native.py (spqt/native.py's cache).
 *
 * Exactness: the torch code states the algorithm as float32 operations in a fixed order; this
 * file performs the same operations in the same order. It must be compiled with
 * -ffp-contract=off and without -ffast-math: a fused multiply-add or a reassociated sum rounds
 * differently and changes bytes. Every sum over the 32 weights of a sub-block starts from the
 * first term and adds the others one at a time in ascending order (q4_k.py's sequential_sum).
 *
 * Layout: x (n_blocks, 256) fp32 row-major, out (n_blocks, 144) uint8 (q4_k.py draws the block).
 * A block's 8 sub-blocks are searched side by side: lane j of every [32][8] array below holds
 * sub-block j, so each loop over j is one 8-wide vector operation and the per-lane sums keep
 * their order.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK 256
#define LANES 8 /* sub-blocks */
#define SUB 32  /* weights per sub-block */
#define NMAX 15
#define NSTEP 20
#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23: x + it - it rounds x to an integer, ties to even */

/* (x + 1.5 * 2^23) read as bits: round half to even for |x| < 2^22 (q4_k.py's nearest_int). */
static inline int32_t nearest_int(float x)
{
    float v = x + ROUND_MAGIC;
    int32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (bits & 0x007fffff) - 0x00400000;
}

/* search.py's round_levels_: round half to even in float32, then clamp to 0..NMAX. */
static inline float round_level(float t)
{
    float r = (t + ROUND_MAGIC) - ROUND_MAGIC;
    r = r < 0.0f ? 0.0f : r;
    return r > (float)NMAX ? (float)NMAX : r;
}

/* float32 -> IEEE half, round to nearest even (what torch's .to(float16) does); overflow gives
 * infinity, NaN a quiet NaN. */
static uint16_t float_to_half(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t a = bits & 0x7fffffffu;
    if (a > 0x7f800000u)
        return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) /* >= 65520 (or infinity): rounds past the largest half, 65504 */
        return (uint16_t)(sign | 0x7c00u);
    if (a >= 0x38800000u) { /* >= 2^-14: a normal half */
        uint32_t h = (a >> 13) - ((127u - 15u) << 10);
        uint32_t rest = a & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
            h++; /* a carry into the exponent is the right result */
        return (uint16_t)(sign | h);
    }
    if (a < 0x33000000u) /* <= 2^-25, half the smallest subnormal: rounds to zero */
        return (uint16_t)sign;
    /* a subnormal half: the value in units of 2^-24 is man * 2^(e - 126) */
    uint32_t e = a >> 23;
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e; /* 14..24 */
    uint32_t h = man >> shift;
    uint32_t rest = man & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rest > half || (rest == half && (h & 1u)))
        h++;
    return (uint16_t)(sign | h);
}

static inline float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 127u - 15u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: renormalise */
        exp = 127u - 15u + 1u;
        while ((man & 0x400u) == 0) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Per lane, t[0] + t[1] + ... + t[31] in this order (q4_k.py's sequential_sum). */
static inline void sum_rows(const float t[SUB][LANES], float total[LANES])
{
    for (int j = 0; j < LANES; j++)
        total[j] = t[0][j];
    for (int i = 1; i < SUB; i++)
        for (int j = 0; j < LANES; j++)
            total[j] += t[i][j];
}

/* search.py's make_qkx2_quants for the 8 sub-blocks of one block (nmax 15, candidates
 * (-1 + 0.1 i + 15) / range for i = 0..20, squared error): x, w [32][8] -> scale[8],
 * the_min[8] (the min as subtracted, >= 0 unless -0), levels [32][8] in 0..15. */
static void make_qkx2_quants(const float x[SUB][LANES], const float w[SUB][LANES], float scale[LANES],
                             float the_min[LANES], float levels[SUB][LANES])
{
    float lo[LANES], hi[LANES], sum_w[LANES], sum_x[LANES], best[LANES], cur[LANES], iscale[LANES];
    float trial[SUB][LANES], err[SUB][LANES], wl[SUB][LANES], wl2[SUB][LANES], wxl[SUB][LANES];
    int flat[LANES];

    for (int j = 0; j < LANES; j++) {
        lo[j] = x[0][j];
        hi[j] = x[0][j];
        sum_w[j] = w[0][j];
        sum_x[j] = w[0][j] * x[0][j];
    }
    for (int i = 1; i < SUB; i++)
        for (int j = 0; j < LANES; j++) {
            lo[j] = x[i][j] < lo[j] ? x[i][j] : lo[j];
            hi[j] = x[i][j] > hi[j] ? x[i][j] : hi[j];
            sum_w[j] += w[i][j];
            sum_x[j] += w[i][j] * x[i][j];
        }
    for (int j = 0; j < LANES; j++) {
        lo[j] = lo[j] > 0.0f ? 0.0f : lo[j];
        flat[j] = hi[j] == lo[j];
        float span = flat[j] ? 1.0f : hi[j] - lo[j];
        iscale[j] = (float)NMAX / span;
        scale[j] = 1.0f / iscale[j];
    }
    for (int i = 0; i < SUB; i++)
        for (int j = 0; j < LANES; j++) {
            levels[i][j] = round_level((x[i][j] - lo[j]) * iscale[j]);
            float diff = ((scale[j] * levels[i][j]) + lo[j]) - x[i][j];
            err[i][j] = (diff * diff) * w[i][j];
        }
    sum_rows(err, best);

    for (int step = 0; step <= NSTEP; step++) {
        /* C evaluates (rmin + rdelta * step) + nmax in float32 */
        float numerator = (-1.0f + 0.1f * (float)step) + (float)NMAX;
        float sum_l[LANES], sum_l2[LANES], sum_xl[LANES], this_scale[LANES], this_min[LANES];
        int usable[LANES];
        for (int j = 0; j < LANES; j++) /* the running min: earlier steps may have replaced it */
            iscale[j] = numerator / (flat[j] ? 1.0f : hi[j] - lo[j]);
        for (int i = 0; i < SUB; i++)
            for (int j = 0; j < LANES; j++) {
                float l = round_level((x[i][j] - lo[j]) * iscale[j]);
                trial[i][j] = l;
                wl[i][j] = w[i][j] * l;
                wl2[i][j] = wl[i][j] * l;
                wxl[i][j] = wl[i][j] * x[i][j];
            }
        sum_rows(wl, sum_l);
        sum_rows(wl2, sum_l2);
        sum_rows(wxl, sum_xl);
        for (int j = 0; j < LANES; j++) {
            float det = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j];
            usable[j] = det > 0.0f;
            float safe_det = usable[j] ? det : 1.0f;
            float s = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / safe_det;
            float m = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / safe_det;
            if (m > 0.0f) {
                s = sum_xl[j] / (sum_l2[j] > 0.0f ? sum_l2[j] : 1.0f);
                m = 0.0f;
            }
            this_scale[j] = s;
            this_min[j] = m;
        }
        for (int i = 0; i < SUB; i++)
            for (int j = 0; j < LANES; j++) {
                float diff = ((this_scale[j] * trial[i][j]) + this_min[j]) - x[i][j];
                err[i][j] = (diff * diff) * w[i][j];
            }
        sum_rows(err, cur);
        int better[LANES];
        for (int j = 0; j < LANES; j++) {
            better[j] = usable[j] && !flat[j] && cur[j] < best[j];
            best[j] = better[j] ? cur[j] : best[j];
            scale[j] = better[j] ? this_scale[j] : scale[j];
            lo[j] = better[j] ? this_min[j] : lo[j];
        }
        for (int i = 0; i < SUB; i++)
            for (int j = 0; j < LANES; j++)
                levels[i][j] = better[j] ? trial[i][j] : levels[i][j];
    }
    for (int j = 0; j < LANES; j++) {
        if (flat[j]) {
            for (int i = 0; i < SUB; i++)
                levels[i][j] = 0.0f;
            scale[j] = 0.0f;
        }
        the_min[j] = -lo[j];
    }
}

/* q4_k.py's _nearest_uint8 then clamp(max=63): (uint8_t) nearest_int(v), at most 63. */
static inline int scale_6bit(float v)
{
    int q = nearest_int(v) & 0xff;
    return q > 63 ? 63 : q;
}

/* q4_k.py's encode_levels (nmax 15) and the packing of encode, for one block. */
static void encode_block(const float *xb, uint8_t *out)
{
    float x[SUB][LANES], w[SUB][LANES], levels[SUB][LANES];
    float scale[LANES], the_min[LANES], sum_x2[LANES];
    for (int j = 0; j < LANES; j++)
        for (int i = 0; i < SUB; i++)
            x[i][j] = xb[SUB * j + i];
    for (int i = 0; i < SUB; i++)
        for (int j = 0; j < LANES; j++)
            levels[i][j] = x[i][j] * x[i][j]; /* the squares, before levels holds levels */
    sum_rows(levels, sum_x2);
    for (int j = 0; j < LANES; j++) {
        /* correctly rounded, as q4_k.py's float64 sqrt rounded to float32 */
        float av_x = (float)sqrt((double)(sum_x2[j] / 32.0f));
        for (int i = 0; i < SUB; i++)
            w[i][j] = fabsf(x[i][j]) + av_x;
    }
    make_qkx2_quants(x, w, scale, the_min, levels);

    /* the largest scale and min when positive, else 0 (-0 never wins); as in torch's max, a NaN
     * among them makes the maximum NaN, which is not positive: 0 */
    float max_scale = 0.0f, max_min = 0.0f;
    int nan_scale = 0, nan_min = 0;
    for (int j = 0; j < LANES; j++) {
        if (scale[j] > max_scale)
            max_scale = scale[j];
        if (the_min[j] > max_min)
            max_min = the_min[j];
        nan_scale |= scale[j] != scale[j];
        nan_min |= the_min[j] != the_min[j];
    }
    max_scale = nan_scale ? 0.0f : max_scale;
    max_min = nan_min ? 0.0f : max_min;
    float inv_scale = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
    float inv_min = max_min > 0.0f ? 63.0f / max_min : 0.0f;
    int ls[LANES], lm[LANES];
    for (int j = 0; j < LANES; j++) {
        ls[j] = scale_6bit(inv_scale * scale[j]);
        lm[j] = scale_6bit(inv_min * the_min[j]);
    }
    uint16_t d16 = float_to_half(max_scale / 63.0f);
    uint16_t dmin16 = float_to_half(max_min / 63.0f);
    float d = half_to_float(d16), dmin = half_to_float(dmin16);

    /* requantize every weight against the 6-bit scales actually stored */
    uint8_t q[LANES][SUB];
    for (int j = 0; j < LANES; j++) {
        float d_sub = d * (float)ls[j];
        float dm_sub = dmin * (float)lm[j];
        if (d_sub != 0.0f) {
            for (int i = 0; i < SUB; i++) {
                int l = nearest_int((xb[SUB * j + i] + dm_sub) / d_sub);
                q[j][i] = (uint8_t)(l < 0 ? 0 : (l > NMAX ? NMAX : l));
            }
        } else {
            for (int i = 0; i < SUB; i++)
                q[j][i] = (uint8_t)levels[i][j];
        }
    }

    memcpy(out, &d16, 2);
    memcpy(out + 2, &dmin16, 2);
    for (int j = 0; j < 4; j++) {
        out[4 + j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        out[8 + j] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        out[12 + j] = (uint8_t)((ls[j + 4] & 0xf) | ((lm[j + 4] & 0xf) << 4));
    }
    for (int g = 0; g < 4; g++)
        for (int l = 0; l < SUB; l++)
            out[16 + SUB * g + l] = (uint8_t)(q[2 * g][l] | (q[2 * g + 1][l] << 4));
}

/* x (n_blocks, 256) fp32 -> out (n_blocks, 144) uint8; blocks are independent, so threads split
 * them and the bytes do not depend on the thread count. */
void spqt_q4k_encode(const float *x, int64_t n_blocks, uint8_t *out, int threads)
{
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < n_blocks; b++)
        encode_block(x + b * QK, out + b * 144);
    (void)threads;
}

/* float32 -> fp16 bits as the encoder rounds d and dmin (exported for the tests). */
uint16_t spqt_float_to_half(float f)
{
    return float_to_half(f);
}
