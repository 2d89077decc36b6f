// llmkit's CPU matrix products for decoding (few rows of activations against a weight that
// is read once per step, so the weight's bytes set the speed), registered beside cpu_ops.cpp
// as torch.ops.llmkit_cpu:
//
// - q4_linear: 4-bit grouped weights, w = s * (q - z) per group of group_size inputs, in
//   tiles of 8 output rows (repacked at load, see layers/linear.py): packed uint8
//   [N / 8, 4 K], each 128 bytes one block of 32 inputs of the tile's rows, byte 32 j + 4 r + i
//   holding input 4 j + i of row r in its low nibble and input 16 + 4 j + i in its high one;
//   scales fp16 and zeros uint8 [N / 8, K / group_size, 8], or no zeros at all where every
//   zero is 8 (symmetric quantization: a stream fewer, and the zero's share an integer).
// - q8_linear: int8 weights with one float scale per output, in tiles of 8 output rows as
//   well: packed int8 [N / 8, 8 K], each 256 bytes one block of 32 inputs of the tile's rows,
//   byte 32 c + 4 r + i holding input 4 c + i of row r.
//
// Both take the activations as int8 in blocks of 32 with one float scale each (x / scale
// rounded to nearest, scale = max|x| / 127), so a block's 32 products are one integer dot
// product (maddubs, or VNNI's vpdpbusd where the CPU has it: the same exact sums); the
// weights' scales and zeros are applied per block and group in float (a symmetric 4-bit
// weight's zero of 8 in the block's integer sum: 8 times the block's activation total).
//
// - w8a8_linear: int8 weights in q8_linear's tiles against int8 activations with one scale per
//   row (max|x| / 127, x / scale rounded half to even, as quant/int8.quantize_per_token),
//   summed in int32 over the whole row: exact, so it gives float(acc) * x_scale * scale as
//   torch._int_mm does.
// - dense_linear: bf16, fp16 or float32 weights [N, K] (the 16-bit ones widened to float32 in
//   registers), float32 sums, each row's in one order whatever the rows beside it
//   (dense_block): 1 to 3 rows in tiles of kRowOutputs outputs, from kBlockRows rows on in
//   register blocks of several outputs, the outputs of a tile or block spread over the
//   thread's share (spread).
// - pairs_linear (built where the CPU has AVX512-BF16): bf16 weights repacked at load as
//   [N / 64, K / 2, 64, 2] against bf16 activations, in the CPU's bf16 pair products
//   (exact products, float32 sums).
//
// Outputs are [M, N] in the activations' dtype (float32 or bfloat16). Output rows (tiles) are
// split over the threads; every weight block is unpacked once and used for up to 8 activation
// rows (dense_linear: up to 7 in its register blocks). In the tiled layouts one broadcast
// activation chunk serves the tile's 8 outputs, so prefills take the same kernels, a pass of
// kPassRows rows at a time.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LLMKIT_AVX2 1
#include <immintrin.h>

#include "cpu_vec.h"
#endif
// Loops over a block's registers unrolled before GCC decides where an array of vectors
// lives: left rolled, it keeps the array in memory and stores every sum at every step.
#define LLMKIT_UNROLL _Pragma("GCC unroll 16")
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define LLMKIT_AVX512BF16 1  // bf16 pair products (vdpbf16ps); the header came with AVX2's
#endif
#if defined(LLMKIT_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LLMKIT_VNNI 1  // byte dot products summed in int32 in one instruction (vpdpbusd)
#endif

namespace {

constexpr int64_t kBlock = 32;  // inputs per activation block (and per 4-bit packed block)
constexpr int kTile = 8;  // activation rows computed together against a weight row (then 4, 2, 1)
// Activation rows a block of dense_linear takes (from this many rows on, it takes them in
// register blocks of several outputs; fewer rows go in one tile).
constexpr int kBlockRows = 4;

// ---------------------------------------------------------------------------------------
// Activations

// x's rows as float32 (a copy only when x is not float32 already).
at::Tensor as_float(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? x.contiguous() : x.to(at::kFloat).contiguous();
}

// x [M, K] in int8 blocks of 32: q [M, K]; per block [M, K/32] its scale d and the sum of
// its values as quantized, total = sum(q) (d * total: the block's sum, dequantized).
struct Blocks {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> total;
  int64_t rows = 0, cols = 0;
};

#ifdef LLMKIT_AVX2
using llmkit_vec::hsum8;
using llmkit_vec::load8;

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// quantize_block's values in vectors: the same maximum, products and rounding (to nearest
// even, as nearbyint in the default mode), so the same bytes, scale and sum.
template <typename T>
void quantize_block8(const T* x, int8_t* q, float* d, int32_t* sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], top = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load8(x + 8 * i);
    top = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), top);  // a NaN leaves `top` as it was
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i n[4], total = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[i], inv),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    n[i] = _mm256_cvtps_epi32(r);
    total = _mm256_add_epi32(total, n[i]);
  }
  // int32 -> int8 (all within +-127); the packs interleave 128-bit lanes, the permute
  // puts the groups of 4 back in order
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]),
                                            _mm256_packs_epi32(n[2], n[3]));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(packed, order));
  *d = amax / 127.f;
  *sum = hsum(total);
}
#endif

template <typename T>
void quantize_block(const T* x, int8_t* q, float* d, int32_t* sum) {
#ifdef LLMKIT_AVX2
  quantize_block8(x, q, d, sum);
#else
  float v[kBlock], amax = 0.f;
  for (int64_t i = 0; i < kBlock; ++i) {
    v[i] = static_cast<float>(x[i]);
    amax = std::max(amax, std::fabs(v[i]));
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t total = 0;
  for (int64_t i = 0; i < kBlock; ++i) {
    q[i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
    total += q[i];
  }
  *d = amax / 127.f;
  *sum = total;
#endif
}

// x [M, K], float32 or bfloat16, read as it is (no float32 copy). The result is the calling
// thread's, kept and overwritten by its next call: an op quantizes its activations once and
// reads them until it returns, and a decode step, which makes dozens of these calls, then
// allocates nothing for them.
const Blocks& quantize_blocks(const at::Tensor& x) {
  thread_local Blocks kept;
  Blocks& b = kept;  // the lambda below runs on other threads too: they write this thread's
  b.rows = x.size(0), b.cols = x.size(1);
  const int64_t blocks = b.rows * (b.cols / kBlock);
  b.q.resize(b.rows * b.cols);
  b.d.resize(blocks);
  b.total.resize(blocks);
  const at::Tensor xc = x.contiguous();
  auto run = [&](const auto* p) {
    at::parallel_for(0, blocks, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        quantize_block(p + i * kBlock, &b.q[i * kBlock], &b.d[i], &b.total[i]);
    });
  };
  if (xc.scalar_type() == at::kFloat) {
    run(xc.data_ptr<float>());
  } else {
    run(xc.data_ptr<c10::BFloat16>());
  }
  return b;
}

// Output element (m, o) of a [M, N] result, rounded to T.
template <typename T>
inline void put(T* out, int64_t n, int64_t m, int64_t o, float value) {
  out[m * n + o] = static_cast<T>(value);
}

#ifdef LLMKIT_AVX2

// The 8 int32 sums of 4 products of unsigned a times signed b (32 bytes each). The pair
// sums of maddubs saturate at 16 bits, which the callers' bytes never reach (at most
// 2 x 127 x 127), so VNNI's int32 sums are the same values.
inline __m256i dot_u8s8(__m256i a, __m256i b) {
#ifdef LLMKIT_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

// The same for signed a: |b| times a with b's signs (a must not hold -128).
inline __m256i dot_s8s8(__m256i a, __m256i b) {
  return dot_u8s8(_mm256_sign_epi8(b, b), _mm256_sign_epi8(a, b));
}

// The cache line kAhead<MT> bytes on in a weight stream, asked for early: for the 4-bit and
// int8 kernels the hardware's own prefetcher alone leaves a core's reads of a few hundred
// kilobytes short of the bandwidth. The 16-bit kernels, which do less arithmetic per byte,
// decode faster without it (measured on an AVX2 host, batch 1). One activation row gets
// through a block fastest, so it asks farthest ahead to keep enough lines on their way from
// memory; more rows spend longer on each block, and lines asked for that early would wait
// in L1 long enough to be pushed out before they are read.
template <int MT>
constexpr int64_t kAhead = MT == 1 ? 6144 : 2048;
inline void prefetch(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
}

inline __m256i load32(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// 8 weights as float32 (bf16: the activations' load8, the same exact widening)
inline __m256 widen8(const c10::BFloat16* p) { return load8(p); }
inline __m256 widen8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 widen8(const float* p) { return _mm256_loadu_ps(p); }

#endif

// ---------------------------------------------------------------------------------------
// 4-bit grouped weights, in tiles of 8 output rows

constexpr int64_t kTileRows = 8;               // output rows interleaved in a tile
constexpr int64_t kTileBlock = kTileRows * 16;  // bytes of one block of 32 inputs of a tile

struct Q4 {
  const uint8_t* packed;
  const c10::Half* scales;
  const uint8_t* zeros;  // null: every zero is 8
  int64_t k, groups, blocks_per_group;
};

constexpr int32_t kSymmetricZero = 8;

// What a tile's rows take for the zeros: per block its zero share (zero_shares) where every
// zero is 8, else per group the activations' dequantized sum (group_sums).
template <bool Symmetric>
using ZeroTerms = std::conditional_t<Symmetric, int32_t, float>;

// -8 times each block's activation total: a symmetric weight block's integer sum starts
// there. Kept per thread as quantize_blocks' result is.
const std::vector<int32_t>& zero_shares(const Blocks& x) {
  thread_local std::vector<int32_t> shares;
  shares.resize(x.total.size());
  for (size_t b = 0; b < shares.size(); ++b) shares[b] = -kSymmetricZero * x.total[b];
  return shares;
}

// sum over each group of the quantized activations, dequantized: xs[m, g]. With it the
// zeros' share of a group is s * z * xs[m, g], once per group instead of per input.
// Kept per thread as quantize_blocks' result is.
const std::vector<float>& group_sums(const Blocks& x, int64_t blocks_per_group) {
  const int64_t blocks = x.rows * (x.cols / kBlock);
  thread_local std::vector<float> xs;
  xs.assign(blocks / blocks_per_group, 0.f);
  for (int64_t b = 0; b < blocks; ++b) xs[b / blocks_per_group] += x.d[b] * float(x.total[b]);
  return xs;
}

#ifdef LLMKIT_AVX2

// The 4 activation bytes of inputs 4c..4c+3 of a block in every 32-bit lane.
inline __m256i chunk(const int8_t* q, int c) {
  int32_t v;
  std::memcpy(&v, q + 4 * c, sizeof(v));
  return _mm256_set1_epi32(v);
}

// Tile `tile`'s 8 output rows against activation rows [m0, m0 + MT): res[t * 8 + r] for
// row m0 + t and output 8 * tile + r. A block's 8 x 32 products are 8 byte-pair products
// per lane (one lane per output row), summed in 16 bits (at most 8 x 2 x 15 x 127), then
// in 32; one float multiply-add per block adds them, scaled, to the row's sum, in the same
// order whatever MT is, so a row gets the same bits alone as in any batch.
template <int MT, bool Symmetric>
inline void q4_tile(const Q4& w, int64_t tile, const Blocks& x, const ZeroTerms<Symmetric>* xs,
                    int64_t m0, float* res) {
  const int64_t per_row = w.k / kBlock;
  const uint8_t* p = w.packed + tile * per_row * kTileBlock;
  const c10::Half* s = w.scales + tile * w.groups * kTileRows;
  const __m256i low = _mm256_set1_epi8(0x0F);
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0, b = 0; g < w.groups; ++g) {
    const __m256 sv = _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + g * kTileRows)));
    if constexpr (!Symmetric) {
      const uint8_t* z = w.zeros + (tile * w.groups + g) * kTileRows;
      const __m128i z8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(z));
      const __m256 sz = _mm256_mul_ps(sv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z8)));
      for (int t = 0; t < MT; ++t)
        acc[t] = _mm256_fnmadd_ps(sz, _mm256_set1_ps(xs[(m0 + t) * w.groups + g]), acc[t]);
    }
    for (const int64_t end = b + w.blocks_per_group; b < end; ++b) {
      __m256i wv[8];  // chunk c: inputs 4c..4c+3 of the block, one lane per output row
      prefetch(p + b * kTileBlock + kAhead<MT>);
      prefetch(p + b * kTileBlock + kAhead<MT> + 64);
      for (int j = 0; j < 4; ++j) {
        const __m256i raw =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + b * kTileBlock + 32 * j));
        wv[j] = _mm256_and_si256(raw, low);
#ifdef LLMKIT_VNNI  // the high nibbles left in place: 16 times their values, no shift
        wv[j + 4] = _mm256_andnot_si256(low, raw);
#else  // maddubs' 16-bit pair sums would overflow on 16 times the values
        wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
#endif
      }
      for (int t = 0; t < MT; ++t) {
        const int64_t row = (m0 + t) * per_row + b;
        const int8_t* q = &x.q[row * kBlock];
        __m256i start = _mm256_setzero_si256();  // the zero's share, or none
        if constexpr (Symmetric) start = _mm256_set1_epi32(xs[row]);
#ifdef LLMKIT_VNNI  // the same int32 sums: the low nibbles' chain, and 16 x the high ones'
        __m256i lows = start, highs = _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
          lows = _mm256_dpbusd_epi32(lows, wv[c], chunk(q, c));
          highs = _mm256_dpbusd_epi32(highs, wv[c + 4], chunk(q, c + 4));
        }  // highs is a multiple of 16 (at most 16 x 15 x 127 x 16 in size): shifted exactly
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(lows, _mm256_srai_epi32(highs, 4)));
#else
        __m256i even = _mm256_maddubs_epi16(wv[0], chunk(q, 0));
        __m256i odd = _mm256_maddubs_epi16(wv[1], chunk(q, 1));
        for (int c = 2; c < 8; c += 2) {
          even = _mm256_add_epi16(even, _mm256_maddubs_epi16(wv[c], chunk(q, c)));
          odd = _mm256_add_epi16(odd, _mm256_maddubs_epi16(wv[c + 1], chunk(q, c + 1)));
        }
        const __m256i sum = _mm256_add_epi16(even, odd);
        const __m256i sums = _mm256_add_epi32(start, _mm256_madd_epi16(sum, ones));
        const __m256 dot = _mm256_cvtepi32_ps(sums);
#endif
        acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sv, _mm256_set1_ps(x.d[row])), acc[t]);
      }
    }
  }
  for (int t = 0; t < MT; ++t) _mm256_storeu_ps(res + t * kTileRows, acc[t]);
}

#else

template <int MT, bool Symmetric>
inline void q4_tile(const Q4& w, int64_t tile, const Blocks& x, const ZeroTerms<Symmetric>* xs,
                    int64_t m0, float* res) {
  const int64_t per_row = w.k / kBlock;
  const uint8_t* p = w.packed + tile * per_row * kTileBlock;
  for (int t = 0; t < MT; ++t)
    for (int64_t r = 0; r < kTileRows; ++r) {
      float acc = 0.f;
      for (int64_t g = 0, b = 0; g < w.groups; ++g) {
        const int64_t at = (tile * w.groups + g) * kTileRows + r;
        const float sg = static_cast<float>(w.scales[at]);
        if constexpr (!Symmetric) acc -= sg * float(w.zeros[at]) * xs[(m0 + t) * w.groups + g];
        for (const int64_t end = b + w.blocks_per_group; b < end; ++b) {
          const int64_t row = (m0 + t) * per_row + b;
          int32_t sum = 0;
          if constexpr (Symmetric) sum = xs[row];
          for (int64_t i = 0; i < kBlock; ++i) {
            const uint8_t byte = p[b * kTileBlock + 32 * (i / 4 % 4) + 4 * r + i % 4];
            sum += (i < 16 ? byte & 0x0F : byte >> 4) * x.q[row * kBlock + i];
          }
          acc += float(sum) * (sg * x.d[row]);
        }
      }
      res[t * kTileRows + r] = acc;
    }
}

#endif

// Rows [m0, rows) of activations against outputs o + j gap (j < NO) in tiles of MT rows,
// then of one row fewer at a time: row(NO, MT, o, gap, m0, res) fills res[j * MT + t] with
// output o + j gap of row m0 + t.
template <int MT, int NO, typename T, typename Row>
inline void tiles(T* out, int64_t n, int64_t o, int64_t gap, int64_t m0, int64_t rows,
                  Row& row) {
  float res[NO * MT];
  for (; m0 + MT <= rows; m0 += MT) {
    row(std::integral_constant<int, NO>(), std::integral_constant<int, MT>(), o, gap, m0, res);
    for (int j = 0; j < NO; ++j)
      for (int t = 0; t < MT; ++t) put(out, n, m0 + t, o + j * gap, res[j * MT + t]);
  }
  if constexpr (MT > 1) tiles<MT - 1, NO>(out, n, o, gap, m0, rows, row);
}

// A thread's share [begin, end) of the outputs in groups of NO: group(o, gap) takes outputs
// o + j gap (j < NO), and one(o) the outputs past the last whole group alone. Spread `apart`,
// the groups' outputs lie evenly over the share (gap = the number of groups), else side by
// side (gap 1). Each output's weight row is a stream of its own, and a core's prefetchers
// keep several streams coming faster than one; spread apart, each of the NO streams runs on
// through a contiguous stretch of the weight, where adjacent outputs' rows would make short
// streams (a few lines each where K is small) that the prefetchers do not foresee.
template <int NO, typename Group, typename One>
inline void spread(int64_t begin, int64_t end, bool apart, Group group, One one) {
  const int64_t groups = (end - begin) / NO;
  for (int64_t g = 0; g < groups; ++g) apart ? group(begin + g, groups) : group(begin + g * NO, 1);
  for (int64_t o = begin + groups * NO; o < end; ++o) one(o);
}

// Outputs a tile takes at once (spread): a bandwidth-bound product reads its weight faster
// as several streams than as one, and on an AMD EPYC faster as 4 streams a core than as 8.
constexpr int kRowOutputs = 4;
// The fewest outputs a thread's share of a dense product holds (at::parallel_for's grain).
constexpr int64_t kShareOutputs = 16;

// Every output and every tile of activation rows, kRowOutputs outputs at a time, the outputs
// shared among the threads.
template <typename T, typename Row>
void each_output(const at::Tensor& out, int64_t rows, int64_t n, Row row) {
  T* o_ptr = out.data_ptr<T>();
  at::parallel_for(0, n, kShareOutputs, [&](int64_t begin, int64_t end) {
    spread<kRowOutputs>(
        begin, end, true,
        [&](int64_t o, int64_t gap) {
          tiles<kBlockRows - 1, kRowOutputs>(o_ptr, n, o, gap, 0, rows, row);
        },
        [&](int64_t o) { tiles<kBlockRows - 1, 1>(o_ptr, n, o, 1, 0, rows, row); });
  });
}

template <typename Fn>
void by_dtype(const at::Tensor& out, Fn fn) {
  if (out.scalar_type() == at::kFloat) {
    fn(float());
  } else {
    fn(c10::BFloat16());
  }
}

void check_activations(const at::Tensor& x, int64_t k, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, op, ": x must be [rows, ", k, "]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16");
}

// Tile `tile`'s 8 outputs against activation rows [m0, rows) in groups of MT rows, then of
// fewer: fn(std::integral_constant<int, MT>, tile, m0, res) fills res[t * 8 + r] with output
// 8 * tile + r of row m0 + t.
template <int MT, typename T, typename Fn>
inline void tile_rows(T* out, int64_t n, int64_t tile, int64_t m0, int64_t rows, Fn& fn) {
  float res[MT * kTileRows];
  for (; m0 + MT <= rows; m0 += MT) {
    fn(std::integral_constant<int, MT>(), tile, m0, res);
    for (int t = 0; t < MT; ++t)
      for (int64_t r = 0; r < kTileRows; ++r)
        put(out, n, m0 + t, tile * kTileRows + r, res[t * kTileRows + r]);
  }
  if constexpr (MT > 1) tile_rows<MT / 2>(out, n, tile, m0, rows, fn);
}

// Activation rows one pass over a weight multiplies (a prefill makes several passes): their
// int8 blocks stay in the core's L2 while the weight streams past them once.
constexpr int64_t kPassRows = 128;

// Every tile of a weight in tiles of 8 outputs against every row of out [rows, tiles * 8],
// as tile_rows computes them, the tiles shared among the threads.
template <typename T, typename Fn>
void each_tile(const at::Tensor& out, Fn fn) {
  const int64_t rows = out.size(0), n = out.size(1);
  T* o = out.data_ptr<T>();
  for (int64_t m0 = 0; m0 < rows; m0 += kPassRows) {
    const int64_t m1 = std::min(rows, m0 + kPassRows);
    at::parallel_for(0, n / kTileRows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) tile_rows<kTile>(o, n, tile, m0, m1, fn);
    });
  }
}

at::Tensor q4_linear(at::Tensor x, at::Tensor packed, at::Tensor scales, at::Tensor zeros,
                     int64_t group_size) {
  TORCH_CHECK(packed.dim() == 2 && packed.size(1) % (4 * kBlock) == 0,
              "q4_linear: packed must be [tiles of 8 outputs, 4 x inputs]");
  const int64_t tiles = packed.size(0), k = packed.size(1) / 4, n = tiles * kTileRows;
  check_activations(x, k, "q4_linear");
  TORCH_CHECK(packed.scalar_type() == at::kByte && zeros.scalar_type() == at::kByte &&
                  scales.scalar_type() == at::kHalf,
              "q4_linear: uint8 packed and zeros, fp16 scales are needed");
  const bool symmetric = zeros.numel() == 0;
  TORCH_CHECK(group_size % kBlock == 0 && k % group_size == 0, "q4_linear: group size ",
              group_size, " must be a multiple of 32 dividing ", k);
  const int64_t groups = k / group_size;
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous() && zeros.is_contiguous() &&
                  (symmetric || scales.sizes() == zeros.sizes()) &&
                  scales.sizes() == at::IntArrayRef({tiles, groups, kTileRows}),
              "q4_linear: scales and zeros (or no zeros) must be contiguous [", tiles, ", ",
              groups, ", 8]");
  const Q4 w{packed.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(),
             symmetric ? nullptr : zeros.data_ptr<uint8_t>(), k, groups, group_size / kBlock};
  const Blocks& xq = quantize_blocks(x);
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  auto run = [&](auto sym, const auto* xs) {
    by_dtype(out, [&](auto tag) {
      each_tile<decltype(tag)>(out, [&](auto mt, int64_t tile, int64_t m0, float* res) {
        q4_tile<decltype(mt)::value, decltype(sym)::value>(w, tile, xq, xs, m0, res);
      });
    });
  };
  if (symmetric) {
    run(std::true_type(), zero_shares(xq).data());
  } else {
    run(std::false_type(), group_sums(xq, w.blocks_per_group).data());
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// int8 weights, in tiles of 8 output rows

constexpr int64_t kI8TileBlock = kTileRows * kBlock;  // bytes of one block of 32 inputs of a tile

// Output row r's weight for input i in an int8 tile (the scalar paths' reading of the layout).
inline int32_t i8_at(const int8_t* tile, int64_t r, int64_t i) {
  return tile[i / kBlock * kI8TileBlock + 32 * (i % kBlock / 4) + 4 * r + i % 4];
}

#ifdef LLMKIT_AVX2

// Tile block p's 8 x 32 int8 weights against activation rows [m0, m0 + MT) of q ([rows, k],
// int8), inputs [i, i + 32): dot[t]'s lane r = the int32 dot product of row m0 + t with
// output row r. With VNNI the weights' bytes go in as unsigned, w + 128 (the sign bit
// flipped), and the caller takes 128 x the block's activation sum back off; without it,
// each product is |x| times w with x's sign (maddubs' pair sums stay below 2^15).
template <int MT>
inline void i8_block(const int8_t* p, const int8_t* q, int64_t k, int64_t m0, int64_t i,
                     __m256i* dot) {
  __m256i wv[8];  // chunk c: inputs 4c..4c+3, one 32-bit lane per output row
  prefetch(p + kAhead<MT>);
  prefetch(p + kAhead<MT> + 64);
  prefetch(p + kAhead<MT> + 128);
  prefetch(p + kAhead<MT> + 192);
#ifdef LLMKIT_VNNI
  const __m256i flip = _mm256_set1_epi8(-128);
  for (int c = 0; c < 8; ++c) wv[c] = _mm256_xor_si256(load32(p + 32 * c), flip);
  for (int t = 0; t < MT; ++t) {
    const int8_t* x = q + (m0 + t) * k + i;
    __m256i even = _mm256_setzero_si256(), odd = _mm256_setzero_si256();
    for (int c = 0; c < 8; c += 2) {
      even = _mm256_dpbusd_epi32(even, wv[c], chunk(x, c));
      odd = _mm256_dpbusd_epi32(odd, wv[c + 1], chunk(x, c + 1));
    }
    dot[t] = _mm256_add_epi32(even, odd);
  }
#else
  for (int c = 0; c < 8; ++c) wv[c] = load32(p + 32 * c);
  for (int t = 0; t < MT; ++t) {
    const int8_t* x = q + (m0 + t) * k + i;
    __m256i even = _mm256_setzero_si256(), odd = _mm256_setzero_si256();
    for (int c = 0; c < 8; c += 2) {
      even = _mm256_add_epi32(even, dot_s8s8(wv[c], chunk(x, c)));
      odd = _mm256_add_epi32(odd, dot_s8s8(wv[c + 1], chunk(x, c + 1)));
    }
    dot[t] = _mm256_add_epi32(even, odd);
  }
#endif
}

// What i8_block's dot products need taken off for the activations' sum `total` (VNNI only).
inline __m256i unflipped(__m256i dot, int32_t total) {
#ifdef LLMKIT_VNNI
  return _mm256_sub_epi32(dot, _mm256_set1_epi32(128 * total));
#else
  return dot;
#endif
}

#endif

// One 8-output tile against activation rows [m0, m0 + MT) in blocks of 32 (weight-only
// int8): res[t * 8 + r] = scale[r] * the sum over blocks of block scale x integer dot.
template <int MT>
inline void q8_tile(const int8_t* p, const float* scale, int64_t k, const Blocks& x, int64_t m0,
                    float* res) {
  const int64_t per_row = k / kBlock;
#ifdef LLMKIT_AVX2
  __m256 acc[MT];
  __m256i dot[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < per_row; ++b) {
    i8_block<MT>(p + b * kI8TileBlock, x.q.data(), k, m0, b * kBlock, dot);
    for (int t = 0; t < MT; ++t) {
      const int64_t row = (m0 + t) * per_row + b;
      const __m256 d = _mm256_cvtepi32_ps(unflipped(dot[t], x.total[row]));
      acc[t] = _mm256_fmadd_ps(d, _mm256_broadcast_ss(&x.d[row]), acc[t]);
    }
  }
  const __m256 sv = _mm256_loadu_ps(scale);
  for (int t = 0; t < MT; ++t) _mm256_storeu_ps(res + t * kTileRows, _mm256_mul_ps(acc[t], sv));
#else
  for (int t = 0; t < MT; ++t)
    for (int64_t r = 0; r < kTileRows; ++r) {
      float acc = 0.f;
      for (int64_t b = 0; b < per_row; ++b) {
        const int64_t row = (m0 + t) * per_row + b;
        int32_t sum = 0;
        for (int64_t i = 0; i < kBlock; ++i)
          sum += i8_at(p, r, b * kBlock + i) * x.q[row * kBlock + i];
        acc += float(sum) * x.d[row];
      }
      res[t * kTileRows + r] = scale[r] * acc;
    }
#endif
}

void check_int8_weight(const at::Tensor& packed, const at::Tensor& scale, const char* op) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  packed.size(1) % (kTileRows * kBlock) == 0,
              op, ": packed must be contiguous int8 [tiles of 8 outputs, 8 x inputs], the "
              "inputs a multiple of 32");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == packed.size(0) * kTileRows,
              op, ": scale must be float32 [outputs]");
}

at::Tensor q8_linear(at::Tensor x, at::Tensor packed, at::Tensor scale) {
  check_int8_weight(packed, scale, "q8_linear");
  const int64_t n = scale.numel(), k = packed.size(1) / kTileRows;
  check_activations(x, k, "q8_linear");
  const Blocks& xq = quantize_blocks(x);
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  by_dtype(out, [&](auto tag) {
    each_tile<decltype(tag)>(out, [&](auto mt, int64_t tile, int64_t m0, float* res) {
      q8_tile<decltype(mt)::value>(w + tile * kTileRows * k, s + tile * kTileRows, k, xq, m0,
                                   res);
    });
  });
  return out;
}

// Rows of x as int8 with one scale per row: scale = max|x| / 127 (1 for a zero row),
// q = x / scale rounded half to even, as quant/int8.quantize_per_token; total: each row's sum.
void quantize_rows(const at::Tensor& x32, std::vector<int8_t>& q, std::vector<float>& d,
                   std::vector<int32_t>& total) {
  const int64_t rows = x32.size(0), k = x32.size(1);
  const float* x = x32.data_ptr<float>();
  q.resize(rows * k);
  d.resize(rows);
  total.resize(rows);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = x + m * k;
      float amax = 0.f;
      for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
      const float scale = amax > 0.f ? amax / 127.f : 1.f;
      int32_t sum = 0;
      for (int64_t i = 0; i < k; ++i) {
        q[m * k + i] = static_cast<int8_t>(
            std::min(std::max(std::nearbyint(row[i] / scale), -128.f), 127.f));
        sum += q[m * k + i];
      }
      d[m] = scale;
      total[m] = sum;
    }
  });
}

// One 8-output tile against per-row int8 activation rows [m0, m0 + MT): the int32 sums over
// the whole row, then float(sum) * x_scale * scale.
template <int MT>
inline void w8a8_tile(const int8_t* p, const float* scale, int64_t k, const int8_t* xq,
                      const float* xd, const int32_t* total, int64_t m0, float* res) {
#ifdef LLMKIT_AVX2
  __m256i acc[MT], dot[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_si256();
  for (int64_t b = 0; b < k / kBlock; ++b) {
    i8_block<MT>(p + b * kI8TileBlock, xq, k, m0, b * kBlock, dot);
    for (int t = 0; t < MT; ++t) acc[t] = _mm256_add_epi32(acc[t], dot[t]);
  }
  const __m256 sv = _mm256_loadu_ps(scale);
  for (int t = 0; t < MT; ++t) {
    const __m256 sum = _mm256_cvtepi32_ps(unflipped(acc[t], total[m0 + t]));
    _mm256_storeu_ps(res + t * kTileRows,
                     _mm256_mul_ps(_mm256_mul_ps(sum, _mm256_set1_ps(xd[m0 + t])), sv));
  }
#else
  for (int t = 0; t < MT; ++t)
    for (int64_t r = 0; r < kTileRows; ++r) {
      int32_t sum = 0;
      for (int64_t i = 0; i < k; ++i) sum += i8_at(p, r, i) * xq[(m0 + t) * k + i];
      res[t * kTileRows + r] = float(sum) * xd[m0 + t] * scale[r];
    }
#endif
}

at::Tensor w8a8_linear(at::Tensor x, at::Tensor packed, at::Tensor scale) {
  check_int8_weight(packed, scale, "w8a8_linear");
  const int64_t n = scale.numel(), k = packed.size(1) / kTileRows;
  check_activations(x, k, "w8a8_linear");
  std::vector<int8_t> xq;
  std::vector<float> xd;
  std::vector<int32_t> total;
  quantize_rows(as_float(x), xq, xd, total);
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  by_dtype(out, [&](auto tag) {
    each_tile<decltype(tag)>(out, [&](auto mt, int64_t tile, int64_t m0, float* res) {
      w8a8_tile<decltype(mt)::value>(w + tile * kTileRows * k, s + tile * kTileRows, k,
                                     xq.data(), xd.data(), total.data(), m0, res);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// bf16, fp16 and float32 weights
//
// Every (output, row) is summed in one order, whatever the outputs and rows computed beside
// it: one running sum of 8 float32 lanes over the row's blocks of inputs in turn (Widened's
// blocks, each vector of a block in turn), its lanes added up (hsum8), then the inputs past
// the last block one by one. A row thus gets the same bits alone, in a decode step of any
// size and in a speculative verify step. Tiles and blocks differ only in how many outputs
// and rows share their loads; the sums of several outputs hide each other's FMA latency.

#ifdef LLMKIT_AVX2

// A block of inputs of one weight row as float32 vectors: 8 inputs, in order.
template <typename W>
struct Widened {
  static constexpr int64_t kWidth = 8;
  static constexpr int kVectors = 1;
  static constexpr bool kPairs = false;  // activations in order
  static __m256 load(const W* w, int64_t b, int) { return widen8(w + 8 * b); }
};

#ifdef __AVX512VL__
// bf16 weights where the CPU has AVX-512's 32 registers: 16 inputs at a time, vector 0 the 8
// even inputs (the low halves of the 32-bit lanes, shifted up) and vector 1 the 8 odd ones
// (the high halves, masked), against activations in that order (pair_ordered): one
// instruction widens 8 weights where widen8 takes two. With AVX2's 16 registers a block of
// two vectors leaves room for too few outputs, and bf16 weights take widen8's blocks.
template <>
struct Widened<c10::BFloat16> {
  static constexpr int64_t kWidth = 16;
  static constexpr int kVectors = 2;
  static constexpr bool kPairs = true;
  static __m256 load(const c10::BFloat16* w, int64_t b, int v) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * b));
    return _mm256_castsi256_ps(v == 0 ? _mm256_slli_epi32(raw, 16)
                                      : _mm256_and_si256(raw, _mm256_set1_epi32(-65536)));
  }
};

// x [M, K] (float32 or bf16) as float32 with each block of 16 inputs reordered as bf16
// weights' Widened blocks take them: the 8 even inputs, then the 8 odd ones; the inputs past
// the last 16 in place. The calling thread's, kept and overwritten by its next call (as
// quantize_blocks' result is): no tensor is made for it.
const std::vector<float>& pair_ordered(const at::Tensor& x) {
  thread_local std::vector<float> out;
  const int64_t rows = x.size(0), k = x.size(1);
  out.resize(rows * k);
  const at::Tensor xc = x.contiguous();
  auto fill = [&](const auto* p) {
    for (int64_t m = 0; m < rows; ++m) {
      int64_t i = 0;
      for (; i + 16 <= k; i += 16)
        for (int j = 0; j < 16; ++j)
          out[m * k + i + j / 2 + 8 * (j % 2)] = static_cast<float>(p[m * k + i + j]);
      for (; i < k; ++i) out[m * k + i] = static_cast<float>(p[m * k + i]);
    }
  };
  if (xc.scalar_type() == at::kFloat) {
    fill(xc.data_ptr<float>());
  } else {
    fill(xc.data_ptr<c10::BFloat16>());
  }
  return out;
}
#endif

#endif

// Outputs [0, NT) (weight rows w + j ws) against activation rows [m0, m0 + MT), each (output,
// row) summed in the one order above; x holds rows of K float32 activations (pair_ordered
// where Widened<W> takes pairs). res[j * MT + t]: output j of row m0 + t.
// A tile (MT < kBlockRows) takes one weight vector at a time against each row's activation
// vector straight from L1; a block holds its NT weight vectors and each activation vector in
// registers, once, so each weight vector serves MT rows and each activation vector NT outputs.
template <int NT, int MT, typename W>
inline void dense_block(const W* w, int64_t ws, int64_t k, const float* x, int64_t m0,
                        float* res) {
  int64_t i = 0;
#ifdef LLMKIT_AVX2
  using B = Widened<W>;
  const int64_t blocks = k / B::kWidth;
  __m256 acc[NT][MT];
  LLMKIT_UNROLL for (int j = 0; j < NT; ++j)
    LLMKIT_UNROLL for (int t = 0; t < MT; ++t) acc[j][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b)
    LLMKIT_UNROLL for (int v = 0; v < B::kVectors; ++v) {
      const float* xb = x + m0 * k + B::kWidth * b + 8 * v;
      if constexpr (MT < kBlockRows) {
        LLMKIT_UNROLL for (int j = 0; j < NT; ++j) {
          const __m256 wv = B::load(w + j * ws, b, v);
          LLMKIT_UNROLL for (int t = 0; t < MT; ++t)
            acc[j][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + t * k), acc[j][t]);
        }
      } else {
        __m256 wv[NT];
        LLMKIT_UNROLL for (int j = 0; j < NT; ++j) wv[j] = B::load(w + j * ws, b, v);
        LLMKIT_UNROLL for (int t = 0; t < MT; ++t) {
          __m256 xv = _mm256_loadu_ps(xb + t * k);
          // In a register, once: left to itself the compiler reloads it into every
          // multiply-add as a memory operand, which makes the loads, not the multiply-adds,
          // the limit.
          asm("" : "+x"(xv));
          LLMKIT_UNROLL for (int j = 0; j < NT; ++j)
            acc[j][t] = _mm256_fmadd_ps(wv[j], xv, acc[j][t]);
        }
      }
    }
  LLMKIT_UNROLL for (int j = 0; j < NT; ++j)
    LLMKIT_UNROLL for (int t = 0; t < MT; ++t) res[j * MT + t] = hsum8(acc[j][t]);
  i = blocks * B::kWidth;
#else
  for (int t = 0; t < NT * MT; ++t) res[t] = 0.f;
#endif
  for (; i < k; ++i)
    for (int j = 0; j < NT; ++j)
      for (int t = 0; t < MT; ++t)
        res[j * MT + t] += static_cast<float>(w[j * ws + i]) * x[(m0 + t) * k + i];
}

// x's rows as dense_block reads them against weights W: pair_ordered where Widened<W> takes
// pairs, else as float32 (x32 holds them where a copy is made).
template <typename W>
const float* dense_rows(const at::Tensor& x, at::Tensor& x32) {
#ifdef __AVX512VL__
  if constexpr (Widened<W>::kPairs) return pair_ordered(x).data();
#endif
  x32 = as_float(x);
  return x32.data_ptr<float>();
}

#ifdef LLMKIT_AVX2

// Outputs a block of kBlockRows rows holds: their running sums, the outputs' weight
// vectors and an activation vector fill the vector registers, 32 where the CPU has AVX-512
// (ymm16 to ymm31 too), else AVX2's 16.
#ifdef __AVX512VL__
constexpr int kBlockOutputs = 4;
#else
constexpr int kBlockOutputs = 3;
#endif

// From this many rows on, the blocks take adjacent outputs: bound by arithmetic, they gain
// nothing from spread-out streams, and with AVX2 alone they lose a little by them.
constexpr int64_t kSpreadMaxRows = 32;

// Outputs o + j gap (j < NT) against activation rows [m0, m0 + MT), written to out.
template <int NT, int MT, typename T, typename W>
inline void put_block(T* out, const W* w, int64_t n, int64_t k, const float* x, int64_t o,
                      int64_t gap, int64_t m0) {
  float res[NT * MT];
  dense_block<NT, MT>(w + o * k, gap * k, k, x, m0, res);
  for (int j = 0; j < NT; ++j)
    for (int t = 0; t < MT; ++t) put(out, n, m0 + t, o + j * gap, res[j * MT + t]);
}

// Outputs o + j gap (j < NT) for all `rows` (at least kBlockRows) activation rows: blocks
// of kBlockRows rows, the last one taking the rows left over too (kBlockRows to twice
// that less one; with AVX2 alone its sums spill a few registers, which costs less than a
// tile).
template <int NT, typename T, typename W>
inline void row_blocks(T* out, const W* w, int64_t n, int64_t k, const float* x, int64_t o,
                       int64_t gap, int64_t rows) {
  constexpr int MT = kBlockRows;
  static_assert(MT == 4, "the last block below takes 4 to 7 rows");
  int64_t m0 = 0;
  for (; rows - m0 >= 2 * MT; m0 += MT) put_block<NT, MT>(out, w, n, k, x, o, gap, m0);
  switch (rows - m0) {
    case 7: return put_block<NT, 7>(out, w, n, k, x, o, gap, m0);
    case 6: return put_block<NT, 6>(out, w, n, k, x, o, gap, m0);
    case 5: return put_block<NT, 5>(out, w, n, k, x, o, gap, m0);
    default: return put_block<NT, 4>(out, w, n, k, x, o, gap, m0);
  }
}

// Every output in blocks of kBlockOutputs outputs, spread over the thread's share below
// kSpreadMaxRows rows (the outputs past the last whole block alone), the outputs shared
// among the threads.
template <typename T, typename W>
void blocked(const at::Tensor& out, const W* w, int64_t k, const float* x) {
  const int64_t rows = out.size(0), n = out.size(1);
  T* o_ptr = out.data_ptr<T>();
  at::parallel_for(0, n, kShareOutputs, [&](int64_t begin, int64_t end) {
    spread<kBlockOutputs>(
        begin, end, rows < kSpreadMaxRows,
        [&](int64_t o, int64_t gap) {
          row_blocks<kBlockOutputs>(o_ptr, w, n, k, x, o, gap, rows);
        },
        [&](int64_t o) { row_blocks<1>(o_ptr, w, n, k, x, o, 1, rows); });
  });
}

#endif

at::Tensor dense_linear(at::Tensor x, at::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kHalf ||
                   weight.scalar_type() == at::kFloat),
              "dense_linear: weight must be contiguous bf16, fp16 or float32 [out, in]");
  const int64_t n = weight.size(0), k = weight.size(1);
  check_activations(x, k, "dense_linear");
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty({rows, n}, x.options());
  auto run = [&](auto tag, auto weights) {
    using T = decltype(tag);
    using W = std::remove_const_t<std::remove_pointer_t<decltype(weights)>>;
    at::Tensor x32;
    const float* xp = dense_rows<W>(x, x32);
#ifdef LLMKIT_AVX2
    if (rows >= kBlockRows) return blocked<T>(out, weights, k, xp);
#endif
    auto row = [&](auto no, auto mt, int64_t o, int64_t gap, int64_t m0, float* res) {
      dense_block<decltype(no)::value, decltype(mt)::value>(weights + o * k, gap * k, k, xp,
                                                            m0, res);
    };
    each_output<T>(out, rows, n, row);
  };
  by_dtype(out, [&](auto tag) {
    if (weight.scalar_type() == at::kBFloat16) {
      run(tag, weight.data_ptr<c10::BFloat16>());
    } else if (weight.scalar_type() == at::kHalf) {
      run(tag, weight.data_ptr<c10::Half>());
    } else {
      run(tag, weight.data_ptr<float>());
    }
  });
  return out;
}

#ifdef LLMKIT_AVX512BF16

// ---------------------------------------------------------------------------------------
// bf16 weights in pairs of inputs, for AVX512-BF16's pair products (vdpbf16ps: each float32
// lane adds the two exact products of a pair of bf16 inputs)

// packed [N / 64, K / 2, 64, 2]: for each group of 64 outputs and each pair of inputs, the
// 64 outputs' two weights side by side. A vector holds a pair of 16 outputs, so a pair of an
// activation row broadcast to every lane multiplies all of them, and each lane keeps one
// output's sum: no sums across lanes, and the group's weights stream in one run.
constexpr int64_t kPairOutputs = 64;
constexpr int kPairVectors = kPairOutputs / 16;
constexpr int kPairRows = 6;  // 24 sums, 4 weight vectors and a broadcast of 32 registers
constexpr int64_t kPairChunk = 64;  // activation rows whose pairs stay in cache together

// Group `w` (pairs of it) against activation rows x[0, MT) (rows of `pairs` pairs), written
// to out's rows [0, MT) (rows of n), outputs [0, 64) of them.
template <int MT>
inline void pairs_tile(const uint32_t* w, int64_t pairs, const c10::BFloat16* x,
                       c10::BFloat16* out, int64_t n) {
  __m512 acc[kPairVectors][MT];
  LLMKIT_UNROLL for (int j = 0; j < kPairVectors; ++j)
    LLMKIT_UNROLL for (int t = 0; t < MT; ++t) acc[j][t] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[kPairVectors];
    LLMKIT_UNROLL for (int j = 0; j < kPairVectors; ++j)
      wv[j] = (__m512bh)_mm512_loadu_si512(w + p * kPairOutputs + 16 * j);
    LLMKIT_UNROLL for (int t = 0; t < MT; ++t) {
      uint32_t pair;
      std::memcpy(&pair, x + t * 2 * pairs + 2 * p, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      LLMKIT_UNROLL for (int j = 0; j < kPairVectors; ++j)
        acc[j][t] = _mm512_dpbf16_ps(acc[j][t], wv[j], xv);
    }
  }
  LLMKIT_UNROLL for (int t = 0; t < MT; ++t)
    LLMKIT_UNROLL for (int j = 0; j < kPairVectors; ++j)  // rounded to nearest even
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + t * n + 16 * j),
                          (__m256i)_mm512_cvtneps_pbh(acc[j][t]));
}

// Group `w` against activation rows [0, rows): tiles of kPairRows rows, then the rest in one
// tile (a verify step's k + 1 rows in one pass over the weights; each row's sums are the same
// whatever its tile).
inline void pairs_rows(const uint32_t* w, int64_t pairs, const c10::BFloat16* x,
                       c10::BFloat16* out, int64_t n, int64_t rows) {
  int64_t m = 0;
  auto tile = [&](auto mt) {
    pairs_tile<decltype(mt)::value>(w, pairs, x + m * 2 * pairs, out + m * n, n);
  };
  for (; m + kPairRows <= rows; m += kPairRows) tile(std::integral_constant<int, kPairRows>());
  static_assert(kPairRows == 6, "the rest below takes at most 5 rows");
  switch (rows - m) {
    case 5: tile(std::integral_constant<int, 5>()); break;
    case 4: tile(std::integral_constant<int, 4>()); break;
    case 3: tile(std::integral_constant<int, 3>()); break;
    case 2: tile(std::integral_constant<int, 2>()); break;
    case 1: tile(std::integral_constant<int, 1>()); break;
    default: break;
  }
}

at::Tensor pairs_linear(at::Tensor x, at::Tensor packed) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPairOutputs && packed.size(3) == 2 &&
                  packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "pairs_linear: packed must be contiguous bf16 [outputs / 64, inputs / 2, 64, 2]");
  const int64_t groups = packed.size(0), pairs = packed.size(1), n = groups * kPairOutputs;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == 2 * pairs && x.scalar_type() == at::kBFloat16,
              "pairs_linear: x must be bf16 [rows, ", 2 * pairs, "]");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty({rows, n}, x.options());
  const auto* w = reinterpret_cast<const uint32_t*>(packed.data_ptr<c10::BFloat16>());
  const c10::BFloat16* xp = xc.data_ptr<c10::BFloat16>();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  for (int64_t m0 = 0; m0 < rows; m0 += kPairChunk) {
    const int64_t chunk = std::min(kPairChunk, rows - m0);
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g)
        pairs_rows(w + g * pairs * kPairOutputs, pairs, xp + m0 * 2 * pairs,
                   o + m0 * n + g * kPairOutputs, n, chunk);
    });
  }
  return out;
}

#endif

// ---------------------------------------------------------------------------------------
// Weights in 2 MiB pages

constexpr size_t kHugePage = size_t(2) << 20;

// `bytes` of zeros, rounded up to whole 2 MiB pages starting on a 2 MiB boundary, that the
// kernel is asked to back with 2 MiB pages (transparent huge pages, madvise; a hint it may
// ignore): uint8 [the rounded size]. Mapped anonymously, so a page is committed when first
// written. Weights streamed whole at every step (layers/pages.py places them) and the KV
// cache's blocks read by attention cost a page walk per 2 MiB instead of per 4 KiB.
at::Tensor huge_pages(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "huge_pages: a negative size");
  const size_t size = std::max<size_t>(1, (size_t(bytes) + kHugePage - 1) / kHugePage) * kHugePage;
  const size_t span = size + kHugePage;  // room to start on a 2 MiB boundary
  void* mapped = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(mapped != MAP_FAILED, "huge_pages: cannot map ", size, " bytes");
  char* base = static_cast<char*>(mapped);
  char* p = base + (kHugePage - reinterpret_cast<uintptr_t>(base) % kHugePage) % kHugePage;
  if (p > base) munmap(base, p - base);  // the parts before and after the aligned pages
  if (base + span > p + size) munmap(p + size, base + span - (p + size));
  madvise(p, size, MADV_HUGEPAGE);  // before the first touch, which chooses the page size
  return at::from_blob(p, {int64_t(size)}, [size](void* q) { munmap(q, size); },
                       at::TensorOptions().dtype(at::kByte));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkit_cpu, m) {
  m.def("q4_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor packed, Tensor scale) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor packed, Tensor scale) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor weight) -> Tensor");
  m.impl("q4_linear", c10::DispatchKey::CPU, q4_linear);
  m.impl("q8_linear", c10::DispatchKey::CPU, q8_linear);
  m.impl("w8a8_linear", c10::DispatchKey::CPU, w8a8_linear);
  m.impl("dense_linear", c10::DispatchKey::CPU, dense_linear);
  m.def("huge_pages(int bytes) -> Tensor", huge_pages);  // no tensor in: one kernel for all
#ifdef LLMKIT_AVX512BF16
  m.def("pairs_linear(Tensor x, Tensor packed) -> Tensor");
  m.impl("pairs_linear", c10::DispatchKey::CPU, pairs_linear);
#endif
}
