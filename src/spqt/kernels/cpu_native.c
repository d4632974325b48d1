/* SpQt's CPU GEMVs in C: zigzag blocks of every type read as they are stored (Q4_K: 4.5 bits a
 * weight instead of an fp16 copy's 16), and an fp16 GEMV for float matrices (the tied head).
 * Compiled on first use by kernels/cpu_native.py with the machine's C compiler (-O3 -march=native,
 * OpenMP when it has it) and called through ctypes.
 *
 * Layouts (layouts.py, formats/<type>.py, whose docstrings draw the bytes):
 *   zigzag:      blocks (R = ceil(N / B), K, bytes) uint8, block (r, k) holding W[B r .. B r + B - 1, k];
 *                B = 256 (Q6_K 210 bytes, Q5_K 176, Q4_K 144 (d fp16, dmin fp16, 12 bytes of 6-bit
 *                scales and mins, 128 bytes of nibbles), Q3_K 110, Q2_K 84), B = 32 for Q8_0 (34).
 *   fp16:        W (N, K) row-major.
 *   x:           (M, K) fp32 row-major; y, residual: (M, N) fp32 row-major (residual may be NULL).
 *
 * Numerics: every output is a sum over k in ascending order, in fp32, whatever the thread count
 * (threads split the outputs, never a sum), so results are deterministic. Q4_K: weight (n, k) is
 * d sc q - dmin m (the format's value, exact in fp32), and y[n] = sum_k (x_k d sc) q - sum_k x_k dmin m:
 * one multiply-add a weight. A zero input adds nothing, so it is skipped (the sparse decode's
 * masked inputs cost no reads of their blocks' nibbles; a dense product of several rows multiplies it in
 * instead, kquant_rows). The other types likewise: each weight the
 * value decode gives (d sc (q - 32) for Q6_K, d sc q - dmin m for Q5_K and Q2_K, ...), x folded into
 * the scales first. One driver (zigzag_product) serves every type through its `groups` routine.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
#define SPQT_F16C 1
#endif


#define Q4K_BYTES 144

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while ((man & 0x400u) == 0) {
                man <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float load_half(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
#ifdef SPQT_F16C
    return _cvtsh_ss(v);
#else
    return half_to_float(v);
#endif
}

/* The 6-bit scale and min of sub-block j (0..7) from a block's 12 scale bytes (q4_k.py's table). */
static inline __attribute__((always_inline)) void scale_min(int j, const uint8_t *s, int *sc, int *m)
{
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Which inputs a product reads: dense (rule NULL) every nonzero one; sparse (TEAL / WINA) those with
 * |x| > t, or |x| scale_k > t (the reference's keep_mask: one fp32 product), at their own value. */
struct sparse_rule {
    float t;
    const float *scale; /* (K,) or NULL */
};

static inline int kept_input(float xv, int64_t kk, const struct sparse_rule *rule)
{
    if (!rule)
        return xv != 0.0f; /* a zero input adds nothing: its nibbles are never read */
    float a = fabsf(xv);
    if (rule->scale)
        a *= rule->scale[kk];
    return a > rule->t;
}

/* Rows of x that a dense product with several rows (a prefill's) multiplies together (kquant_rows, q8_0_rows_x;
 * AVX2 builds): each block's quants are converted once for all of them. Measured on Q4_K: three beat two by
 * 1.18-1.31x and four by 1.00-1.14x on the default model's maps and a 7B's (this AVX-512 VM's 32 vector registers;
 * with AVX2's 16, three rows spill an accumulator, and the types with 16 sub-block scales broadcast two a row). */
#define ROWS_TOGETHER 3
_Static_assert(ROWS_TOGETHER == 3, "CALL_ROWS dispatches 1, 2 or 3 rows");

/* FN(R, ARGS...) with the row count NR (1 .. ROWS_TOGETHER) as the constant R (its loops over rows unrolled). */
#define CALL_ROWS(NR, FN, ...)                  \
    do {                                        \
        if ((NR) == 3)                          \
            FN(3, __VA_ARGS__);                 \
        else if ((NR) == 2)                     \
            FN(2, __VA_ARGS__);                 \
        else                                    \
            FN(1, __VA_ARGS__);                 \
    } while (0)

#ifdef SPQT_F16C
/* Blocks a pass (2.3 KB of blocks and 0.5 KB of scales, in L1 for the second pass); the order of every sum
 * is the same for any tile. The default model's 120 Q4_K maps, 2 threads, means of 40 tokens, three rounds
 * alternating: 32 blocks 11.0 / 9.1 / 8.6 ms, 16 blocks 8.3 / 7.8 / 8.0, 8 blocks 7.8 / 7.6 / 8.6. */
#define TILE 16
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 32
#endif
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES (PREFETCH_AHEAD * Q4K_BYTES)
#endif

/* A Q4_K or Q5_K block's header (d, dmin, the 12 bytes of 6-bit scales and mins: q4_k.py's packing) with
 * the input xv folded in: scales[j] = xv d sc_j for the 8 sub-blocks, and mins (lane j) += xv dmin m_j. */
static inline __attribute__((always_inline)) void kquant_header(const uint8_t *b, float xv, float scales[8],
                                                                __m256 *mins)
{
    uint32_t w0, w1, w2;
    memcpy(&w0, b + 4, 4);
    memcpy(&w1, b + 8, 4);
    memcpy(&w2, b + 12, 4);
    uint32_t sc_lo = w0 & 0x3f3f3f3fu, sc_hi = (w2 & 0x0f0f0f0fu) | ((w0 >> 2) & 0x30303030u);
    uint32_t m_lo = w1 & 0x3f3f3f3fu, m_hi = ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 2) & 0x30303030u);
    __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo)));
    __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)m_hi, (int)m_lo)));
    _mm256_storeu_ps(scales, _mm256_mul_ps(_mm256_set1_ps(xv * load_half(b)), sc));
    *mins = _mm256_fmadd_ps(_mm256_set1_ps(xv * load_half(b + 2)), mn, *mins);
}

/* Outputs 64 c0 .. 64 (c0 + groups) - 1 (c0 + groups <= 4) of one superblock row (its
 * blocks row_blocks[k]) for one row of x: quant group c holds outputs 64 c + 0..31 in its low nibbles
 * and 64 c + 32..63 in its high ones. Per tile of blocks:
 * first the blocks' scales, x folded in (x_k d sc_j for the 8 sub-blocks, and the mins' sums), then
 * each group's nibbles against them. out[i] = sum_k x_k (d sc)_k q_ik - sum_k x_k (dmin m)_k. */
static void q4k_groups(const uint8_t *row_blocks, int64_t k, int c0, int groups, const float *x,
                       const struct sparse_rule *rule, float out[256])
{
    const __m256i low4 = _mm256_set1_epi32(0x0f);
    __m256 mins = _mm256_setzero_ps(); /* sum_k x_k dmin_k m_kj, sub-block j in lane j */
    float acc[4][64];
    memset(acc, 0, sizeof acc);
    float scales[TILE][8];
    int32_t active[TILE];
    for (int64_t k0 = 0; k0 < k; k0 += TILE) {
        int tile = k - k0 < TILE ? (int)(k - k0) : TILE, count = 0;
        for (int t = 0; t < tile; t++) {
            const uint8_t *b = row_blocks + (k0 + t) * Q4K_BYTES;
            /* the block a tile ahead requested now (prefetches never fault past the end): one
             * thread's demand misses alone stream ~3 GB/s here */
            __builtin_prefetch(b + PREFETCH_AHEAD * Q4K_BYTES);
            __builtin_prefetch(b + PREFETCH_AHEAD * Q4K_BYTES + 64);
            __builtin_prefetch(b + PREFETCH_AHEAD * Q4K_BYTES + 128);
            float xv = x[k0 + t];
            if (!kept_input(xv, k0 + t, rule))
                continue;
            kquant_header(b, xv, scales[count], &mins);
            active[count++] = t;
        }
        for (int g = 0; g < groups; g++) {
            int c = c0 + g;
            __m256 a0 = _mm256_loadu_ps(acc[g]), a1 = _mm256_loadu_ps(acc[g] + 8), a2 = _mm256_loadu_ps(acc[g] + 16),
                   a3 = _mm256_loadu_ps(acc[g] + 24), a4 = _mm256_loadu_ps(acc[g] + 32), a5 = _mm256_loadu_ps(acc[g] + 40),
                   a6 = _mm256_loadu_ps(acc[g] + 48), a7 = _mm256_loadu_ps(acc[g] + 56);
            for (int i = 0; i < count; i++) {
                const uint8_t *q = row_blocks + (k0 + active[i]) * Q4K_BYTES + 16 + 32 * c;
                __m256 s_lo = _mm256_broadcast_ss(&scales[i][2 * c]), s_hi = _mm256_broadcast_ss(&scales[i][2 * c + 1]);
#define GROUP(G, LO, HI)                                                                               \
    do {                                                                                               \
        __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * (G))));             \
        LO = _mm256_fmadd_ps(s_lo, _mm256_cvtepi32_ps(_mm256_and_si256(w, low4)), LO);                 \
        HI = _mm256_fmadd_ps(s_hi, _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4)), HI);                   \
    } while (0)
                GROUP(0, a0, a4);
                GROUP(1, a1, a5);
                GROUP(2, a2, a6);
                GROUP(3, a3, a7);
#undef GROUP
            }
            _mm256_storeu_ps(acc[g], a0);
            _mm256_storeu_ps(acc[g] + 8, a1);
            _mm256_storeu_ps(acc[g] + 16, a2);
            _mm256_storeu_ps(acc[g] + 24, a3);
            _mm256_storeu_ps(acc[g] + 32, a4);
            _mm256_storeu_ps(acc[g] + 40, a5);
            _mm256_storeu_ps(acc[g] + 48, a6);
            _mm256_storeu_ps(acc[g] + 56, a7);
        }
    }
    float min_sum[8];
    _mm256_storeu_ps(min_sum, mins);
    for (int g = 0; g < groups; g++)
        for (int i = 0; i < 64; i++)
            out[64 * g + i] = acc[g][i] - min_sum[2 * (c0 + g) + i / 32];
}
#else
/* The same outputs without AVX2: scalar loops, the sums over k in the same order (a product's
 * rounding may differ from the AVX2 path's: x (d sc) here, (x d) sc there). */
static void q4k_groups(const uint8_t *row_blocks, int64_t k, int c0, int groups, const float *x,
                       const struct sparse_rule *rule, float out[256])
{
    float acc[256] = {0}, min_sum[8] = {0};
    for (int64_t kk = 0; kk < k; kk++) {
        const uint8_t *b = row_blocks + kk * Q4K_BYTES;
        float xv = x[kk];
        if (!kept_input(xv, kk, rule))
            continue;
        float d = load_half(b), dmin = load_half(b + 2);
        for (int j = 0; j < 2 * groups; j++) {
            int sc, mn;
            scale_min(2 * c0 + j, b + 4, &sc, &mn);
            float s = xv * (d * (float)sc);
            min_sum[j] += xv * (dmin * (float)mn);
            const uint8_t *q = b + 16 + 32 * (c0 + j / 2);
            for (int l = 0; l < 32; l++)
                acc[32 * j + l] += s * (float)(j % 2 ? q[l] >> 4 : q[l] & 0x0f);
        }
    }
    for (int i = 0; i < 64 * groups; i++)
        out[i] = acc[i] - min_sum[i / 32];
}
#endif

/* The other zigzag types. Each has a `groups` routine with the signature of zigzag_groups_fn below: the
 * outputs 64 g .. 64 (g + count) - 1 (g = group, at most `unit` groups from a multiple of `unit`) for one
 * row of x, each a sum over k ascending in fp32 of x_k times the format's value (the value as decode
 * forms it, up to where x is folded in), kept inputs only. Per tile of blocks, first each kept block's
 * scales with x folded in, then every group's quants against them. */
#define Q8_0_BYTES 34
#define Q6K_BYTES 210
#define Q5K_BYTES 176
#define Q3K_BYTES 110
#define Q2K_BYTES 84

/* A zigzag block's values, out[i] for its output i (256 outputs; Q8_0 32), exactly as decode forms them: the
 * dequantized W^T of a prefill's GEMM (spqt_zigzag_dequant_t). Exact whatever the compiler contracts: every product
 * fits fp32's 24-bit significand (at most 11 + 7 + 5 bits: Q6_K's fp16 d, int8 scale and |q - 32| <= 32), so s q - o
 * rounds once, fused or not. Loops of 16 or 32 weights with one scale each. The products'
 * routines (q4k_groups, tiled_groups, *_block) read the same bits but fold x into the scales and accumulate; a first
 * dequantization through the portable *_block routines (x = 1) ran 1.9-4.6 ns a weight against 0.05-0.10 here
 * (2 threads; restrict lets the compiler vectorize: Q2_K 0.29 -> 0.07; docs/RESULTS.md, thirty-sixth session). */
static void q4k_values(const uint8_t *restrict b, float *restrict out)
{
    float d = load_half(b), dmin = load_half(b + 2);
    for (int c = 0; c < 4; c++) { /* quant group c: sub-block 2c in its low nibbles, 2c + 1 in its high ones */
        int sc0, m0, sc1, m1;
        scale_min(2 * c, b + 4, &sc0, &m0);
        scale_min(2 * c + 1, b + 4, &sc1, &m1);
        float s0 = d * (float)sc0, o0 = dmin * (float)m0, s1 = d * (float)sc1, o1 = dmin * (float)m1;
        const uint8_t *q = b + 16 + 32 * c;
        for (int l = 0; l < 32; l++) {
            out[64 * c + l] = s0 * (float)(q[l] & 0x0f) - o0;
            out[64 * c + 32 + l] = s1 * (float)(q[l] >> 4) - o1;
        }
    }
}

static void q8_0_values(const uint8_t *restrict b, float *restrict out)
{
    float d = load_half(b);
    for (int l = 0; l < 32; l++)
        out[l] = d * (float)(int8_t)b[2 + l];
}

/* Q6_K, Q3_K and Q2_K: weight i of a block is quarter j = (i % 128) / 32 of half h = i / 128, sub-block i / 16. */
static void q6k_values(const uint8_t *restrict b, float *restrict out)
{
    float d = load_half(b + 208);
#pragma GCC unroll 16 /* the shifts become constants: 0.35 -> 0.19 ns a weight on one thread */
    for (int sub = 0; sub < 16; sub++) {
        int h = sub / 8, j = sub % 8 / 2, l0 = 16 * (sub % 2);
        const uint8_t *ql = b + 64 * h + 32 * (j % 2) + l0, *qh = b + 128 + 32 * h + l0;
        float s = d * (float)(int8_t)b[192 + sub];
        for (int l = 0; l < 16; l++)
            out[16 * sub + l] = s * (float)(((ql[l] >> (4 * (j / 2)) & 0x0f) | (qh[l] >> (2 * j) & 3) << 4) - 32);
    }
}

static void q5k_values(const uint8_t *restrict b, float *restrict out)
{
    float d = load_half(b), dmin = load_half(b + 2);
    for (int c = 0; c < 4; c++) { /* Q4_K's nibbles, the fifth bits of sub-blocks 2c and 2c + 1 from qh */
        int sc0, m0, sc1, m1;
        scale_min(2 * c, b + 4, &sc0, &m0);
        scale_min(2 * c + 1, b + 4, &sc1, &m1);
        float s0 = d * (float)sc0, o0 = dmin * (float)m0, s1 = d * (float)sc1, o1 = dmin * (float)m1;
        const uint8_t *q = b + 48 + 32 * c, *qh = b + 16;
        for (int l = 0; l < 32; l++) {
            out[64 * c + l] = s0 * (float)((q[l] & 0x0f) | (qh[l] >> (2 * c) & 1) << 4) - o0;
            out[64 * c + 32 + l] = s1 * (float)((q[l] >> 4) | (qh[l] >> (2 * c + 1) & 1) << 4) - o1;
        }
    }
}

/* The 6-bit Q3_K scale of sub-block j (0..15) as stored (s + 32) from a block's 12 scale bytes
 * (q3_k.py's packing). */
static inline int q3k_scale(int j, const uint8_t *s)
{
    int low = j < 8 ? s[j] & 0x0f : s[j - 8] >> 4;
    return low | ((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4;
}

static void q3k_values(const uint8_t *restrict b, float *restrict out)
{
    float d = load_half(b + 108);
#pragma GCC unroll 16 /* as Q6_K's: 0.30 -> 0.19 ns */
    for (int sub = 0; sub < 16; sub++) {
        int h = sub / 8, j = sub % 8 / 2, l0 = 16 * (sub % 2);
        const uint8_t *q = b + 32 + 32 * h + l0, *hm = b + l0;
        float s = d * (float)(q3k_scale(sub, b + 96) - 32);
        for (int l = 0; l < 16; l++)
            out[16 * sub + l] = s * (float)((q[l] >> (2 * j) & 3) + 4 * (hm[l] >> (4 * h + j) & 1) - 4);
    }
}

static void q2k_values(const uint8_t *restrict b, float *restrict out)
{
    float d = load_half(b + 80), dmin = load_half(b + 82);
    for (int sub = 0; sub < 16; sub++) {
        int h = sub / 8, j = sub % 8 / 2, l0 = 16 * (sub % 2);
        const uint8_t *q = b + 16 + 32 * h + l0;
        float s = d * (float)(b[sub] & 0x0f), o = dmin * (float)(b[sub] >> 4);
        for (int l = 0; l < 16; l++)
            out[16 * sub + l] = s * (float)(q[l] >> (2 * j) & 3) - o;
    }
}

#ifdef SPQT_F16C
/* Blocks a pass for these types: 8 (1.7 KB of Q6_K) took 14 against 18 ms at 32 for the default model's
 * 120 Q6_K maps, Q5_K 14 against 18, Q8_0 and Q2_K alike at 8, 16 and 32 (scripts/cpu_types_bench.py's
 * maps, 2 threads, busy 2-core VM). */
#ifndef KTILE
#define KTILE 8
#endif

/* The kept blocks of the tile k0 .. k0 + tile - 1 (their offsets in the tile into active; returns how
 * many), the blocks PREFETCH_BYTES further requested now (Q4_K's distance in bytes; 0, 2.3, 4.6 and
 * 9.2 KB measured alike for Q8_0, Q6_K and Q5_K), all their cache lines, in `rows` block rows `stride`
 * bytes apart. */
static inline __attribute__((always_inline)) int tile_kept(const uint8_t *row_blocks, int rows, int64_t stride,
                                                           int bytes, int64_t k0, int tile, const float *x,
                                                           const struct sparse_rule *rule, int32_t *active)
{
    int count = 0;
    for (int t = 0; t < tile; t++) {
        for (int r = 0; r < rows; r++) {
            const uint8_t *ahead = row_blocks + r * stride + (k0 + t) * bytes + PREFETCH_BYTES;
            for (int off = 0; off < bytes; off += 64)
                __builtin_prefetch(ahead + off);
        }
        if (kept_input(x[k0 + t], k0 + t, rule))
            active[count++] = t;
    }
    return count;
}

/* Q8_0: a group is 2 superblock rows of 32 (blocks 2g and 2g + 1, K Q8_0_BYTES apart), the second
 * only where N has it. out[32 r + l] = sum_k (x_k d_rk) q_rkl. */
static inline __attribute__((always_inline)) void q8_0_rows(const int rows, const uint8_t *blocks, int64_t k,
                                                            const float *x, const struct sparse_rule *rule,
                                                            float out[64])
{
    __m256 a[8];
    for (int i = 0; i < 8; i++)
        a[i] = _mm256_setzero_ps();
    float scales[KTILE][2];
    int32_t active[KTILE];
    int64_t stride = k * Q8_0_BYTES;
    for (int64_t k0 = 0; k0 < k; k0 += KTILE) {
        int tile = k - k0 < KTILE ? (int)(k - k0) : KTILE;
        int count = tile_kept(blocks, rows, stride, Q8_0_BYTES, k0, tile, x, rule, active);
        for (int i = 0; i < count; i++)
            for (int r = 0; r < rows; r++)
                scales[i][r] = x[k0 + active[i]] * load_half(blocks + r * stride + (k0 + active[i]) * Q8_0_BYTES);
        for (int i = 0; i < count; i++)
            for (int r = 0; r < rows; r++) {
                const uint8_t *q = blocks + r * stride + (k0 + active[i]) * Q8_0_BYTES + 2;
                __m256 s = _mm256_broadcast_ss(&scales[i][r]);
                for (int c = 0; c < 4; c++) {
                    __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * c)));
                    a[4 * r + c] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(w), a[4 * r + c]);
                }
            }
    }
    for (int i = 0; i < 8; i++)
        _mm256_storeu_ps(out + 8 * i, a[i]);
}

static void q8_0_groups(const uint8_t *blocks, int64_t n, int64_t k, int64_t group, int groups, const float *x,
                        const struct sparse_rule *rule, float out[256])
{
    (void)groups; /* unit 1 */
    const uint8_t *rows = blocks + 2 * group * k * Q8_0_BYTES;
    if (n - 64 * group > 32)
        q8_0_rows(2, rows, k, x, rule, out);
    else
        q8_0_rows(1, rows, k, x, rule, out);
}

/* acc A0..A3 += S01 x int8 bytes 0..15 of V, S23 x bytes 16..31 (8 fp32 lanes each, bytes in order). */
#define WIDEN_FMA(V, A0, A1, A2, A3, S01, S23)                                                            \
    do {                                                                                                  \
        __m128i lo_ = _mm256_castsi256_si128(V), hi_ = _mm256_extracti128_si256(V, 1);                   \
        A0 = _mm256_fmadd_ps(S01, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo_)), A0);                    \
        A1 = _mm256_fmadd_ps(S01, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo_, 8))), A1); \
        A2 = _mm256_fmadd_ps(S23, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi_)), A2);                    \
        A3 = _mm256_fmadd_ps(S23, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi_, 8))), A3); \
    } while (0)
/* A group's two 32-output quarters: a0..a3 += the int8 quants QA with sub-block scales S[0], S[1] (16
 * outputs each), a4..a7 += QB with S[2], S[3]. */
#define FMA_QUARTERS(QA, QB, S)                                                                           \
    do {                                                                                                  \
        __m256 s0_ = _mm256_broadcast_ss(S), s1_ = _mm256_broadcast_ss((S) + 1),                          \
               s2_ = _mm256_broadcast_ss((S) + 2), s3_ = _mm256_broadcast_ss((S) + 3);                      \
        WIDEN_FMA(QA, a0, a1, a2, a3, s0_, s1_);                                                          \
        WIDEN_FMA(QB, a4, a5, a6, a7, s2_, s3_);                                                          \
    } while (0)
/* The 8 accumulators a0..a7 of a group's 64 outputs, from acc[0..63] and back. */
#define LOAD_ACC(acc)                                                                                     \
    __m256 a0 = _mm256_loadu_ps(acc), a1 = _mm256_loadu_ps(acc + 8), a2 = _mm256_loadu_ps(acc + 16),     \
           a3 = _mm256_loadu_ps(acc + 24), a4 = _mm256_loadu_ps(acc + 32), a5 = _mm256_loadu_ps(acc + 40), \
           a6 = _mm256_loadu_ps(acc + 48), a7 = _mm256_loadu_ps(acc + 56)
#define STORE_ACC(acc)                                                                                    \
    do {                                                                                                  \
        _mm256_storeu_ps(acc, a0), _mm256_storeu_ps(acc + 8, a1), _mm256_storeu_ps(acc + 16, a2);         \
        _mm256_storeu_ps(acc + 24, a3), _mm256_storeu_ps(acc + 32, a4), _mm256_storeu_ps(acc + 40, a5);   \
        _mm256_storeu_ps(acc + 48, a6), _mm256_storeu_ps(acc + 56, a7);                                   \
    } while (0)
/* A 16-bit-lane shift by a constant (left for s > 0): the quants are assembled 32 bytes at a time and
 * masked after the shift, so the bits a shift carries across bytes never count. In 32-bit lanes
 * (8 weights an op) Q6_K took 18 against Q4_K's 9.4 ms for the default model's 120 maps. */
#define SHIFT16(v, s) ((s) >= 0 ? _mm256_slli_epi16((v), (s)) : _mm256_srli_epi16((v), -(s)))

/* FN(c, ARGS...) with the group number c as a constant (its shifts become immediates), c = C in 0..3. */
#define CALL_GROUP(C, FN, ...)                  \
    do {                                        \
        switch (C) {                            \
        case 0: FN(0, __VA_ARGS__); break;      \
        case 1: FN(1, __VA_ARGS__); break;      \
        case 2: FN(2, __VA_ARGS__); break;      \
        default: FN(3, __VA_ARGS__); break;     \
        }                                       \
    } while (0)

/* Q6_K group c (outputs 64 c .. 64 c + 63 of a superblock row: half h = c / 2, quarters 2p and 2p + 1,
 * p = c % 2): quarter 2p + j (outputs 64 c + 32 j + l) is nibble p of ql[64 h + 32 j + l] with bits 4p + 2j
 * of qh[32 h + l] above it, minus 32; sub-block 4 c + 2 j + l / 16. scales[i][s] = x_k d sc_s. */
static inline __attribute__((always_inline)) void q6k_group(const int c, const uint8_t *row_blocks, int64_t k0,
                                                            const int32_t *active, int count,
                                                            float (*scales)[16], float acc[64])
{
    const int h = c / 2, p = c % 2;
    const __m256i low4 = _mm256_set1_epi8(0x0f), top2 = _mm256_set1_epi8(0x30), bias = _mm256_set1_epi8(32);
    LOAD_ACC(acc);
    for (int i = 0; i < count; i++) {
        const uint8_t *b = row_blocks + (k0 + active[i]) * Q6K_BYTES, *ql = b + 64 * h, *qh = b + 128 + 32 * h;
        const float *s = scales[i] + 4 * c;
        __m256i hw = _mm256_loadu_si256((const __m256i *)qh), wa = _mm256_loadu_si256((const __m256i *)ql),
                wb = _mm256_loadu_si256((const __m256i *)(ql + 32));
        __m256i na = _mm256_and_si256(p ? _mm256_srli_epi16(wa, 4) : wa, low4);
        __m256i nb = _mm256_and_si256(p ? _mm256_srli_epi16(wb, 4) : wb, low4);
        __m256i qa = _mm256_sub_epi8(_mm256_or_si256(na, _mm256_and_si256(SHIFT16(hw, 4 - 4 * p), top2)), bias);
        __m256i qb = _mm256_sub_epi8(_mm256_or_si256(nb, _mm256_and_si256(SHIFT16(hw, 2 - 4 * p), top2)), bias);
        FMA_QUARTERS(qa, qb, s);
    }
    STORE_ACC(acc);
}

/* Q5_K group c (sub-blocks 2c, 2c + 1): Q4_K's nibbles (qs[32 c + l]: low -> output 64 c + l, high ->
 * 64 c + 32 + l) with bits 2c and 2c + 1 of qh[l] as their 5th bits. The same scales and mins as Q4_K:
 * scales[i][j] = x_k d sc_j, and the mins' sums subtracted at the end. */
static inline __attribute__((always_inline)) void q5k_group(const int c, const uint8_t *row_blocks, int64_t k0,
                                                            const int32_t *active, int count,
                                                            float (*scales)[16], float acc[64])
{
    const __m256i low4 = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
    LOAD_ACC(acc);
    for (int i = 0; i < count; i++) {
        const uint8_t *b = row_blocks + (k0 + active[i]) * Q5K_BYTES;
        __m256i w = _mm256_loadu_si256((const __m256i *)(b + 48 + 32 * c));
        __m256i hw = _mm256_loadu_si256((const __m256i *)(b + 16));
        __m256i lo = _mm256_or_si256(_mm256_and_si256(w, low4), _mm256_and_si256(SHIFT16(hw, 4 - 2 * c), bit4));
        __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(w, 4), low4),
                                     _mm256_and_si256(SHIFT16(hw, 3 - 2 * c), bit4));
        __m256 s_lo = _mm256_broadcast_ss(&scales[i][2 * c]), s_hi = _mm256_broadcast_ss(&scales[i][2 * c + 1]);
        WIDEN_FMA(lo, a0, a1, a2, a3, s_lo, s_lo);
        WIDEN_FMA(hi, a4, a5, a6, a7, s_hi, s_hi);
    }
    STORE_ACC(acc);
}

/* Q3_K and Q2_K group c: half h = c / 2, quarters 2p and 2p + 1 (p = c % 2) of it, as Q6_K's: quarter
 * 2p + j (outputs 64 c + 32 j + l) has its low 2 bits at bits 2 (2p + j) of qs[32 h + l], sub-block
 * 4 c + 2 j + l / 16. Q3_K: the third bit at bit 4 h + 2p + j of hmask[l], the value low + 4 bit - 4.
 * scales[i][s] = x_k d sc_s (Q3_K: sc = stored - 32). */
static inline __attribute__((always_inline)) void q3k_group(const int c, const uint8_t *row_blocks, int64_t k0,
                                                            const int32_t *active, int count,
                                                            float (*scales)[16], float acc[64])
{
    const int h = c / 2, p = c % 2;
    const __m256i two = _mm256_set1_epi8(3), bit2 = _mm256_set1_epi8(4);
    LOAD_ACC(acc);
    for (int i = 0; i < count; i++) {
        const uint8_t *b = row_blocks + (k0 + active[i]) * Q3K_BYTES;
        const float *s = scales[i] + 4 * c;
        __m256i qs = _mm256_loadu_si256((const __m256i *)(b + 32 + 32 * h));
        __m256i hm = _mm256_loadu_si256((const __m256i *)b);
        __m256i qa = _mm256_or_si256(_mm256_and_si256(SHIFT16(qs, -4 * p), two),
                                     _mm256_and_si256(SHIFT16(hm, 2 - (4 * h + 2 * p)), bit2));
        __m256i qb = _mm256_or_si256(_mm256_and_si256(SHIFT16(qs, -4 * p - 2), two),
                                     _mm256_and_si256(SHIFT16(hm, 2 - (4 * h + 2 * p + 1)), bit2));
        qa = _mm256_sub_epi8(qa, bit2);
        qb = _mm256_sub_epi8(qb, bit2);
        FMA_QUARTERS(qa, qb, s);
    }
    STORE_ACC(acc);
}

static inline __attribute__((always_inline)) void q2k_group(const int c, const uint8_t *row_blocks, int64_t k0,
                                                            const int32_t *active, int count,
                                                            float (*scales)[16], float acc[64])
{
    const int h = c / 2, p = c % 2;
    const __m256i two = _mm256_set1_epi8(3);
    LOAD_ACC(acc);
    for (int i = 0; i < count; i++) {
        const uint8_t *b = row_blocks + (k0 + active[i]) * Q2K_BYTES;
        const float *s = scales[i] + 4 * c;
        __m256i qs = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * h));
        __m256i qa = _mm256_and_si256(SHIFT16(qs, -4 * p), two), qb = _mm256_and_si256(SHIFT16(qs, -4 * p - 2), two);
        FMA_QUARTERS(qa, qb, s);
    }
    STORE_ACC(acc);
}

/* Q3_K's 16 scales of a block (q3_k.py's packing), as signed bytes: low nibbles from bytes 96..103, the
 * top 2 bits of scale 4 t + m at bits 2 t of byte 104 + m, minus 32. */
static inline __attribute__((always_inline)) __m128i q3k_scales(const uint8_t *b)
{
    __m128i lows = _mm_loadl_epi64((const __m128i *)(b + 96)), low4 = _mm_set1_epi8(0x0f);
    lows = _mm_unpacklo_epi64(_mm_and_si128(lows, low4), _mm_and_si128(_mm_srli_epi16(lows, 4), low4));
    uint32_t top;
    memcpy(&top, b + 104, 4);
    __m128i tops = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32((int)top), _mm_setr_epi32(0, 2, 4, 6)),
                                 _mm_set1_epi8(3));
    return _mm_sub_epi8(_mm_or_si128(lows, _mm_slli_epi16(tops, 4)), _mm_set1_epi8(32));
}

/* The superblock types' tiled driver, fmt a constant (Q6_K, Q3_K: weight d sc q, 16 signed 8-bit sub-block
 * scales, no mins; Q5_K: Q4_K's header, 8 sub-blocks with mins; Q2_K: weight d sc q - dmin m, 4-bit sc and m per
 * sub-block of 16). Per tile: each kept block's scales[i][s] = x_k d sc_s (and the mins' sums x_k dmin m_s in
 * mins0 (s 0..7) and mins1 (8..15)), then each group's quants against them; at the end the mins' sums
 * subtracted, per sub-block of min_every outputs. */
enum { TILED_Q6K, TILED_Q3K, TILED_Q5K, TILED_Q2K, ROWS_Q4K /* kquant_rows only */ };

static inline __attribute__((always_inline)) void tile_header(const int fmt, const uint8_t *b, float xv,
                                                              float scales[16], __m256 *mins0, __m256 *mins1)
{
    if (fmt == TILED_Q5K) {
        kquant_header(b, xv, scales, mins0);
    } else if (fmt == TILED_Q2K) {
        const __m128i low4 = _mm_set1_epi8(0x0f);
        __m256 xd = _mm256_set1_ps(xv * load_half(b + 80)), xm = _mm256_set1_ps(xv * load_half(b + 82));
        __m128i sm = _mm_loadu_si128((const __m128i *)b);
        __m128i sc = _mm_and_si128(sm, low4), mn = _mm_and_si128(_mm_srli_epi16(sm, 4), low4);
        _mm256_storeu_ps(scales, _mm256_mul_ps(xd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc))));
        _mm256_storeu_ps(scales + 8, _mm256_mul_ps(xd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sc, 8)))));
        *mins0 = _mm256_fmadd_ps(xm, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)), *mins0);
        *mins1 = _mm256_fmadd_ps(xm, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(mn, 8))), *mins1);
    } else {
        const int q3 = fmt == TILED_Q3K;
        __m256 xd = _mm256_set1_ps(xv * load_half(b + (q3 ? 108 : 208)));
        __m128i sc = q3 ? q3k_scales(b) : _mm_loadu_si128((const __m128i *)(b + 192));
        _mm256_storeu_ps(scales, _mm256_mul_ps(xd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))));
        _mm256_storeu_ps(scales + 8, _mm256_mul_ps(xd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)))));
    }
}

static inline __attribute__((always_inline)) void tiled_groups(const int fmt, const uint8_t *blocks, int64_t k,
                                                               int64_t group, int groups, const float *x,
                                                               const struct sparse_rule *rule, float out[256])
{
    const int bytes = fmt == TILED_Q6K ? Q6K_BYTES : fmt == TILED_Q3K ? Q3K_BYTES : fmt == TILED_Q5K ? Q5K_BYTES
                                                                                                     : Q2K_BYTES;
    const int min_every = fmt == TILED_Q5K ? 32 : fmt == TILED_Q2K ? 16 : 0;
    const uint8_t *row_blocks = blocks + (group / 4) * k * bytes;
    int c0 = (int)(group % 4);
    __m256 mins0 = _mm256_setzero_ps(), mins1 = _mm256_setzero_ps();
    float acc[4][64];
    memset(acc, 0, sizeof acc);
    float scales[KTILE][16];
    int32_t active[KTILE];
    for (int64_t k0 = 0; k0 < k; k0 += KTILE) {
        int tile = k - k0 < KTILE ? (int)(k - k0) : KTILE;
        int count = tile_kept(row_blocks, 1, 0, bytes, k0, tile, x, rule, active);
        for (int i = 0; i < count; i++)
            tile_header(fmt, row_blocks + (k0 + active[i]) * bytes, x[k0 + active[i]], scales[i], &mins0, &mins1);
        for (int g = 0; g < groups; g++) {
            if (fmt == TILED_Q6K)
                CALL_GROUP(c0 + g, q6k_group, row_blocks, k0, active, count, scales, acc[g]);
            else if (fmt == TILED_Q3K)
                CALL_GROUP(c0 + g, q3k_group, row_blocks, k0, active, count, scales, acc[g]);
            else if (fmt == TILED_Q5K)
                CALL_GROUP(c0 + g, q5k_group, row_blocks, k0, active, count, scales, acc[g]);
            else
                CALL_GROUP(c0 + g, q2k_group, row_blocks, k0, active, count, scales, acc[g]);
        }
    }
    float min_sum[16];
    _mm256_storeu_ps(min_sum, mins0);
    _mm256_storeu_ps(min_sum + 8, mins1);
    for (int g = 0; g < groups; g++)
        for (int i = 0; i < 64; i++)
            out[64 * g + i] = min_every ? acc[g][i] - min_sum[(64 * (c0 + g) + i) / min_every] : acc[g][i];
}

#define TILED_GROUPS(NAME, FMT)                                                                               \
    static void NAME(const uint8_t *blocks, int64_t n, int64_t k, int64_t group, int groups, const float *x, \
                     const struct sparse_rule *rule, float out[256])                                          \
    {                                                                                                         \
        (void)n;                                                                                              \
        tiled_groups(FMT, blocks, k, group, groups, x, rule, out);                                            \
    }
TILED_GROUPS(q6k_groups, TILED_Q6K)
TILED_GROUPS(q5k_groups, TILED_Q5K)
TILED_GROUPS(q3k_groups, TILED_Q3K)
TILED_GROUPS(q2k_groups, TILED_Q2K)

/* Outputs 64 group .. 64 (group + groups) - 1 (one superblock row's) of nr rows of x at once (x + r k, r < nr),
 * dense, for a superblock type (fmt: ROWS_Q4K or a TILED_ type): out[r] as q4k_groups / tiled_groups give it for
 * row r, each sum over k ascending in the same order, each output's multiply-adds with the same scale and quant. A
 * zero input is multiplied in here (0 scales: the sums, which start at +0, come out the same), where those skip its
 * block; only a block whose fp16 d or dmin is inf or NaN (a corrupt file) then differs, NaN here. Skipping it per
 * row cost Q4_K 15 % (a branch in the header loop). Per tile: every row's scales (x folded in: kquant_header,
 * tile_header), then per group and half (32 outputs) the tile's blocks' quants converted once and multiplied into
 * every row's accumulators. */
static inline __attribute__((always_inline)) void kquant_rows(const int nr, const int fmt, const uint8_t *blocks,
                                                              int64_t k, int64_t group, int groups, const float *x,
                                                              float out[][256])
{
    const int bytes = fmt == ROWS_Q4K ? Q4K_BYTES : fmt == TILED_Q5K ? Q5K_BYTES : fmt == TILED_Q6K ? Q6K_BYTES
                      : fmt == TILED_Q3K ? Q3K_BYTES : Q2K_BYTES;
    const uint8_t *row_blocks = blocks + (group / 4) * k * bytes;
    const int c0 = (int)(group % 4);
    const int eight = fmt == ROWS_Q4K || fmt == TILED_Q5K;  /* 8 sub-blocks of 32 (else 16 of 16) */
    const int min_every = eight ? 32 : fmt == TILED_Q2K ? 16 : 0;
    const __m256i low4 = _mm256_set1_epi32(0x0f), three = _mm256_set1_epi32(3), one = _mm256_set1_epi32(1),
                  bit4 = _mm256_set1_epi32(0x10);
    __m256 mins0[ROWS_TOGETHER], mins1[ROWS_TOGETHER];
    float acc[ROWS_TOGETHER][4][64], scales[TILE][ROWS_TOGETHER][16];
    memset(acc, 0, sizeof acc);
    for (int r = 0; r < nr; r++)
        mins0[r] = mins1[r] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < k; k0 += TILE) {
        int tile = k - k0 < TILE ? (int)(k - k0) : TILE;
        for (int t = 0; t < tile; t++) {
            const uint8_t *b = row_blocks + (k0 + t) * bytes;
            for (int off = 0; off < bytes; off += 64)
                __builtin_prefetch(b + PREFETCH_AHEAD * bytes + off);
            for (int r = 0; r < nr; r++) {
                float xv = x[r * k + k0 + t];
                if (fmt == ROWS_Q4K)
                    kquant_header(b, xv, scales[t][r], &mins0[r]);
                else
                    tile_header(fmt, b, xv, scales[t][r], &mins0[r], &mins1[r]);
            }
        }
        for (int g = 0; g < groups; g++) {
            const int c = c0 + g, h = c / 2, p = c % 2;
            for (int half = 0; half < 2; half++) { /* outputs 64 c + 32 half + 0..31 */
                __m256 a[ROWS_TOGETHER][4];
                for (int r = 0; r < nr; r++)
                    for (int v = 0; v < 4; v++)
                        a[r][v] = _mm256_loadu_ps(acc[r][g] + 32 * half + 8 * v);
                for (int t = 0; t < tile; t++) {
                    const uint8_t *b = row_blocks + (k0 + t) * bytes;
                    __m256 w[4];
                    for (int v = 0; v < 4; v++) { /* outputs 64 c + 32 half + 8 v + 0..7: l = 8 v + lane */
#define BYTES8(P) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(P)))
                        __m256i q;
                        if (eight) { /* Q4_K / Q5_K: the nibbles of quant group c, Q5_K's fifth bit 2c + half of qh */
                            __m256i nib = BYTES8(b + (fmt == ROWS_Q4K ? 16 : 48) + 32 * c + 8 * v);
                            q = half ? _mm256_srli_epi32(nib, 4) : _mm256_and_si256(nib, low4);
                            if (fmt == TILED_Q5K) { /* bit 2c + half of qh moved to bit 4: one shift, one mask */
                                __m256i hb = BYTES8(b + 16 + 8 * v);
                                const int at = 2 * c + half;
                                q = _mm256_or_si256(q, _mm256_and_si256(at <= 4 ? _mm256_slli_epi32(hb, 4 - at)
                                                                                : _mm256_srli_epi32(hb, at - 4), bit4));
                            }
                        } else if (fmt == TILED_Q6K) { /* nibble p of ql[64 h + 32 half + l], bits 4p + 2 half of qh */
                            __m256i ql = BYTES8(b + 64 * h + 32 * half + 8 * v);
                            __m256i lo = _mm256_and_si256(_mm256_srli_epi32(ql, 4 * p), low4);
                            __m256i hi = _mm256_and_si256(_mm256_srli_epi32(BYTES8(b + 128 + 32 * h + 8 * v),
                                                                            4 * p + 2 * half), three);
                            q = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
                        } else { /* Q3_K / Q2_K: bits 2 (2p + half) of qs[32 h + l]; Q3_K's third bit 4h + 2p + half */
                            __m256i qs = BYTES8(b + (fmt == TILED_Q3K ? 32 : 16) + 32 * h + 8 * v);
                            q = _mm256_and_si256(_mm256_srli_epi32(qs, 2 * (2 * p + half)), three);
                            if (fmt == TILED_Q3K)
                                q = _mm256_sub_epi32(_mm256_or_si256(q, _mm256_slli_epi32(_mm256_and_si256(
                                    _mm256_srli_epi32(BYTES8(b + 8 * v), 4 * h + 2 * p + half), one), 2)),
                                    _mm256_set1_epi32(4));
                        }
#undef BYTES8
                        w[v] = _mm256_cvtepi32_ps(q);
                    }
                    for (int r = 0; r < nr; r++) {
                        const float *sc = scales[t][r];
                        if (eight) {
                            __m256 s = _mm256_broadcast_ss(&sc[2 * c + half]);
                            for (int v = 0; v < 4; v++)
                                a[r][v] = _mm256_fmadd_ps(s, w[v], a[r][v]);
                        } else { /* sub-block 4c + 2 half + l / 16 */
                            __m256 s0 = _mm256_broadcast_ss(&sc[4 * c + 2 * half]),
                                   s1 = _mm256_broadcast_ss(&sc[4 * c + 2 * half + 1]);
                            a[r][0] = _mm256_fmadd_ps(s0, w[0], a[r][0]);
                            a[r][1] = _mm256_fmadd_ps(s0, w[1], a[r][1]);
                            a[r][2] = _mm256_fmadd_ps(s1, w[2], a[r][2]);
                            a[r][3] = _mm256_fmadd_ps(s1, w[3], a[r][3]);
                        }
                    }
                }
                for (int r = 0; r < nr; r++)
                    for (int v = 0; v < 4; v++)
                        _mm256_storeu_ps(acc[r][g] + 32 * half + 8 * v, a[r][v]);
            }
        }
    }
    for (int r = 0; r < nr; r++) {
        float min_sum[16];
        _mm256_storeu_ps(min_sum, mins0[r]);
        _mm256_storeu_ps(min_sum + 8, mins1[r]);
        for (int g = 0; g < groups; g++)
            for (int i = 0; i < 64; i++)
                out[r][64 * g + i] = min_every ? acc[r][g][i] - min_sum[(64 * (c0 + g) + i) / min_every]
                                               : acc[r][g][i];
    }
}

/* A type's rows_groups (zigzag_rows_fn below): kquant_rows with its format, for nr <= ROWS_TOGETHER rows. */
#define KQUANT_ROWS_CALL(NAME, FMT)                                                                              \
    static void NAME(const uint8_t *blocks, int64_t n, int64_t k, int64_t group, int groups, const float *x,   \
                     int nr, float out[][256])                                                                 \
    {                                                                                                          \
        (void)n;                                                                                               \
        CALL_ROWS(nr, kquant_rows, FMT, blocks, k, group, groups, x, out);                                     \
    }
KQUANT_ROWS_CALL(q4k_rows_call, ROWS_Q4K)
KQUANT_ROWS_CALL(q5k_rows_call, TILED_Q5K)
KQUANT_ROWS_CALL(q6k_rows_call, TILED_Q6K)
KQUANT_ROWS_CALL(q3k_rows_call, TILED_Q3K)
KQUANT_ROWS_CALL(q2k_rows_call, TILED_Q2K)

/* Q8_0's group of 64 outputs (block rows 2 group and 2 group + 1, the second only where N has it) for nr rows of x
 * at once (x + r k), dense: out[r] as q8_0_groups gives it for row r (each output's multiply-adds x_k d_k q in the
 * same order over k), each block's quants converted once for the rows. A zero input is multiplied in (see
 * kquant_rows). */
static inline __attribute__((always_inline)) void q8_0_rows_x(const int nr, const uint8_t *blocks, int64_t n,
                                                               int64_t k, int64_t group, const float *x,
                                                               float out[][256])
{
    int block_rows = n - 64 * group > 32 ? 2 : 1;
    for (int br = 0; br < block_rows; br++) {
        const uint8_t *row = blocks + (2 * group + br) * k * Q8_0_BYTES;
        __m256 a[ROWS_TOGETHER][4];
        for (int r = 0; r < nr; r++)
            for (int v = 0; v < 4; v++)
                a[r][v] = _mm256_setzero_ps();
        for (int64_t kk = 0; kk < k; kk++) {
            const uint8_t *b = row + kk * Q8_0_BYTES;
            float d = load_half(b);
            __m256 w[4];
            for (int v = 0; v < 4; v++)
                w[v] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * v))));
            for (int r = 0; r < nr; r++) {
                __m256 s = _mm256_set1_ps(x[r * k + kk] * d);
                for (int v = 0; v < 4; v++)
                    a[r][v] = _mm256_fmadd_ps(s, w[v], a[r][v]);
            }
        }
        for (int r = 0; r < nr; r++)
            for (int v = 0; v < 4; v++)
                _mm256_storeu_ps(out[r] + 32 * br + 8 * v, a[r][v]);
    }
}

static void q8_0_rows_call(const uint8_t *blocks, int64_t n, int64_t k, int64_t group, int groups, const float *x,
                           int nr, float out[][256])
{
    (void)groups; /* unit 1 */
    CALL_ROWS(nr, q8_0_rows_x, blocks, n, k, group, x, out);
}

#else
/* Without AVX2: scalar loops, each output's sum over k ascending. */
static void q8_0_groups(const uint8_t *blocks, int64_t n, int64_t k, int64_t group, int groups, const float *x,
                        const struct sparse_rule *rule, float out[256])
{
    (void)groups;
    int rows = n - 64 * group > 32 ? 2 : 1;
    float acc[64] = {0};
    for (int64_t kk = 0; kk < k; kk++) {
        float xv = x[kk];
        if (!kept_input(xv, kk, rule))
            continue;
        for (int r = 0; r < rows; r++) {
            const uint8_t *b = blocks + ((2 * group + r) * k + kk) * Q8_0_BYTES;
            float s = xv * load_half(b);
            for (int l = 0; l < 32; l++)
                acc[32 * r + l] += s * (float)(int8_t)b[2 + l];
        }
    }
    memcpy(out, acc, sizeof acc);
}

/* One block's terms for one input xv: weights i0 .. i0 + count - 1 of the superblock row into acc[i - i0], and
 * (types with an offset term) the offset of each sub-block of `min_every` weights into min_sum[(i - i0) / min_every]. */
typedef void (*portable_block_fn)(const uint8_t *b, float xv, int i0, int count, float *acc, float *min_sum);

/* The portable driver of the superblock types: outputs 64 group .. 64 (group + groups) - 1 from the kept inputs'
 * blocks, k ascending; out = acc - min_sum (min_every 0: no offset term). Inlined with its block routine. */
static inline __attribute__((always_inline)) void portable_groups(const uint8_t *blocks, int64_t k, int64_t group,
                                                                   int groups, const float *x,
                                                                   const struct sparse_rule *rule, int64_t bytes,
                                                                   int min_every, portable_block_fn add,
                                                                   float out[256])
{
    const uint8_t *row_blocks = blocks + (group / 4) * k * bytes;
    int i0 = 64 * (int)(group % 4), count = 64 * groups;
    float acc[256] = {0}, min_sum[16] = {0};
    for (int64_t kk = 0; kk < k; kk++) {
        float xv = x[kk];
        if (kept_input(xv, kk, rule))
            add(row_blocks + kk * bytes, xv, i0, count, acc, min_sum);
    }
    for (int i = 0; i < count; i++)
        out[i] = min_every ? acc[i] - min_sum[i / min_every] : acc[i];
}

static inline __attribute__((always_inline)) void q6k_block(const uint8_t *b, float xv, int i0, int count,
                                                            float *acc, float *min_sum)
{
    (void)min_sum;
    float d = load_half(b + 208);
    for (int i = i0; i < i0 + count; i++) { /* weight i: half h, quarter j, byte l */
        int h = i / 128, j = (i % 128) / 32, l = i % 32;
        int low = b[64 * h + 32 * (j % 2) + l] >> (4 * (j / 2)) & 0x0f, high = b[128 + 32 * h + l] >> (2 * j) & 3;
        acc[i - i0] += xv * (d * (float)(int8_t)b[192 + i / 16]) * (float)((low | high << 4) - 32);
    }
}

static inline __attribute__((always_inline)) void q5k_block(const uint8_t *b, float xv, int i0, int count,
                                                            float *acc, float *min_sum)
{
    float d = load_half(b), dmin = load_half(b + 2);
    for (int j = 0; j < count / 32; j++) { /* sub-block i0 / 32 + j */
        int sub = i0 / 32 + j, sc, mn;
        scale_min(sub, b + 4, &sc, &mn);
        float s = xv * (d * (float)sc);
        min_sum[j] += xv * (dmin * (float)mn);
        const uint8_t *q = b + 48 + 32 * (sub / 2);
        for (int l = 0; l < 32; l++) {
            int low = sub % 2 ? q[l] >> 4 : q[l] & 0x0f;
            acc[32 * j + l] += s * (float)(low | (b[16 + l] >> sub & 1) << 4);
        }
    }
}

/* Q3_K and Q2_K: weight i of a superblock row is quarter j = (i % 128) / 32 of half h = i / 128, its
 * low 2 bits at bits 2j of qs[32 h + i % 32], sub-block i / 16. */
static inline __attribute__((always_inline)) void q3k_block(const uint8_t *b, float xv, int i0, int count,
                                                            float *acc, float *min_sum)
{
    (void)min_sum;
    float d = load_half(b + 108);
    for (int i = i0; i < i0 + count; i++) {
        int h = i / 128, j = (i % 128) / 32, l = i % 32;
        int low = b[32 + 32 * h + l] >> (2 * j) & 3, bit = b[l] >> (4 * h + j) & 1;
        acc[i - i0] += xv * (d * (float)(q3k_scale(i / 16, b + 96) - 32)) * (float)(low + 4 * bit - 4);
    }
}

static inline __attribute__((always_inline)) void q2k_block(const uint8_t *b, float xv, int i0, int count,
                                                            float *acc, float *min_sum)
{
    float d = load_half(b + 80), dmin = load_half(b + 82);
    for (int sub = i0 / 16; sub < (i0 + count) / 16; sub++) {
        float s = xv * (d * (float)(b[sub] & 0x0f));
        min_sum[sub - i0 / 16] += xv * (dmin * (float)(b[sub] >> 4));
        for (int i = 16 * sub; i < 16 * sub + 16; i++) {
            int h = i / 128, j = (i % 128) / 32, l = i % 32;
            acc[i - i0] += s * (float)(b[16 + 32 * h + l] >> (2 * j) & 3);
        }
    }
}

#define PORTABLE_GROUPS(NAME, BYTES, MIN_EVERY, BLOCK)                                                           \
    static void NAME(const uint8_t *blocks, int64_t n, int64_t k, int64_t group, int groups, const float *x,  \
                     const struct sparse_rule *rule, float out[256])                                           \
    {                                                                                                          \
        (void)n;                                                                                               \
        portable_groups(blocks, k, group, groups, x, rule, BYTES, MIN_EVERY, BLOCK, out);                      \
    }
PORTABLE_GROUPS(q6k_groups, Q6K_BYTES, 0, q6k_block)
PORTABLE_GROUPS(q5k_groups, Q5K_BYTES, 32, q5k_block)
PORTABLE_GROUPS(q3k_groups, Q3K_BYTES, 0, q3k_block)
PORTABLE_GROUPS(q2k_groups, Q2K_BYTES, 16, q2k_block)
#endif

static void q4k_call(const uint8_t *blocks, int64_t n, int64_t k, int64_t group, int groups, const float *x,
                     const struct sparse_rule *rule, float out[256])
{
    (void)n;
    q4k_groups(blocks + (group / 4) * k * Q4K_BYTES, k, (int)(group % 4), groups, x, rule, out);
}

/* One zigzag type: `groups` computes outputs 64 group .. 64 (group + count) - 1 (see above) for one row of
 * x from the blocks (ceil(N / B), K, bytes), count <= unit - group % unit; `unit` groups share their
 * blocks' scales (a superblock row of 256; Q8_0: 1, its two rows of 32 have their own). */
typedef void (*zigzag_groups_fn)(const uint8_t *blocks, int64_t n, int64_t k, int64_t group, int count,
                                 const float *x, const struct sparse_rule *rule, float out[256]);
/* The same outputs for nr <= ROWS_TOGETHER rows of x (x + r k), dense (kquant_rows, q8_0_rows_x), where a type
 * has it. */
typedef void (*zigzag_rows_fn)(const uint8_t *blocks, int64_t n, int64_t k, int64_t group, int count,
                               const float *x, int nr, float out[][256]);
#ifdef SPQT_F16C
#define ROWS_CALL(NAME) NAME
#else
#define ROWS_CALL(NAME) 0
#endif
struct zigzag_type {
    const char *name;
    int unit;
    zigzag_groups_fn groups;
    int rows;                                   /* outputs a block holds: 256, Q8_0 32 */
    int64_t bytes;                              /* a block's bytes */
    void (*values)(const uint8_t *, float *);   /* a block's values (above) */
    zigzag_rows_fn rows_groups;                 /* several rows at once (dense), or 0 */
};
static const struct zigzag_type ZIGZAG_TYPES[] = {
    {"q4_k", 4, q4k_call, 256, Q4K_BYTES, q4k_values, ROWS_CALL(q4k_rows_call)},
    {"q8_0", 1, q8_0_groups, 32, Q8_0_BYTES, q8_0_values, ROWS_CALL(q8_0_rows_call)},
    {"q6_k", 4, q6k_groups, 256, Q6K_BYTES, q6k_values, ROWS_CALL(q6k_rows_call)},
    {"q5_k", 4, q5k_groups, 256, Q5K_BYTES, q5k_values, ROWS_CALL(q5k_rows_call)},
    {"q3_k", 4, q3k_groups, 256, Q3K_BYTES, q3k_values, ROWS_CALL(q3k_rows_call)},
    {"q2_k", 4, q2k_groups, 256, Q2K_BYTES, q2k_values, ROWS_CALL(q2k_rows_call)},
};
#define N_ZIGZAG_TYPES ((int)(sizeof ZIGZAG_TYPES / sizeof ZIGZAG_TYPES[0]))

/* The index of a zigzag type by its name ("q4_k", ...) for spqt_zigzag, or -1 where there is none here. */
int spqt_zigzag_type(const char *name)
{
    for (int i = 0; i < N_ZIGZAG_TYPES; i++)
        if (!strcmp(ZIGZAG_TYPES[i].name, name))
            return i;
    return -1;
}

/* Writes out's outputs 64 group .. 64 (group + count) - 1 (those below N) to rows row .. row + nr - 1 of y,
 * [residual +]. */
static inline void put_rows(float out[][256], int nr, int64_t row, int64_t group, int64_t count, int64_t n, float *y,
                            const float *residual)
{
    int64_t n0 = group * 64, n_valid = n - n0 < 64 * count ? n - n0 : 64 * count;
    for (int r = 0; r < nr; r++) {
        float *yr = y + (row + r) * n + n0;
        const float *rr = residual ? residual + (row + r) * n + n0 : 0;
        for (int64_t i = 0; i < n_valid; i++)
            yr[i] = rr ? rr[i] + out[r][i] : out[r][i];
    }
}

/* A zigzag product with a sparse rule (or NULL): the work is split by groups of 64 outputs (groups past N
 * are never read) and runs of rows (one row; ROWS_TOGETHER in a dense product of several rows where the type has
 * rows_groups): each thread takes an equal run of (rows, group) units, and within a run the groups of one unit
 * are computed in one call (their blocks' scales decoded once). A last, shorter run of rows costs less than the
 * others, so a few rows split unevenly (m = 4: about 1.3x the even split's time, from one thread's costs); taking
 * (unit, run) pairs instead, which evens that, ran 0.69-0.90x as fast at 40 rows (maps of 3 units and less). */
static void zigzag_product(const struct zigzag_type *type, const uint8_t *blocks, int64_t n, int64_t k,
                           const float *x, int64_t m, float *y, const float *residual, int threads,
                           const struct sparse_rule *rule)
{
    int together = type->rows_groups && !rule && m > 1 ? ROWS_TOGETHER : 1;
    int64_t groups = (n + 63) / 64, runs = (m + together - 1) / together, total = groups * runs;
    if (threads < 1)
        threads = 1;
    if (threads > total)
        threads = (int)total;
#pragma omp parallel for schedule(static, 1) num_threads(threads)
    for (int t = 0; t < threads; t++) {
        int64_t first = total * t / threads, last = total * (t + 1) / threads;
        for (int64_t j = first; j < last;) { /* j = run * groups + group */
            int64_t row = j / groups * together, group = j % groups;
            int64_t count = type->unit - group % type->unit; /* the rest of this unit, within the run and N */
            if (count > last - j)
                count = last - j;
            if (count > groups - group)
                count = groups - group;
            int nr = m - row < together ? (int)(m - row) : together;
            float out[ROWS_TOGETHER][256];
            if (together > 1)
                type->rows_groups(blocks, n, k, group, (int)count, x + row * k, nr, out);
            else
                type->groups(blocks, n, k, group, (int)count, x + row * k, rule, out[0]);
            put_rows(out, nr, row, group, count, n, y, residual);
            j += count;
        }
    }
}

/* y (M, N) = [residual +] x (M, K) W^T for the zigzag blocks (ceil(N / B), K, bytes) of W (N, K) in the
 * type spqt_zigzag_type named. */
void spqt_zigzag(int type, const uint8_t *blocks, int64_t n, int64_t k, const float *x, int64_t m, float *y,
                 const float *residual, int threads)
{
    zigzag_product(&ZIGZAG_TYPES[type], blocks, n, k, x, m, y, residual, threads, 0);
}

/* Block rows r0 .. r1 - 1 of W^T (outputs B r0 .. min(N, B r1) - 1; B = 256, Q8_0 32) as fp32 (K, width) row-major,
 * width = min(N, B r1) - B r0, from the zigzag blocks (ceil(N / B), K, bytes) of the type spqt_zigzag_type named:
 * wt[kk][B (r - r0) + i] = block row r's block kk's value for its output i (`values`). A prefill's product runs as
 * x W^T through torch's GEMM on it, a slab of block rows at a time (kernels/cpu_native.py, GEMM_ROWS). */
void spqt_zigzag_dequant_t(int type, const uint8_t *blocks, int64_t n, int64_t k, int64_t r0, int64_t r1, float *wt,
                           int threads)
{
    const struct zigzag_type *t = &ZIGZAG_TYPES[type];
    int64_t rows = t->rows, end = n < rows * r1 ? n : rows * r1, width = end - rows * r0;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t kk = 0; kk < k; kk++)
        for (int64_t r = r0; rows * r < end; r++) {
            const uint8_t *b = blocks + (r * k + kk) * t->bytes;
            float *dst = wt + kk * width + rows * (r - r0);
            if (end - rows * r >= rows) {
                t->values(b, dst);
            } else { /* the last block row, partial */
                float part[256];
                t->values(b, part);
                memcpy(dst, part, (size_t)(end - rows * r) * sizeof(float));
            }
        }
}

/* The sparse product y = [residual +] (x * keep) W^T, keep = |x| > t or |x| scale_k > t (scale (K,) or
 * NULL): the masked input is never formed, its dropped inputs' blocks never read. Returns how many of
 * the M K inputs were kept. */
int64_t spqt_zigzag_sparse(int type, const uint8_t *blocks, int64_t n, int64_t k, const float *x, int64_t m,
                           float *y, const float *residual, int threads, float t, const float *scale)
{
    struct sparse_rule rule = {t, scale};
    int64_t kept = 0;
    for (int64_t i = 0; i < m * k; i++)
        kept += kept_input(x[i], i % k, &rule);
    zigzag_product(&ZIGZAG_TYPES[type], blocks, n, k, x, m, y, residual, threads, &rule);
    return kept;
}

/* The dot product of fp16 w[0..k) with fp32 x[0..k): 8 lanes x 4 partial sums over k in a fixed
 * order, then the lanes added in a fixed order. */
static inline float half_dot(const uint16_t *w, const float *x, int64_t k)
{
    int64_t kk = 0;
    float tail = 0.0f;
#ifdef SPQT_F16C
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    for (; kk + 32 <= k; kk += 32) {
        s0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + kk))), _mm256_loadu_ps(x + kk), s0);
        s1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + kk + 8))), _mm256_loadu_ps(x + kk + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + kk + 16))), _mm256_loadu_ps(x + kk + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + kk + 24))), _mm256_loadu_ps(x + kk + 24), s3);
    }
    for (; kk + 8 <= k; kk += 8)
        s0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + kk))), _mm256_loadu_ps(x + kk), s0);
    __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    float lanes[8];
    _mm256_storeu_ps(lanes, s);
    float total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
#else
    float total = 0.0f;
#endif
    for (; kk < k; kk++)
        tail += half_to_float(w[kk]) * x[kk];
    return total + tail;
}

/* y (M, N) = [residual +] x (M, K) W^T for fp16 W (N, K) row-major. */
void spqt_half_gemm(const uint16_t *w, int64_t n, int64_t k, const float *x, int64_t m, float *y,
                    const float *residual, int threads)
{
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++) {
        for (int64_t row = 0; row < m; row++) {
            float v = half_dot(w + i * k, x + row * k, k);
            y[row * n + i] = residual ? residual[row * n + i] + v : v;
        }
    }
}

/* out (M, K) = x / sqrt(eps + mean(x^2)) * w per row (RMSNorm; w (K,)): 8 partial sums of squares over k
 * in a fixed order, then eps + sum / K as torch's addcdiv forms it. */
void spqt_rms_norm(const float *x, int64_t m, int64_t k, const float *w, float eps, float *out)
{
    for (int64_t row = 0; row < m; row++) {
        const float *xr = x + row * k;
        float part[8] = {0};
        int64_t kk = 0;
        for (; kk + 8 <= k; kk += 8)
            for (int l = 0; l < 8; l++)
                part[l] += xr[kk + l] * xr[kk + l];
        float ss = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        for (; kk < k; kk++)
            ss += xr[kk] * xr[kk];
        float rstd = 1.0f / sqrtf(eps + ss / (float)k);
        for (kk = 0; kk < k; kk++)
            out[row * k + kk] = (xr[kk] * rstd) * w[kk];
    }
}

/* out = x * (|x| > t) (TEAL), or x * (|x| scale_i > t) (WINA; scale (K,) fp32 repeated per row of K),
 * for `count` fp32 values: the reference's keep_mask, one fp32 product; a dropped input becomes +0.
 * Returns how many were kept. */
int64_t spqt_mask(const float *x, int64_t count, int64_t k, float t, const float *scale, float *out)
{
    int64_t kept = 0;
    for (int64_t i = 0; i < count; i++) {
        float a = fabsf(x[i]);
        if (scale)
            a *= scale[i % k];
        int keep = a > t;
        out[i] = keep ? x[i] : 0.0f;
        kept += keep;
    }
    return kept;
}

/* out (M, F) = silu(y[:, :F]) * y[:, F:] for y (M, 2F): SwiGLU, silu(g) = g / (1 + exp(-g)). */
void spqt_silu_mul(const float *y, int64_t m, int64_t f, float *out)
{
    for (int64_t row = 0; row < m; row++)
        for (int64_t i = 0; i < f; i++) {
            float g = y[row * 2 * f + i];
            out[row * f + i] = g / (1.0f + expf(-g)) * y[row * 2 * f + f + i];
        }
}

/* dst[0..hd) = RoPE of x[0..hd) with cs = [cos | sin] (hd / 2 each) of its position, rotate-half:
 * dst[i] = x[i] cos_i - x[i + hd/2] sin_i, dst[i + hd/2] = x[i + hd/2] cos_i + x[i] sin_i. */
static void rope_head(const float *x, const float *cs, int64_t hd, float *dst)
{
    int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) {
        float c = cs[i], s = cs[half + i];
        dst[i] = x[i] * c - x[half + i] * s;
        dst[half + i] = x[half + i] * c + x[i] * s;
    }
}

/* q . k over hd entries: 8 lanes x 2 partial sums over i in a fixed order, then the lanes in a fixed order (AVX2
 * with FMA, hd a multiple of 16); else one sum over i ascending. */
static inline float attention_dot(const float *q, const float *k, int64_t hd)
{
#ifdef SPQT_F16C
    if (hd % 16 == 0) {
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 16) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(k + i + 8), s1);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_add_ps(s0, s1));
        return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    }
#endif
    float dot = 0.0f;
    for (int64_t i = 0; i < hd; i++)
        dot += q[i] * k[i];
    return dot;
}

/* Keys a unit of the decode attention: its scores (group x ATTN_CHUNK floats) stay in L1 / L2. */
#define ATTN_CHUNK 256

/* One kv head's keys j0 .. j1 - 1 (j1 - j0 <= ATTN_CHUNK) for its `group` query heads q (group, hd), each key and
 * value row read once for all of them: per query head g the chunk's largest score top[g], sum[g] = sum_j e_j and
 * o[g] (hd) = sum_j e_j v_j, e_j = exp(s_j - top[g]), s_j = q_g . k_j scale + mask_j, or with a soft-cap (softcap
 * > 0: Gemma 2's) s_j = tanh(q_g . k_j scale / softcap) softcap + mask_j (where every key is masked, top = -inf and
 * the rest NaN: the merge skips the chunk). */
static void attention_chunk(const float *q, int64_t group, int64_t hd, const float *keys, const float *values,
                            int64_t j0, int64_t j1, const float *mask, float scale, float softcap, float *scores,
                            float *top, float *sum, float *o)
{
    for (int64_t g = 0; g < group; g++)
        top[g] = -INFINITY;
    for (int64_t j = j0; j < j1; j++)
        for (int64_t g = 0; g < group; g++) {
            float sc = attention_dot(q + g * hd, keys + j * hd, hd) * scale;
            if (softcap > 0.0f && isfinite(sc))  /* a non-finite score stays so (functional.soft_cap) */
                sc = tanhf(sc / softcap) * softcap;
            sc += mask[j];
            scores[g * ATTN_CHUNK + (j - j0)] = sc;
            top[g] = sc > top[g] ? sc : top[g];
        }
    for (int64_t g = 0; g < group; g++) {
        float total = 0.0f, *e = scores + g * ATTN_CHUNK;
        for (int64_t j = 0; j < j1 - j0; j++) {
            e[j] = expf(e[j] - top[g]);
            total += e[j];
        }
        sum[g] = total;
    }
    memset(o, 0, (size_t)(group * hd) * sizeof(float));
    for (int64_t j = j0; j < j1; j++) {
        const float *v = values + j * hd;
        for (int64_t g = 0; g < group; g++) {
            float e = scores[g * ATTN_CHUNK + (j - j0)], *og = o + g * hd;
            for (int64_t i = 0; i < hd; i++)
                og[i] += e * v[i];
        }
    }
}

/* One decode token's attention after its q|k|v projection (batch 1): RoPE of q and k at position pos,
 * k and v written into the caches at pos, then per query head h (kv head h / (n_heads / n_kv))
 * softmax(q k_j / sqrt(hd) + mask_j) over keys j < length, times v; softcap > 0 (Gemma 2) caps each score before
 * the mask: tanh(q k_j / sqrt(hd) / softcap) softcap (a non-finite score kept).
 *   qkv: ((n_heads + 2 n_kv) hd) fp32; table: (max positions, hd) fp32 [cos | sin];
 *   cache_k, cache_v: (n_kv, max_len, hd) fp32; mask: (length) additive fp32; out: (n_heads hd) fp32.
 * The work is split into units of one kv head and ATTN_CHUNK keys (each key and value row read once for the
 * kv head's query heads), `threads` threads taking units in turn; each unit's (top, sum, o) are merged in key
 * order, so the output is the same bits for any thread count. Returns 0, or -1 when no memory could be had. */
int spqt_rope_attention_decode(const float *qkv, const float *table, int64_t pos, float *cache_k, float *cache_v,
                               int64_t n_heads, int64_t n_kv, int64_t hd, int64_t max_len, int64_t length,
                               const float *mask, float softcap, float *out, int threads)
{
    const float *cs = table + pos * hd;
    for (int64_t g = 0; g < n_kv; g++) {
        rope_head(qkv + (n_heads + g) * hd, cs, hd, cache_k + (g * max_len + pos) * hd);
        memcpy(cache_v + (g * max_len + pos) * hd, qkv + (n_heads + n_kv + g) * hd, (size_t)hd * sizeof(float));
    }
    int64_t group = n_heads / n_kv, chunks = (length + ATTN_CHUNK - 1) / ATTN_CHUNK, units = n_kv * chunks;
    /* q (n_heads hd), then per unit: top, sum (group each), o (group hd); per thread: scores (group ATTN_CHUNK) */
    if (threads < 1)
        threads = 1;
    if (threads > units)
        threads = (int)units;
    size_t floats = (size_t)(n_heads * hd + units * group * (2 + hd) + threads * group * ATTN_CHUNK);
    float *q = malloc(floats * sizeof(float));
    if (!q)
        return -1;
    float *tops = q + n_heads * hd, *sums = tops + units * group, *os = sums + units * group;
    float *scratch = os + units * group * hd;
    for (int64_t h = 0; h < n_heads; h++)
        rope_head(qkv + h * hd, cs, hd, q + h * hd);
    float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for schedule(static, 1) num_threads(threads)
    for (int t = 0; t < threads; t++)
        for (int64_t u = t; u < units; u += threads) {
            int64_t kv = u / chunks, j0 = (u % chunks) * ATTN_CHUNK;
            int64_t j1 = j0 + ATTN_CHUNK < length ? j0 + ATTN_CHUNK : length;
            attention_chunk(q + kv * group * hd, group, hd, cache_k + kv * max_len * hd, cache_v + kv * max_len * hd,
                            j0, j1, mask, scale, softcap, scratch + t * group * ATTN_CHUNK, tops + u * group,
                            sums + u * group, os + u * group * hd);
        }
    for (int64_t h = 0; h < n_heads; h++) {
        int64_t kv = h / group, g = h % group;
        float best = -INFINITY, total = 0.0f, *o = out + h * hd;
        for (int64_t c = 0; c < chunks; c++)
            best = tops[(kv * chunks + c) * group + g] > best ? tops[(kv * chunks + c) * group + g] : best;
        for (int64_t i = 0; i < hd; i++)
            o[i] = 0.0f;
        for (int64_t c = 0; c < chunks; c++) {
            int64_t u = kv * chunks + c;
            if (tops[u * group + g] == -INFINITY)
                continue; /* every key of the chunk masked */
            float w = expf(tops[u * group + g] - best);
            total += w * sums[u * group + g];
            for (int64_t i = 0; i < hd; i++)
                o[i] += w * os[(u * group + g) * hd + i];
        }
        for (int64_t i = 0; i < hd; i++)
            o[i] /= total;
    }
    free(q);
    return 0;
}
