// llmkit's CPU kernels, registered as torch.ops.llmkit_cpu:
//
// - paged_decode: decode attention over the paged KV cache, one query token per row (a
//   sequence's, or one of its draft tokens'); keys and values read in place from the cache
//   blocks (no gathered copy), float32 arithmetic. cache: [num_blocks, kv_heads, block_size,
//   head_dim], head_dim a multiple of 8 (16-lane vectors, then one of 8 where 8 values are
//   left); the heads sharing a KV head are done together, so each key and value is read
//   once per (row, KV head), and the rows of one sequence's draft share that read where
//   the threads keep work enough (decode's runs) (with AVX-512 and head_dim 64 or 128, also
//   widened to float32 once for several of them, and 16 keys' dot products summed across
//   lanes together).
// - write_kv: new tokens' keys and values into their cache slots.
// - add_rms_norm: residual += x, then RMSNorm of the sum, rounded as the llama family's
//   reference code rounds (normalised in float32, cast to the model dtype, times the weight).
// - silu_mul: silu(gate) * up from the merged gate/up projection.
// - rotary: q and k rotated by their positions' cos/sin (rotate-half form).
// - decode_attention: rotary, write_kv and paged_decode of a decode step in one call, from
//   the qkv projection's output (the C++ decode layer's attention, cpu_layer.cpp).
// - gptq_columns: GPTQ's column sweep over a run of columns sharing one group's scale and
//   zero, inside a block of columns (each row independent, so rows run in parallel).
// - argmax_rows: each row's argmax as torch.argmax gives it, a greedy step's tokens from its
//   logits, float32 or bfloat16 (vectorized and rows in parallel: a step's argmax is on its
//   critical path).
//
// The element-wise ones round every intermediate to the model dtype where the reference's
// torch code does, so they give its values, not merely close ones.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define LLMKIT_AVX2 1
#include "cpu_vec.h"
#endif

namespace {

constexpr int kLanes = 16;
constexpr int kHeadDimMultiple = 8;  // of the attention kernels' head_dim (cpu.HEAD_DIM_MULTIPLE)

// The vector exp's constants: x clamped to [kExpMin, kExpMax] (0 below, inf above),
// x = n ln2 + r with ln2 in two parts, e^r by its Taylor series to r^7 (relative error below
// 1e-7), highest power first.
constexpr float kExpMin = -104.f, kExpMax = 89.f, kLog2e = 1.44269504f;
constexpr float kLn2High = 0.693145752f, kLn2Low = 1.42860677e-6f;
constexpr float kExpTaylor[] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24,
                                1.f / 6,    0.5f,      1.f,       1.f};

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

#ifdef LLMKIT_AVX2
// 8 lanes, for every CPU with AVX2: silu_mul computed and rounded as silu_mul_16 does (for
// CPUs without AVX-512, where a scalar std::exp was a large share of a decode step), and the
// vector paths of the norm, rotary and softmax kernels, which AVX-512 CPUs take too.

using llmkit_vec::hsum8;
using llmkit_vec::load8;

// 2^k for k in [-126, 127], built in the exponent field.
inline __m256 pow2_8(__m256i k) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
}

// exp16's computation. Its 2^n (n from -150 to 128) is applied as 2^(n/2) twice over, so no
// factor leaves the exponent field's range; the first product is exact, the second rounds
// once, as scalef does.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpMin)), _mm256_set1_ps(kExpMax));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  __m256 p = _mm256_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[i]));
  const __m256i k = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(k, 1);
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2_8(half)), pow2_8(_mm256_sub_epi32(k, half)));
}

inline __m256 round8(__m256 x, float) { return x; }
inline __m256 round8(__m256 x, c10::BFloat16) {  // to nearest even, NaN kept
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256 rounded = _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(-65536)));
  return _mm256_blendv_ps(rounded, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
inline void store8(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
inline void store8(c10::BFloat16* p, __m256 x) {  // x already holds a bf16 value
  const __m256i top = _mm256_srli_epi32(_mm256_castps_si256(x), 16);
  const __m128i packed =
      _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

template <typename T>
inline void silu_mul_8(const T* gate, const T* up, T* out) {
  const __m256 g = load8(gate);
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
  const __m256 act = round8(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e)), T());
  store8(out, round8(_mm256_mul_ps(act, load8(up)), T()));
}
#endif

#ifdef __AVX512F__

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the top half of a float32
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(k + d), acc);
  float sum = _mm512_reduce_add_ps(acc);
  if (d < dim) sum += hsum8(_mm256_mul_ps(_mm256_loadu_ps(q + d), load8(k + d)));  // 8 left
  return sum;
}

template <typename T>
inline void axpy(float* out, float a, const T* v, int64_t dim) {
  const __m512 scale = _mm512_set1_ps(a);
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes)
    _mm512_storeu_ps(out + d, _mm512_fmadd_ps(scale, load16(v + d), _mm512_loadu_ps(out + d)));
  if (d < dim)  // 8 left
    _mm256_storeu_ps(out + d, _mm256_fmadd_ps(_mm512_castps512_ps256(scale), load8(v + d),
                                              _mm256_loadu_ps(out + d)));
}

// exp(x) = e^r * 2^n, with the constants above.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpMin)), _mm512_set1_ps(kExpMax));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  __m512 p = _mm512_set1_ps(kExpTaylor[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpTaylor[i]));
  return _mm512_scalef_ps(p, n);
}

// row[t] = exp(row[t] - top); returns their sum.
inline float exp_shifted(float* row, int64_t len, float top) {
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + kLanes <= len; t += kLanes) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + t), shift));
    _mm512_storeu_ps(row + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (t < len) {
    const __mmask16 tail = (__mmask16)((1u << (len - t)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + t), shift));
    _mm512_mask_storeu_ps(row + t, tail, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
  }
  return _mm512_reduce_add_ps(sum);
}

// The float nearest x that T can hold (round to nearest even, NaN kept), and stores of it.
inline __m512 round16(__m512 x, float) { return x; }
inline __m512 round16(__m512 x, c10::BFloat16) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __m512 rounded = _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(-65536)));
  return _mm512_mask_mov_ps(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(c10::BFloat16* p, __m512 x) {  // x already holds a bf16 value
  const __m256i top = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(x), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), top);
}

// r[i] = the sum of v[i]'s 16 lanes, for 16 vectors at once: halves of each vector added
// pairwise across vectors (128-bit lanes, then pairs, then single floats), then one
// permutation puts each vector's sum in its lane.
inline __m512 sum_lanes(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int j = 0; j < 8; ++j)  // 128-bit lanes: v[j]'s halves, v[j + 8]'s halves
    w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[j], v[j + 8], 0x44),
                         _mm512_shuffle_f32x4(v[j], v[j + 8], 0xEE));
  for (int j = 0; j < 4; ++j)  // 128-bit lanes: v[j], v[j + 8], v[j + 4], v[j + 12]
    x[j] = _mm512_add_ps(_mm512_shuffle_f32x4(w[j], w[j + 4], 0x88),
                         _mm512_shuffle_f32x4(w[j], w[j + 4], 0xDD));
  for (int k = 0; k < 2; ++k)
    y[k] = _mm512_add_ps(_mm512_unpacklo_ps(x[k], x[k + 2]), _mm512_unpackhi_ps(x[k], x[k + 2]));
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(y[0]), _mm512_castps_pd(y[1]));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(y[0]), _mm512_castps_pd(y[1]));
  const __m512 z = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(order, z);
}

// scores[g * len + t] for queries g = g0 .. g0 + GS - 1 and the n (<= 16) keys t = start..
// at `rows` (NV * 16 values apart): each key converted to float32 once for the GS queries
// (scaled, float32, NV vectors each), and the 16 keys' sums of each query reduced together.
template <int NV, int GS, typename T>
inline void block_key_scores(const float* query, int64_t g0, const T* rows, int64_t n,
                             float* scores, int64_t len, int64_t start) {
  __m512 sums[GS][16];
  for (int64_t i = 0; i < 16; ++i) {
    __m512 key[NV];
    for (int v = 0; v < NV; ++v)
      key[v] = i < n ? load16(rows + (i * NV + v) * kLanes) : _mm512_setzero_ps();
    for (int g = 0; g < GS; ++g) {
      const float* q = query + (g0 + g) * NV * kLanes;
      __m512 acc = _mm512_setzero_ps();
      for (int v = 0; v < NV; ++v)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + v * kLanes), key[v], acc);
      sums[g][i] = acc;
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << n) - 1);
  for (int g = 0; g < GS; ++g)
    _mm512_mask_storeu_ps(scores + (g0 + g) * len + start, keep, sum_lanes(sums[g]));
}

// acc[g][v] += scores[g * len + t] * value t for the GS queries' weights and the n values
// t = start.. at `rows`: each value converted to float32 once for the GS queries.
template <int NV, int GS, typename T>
inline void add_values(__m512 (&acc)[GS][NV], const float* scores, int64_t len, const T* rows,
                       int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    __m512 value[NV];
    for (int v = 0; v < NV; ++v) value[v] = load16(rows + (i * NV + v) * kLanes);
    for (int g = 0; g < GS; ++g) {
      const __m512 w = _mm512_set1_ps(scores[g * len + i]);
      for (int v = 0; v < NV; ++v) acc[g][v] = _mm512_fmadd_ps(w, value[v], acc[g][v]);
    }
  }
}

// silu(g) * u, 16 at a time, each rounded to T where torch's ops round.
template <typename T>
inline void silu_mul_16(const T* gate, const T* up, T* out) {
  const __m512 g = load16(gate);
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
  const __m512 act = round16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), T());
  store16(out, round16(_mm512_mul_ps(act, load16(up)), T()));
}

#elif defined(LLMKIT_AVX2)  // AVX-512's dot and axpy in two 8-lane halves

template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    low = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), low);
    high = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8(k + d + 8), high);
  }
  if (d < dim) low = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), low);  // 8 left
  return hsum8(_mm256_add_ps(low, high));
}

template <typename T>
inline void axpy(float* out, float a, const T* v, int64_t dim) {
  const __m256 scale = _mm256_set1_ps(a);
  for (int64_t d = 0; d < dim; d += 8)
    _mm256_storeu_ps(out + d, _mm256_fmadd_ps(scale, load8(v + d), _mm256_loadu_ps(out + d)));
}

#else  // portable loops the compiler may vectorize

template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  float acc[kLanes] = {0};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += q[d + j] * to_float(k[d + j]);
  for (int j = 0; d + j < dim; ++j) acc[j] += q[d + j] * to_float(k[d + j]);  // 8 left
  float sum = 0.f;
  for (int j = 0; j < kLanes; ++j) sum += acc[j];
  return sum;
}

template <typename T>
inline void axpy(float* out, float a, const T* v, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) out[d] += a * to_float(v[d]);
}

#endif

#if !defined(__AVX512F__)

inline float exp_shifted(float* row, int64_t len, float top) {
  float sum = 0.f;
  int64_t t = 0;
#ifdef LLMKIT_AVX2
  const __m256 shift = _mm256_set1_ps(top);
  __m256 sums = _mm256_setzero_ps();
  for (; t + 8 <= len; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + t), shift));
    _mm256_storeu_ps(row + t, e);
    sums = _mm256_add_ps(sums, e);
  }
  sum = hsum8(sums);
#endif
  for (; t < len; ++t) sum += (row[t] = std::exp(row[t] - top));
  return sum;
}

#endif

// The cache rows of one KV head in one block (block_size x head_dim values, contiguous),
// asked for ahead of their use: in a decode step the weights streamed since the cache was
// last read have pushed it out to memory, and rows read one at a time come at memory
// latency, not bandwidth. Into L2, not L1: a block's lines asked into L1 take its few miss
// buffers, and the fetches then queue behind one another instead of overlapping.
inline void prefetch_rows(const void* rows, int64_t bytes) {
#if defined(__AVX2__) || defined(__AVX512F__)
  for (int64_t i = 0; i < bytes; i += 64)
    _mm_prefetch(static_cast<const char*>(rows) + i, _MM_HINT_T1);
#endif
}

constexpr int64_t kAheadBlocks = 2;  // blocks prefetched ahead of the one being read

// One KV head's keys or values of one sequence in the cache: `len` rows of `dim` values,
// `offset` elements into each of the blocks `table` names.
template <typename T>
struct Cache {
  const T* data;
  const int64_t* table;
  int64_t len, block_size, block_stride, offset, dim;

  // fn(start, rows, n) for each block: its n tokens from `start` on, `rows` at their first
  // value. The block kAheadBlocks on is prefetched, and so is the same block of `next` (the
  // cache read after this one) when it is given.
  template <typename Fn>
  void blocks(Fn fn, const T* next = nullptr) const {
    const int64_t count = (len + block_size - 1) / block_size,
                  bytes = block_size * dim * sizeof(T);
    for (int64_t b = 0; b < std::min(count, kAheadBlocks); ++b) prefetch_rows(rows(b), bytes);
    for (int64_t start = 0, b = 0; start < len; start += block_size, ++b) {
      if (b + kAheadBlocks < count) prefetch_rows(rows(b + kAheadBlocks), bytes);
      if (next != nullptr) prefetch_rows(in(next).rows(b), bytes);
      fn(start, rows(b), std::min(block_size, len - start));
    }
  }
  // fn(t, row) for each token, block by block, so no division per token.
  template <typename Fn>
  void tokens(Fn fn, const T* next = nullptr) const {
    blocks([&](int64_t start, const T* first, int64_t n) {
      for (int64_t i = 0; i < n; ++i) fn(start + i, first + i * dim);
    }, next);
  }
  // The same rows of another cache laid out alike (the values beside the keys).
  Cache in(const T* other) const {
    return {other, table, len, block_size, block_stride, offset, dim};
  }

 private:
  const T* rows(int64_t b) const { return data + table[b] * block_stride + offset; }
};

#ifdef __AVX512F__
// key_scores for head_dim NV * 16: the queries GS at a time (then GS / 2 where that many are
// left, then one at a time), 16 keys at a time.
template <int NV, int GS, typename T>
void key_scores_by(const Cache<T>& keys, const float* query, int64_t group, float* scores,
                   const T* next) {
  keys.blocks([&](int64_t start, const T* rows, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
      const int64_t m = std::min<int64_t>(16, n - i), at = start + i;
      const T* chunk = rows + i * NV * kLanes;
      int64_t g = 0;
      for (; g + GS <= group; g += GS)
        block_key_scores<NV, GS>(query, g, chunk, m, scores, keys.len, at);
      if constexpr (GS > 2) {  // a remainder of GS / 2 or more: that many together
        if (g + GS / 2 <= group) {
          block_key_scores<NV, GS / 2>(query, g, chunk, m, scores, keys.len, at);
          g += GS / 2;
        }
      }
      for (; g < group; ++g) block_key_scores<NV, 1>(query, g, chunk, m, scores, keys.len, at);
    }
  }, next);
}

// weighted_values for head_dim NV * 16: GS queries' sums held in registers over all values
// (then one query at a time).
template <int NV, int GS, typename T>
void weighted_values_by(const Cache<T>& values, const float* scores, int64_t group,
                        float* acc) {
  const auto some = [&](auto gs, int64_t g0) {
    constexpr int kGroups = decltype(gs)::value;
    __m512 sums[kGroups][NV];
    for (auto& row : sums)
      for (auto& x : row) x = _mm512_setzero_ps();
    const float* weights = scores + g0 * values.len;
    values.blocks([&](int64_t start, const T* rows, int64_t n) {
      add_values<NV, kGroups>(sums, weights + start, values.len, rows, n);
    });
    for (int g = 0; g < kGroups; ++g)
      for (int v = 0; v < NV; ++v)
        _mm512_storeu_ps(acc + ((g0 + g) * NV + v) * kLanes, sums[g][v]);
  };
  int64_t g = 0;
  for (; g + GS <= group; g += GS) some(std::integral_constant<int, GS>(), g);
  for (; g < group; ++g) some(std::integral_constant<int, 1>(), g);
}
#endif

// scores [group, len]: each of the group's queries [group, dim] (scaled, float32) against
// each key; `next`: the cache read after this one (its blocks prefetched alongside). With
// AVX-512 and 64 or 128 dims, each key is converted once for several queries, and 16 keys'
// sums are reduced together.
template <typename T>
void key_scores(const Cache<T>& keys, const float* query, int64_t group, float* scores,
                const T* next) {
#ifdef __AVX512F__
  if (keys.dim == 64) return key_scores_by<4, 4>(keys, query, group, scores, next);
  if (keys.dim == 128) return key_scores_by<8, 2>(keys, query, group, scores, next);
#endif
  const int64_t len = keys.len, dim = keys.dim;
  keys.tokens([&](int64_t t, const T* key) {
    for (int64_t g = 0; g < group; ++g) scores[g * len + t] = dot(query + g * dim, key, dim);
  }, next);
}

// acc [group, dim] = each query's weights (scores [group, len]) times the values, the
// products added in token order (with AVX-512 and 64 or 128 dims, each value converted once
// for several queries, whose sums stay in registers).
template <typename T>
void weighted_values(const Cache<T>& values, const float* scores, int64_t group, float* acc) {
#ifdef __AVX512F__
  if (values.dim == 64) return weighted_values_by<4, 3>(values, scores, group, acc);
  if (values.dim == 128) return weighted_values_by<8, 2>(values, scores, group, acc);
#endif
  const int64_t len = values.len, dim = values.dim;
  std::fill(acc, acc + group * dim, 0.f);
  values.tokens([&](int64_t t, const T* value) {
    for (int64_t g = 0; g < group; ++g) axpy(acc + g * dim, scores[g * len + t], value, dim);
  });
}

constexpr int64_t kMaxRunRows = 16;  // rows of one pass over a sequence's cache, at most

// The rows that share a pass over the cache, as runs of up to max_rows: a row joins the one
// before it where its length is no shorter and its block table names the same blocks for
// all of that row's keys (a sequence's draft tokens, a query each: every row of a run
// attends to a prefix of its last row's keys). -> each run's first row, then num_rows.
std::vector<int64_t> shared_runs(const int64_t* tables, const int64_t* lens, int64_t num_rows,
                                 int64_t max_blocks, int64_t block_size, int64_t max_rows) {
  std::vector<int64_t> starts;
  if (num_rows > 0) starts.push_back(0);
  for (int64_t r = 1; r < num_rows; ++r) {
    const int64_t* table = tables + r * max_blocks;
    const int64_t blocks = (lens[r - 1] + block_size - 1) / block_size;  // the row before's
    const bool joins = r - starts.back() < max_rows && lens[r] >= lens[r - 1] &&
                       std::equal(table, table + blocks, table - max_blocks);
    if (!joins) starts.push_back(r);
  }
  starts.push_back(num_rows);
  return starts;
}

// Attention of queries [rows, heads, dim] (row r at q + r * q_stride, its heads one after
// another) over their sequences' cached keys and values; out [rows, heads, dim] contiguous.
// A run of rows (shared_runs) is one item per KV head: its rows' queries against its last
// row's keys, each query's weights past its own length zero. Runs are cut shorter where
// whole ones would leave threads without an item (a pass's queries are one thread's work).
template <typename T>
void decode(T* out_ptr, const T* q_ptr, int64_t q_stride, int64_t num_rows, int64_t num_heads,
            const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
            const at::Tensor& context_lens, double scale) {
  const int64_t dim = k_cache.size(3), kv_heads = k_cache.size(1), block_size = k_cache.size(2);
  const int64_t group = num_heads / kv_heads, max_blocks = block_tables.size(1);
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t head_stride = block_size * dim, block_stride = kv_heads * head_stride;
  const int64_t max_rows =
      std::clamp<int64_t>(num_rows * kv_heads / at::get_num_threads(), 1, kMaxRunRows);
  const std::vector<int64_t> runs =
      shared_runs(tables, lens, num_rows, max_blocks, block_size, max_rows);
  const int64_t num_runs = static_cast<int64_t>(runs.size()) - 1;

  at::parallel_for(0, num_runs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    // kept from call to call (a decode step makes one call per layer)
    thread_local std::vector<float> query, acc, total, scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t first = runs[item / kv_heads], last = runs[item / kv_heads + 1] - 1;
      const int64_t h = item % kv_heads, n = (last - first + 1) * group, len = lens[last];
      query.resize(n * dim), acc.resize(n * dim), total.resize(n);
      for (int64_t r = first; r <= last; ++r) {  // query j: row first + j / group
        const T* q_row = q_ptr + r * q_stride + h * group * dim;
        float* into = &query[(r - first) * group * dim];
        for (int64_t i = 0; i < group * dim; ++i) into[i] = to_float(q_row[i]) * float(scale);
      }
      scores.assign(n * len, 0.f);
      const Cache<T> keys{k_ptr, tables + last * max_blocks, len, block_size, block_stride,
                          h * head_stride, dim};
      const Cache<T> values = keys.in(v_ptr);
      key_scores(keys, query.data(), n, scores.data(), values.data);
      for (int64_t j = 0; j < n; ++j) {
        float* row = &scores[j * len];
        const int64_t own = lens[first + j / group];
        total[j] = exp_shifted(row, own, *std::max_element(row, row + own));
        std::fill(row + own, row + len, 0.f);
      }
      weighted_values(values, scores.data(), n, acc.data());
      for (int64_t j = 0; j < n; ++j) {
        const int64_t r = first + j / group, g = j % group;
        T* o = out_ptr + (r * num_heads + h * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[j * dim + d] / total[j]);
      }
    }
  });
}

void check_decode(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t num_heads,
                  const at::Tensor& block_tables, const at::Tensor& context_lens, const char* op) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && block_tables.is_contiguous() &&
                  context_lens.is_contiguous(),
              op, ": caches, block tables and lengths must be contiguous");
  TORCH_CHECK(k_cache.size(3) % kHeadDimMultiple == 0, op, ": head_dim must be a multiple of 8");
  TORCH_CHECK(num_heads % k_cache.size(1) == 0, op, ": heads % kv_heads != 0");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              op, ": block tables and lengths must be int64");
}

void paged_decode(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                  at::Tensor block_tables, at::Tensor context_lens, double scale) {
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && out.sizes() == q.sizes() &&
                  q.size(2) == k_cache.size(3),
              "paged_decode: q and out must be contiguous [seqs, heads, head_dim]");
  check_decode(k_cache, v_cache, q.size(1), block_tables, context_lens, "paged_decode");
  const int64_t seqs = q.size(0), heads = q.size(1), stride = heads * q.size(2);
  if (q.scalar_type() == at::kFloat) {
    decode(out.data_ptr<float>(), q.data_ptr<float>(), stride, seqs, heads, k_cache, v_cache,
           block_tables, context_lens, scale);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "paged_decode: float32 or bfloat16 only");
    using B = c10::BFloat16;
    decode(out.data_ptr<B>(), q.data_ptr<B>(), stride, seqs, heads, k_cache, v_cache,
           block_tables, context_lens, scale);
  }
}

// Token i's keys and values, head h at ks + i * k0 + h * k1 (bytes; likewise vs), copied to
// cache slot slot[i]; `bytes` per head.
void write_slots(char* kc, char* vc, const char* ks, int64_t k0, int64_t k1, const char* vs,
                 int64_t v0, int64_t v1, const int64_t* slot, int64_t tokens, int64_t kv_heads,
                 int64_t block_size, int64_t bytes) {
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t block = slot[i] / block_size, offset = slot[i] % block_size;
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t at = ((block * kv_heads + h) * block_size + offset) * bytes;
        std::memcpy(kc + at, ks + i * k0 + h * k1, bytes);
        std::memcpy(vc + at, vs + i * v0 + h * v1, bytes);
      }
    }
  });
}

void write_kv(at::Tensor k_cache, at::Tensor v_cache, at::Tensor k, at::Tensor v,
              at::Tensor slots) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slots.is_contiguous(),
              "write_kv: caches and slots must be contiguous");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "write_kv: head_dim must be contiguous");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "write_kv: dtypes differ");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "write_kv: slots must be int64");
  const int64_t elt = k.element_size();
  write_slots(static_cast<char*>(k_cache.data_ptr()), static_cast<char*>(v_cache.data_ptr()),
              static_cast<const char*>(k.data_ptr()), k.stride(0) * elt, k.stride(1) * elt,
              static_cast<const char*>(v.data_ptr()), v.stride(0) * elt, v.stride(1) * elt,
              slots.data_ptr<int64_t>(), k.size(0), k.size(1), k_cache.size(2),
              k.size(2) * elt);
}

template <typename T>
void add_rms_norm_rows(at::Tensor& out, at::Tensor& residual, const at::Tensor& x,
                       const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), dim = x.size(1);
  T* res = residual.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const T* in = x.data_ptr<T>();
  const T* w = weight.data_ptr<T>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> sum;  // kept between calls: a step makes dozens
    sum.resize(dim);
    for (int64_t r = begin; r < end; ++r) {
      T* rr = res + r * dim;
      const T* x = in + r * dim;
      float squares = 0.f;
      int64_t d = 0;
#ifdef LLMKIT_AVX2
      __m256 acc = _mm256_setzero_ps();
      for (; d + 8 <= dim; d += 8) {
        const __m256 total = round8(_mm256_add_ps(load8(rr + d), load8(x + d)), T());
        store8(rr + d, total);
        _mm256_storeu_ps(&sum[d], total);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(total, total));
      }
      squares = hsum8(acc);
#endif
      for (; d < dim; ++d) {  // the sum is rounded to T, as a T + T add is
        const T total = static_cast<T>(to_float(rr[d]) + to_float(x[d]));
        rr[d] = total;
        sum[d] = to_float(total);
        squares += sum[d] * sum[d];
      }
      const float inv = 1.f / std::sqrt(squares / float(dim) + float(eps));
      d = 0;
#ifdef LLMKIT_AVX2
      const __m256 scale = _mm256_set1_ps(inv);
      for (; d + 8 <= dim; d += 8) {
        const __m256 normed = round8(_mm256_mul_ps(_mm256_loadu_ps(&sum[d]), scale), T());
        store8(o + r * dim + d, round8(_mm256_mul_ps(load8(w + d), normed), T()));
      }
#endif
      for (; d < dim; ++d) {
        const T normed = static_cast<T>(sum[d] * inv);
        o[r * dim + d] = static_cast<T>(to_float(w[d]) * to_float(normed));
      }
    }
  });
}

// residual += x; returns RMSNorm(residual) * weight. x, residual: [rows, dim].
at::Tensor add_rms_norm(at::Tensor residual, at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(residual.is_contiguous() && x.is_contiguous() && weight.is_contiguous(),
              "add_rms_norm: tensors must be contiguous");
  TORCH_CHECK(x.dim() == 2 && residual.sizes() == x.sizes() && weight.size(0) == x.size(1),
              "add_rms_norm: shapes differ");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "add_rms_norm: dtypes differ");
  at::Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    add_rms_norm_rows<float>(out, residual, x, weight, eps);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "add_rms_norm: float32 or bfloat16 only");
    add_rms_norm_rows<c10::BFloat16>(out, residual, x, weight, eps);
  }
  return out;
}

template <typename T>
inline T round_to(float x) { return static_cast<T>(x); }

// out[r, i] = silu(gate[r, i]) * up[r, i], gate_up = [gate | up] per row.
template <typename T>
void silu_mul_rows(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = out.size(0), width = out.size(1);
  const T* in = gate_up.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = in + r * 2 * width;
      const T* up = gate + width;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + kLanes <= width; i += kLanes) silu_mul_16(gate + i, up + i, o + r * width + i);
#elif defined(__AVX2__) && defined(__FMA__)
      for (; i + 8 <= width; i += 8) silu_mul_8(gate + i, up + i, o + r * width + i);
#endif
      for (; i < width; ++i) {
        const float g = to_float(gate[i]);
        const float act = to_float(round_to<T>(g / (1.f + std::exp(-g))));
        o[r * width + i] = round_to<T>(act * to_float(up[i]));
      }
    }
  });
}

at::Tensor silu_mul(at::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "silu_mul: a contiguous [rows, 2 * width] tensor is needed");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_rows<float>(gate_up, out);
  } else {
    TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16, "silu_mul: float32 or bfloat16 only");
    silu_mul_rows<c10::BFloat16>(gate_up, out);
  }
  return out;
}

// x * cos + rotate_half(x) * sin for every head of every token, each product and the sum
// rounded to T as torch's element-wise ops round them.
// x: head h of token t at in + t * s0 + h * s1; out: at o + t * o0 + h * dim.
template <typename T>
void rotate_rows(const T* in, int64_t s0, int64_t s1, int64_t tokens, int64_t heads, int64_t dim,
                 T* o, int64_t o0, const T* cos, const T* sin) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * dim;
      const T* s = sin + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        const T* v = in + t * s0 + h * s1;
        T* w = o + t * o0 + h * dim;
        int64_t i = 0;
#ifdef LLMKIT_AVX2
        // inputs i and i + half together: each product rounded, then their sum (the negated
        // one subtracted, which rounds the same)
        for (; half % 8 == 0 && i < half; i += 8) {
          const __m256 lo = load8(v + i), hi = load8(v + i + half);
          const __m256 lo_c = round8(_mm256_mul_ps(lo, load8(c + i)), T());
          const __m256 hi_s = round8(_mm256_mul_ps(hi, load8(s + i)), T());
          const __m256 hi_c = round8(_mm256_mul_ps(hi, load8(c + i + half)), T());
          const __m256 lo_s = round8(_mm256_mul_ps(lo, load8(s + i + half)), T());
          store8(w + i, round8(_mm256_sub_ps(lo_c, hi_s), T()));
          store8(w + i + half, round8(_mm256_add_ps(hi_c, lo_s), T()));
        }
        if (i == half) i = dim;  // both halves done
#endif
        for (; i < dim; ++i) {
          const float rotated = i < half ? -to_float(v[i + half]) : to_float(v[i - half]);
          const float a = to_float(round_to<T>(to_float(v[i]) * to_float(c[i])));
          const float b = to_float(round_to<T>(rotated * to_float(s[i])));
          w[i] = round_to<T>(a + b);
        }
      }
    }
  });
}

// x [tokens, heads, dim] (dim contiguous) rotated into out, contiguous of its shape.
template <typename T>
void rotate(const at::Tensor& x, at::Tensor& out, const at::Tensor& cos, const at::Tensor& sin) {
  rotate_rows(x.data_ptr<T>(), x.stride(0), x.stride(1), x.size(0), x.size(1), x.size(2),
              out.data_ptr<T>(), x.size(1) * x.size(2), cos.data_ptr<T>(), sin.data_ptr<T>());
}

std::tuple<at::Tensor, at::Tensor> rotary(at::Tensor q, at::Tensor k, at::Tensor cos,
                                          at::Tensor sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1,
              "rotary: q and k must be [tokens, heads, head_dim] with head_dim contiguous");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == q.size(0) * q.size(2),
              "rotary: cos and sin must be contiguous [tokens, head_dim]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == cos.scalar_type() &&
                  q.scalar_type() == sin.scalar_type(),
              "rotary: dtypes differ");
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  if (q.scalar_type() == at::kFloat) {
    rotate<float>(q, q_out, cos, sin);
    rotate<float>(k, k_out, cos, sin);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "rotary: float32 or bfloat16 only");
    using B = c10::BFloat16;
    rotate<B>(q, q_out, cos, sin);
    rotate<B>(k, k_out, cos, sin);
  }
  return {q_out, k_out};
}

// A decode step's attention from its qkv projection, qkv [tokens, (heads + 2 kv_heads) *
// head_dim]: q and k rotated as rotary() does, k and v written to their slots as write_kv()
// does, then each token's query over its sequence's cache as paged_decode() does (the same
// values, in one call without the intermediate tensors) -> [tokens, heads * head_dim].
at::Tensor decode_attention(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor k_cache,
                            at::Tensor v_cache, at::Tensor slots, at::Tensor block_tables,
                            at::Tensor context_lens, int64_t num_heads, double scale) {
  check_decode(k_cache, v_cache, num_heads, block_tables, context_lens, "decode_attention");
  const int64_t tokens = qkv.size(0), kv_heads = k_cache.size(1), dim = k_cache.size(3);
  const int64_t width = (num_heads + 2 * kv_heads) * dim, rotated = (num_heads + kv_heads) * dim;
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == width,
              "decode_attention: qkv must be contiguous [tokens, ", width, "]");
  TORCH_CHECK(qkv.scalar_type() == k_cache.scalar_type() &&
                  qkv.scalar_type() == v_cache.scalar_type() &&
                  qkv.scalar_type() == cos.scalar_type() && qkv.scalar_type() == sin.scalar_type(),
              "decode_attention: dtypes differ");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == tokens * dim &&
                  sin.numel() == tokens * dim,
              "decode_attention: cos and sin must be contiguous [tokens, head_dim]");
  TORCH_CHECK(slots.is_contiguous() && slots.scalar_type() == at::kLong &&
                  slots.numel() == tokens && block_tables.size(0) == tokens &&
                  context_lens.numel() == tokens,
              "decode_attention: a slot, a block table row and a length per token");
  at::Tensor qk = at::empty({tokens, rotated}, qkv.options());  // rotated q heads, then k's
  at::Tensor out = at::empty({tokens, num_heads * dim}, qkv.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* in = qkv.data_ptr<T>();
    T* r = qk.data_ptr<T>();
    const T* c = cos.data_ptr<T>();
    const T* s = sin.data_ptr<T>();
    const int64_t q_size = num_heads * dim, elt = sizeof(T);
    rotate_rows(in, width, dim, tokens, num_heads, dim, r, rotated, c, s);
    rotate_rows(in + q_size, width, dim, tokens, kv_heads, dim, r + q_size, rotated, c, s);
    write_slots(static_cast<char*>(k_cache.data_ptr()), static_cast<char*>(v_cache.data_ptr()),
                reinterpret_cast<const char*>(r + q_size), rotated * elt, dim * elt,
                reinterpret_cast<const char*>(in + q_size + kv_heads * dim), width * elt,
                dim * elt, slots.data_ptr<int64_t>(), tokens, kv_heads, k_cache.size(2),
                dim * elt);
    decode(out.data_ptr<T>(), r, rotated, tokens, num_heads, k_cache, v_cache, block_tables,
           context_lens, scale);
  };
  if (qkv.scalar_type() == at::kFloat) {
    run(float());
  } else {
    TORCH_CHECK(qkv.scalar_type() == at::kBFloat16, "decode_attention: float32 or bfloat16 only");
    run(c10::BFloat16());
  }
  return out;
}

// Columns [start, stop) of a GPTQ block, for every row: round the column with the row's
// scale and zero, record the scaled error and subtract its share from the block's later
// columns. Every product and difference is rounded on its own, as the torch ops do (built
// without FMA contraction), so the result is theirs bit for bit.
void gptq_columns(at::Tensor w, at::Tensor q, at::Tensor err, at::Tensor hinv, at::Tensor scale,
                  at::Tensor zero, int64_t start, int64_t stop, int64_t maxq) {
  const int64_t rows = w.size(0), width = w.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && err.scalar_type() == at::kFloat &&
                  hinv.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat &&
                  zero.scalar_type() == at::kFloat && q.scalar_type() == at::kByte,
              "gptq_columns: float32 w, err, hinv, scale, zero and uint8 q are needed");
  TORCH_CHECK(w.is_contiguous() && err.is_contiguous() && q.is_contiguous() &&
                  hinv.is_contiguous() && scale.is_contiguous() && zero.is_contiguous(),
              "gptq_columns: contiguous tensors are needed");
  TORCH_CHECK(err.sizes() == w.sizes() && q.sizes() == w.sizes() && hinv.size(0) == width &&
                  hinv.size(1) == width && scale.numel() == rows && zero.numel() == rows &&
                  0 <= start && start <= stop && stop <= width,
              "gptq_columns: shapes do not match");
  float* W = w.data_ptr<float>();
  float* E = err.data_ptr<float>();
  uint8_t* Q = q.data_ptr<uint8_t>();
  const float* H = hinv.data_ptr<float>();
  const float* S = scale.data_ptr<float>();
  const float* Z = zero.data_ptr<float>();
  const float top = static_cast<float>(maxq);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = W + r * width;
      for (int64_t i = start; i < stop; ++i) {
        const float x = row[i];
        const float level = std::min(std::max(std::nearbyint(x / S[r]) + Z[r], 0.f), top);
        const float e = (x - S[r] * (level - Z[r])) / H[i * width + i];
        Q[r * width + i] = static_cast<uint8_t>(level);
        E[r * width + i] = e;
        const float* h = H + i * width;
        for (int64_t k = i; k < width; ++k) row[k] -= e * h[k];
      }
    }
  });
}

// The index of the first largest of x[0, n), or of the first NaN when there is one (a NaN
// counts as larger than any number), as torch.argmax. bf16 values are compared as the
// float32 values they widen to (exactly), so they give the index their float32 copy gives.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  float top = -INFINITY;
  bool nan = false;
  int64_t i = 0;
#ifdef LLMKIT_AVX2
  using llmkit_vec::load8;
  __m256 most = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = load8(x + i);
    most = _mm256_max_ps(most, v);  // NaNs are tracked apart
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  nan = _mm256_movemask_ps(unordered) != 0;
  float lanes[8];
  _mm256_storeu_ps(lanes, most);
  for (const float lane : lanes) top = std::max(top, lane);
#endif
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    nan = nan || std::isnan(v);
    top = std::isnan(v) ? top : std::max(top, v);
  }
  int64_t j = 0;
#ifdef LLMKIT_AVX2
  const __m256 wanted = _mm256_set1_ps(top);
  for (; j + 8 <= n; j += 8) {
    const __m256 v = load8(x + j);
    const __m256 hit = nan ? _mm256_cmp_ps(v, v, _CMP_UNORD_Q) : _mm256_cmp_ps(v, wanted, _CMP_EQ_OQ);
    if (const int mask = _mm256_movemask_ps(hit)) return j + __builtin_ctz(mask);
  }
#endif
  for (; j < n; ++j) {
    const float v = static_cast<float>(x[j]);
    if (nan ? std::isnan(v) : v == top) return j;
  }
  return 0;
}

// logits: float32 or bfloat16 [rows, n], each row contiguous (rows may be a view's: a
// padded lm_head's output cut at the vocabulary).
at::Tensor argmax_rows(at::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "argmax_rows: logits must be float32 or bfloat16 [rows, n > 0]");
  const at::Tensor x = logits.stride(1) == 1 ? logits : logits.contiguous();
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  auto each = [&](const auto* p) {
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) o[r] = argmax_row(p + r * stride, n);
    });
  };
  if (x.scalar_type() == at::kFloat) {
    each(x.data_ptr<float>());
  } else {
    each(x.data_ptr<c10::BFloat16>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(llmkit_cpu, m) {
  m.def("paged_decode(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
        "Tensor block_tables, Tensor context_lens, float scale) -> ()");
  m.def("write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()");
  m.def("add_rms_norm(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slots, Tensor block_tables, Tensor context_lens, "
        "int num_heads, float scale) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, paged_decode);
  m.impl("write_kv", c10::DispatchKey::CPU, write_kv);
  m.impl("add_rms_norm", c10::DispatchKey::CPU, add_rms_norm);
  m.impl("silu_mul", c10::DispatchKey::CPU, silu_mul);
  m.impl("rotary", c10::DispatchKey::CPU, rotary);
  m.impl("decode_attention", c10::DispatchKey::CPU, decode_attention);
  m.def("gptq_columns(Tensor(a!) w, Tensor(b!) q, Tensor(c!) err, Tensor hinv, Tensor scale, "
        "Tensor zero, int start, int stop, int maxq) -> ()");
  m.impl("gptq_columns", c10::DispatchKey::CPU, gptq_columns);
  m.def("argmax_rows(Tensor logits) -> Tensor");
  m.impl("argmax_rows", c10::DispatchKey::CPU, argmax_rows);
}
