// Zigzag Q4_K GEMV on the tensor cores in CUDA C++, compiled at run time by NVRTC (zigzag_cuda.py),
// sm_80 and newer (programmatic dependent launch on sm_90).
//
// The contract of zigzag_mma.py's kernel for fp16 x: program (r, s) = superblock row r (256
// outputs), share s of its columns -> part[s * NP + 256 r + i], i < 256, fp32, every row written;
// then either a second kernel (gemv._reduce_kernel) sums the shares, or (EPILOGUE >= 0) the last
// program to arrive at an output tile does, in a fixed order. With CLUSTER (sm_90) neither: the shares
// of a tile are one thread block cluster (SwiGLU: grid column 2 i + j is row i + j F / 256), no partials
// or counters are written, and cluster rank 0 finishes the tile from the others' shared memory. The arithmetic is the Triton
// kernel's (its module docstring): a warp takes 16 columns (a chunk) and runs 16 mma.m16n8k16,
// one per 16-row tile m (PAIRS: one per pair of tiles and 8 columns), A = the levels as fp16 subnormals (q 2^-24,
// high nibble q 2^-20),
// B[k, n] = x_k d_k sc[k, n] in fp16, products and sums in fp32; the min term x_k dmin_k m[k, g]
// is summed per lane in fp32.
//
// What is different from the Triton kernel is the instruction count per weight: 32-bit column
// arithmetic, one base pointer per lane with the slots at constant offsets, no masks in the
// full chunks (a tail chunk takes the masked path), 16 accumulators.
//
// MODE 0 (B2): share s = columns [s per, min(K, (s + 1) per)), per a multiple of 16 WARPS.
// MODE 2 (B4): the active-column list idx[0 .. count) in steps of 16 WARPS positions; share s
// takes steps s, s + SPLIT, ... (stride = 16 WARPS SPLIT positions).
// MODE 3 (B4 over the share's own list): share s as B2's; the program first lists the share's kept columns (|x_k|
// (scale_k) > t, x_k as x's type; NORM: of the normed input) in order in shared memory (list_kept), then its warps take
// 16 of them a chunk, as B4 takes the collected list's: no collection launch, B2's grid and finishes.
// PDL: the weights of the first chunk are loaded before griddepcontrol.wait (no kernel writes
// them); x, the list, the count and the partials (NORM: the sums of squares) only after it.
//
// Lane (g, t) = 4 g + t (the mma fragment's groupID, threadID_in_group) owns the chunk's columns
// t, 4 + t, 8 + t, 12 + t (slots 0-3, the mma's k = 2t, 2t+1, 2t+8, 2t+9: any one-to-one map of
// columns to k serves, A and B agree) and of each the 16 level bytes 16 g .. 16 g + 15 of its block
// (gpu_layout.py, zigzag: byte 16 g + m = level[16 m + g] | level[16 m + 8 + g] << 4, in plane
// g / 4). So the 8 lanes of a 16-byte load's phase (groups 2 s, 2 s + 1 of 4 consecutive columns)
// read two 128-byte lines of one plane.

#ifndef WARPS
#define WARPS 4
#endif
#ifndef MODE
#define MODE 0
#endif
#ifndef PIPE
#define PIPE 0  // B2: 1 the next chunk's weights are loaded into registers before this chunk's arithmetic
#endif
#ifndef EPILOGUE
#define EPILOGUE -1  // -1: partials only (gemv._reduce_kernel finishes); 0 plain, 1 residual, 2 SwiGLU:
#endif               // the last program to arrive at an output tile sums its partials (fixed order) and finishes it
#ifndef ACC
#define ACC 16  // accumulator tiles a lane holds (16, 8, 4 or 2: 4 ACC registers). Below 16, tiles m and m + ACC share
#endif          // one: tile m's B is zero in the lanes whose column another tile of its accumulator wants, so the
                // tiles sharing an accumulator fill different columns of it (64 -> 4 ACC registers, a select a class
                // of tiles: compute()). Tile pairs (Q2_K - Q6_K): PAIRS below
#ifndef TYPE
#define TYPE 4  // 4: Q4_K; 5: Q5_K (the same planes of low nibbles and heads, plus a word of fifth bits per
#endif          // column and lane group, qh: byte q bit s = level 16 m + g's, bit s + 4 = level 16 m + 8 + g's, m = 4 q + s);
                // 6: Q6_K (gpu_layout_q6k.py: the planes, two words of top bit pairs per column and lane group in qh,
                // the 16 signed scales in h (grouped as Q4_K's heads), d in dq; w = d sc (q - 32), the -32 d sc x
                // term summed per tile pair into the min term's place);
                // 8: Q8_0 (gpu_layout_q8_0.py: unsigned levels u = q + 128 a byte each in four planes, tile half
                // H of lane group g in plane 2 H + g / 4, byte 2 (m % 8) + h = row 16 m + 8 h + g; the 8 d of a
                // column grouped as Q4_K's heads and read through h; w = d (u - 128): B = x d[g] (block g = tiles
                // 2 g, 2 g + 1, the two whose column n = g is kept, as Q4_K's sub-block scales), rows g and g + 8
                // both u 2^-24, the -128 d x term per block in the min term's place);
                // 3: Q3_K (gpu_layout_q3k.py: the low bit pairs in two planes of 32 bytes a column, a uint2 per lane,
                // a word of third bits per column and lane group in qh (as Q5_K's fifth bits), the 16 scales and d in
                // a 16-byte head grouped as Q4_K's; w = d (s - 32) (q - 4): two bit selects per slot and word complete
                // the levels, then Q4_K's permute + AND per tile; odd tiles' levels 4x higher in A (2^22 / 2^18 in
                // the epilogue); the -4 d (s - 32) x term per tile pair in the min term's place, as Q6_K's);
                // 2: Q2_K (gpu_layout_q2k.py: the levels as Q3_K's low bit pairs, GGUF's 16 scale | min << 4 bytes
                // grouped as Q4_K's heads, a lane reading the 8 bytes of its half through h, d | dmin << 16 (R, K) in dq;
                // w = d sc q - dmin mn: Q4_K's arithmetic with Q3_K's tiles and Q6_K's per-tile-pair scales)
#if TYPE != 2 && TYPE != 3 && TYPE != 4 && TYPE != 5 && TYPE != 6 && TYPE != 8
#error "TYPE is 2 (Q2_K), 3 (Q3_K), 4 (Q4_K), 5 (Q5_K), 6 (Q6_K) or 8 (Q8_0)"
#endif
#ifndef PAIRS
#define PAIRS 0  // Q4_K, ACC 8 or 2: tile pairs. An mma multiplies two tiles of the same 8 columns, T0 = 4 q + e and
#endif           // T1 = T0 + 2 (bytes e and 2 + e of the lane's word q of a column, its fp16 halves once word >> 8 e is
                 // masked: no permutes), k = 2 t + j (j: T_j) for the slot pair's first column, 2 t + 8 + j for its
                 // second; T_j's rows want column n = T_j / 2 (its sub-block), so lane g's B holds x d sc[g] in half
                 // g % 2 (zero in the other). ACC 8: the pair (q, e) has an accumulator of its own, no selects; ACC 2:
                 // pairs of one e share c[e], B zero outside lanes 2 q, 2 q + 1 (a select a pair q and slot). The
                 // levels' assembly takes 80 instructions a chunk instead of 96. Q5_K and Q6_K, ACC 8 or 2: the same,
                 // each A register ORed with the bits above its nibbles (nibble_pairs_mma); Q6_K's B by tile parity e.
                 // Q2_K and Q3_K, ACC 8: the lane's word W of a column (Q3_K: of parity p), >> 8 e (Q3_K rotated)
                 // and masked for tile parity p, holds tiles T0 = 8 W + 2 e + p and T1 = T0 + 4 as an fp16 pair (its
                 // bytes e and 2 + e); T_j's rows want column n = T_j / 2, so lane g's B holds x d sc[2 g + p] in
                 // half (g / 2) % 2; the pair (W, e, p) has an accumulator of its own: no selects, no level permutes
#if PAIRS && !(((TYPE == 4 || TYPE == 5 || TYPE == 6) && (ACC == 8 || ACC == 2)) || \
               ((TYPE == 2 || TYPE == 3) && ACC == 8))
#error "PAIRS is Q4_K's / Q5_K's / Q6_K's (TYPE 4 / 5 / 6) at ACC 8 or 2 and Q2_K's / Q3_K's (TYPE 2 / 3) at ACC 8"
#endif
#if PAIRS && PROBE_CUT > 1
#error "PROBE_CUT 2-4 cut the 16-tile assembly, not PAIRS'"
#endif
#ifndef CLUSTER
#define CLUSTER 0  // sm_90, EPILOGUE >= 0: the SPLIT programs of an output tile are one thread block cluster
#endif             // (SwiGLU: its gate and up rows' 2 SPLIT programs, x 2 of the grid); each keeps its 256 sums in
                   // shared memory and cluster rank 0 adds them in rank order over DSMEM and finishes the tile
                   // (no partials in global memory, no reduction launch, no counters)
#ifndef QLOAD
#define QLOAD 0  // level words: 0 ld.global.nc (L1), 1 ld.global.cg (L2 only), 2 .nc with L1::no_allocate
                 // (H200, B2: the three within 2 % of each other, benchmarks/results/session4/cuda-variants-*)
#endif
#ifndef HLOAD
#define HLOAD 0  // heads: the same choices
#endif
#ifndef L2FIRST
#define L2FIRST 0  // B2: chunks 1 .. L2FIRST of a warp's share prefetched into L2 before griddepcontrol.wait
#endif           // (weights only: they stream while the kernel before this one still runs; a table entry's
                 // "l2first", judged in whole decode steps by spqt tune --l2first)
#ifndef NORM
#define NORM 0  // B2: 1 x is the RMSNorm's input: each program first writes its share of the normed input,
#endif          // x's type((x_k rstd) gamma_k) (gamma fp32), into dynamic shared memory (6 bytes a column: launch with
                // 6 per bytes; zigzag_cuda.NORM_SHARE columns at most), rstd = 1 / sqrt(S / K +
                // eps), S the sum of the nsq partial sums of squares sq[] (the reduction before wrote them) added in
                // one fixed order by every warp (the same rstd everywhere, every run); the chunks read x from there
#if NORM && MODE == 2
#error "NORM folds the RMSNorm into B2 (MODE 0) and MODE 3: B4's norm runs with its index collection"
#endif
#if MODE != 0 && MODE != 2 && MODE != 3
#error "MODE is 0 (B2), 2 (B4) or 3 (B4 over the share's own list)"
#endif
#ifndef RELEASE_LATE
#define RELEASE_LATE 0  // 1 (probe): griddepcontrol.launch_dependents once a program has stored its sums, not right
#endif                  // after its wait, so the next kernel's programs take no SM slot this grid's later programs need
#ifndef XBF16
#define XBF16 0  // 1: x, the residual, y and the normed input are bf16 (the runtime's bf16 models); B stays fp16,
#endif           // rounded from the fp32 x d sc as for fp16 x (its 2^-11 finer than bf16's 2^-8), so |x d sc| must stay
                 // within fp16's range (65504; the fp16 path's bound on the same product), not x itself
#if XBF16 && CHAIN
#error "XBF16: the GEMV's modes; the chain runs fp16"
#endif
#ifndef PROBE_XOR
#define PROBE_XOR 0  // measurement only (wrong results): 1 the arithmetic replaced by an XOR of the loaded words
#endif
#ifndef PROBE_HEADS
#define PROBE_HEADS 0  // measurement only (wrong results): 1 every chunk reads the first chunk's heads (not TYPE 8)
#endif
#ifndef PROBE_CUT
#define PROBE_CUT 0  // measurement only (wrong results; Q4_K, MODE 0): a part of the arithmetic left out, the loads kept:
#endif             // 1 the B zeroing (ACC < 16), 2 the A masks, 3 A's permutes and masks, 4 the scales' decode and B

typedef unsigned int u32;

// Programmatic dependent launch (sm_90): wait for the kernel before this one, then let the next
// one start its launch. Below sm_90 kernels are launched without it and this is empty.
__device__ __forceinline__ void pdl_wait_then_release() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#if !RELEASE_LATE
  asm volatile("griddepcontrol.launch_dependents;");
#endif
#endif
}

// x, the list and its count are written by the kernels before this one, which may still run
// while this grid starts (PDL): plain coherent loads, after pdl_wait_then_release(), not .nc.
__device__ __forceinline__ unsigned short load_x_bits(const unsigned short* p) {
  unsigned short v;
  asm volatile("ld.global.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ float load_f32(const float* p) {
  float v;
  asm volatile("ld.global.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ int load_int(const int* p) {
  int v;
  asm volatile("ld.global.s32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

#if CLUSTER
// Thread block clusters (sm_90): a barrier over the cluster's threads (release / acquire: shared
// memory written before it is visible to the cluster after it), this program's rank in its cluster
// (x fastest), and a float of rank q's shared memory at the address of `local` in this program's.
__device__ __forceinline__ void cluster_barrier() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

__device__ __forceinline__ u32 cluster_rank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

__device__ __forceinline__ float load_cluster_f32(const float* local, u32 q) {
  u32 remote;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"((u32)__cvta_generic_to_shared(local)), "r"(q));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
  return v;
}
#endif

__device__ __forceinline__ float f16_lo_to_f32(u32 bits) {  // the fp16 in bits 0-15
  float f;
  asm("{.reg .b16 lo, hi; mov.b32 {lo, hi}, %1; cvt.f32.f16 %0, lo;}" : "=f"(f) : "r"(bits));
  return f;
}

__device__ __forceinline__ float f16_hi_to_f32(u32 bits) {  // the fp16 in bits 16-31
  float f;
  asm("{.reg .b16 lo, hi; mov.b32 {lo, hi}, %1; cvt.f32.f16 %0, hi;}" : "=f"(f) : "r"(bits));
  return f;
}

__device__ __forceinline__ unsigned short f32_to_f16_bits(float v) {  // round to nearest even
  unsigned short bits;
  asm("{.reg .b16 h; cvt.rn.f16.f32 h, %1; mov.b16 %0, h;}" : "=h"(bits) : "f"(v));
  return bits;
}

// x, the residual and y in the activations' 16-bit type (XBF16: bf16, else fp16): to fp32 exactly, from fp32 rounded
// to nearest even.
__device__ __forceinline__ float x_to_f32(unsigned short bits) {
#if XBF16
  return __uint_as_float((u32)bits << 16);
#else
  return f16_lo_to_f32(bits);
#endif
}

__device__ __forceinline__ unsigned short f32_to_x_bits(float v) {
#if XBF16
  unsigned short bits;
  asm("{.reg .b16 h; cvt.rn.bf16.f32 h, %1; mov.b16 %0, h;}" : "=h"(bits) : "f"(v));
  return bits;
#else
  return f32_to_f16_bits(v);
#endif
}

// The normed input as the RMSNorm kernel writes it: x's type((x rstd) gamma), fp32 products (gamma fp32, the
// runtime's norm weights).
__device__ __forceinline__ unsigned short normed_x(unsigned short x, float gamma, float rstd) {
  return f32_to_x_bits(x_to_f32(x) * rstd * gamma);
}

// 16 bytes global -> shared without registers (through L2: x was written by the kernel before this one).
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((u32)__cvta_generic_to_shared(smem)), "l"(gmem)
               : "memory");
}

// Columns [first, hi) of x into xs[0 .. hi - first) (shared memory) by all threads of the program: 16-byte copies
// that hold no registers (x 16-byte aligned, first a multiple of 8), the tail one column at a time; complete after
// its barrier. (MODE 3 without NORM: the share's x in one round trip, not one a round of the kept list.)
__device__ __forceinline__ void copy_share(unsigned short* xs, const unsigned short* x, int first, int hi) {
  const int cols = max(hi - first, 0), vectors = cols >> 3;
  for (int u = threadIdx.x; u < vectors; u += 32 * WARPS) copy16_async(xs + 8 * u, x + first + 8 * u);
  for (int c = 8 * vectors + threadIdx.x; c < cols; c += 32 * WARPS) xs[c] = load_x_bits(x + first + c);
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();
}

#if NORM
// rstd of the RMSNorm over K inputs from the nsq partial sums of squares at sq (written by the kernel
// before this one: read after pdl_wait_then_release): lane l adds entries l, l + 32, ... in order (4 loads in
// flight at a time), then a butterfly, whose every lane ends with the same sum (a + b = b + a), so every warp
// of every program agrees.
__device__ __forceinline__ float norm_rstd(const float* sq, int nsq, int K, float eps) {
  const int lane = threadIdx.x & 31;
  float v = 0.0f;
  for (int base = 0; base < nsq; base += 32 * 4) {
    float part[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = base + 32 * u + lane;
      part[u] = i < nsq ? load_f32(sq + i) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) v += part[u];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return 1.0f / sqrtf(v / (float)K + eps);
}


__device__ __forceinline__ u32 normed_pair(u32 x, float g0, float g1, float rstd) {  // the two 16-bit x of a word
  return normed_x(x & 0xFFFFu, g0, rstd) | (u32)normed_x(x >> 16, g1, rstd) << 16;
}

// Columns [first, hi) of the normed input into xn[0 .. hi - first) (dynamic shared memory: gamma's share gs
// as fp32, then xn), by all threads of the program (x and gamma 16-byte aligned, first a multiple of 8). The
// copies of x and gamma fly while the sums of squares are added (no registers held for them); each thread
// then normalizes the 8-column vectors it copied, in place.
__device__ __forceinline__ void normed_share(unsigned short* xn, float* gs, const unsigned short* x,
                                             const float* gamma, const float* sq, int nsq, int K, float eps,
                                             int first, int hi) {
  const int cols = max(hi - first, 0), vectors = cols >> 3;
  for (int u = threadIdx.x; u < vectors; u += 32 * WARPS) {
    copy16_async(xn + 8 * u, x + first + 8 * u);
    copy16_async(gs + 8 * u, gamma + first + 8 * u);
    copy16_async(gs + 8 * u + 4, gamma + first + 8 * u + 4);
  }
  const float rstd = norm_rstd(sq, nsq, K, eps);
  asm volatile("cp.async.wait_all;" ::: "memory");
  for (int u = threadIdx.x; u < vectors; u += 32 * WARPS) {
    const uint4 a = reinterpret_cast<const uint4*>(xn)[u];
    const float4 b0 = reinterpret_cast<const float4*>(gs)[2 * u], b1 = reinterpret_cast<const float4*>(gs)[2 * u + 1];
    reinterpret_cast<uint4*>(xn)[u] = make_uint4(normed_pair(a.x, b0.x, b0.y, rstd), normed_pair(a.y, b0.z, b0.w, rstd),
                                                 normed_pair(a.z, b1.x, b1.y, rstd), normed_pair(a.w, b1.z, b1.w, rstd));
  }
  for (int c = 8 * vectors + threadIdx.x; c < cols; c += 32 * WARPS)
    xn[c] = normed_x(load_x_bits(x + first + c), __ldg(gamma + first + c), rstd);
  __syncthreads();
}
#endif

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ void mma_tile(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A lane's constants for decoding the 6-bit scale and min of its sub-block g from a head's words
// 1-3 (the 12 packed bytes q[0..11] of GGUF's Q4_K; jj = g % 4):
//   g < 4:  sc = q[jj] & 63,                        mn = q[jj + 4] & 63
//   g >= 4: sc = (q[jj + 8] & 15) | (q[jj] >> 6) << 4, mn = (q[jj + 8] >> 4) | (q[jj + 4] >> 6) << 4
// One byte permute per value puts the byte(s) it needs at bytes 0 (and 1), then masks that depend
// on the lane only: v = prmt -> ((v >> shift) & low_mask) | ((v >> 10) & high_mask).
struct ScaleDecoder {
  u32 sel_sc, sel_mn, shift_mn, low_mask, high_mask;
  __device__ explicit ScaleDecoder(int g) {
#if TYPE == 3
    // Q3_K's head (gpu_layout_q3k.py): byte g of words 0-1 at bytes 0 and 3, nibble g of word 2 at bit 0
    sel_sc = g | (g << 12);
    shift_mn = 4 * g;
    sel_mn = low_mask = high_mask = 0;
#elif TYPE == 2
    // Q2_K: bytes 2 g, 2 g + 1 of the 16 (the lane's half of them loaded: bytes 2 (g % 4), + 1) at bytes 0 and 1
    sel_sc = (2 * (g & 3)) | ((2 * (g & 3) + 1) << 4);
    sel_mn = shift_mn = low_mask = high_mask = 0;
#else
    const u32 jj = g & 3;
    if (g < 4) {
      sel_sc = jj;             // byte 0 = q[jj] (word 1)
      sel_mn = jj;             // byte 0 = q[jj + 4] (word 2)
      shift_mn = 0;
      low_mask = 63;
      high_mask = 0;
    } else {
      sel_sc = (4 + jj) | (jj << 4);  // byte 0 = q[jj + 8] (word 3), byte 1 = q[jj] (word 1)
      sel_mn = (4 + jj) | (jj << 4);  // byte 0 = q[jj + 8], byte 1 = q[jj + 4] (word 2)
      shift_mn = 4;
      low_mask = 15;
      high_mask = 48;
    }
#endif
  }
  // sc and mn as exact floats (OR into 2^23's mantissa, subtract 2^23)
  __device__ __forceinline__ void decode(const uint4& hd, float& sc, float& mn) const {
    const u32 vs = __byte_perm(hd.y, hd.w, sel_sc);
    const u32 vm = __byte_perm(hd.z, hd.w, sel_mn);
    const u32 isc = (vs & low_mask) | ((vs >> 10) & high_mask) | 0x4B000000u;
    const u32 imn = ((vm >> shift_mn) & low_mask) | ((vm >> 10) & high_mask) | 0x4B000000u;
    sc = __int_as_float(isc) - 8388608.0f;
    mn = __int_as_float(imn) - 8388608.0f;
  }
};

template <int OP>
__device__ __forceinline__ uint4 load16(const uint4* p) {
  uint4 v;
  if (OP == 1) {
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  } else if (OP == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  } else {
    v = __ldg(p);
  }
  return v;
}

#if TYPE == 3
// (a & M) | (b & ~M): one LOP3 (written as C, ptxas makes it an AND and a LOP3)
template <u32 M>
__device__ __forceinline__ u32 bit_select(u32 a, u32 b) {
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xE4;" : "=r"(r) : "r"(a), "r"(b), "n"(M));
  return r;
}
#endif

template <int OP>
__device__ __forceinline__ uint2 load8(const uint2* p) {
  uint2 v;
  if (OP == 1) {
    asm volatile("ld.global.cg.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  } else if (OP == 2) {
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  } else {
    v = __ldg(p);
  }
  return v;
}

// A lane's level words or head of one column: 16 bytes (uint4), Q3_K / Q2_K levels and Q2_K heads 8 (uint2)
template <int OP>
__device__ __forceinline__ uint4 load_vec(const uint4* p) {
  return load16<OP>(p);
}

template <int OP>
__device__ __forceinline__ uint2 load_vec(const uint2* p) {
  return load8<OP>(p);
}

#if TYPE == 3 || TYPE == 2
typedef uint2 LevelWords;
#define QV 2  // uint4 of a column in a level plane
#else
typedef uint4 LevelWords;
#define QV 4
#endif
#if TYPE == 2
typedef uint2 HeadWords;  // the lane's half of the 16 scale bytes
typedef u32 DWord;        // d | dmin << 16
#define HV 8              // HeadWords of a column's 64-byte head unit
#else
typedef uint4 HeadWords;
typedef unsigned short DWord;
#define HV 4
#endif

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// B2: the lines of the full chunk whose column 0 is at quants qc (plane 0 of superblock row r) and
// heads hc: 8 lines of each plane, 8 of heads (16 columns x 64 bytes); lanes 0-23 one line each.
__device__ __forceinline__ void prefetch_chunk(const uint4* qc, const uint4* hc, size_t plane_stride, int lane) {
  const int line = lane & 7, part = lane >> 3;
#if TYPE == 8
  prefetch_l2(qc + part * plane_stride + 8 * line);  // Q8_0: the four level planes, one a lane octet (d not)
  return;
#elif TYPE == 3 || TYPE == 2
  if (part == 0) prefetch_l2(qc + (line >> 2) * plane_stride + 8 * (line & 3));  // Q3_K / Q2_K: 4 lines a plane
  else if (part == 1) prefetch_l2(hc + 8 * line);
  return;
#endif
  if (part == 0) prefetch_l2(qc + 8 * line);
  else if (part == 1) prefetch_l2(qc + plane_stride + 8 * line);
  else if (part == 2) prefetch_l2(hc + 8 * line);
}

// The partial chunk at column j of a share ending at hi: slot i's column col[i] (j where ok[i] is false: past hi)
__device__ __forceinline__ void partial_columns(int j, int hi, const int* slot_pos, int* col, bool* ok) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    ok[i] = j + slot_pos[i] < hi;
    col[i] = ok[i] ? j + slot_pos[i] : j;
  }
}

struct Chunk {  // one lane's loads of one chunk: slot i's level words, head, x (16-bit) and (Q5_K) fifth bits
  LevelWords w[4];  // Q3_K / Q2_K: the low bit pairs
  HeadWords h[4];  // Q8_0: the level words of tile half 1 (tiles 8-15; w: tiles 0-7)
  unsigned short x[4];
#if TYPE == 5 || TYPE == 3
  u32 hb[4];  // Q3_K: the third bits
#elif TYPE == 6
  uint2 hb[4];  // words 2 g, 2 g + 1 of the slot's top bit pairs
  unsigned short d[4];
#elif TYPE == 8
  unsigned short d[4];  // d of the slot's block g
#elif TYPE == 2
  u32 d[4];  // d | dmin << 16
#endif
};

#if PAIRS && (TYPE == 2 || TYPE == 3 || TYPE == 6)
// The B registers of slots 0-3 in tile pairs from b01 / b23 (the fp16 pairs of slots 0, 1 and 2, 3): each slot's value
// alone in the lane's upper or lower half, zeros in the other, one byte permute each
__device__ __forceinline__ void half_b(u32 b01, u32 b23, bool upper, u32* out) {
  const u32 sel_lo = upper ? 0x1044u : 0x4410u, sel_hi = upper ? 0x3244u : 0x4432u;
  out[0] = __byte_perm(b01, 0u, sel_lo);
  out[1] = __byte_perm(b01, 0u, sel_hi);
  out[2] = __byte_perm(b23, 0u, sel_lo);
  out[3] = __byte_perm(b23, 0u, sel_hi);
}
#endif

#if PAIRS && (TYPE == 2 || TYPE == 3)
// The low-pair types' (Q2_K, Q3_K) tile pairs at ACC 8: pair (W, e, p) multiplies word(slot, W, p, e) (the lane's
// level word of tiles 8 W .. 8 W + 7 for parity p, brought to bytes e, e + 2 in its halves) masked for parity p (row g:
// mg[p], row g + 8: mg8[p]), tiles T0 = 8 W + 2 e + p and T1 = T0 + 4, into c[4 W + 2 e + p]; B: slot i's value of
// parity p (b01e .. b23o: slots 0, 1 / 2, 3 packed) alone in the lane's half (g / 2) % 2, a byte permute with zeros
template <typename Word>
__device__ __forceinline__ void parity_pairs_mma(float (*c)[4], u32 b01e, u32 b23e, u32 b01o, u32 b23o, int lane_g,
                                                 u32 mg0, u32 mg80, u32 mg1, u32 mg81, Word word) {
  u32 bp[2][4];
  half_b(b01e, b23e, (lane_g >> 1) & 1, bp[0]);
  half_b(b01o, b23o, (lane_g >> 1) & 1, bp[1]);
#pragma unroll
  for (int wi = 0; wi < 2; ++wi) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
      for (int hs = 0; hs < 2; ++hs) {  // slots 2 hs (k 2 t, 2 t + 1) and 2 hs + 1 (k 2 t + 8, 2 t + 9)
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          const u32 wa = word(2 * hs, wi, p, e), wb = word(2 * hs + 1, wi, p, e);
          const u32 mg = p ? mg1 : mg0, mg8 = p ? mg81 : mg80;
          mma_tile(c[4 * wi + 2 * e + p], wa & mg, wa & mg8, wb & mg, wb & mg8, bp[p][2 * hs], bp[p][2 * hs + 1]);
        }
      }
    }
  }
}
#endif

#if PAIRS && (TYPE == 4 || TYPE == 5 || TYPE == 6)
// The nibble types' (Q4_K, Q5_K, Q6_K) tile pairs: pair (q, e) multiplies tiles T0 = 4 q + e and T1 = T0 + 2 of the
// lane's 4 slots (2 an mma: slots 2 hs, k 2 t + j, and 2 hs + 1, k 2 t + 8 + j, for tile T_j) into c[2 q + e] (ACC 8)
// or c[e] (ACC 2: B zero outside lanes 2 q, 2 q + 1, a select a pair q and slot). The A registers of a slot from its
// level word q >> 8 e masked (row g: 0x000F000F, row g + 8: 0x00F000F0) and ORed with high(slot, q, e, row g + 8),
// the bits above the nibbles (Q5_K: the fifth bit at 4 / 8 and 20 / 24; Q6_K: the top pair at 4-5 / 8-9 and 20-21 /
// 24-25; Q4_K none); B from bp(e, slot): the slot's value in the lane's half g % 2 (the tile of the pair whose rows
// want column g)
template <typename High, typename BOf>
__device__ __forceinline__ void nibble_pairs_mma(float (*c)[4], const LevelWords* w, int lane_g, High high, BOf bp) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
      for (int hs = 0; hs < 2; ++hs) {  // slots 2 hs (k 2 t, 2 t + 1) and 2 hs + 1 (k 2 t + 8, 2 t + 9)
        const u32 wa = (&w[2 * hs].x)[q] >> (8 * e), wb = (&w[2 * hs + 1].x)[q] >> (8 * e);
        const u32 a0 = (wa & 0x000F000Fu) | high(2 * hs, q, e, 0), a1 = (wa & 0x00F000F0u) | high(2 * hs, q, e, 1);
        const u32 a2 = (wb & 0x000F000Fu) | high(2 * hs + 1, q, e, 0);
        const u32 a3 = (wb & 0x00F000F0u) | high(2 * hs + 1, q, e, 1);
#if ACC == 8
        mma_tile(c[2 * q + e], a0, a1, a2, a3, bp(e, 2 * hs), bp(e, 2 * hs + 1));
#else
        const bool mine = PROBE_CUT == 1 || (lane_g >> 1) == q;
        mma_tile(c[e], a0, a1, a2, a3, mine ? bp(e, 2 * hs) : 0u, mine ? bp(e, 2 * hs + 1) : 0u);
#endif
      }
    }
  }
}
#endif

// The chunk's 16 tiles into c[ACC][4] (tile m into c[m % ACC]; PAIRS: its pair's, program_sums); B at n = g (lane_g)
// for the lane's 4 slots;
// the min term into bias[0] (Q6_K: the -32 d sc x term of tile 2 g into bias[0], of tile 2 g + 1 into bias[1]).
__device__ __forceinline__ void compute(const Chunk& ch, float (*c)[4], float* bias, const ScaleDecoder& dec,
                                        int lane_g) {
#if PROBE_XOR
  u32 v = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    v ^= ch.w[i].x ^ ch.w[i].y
#if TYPE != 3 && TYPE != 2
         ^ ch.w[i].z ^ ch.w[i].w
#endif
         ^ ch.h[i].x ^ ch.h[i].y
#if TYPE != 2
         ^ ch.h[i].z ^ ch.h[i].w
#endif
         ^ ch.x[i]
#if TYPE == 5 || TYPE == 3
         ^ ch.hb[i]
#elif TYPE == 6
         ^ ch.hb[i].x ^ ch.hb[i].y ^ ch.d[i]
#elif TYPE == 8 || TYPE == 2
         ^ ch.d[i]
#endif
        ;
  bias[0] += (float)(v & 1u);
  return;
#endif
  const float xs[4] = {x_to_f32(ch.x[0]), x_to_f32(ch.x[1]), x_to_f32(ch.x[2]), x_to_f32(ch.x[3])};
#if TYPE == 6
  // lane g's scales: bytes 2 g (tile 2 g) and 2 g + 1 (tile 2 g + 1) of the 16: word g / 2, bits 16 (g % 2) ..
  float be[4], bo[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4& hv = ch.h[i];
    const u32 wv = (lane_g & 4) ? ((lane_g & 2) ? hv.w : hv.z) : ((lane_g & 2) ? hv.y : hv.x);
    const u32 pair = wv >> (16 * (lane_g & 1));  // scale 2 g in bits 0-7, 2 g + 1 in 8-15 (signed bytes)
    const float xd = xs[i] * f16_lo_to_f32(ch.d[i]);
    be[i] = xd * (float)((int)(pair << 24) >> 24);
    bo[i] = xd * (float)((int)(pair << 16) >> 24);
  }
  const u32 b01e = pack_f16x2(be[0], be[1]), b23e = pack_f16x2(be[2], be[3]);
  const u32 b01o = pack_f16x2(bo[0], bo[1]), b23o = pack_f16x2(bo[2], bo[3]);
  // the offset term from the same fp16 values the tensor cores multiply: y = sum (q - 32) b exactly as summed
  bias[0] += 32.0f * (f16_lo_to_f32(b01e) + f16_hi_to_f32(b01e) + f16_lo_to_f32(b23e) + f16_hi_to_f32(b23e));
  bias[1] += 32.0f * (f16_lo_to_f32(b01o) + f16_hi_to_f32(b01o) + f16_lo_to_f32(b23o) + f16_hi_to_f32(b23o));
#if PAIRS
  // a pair's tiles T_j = 4 q + e + 2 j have parity e: lane g's B is x d sc[2 g + e] (be / bo) in its half g % 2, the
  // fp16 values of b01e ... (the offset term's)
  u32 bpe[4], bpo[4];
  half_b(b01e, b23e, lane_g & 1, bpe);
  half_b(b01o, b23o, lane_g & 1, bpo);
  nibble_pairs_mma(c, ch.w, lane_g,
                   [&](int slot, int q, int e, int row8) -> u32 {
                     // top pairs: T0's byte 2 (q % 2) of word q / 2 (bits 2 e: row g, 4 + 2 e: row g + 8), T1's the
                     // byte after it, put at bytes 0 and 2 and shifted by 4 - 2 e: rows g at 4-5 / 20-21, g + 8 at
                     // 8-9 / 24-25
                     const int b0 = 2 * (q & 1);
                     const u32 z = __byte_perm((q >> 1) ? ch.hb[slot].y : ch.hb[slot].x, 0u,
                                               b0 | 0x40u | ((b0 + 1) << 8) | 0x4000u) << (4 - 2 * e);
                     return z & (row8 ? 0x03000300u : 0x00300030u);
                   },
                   [&](int e, int slot) { return e ? bpo[slot] : bpe[slot]; });
#endif
#elif TYPE == 3
  // lane g's scales s[2 g] (tile 2 g: byte g of words 0-1, bits 0-5) and s[2 g + 1] (its bits 6-7, then nibble g
  // of word 2), each s - 32 exactly (OR into 2^23's mantissa, subtract 2^23 + 32); d in word 3
  float be[4], bo[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4& hv = ch.h[i];
    const u32 v = __byte_perm(hv.x, hv.y, dec.sel_sc);  // byte g at bytes 0 and 3
    const u32 f = __funnelshift_r(v, hv.z >> dec.shift_mn, 30);
    const float se = __int_as_float((v & 63u) | 0x4B000000u) - 8388640.0f;
    const float so = __int_as_float((f & 63u) | 0x4B000000u) - 8388640.0f;
    const float xd = xs[i] * f16_lo_to_f32(hv.w);
    be[i] = xd * se;
    bo[i] = xd * so;
  }
  const u32 b01e = pack_f16x2(be[0], be[1]), b23e = pack_f16x2(be[2], be[3]);
  const u32 b01o = pack_f16x2(bo[0], bo[1]), b23o = pack_f16x2(bo[2], bo[3]);
  // the -4 offset from the same fp16 values the tensor cores multiply, per tile parity, as Q6_K's
  bias[0] += 4.0f * (f16_lo_to_f32(b01e) + f16_hi_to_f32(b01e) + f16_lo_to_f32(b23e) + f16_hi_to_f32(b23e));
  bias[1] += 4.0f * (f16_lo_to_f32(b01o) + f16_hi_to_f32(b01o) + f16_lo_to_f32(b23o) + f16_hi_to_f32(b23o));
  // the levels, per slot: word 0 / 1 (tiles 0-7, even / odd) from L0 and the third bits H, 2 / 3 (tiles 8-15) from
  // L1 and H >> 1; even tiles: byte u bits 0-2 row g, 4-6 row g + 8; odd: bits 2-4 row g, 6-7 + byte u + 1's bit 0
  // row g + 8 (bits 3 / 7 of an even byte and 1 / 5 of an odd one are another tile's, masked per tile)
  u32 lv[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const u32 hs = ch.hb[i] >> 1;
    lv[i][0] = bit_select<0x33333333u>(ch.w[i].x, ch.hb[i]);
    lv[i][1] = bit_select<0xCCCCCCCCu>(ch.w[i].x, ch.hb[i]);
    lv[i][2] = bit_select<0x33333333u>(ch.w[i].y, hs);
    lv[i][3] = bit_select<0xCCCCCCCCu>(ch.w[i].y, hs);
  }
#if PAIRS
  // word 2 W + p rotated by 8 e: its halves bytes (e, e + 1) and (e + 2, e + 3 mod 4), an odd tile's row g + 8 taking
  // bit 0 of the byte after its own
  parity_pairs_mma(c, b01e, b23e, b01o, b23o, lane_g, 0x00070007u, 0x00700070u, 0x001C001Cu, 0x01C001C0u,
                   [&](int slot, int wi, int p, int e) {
                     const u32 v = lv[slot][2 * wi + p];
                     return __funnelshift_r(v, v, 8 * e);
                   });
#endif
#elif TYPE == 2
  // lane g's scales and mins of tiles 2 g (byte 0 of v) and 2 g + 1 (byte 1): sc low nibble, mn high, converted by
  // I2FP (one instruction each; 2^23's mantissa takes an OR, an FADD and a constant ptxas rematerializes: 242
  // instructions a B2 chunk against 223); B = x d sc per tile parity, the min term x dmin mn per parity in fp32
  float be[4], bo[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const u32 v = __byte_perm(ch.h[i].x, ch.h[i].y, dec.sel_sc);
    const float sce = (float)(v & 15u);
    const float mne = (float)((v >> 4) & 15u);
    const float sco = (float)((v >> 8) & 15u);
    const float mno = (float)((v >> 12) & 15u);
    const float xd = xs[i] * f16_lo_to_f32(ch.d[i]), xm = xs[i] * f16_hi_to_f32(ch.d[i]);
    be[i] = xd * sce;
    bo[i] = xd * sco;
    bias[0] = fmaf(xm, mne, bias[0]);
    bias[1] = fmaf(xm, mno, bias[1]);
  }
  const u32 b01e = pack_f16x2(be[0], be[1]), b23e = pack_f16x2(be[2], be[3]);
  const u32 b01o = pack_f16x2(bo[0], bo[1]), b23o = pack_f16x2(bo[2], bo[3]);
#if PAIRS
  parity_pairs_mma(c, b01e, b23e, b01o, b23o, lane_g, 0x00030003u, 0x00300030u, 0x000C000Cu, 0x00C000C0u,
                   [&](int slot, int wi, int, int e) { return (&ch.w[slot].x)[wi] >> (8 * e); });
#endif
#elif TYPE == 8
  // B[k, g] = x_k d[g] (lane g's d: block g's); the -128 d x term of block g (rows 32 g ..) from the same fp16
  // values the tensor cores multiply, as Q6_K's
  float b[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) b[i] = xs[i] * f16_lo_to_f32(ch.d[i]);
  const u32 b01 = pack_f16x2(b[0], b[1]);
  const u32 b23 = pack_f16x2(b[2], b[3]);
  bias[0] += 128.0f * (f16_lo_to_f32(b01) + f16_hi_to_f32(b01) + f16_lo_to_f32(b23) + f16_hi_to_f32(b23));
#elif PROBE_CUT == 4
  // the heads' words folded into the bias (kept loaded), B = x
  u32 hx = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) hx ^= ch.h[i].x ^ ch.h[i].y ^ ch.h[i].z ^ ch.h[i].w;
  bias[0] += __int_as_float(hx & 0x3F800000u);
  const u32 b01 = ch.x[0] | ((u32)ch.x[1] << 16);
  const u32 b23 = ch.x[2] | ((u32)ch.x[3] << 16);
  (void)xs;
#else
  float b[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float sc, mn;
    dec.decode(ch.h[i], sc, mn);
    b[i] = xs[i] * f16_lo_to_f32(ch.h[i].x) * sc;
    bias[0] = fmaf(xs[i] * f16_hi_to_f32(ch.h[i].x), mn, bias[0]);
  }
#if PAIRS
  // slot i's B in the lane's half (g % 2: the tile of the pair whose rows want column g)
  const u32 half_mask = (lane_g & 1) ? 0xFFFF0000u : 0x0000FFFFu;
  u32 bp[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) bp[i] = pack_f16x2(b[i], b[i]) & half_mask;
  nibble_pairs_mma(c, ch.w, lane_g,
                   [&](int slot, int q, int e, int row8) -> u32 {
#if TYPE == 5
                     // fifth bits: byte q of the slot's word (bit s: tile 4 q + s row g, bit s + 4: row g + 8) as
                     // B << 4 | B << 18 (one multiply, no carries), shifted by e: T0's row g at bit 4, row g + 8 at 8,
                     // T1's (bits e + 2, e + 6) at 20 and 24, where each half's fp16 subnormal wants them
                     const u32 z = (__byte_perm(ch.hb[slot], 0u, 0x4440u | q) * 0x40010u) >> e;
                     return z & (row8 ? 0x01000100u : 0x00100010u);
#else
                     return 0u;
#endif
                   },
                   [&](int, int slot) { return bp[slot]; });
#else
  const u32 b01 = pack_f16x2(b[0], b[1]);
  const u32 b23 = pack_f16x2(b[2], b[3]);
#endif
#endif
#if !PAIRS
#pragma unroll
  for (int m = 0; m < 16; ++m) {
#if TYPE == 8
    // tile m: word (m / 2) % 4 of tile half m / 8 (w or h), bytes 2 (m % 2) (row g) and 2 (m % 2) + 1 (row g + 8);
    // one permute puts them for slots 0 / 1 (2 / 3) side by side, p = [row g, row g + 8] x 2 slots, and two more
    // make the fp16 pairs u 2^-24 (a zero high byte each): a0 / a2 row g, a1 / a3 row g + 8
    const uint4* wh = (m >> 3) ? ch.h : ch.w;
    const int q = (m >> 1) & 3;
    const u32 sel = (m & 1) ? 0x7632u : 0x5410u;
    const u32 p = __byte_perm((&wh[0].x)[q], (&wh[1].x)[q], sel);
    const u32 pq = __byte_perm((&wh[2].x)[q], (&wh[3].x)[q], sel);
    const u32 a0 = p & 0x00FF00FFu, a1 = __byte_perm(p, 0u, 0x4341u);
    const u32 a2 = pq & 0x00FF00FFu, a3 = __byte_perm(pq, 0u, 0x4341u);
#elif TYPE == 3
    // tile m: word 2 (m / 8) + m % 2 of lv, byte u = (m / 2) % 4 (odd: and byte u + 1 for row g + 8's top bit)
    const int q = 2 * (m >> 3) + (m & 1), u = (m >> 1) & 3, u1 = (m & 1) ? (u + 1) & 3 : u;
    const u32 sel = u | (u1 << 4) | ((4 + u) << 8) | ((4 + u1) << 12);
    const u32 p = __byte_perm(lv[0][q], lv[1][q], sel);
    const u32 pq = __byte_perm(lv[2][q], lv[3][q], sel);
    const u32 mg = (m & 1) ? 0x001C001Cu : 0x00070007u, mg8 = (m & 1) ? 0x01C001C0u : 0x00700070u;
    const u32 a0 = p & mg, a1 = p & mg8, a2 = pq & mg, a3 = pq & mg8;
    const u32 b01 = (m & 1) ? b01o : b01e, b23 = (m & 1) ? b23o : b23e;
#elif TYPE == 2
    // tile m: byte u = (m / 2) % 4 of word m / 8 (Q3_K's low pairs: even m row g bits 0-1, row g + 8 bits 4-5; odd
    // m bits 2-3, 6-7), no third bits
    const int u = (m >> 1) & 3;
    const u32 sel = u | (u << 4) | ((4 + u) << 8) | ((4 + u) << 12);
    const u32 p = __byte_perm((m >> 3) ? ch.w[0].y : ch.w[0].x, (m >> 3) ? ch.w[1].y : ch.w[1].x, sel);
    const u32 pq = __byte_perm((m >> 3) ? ch.w[2].y : ch.w[2].x, (m >> 3) ? ch.w[3].y : ch.w[3].x, sel);
    const u32 mg = (m & 1) ? 0x000C000Cu : 0x00030003u, mg8 = (m & 1) ? 0x00C000C0u : 0x00300030u;
    const u32 a0 = p & mg, a1 = p & mg8, a2 = pq & mg, a3 = pq & mg8;
    const u32 b01 = (m & 1) ? b01o : b01e, b23 = (m & 1) ? b23o : b23e;
#else
    const int q = m >> 2, sh = m & 3;
    const u32 sel = sh | (sh << 4) | ((4 + sh) << 8) | ((4 + sh) << 12);
    const u32 p = __byte_perm((&ch.w[0].x)[q], (&ch.w[1].x)[q], sel);
    const u32 pq = __byte_perm((&ch.w[2].x)[q], (&ch.w[3].x)[q], sel);
#endif
#if TYPE == 8 || TYPE == 3 || TYPE == 2  // a0-a3 above
#elif TYPE == 5
    // fifth bits: byte q of slots 0 / 1 (2 / 3) at bytes 0 and 2, shifted so bit sh lands at 4 (row g's fp16
    // subnormal q 2^-24: bit 4) and bit sh + 4 at 8 (row g + 8's, q 2^-20); +16 for the second slot
    const u32 selq = q | (q << 4) | ((4 + q) << 8) | ((4 + q) << 12);
    const u32 t01 = __byte_perm(ch.hb[0], ch.hb[1], selq) << (4 - sh);
    const u32 t23 = __byte_perm(ch.hb[2], ch.hb[3], selq) << (4 - sh);
    const u32 a0 = (p & 0x000F000Fu) | (t01 & 0x00100010u), a1 = (p & 0x00F000F0u) | (t01 & 0x01000100u);
    const u32 a2 = (pq & 0x000F000Fu) | (t23 & 0x00100010u), a3 = (pq & 0x00F000F0u) | (t23 & 0x01000100u);
#elif TYPE == 6
    // top bit pairs: byte (m / 2) % 4 of word m / 8 of slots 0 / 1 (2 / 3) at bytes 0 and 2, shifted by
    // 4 - 2 n (n = m % 2) so row g's pair lands at bits 4-5 and row g + 8's at 8-9 (+16 for the second slot)
    const int bq = (m >> 1) & 3, n = m & 1;
    const u32 selb = bq | (bq << 4) | ((4 + bq) << 8) | ((4 + bq) << 12);
    const u32 t01 = __byte_perm((m >> 3) ? ch.hb[0].y : ch.hb[0].x, (m >> 3) ? ch.hb[1].y : ch.hb[1].x, selb)
                    << (4 - 2 * n);
    const u32 t23 = __byte_perm((m >> 3) ? ch.hb[2].y : ch.hb[2].x, (m >> 3) ? ch.hb[3].y : ch.hb[3].x, selb)
                    << (4 - 2 * n);
    const u32 a0 = (p & 0x000F000Fu) | (t01 & 0x00300030u), a1 = (p & 0x00F000F0u) | (t01 & 0x03000300u);
    const u32 a2 = (pq & 0x000F000Fu) | (t23 & 0x00300030u), a3 = (pq & 0x00F000F0u) | (t23 & 0x03000300u);
    const u32 b01 = n ? b01o : b01e, b23 = n ? b23o : b23e;
#elif PROBE_CUT == 2
    const u32 a0 = p, a1 = p, a2 = pq, a3 = pq;
#elif PROBE_CUT == 3
    const u32 a0 = (&ch.w[0].x)[q], a1 = (&ch.w[1].x)[q], a2 = (&ch.w[2].x)[q], a3 = (&ch.w[3].x)[q];
    (void)p;
    (void)pq;
#else
    const u32 a0 = p & 0x000F000Fu, a1 = p & 0x00F000F0u, a2 = pq & 0x000F000Fu, a3 = pq & 0x00F000F0u;
#endif
#if ACC == 16
    mma_tile(c[m], a0, a1, a2, a3, b01, b23);
#else
    // tiles m, m + ACC, ... share c[m % ACC]; their wanted columns m / 2, m / 2 + ACC / 2, ... lie one in each class of
    // ACC / 2 lane groups, so only the other classes' lanes must add nothing to tile m (a lane of its own class
    // adds into a column that no tile of this accumulator wants): one select a class of tiles (16 / ACC of them)
    const bool mine = PROBE_CUT == 1 || (m / ACC) == (lane_g / (ACC / 2));
    mma_tile(c[m % ACC], a0, a1, a2, a3, mine ? b01 : 0u, mine ? b23 : 0u);
#endif
  }
#endif
}

// d of column col at dr + col D_STRIDE (Q6_K: (R, K) fp16; Q8_0: grouped, 32 fp16 a column; Q2_K: (R, K)
// d | dmin << 16)
#define D_STRIDE (TYPE == 8 ? 32 : 1)

#if TYPE == 6
typedef uint2 HighWord;  // the lane's top bit pairs of one column
#else
typedef u32 HighWord;  // (Q5_K) the lane's fifth bits of one column
#endif

// base's element `per_column` elements a column on for column col (0 <= col, col * per_column * sizeof(T) < 2^32: a
// row's arrays). OFFSETS32: the byte offset added as an unsigned 32-bit number (ptxas then adds it to the 64-bit base
// in two instructions instead of a 64-bit multiply-add and a shift pair: 3-13 % fewer instructions in a gathered loop,
// sm_90). On the H200 that made MODE_KEPT 2-5.5 % and the other types' B4 2-3 % faster, but Q4_K's collected B4 3 %
// slower on the 132 / 264 MB shapes (docs/RESULTS.md, twenty-sixth session), so that one (and the chain) keeps the
// signed form, the same SASS as before the change (the other types' high bits, hq, were indexed in size_t before: only
// builds with OFFSETS32 0 of Q3_K / Q5_K / Q6_K would differ, and none runs). x's gathered loads (load_x) would take
// 2-8 fewer instructions in the signed form (a review's SASS count, not measured on a GPU).
#ifndef OFFSETS32
#if CHAIN || (MODE == 2 && TYPE == 4)  // (the chain, SPQT_CHAIN=1, as it ran on the H200)
#define OFFSETS32 0
#else
#define OFFSETS32 1
#endif
#endif
template <typename T>
__device__ __forceinline__ const T* column_at(const T* base, int col, u32 per_column) {
#if OFFSETS32
  return reinterpret_cast<const T*>(reinterpret_cast<const char*>(base) + (u32)col * (per_column * (u32)sizeof(T)));
#else
  return base + col * (int)per_column;
#endif
}

// Weights of a chunk at columns col[i] (any valid columns): quants qr + col 4 (the lane's plane), heads hr + col 4
// (Q8_0: tile half 1's plane), (Q5_K, Q6_K) high bits hq + col 8, (Q6_K, Q8_0) d dr + col D_STRIDE.
__device__ __forceinline__ void load_gathered(Chunk& ch, const LevelWords* qr, const HeadWords* hr, const HighWord* hq,
                                              const DWord* dr, const int* col) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    ch.w[i] = load_vec<QLOAD>(column_at(qr, col[i], 4));
    ch.h[i] = load_vec<TYPE == 8 ? QLOAD : HLOAD>(column_at(hr, col[i], HV));
#if TYPE == 5 || TYPE == 6 || TYPE == 3
    ch.hb[i] = __ldg(column_at(hq, col[i], 8));
#endif
#if TYPE == 6 || TYPE == 8 || TYPE == 2
    ch.d[i] = __ldg(column_at(dr, col[i], D_STRIDE));
#endif
  }
}

__device__ __forceinline__ void load_x(Chunk& ch, const unsigned short* x, const int* col, const bool* ok) {
#pragma unroll
  for (int i = 0; i < 4; ++i) ch.x[i] = ok[i] ? load_x_bits(column_at(x, col[i], 1)) : (unsigned short)0;
}

// Weights of the full chunk whose slot 0 is at qp / hp / hqp / dp (slot i is 4 i columns on).
__device__ __forceinline__ void load_contiguous(Chunk& ch, const LevelWords* qp, const HeadWords* hp,
                                                const HighWord* hqp, const DWord* dp) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    ch.w[i] = load_vec<QLOAD>(qp + 16 * i);
    ch.h[i] = load_vec<TYPE == 8 ? QLOAD : HLOAD>(hp + 4 * HV * i);
#if TYPE == 5 || TYPE == 6 || TYPE == 3
    ch.hb[i] = __ldg(hqp + 32 * i);
#endif
#if TYPE == 6 || TYPE == 8 || TYPE == 2
    ch.d[i] = __ldg(dp + 4 * D_STRIDE * i);
#endif
  }
}

// The kept columns of [first, hi) in ascending order: their offsets k - first into off[0 ..) and their x (16-bit,
// x_at(k)) into xs; kept: |x_k| (times scale_k where scale is not null) > t, x_k in fp32 (collect()'s and
// rms_norm_collect's test). Each round of 32 WARPS columns: a ballot a warp, the warps' counts in shared memory
// (warp_kept), positions by prefix. Every thread of the program calls it; returns the count (the lists complete after
// its last barrier). MODE 3 and the chain's sparse stages. LANES (MODE 3): position p is stored at lane_order(p), so a
// lane's four slots of a chunk are four consecutive entries (one 8-byte load each of off and xs), and the list is padded
// to whole chunks with offset 0, x 0 (a padded slot reads column `first` and adds nothing).
__device__ __forceinline__ int lane_order(int p) { return (p & ~15) | ((p & 3) << 2) | ((p >> 2) & 3); }

template <bool LANES = false, typename Off, typename XAt>
__device__ __forceinline__ int list_kept(int first, int hi, float t, const float* scale, XAt x_at, Off* off,
                                         unsigned short* xs, int* warp_kept) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int total = 0;
  for (int base = first; base < hi; base += 32 * WARPS) {
    const int k = base + threadIdx.x;
    unsigned short v = 0;
    bool keep = false;
    if (k < hi) {
      v = x_at(k);
      const float a = fabsf(x_to_f32(v));
      keep = (scale ? a * __ldg(scale + k) : a) > t;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_kept[warp] = __popc(ballot);
    __syncthreads();
    int before = total, round = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      before += w < warp ? warp_kept[w] : 0;
      round += warp_kept[w];
    }
    if (keep) {
      const int at = before + __popc(ballot & ((1u << lane) - 1u));
      off[LANES ? lane_order(at) : at] = (Off)(k - first);
      xs[LANES ? lane_order(at) : at] = v;
    }
    total += round;
    __syncthreads();  // warp_kept free again; the lists written
  }
  if (LANES) {
    const int pad = total + threadIdx.x;
    if (pad < ((total + 15) & ~15)) {
      off[lane_order(pad)] = (Off)0;
      xs[lane_order(pad)] = 0;
    }
    __syncthreads();
  }
  return total;
}

// MODE 3's chunk at position at (a multiple of 16) of a list in lane order (list_kept<true>): lane (g, t) reads its
// four slots' offsets and x as one 8-byte load each; weights gathered from the share's first column's pointers.
__device__ __forceinline__ void load_kept_lanes(Chunk& ch, int at, int t, const unsigned short* off,
                                                const unsigned short* xs, const LevelWords* qf, const HeadWords* hf,
                                                const HighWord* hqf, const DWord* df) {
  const uint2 o = *reinterpret_cast<const uint2*>(off + at + 4 * t);
  const uint2 xv = *reinterpret_cast<const uint2*>(xs + at + 4 * t);
  const int col[4] = {(int)(o.x & 0xffffu), (int)(o.x >> 16), (int)(o.y & 0xffffu), (int)(o.y >> 16)};
  load_gathered(ch, qf, hf, hqf, df, col);
  ch.x[0] = (unsigned short)(xv.x & 0xffffu);
  ch.x[1] = (unsigned short)(xv.x >> 16);
  ch.x[2] = (unsigned short)(xv.y & 0xffffu);
  ch.x[3] = (unsigned short)(xv.y >> 16);
}

// The chunk at position at of a kept list (list_kept's off, xs for the share from first, kept entries): slot i's
// column and x (past the count: the chunk's first column, x = 0), its weights gathered.
template <typename Off>
__device__ __forceinline__ void load_kept_chunk(Chunk& ch, int at, int kept, int first, const Off* off,
                                                const unsigned short* xs, const int* slot_pos, const LevelWords* qr,
                                                const HeadWords* hr, const HighWord* hq, const DWord* dr) {
  int col[4];
  bool ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    ok[i] = at + slot_pos[i] < kept;
    col[i] = first + off[ok[i] ? at + slot_pos[i] : at];
  }
  load_gathered(ch, qr, hr, hq, dr, col);
#pragma unroll
  for (int i = 0; i < 4; ++i) ch.x[i] = ok[i] ? xs[at + slot_pos[i]] : (unsigned short)0;
}

// The program's 256 row sums over its warps, the min term subtracted, handed to store(i, sum) for row i < 256
// (after a barrier; rows_sum and bias_sum: the program's shared scratch). Tile m's wanted column n = m / 2 sits in
// lanes t = m / 4, register (m / 2) % 2 (row g) and 2 + (m / 2) % 2 (row g + 8); rows 16 m + g and 16 m + 8 + g;
// the row scales undo A's encoding.
template <typename Store>
__device__ __forceinline__ void program_sums(float (*c)[4], const float* bias, int warp, int g, int t,
                                             float (*rows_sum)[256], float (*bias_sum)[2][8], Store store) {
  // bias_sum[warp][tile parity (Q6_K, Q3_K, Q2_K; 0 otherwise)][32-row group]
#pragma unroll
  for (int e = 0; e < (TYPE == 6 || TYPE == 3 || TYPE == 2 ? 2 : 1); ++e) {
    float bsum = bias[e];
    bsum += __shfl_xor_sync(0xffffffffu, bsum, 1);
    bsum += __shfl_xor_sync(0xffffffffu, bsum, 2);
    if (t == 0) bias_sum[warp][e][g] = bsum;
  }
#if PAIRS && (TYPE == 2 || TYPE == 3)
  // pair (W, e, p) in c[4 W + 2 e + p]: its tiles' columns 4 W + e (T0 = 8 W + 2 e + p) and 4 W + e + 2 (T1 = T0 + 4)
  // sit in lanes t = 2 W and 2 W + 1, registers e (row g) and 2 + e (row g + 8); odd tiles' levels two bits higher
#pragma unroll
  for (int a = 0; a < 8; ++a) {
    const int wi = a >> 2, e = (a >> 1) & 1, p = a & 1;
    if ((t >> 1) == wi) {
      const int tile = 8 * wi + 2 * e + p + 4 * (t & 1);
      rows_sum[warp][16 * tile + g] = c[a][e] * (p ? 4194304.0f : 16777216.0f);
      rows_sum[warp][16 * tile + 8 + g] = c[a][2 + e] * (p ? 262144.0f : 1048576.0f);
    }
  }
#elif PAIRS
  // pair (q, e) (in c[2 q + e] at ACC 8, c[e] at ACC 2): its tiles' columns 2 q (T0 = 4 q + e) and 2 q + 1 (T1 =
  // T0 + 2) sit in lanes t = q, registers 0 / 2 (T0 rows g / g + 8) and 1 / 3 (T1)
#pragma unroll
  for (int a = 0; a < 8; ++a) {
    if ((a >> 1) == t) {
      const int t0 = 4 * (a >> 1) + (a & 1);
      const float* ca = c[ACC == 8 ? a : (a & 1)];
      rows_sum[warp][16 * t0 + g] = ca[0] * 16777216.0f;
      rows_sum[warp][16 * t0 + 8 + g] = ca[2] * 1048576.0f;
      rows_sum[warp][16 * (t0 + 2) + g] = ca[1] * 16777216.0f;
      rows_sum[warp][16 * (t0 + 2) + 8 + g] = ca[3] * 1048576.0f;
    }
  }
#else
#pragma unroll
  for (int m = 0; m < 16; ++m) {
    if ((m >> 2) == t) {
      const int e = (m >> 1) & 1;
#if TYPE == 3 || TYPE == 2
      // odd tiles' levels sit two bits higher in A (gpu_layout_q3k.py, gpu_layout_q2k.py)
      rows_sum[warp][16 * m + g] = c[m % ACC][e] * ((m & 1) ? 4194304.0f : 16777216.0f);
      rows_sum[warp][16 * m + 8 + g] = c[m % ACC][2 + e] * ((m & 1) ? 262144.0f : 1048576.0f);
#else
      rows_sum[warp][16 * m + g] = c[m % ACC][e] * 16777216.0f;
      rows_sum[warp][16 * m + 8 + g] = c[m % ACC][2 + e] * (TYPE == 8 ? 16777216.0f : 1048576.0f);
#endif
    }
  }
#endif
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += 32 * WARPS) {
    float v = 0.0f, bj = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      v += rows_sum[w][i];
      bj += bias_sum[w][TYPE == 6 || TYPE == 3 || TYPE == 2 ? (i >> 4) & 1 : 0][i >> 5];
    }
    store(i, v - bj);
  }
}

#if EPILOGUE >= 0
// Output row n of a finished tile from its sums over the shares (acc; SwiGLU: acc of the gate row, up of
// its up row): silu(acc) up (n < F), acc + res[n] (EPILOGUE 1) or acc (n < N), rounded to x's type into y[n].
__device__ __forceinline__ void finish_output(unsigned short* __restrict__ y, const unsigned short* __restrict__ res,
                                              int n, int N, int F, float acc, float up) {
#if EPILOGUE == 2
  const float out = acc / (1.0f + expf(-acc)) * up;
  const int limit = F;
#else
  float out = acc;
  const int limit = N;
#if EPILOGUE == 1
  if (n < N) out += x_to_f32(res[n]);
#endif
#endif
  if (n < limit) y[n] = f32_to_x_bits(out);
}
#endif

extern "C" __global__ void __launch_bounds__(32 * WARPS)
zigzag_q4k_gemv(const uint4* __restrict__ q, const uint4* __restrict__ h, const unsigned short* __restrict__ x,
                const int* __restrict__ idx, const int* __restrict__ count, float* __restrict__ part, int K,
                int NP, int per, int split, unsigned short* __restrict__ y, const unsigned short* __restrict__ res,
                int* __restrict__ counters, int N, int F, const u32* __restrict__ qh,
                const unsigned short* __restrict__ dq, const float* __restrict__ gamma,
                const float* __restrict__ sq, int nsq, float eps, const float* __restrict__ thr,
                const float* __restrict__ col_scale) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
#if CLUSTER && EPILOGUE == 2
  // a cluster's two grid columns 2 i, 2 i + 1: gate rows of superblock row i and their up rows, F / 256 further
  const int r = (blockIdx.x >> 1) + (blockIdx.x & 1) * (F >> 8), s = blockIdx.y;
#else
  const int r = blockIdx.x, s = blockIdx.y;
#endif
#if TYPE == 8
  // Q8_0 block row (r, col): the lane's tile half H at uint4 ((4 r + 2 H + g / 4) K + col) 4 + g % 4, H = 1 through
  // hr; its d (block g) at fp16 ((r / 4) K + col) 32 + 8 (r % 4) + g of h (gpu_layout_q8_0.py)
  const uint4* qr = q + (size_t)(4 * r + (g >> 2)) * K * 4 + (g & 3);
  const uint4* hr = qr + (size_t)K * 8;
  const HighWord* hq = reinterpret_cast<const HighWord*>(qh);  // unused
  const unsigned short* dr = reinterpret_cast<const unsigned short*>(h) + (size_t)(r >> 2) * K * 32 + (r & 3) * 8 + g;
#else
  // block (r, col): the lane's 16 level bytes at uint4 ((2 r + g / 4) K + col) 4 + g % 4 (two
  // planes; Q3_K its 8 bytes of low bit pairs at uint2 the same index); head uint4 ((r / 4) K + col) 4 + r % 4
  const LevelWords* qr = reinterpret_cast<const LevelWords*>(q) + (size_t)(2 * r + (g >> 2)) * K * 4 + (g & 3);
  // (Q2_K: the lane's 8 of the 16 bytes, uint2 2 (((r / 4) K + col) 4 + r % 4) + g / 4)
#if TYPE == 2
  const HeadWords* hr = reinterpret_cast<const HeadWords*>(h) + ((size_t)(r >> 2) * K * 4 + (r & 3)) * 2 + (g >> 2);
#else
  const HeadWords* hr = h + (size_t)(r >> 2) * K * 4 + (r & 3);
#endif
  // (Q5_K / Q6_K) the lane's high bits of column col: hq[8 col]; (Q6_K) its d: dr[col]
  const HighWord* hq = reinterpret_cast<const HighWord*>(qh) + (size_t)r * K * 8 + g;
  const DWord* dr = reinterpret_cast<const DWord*>(dq) + (size_t)r * K;
#endif
  const int slot_pos[4] = {t, 4 + t, 8 + t, 12 + t};
  const ScaleDecoder dec(g);
  float c[ACC][4];
#pragma unroll
  for (int m = 0; m < ACC; ++m) c[m][0] = c[m][1] = c[m][2] = c[m][3] = 0.0f;
  float bias[2] = {0.0f, 0.0f};
  Chunk ch;
#if MODE == 0
  const int first = s * per, hi = min(K, first + per);
  const int step = 16 * WARPS;
  int j = first + 16 * warp;
  const int full_end = hi - 15;  // chunk j lies wholly inside the share iff j < full_end
  // slot 0 of the lane's chunk: column j + t; pointers advance by a step of columns
  const LevelWords* qp = qr + (j + t) * 4;
  const HeadWords* hp = hr + (j + t) * HV;
  const unsigned short* xp = x + j + t;  // (NORM: reset below into the normed share)
  const HighWord* hqp = hq + (size_t)(j + t) * 8;
#if TYPE == 8
  const unsigned short* dp = dr + (j + t) * D_STRIDE;
#else
  const DWord* dp = dr + j + t;
#endif
  if (j < full_end) load_contiguous(ch, qp, hp, hqp, dp);
#if L2FIRST > 0
  // the warp's chunk a (column j + a step): quants of plane 0 at q0 + 4 a step, heads at h0 + 4 a step
  const uint4* q0 = q + (size_t)((TYPE == 8 ? 4 : 2) * r) * K * QV + (size_t)j * QV;
  const uint4* h0 = h + (size_t)(r >> 2) * K * 4 + (size_t)j * 4;
  const size_t plane_stride = (size_t)K * QV;
#pragma unroll 1
  for (int ahead = 1; ahead <= L2FIRST && j + ahead * step < full_end; ++ahead)
    prefetch_chunk(q0 + ahead * step * QV, h0 + ahead * step * 4, plane_stride, lane);
#endif
  pdl_wait_then_release();
#if NORM
  // dynamic shared memory, 6 bytes a column of the share (per): gamma's fp32, then the normed x (x's type)
  extern __shared__ __align__(16) float norm_smem[];
  unsigned short* x_normed = reinterpret_cast<unsigned short*>(norm_smem + per);
  normed_share(x_normed, norm_smem, x, gamma, sq, nsq, K, eps, first, hi);
  xp = x_normed + (j - first) + t;  // the chunks' x from the normed share
#endif
  for (; j < full_end; j += step) {
#pragma unroll
    for (int i = 0; i < 4; ++i) ch.x[i] = NORM ? xp[4 * i] : load_x_bits(xp + 4 * i);
    qp += step * 4;
    hp += (PROBE_HEADS && TYPE != 8) ? 0 : step * HV;
    hqp += step * 8;
    dp += step * D_STRIDE;
    xp += step;
#if PIPE
    Chunk next;
    if (j + step < full_end) load_contiguous(next, qp, hp, hqp, dp);
    compute(ch, c, bias, dec, g);
    ch = next;
#else
    compute(ch, c, bias, dec, g);
    if (j + step < full_end) load_contiguous(ch, qp, hp, hqp, dp);
#endif
  }
  if (j < hi) {  // the share's last, partial chunk (K or the share not a multiple of 16)
    int col[4];
    bool ok[4];
    partial_columns(j, hi, slot_pos, col, ok);
    load_gathered(ch, qr, hr, hq, dr, col);
#if NORM
#pragma unroll
    for (int i = 0; i < 4; ++i) ch.x[i] = ok[i] ? x_normed[col[i] - first] : (unsigned short)0;
#else
    load_x(ch, x, col, ok);
#endif
    compute(ch, c, bias, dec, g);
  }
#elif MODE == 3
  // dynamic shared memory, 6 bytes a column of the share: NORM: gamma's share fp32 (then, once normed_share has used
  // it, the kept offsets and their x, 2 bytes a column each), the normed share (x's type); else the share of x, the
  // kept offsets and their x. Nothing is loaded before the wait: which weights a chunk reads depends on x.
  const int first = s * per, hi = min(K, first + per);
  extern __shared__ __align__(16) float share_smem[];
  pdl_wait_then_release();
#if NORM
  unsigned short* x_normed = reinterpret_cast<unsigned short*>(share_smem + per);
  normed_share(x_normed, share_smem, x, gamma, sq, nsq, K, eps, first, hi);
  unsigned short* kept_off = reinterpret_cast<unsigned short*>(share_smem);  // over gamma's, read no more
  auto x_at = [&](int k) { return x_normed[k - first]; };
#else
  unsigned short* x_share = reinterpret_cast<unsigned short*>(share_smem);
  copy_share(x_share, x, first, hi);
  unsigned short* kept_off = x_share + per;
  auto x_at = [&](int k) { return x_share[k - first]; };
#endif
  unsigned short* kept_x = kept_off + per;
  __shared__ int warp_kept[WARPS];
  // per is a multiple of 16 WARPS (zigzag_cuda.share): the list padded to whole chunks stays within its per entries,
  // and load_kept_lanes' 8-byte reads are aligned
  const int kept = list_kept<true>(first, hi, load_f32(thr), col_scale, x_at, kept_off, kept_x, warp_kept);
  const int step = 16 * WARPS;
  const LevelWords* qf = qr + first * 4;
  const HeadWords* hf = hr + first * HV;
  const HighWord* hqf = hq + (size_t)first * 8;
  const DWord* df = dr + first * D_STRIDE;
  auto kept_chunk = [&](int at, Chunk& into) { load_kept_lanes(into, at, t, kept_off, kept_x, qf, hf, hqf, df); };
  int jj = 16 * warp;
#if PIPE
  if (jj < kept) kept_chunk(jj, ch);
  for (; jj < kept; jj += step) {
    Chunk next;
    if (jj + step < kept) kept_chunk(jj + step, next);
    compute(ch, c, bias, dec, g);
    ch = next;
  }
#else
  for (; jj < kept; jj += step) {
    kept_chunk(jj, ch);
    compute(ch, c, bias, dec, g);
  }
#endif
#else
  // B4: the list entries of a step are read one step ahead (PIPE 1: two steps ahead, and the next
  // step's weights are loaded before this step's arithmetic), so no load waits on another
  pdl_wait_then_release();
  const int n = min(load_int(count), K);
  const int stride = 16 * WARPS * split;
  int j = s * 16 * WARPS + 16 * warp;
  int entry[4];  // list entries of step j (PIPE 1: of step j + stride)
  auto read_entries = [&](int jj) {
#pragma unroll
    for (int i = 0; i < 4; ++i) entry[i] = load_int(idx + min(jj + slot_pos[i], K - 1));
  };
  // columns of step jj from its entries: past the count (entries never written) column 0, x = 0
  auto columns = [&](int jj, int* col, bool* ok) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      ok[i] = jj + slot_pos[i] < n;
      col[i] = (ok[i] && entry[i] >= 0 && entry[i] < K) ? entry[i] : 0;
    }
  };
  int col[4];
  bool ok[4];
  if (j < n) read_entries(j);
#if PIPE
  if (j < n) {
    columns(j, col, ok);
    load_gathered(ch, qr, hr, hq, dr, col);
    load_x(ch, x, col, ok);
    read_entries(j + stride);
  }
  for (; j < n; j += stride) {
    Chunk next;
    if (j + stride < n) {
      int ncol[4];
      bool nok[4];
      columns(j + stride, ncol, nok);
      load_gathered(next, qr, hr, hq, dr, ncol);
      load_x(next, x, ncol, nok);
      read_entries(j + 2 * stride);
    }
    compute(ch, c, bias, dec, g);
    ch = next;
  }
#else
  for (; j < n; j += stride) {
    columns(j, col, ok);
    load_gathered(ch, qr, hr, hq, dr, col);
    load_x(ch, x, col, ok);
    if (j + stride < n) read_entries(j + stride);
    compute(ch, c, bias, dec, g);
  }
#endif
#endif
  __shared__ float rows_sum[WARPS][256];
  __shared__ float bias_sum[WARPS][2][8];
#if CLUSTER
  __shared__ float tile_sum[256];
  program_sums(c, bias, warp, g, t, rows_sum, bias_sum, [&](int i, float v) { tile_sum[i] = v; });
#else
  program_sums(c, bias, warp, g, t, rows_sum, bias_sum, [&](int i, float v) { part[(size_t)s * NP + 256 * r + i] = v; });
#endif
#if RELEASE_LATE && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");  // after the stores (the next kernel's wait still
                                                                  // waits for this grid's end)
#endif
#if CLUSTER
  // Rank 0 (the gate program of share 0) reads every rank's sums after the first barrier; the second keeps
  // each program's shared memory alive until it has. Ranks: share s = rank s (SwiGLU: gate 2 s, up 2 s + 1).
  cluster_barrier();
  if (cluster_rank() == 0) {
    for (int i = threadIdx.x; i < 256; i += 32 * WARPS) {
      const int n = 256 * r + i;
      float acc = 0.0f, up = 0.0f;
#if EPILOGUE == 2
      for (int sh = 0; sh < split; ++sh) {
        acc += load_cluster_f32(tile_sum + i, 2 * sh);
        up += load_cluster_f32(tile_sum + i, 2 * sh + 1);
      }
#else
      for (int sh = 0; sh < split; ++sh) acc += load_cluster_f32(tile_sum + i, sh);
#endif
      finish_output(y, res, n, N, F, acc, up);
    }
  }
  cluster_barrier();
#elif EPILOGUE >= 0
  // Output tile (256 rows of y) finished by the program whose arrival completes it: SPLIT programs
  // of its superblock row (SwiGLU, F a multiple of 256: also the SPLIT of the row holding its up
  // rows F + 256 tile ...). Release: every thread fences its partials before the barrier and the
  // arrival; acquire: the finisher fences after it. The sum runs over the shares in order
  // (deterministic; the atomic only elects who adds).
  __shared__ int finisher;
  __threadfence();
  __syncthreads();
#if EPILOGUE == 2
  const int tile = r < F / 256 ? r : r - F / 256;
  const int target = 2 * split;
#else
  const int tile = r;
  const int target = split;
#endif
  if (threadIdx.x == 0) finisher = atomicAdd(counters + tile, 1) == target - 1;
  __syncthreads();
  if (!finisher) return;
  __threadfence();
  if (threadIdx.x == 0) counters[tile] = 0;  // zero for the next launch
  for (int i = threadIdx.x; i < 256; i += 32 * WARPS) {
    const int n = 256 * tile + i;
    float acc = 0.0f, up = 0.0f;
#pragma unroll 8
    for (int sh = 0; sh < split; ++sh) acc += __ldcg(part + (size_t)sh * NP + n);
#if EPILOGUE == 2
#pragma unroll 8
    for (int sh = 0; sh < split; ++sh) up += __ldcg(part + (size_t)sh * NP + F + n);
#endif
    finish_output(y, res, n, N, F, acc, up);
  }
#endif
}

#if CHAIN
// ---- The chain (issue 14): a decode step's layers in ONE persistent launch ----
// A launch per map pays its fixed costs (start, tail, the reduction's launch) in every map; here a grid of programs
// that all fit on the GPU at once walks the work items of every stage in order: item i of the chain goes to
// program i % gridDim.x, stage by stage. A GEMV stage's item (r, s) = superblock row r = i % rows, share s = i / rows
// (the launched grid's order); an attention stage's item (h, p) = query head h = i % H, its key blocks p, p + P, ....
// A program streams an item's weights (its first chunk into registers, the rest of the share asked of L2 when
// CHAIN_PREFETCH; an attention item its cached keys and values) BEFORE it waits for the stage's input: the chain's
// `done` counter of the stage it reads from has counted every output tile (head) of that stage. The last program to
// arrive at an output tile (arrival counters as EPILOGUE >= 0) finishes it: the sum over the shares in order
// (deterministic), the epilogue (plain, residual, SwiGLU), its sums of squares (sq_out, the next stage's RMSNorm),
// then counts it in done. A sparse GEMV stage lists its share's kept inputs in shared memory first (list_kept).
// Waiting only on earlier items of programs that are all resident cannot deadlock: the grid fits the GPU at once
// (chain.py sizes it by the occupancy and launches it cooperative, which fails rather than run it otherwise). Data
// written in this launch (x, the residual, partials, sums of squares, q|k|v) is read through L2 (ld.cg), never L1
// (not coherent across SMs). Q4_K, fp16.
#if TYPE != 4 || MODE != 0 || EPILOGUE != -1 || NORM || CLUSTER
#error "CHAIN: Q4_K, MODE 0, no compile-time epilogue, norm or cluster (the stages carry them)"
#endif
#if 256 % (32 * WARPS)
#error "CHAIN: 1, 2, 4 or 8 warps (a finisher's threads share a tile's 256 outputs evenly)"
#endif
#ifndef CHAIN_BLOCKS
#define CHAIN_BLOCKS 1  // programs an SM must hold at once (__launch_bounds__: caps the registers)
#endif
#ifndef CHAIN_PREFETCH
#define CHAIN_PREFETCH 1  // 1: an item's whole share of levels and heads asked of L2 (sm_90 bulk prefetch) before the wait
#endif

struct GemvStage {  // y = W x and its finish (chain.py packs it)
  const uint4* q;             // levels (rows, 2, K, 16) int32, kernel layout
  const uint4* h;             // grouped heads (ceil(rows / 4), K, 4, 4) int32
  const unsigned short* x;    // input (K,) fp16 (the folded norm's input where gamma)
  unsigned short* y;          // output (N,) fp16; SwiGLU (F,)
  const unsigned short* res;  // residual (N,) fp16 (epilogue 1; may be y: each row read, then written, by one thread)
  float* part;                // partial sums (split, NP) fp32
  int* counters;              // arrivals a superblock row (rows,) int32, zero before and after
  const float* gamma;         // the RMSNorm's weights (K,) fp32, or null: x used as it is
  const float* sq_in;         // sums of squares of x (nsq_in,) fp32 (with gamma)
  float* sq_out;              // sums of squares of y, one an output tile, or null
  const float* threshold;     // () fp32: sparse (B4 inside): only the share's columns k with |x_k| (scale_k) > t
  const float* scale;         // (K,) fp32 per-input scale (WINA) or null                  (null: dense, B2)
  int K, NP, per, split, N, F, epilogue, rows, nsq_in;
  // epilogue 0 plain, 1 residual, 2 SwiGLU (gate rows then up rows, F = N / 2 a multiple of 256); items rows x split
};

struct AttentionStage {  // one decode token's RoPE, KV-cache write and attention (fused.py's decode attention)
  const unsigned short* qkv;  // (H + 2 HKV) hd fp16: the q|k|v stage's output
  const float* table;         // RoPE (L_max, hd) fp32: the cos of the hd / 2 frequencies, then their sin
  const long long* pos;       // the token's position (written before the launch)
  unsigned short* cache_k;    // (HKV, L, hd) fp16: rows below pos cached by earlier steps; row pos written here
  unsigned short* cache_v;
  unsigned short* out;        // (H hd) fp16
  float* part;                // per head ATTN_SLOTS block sums (hd fp32 each)
  float* ml;                  // per head ATTN_SLOTS (max, sum) pairs
  int* counters;              // arrivals a head (H,), zero before and after
  int H, HKV, L, length, programs;  // length: keys attended at most (> pos); items H x programs
  float scale;
};

struct ChainStage {  // 168 bytes (chain.py packs it)
  int kind;         // 0 GEMV, 1 attention
  int items;        // work items (GEMV rows x split, attention H x programs)
  int tiles;        // outputs counted in done when finished: GEMV output tiles (ceil(N / 256), SwiGLU F / 256), heads
  int after;        // the stage whose output this one reads (-1: written before the launch)
  int after_tiles;  // its tiles
  int pad[3];
  union {
    GemvStage gemv;
    AttentionStage attn;
  };
};
static_assert(sizeof(ChainStage) == 168, "chain.py packs ChainStage in 168 bytes");

__device__ __forceinline__ unsigned short load_x_l2(const unsigned short* p) {
  unsigned short v;
  asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ int load_relaxed(const int* p) {  // no L1 invalidation (an acquire load does one)
  int v;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

#ifndef CHAIN_FENCE
#define CHAIN_FENCE 0  // 1 (probe): release / acquire operations (fence.acq_rel, atom.release, red.release)
#endif                 // where 0 uses __threadfence (fence.sc.gpu: MEMBAR.SC, ordered against every SC fence)

__device__ __forceinline__ void fence_acquire() {  // after a strong read that saw the count: the acquire pattern
#if CHAIN_FENCE
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
#else
  __threadfence();
#endif
}

__device__ __forceinline__ void count_release(int* p) {  // +1, releasing what the program wrote (after its barrier)
#if CHAIN_FENCE
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(p) : "memory");
#else
  __threadfence();
  atomicAdd(p, 1);
#endif
}

// +1, releasing the program's writes (after its barrier); whether this was the `last` arrival, which then acquires
// every other arrival's writes
__device__ __forceinline__ bool arrive(int* p, int last) {
#if CHAIN_FENCE
  int old;
  asm volatile("atom.release.gpu.global.add.s32 %0, [%1], 1;" : "=r"(old) : "l"(p) : "memory");
  if (old == last) fence_acquire();  // only the last arrival reads the others' writes
  return old == last;
#else
  __threadfence();
  const bool is_last = atomicAdd(p, 1) == last;
  if (is_last) __threadfence();
  return is_last;
#endif
}

#ifndef CHAIN_FINISH
#define CHAIN_FINISH 1  // a finisher sums all its outputs in one pass over the shares, loads in flight together (0: one
                        // output at a time, the shares in turn: same sums; 654 us more a 7B step, fourteenth session)
#endif
#ifndef CHAIN_SLEEP
#define CHAIN_SLEEP 100  // ns a waiting program sleeps between two polls (0: none): keeps the polls of every
#endif                   // waiting program off the L2 slice that holds the counter, which streams weights too

__device__ __forceinline__ void bulk_prefetch_l2(const void* p, u32 bytes) {  // 16-byte aligned, bytes % 16 == 0
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// x of slot columns col (ok: inside the share), normed (gamma non-null) as the RMSNorm kernel writes it
__device__ __forceinline__ unsigned short chain_x(const unsigned short* x, const float* gamma, float rstd, int col,
                                                  bool ok) {
  if (!ok) return 0;
  const unsigned short v = load_x_l2(x + col);
  return gamma ? normed_x(v, __ldg(gamma + col), rstd) : v;
}

// rstd from the nsq sums of squares at sq, through L2, every lane adding them in the same order
__device__ __forceinline__ float chain_rstd(const float* sq, int nsq, int K, float eps) {
  const int lane = threadIdx.x & 31;
  float v = 0.0f;
  for (int i = lane; i < nsq; i += 32) v += __ldcg(sq + i);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return 1.0f / sqrtf(v / (float)K + eps);
}

#ifndef CHAIN_NOWAIT
#define CHAIN_NOWAIT 0  // 1 (probe, wrong outputs): no stage waits for its input (the items' own time)
#endif
// Wait until stage cs.after has finished all its tiles: thread 0 polls (relaxed, a sleep between polls), then
// fence_acquire (the acquire of the finishers' count_release), then the program's barrier.
__device__ __forceinline__ void wait_input(const ChainStage& cs, const int* done) {
  if (cs.after >= 0 && !CHAIN_NOWAIT) {
    if (threadIdx.x == 0) {
      while (load_relaxed(done + cs.after) < cs.after_tiles) {
#if CHAIN_SLEEP
        __nanosleep(CHAIN_SLEEP);
#endif
      }
      fence_acquire();
    }
    __syncthreads();
  }
}

// Count one finished tile of `stage` in done after the program's stores: the barrier orders them before thread 0's
// count_release (cumulative at GPU scope), which releases them (the waiters' fence_acquire acquires).
__device__ __forceinline__ void count_done(int* done, int stage) {
  __syncthreads();
  if (threadIdx.x == 0) count_release(done + stage);
}

#ifndef CHAIN_SHARE
#define CHAIN_SHARE 4096  // columns a sparse stage's share may hold (its kept list in shared memory)
#endif

__device__ __forceinline__ void gemv_item(const ChainStage& cs, int stage, int item, int* done, float eps,
                                          float (*rows_sum)[256], float (*bias_sum)[2][8], float* warp_sq,
                                          int* finisher, int* kept_col, unsigned short* kept_x, int* warp_kept) {
  const GemvStage& st = cs.gemv;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int r = item % st.rows, s = item / st.rows, K = st.K;
  const LevelWords* qr = reinterpret_cast<const LevelWords*>(st.q) + (size_t)(2 * r + (g >> 2)) * K * 4 + (g & 3);
  const HeadWords* hr = st.h + (size_t)(r >> 2) * K * 4 + (r & 3);
  const int slot_pos[4] = {t, 4 + t, 8 + t, 12 + t};
  const ScaleDecoder dec(g);
  float c[ACC][4];
#pragma unroll
  for (int m = 0; m < ACC; ++m) c[m][0] = c[m][1] = c[m][2] = c[m][3] = 0.0f;
  float bias[2] = {0.0f, 0.0f};
  Chunk ch;
  const int first = s * st.per, hi = min(K, first + st.per);
  const int step = 16 * WARPS;
  int j = first + 16 * warp;
  const int full_end = hi - 15;
  const LevelWords* qp = qr + (j + t) * 4;
  const HeadWords* hp = hr + (j + t) * HV;
  if (st.threshold) {  // sparse: the share's kept columns, in order, 16 a chunk (B4's gathered loads)
    wait_input(cs, done);
    const float rstd = st.gamma ? chain_rstd(st.sq_in, st.nsq_in, K, eps) : 0.0f;
    const int kept = list_kept(first, hi, *st.threshold, st.scale,
                               [&](int k) { return chain_x(st.x, st.gamma, rstd, k, true); }, kept_col, kept_x,
                               warp_kept);
    for (int jj = 16 * warp; jj < kept; jj += step) {
      load_kept_chunk(ch, jj, kept, first, kept_col, kept_x, slot_pos, qr, hr, nullptr, nullptr);
      compute(ch, c, bias, dec, g);
    }
    j = hi;  // no dense chunks
  } else {
    if (j < full_end) load_contiguous(ch, qp, hp, nullptr, nullptr);
#if CHAIN_PREFETCH
    if (threadIdx.x == 0 && hi > first) {  // the share's two level planes and its heads' 64-byte units
      const u32 bytes = 64u * (u32)(hi - first);
      bulk_prefetch_l2(st.q + ((size_t)(2 * r) * K + first) * 4, bytes);
      bulk_prefetch_l2(st.q + ((size_t)(2 * r + 1) * K + first) * 4, bytes);
      bulk_prefetch_l2(st.h + ((size_t)(r >> 2) * K + first) * 4, bytes);
    }
#endif
    wait_input(cs, done);
  }
  const float rstd = st.gamma && !st.threshold ? chain_rstd(st.sq_in, st.nsq_in, K, eps) : 0.0f;
  // zigzag_q4k_gemv's B2 loop, x through L2 (normed as read): written out again, since one helper for both loops
  // changed both kernels' SASS (PIPE 1 and Q6_K's loops scheduled differently), which the GPU has not measured
  for (; j < full_end; j += step) {
#pragma unroll
    for (int i = 0; i < 4; ++i) ch.x[i] = chain_x(st.x, st.gamma, rstd, j + slot_pos[i], true);
    qp += step * 4;
    hp += step * HV;
#if PIPE
    Chunk next;
    if (j + step < full_end) load_contiguous(next, qp, hp, nullptr, nullptr);
    compute(ch, c, bias, dec, g);
    ch = next;
#else
    compute(ch, c, bias, dec, g);
    if (j + step < full_end) load_contiguous(ch, qp, hp, nullptr, nullptr);
#endif
  }
  if (j < hi) {  // the share's last, partial chunk
    int col[4];
    bool ok[4];
    partial_columns(j, hi, slot_pos, col, ok);
    load_gathered(ch, qr, hr, nullptr, nullptr, col);
#pragma unroll
    for (int i = 0; i < 4; ++i) ch.x[i] = chain_x(st.x, st.gamma, rstd, col[i], ok[i]);
    compute(ch, c, bias, dec, g);
  }
  float* part = st.part;
  const int NP = st.NP;
  program_sums(c, bias, warp, g, t, rows_sum, bias_sum, [&](int i, float v) { part[(size_t)s * NP + 256 * r + i] = v; });
  // arrival: the partials released (barrier, then thread 0's arrive), the tile's last program elected; it acquires
  // the others' partials
  __syncthreads();
  const int half = st.F >> 8;
  const int tile = (st.epilogue == 2 && r >= half) ? r - half : r;
  const int target = st.epilogue == 2 ? 2 * st.split : st.split;
  if (threadIdx.x == 0) {
    *finisher = arrive(st.counters + tile, target - 1);
  }
  __syncthreads();
  if (*finisher) {
    if (threadIdx.x == 0) st.counters[tile] = 0;  // zero for the next use
    const int limit = st.epilogue == 2 ? st.F : st.N;
    float sq = 0.0f;
#if CHAIN_FINISH
    // every output of the thread summed in one pass over the shares (their loads in flight together); the same
    // order of additions for each output as below, so the same bits
    constexpr int OUTS = 256 / (32 * WARPS);
    float accs[OUTS], ups[OUTS];
#pragma unroll
    for (int o = 0; o < OUTS; ++o) accs[o] = ups[o] = 0.0f;
    const float* tile_part = part + 256 * tile + threadIdx.x;
#pragma unroll 4
    for (int sh = 0; sh < st.split; ++sh) {
#pragma unroll
      for (int o = 0; o < OUTS; ++o) {
        accs[o] += __ldcg(tile_part + (size_t)sh * NP + 32 * WARPS * o);
        if (st.epilogue == 2) ups[o] += __ldcg(tile_part + (size_t)sh * NP + st.F + 32 * WARPS * o);
      }
    }
#pragma unroll
    for (int o = 0; o < OUTS; ++o) {
      const int n = 256 * tile + threadIdx.x + 32 * WARPS * o;
      const float acc = accs[o], up = ups[o];
#else
    for (int i = threadIdx.x; i < 256; i += 32 * WARPS) {
      const int n = 256 * tile + i;
      float acc = 0.0f, up = 0.0f;
#pragma unroll 8
      for (int sh = 0; sh < st.split; ++sh) acc += __ldcg(part + (size_t)sh * NP + n);
      if (st.epilogue == 2) {
#pragma unroll 8
        for (int sh = 0; sh < st.split; ++sh) up += __ldcg(part + (size_t)sh * NP + st.F + n);
      }
#endif
      if (n < limit) {
        float out = acc;
        if (st.epilogue == 2) out = acc / (1.0f + expf(-acc)) * up;
        else if (st.epilogue == 1) out += f16_lo_to_f32(load_x_l2(st.res + n));
        const unsigned short bits = f32_to_f16_bits(out);
        st.y[n] = bits;
        const float stored = f16_lo_to_f32(bits);
        sq += stored * stored;
      }
    }
    if (st.sq_out) {  // the tile's sum of squares in a fixed order: lanes by butterfly, then warps in order
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
      if (lane == 0) warp_sq[warp] = sq;
      __syncthreads();
      if (threadIdx.x == 0) {
        float total = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) total += warp_sq[w];
        st.sq_out[tile] = total;
      }
    }
    count_done(done, stage);  // the tile's outputs and sums of squares released
  }
  __syncthreads();  // the shared scratch and *finisher free for the next item
}

#ifndef CHAIN_HD
#define CHAIN_HD 128  // the attention's head dim: a multiple of 64, at most 256
#endif
#if CHAIN_HD % 64 || CHAIN_HD > 256
#error "CHAIN_HD: a multiple of 64, at most 256"
#endif
#define ATTN_BLOCK 64  // keys a block (fused.ATTN_BLOCK_N)
#define ATTN_SLOTS 32  // blocks a head at most (fused.ATTN_MAX_SPLITS)
#define HE (CHAIN_HD / 32)  // elements of a head a lane holds: e = lane + 32 i; i and i + HE / 2 rotate together

__device__ __forceinline__ float f16_round(float v) { return f16_lo_to_f32(f32_to_f16_bits(v)); }

// The softmax-weighted sum of the values of one key block of one head: the keys b ATTN_BLOCK + warp + WARPS u (u <
// ATTN_BLOCK / WARPS, those <= pos) of each warp with an online softmax, then the warps merged by warp 0 in order,
// which returns m (the max score), l (the sum of exp(score - m)) and a[HE] (the lane's sums of p v). The key at pos
// is the new one (kn, vn: its cache row is written in this launch); the rows below were cached by earlier steps.
__device__ __forceinline__ void attend_block(const AttentionStage& st, const unsigned short* kc,
                                             const unsigned short* vc, int b, int pos, const float* r,
                                             const float* kn, const float* vn, float (*scratch)[256],
                                             float (*ml_w)[2][8], float& m, float& l, float* a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float mw = -__int_as_float(0x7f800000), lw = 0.0f, aw[HE];
#pragma unroll
  for (int i = 0; i < HE; ++i) aw[i] = 0.0f;
#pragma unroll 2
  for (int u = 0; u < ATTN_BLOCK / WARPS; ++u) {
    const int n = b * ATTN_BLOCK + warp + WARPS * u;
    if (n > pos) break;
    float kf[HE], vf[HE];
#pragma unroll
    for (int i = 0; i < HE; ++i) {
      kf[i] = n == pos ? kn[i] : f16_lo_to_f32(kc[(size_t)n * CHAIN_HD + lane + 32 * i]);
      vf[i] = n == pos ? vn[i] : f16_lo_to_f32(vc[(size_t)n * CHAIN_HD + lane + 32 * i]);
    }
    float sc = 0.0f;
#pragma unroll
    for (int i = 0; i < HE; ++i) sc += r[i] * kf[i];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sc += __shfl_xor_sync(0xffffffffu, sc, o);
    sc *= st.scale;
    const float mn = fmaxf(mw, sc), corr = expf(mw - mn), pr = expf(sc - mn);
    lw = lw * corr + pr;
#pragma unroll
    for (int i = 0; i < HE; ++i) aw[i] = aw[i] * corr + pr * vf[i];
    mw = mn;
  }
#pragma unroll
  for (int i = 0; i < HE; ++i) scratch[warp][lane + 32 * i] = aw[i];
  if (lane == 0) {
    ml_w[warp][0][0] = mw;
    ml_w[warp][0][1] = lw;
  }
  __syncthreads();
  if (warp == 0) {  // warp 0 has key b ATTN_BLOCK <= pos: m is finite; a warp without keys weighs 0
    m = -__int_as_float(0x7f800000);
#pragma unroll
    for (int w = 0; w < WARPS; ++w) m = fmaxf(m, ml_w[w][0][0]);
    l = 0.0f;
#pragma unroll
    for (int i = 0; i < HE; ++i) a[i] = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float f = expf(ml_w[w][0][0] - m);
      l += ml_w[w][0][1] * f;
#pragma unroll
      for (int i = 0; i < HE; ++i) a[i] += scratch[w][lane + 32 * i] * f;
    }
  }
  __syncthreads();  // scratch free again
}

// Item (h, p) of an attention stage: query head h, key blocks p, p + programs, ... of the span 0 .. pos. RoPE of q
// and of the head's new k (rounded to fp16 as the cache stores them), the new k and v written into the cache by the
// program of the block holding pos of the group's first query head; one block: softmax(q k^T scale) v stored, else
// each block's (m, l, sums) into the head's slots and the last program to arrive combines them in block order.
__device__ __noinline__ void attention_item(const ChainStage& cs, int stage, int item, int* done,
                                               float (*scratch)[256], float (*ml_w)[2][8], int* finisher) {
  const AttentionStage& st = cs.attn;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int h = item % st.H, p = item / st.H, P = st.programs;
  const int group = st.H / st.HKV, j = h / group;
  const int pos = (int)*st.pos;
  const int blocks = (min(pos + 1, st.length) + ATTN_BLOCK - 1) / ATTN_BLOCK;
  if (p >= blocks) return;  // no block: no arrival (a head's arrivals count min(blocks, programs))
  const unsigned short* kc = st.cache_k + (size_t)j * st.L * CHAIN_HD;
  const unsigned short* vc = st.cache_v + (size_t)j * st.L * CHAIN_HD;
#if CHAIN_PREFETCH
  if (threadIdx.x == 0)  // the cached rows of the program's blocks, before the wait
    for (int b = p; b < blocks; b += P) {
      const int rows = min(pos - b * ATTN_BLOCK, ATTN_BLOCK);
      if (rows > 0) {
        bulk_prefetch_l2(kc + (size_t)b * ATTN_BLOCK * CHAIN_HD, (u32)rows * CHAIN_HD * 2);
        bulk_prefetch_l2(vc + (size_t)b * ATTN_BLOCK * CHAIN_HD, (u32)rows * CHAIN_HD * 2);
      }
    }
#endif
  wait_input(cs, done);
  const float* rope = st.table + (size_t)pos * CHAIN_HD;
  const unsigned short* qp = st.qkv + (size_t)h * CHAIN_HD;
  const unsigned short* kp = st.qkv + (size_t)(st.H + j) * CHAIN_HD;
  const unsigned short* vp = st.qkv + (size_t)(st.H + st.HKV + j) * CHAIN_HD;
  float r[HE], kn[HE], vn[HE];
  unsigned short kbits[HE], vbits[HE];
#pragma unroll
  for (int i = 0; i < HE / 2; ++i) {
    const int d = lane + 32 * i, d2 = d + CHAIN_HD / 2;
    const float c = __ldg(rope + d), sn = __ldg(rope + CHAIN_HD / 2 + d);
    const float q1 = f16_lo_to_f32(load_x_l2(qp + d)), q2 = f16_lo_to_f32(load_x_l2(qp + d2));
    const float k1 = f16_lo_to_f32(load_x_l2(kp + d)), k2 = f16_lo_to_f32(load_x_l2(kp + d2));
    // each product rounded before the sum (no FMA contraction): the unfused path's and torch's rotation
    r[i] = f16_round(__fsub_rn(__fmul_rn(q1, c), __fmul_rn(q2, sn)));
    r[i + HE / 2] = f16_round(__fadd_rn(__fmul_rn(q2, c), __fmul_rn(q1, sn)));
    kbits[i] = f32_to_f16_bits(__fsub_rn(__fmul_rn(k1, c), __fmul_rn(k2, sn)));
    kbits[i + HE / 2] = f32_to_f16_bits(__fadd_rn(__fmul_rn(k2, c), __fmul_rn(k1, sn)));
    vbits[i] = load_x_l2(vp + d);
    vbits[i + HE / 2] = load_x_l2(vp + d2);
  }
#pragma unroll
  for (int i = 0; i < HE; ++i) {
    kn[i] = f16_lo_to_f32(kbits[i]);
    vn[i] = f16_lo_to_f32(vbits[i]);
  }
  if (h % group == 0 && (blocks - 1) % P == p && warp == 0) {
#pragma unroll
    for (int i = 0; i < HE; ++i) {
      st.cache_k[((size_t)j * st.L + pos) * CHAIN_HD + lane + 32 * i] = kbits[i];
      st.cache_v[((size_t)j * st.L + pos) * CHAIN_HD + lane + 32 * i] = vbits[i];
    }
  }
  unsigned short* out = st.out + (size_t)h * CHAIN_HD;
  float m, l, a[HE];
  for (int b = p; b < blocks; b += P) {
    attend_block(st, kc, vc, b, pos, r, kn, vn, scratch, ml_w, m, l, a);
    if (warp == 0) {
      if (blocks == 1) {
#pragma unroll
        for (int i = 0; i < HE; ++i) out[lane + 32 * i] = f32_to_f16_bits(a[i] / l);
      } else {
        const int slot = h * ATTN_SLOTS + b;
#pragma unroll
        for (int i = 0; i < HE; ++i) st.part[(size_t)slot * CHAIN_HD + lane + 32 * i] = a[i];
        if (lane == 0) {
          st.ml[2 * slot] = m;
          st.ml[2 * slot + 1] = l;
        }
      }
    }
  }
  if (blocks > 1) {  // arrival (as a GEMV tile's); the last program of the head combines its blocks in order
    __syncthreads();
    if (threadIdx.x == 0) {
      *finisher = arrive(st.counters + h, min(blocks, P) - 1);
    }
    __syncthreads();
    if (!*finisher) return;
    if (threadIdx.x == 0) st.counters[h] = 0;
    if (warp == 0) {
      m = -__int_as_float(0x7f800000);
      for (int b = 0; b < blocks; ++b) m = fmaxf(m, __ldcg(st.ml + 2 * (h * ATTN_SLOTS + b)));
      l = 0.0f;
#pragma unroll
      for (int i = 0; i < HE; ++i) a[i] = 0.0f;
      for (int b = 0; b < blocks; ++b) {
        const int slot = h * ATTN_SLOTS + b;
        const float f = expf(__ldcg(st.ml + 2 * slot) - m);
        l += __ldcg(st.ml + 2 * slot + 1) * f;
#pragma unroll
        for (int i = 0; i < HE; ++i) a[i] += __ldcg(st.part + (size_t)slot * CHAIN_HD + lane + 32 * i) * f;
      }
#pragma unroll
      for (int i = 0; i < HE; ++i) out[lane + 32 * i] = f32_to_f16_bits(a[i] / l);
    }
  }
  count_done(done, stage);  // the head is finished
  __syncthreads();
}

// stages[0 .. nstages) in order; done (nstages,) int32 zero before the launch (counts a stage's finished tiles)
extern "C" __global__ void __launch_bounds__(32 * WARPS, CHAIN_BLOCKS)
zigzag_chain(const ChainStage* __restrict__ stages, int nstages, int* done, float eps) {
  __shared__ float rows_sum[WARPS][256];
  __shared__ float bias_sum[WARPS][2][8];
  __shared__ float warp_sq[WARPS];
  __shared__ int finisher;
  __shared__ int kept_col[CHAIN_SHARE];
  __shared__ unsigned short kept_x[CHAIN_SHARE];
  __shared__ int warp_kept[WARPS];
  int base = 0, item = blockIdx.x;
  for (int k = 0; k < nstages; ++k) {
    const ChainStage& cs = stages[k];
    for (; item < base + cs.items; item += gridDim.x) {
      if (cs.kind == 0)
        gemv_item(cs, k, item - base, done, eps, rows_sum, bias_sum, warp_sq, &finisher, kept_col, kept_x,
                  warp_kept);
      else
        attention_item(cs, k, item - base, done, rows_sum, bias_sum, &finisher);
    }
    base += cs.items;
  }
}
#endif

#if GEMM
// ---------------------------------------------------------------------------------------------------------------
// GEMM (the prefill of a short prompt): Y = X W^T for x (M, K) fp16 (XBF16: bf16) and a zigzag Q4_K W (N, K), the
// tokens as the mma's n. The GEMV above puts the 8 sub-blocks in n (B[k, n] = x_k d_k sc[k, n]); here n is 8 tokens and
// the tile's sub-block scale moves into B: B[k, n] = x[token n, k] d_k sc_s[k] for the 2 tiles of sub-block s (fp16:
// the lane's own token pair of columns times the fp16 pair d sc of sub-block s, which lane (s, t) decoded and
// shuffles), A = the levels as fp16 subnormals as in the GEMV (row g q 2^-24, row g + 8 q 2^-20). The min term is one
// more mma a chunk and token tile: A's row g = dmin_k mn_g[k] (lane g's own sub-block), B = x, giving sub-block g's
// term for 8 tokens.
// XBF16 (bf16 x and y): x is staged as fp16(x / 16) and d sc as fp16(16 d sc), so the main mma and its products are
// fp16's as before (x / 16 exact for 2^-10 <= |x| <= 65504 * 16, an fp16 normal; below, within 2^-21 of x); the min
// mma takes fp16(dmin mn) as for fp16 x, its sums times 16 after. Bounds: |x| <= 65504 * 16, d sc <= 65504 / 16 (a
// sub-block's range below ~61,000) and |x d sc| <= 65504 as for fp16 x.
//
// Program (b, r, s) = tokens 8 TOKT b .. 8 TOKT b + 8 TOKT - 1, superblock row r (256 outputs), columns [s per,
// min(K, (s + 1) per)), per a multiple of 16. Its warp w takes part p = w % TOKT of the 16 tiles (16 / TOKT of them:
// the lane loads the 16 / TOKT level bytes of that part of its 16) for all 8 TOKT tokens, and the chunks (16 columns)
// cw, cw + CW, ... of the share (cw = w / TOKT, CW = WARPS / TOKT). The program first copies its tokens' share of x
// into shared memory, zero past M and hi, in the order the lanes read it (a lane's 4 slots of a token and chunk: 8
// contiguous bytes); after the chunks its CW warps of a part add their sums there in a fixed order (deterministic)
// and the program stores them: out (shares, M, N) float32 partial sums, or x's type (M, N) (half_out: one share). Lane
// (g, t) as in the GEMV: slots i = columns j + 4 i + t (k = 2 t, 2 t + 1, 2 t + 8, 2 t + 9). With RING, a warp's ring
// of RING stages (RING_STAGE words each) follows x: its copies ask for a chunk RING - 1 chunks ahead. Dynamic shared
// memory: max(16 TOKT per + 4 WARPS RING RING_STAGE, 4 WARPS 8 SUM_STRIDE) bytes (gemm_cuda.shared_bytes).
#ifndef TOKT
#define TOKT 1  // token tiles of 8 a program (1, 2 or 4)
#endif
#if TYPE != 4 || (TOKT != 1 && TOKT != 2 && TOKT != 4) || WARPS % TOKT != 0
#error "GEMM runs Q4_K (TYPE 4), TOKT 1, 2 or 4 dividing WARPS"
#endif
#if XBF16
#define GEMM_X_SHIFT 16.0f  // bf16 x staged as fp16(x / GEMM_X_SHIFT), d sc as fp16(GEMM_X_SHIFT d sc)
#else
#define GEMM_X_SHIFT 1.0f
#endif
#define GT (16 / TOKT)     // tiles a warp's part
#define GW (4 / TOKT)      // level words a lane loads of a column (its part's 16 / TOKT bytes)
#define CW (WARPS / TOKT)  // warps a part: they take the share's chunks in turn
#define SUM_STRIDE 260     // floats a token's row of the shared sums (256 outputs, padded)
#ifndef RING
#define RING 0  // chunks a warp's ring of asynchronous copies holds (0: loads into registers)
#endif
#if RING == 1 || (RING && PIPE)
#error "RING is 0 or at least 2, without PIPE"
#endif
#define RING_LEVELS (128 * GW)            // u32 of a stage's level words: 32 lanes x 4 slots x GW
#define RING_STAGE (RING_LEVELS + 64)     // u32 of a stage: the levels, then the chunk's 16 heads

struct GemmChunk {  // a lane's loads of one chunk: its part's level words and the head of each slot
  u32 w[4][GW];
  uint4 hd[4];
};

#if TOKT == 1
typedef uint4 GemmLevels;  // the level words a lane loads of a column: GW of them
#elif TOKT == 2
typedef uint2 GemmLevels;
#else
typedef u32 GemmLevels;
#endif

// The lane's part of column col's level words in superblock row r (qr: the lane's column 0; part 0 at TOKT 1).
__device__ __forceinline__ const GemmLevels* gemm_levels(const uint4* qr, int col, int part) {
  return reinterpret_cast<const GemmLevels*>(qr + (size_t)col * 4) + part;
}

// Slot i's level words (its part's) and head at column col of superblock row r (qr, hr: the lane's column 0).
__device__ __forceinline__ void gemm_load_slot(GemmChunk& ch, int i, const uint4* qr, const uint4* hr, int col,
                                               int part) {
  const GemmLevels v = __ldg(gemm_levels(qr, col, part));
#if TOKT == 1
  ch.w[i][0] = v.x;
  ch.w[i][1] = v.y;
  ch.w[i][2] = v.z;
  ch.w[i][3] = v.w;
#elif TOKT == 2
  ch.w[i][0] = v.x;
  ch.w[i][1] = v.y;
#else
  ch.w[i][0] = v;
#endif
  ch.hd[i] = __ldg(hr + (size_t)col * 4);
}

// Chunk j: FULL, every slot below hi (no checks); else slots past hi zero.
template <bool FULL>
__device__ __forceinline__ void gemm_load(GemmChunk& ch, const uint4* qr, const uint4* hr, int j, int hi, int t,
                                          int part) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int col = j + 4 * i + t;
    if (FULL || col < hi) {
      gemm_load_slot(ch, i, qr, hr, col, part);
    } else {
#pragma unroll
      for (int u = 0; u < GW; ++u) ch.w[i][u] = 0u;
      ch.hd[i] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

#if RING
// Chunk j into a warp's ring stage (shared) by asynchronous copies that hold no registers: lane (g, t) copies its
// slots' level words (4 GW bytes each) to words (i GW / 4) 128 + 4 lane + (i GW) % 4 (a lane's words of 4 slots are
// GW 16-byte vectors, lane-major: conflict-free reads), and lanes g < 4 the head of slot g (column j + 4 g + t) to
// head word 4 (4 g + t). One group a call (cp.async.commit_group), empty where the warp has no chunk j.
__device__ __forceinline__ void ring_issue(u32* stage, const uint4* qr, const uint4* hr, int j, bool any, int lane,
                                           int g, int t, int part) {
  if (any) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      u32* dst = stage + (i * GW / 4) * 128 + 4 * lane + (i * GW) % 4;
      const GemmLevels* levels = gemm_levels(qr, j + 4 * i + t, part);
#if TOKT == 1
      copy16_async(dst, levels);
#else
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"((u32)__cvta_generic_to_shared(dst)), "l"(levels),
                   "n"(4 * GW) : "memory");
#endif
    }
    if (g < 4) {
      const u32 dst = (u32)__cvta_generic_to_shared(stage + RING_LEVELS + 4 * (4 * g + t));
      asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(hr + (size_t)(j + 4 * g + t) * 4)
                   : "memory");
    }
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// A ring stage's chunk into the lane's registers (after its group completed and a __syncwarp).
__device__ __forceinline__ void ring_read(GemmChunk& ch, const u32* stage, int lane, int t) {
#pragma unroll
  for (int v = 0; v < GW; ++v) {
    const uint4 a = reinterpret_cast<const uint4*>(stage)[32 * v + lane];
    const u32 words[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) ch.w[(4 * v + e) / GW][(4 * v + e) % GW] = words[e];
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) ch.hd[i] = reinterpret_cast<const uint4*>(stage + RING_LEVELS)[4 * i + t];
}
#endif

__device__ __forceinline__ u32 mul_f16x2(u32 a, u32 b) {
  u32 r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

// One chunk into c[GT][TOKT][4] (tile part GT + mi, token tile jt) and the min terms into cm[TOKT][4] (row g =
// sub-block g). xl: the lane's 8 bytes of x for token g of token tile 0 and this chunk; token tile jt's lie
// jt xt uint2 further (xt = 8 chunks of the share).
__device__ __forceinline__ void gemm_compute(const GemmChunk& ch, float (*c)[TOKT][4], float (*cm)[4],
                                             const ScaleDecoder& dec, const uint2* xl, int xt, int t, int part) {
  float dsc[4], dmn[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float sc, mn;
    dec.decode(ch.hd[i], sc, mn);
    dsc[i] = f16_lo_to_f32(ch.hd[i].x) * (GEMM_X_SHIFT * sc);
    dmn[i] = f16_hi_to_f32(ch.hd[i].x) * mn;
  }
  const u32 ds01 = pack_f16x2(dsc[0], dsc[1]), ds23 = pack_f16x2(dsc[2], dsc[3]);
  const u32 am0 = pack_f16x2(dmn[0], dmn[1]), am2 = pack_f16x2(dmn[2], dmn[3]);
  u32 x01[TOKT], x23[TOKT];
#pragma unroll
  for (int jt = 0; jt < TOKT; ++jt) {
    const uint2 v = xl[jt * xt];
    x01[jt] = v.x;
    x23[jt] = v.y;
    mma_tile(cm[jt], am0, 0u, am2, 0u, x01[jt], x23[jt]);
  }
#pragma unroll
  for (int sl = 0; sl < GT / 2; ++sl) {
    const int src = 4 * (part * (GT / 2) + sl) + t;  // lane (s, t): sub-block s's d sc of the lane's slots
    const u32 s01 = __shfl_sync(0xffffffffu, ds01, src), s23 = __shfl_sync(0xffffffffu, ds23, src);
    u32 b01[TOKT], b23[TOKT];
#pragma unroll
    for (int jt = 0; jt < TOKT; ++jt) {
      b01[jt] = mul_f16x2(x01[jt], s01);
      b23[jt] = mul_f16x2(x23[jt], s23);
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int mi = 2 * sl + e, q = mi >> 2, sh = mi & 3;
      const u32 sel = sh | (sh << 4) | ((4 + sh) << 8) | ((4 + sh) << 12);
      const u32 p = __byte_perm(ch.w[0][q], ch.w[1][q], sel);
      const u32 pq = __byte_perm(ch.w[2][q], ch.w[3][q], sel);
      const u32 a0 = p & 0x000F000Fu, a1 = p & 0x00F000F0u, a2 = pq & 0x000F000Fu, a3 = pq & 0x00F000F0u;
#pragma unroll
      for (int jt = 0; jt < TOKT; ++jt) mma_tile(c[mi][jt], a0, a1, a2, a3, b01[jt], b23[jt]);
    }
  }
}

// The program's tokens' share of x into xs (shared): token tl < 8 TOKT, column first + cc (cc < per, per a multiple
// of 16) at unsigned short ((tl per / 16 + cc / 16) 4 + cc % 4) 4 + (cc % 16) / 4 (lane t = cc % 4 of the chunk cc /
// 16 reads its slots' 4 contiguous), zero past M or hi. 8 columns a 16-byte load where K is a multiple of 8. XBF16:
// each bf16 x staged as fp16(x / GEMM_X_SHIFT).
__device__ __forceinline__ void gemm_stage_x(unsigned short* xs, const unsigned short* x, int M, int K, int tok0,
                                             int first, int hi, int per) {
  const int vectors = 8 * TOKT * (per >> 3);
  for (int u = threadIdx.x; u < vectors; u += 32 * WARPS) {
    const int tl = u / (per >> 3), cc = (u - tl * (per >> 3)) << 3, tok = tok0 + tl, col = first + cc;
    unsigned short v[8];
    if (tok < M && col + 8 <= hi && (K & 7) == 0) {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(x + (size_t)tok * K + col));
      const u32 words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = (unsigned short)(words[e >> 1] >> (16 * (e & 1)));
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = (tok < M && col + e < hi) ? __ldg(x + (size_t)tok * K + col + e) : 0;
    }
#if XBF16
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = f32_to_f16_bits(x_to_f32(v[e]) * (1.0f / GEMM_X_SHIFT));
#endif
    unsigned short* base = xs + (size_t)(tl * (per >> 4) + (cc >> 4)) * 16 + ((cc & 15) >> 2);
#pragma unroll
    for (int e = 0; e < 8; ++e) base[(e & 3) * 4 + (e >> 2)] = v[e];
  }
}

#ifndef RESIDENT
#define RESIDENT 1  // programs an SM the registers must allow (__launch_bounds__' minimum)
#endif
extern "C" __global__ void __launch_bounds__(32 * WARPS, RESIDENT)
zigzag_q4k_gemm(const uint4* __restrict__ q, const uint4* __restrict__ h, const unsigned short* __restrict__ x,
                void* __restrict__ out, int M, int N, int K, int per, int half_out) {
  extern __shared__ __align__(16) unsigned char gemm_smem[];
  unsigned short* xs = reinterpret_cast<unsigned short*>(gemm_smem);
  float (*sums)[8 * TOKT][SUM_STRIDE] = reinterpret_cast<float (*)[8 * TOKT][SUM_STRIDE]>(gemm_smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3, part = warp % TOKT, cw = warp / TOKT;
  const int r = blockIdx.y, s = blockIdx.z, tok0 = 8 * TOKT * blockIdx.x;
  const uint4* qr = q + (size_t)(2 * r + (g >> 2)) * K * 4 + (g & 3);
  const uint4* hr = h + (size_t)(r >> 2) * K * 4 + (r & 3);
  const ScaleDecoder dec(g);
  float c[GT][TOKT][4], cm[TOKT][4];
#pragma unroll
  for (int mi = 0; mi < GT; ++mi)
#pragma unroll
    for (int jt = 0; jt < TOKT; ++jt) c[mi][jt][0] = c[mi][jt][1] = c[mi][jt][2] = c[mi][jt][3] = 0.0f;
#pragma unroll
  for (int jt = 0; jt < TOKT; ++jt) cm[jt][0] = cm[jt][1] = cm[jt][2] = cm[jt][3] = 0.0f;
  const int first = s * per, hi = min(K, first + per), step = 16 * CW;
  int j = first + 16 * cw;
  GemmChunk ch;
#if RING
  // the warp's ring after x's share (the sums take both after the chunks: gemm_cuda.shared_bytes); its first
  // RING - 1 chunks in flight while x is staged
  u32* ring = reinterpret_cast<u32*>(gemm_smem + 16 * TOKT * per) + warp * RING * RING_STAGE;
  const int full = j + 16 <= hi ? (hi - 16 - j) / step + 1 : 0;  // the warp's full chunks
#pragma unroll
  for (int d = 0; d < RING - 1; ++d)
    ring_issue(ring + d * RING_STAGE, qr, hr, j + d * step, d < full, lane, g, t, part);
#else
  if (j + 16 <= hi) gemm_load<true>(ch, qr, hr, j, hi, t, part);  // in flight while x is staged
#endif
  gemm_stage_x(xs, x, M, K, tok0, first, hi, per);
  __syncthreads();
  // the lane's x: token g of token tile 0, chunk (j - first) / 16, slot 0 of lane t; a token tile 8 token rows on
  const uint2* xl = reinterpret_cast<const uint2*>(xs) + (size_t)g * (per >> 2) + ((j - first) >> 4) * 4 + t;
  const int xt = 8 * (per >> 2), xstep = 4 * CW;
#if RING
  for (int u = 0; u < full; ++u, j += step, xl += xstep) {
    const int d = u + RING - 1;  // the chunk asked for now, into the stage chunk u - 1 left
    ring_issue(ring + (d % RING) * RING_STAGE, qr, hr, j + (RING - 1) * step, d < full, lane, g, t, part);
    asm volatile("cp.async.wait_group %0;" ::"n"(RING - 1) : "memory");
    __syncwarp();  // the other lanes' heads
    ring_read(ch, ring + (u % RING) * RING_STAGE, lane, t);
    __syncwarp();  // every lane has read stage u % RING before the next call refills it
    gemm_compute(ch, c, cm, dec, xl, xt, t, part);
  }
#else
  for (; j + 16 <= hi; j += step, xl += xstep) {
#if PIPE
    GemmChunk next;
    if (j + step + 16 <= hi) gemm_load<true>(next, qr, hr, j + step, hi, t, part);
    gemm_compute(ch, c, cm, dec, xl, xt, t, part);
    ch = next;
#else
    gemm_compute(ch, c, cm, dec, xl, xt, t, part);
    if (j + step + 16 <= hi) gemm_load<true>(ch, qr, hr, j + step, hi, t, part);
#endif
  }
#endif
  if (j < hi) {  // the share's last, partial chunk
    gemm_load<false>(ch, qr, hr, j, hi, t, part);
    gemm_compute(ch, c, cm, dec, xl, xt, t, part);
  }
  __syncthreads();  // x and the rings read by every warp (the rings' copies all waited for): their space takes the sums
  // the warp's sums less the min terms (sub-block m / 2's, from lane (m / 2, t)), at rows 16 m + g (+ 8), tokens
  // 8 jt + 2 t (+ 1) of the program
#pragma unroll
  for (int mi = 0; mi < GT; ++mi) {
    const int m = part * GT + mi, src = 4 * (m >> 1) + t;
#pragma unroll
    for (int jt = 0; jt < TOKT; ++jt) {
      const float m0 = __shfl_sync(0xffffffffu, cm[jt][0], src), m1 = __shfl_sync(0xffffffffu, cm[jt][1], src);
      float* row0 = &sums[cw][8 * jt + 2 * t][16 * m + g];
      row0[0] = 16777216.0f * c[mi][jt][0] - GEMM_X_SHIFT * m0;  // (the min sums' x / GEMM_X_SHIFT undone)
      row0[SUM_STRIDE] = 16777216.0f * c[mi][jt][1] - GEMM_X_SHIFT * m1;
      row0[8] = 1048576.0f * c[mi][jt][2] - GEMM_X_SHIFT * m0;
      row0[SUM_STRIDE + 8] = 1048576.0f * c[mi][jt][3] - GEMM_X_SHIFT * m1;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 8 * TOKT * 256; i += 32 * WARPS) {
    const int tl = i >> 8, row = i & 255, tok = tok0 + tl, n = 256 * r + row;
    if (tok < M && n < N) {
      float v = sums[0][tl][row];
#pragma unroll
      for (int u = 1; u < CW; ++u) v += sums[u][tl][row];
      if (half_out)
        reinterpret_cast<unsigned short*>(out)[(size_t)tok * N + n] = f32_to_x_bits(v);
      else
        reinterpret_cast<float*>(out)[((size_t)s * M + tok) * N + n] = v;
    }
  }
}
#endif
