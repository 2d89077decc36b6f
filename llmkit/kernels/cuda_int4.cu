// 4-bit grouped weights times the few activation rows of a decode step, on tensor cores.
//
// y[m, n] = sum_k s[n, g(k)] * (q[n, k] - z[n, g(k)]) * x[m, k] for up to 16 rows m.
//
// Each block of 256 threads owns 16 outputs; its 8 warps split the inputs between them and
// add their parts up at the end. A warp reads its part of the 16 outputs' weights as
// 16-byte words per lane, 512 contiguous bytes per warp per 64 inputs, and feeds each
// 16 x 16 tile of them to one mma.sync.m16n8k16 (bf16, float32 sums) as the A operand,
// the activation rows as B's columns. The weights are packed (cuda_int4.py) so that a
// lane's 32-bit word holds exactly its 8 A elements of one tile: nibble 4s+16h (s = 0..3,
// h = 0, 1) is the h-th half of A register s, so `(word >> 4s) & 0x000F000F | 0x43004300`
// is that register as two bf16 values 128 + q, exactly. A second mma with an A of ones
// gives each activation row's sum over the tile, so a group's part is
// s * (sum (128 + q) x - (128 + z) sum x), taken after every 32 or 64 inputs (never
// across a group's end).
//
// Launched as a programmatic dependent of the kernel before it (sm_90 and newer: see
// cuda_rtc.Module.launch), a block may start while that kernel still runs: it lets its own
// dependents start, loads its first weights (which no kernel writes), and only then waits
// for the kernels before it to finish, before it reads the activations or writes.
//
// The gated kernels (int4_silu_*) take a merged gate/up weight whose block of 16 outputs
// holds 8 gate rows and then the 8 up rows of the same outputs (cuda_int4.gated_order), and
// write silu(gate) * up: [rows, N / 2], from the float32 sums, rounded once.
//
// A product may also prefetch other weights into the L2 once its own are loaded (`prefetch`:
// count (address, bytes) pairs, each block a share of each, one prefetch.global.L2::evict_last
// a thread per 128-byte line): a layer's q/k/v product those of the products after the
// attention, which reads little memory, so that they find them in the L2 (cuda_int4.py).
//
// Two kinds fold a decode layer's RMSNorm and residual add into its products (up to 8
// rows). NORM: x is the residual stream, and the product takes nw * rms_norm(x) rounded as
// triton_elementwise's norm does (each row times its 1 / rms in float32, rounded to bf16,
// times the norm weight, rounded again); every block sums its rows' squares itself. ADD: y
// is the residual stream, and each output, rounded to bf16, is added to it in place, the
// sum rounded once (each output is read and written by one thread).

#ifndef WARPS
#define WARPS 8  // warps of a block, splitting its inputs (cuda_int4.py launches as many)
#endif
#ifndef UNROLL
#define UNROLL 4  // 64-input chunks whose weights a lane has in flight at once
#endif
#ifndef PIPELINE
#define PIPELINE 0  // 1: a lane loads its next UNROLL chunks before it multiplies the last
#endif
// blocks of a NORM kernel an SM holds at least: as many as of the plain kernel of the same
// variant (ptxas for sm_90: 4 of 4 warps, 3 of 8 warps unrolled twice, else 2), which the
// norm's registers would otherwise cut to fewer
#define NORM_BLOCKS (WARPS == 4 ? 4 : UNROLL == 2 ? 3 : 2)

__device__ __forceinline__ float half_to_float(u32 bits) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)bits));
  return f;
}

__device__ __forceinline__ float silu(float f) { return f / (1.f + __expf(-f)); }

// bf16(bf16(x * inv) * w) for the two bf16 values of x and of w: the product of two bf16
// values is exact in the fma, which rounds it once (adding -0 keeps every sign)
__device__ __forceinline__ u32 norm_pair(u32 x, float inv, u32 w) {
  const float lo = __uint_as_float(x << 16) * inv, hi = __uint_as_float(x & 0xFFFF0000u) * inv;
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(r), "r"(w), "r"(0x80008000u));
  return r;
}

__device__ __forceinline__ float square_sum(uint4 v) {
  const u32 words[4] = {v.x, v.y, v.z, v.w};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float lo = __uint_as_float(words[i] << 16), hi = __uint_as_float(words[i] & 0xFFFF0000u);
    s += lo * lo + hi * hi;
  }
  return s;
}

// This block's share of each of `count` regions ((address, bytes) pairs) into the L2, kept
// there before lines loaded once (evict_last): a line a thread, from the line the region
// starts in (else a region starting inside a line could end in one never fetched)
__device__ __forceinline__ void prefetch_l2(const long long* regions, int count) {
  for (int r = 0; r < count; ++r) {
    const long long skew = regions[2 * r] & 127;
    const char* base = (const char*)(regions[2 * r] - skew);
    const long long bytes = regions[2 * r + 1] + skew;
    const long long share = ((bytes + gridDim.x - 1) / gridDim.x + 127) & ~127LL;
    const long long end = min(bytes, share * (blockIdx.x + 1));
    const long long step = 128LL * blockDim.x;
    for (long long at = share * blockIdx.x + 128LL * threadIdx.x; at < end; at += step)
      asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(base + at));
  }
}

enum Kind { PLAIN = 0, NORM = 1, ADD = 2 };

// A lane's 1 / rms of activation row `row` (a NORM kernel's prologue, up to 8 rows): each
// warp sums the squares of the inputs it multiplies, [k0, k1), of every row, and the block
// adds the warps' sums.
__device__ __forceinline__ float inverse_rms(const u16* x, int rows, int row, int K, int k0,
                                             int k1, float eps) {
  __shared__ float squares[WARPS][8];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    if (r >= rows) break;
    float s = 0.f;
    const u16* row_x = x + (size_t)r * K;
    for (int k = k0 + 8 * lane; k < k1; k += 4 * 256) {  // up to 4 loads in flight a lane
      uint4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        v[u] = k + 256 * u < k1 ? *(const uint4*)(row_x + k + 256 * u) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < 4; ++u) s += square_sum(v[u]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, offset);
    if (lane == 0) squares[warp][r] = s;
  }
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) total += squares[w][row];
  return rsqrtf(total / K + eps);
}

// A lane's sums for MT tiles of 8 activation rows (rows 8 mt + 2t and 8 mt + 2t + 1 of
// outputs g and g + 8 of the block's 16, as an mma's C fragment holds them).
template <int MT>
struct Part {
  float total[MT][4];
  float acc[MT][4];  // sum (128 + q) x since the last fold
  float sum[MT][4];  // sum x since the last fold
};

// The part since the last fold, scaled by its group's (s, z): rows g and g + 8 of the
// block's 16 outputs, whose (fp16 s | fp16 z << 16) words are sz[group * N + n].
template <int MT>
__device__ __forceinline__ void fold(Part<MT>& p, const u32* sz, int group, int N) {
  const u32 r0 = sz[(size_t)group * N], r1 = sz[(size_t)group * N + 8];
  const float s0 = half_to_float(r0), z0 = 128.f + half_to_float(r0 >> 16);
  const float s1 = half_to_float(r1), z1 = 128.f + half_to_float(r1 >> 16);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    p.total[mt][0] += s0 * (p.acc[mt][0] - z0 * p.sum[mt][0]);
    p.total[mt][1] += s0 * (p.acc[mt][1] - z0 * p.sum[mt][1]);
    p.total[mt][2] += s1 * (p.acc[mt][2] - z1 * p.sum[mt][2]);
    p.total[mt][3] += s1 * (p.acc[mt][3] - z1 * p.sum[mt][3]);
#pragma unroll
    for (int i = 0; i < 4; ++i) p.acc[mt][i] = p.sum[mt][i] = 0.f;
  }
}

// One chunk of 64 inputs from k0: four 16 x 16 tiles, word j holding tile j. The product
// sums over a tile's 16 inputs in any order, so the packing gives lane t of tile j the
// inputs 32 (j / 2) + 8t + 4 (j % 2) + 0..3 (its B fragment's k = 2t, 2t + 1, 2t + 8,
// 2t + 9): a lane's activations for the chunk are two runs of 8 inputs, one 16-byte load
// each, and tiles 0-1 and 2-3 each cover 32 inputs in a row (a fold never spans groups).
// Each weight tile is turned into bf16 once for the MT products of its 8-row tiles. NORM:
// the activations are normed on the way (nw: the norm weight at the lane's first input,
// inv: its rows' 1 / rms).
template <int FOLD, int MT, bool NORM>
__device__ __forceinline__ void chunk(Part<MT>& p, uint4 w, const u16* const* xrow, int k0,
                                      const u32* sz, int group_size, int N, const u16* nw,
                                      const float* inv) {
  const u32 ones = 0x3F803F80u;  // two bf16 1.0
  const u32 words[4] = {w.x, w.y, w.z, w.w};
  u32 bs[MT][8];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const uint4 xa = *(const uint4*)(xrow[mt] + k0), xb = *(const uint4*)(xrow[mt] + k0 + 32);
    bs[mt][0] = xa.x, bs[mt][1] = xa.y, bs[mt][2] = xa.z, bs[mt][3] = xa.w;
    bs[mt][4] = xb.x, bs[mt][5] = xb.y, bs[mt][6] = xb.z, bs[mt][7] = xb.w;
  }
  if (NORM) {
    const uint4 na = *(const uint4*)(nw + k0), nb = *(const uint4*)(nw + k0 + 32);
    const u32 ns[8] = {na.x, na.y, na.z, na.w, nb.x, nb.y, nb.z, nb.w};
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 8; ++i) bs[mt][i] = norm_pair(bs[mt][i], inv[mt], ns[i]);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int k = k0 + 16 * j;  // within the fold's group
    const u32 q = words[j];
    const u32 a0 = and_or(q, 0x000F000Fu, 0x43004300u);
    const u32 a1 = and_or(q >> 4, 0x000F000Fu, 0x43004300u);
    const u32 a2 = and_or(q >> 8, 0x000F000Fu, 0x43004300u);
    const u32 a3 = and_or(q >> 12, 0x000F000Fu, 0x43004300u);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const u32 b0 = bs[mt][2 * j], b1 = bs[mt][2 * j + 1];
      mma_bf16(p.acc[mt], a0, a1, a2, a3, b0, b1);
      mma_bf16(p.sum[mt], ones, ones, ones, ones, b0, b1);
    }
    if ((j + 1) % FOLD == 0) fold(p, sz, (u32)k / (u32)group_size, N);
  }
}

// y (bf16) += bf16(v), the sum rounded once
__device__ __forceinline__ void add_to(u16* y, float v) {
  *y = float_to_bf16(bf16_to_float(*y) + bf16_to_float(float_to_bf16(v)));
}

// Row m's outputs n and n + 8 (v0, v1), or silu(v0) * v1 as gated output n % 8 of the
// block; ADD: added to y's.
template <bool GATED, bool ADD>
__device__ __forceinline__ void store(u16* y, int m, int n, int N, float v0, float v1) {
  if (GATED) {
    y[(size_t)m * (N >> 1) + (n >> 4) * 8 + (n & 7)] = float_to_bf16(silu(v0) * v1);
  } else if (ADD) {
    add_to(y + (size_t)m * N + n, v0);
    add_to(y + (size_t)m * N + n + 8, v1);
  } else {
    y[(size_t)m * N + n] = float_to_bf16(v0);
    y[(size_t)m * N + n + 8] = float_to_bf16(v1);
  }
}

// FOLD: 16-input tiles between folds, 4 where every group is a multiple of 64 inputs, else
// 2. MT: tiles of 8 activation rows (rows <= 8 MT). GATED: write silu(gate) * up. KIND:
// PLAIN, or NORM (nw, eps: the norm's weight and epsilon) or ADD, for MT = 1 only.
template <int FOLD, int MT, bool GATED, int KIND>
__device__ __forceinline__ void gemv(const u16* __restrict__ x, const uint4* __restrict__ w,
                                     const u32* __restrict__ sz, u16* __restrict__ y, int rows,
                                     int N, int K, int group_size, const u16* __restrict__ nw,
                                     float eps, const long long* __restrict__ prefetch,
                                     int prefetches) {
  static_assert(KIND == PLAIN || MT == 1, "norms and adds take up to 8 rows");
  __shared__ float partial[WARPS][MT * 4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int chunks = K >> 6;
  const int begin = warp * chunks / WARPS, end = (warp + 1) * chunks / WARPS;
  const uint4* wp = w + (size_t)blockIdx.x * chunks * 32 + lane;
  // lanes past the last activation row read row 0 again: B's columns past `rows` give
  // outputs that are never stored
  const u16* xrow[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row = 8 * mt + g;
    xrow[mt] = x + (size_t)(row < rows ? row : 0) * K + 8 * t;
  }
  const u32* szp = sz + blockIdx.x * 16 + g;
  Part<MT> p;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) p.total[mt][i] = p.acc[mt][i] = p.sum[mt][i] = 0.f;
  let_dependents_start();
  uint4 words[UNROLL];
  if (begin + UNROLL <= end) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) words[u] = load_streaming(wp + (size_t)(begin + u) * 32);
  }
  wait_for_inputs();
  float inv[MT] = {};
  if (KIND == NORM) inv[0] = inverse_rms(x, rows, g < rows ? g : 0, K, begin << 6, end << 6, eps);
  const u16* nwp = nw + 8 * t;
  int c = begin;
  for (; c + UNROLL <= end; c += UNROLL) {
#if PIPELINE  // words holds chunks c.. on entry: the next ones load while these multiply
    uint4 next[UNROLL];
    const bool more = c + 2 * UNROLL <= end;
    if (more) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
        next[u] = load_streaming(wp + (size_t)(c + UNROLL + u) * 32);
    }
#else
    if (c != begin) {  // the first chunks' weights were loaded before the wait
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) words[u] = load_streaming(wp + (size_t)(c + u) * 32);
    }
#endif
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      chunk<FOLD, MT, KIND == NORM>(p, words[u], xrow, (c + u) << 6, szp, group_size, N, nwp, inv);
#if PIPELINE
    if (more) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) words[u] = next[u];
    }
#endif
  }
  for (; c < end; ++c)
    chunk<FOLD, MT, KIND == NORM>(p, load_streaming(wp + (size_t)c * 32), xrow, c << 6, szp,
                                  group_size, N, nwp, inv);
  if (prefetches) prefetch_l2(prefetch, prefetches);  // every load of this warp's is done
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][4 * mt + i][lane] = p.total[mt][i];
  __syncthreads();
  if (warp != 0) return;
  const int n = blockIdx.x * 16 + g;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float v[4];
    add_warps(v, partial, WARPS, mt, lane);
    const int m = 8 * mt + 2 * t;
    if (m < rows) store<GATED, KIND == ADD>(y, m, n, N, v[0], v[2]);
    if (m + 1 < rows) store<GATED, KIND == ADD>(y, m + 1, n, N, v[1], v[3]);
  }
}

// every kernel takes the same arguments (nw and eps read only by NORM ones; prefetch:
// `prefetches` (address, bytes) pairs, or none)
#define KERNEL(NAME, FOLD, MT, GATED, KIND)                                                  \
  extern "C" __global__ void __launch_bounds__(WARPS * 32, KIND == NORM ? NORM_BLOCKS : 2) \
      int4_##NAME##_fold##FOLD##_m##MT(const u16* x, const uint4* w, const u32* sz, u16* y, \
                                       int rows, int N, int K, int group_size,               \
                                       const u16* nw, float eps, const long long* prefetch,  \
                                       int prefetches) {                                     \
    gemv<FOLD, MT, GATED, KIND>(x, w, sz, y, rows, N, K, group_size, nw, eps, prefetch,      \
                                prefetches);                                                 \
  }

KERNEL(gemv, 2, 1, false, PLAIN)
KERNEL(gemv, 4, 1, false, PLAIN)
KERNEL(gemv, 2, 2, false, PLAIN)
KERNEL(gemv, 4, 2, false, PLAIN)
KERNEL(silu, 2, 1, true, PLAIN)
KERNEL(silu, 4, 1, true, PLAIN)
KERNEL(silu, 2, 2, true, PLAIN)
KERNEL(silu, 4, 2, true, PLAIN)
KERNEL(gemv_norm, 2, 1, false, NORM)
KERNEL(gemv_norm, 4, 1, false, NORM)
KERNEL(silu_norm, 2, 1, true, NORM)
KERNEL(silu_norm, 4, 1, true, NORM)
KERNEL(gemv_add, 2, 1, false, ADD)
KERNEL(gemv_add, 4, 1, false, ADD)
