// AVX2 helpers the CPU kernels share (cpu_ops.cpp, cpu_gemm.cpp), for translation units
// built with AVX2 and FMA (they check, then include this).

#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

namespace llmkit_vec {

// 8 activations as float32 (a bf16 is the top half of a float32: exact).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// The sum of the 8 lanes, in one fixed order.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

}  // namespace llmkit_vec
