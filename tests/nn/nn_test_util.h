// Helpers shared by the nn tests.
//
// FLOTILLA_TEST_BACKEND ("cpu" by default) names the backend a test binary
// runs on; tests/nn/CMakeLists.txt builds the device tests once per backend,
// and NN_SUITE() gives each build its own suite names. Tests skip, and say
// so, when the backend finds no device. FLOTILLA_TEST_SCALE multiplies
// iteration counts (sanitizer lanes run at 0.25); FLOTILLA_TEST_SEED fixes
// the seed that randomised tests print.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "flotilla/flotilla.h"
#include "flotilla/nn/mlp.h"

#ifndef FLOTILLA_TEST_BACKEND
#define FLOTILLA_TEST_BACKEND "cpu"
#define NN_SUITE(name) name##Cpu
#define NN_TEST_CUDA 0
#else
#define NN_SUITE(name) name##Cuda
#define NN_TEST_CUDA 1
#endif

namespace flotilla::nn::test {

inline const std::string kBackend = FLOTILLA_TEST_BACKEND;

inline bool backend_has_device(const std::string& backend) {
  const auto all = Device::backends();
  if (std::find(all.begin(), all.end(), backend) == all.end()) return false;
  return Device::count(backend) > 0;
}

#define NN_SKIP_WITHOUT_DEVICE()                                                             \
  do {                                                                                       \
    if (!::flotilla::nn::test::backend_has_device(::flotilla::nn::test::kBackend))           \
      GTEST_SKIP() << "no " << ::flotilla::nn::test::kBackend << " device in this build or " \
                   << "on this machine";                                                     \
  } while (0)

inline int scaled(int n, int min = 1) {
  const char* s = std::getenv("FLOTILLA_TEST_SCALE");
  const double f = s ? std::atof(s) : 1.0;
  return std::max(min, static_cast<int>(n * (f > 0 ? f : 1.0)));
}

inline uint64_t test_seed() {
  uint64_t seed = static_cast<uint64_t>(
      std::chrono::steady_clock::now().time_since_epoch().count() & 0xffffffff);
  if (const char* s = std::getenv("FLOTILLA_TEST_SEED")) seed = std::strtoull(s, nullptr, 10);
  std::printf("seed %llu (replay with FLOTILLA_TEST_SEED=%llu)\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  return seed;
}

// One forward of x [batch, in] on `stream`; the output on the host.
inline std::vector<float> run_model(const Mlp& model, const Stream& stream,
                                    const std::vector<float>& x, DType dtype) {
  const int64_t batch = static_cast<int64_t>(x.size()) / model.in_features();
  Tensor t = Tensor::from_host(x, {batch, model.in_features()}, dtype, stream);
  return model.forward(stream, t).to_host(stream);
}

// The model in float64 on the host: the independent reference of the self
// tests (the peer test compares with PyTorch's float64 instead).
inline std::vector<double> host_forward(const MlpWeights& w, const std::vector<float>& x) {
  std::vector<double> h(x.begin(), x.end());
  const int64_t batch = static_cast<int64_t>(x.size()) / w.in_features();
  for (size_t li = 0; li < w.layers.size(); ++li) {
    const auto& l = w.layers[li];
    std::vector<double> y(static_cast<size_t>(batch * l.out));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t o = 0; o < l.out; ++o) {
        double acc = l.bias[static_cast<size_t>(o)];
        for (int64_t i = 0; i < l.in; ++i)
          acc += h[static_cast<size_t>(b * l.in + i)] *
                 static_cast<double>(l.weight[static_cast<size_t>(o * l.in + i)]);
        if (li + 1 < w.layers.size()) {
          if (w.activation == ops::Activation::kRelu) acc = std::max(acc, 0.0);
          if (w.activation == ops::Activation::kGelu)
            acc = 0.5 * acc * (1.0 + std::erf(acc / std::sqrt(2.0)));
        }
        y[static_cast<size_t>(b * l.out + o)] = acc;
      }
    h = std::move(y);
  }
  return h;
}

// The largest, over rows, of ||y - ref||_2 / ||ref||_2: a relative error that
// does not blow up on outputs near zero.
inline double max_row_rel_error(const std::vector<float>& y, const std::vector<double>& ref,
                                int64_t cols) {
  EXPECT_EQ(y.size(), ref.size());
  double worst = 0;
  for (size_t r = 0; r * static_cast<size_t>(cols) < ref.size(); ++r) {
    double num = 0, den = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const size_t i = r * static_cast<size_t>(cols) + static_cast<size_t>(c);
      num += (y[i] - ref[i]) * (y[i] - ref[i]);
      den += ref[i] * ref[i];
    }
    worst = std::max(worst, std::sqrt(num) / std::max(std::sqrt(den), 1e-30));
  }
  return worst;
}

}  // namespace flotilla::nn::test
