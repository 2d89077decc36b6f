// int8 weights as a checkpoint stores them (q [N, K] row-major, one float32 scale an
// output) times the few activation rows of a decode step, on tensor cores, each weight byte
// read once and in place: the Triton products of triton_int8.py read the same tensor.
//
// Each block of WARPS warps owns 16 outputs; its warps split the inputs in chunks of 64 and
// add their parts up at the end. Lane l (g = l / 4, t = l % 4) loads, per chunk, bytes
// 16t..16t+15 of output rows g and g + 8: a warp reads 64 contiguous bytes of each of the
// block's 16 rows, and UNROLL chunks in a row. A product sums a tile's inputs in any order,
// so each lane takes the chunk's inputs 16t..16t+15 as the k of its fragments, and reads its
// activations likewise, one run a lane:
//
// - weight-only (int8_gemv_m*: bf16 rows x): mma.m16n8k16 (bf16, float32 sums). Tile
//   j = 0..3 of the chunk is the lane's inputs 16t + 4j + 0..3, its k = 2t, 2t + 1 inputs
//   +0, +1 and k = 2t + 8, 2t + 9 inputs +2, +3: A register 0 (2) is bytes 0, 1 (2, 3) of
//   the lane's word j of row g, register 1 (3) the same of row g + 8, and B the lane's
//   activation words 2j, 2j + 1. A byte q is two exact bf16 values of u = q + 128:
//   128 + (u & 15) (0x4300 | the low nibble) and 2048 + 16 (u >> 4) (0x4500 | the high
//   nibble, whose top bit flips), q + 2304 together; three mmas a tile (the low nibbles,
//   the high ones, an A of -2304) add sum q x to the float32 sums. Each output times its
//   scale, rounded once to bf16.
// - W8A8 (w8a8_gemv_m*: int8 rows xq, a float32 scale a row): mma.m16n8k32 (s8, exact int32
//   sums). Tile j = 0, 1 of the chunk is the lane's inputs 16t + 8j + 0..7, its k = 4t..4t+3
//   inputs +0..3 and k = 4t+16..4t+19 inputs +4..7: A registers 0, 2 are the lane's words 2j,
//   2j + 1 of row g, registers 1, 3 of row g + 8, B its activation words 2j, 2j + 1, all as
//   they are. The warps' int32 sums add up exactly; then float(sum) times the row's scale,
//   times the output's, rounded once to bf16: triton_int8's w8a8 product, bit for bit.
//
// Launched as a programmatic dependent of the kernel before it (sm_90 and newer), a block
// lets its own dependents start and loads its first weights before it waits for that kernel
// to finish, as cuda_int4.cu's blocks do.

#ifndef WARPS
#define WARPS 8  // warps of a block, splitting its inputs (cuda_int8.py launches as many)
#endif
#ifndef UNROLL
#define UNROLL 2  // 64-input chunks whose weights (32 bytes a lane) a lane has in flight
#endif

// (q & mask) ^ magic in one instruction
__device__ __forceinline__ u32 and_xor(u32 q, u32 mask, u32 magic) {
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0x6A;" : "=r"(r) : "r"(q), "r"(mask), "r"(magic));
  return r;
}

__device__ __forceinline__ void mma_s8(int* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The two A registers of one nibble of bytes (0, 1) and (2, 3) of rows g (word wg) and
// g + 8 (w8): a[0..3] low nibbles (128 + n), a[4..7] high ones (2048 + 16 (n ^ 8))
__device__ __forceinline__ void nibbles(u32* a, u32 wg, u32 w8) {
  const u32 spread[4] = {__byte_perm(wg, 0, 0x4140), __byte_perm(w8, 0, 0x4140),
                         __byte_perm(wg, 0, 0x4342), __byte_perm(w8, 0, 0x4342)};
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    a[s] = and_or(spread[s], 0x000F000Fu, 0x43004300u);
    a[4 + s] = and_xor(spread[s] >> 4, 0x000F000Fu, 0x45084508u);
  }
}

template <bool W8A8>
struct Sums {
  typedef float type;
};
template <>
struct Sums<true> {
  typedef int type;
};

// One chunk of 64 inputs from k0, weight-only: wg, w8 the lane's weights of rows g and g + 8,
// xrow[mt] its bf16 activation rows at its first input of the chunk's.
template <int MT>
__device__ __forceinline__ void chunk(float (&acc)[MT][4], uint4 wg, uint4 w8,
                                      const char* const* xrow, int k0) {
  const u32 g_words[4] = {wg.x, wg.y, wg.z, wg.w}, h_words[4] = {w8.x, w8.y, w8.z, w8.w};
  const u32 minus = 0xC510C510u;  // two bf16 -2304
  u32 bs[MT][8];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const char* at = xrow[mt] + 2 * k0;
    const uint4 xa = *(const uint4*)at, xb = *(const uint4*)(at + 16);
    bs[mt][0] = xa.x, bs[mt][1] = xa.y, bs[mt][2] = xa.z, bs[mt][3] = xa.w;
    bs[mt][4] = xb.x, bs[mt][5] = xb.y, bs[mt][6] = xb.z, bs[mt][7] = xb.w;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    u32 a[8];
    nibbles(a, g_words[j], h_words[j]);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const u32 b0 = bs[mt][2 * j], b1 = bs[mt][2 * j + 1];
      mma_bf16(acc[mt], a[0], a[1], a[2], a[3], b0, b1);
      mma_bf16(acc[mt], a[4], a[5], a[6], a[7], b0, b1);
      mma_bf16(acc[mt], minus, minus, minus, minus, b0, b1);
    }
  }
}

// The same, W8A8: xrow[mt] the lane's int8 activation rows
template <int MT>
__device__ __forceinline__ void chunk(int (&acc)[MT][4], uint4 wg, uint4 w8,
                                      const char* const* xrow, int k0) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const uint4 xa = *(const uint4*)(xrow[mt] + k0);
    mma_s8(acc[mt], wg.x, w8.x, wg.y, w8.y, xa.x, xa.y);
    mma_s8(acc[mt], wg.z, w8.z, wg.w, w8.w, xa.z, xa.w);
  }
}

// MT: tiles of 8 activation rows (rows <= 8 MT). W8A8: x is int8 with x_scale, else bf16.
template <int MT, bool W8A8>
__device__ __forceinline__ void gemv(const char* __restrict__ x, const float* __restrict__ x_scale,
                                     const char* __restrict__ w, const float* __restrict__ scale,
                                     u16* __restrict__ y, int rows, int N, int K) {
  typedef typename Sums<W8A8>::type T;
  __shared__ T partial[WARPS][MT * 4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int chunks = K >> 6;
  const int begin = warp * chunks / WARPS, end = (warp + 1) * chunks / WARPS;
  const char* wg = w + (size_t)(blockIdx.x * 16 + g) * K + 16 * t;
  const char* w8 = wg + (size_t)8 * K;
  // lanes past the last activation row read row 0 again: B's columns past `rows` give
  // outputs that are never stored
  const int size = W8A8 ? 1 : 2;  // bytes an activation
  const char* xrow[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row = 8 * mt + g;
    xrow[mt] = x + ((size_t)(row < rows ? row : 0) * K + 16 * t) * size;
  }
  T acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0;
  let_dependents_start();
  uint4 a[UNROLL], b[UNROLL];
  if (begin + UNROLL <= end) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      a[u] = load_streaming((const uint4*)(wg + (size_t)(begin + u) * 64));
      b[u] = load_streaming((const uint4*)(w8 + (size_t)(begin + u) * 64));
    }
  }
  wait_for_inputs();
  int c = begin;
  for (; c + UNROLL <= end; c += UNROLL) {
    if (c != begin) {  // the first chunks' weights were loaded before the wait
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        a[u] = load_streaming((const uint4*)(wg + (size_t)(c + u) * 64));
        b[u] = load_streaming((const uint4*)(w8 + (size_t)(c + u) * 64));
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) chunk<MT>(acc, a[u], b[u], xrow, (c + u) << 6);
  }
  for (; c < end; ++c)
    chunk<MT>(acc, load_streaming((const uint4*)(wg + (size_t)c * 64)),
              load_streaming((const uint4*)(w8 + (size_t)c * 64)), xrow, c << 6);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][4 * mt + i][lane] = acc[mt][i];
  __syncthreads();
  if (warp != 0) return;
  const int n = blockIdx.x * 16 + g;
  const float s[2] = {scale[n], scale[n + 8]};
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    T v[4];
    add_warps(v, partial, WARPS, mt, lane);
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // the C fragment's output n + 8 (i / 2) of row m
      const int m = 8 * mt + 2 * t + (i & 1);
      if (m >= rows) continue;
      const float sum = W8A8 ? (float)v[i] * x_scale[m] : (float)v[i];
      y[(size_t)m * N + n + 8 * (i >> 1)] = float_to_bf16(sum * s[i >> 1]);
    }
  }
}

// every kernel takes the same arguments (x_scale read only by W8A8 ones)
#define KERNEL(NAME, MT, W8A8)                                                              \
  extern "C" __global__ void __launch_bounds__(WARPS * 32, 2)                               \
      NAME##_m##MT(const char* x, const float* x_scale, const char* w, const float* scale, \
                   u16* y, int rows, int N, int K) {                                        \
    gemv<MT, W8A8>(x, x_scale, w, scale, y, rows, N, K);                                    \
  }

KERNEL(int8_gemv, 1, false)
KERNEL(int8_gemv, 2, false)
KERNEL(w8a8_gemv, 1, true)
KERNEL(w8a8_gemv, 2, true)
