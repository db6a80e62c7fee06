// The CPU kernels of the ops (f32 only); names and argument layouts are in
// the table at the top of src/ops/ops.cpp.
//
// The GEMM is OpenBLAS's cblas_sgemm, never hand-written. Note [OpenBLAS
// threads]: Flotilla already runs one kernel per driver execution thread,
// many at once; if each sgemm also fanned out to OpenBLAS's own pool of
// hardware_concurrency threads, N callers would run N x cores threads and
// thrash. So OpenBLAS is set to one thread per call, once, before the first
// GEMM (openblas_set_num_threads(1)).
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>

#include "backend/cpu/kernels.h"
#include "flotilla/common/error.h"

namespace flotilla::backend::cpu {

namespace {

void need(const KernelArgs& a, const char* name, int ptrs, int scalars) {
  FL_CHECK_ARG(a.num_ptrs >= ptrs && a.num_scalars >= scalars, "[kernel ", name, "] needs ", ptrs,
               " pointers and ", scalars, " scalars, got ", a.num_ptrs, " and ", a.num_scalars);
}

const float* in(const KernelArgs& a, int i) {
  return static_cast<const float*>(a.ptrs[static_cast<size_t>(i)]);
}
float* out(const KernelArgs& a, int i) {
  return static_cast<float*>(a.ptrs[static_cast<size_t>(i)]);
}
int64_t si(const KernelArgs& a, int i) { return a.scalars[static_cast<size_t>(i)].i; }

// Exact GELU through erfc, which keeps its relative accuracy for negative x
// (1 + erf(x) cancels there).
inline float gelu_erf(float x) {
  return static_cast<float>(0.5 * x * std::erfc(-static_cast<double>(x) * M_SQRT1_2));
}
// PyTorch's tanh form; 0.5 (1 + tanh z) is written 1 / (1 + exp(-2z)) to avoid
// the same cancellation.
inline float gelu_tanh(float x) {
  const double z = 0.7978845608028654 * (x + 0.044715 * static_cast<double>(x) * x * x);
  return static_cast<float>(x / (1.0 + std::exp(-2.0 * z)));
}

inline float apply_act(float v, int64_t act) {
  switch (act) {
    case 1: return v > 0.f ? v : 0.f;
    case 2: return gelu_erf(v);
    case 3: return gelu_tanh(v);
    default: return v;
  }
}

void linear_f32(const KernelArgs& a) {
  need(a, "linear_f32", 4, 4);
  const int64_t M = si(a, 0), N = si(a, 1), K = si(a, 2), act = si(a, 3);
  FL_CHECK_ARG(M > 0 && N > 0 && K > 0 && act >= 0 && act <= 3,
               "[kernel linear_f32] bad sizes M=", M, " N=", N, " K=", K, " act=", act);
  FL_CHECK_ARG(in(a, 0) && in(a, 1) && out(a, 3), "[kernel linear_f32] a tensor pointer is null");
  // Note [OpenBLAS threads].
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
  const float* x = in(a, 0);
  const float* w = in(a, 1);
  const float* b = in(a, 2);
  float* y = out(a, 3);
  // y[M,N] = x[M,K] * w[N,K]^T, row-major.
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N),
              static_cast<int>(K), 1.0f, x, static_cast<int>(K), w, static_cast<int>(K), 0.0f, y,
              static_cast<int>(N));
  if (!b && act == 0) return;
  for (int64_t i = 0; i < M; ++i) {
    float* row = y + i * N;
    if (b)
      for (int64_t j = 0; j < N; ++j) row[j] += b[j];
    if (act != 0)
      for (int64_t j = 0; j < N; ++j) row[j] = apply_act(row[j], act);
  }
}

void add_bcast_f32(const KernelArgs& a) {
  need(a, "add_bcast_f32", 3, 1);
  const auto m = static_cast<uint64_t>(si(a, 0));
  FL_CHECK_ARG(m > 0 && a.n % m == 0, "[kernel add_bcast_f32] b's size ", m,
               " does not divide a's ", a.n);
  const float* x = in(a, 0);
  const float* y = in(a, 1);
  float* o = out(a, 2);
  for (uint64_t i = 0; i < a.n; i += m)
    for (uint64_t j = 0; j < m; ++j) o[i + j] = x[i + j] + y[j];
}

void mul_bcast_f32(const KernelArgs& a) {
  need(a, "mul_bcast_f32", 3, 1);
  const auto m = static_cast<uint64_t>(si(a, 0));
  FL_CHECK_ARG(m > 0 && a.n % m == 0, "[kernel mul_bcast_f32] b's size ", m,
               " does not divide a's ", a.n);
  const float* x = in(a, 0);
  const float* y = in(a, 1);
  float* o = out(a, 2);
  for (uint64_t i = 0; i < a.n; i += m)
    for (uint64_t j = 0; j < m; ++j) o[i + j] = x[i + j] * y[j];
}

void relu_f32(const KernelArgs& a) {
  need(a, "relu_f32", 2, 0);
  const float* x = in(a, 0);
  float* y = out(a, 1);
  for (uint64_t i = 0; i < a.n; ++i) y[i] = x[i] > 0.f ? x[i] : 0.f;
}

void gelu_f32(const KernelArgs& a) {
  need(a, "gelu_f32", 2, 1);
  const float* x = in(a, 0);
  float* y = out(a, 1);
  if (si(a, 0))
    for (uint64_t i = 0; i < a.n; ++i) y[i] = gelu_tanh(x[i]);
  else
    for (uint64_t i = 0; i < a.n; ++i) y[i] = gelu_erf(x[i]);
}

void layernorm_f32(const KernelArgs& a) {
  need(a, "layernorm_f32", 4, 3);
  const int64_t rows = si(a, 0), cols = si(a, 1);
  const double eps = a.scalars[2].f;
  FL_CHECK_ARG(rows > 0 && cols > 0, "[kernel layernorm_f32] bad sizes rows=", rows,
               " cols=", cols);
  const float* g = in(a, 1);
  const float* b = in(a, 2);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = in(a, 0) + r * cols;
    float* y = out(a, 3) + r * cols;
    // Two passes in double: the mean, then the (biased) variance around it.
    double mean = 0;
    for (int64_t j = 0; j < cols; ++j) mean += x[j];
    mean /= static_cast<double>(cols);
    double var = 0;
    for (int64_t j = 0; j < cols; ++j) var += (x[j] - mean) * (x[j] - mean);
    var /= static_cast<double>(cols);
    const double inv = 1.0 / std::sqrt(var + eps);
    for (int64_t j = 0; j < cols; ++j) {
      double v = (x[j] - mean) * inv;
      if (g) v *= g[j];
      if (b) v += b[j];
      y[j] = static_cast<float>(v);
    }
  }
}

void softmax_f32(const KernelArgs& a) {
  need(a, "softmax_f32", 2, 2);
  const int64_t rows = si(a, 0), cols = si(a, 1);
  FL_CHECK_ARG(rows > 0 && cols > 0, "[kernel softmax_f32] bad sizes rows=", rows, " cols=", cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = in(a, 0) + r * cols;
    float* y = out(a, 1) + r * cols;
    const float mx = *std::max_element(x, x + cols);
    double sum = 0;
    for (int64_t j = 0; j < cols; ++j) sum += std::exp(static_cast<double>(x[j]) - mx);
    const double inv = 1.0 / sum;
    for (int64_t j = 0; j < cols; ++j)
      y[j] = static_cast<float>(std::exp(static_cast<double>(x[j]) - mx) * inv);
  }
}

}  // namespace

void add_nn_kernels(KernelTable& table) {
  table.emplace("linear_f32", &linear_f32);
  table.emplace("add_bcast_f32", &add_bcast_f32);
  table.emplace("mul_bcast_f32", &mul_bcast_f32);
  table.emplace("relu_f32", &relu_f32);
  table.emplace("gelu_f32", &gelu_f32);
  table.emplace("layernorm_f32", &layernorm_f32);
  table.emplace("softmax_f32", &softmax_f32);
}

}  // namespace flotilla::backend::cpu
