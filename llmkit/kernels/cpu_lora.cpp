// LoRA adapters' low-rank products on a step's rows, in one call per Linear
// (torch.ops.llmkit_cpu.lora_add; runtime/lora.py decides when it applies):
//
//   y[rows of run i] += (x[rows of run i] A_i^T) B_i^T
//
// for each run i of rows of one adapter, given as bounds [start_0, stop_0, start_1, ...]
// with that adapter's a_t [in, r] and b_t [r, out] in float32 (the scale folded into b_t)
// and its blocks [n, 4] int64: outputs [out_start, out_stop) take only rank rows
// [rank_start, rank_stop) of b_t (a merged Linear's parts each have their own rank rows;
// the rest of b_t is never read, and outputs in no block are left as they are).
// y and x are [rows, out] and [rows, in], both float32 or both bfloat16. Each row's sums run
// in one fixed order whatever the run's length and the thread count, so a row gets the same
// result in any batch: the rank products over the inputs in order, the output's over the
// rank in order, then one add to y (one rounding to y's dtype).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#define LLMKIT_AVX2 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 4;      // rows computed together against one tile of b_t
constexpr int64_t kColumns = 16;  // outputs per tile (two AVX2 registers)

struct Run {
  int64_t start, stop, rank;
  const float* a;  // [in, rank]
  const float* b;  // [rank, out]
  const int64_t* blocks;  // [n_blocks, 4]: out_start, out_stop, rank_start, rank_stop
  int64_t n_blocks;
};

// t[m0 .. m0+MT, c .. c+8*NV] = x[m0 .. m0+MT] a[:, c .. c+8*NV] (x: float rows of `in`,
// a: [in, rank], t: rows of `rank`); the inputs summed in order.
template <int MT, int NV>
inline void shrink_tile(const float* x, int64_t in, const float* a, int64_t rank, float* t,
                        int64_t m0, int64_t c) {
#if LLMKIT_AVX2
  __m256 acc[MT][NV];
  for (int r = 0; r < MT; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < in; ++i) {
    __m256 av[NV];
    for (int v = 0; v < NV; ++v) av[v] = _mm256_loadu_ps(a + i * rank + c + 8 * v);
    for (int r = 0; r < MT; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + (m0 + r) * in + i);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(xv, av[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MT; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(t + (m0 + r) * rank + c + 8 * v, acc[r][v]);
#else
  for (int r = 0; r < MT; ++r)
    for (int64_t j = c; j < c + 8 * NV; ++j) {
      float acc = 0.f;
      for (int64_t i = 0; i < in; ++i) acc = std::fma(x[(m0 + r) * in + i], a[i * rank + j], acc);
      t[(m0 + r) * rank + j] = acc;
    }
#endif
}

// One rank column of one row (the columns past the last full vector).
inline void shrink_one(const float* x, int64_t in, const float* a, int64_t rank, float* t,
                       int64_t m, int64_t j) {
  float acc = 0.f;
  for (int64_t i = 0; i < in; ++i) acc = std::fma(x[m * in + i], a[i * rank + j], acc);
  t[m * rank + j] = acc;
}

// t[m, :rank] for rows [m0, m1) (relative to x and t), in tiles of 4 rows, then of 1.
template <int MT>
void shrink_rows(const float* x, int64_t in, const float* a, int64_t rank, float* t,
                 int64_t m0, int64_t m1) {
  for (; m0 + MT <= m1; m0 += MT) {
    int64_t c = 0;
    for (; c + 16 <= rank; c += 16) shrink_tile<MT, 2>(x, in, a, rank, t, m0, c);
    for (; c + 8 <= rank; c += 8) shrink_tile<MT, 1>(x, in, a, rank, t, m0, c);
    for (; c < rank; ++c)
      for (int r = 0; r < MT; ++r) shrink_one(x, in, a, rank, t, m0 + r, c);
  }
  if constexpr (MT > 1) shrink_rows<1>(x, in, a, rank, t, m0, m1);
}

template <typename T>
inline float value_at(const T* p) {
  return static_cast<float>(*p);
}

// y[m0 .. m0+MT, o .. o+kColumns] += t[m0 .., :rank] b[:rank, o ..]; the rank summed in order.
// y[m0 .. m0+MT, o .. o+kColumns] += t[m0 .., j0:j1] b[j0:j1, o ..] (t: rows of `rank`);
// the rank summed in order.
template <int MT, typename T>
inline void expand_tile(T* y, int64_t out, const float* t, int64_t rank, const float* b,
                        int64_t j0, int64_t j1, int64_t m0, int64_t o) {
  float acc[MT][kColumns];
#if LLMKIT_AVX2
  __m256 lo[MT], hi[MT];
  for (int r = 0; r < MT; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t j = j0; j < j1; ++j) {
    const __m256 b0 = _mm256_loadu_ps(b + j * out + o), b1 = _mm256_loadu_ps(b + j * out + o + 8);
    for (int r = 0; r < MT; ++r) {
      const __m256 tv = _mm256_broadcast_ss(t + (m0 + r) * rank + j);
      lo[r] = _mm256_fmadd_ps(tv, b0, lo[r]);
      hi[r] = _mm256_fmadd_ps(tv, b1, hi[r]);
    }
  }
  for (int r = 0; r < MT; ++r) {
    _mm256_storeu_ps(acc[r], lo[r]);
    _mm256_storeu_ps(acc[r] + 8, hi[r]);
  }
#else
  for (int r = 0; r < MT; ++r) std::fill(acc[r], acc[r] + kColumns, 0.f);
  for (int64_t j = j0; j < j1; ++j)
    for (int r = 0; r < MT; ++r)
      for (int64_t c = 0; c < kColumns; ++c)
        acc[r][c] = std::fma(t[(m0 + r) * rank + j], b[j * out + o + c], acc[r][c]);
#endif
  for (int r = 0; r < MT; ++r) {
    T* row = y + (m0 + r) * out + o;
    for (int64_t c = 0; c < kColumns; ++c) row[c] = static_cast<T>(value_at(row + c) + acc[r][c]);
  }
}

// The same for one row and one output (the columns past a block's last full tile).
template <typename T>
inline void expand_one(T* y, int64_t out, const float* t, int64_t rank, const float* b,
                       int64_t j0, int64_t j1, int64_t m, int64_t o) {
  float acc = 0.f;
  for (int64_t j = j0; j < j1; ++j) acc = std::fma(t[m * rank + j], b[j * out + o], acc);
  y[m * out + o] = static_cast<T>(value_at(y + m * out + o) + acc);
}

// The run's products on outputs [o0, o1), block by block: each output reads only the rank
// rows of its own block (a merged Linear's parts: the other parts' rows of b are zero).
// y: the run's first row; t: its rank products, a row of run.rank per row of the run.
template <typename T>
void expand_columns(T* y, int64_t out, const float* t, const Run& run, int64_t o0, int64_t o1) {
  const int64_t rows = run.stop - run.start;
  for (int64_t k = 0; k < run.n_blocks; ++k) {
    const int64_t* block = run.blocks + 4 * k;
    const int64_t j0 = block[2], j1 = block[3], end = std::min(o1, block[1]);
    int64_t o = std::max(o0, block[0]);
    for (; o + kColumns <= end; o += kColumns) {
      int64_t m = 0;
      for (; m + kRows <= rows; m += kRows)
        expand_tile<kRows>(y, out, t, run.rank, run.b, j0, j1, m, o);
      for (; m < rows; ++m) expand_tile<1>(y, out, t, run.rank, run.b, j0, j1, m, o);
    }
    for (; o < end; ++o)
      for (int64_t m = 0; m < rows; ++m) expand_one(y, out, t, run.rank, run.b, j0, j1, m, o);
  }
}

template <typename T>
void lora_rows(at::Tensor& y, const at::Tensor& x32, const std::vector<Run>& runs) {
  const int64_t in = x32.size(1), out = y.size(1), rows = y.size(0);
  const float* xp = x32.data_ptr<float>();
  T* yp = y.data_ptr<T>();
  // Run i's rank products: a row of run.rank floats per row of the run, from starts[i].
  std::vector<int64_t> offsets{0};
  for (const Run& run : runs) offsets.push_back(offsets.back() + (run.stop - run.start) * run.rank);
  std::vector<float> t(offsets.back());
  std::vector<float*> starts;
  for (size_t i = 0; i < runs.size(); ++i) starts.push_back(t.data() + offsets[i]);
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < runs.size(); ++i) {
      const Run& run = runs[i];
      const int64_t m0 = std::max(begin, run.start), m1 = std::min(end, run.stop);
      if (m0 < m1)
        shrink_rows<kRows>(xp + run.start * in, in, run.a, run.rank, starts[i],
                           m0 - run.start, m1 - run.start);
    }
  });
  const int64_t tiles = (out + kColumns - 1) / kColumns;
  at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
    const int64_t o0 = begin * kColumns, o1 = std::min(out, end * kColumns);
    for (size_t i = 0; i < runs.size(); ++i)
      expand_columns(yp + runs[i].start * out, out, starts[i], runs[i], o0, o1);
  });
}

void lora_add(at::Tensor y, at::Tensor x, at::TensorList a_t, at::TensorList b_t,
              at::TensorList blocks, at::IntArrayRef bounds) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.size(0) == x.size(0) && y.is_contiguous() &&
                  x.is_contiguous() && y.scalar_type() == x.scalar_type() &&
                  (y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16),
              "lora_add: y and x must be contiguous [rows, out] and [rows, in] of one dtype, "
              "float32 or bfloat16");
  TORCH_CHECK(a_t.size() == b_t.size() && blocks.size() == a_t.size() &&
                  bounds.size() == 2 * a_t.size(),
              "lora_add: one (a_t, b_t, blocks) and one (start, stop) per run");
  std::vector<Run> runs;
  int64_t previous = 0;
  for (size_t i = 0; i < a_t.size(); ++i) {
    const at::Tensor &a = a_t[i], &b = b_t[i];
    const int64_t start = bounds[2 * i], stop = bounds[2 * i + 1];
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.scalar_type() == at::kFloat &&
                    b.scalar_type() == at::kFloat && a.is_contiguous() && b.is_contiguous() &&
                    a.size(0) == x.size(1) && b.size(1) == y.size(1) && a.size(1) == b.size(0),
                "lora_add: run ", i, " needs float32 a_t [in, r] and b_t [r, out]");
    TORCH_CHECK(previous <= start && start <= stop && stop <= y.size(0),
                "lora_add: runs must be ordered, disjoint and within the rows");
    const at::Tensor& layout = blocks[i];
    TORCH_CHECK(layout.dim() == 2 && layout.size(1) == 4 && layout.scalar_type() == at::kLong &&
                    layout.is_contiguous(),
                "lora_add: run ", i, " needs int64 blocks [n, 4]");
    const int64_t* block = layout.data_ptr<int64_t>();
    for (int64_t k = 0; k < layout.size(0); ++k, block += 4)
      TORCH_CHECK(0 <= block[0] && block[0] <= block[1] && block[1] <= y.size(1) &&
                      0 <= block[2] && block[2] <= block[3] && block[3] <= a.size(1),
                  "lora_add: run ", i, " has a block outside its outputs or rank");
    previous = stop;
    runs.push_back({start, stop, a.size(1), a.data_ptr<float>(), b.data_ptr<float>(),
                    layout.data_ptr<int64_t>(), layout.size(0)});
  }
  const at::Tensor x32 = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  if (y.scalar_type() == at::kFloat) {
    lora_rows<float>(y, x32, runs);
  } else {
    lora_rows<c10::BFloat16>(y, x32, runs);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmkit_cpu, m) {
  m.def(
      "lora_add(Tensor(a!) y, Tensor x, Tensor[] a_t, Tensor[] b_t, Tensor[] blocks, "
      "int[] bounds) -> ()");
  m.impl("lora_add", c10::DispatchKey::CPU, lora_add);
}
