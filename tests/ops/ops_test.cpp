// Every op against a float64 reference computed here, on random inputs, and
// every InvalidArgument path. Built once per backend (tests/ops/CMakeLists.txt):
// the cpu binary runs f32; the cuda binary (label gpu) runs f32, f16 and bf16
// and skips, saying so, where no GPU is found.
//
// Tolerance: max |y - ref| / max |ref| below 1e-5 in f32 and 1e-2 in f16 and
// bf16. For f16/bf16 the reference is computed from the inputs as the device
// holds them (rounded), so the figure measures the kernels, not the rounding
// of the inputs.
#include "flotilla/ops/ops.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <latch>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "flotilla/flotilla.h"
#include "flotilla/runtime/event.h"

#ifndef FLOTILLA_TEST_BACKEND
#define FLOTILLA_TEST_BACKEND "cpu"
#endif
#ifndef OPS_SUITE
#define OPS_SUITE OpsCpu
#endif

namespace flotilla::test {
namespace {

using ops::Activation;
using Vec = std::vector<double>;

uint64_t seed_once() {
  static const uint64_t seed = [] {
    uint64_t s = std::random_device{}();
    if (const char* e = std::getenv("FLOTILLA_TEST_SEED")) s = std::strtoull(e, nullptr, 10);
    std::cout << "[ seed     ] " << s << " (replay with FLOTILLA_TEST_SEED=" << s << ")\n";
    return s;
  }();
  return seed;
}

// The value the device holds for `v` in `dt`.
double as_stored(float v, DType dt) {
  switch (dt) {
    case DType::kF32: return v;
    case DType::kF16: return half_to_float(float_to_half(v));
    case DType::kBF16: return bf16_to_float(float_to_bf16(v));
  }
  return v;
}

double tolerance(DType dt) { return dt == DType::kF32 ? 1e-5 : 1e-2; }

// max |y - ref| / max |ref|
double rel_error(const std::vector<float>& y, const Vec& ref) {
  EXPECT_EQ(y.size(), ref.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < std::min(y.size(), ref.size()); ++i) {
    num = std::max(num, std::abs(static_cast<double>(y[i]) - ref[i]));
    den = std::max(den, std::abs(ref[i]));
  }
  return den > 0 ? num / den : num;
}

double gelu_ref(double x) { return 0.5 * x * std::erfc(-x / std::sqrt(2.0)); }
double gelu_tanh_ref(double x) {
  return 0.5 * x * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}
double act_ref(double v, Activation a) {
  switch (a) {
    case Activation::kNone: return v;
    case Activation::kRelu: return v > 0 ? v : 0;
    case Activation::kGelu: return gelu_ref(v);
    case Activation::kGeluTanh: return gelu_tanh_ref(v);
  }
  return v;
}

// Throws InvalidArgument whose message contains `part`; fails otherwise.
template <typename F>
void expect_invalid(F&& f, const std::string& part) {
  try {
    f();
    ADD_FAILURE() << "expected InvalidArgument containing: " << part;
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
        << "message: " << e.what() << "\nexpected to contain: " << part;
  }
}

class OPS_SUITE : public ::testing::Test {
 protected:
  void SetUp() override {
    if (Device::count(FLOTILLA_TEST_BACKEND) == 0)
      GTEST_SKIP() << "no " FLOTILLA_TEST_BACKEND " device on this machine";
    dev_ = Device::create(FLOTILLA_TEST_BACKEND, 0, Config::from_env());
    rng_.seed(seed_once() + static_cast<uint64_t>(std::hash<std::string>{}(
                                ::testing::UnitTest::GetInstance()->current_test_info()->name())));
  }

  Stream s() { return dev_->streams().at(1); }
  bool is_cpu() const { return dev_->backend() == "cpu"; }
  std::vector<DType> dtypes() const {
    if (is_cpu()) return {DType::kF32};
    return {DType::kF32, DType::kF16, DType::kBF16};
  }

  // Random values in [lo, hi).
  std::vector<float> random(size_t n, float lo = -1.f, float hi = 1.f) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng_);
    return v;
  }
  // A tensor of random values, and those values as the device holds them.
  Tensor rand_tensor(Shape shape, DType dt, Vec* stored, float lo = -1.f, float hi = 1.f) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    auto v = random(static_cast<size_t>(n), lo, hi);
    stored->clear();
    for (float x : v) stored->push_back(as_stored(x, dt));
    return Tensor::from_host(v, std::move(shape), dt, s());
  }

  std::shared_ptr<Device> dev_;
  std::mt19937_64 rng_;
};

// ---- Numerics ----------------------------------------------------------------------

Vec linear_ref(const Vec& x, const Vec& w, const Vec* b, int64_t M, int64_t N, int64_t K,
               Activation act) {
  Vec y(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = b ? (*b)[static_cast<size_t>(n)] : 0.0;
      for (int64_t k = 0; k < K; ++k)
        acc += x[static_cast<size_t>(m * K + k)] * w[static_cast<size_t>(n * K + k)];
      y[static_cast<size_t>(m * N + n)] = act_ref(acc, act);
    }
  return y;
}

TEST_F(OPS_SUITE, LinearMatchesFloat64EveryActivationWithAndWithoutBias) {
  const Activation acts[] = {Activation::kNone, Activation::kRelu, Activation::kGelu,
                             Activation::kGeluTanh};
  for (DType dt : dtypes()) {
    for (Activation act : acts) {
      for (bool with_bias : {true, false}) {
        const int64_t M = 7, N = 17, K = 33;
        Vec xs, ws, bs;
        Tensor x = rand_tensor({M, K}, dt, &xs);
        Tensor w = rand_tensor({N, K}, dt, &ws);
        Tensor b = with_bias ? rand_tensor({N}, dt, &bs) : Tensor();
        Tensor y = ops::linear(s(), x, w, b, act);
        EXPECT_EQ(y.shape(), (Shape{M, N}));
        EXPECT_EQ(y.dtype(), dt);
        const double err =
            rel_error(y.to_host(s()), linear_ref(xs, ws, with_bias ? &bs : nullptr, M, N, K, act));
        EXPECT_LT(err, tolerance(dt))
            << to_string(dt) << " act=" << ops::to_string(act) << " bias=" << with_bias;
      }
    }
  }
}

TEST_F(OPS_SUITE, LinearAtTheSeedModelsShapesAndWithLeadingDims) {
  for (DType dt : dtypes()) {
    // The seed MLP's first layer at batch 8, and a 3-d input [2, 3, 64].
    struct Case {
      Shape x;
      int64_t N;
    } cases[] = {{{8, 512}, 1024}, {{2, 3, 64}, 40}, {{1, 512}, 512}};
    for (const auto& c : cases) {
      const int64_t K = c.x.back();
      const int64_t M = [&] {
        int64_t m = 1;
        for (size_t i = 0; i + 1 < c.x.size(); ++i) m *= c.x[i];
        return m;
      }();
      Vec xs, ws, bs;
      Tensor x = rand_tensor(c.x, dt, &xs);
      Tensor w = rand_tensor({c.N, K}, dt, &ws, -0.05f, 0.05f);
      Tensor b = rand_tensor({c.N}, dt, &bs);
      Tensor y = ops::linear(s(), x, w, b, Activation::kRelu);
      Shape want = c.x;
      want.back() = c.N;
      EXPECT_EQ(y.shape(), want);
      EXPECT_LT(rel_error(y.to_host(s()), linear_ref(xs, ws, &bs, M, c.N, K, Activation::kRelu)),
                tolerance(dt))
          << to_string(dt) << " x=" << shape_to_string(c.x);
    }
  }
}

// Every batch size from 1 to 12 rows, the shapes of small serving batches.
// On CUDA, f32 linears of 1 to 8 rows run a kernel of Flotilla's own (Note
// [Linear for a few rows]), with four-float loads where K and the pointers
// allow and one float at a time where they do not, and cuBLASLt beyond. For
// K a multiple of 4 (512; 516, which splits unevenly) and not (515), N odd
// (the kernel's blocks take 2 columns each), every activation, with and
// without bias: each row matches float64, and on CUDA up to 8 rows each row
// is bit for bit the row run alone (a request's result does not depend on
// its batch). Would catch: rows mixed up or dropped, the last block's
// columns missed, a tail of K skipped, a sum whose order depends on the
// batch.
TEST_F(OPS_SUITE, LinearRowsAtSmallBatchesMatchTheRowRunAlone) {
  const bool cuda = std::string(FLOTILLA_TEST_BACKEND) == "cuda";
  const int64_t N = 1001;
  for (int64_t K : {512, 516, 515}) {
    for (Activation act :
         {Activation::kRelu, Activation::kNone, Activation::kGelu, Activation::kGeluTanh}) {
      for (bool with_bias : {true, false}) {
        Vec ws, bs, all;
        Tensor w = rand_tensor({N, K}, DType::kF32, &ws, -0.05f, 0.05f);
        Tensor b = with_bias ? rand_tensor({N}, DType::kF32, &bs) : Tensor();
        Tensor x12 = rand_tensor({12, K}, DType::kF32, &all);
        const std::string what = " K=" + std::to_string(K) + " act=" + ops::to_string(act) +
                                 " bias=" + (with_bias ? "1" : "0");
        std::vector<std::vector<float>> alone(12);
        for (int64_t r = 0; r < 12; ++r)
          alone[static_cast<size_t>(r)] = ops::linear(s(), x12.row(r), w, b, act).to_host(s());
        for (int64_t m = 1; m <= 12; ++m) {
          const std::vector<float> got = ops::linear(s(), x12.narrow(0, m), w, b, act).to_host(s());
          Vec xs(all.begin(), all.begin() + m * K);
          EXPECT_LT(rel_error(got, linear_ref(xs, ws, with_bias ? &bs : nullptr, m, N, K, act)),
                    tolerance(DType::kF32))
              << "M=" << m << what;
          if (!cuda || m > 8) continue;
          for (int64_t r = 0; r < m; ++r) {
            const auto row = got.begin() + r * N;
            EXPECT_TRUE(std::equal(row, row + N, alone[static_cast<size_t>(r)].begin()))
                << "row " << r << " of " << m << what;
          }
        }
      }
    }
  }
}

// Stream::set_device_share (Note [GEMMs for a share of the device]): on
// CUDA, f32 GEMMs of 64 to 512 rows are planned for a share of the SMs, by
// other algorithms than the whole device's. The seed MLP's layer shapes at
// the queue's batch sizes, for shares from 1 to more streams than SMs: every
// result must still match, and on CUDA a new plan is made exactly where the
// share changes the SM target (the driver's gemm_plans count). Would catch:
// a plan made for one share reused for another (the target missing from the
// plan's key), a target applied outside its window or not at all.
TEST_F(OPS_SUITE, LinearPlannedForAShareOfTheDeviceMatchesFloat64) {
  const bool cuda = std::string(FLOTILLA_TEST_BACKEND) == "cuda";
  Stream st = s();
  struct Layer {
    int64_t N, K;
  } layers[] = {{1024, 512}, {512, 1024}};
  const auto plans = [&] { return dev_->driver().stats().gemm_plans; };
  // The SM target the note's rule gives, and the targets each (layer, M)
  // has had a plan for.
  const int sms = dev_->driver().info().compute_units;
  const auto target = [sms](int share, int64_t m) {
    return share <= 1 || m < 64 || m > 512 ? 0 : std::max(1, sms / share);
  };
  std::map<std::pair<int, int64_t>, std::set<int>> planned;
  Vec ws[2], bs[2];
  Tensor w[2], b[2];
  for (int l = 0; l < 2; ++l) {
    w[l] = rand_tensor({layers[l].N, layers[l].K}, DType::kF32, &ws[l], -0.05f, 0.05f);
    b[l] = rand_tensor({layers[l].N}, DType::kF32, &bs[l]);
  }
  for (int share : {1, 2, 8, 132, 1000}) {
    st.set_device_share(share);
    EXPECT_EQ(st.device_share(), share);
    for (int l = 0; l < 2; ++l)
      for (int64_t M : {1, 64, 192, 256, 513}) {
        const int64_t N = layers[l].N, K = layers[l].K;
        Vec xs;
        Tensor x = rand_tensor({M, K}, DType::kF32, &xs);
        const uint64_t before = plans();
        Tensor y = ops::linear(st, x, w[l], b[l], Activation::kRelu);
        const std::vector<float> got = y.to_host(st);
        // Up to 8 rows, Note [Linear for a few rows]'s kernel runs: no plan.
        const bool new_target = M > 8 && planned[{l, M}].insert(target(share, M)).second;
        if (cuda)
          EXPECT_EQ(plans() - before, new_target ? 1u : 0u)
              << "share=" << share << " M=" << M << " N=" << N;
        else
          EXPECT_EQ(plans(), 0u);
        EXPECT_LT(rel_error(got, linear_ref(xs, ws[l], &bs[l], M, N, K, Activation::kRelu)),
                  tolerance(DType::kF32))
            << "share=" << share << " M=" << M << " N=" << N << " K=" << K;
      }
  }
  st.set_device_share(1);
}

// Config::cuda_tune_gemm (Note [Tuned GEMMs for a share of the device]): on
// CUDA the first f32 GEMM of 64 to 512 rows planned for a share of the
// device times cuBLASLt's candidates once per shape and device, and every
// stream then uses the winner. Two streams with a share of 8, the seed
// MLP's first layer at the queue's batch sizes, the first of each size
// inside a recording (a CUDA graph being captured, as a BatchQueue's
// recorded batches plan theirs): each result matches float64, each shape is
// timed once (the driver's gemm_tunings count) however many streams plan it,
// and the two streams' outputs agree bit for bit. Would catch: tuning on the
// capturing stream (the capture fails or records the timing launches), a
// shape timed per stream rather than per device (streams that disagree), a
// tuned algorithm that computes something else, tuning outside the share's
// window.
TEST_F(OPS_SUITE, LinearTunedForAShareOfTheDeviceMatchesFloat64OnEveryStream) {
  const bool cuda = std::string(FLOTILLA_TEST_BACKEND) == "cuda";
  Config cfg = Config::from_env();
  cfg.cuda_tune_gemm = true;
  dev_ = Device::create(FLOTILLA_TEST_BACKEND, 0, cfg);  // rand_tensor's device too
  const auto stats = [&] { return dev_->driver().stats(); };
  Stream a = dev_->streams().at(1), b = dev_->streams().at(2);
  a.set_device_share(8);
  b.set_device_share(8);
  const int64_t N = 1024, K = 512;
  Vec ws, bs;
  Tensor w = rand_tensor({N, K}, DType::kF32, &ws, -0.05f, 0.05f);
  Tensor bias = rand_tensor({N}, DType::kF32, &bs);
  for (int64_t M : {8, 64, 256, 320, 513}) {
    Vec xs;
    Tensor x = rand_tensor({M, K}, DType::kF32, &xs);
    const Vec want = linear_ref(xs, ws, &bs, M, N, K, Activation::kRelu);
    const uint64_t tunings = stats().gemm_tunings;
    Tensor ya;
    Recording rec = a.record([&] { ya = ops::linear(a, x, w, bias, Activation::kRelu); });
    a.replay(rec);
    const std::vector<float> got_a = ya.to_host(a);
    const std::vector<float> got_b = ops::linear(b, x, w, bias, Activation::kRelu).to_host(b);
    const bool tuned = cuda && M >= 64 && M <= 512;
    EXPECT_EQ(stats().gemm_tunings - tunings, tuned ? 1u : 0u) << "M=" << M;
    EXPECT_LT(rel_error(got_a, want), tolerance(DType::kF32)) << "recorded, M=" << M;
    EXPECT_LT(rel_error(got_b, want), tolerance(DType::kF32)) << "eager, M=" << M;
    if (cuda) {
      EXPECT_EQ(got_a, got_b) << "the streams chose different algorithms, M=" << M;
    }
  }
}

// Row views start at any element: the GEMM must not assume aligned inputs
// (on CUDA, cuBLASLt algorithms are chosen for the actual alignment).
TEST_F(OPS_SUITE, LinearOnARowViewAtAnOddOffset) {
  for (DType dt : dtypes()) {
    const int64_t K = 20, N = 12;
    Vec xs, ws, bs;
    Tensor x = rand_tensor({5, K}, dt, &xs);
    Tensor w = rand_tensor({N, K}, dt, &ws);
    Tensor b = rand_tensor({N}, dt, &bs);
    Tensor xv = x.narrow(1, 3);  // starts 20 elements in: 40 or 80 bytes
    Vec rows(xs.begin() + K, xs.begin() + 4 * K);
    Tensor y = ops::linear(s(), xv, w, b, Activation::kRelu);
    EXPECT_LT(rel_error(y.to_host(s()), linear_ref(rows, ws, &bs, 3, N, K, Activation::kRelu)),
              tolerance(dt))
        << to_string(dt);
    // K a multiple of 4 but x 12 bytes in: rows of 3 from the second on,
    // seen as [3, 8]. On CUDA the small-rows kernel must not load x four
    // floats at a time here (Note [Linear for a few rows]; a misaligned
    // vector load faults the device).
    Vec fs;
    Tensor flat = rand_tensor({9, 3}, dt, &fs);
    Tensor x8 = flat.narrow(1, 8).reshape({3, 8});
    Vec w8s;
    Tensor w8 = rand_tensor({N, 8}, dt, &w8s);
    Vec rows8(fs.begin() + 3, fs.begin() + 27);
    Tensor y8 = ops::linear(s(), x8, w8, b, Activation::kRelu);
    EXPECT_LT(rel_error(y8.to_host(s()), linear_ref(rows8, w8s, &bs, 3, N, 8, Activation::kRelu)),
              tolerance(dt))
        << to_string(dt) << " K=8, x 12 bytes in";
  }
}

TEST_F(OPS_SUITE, AddAndMulSameShapeAndBroadcast) {
  for (DType dt : dtypes()) {
    Vec as, bs, cs;
    Tensor a = rand_tensor({5, 6, 7}, dt, &as);
    Tensor b = rand_tensor({5, 6, 7}, dt, &bs);
    Tensor c = rand_tensor({7}, dt, &cs);  // broadcast over [5, 6]
    Vec add_ref(as.size()), mul_ref(as.size()), addc_ref(as.size()), mulc_ref(as.size());
    for (size_t i = 0; i < as.size(); ++i) {
      add_ref[i] = as[i] + bs[i];
      mul_ref[i] = as[i] * bs[i];
      addc_ref[i] = as[i] + cs[i % 7];
      mulc_ref[i] = as[i] * cs[i % 7];
    }
    EXPECT_LT(rel_error(ops::add(s(), a, b).to_host(s()), add_ref), tolerance(dt));
    EXPECT_LT(rel_error(ops::mul(s(), a, b).to_host(s()), mul_ref), tolerance(dt));
    EXPECT_LT(rel_error(ops::add(s(), a, c).to_host(s()), addc_ref), tolerance(dt));
    EXPECT_LT(rel_error(ops::mul(s(), a, c).to_host(s()), mulc_ref), tolerance(dt));
  }
}

TEST_F(OPS_SUITE, ReluAndBothGelus) {
  for (DType dt : dtypes()) {
    Vec xs;
    Tensor x = rand_tensor({4, 300}, dt, &xs, -6.f, 6.f);
    Vec r(xs.size()), g(xs.size()), gt(xs.size());
    for (size_t i = 0; i < xs.size(); ++i) {
      r[i] = act_ref(xs[i], Activation::kRelu);
      g[i] = gelu_ref(xs[i]);
      gt[i] = gelu_tanh_ref(xs[i]);
    }
    EXPECT_LT(rel_error(ops::relu(s(), x).to_host(s()), r), tolerance(dt));
    EXPECT_LT(rel_error(ops::gelu(s(), x).to_host(s()), g), tolerance(dt));
    EXPECT_LT(rel_error(ops::gelu(s(), x, /*tanh_approx=*/true).to_host(s()), gt), tolerance(dt));
    EXPECT_LT(rel_error(ops::activation(s(), x, Activation::kGelu).to_host(s()), g), tolerance(dt));
    EXPECT_LT(rel_error(ops::activation(s(), x, Activation::kNone).to_host(s()), xs), 1e-12);
    // The two GELU forms really differ: the test would see a swap.
    EXPECT_GT(rel_error(ops::gelu(s(), x).to_host(s()), gt), 1e-5);
  }
}

TEST_F(OPS_SUITE, GeluIsAccurateInTheNegativeTail) {
  // 1 + erf(x) cancels for x << 0; PyTorch's own kernels keep the relative
  // accuracy there, and so must ours (elementwise, not just normwise).
  Tensor x = Tensor::from_host({-5.f, -4.f, -3.f, -2.5f}, {4}, DType::kF32, s());
  auto y = ops::gelu(s(), x).to_host(s());
  const float xs[] = {-5.f, -4.f, -3.f, -2.5f};
  for (int i = 0; i < 4; ++i) {
    const double ref = gelu_ref(xs[i]);
    EXPECT_LT(std::abs(y[static_cast<size_t>(i)] - ref) / std::abs(ref), 1e-4) << xs[i];
  }
}

TEST_F(OPS_SUITE, LayerNormWithAndWithoutAffine) {
  for (DType dt : dtypes()) {
    const int64_t rows = 6, cols = 96;
    Vec xs, gs, bs;
    Tensor x = rand_tensor({2, 3, cols}, dt, &xs, -3.f, 5.f);
    Tensor g = rand_tensor({cols}, dt, &gs, 0.5f, 1.5f);
    Tensor b = rand_tensor({cols}, dt, &bs);
    const double eps = 1e-5;
    Vec ref(xs.size()), ref_plain(xs.size());
    for (int64_t r = 0; r < rows; ++r) {
      double mean = 0, var = 0;
      for (int64_t j = 0; j < cols; ++j) mean += xs[static_cast<size_t>(r * cols + j)];
      mean /= cols;
      for (int64_t j = 0; j < cols; ++j) {
        const double d = xs[static_cast<size_t>(r * cols + j)] - mean;
        var += d * d;
      }
      var /= cols;
      for (int64_t j = 0; j < cols; ++j) {
        const auto i = static_cast<size_t>(r * cols + j);
        ref_plain[i] = (xs[i] - mean) / std::sqrt(var + eps);
        ref[i] = ref_plain[i] * gs[static_cast<size_t>(j)] + bs[static_cast<size_t>(j)];
      }
    }
    Tensor y = ops::layernorm(s(), x, g, b, eps);
    EXPECT_EQ(y.shape(), x.shape());
    EXPECT_LT(rel_error(y.to_host(s()), ref), tolerance(dt)) << to_string(dt);
    EXPECT_LT(rel_error(ops::layernorm(s(), x, {}, {}, eps).to_host(s()), ref_plain), tolerance(dt))
        << to_string(dt);
  }
}

TEST_F(OPS_SUITE, SoftmaxIsStableForLargeInputs) {
  for (DType dt : dtypes()) {
    const int64_t rows = 5, cols = 77;
    Vec xs;
    // Large values: exp overflows f32 without the max subtraction.
    Tensor x = rand_tensor({rows, cols}, dt, &xs, 80.f, 120.f);
    Vec ref(xs.size());
    for (int64_t r = 0; r < rows; ++r) {
      double mx = -1e300, sum = 0;
      for (int64_t j = 0; j < cols; ++j) mx = std::max(mx, xs[static_cast<size_t>(r * cols + j)]);
      for (int64_t j = 0; j < cols; ++j)
        sum += std::exp(xs[static_cast<size_t>(r * cols + j)] - mx);
      for (int64_t j = 0; j < cols; ++j)
        ref[static_cast<size_t>(r * cols + j)] =
            std::exp(xs[static_cast<size_t>(r * cols + j)] - mx) / sum;
    }
    auto y = ops::softmax(s(), x).to_host(s());
    EXPECT_LT(rel_error(y, ref), tolerance(dt)) << to_string(dt);
    EXPECT_LT(rel_error(ops::softmax(s(), x, 1).to_host(s()), ref), tolerance(dt));
    for (float v : y) ASSERT_TRUE(std::isfinite(v));
  }
}

// ---- Tensors, views and copies --------------------------------------------------------

TEST_F(OPS_SUITE, HostRoundTripIsExactInF32AndRoundsInHalfTypes) {
  auto v = random(1000, -100.f, 100.f);
  Tensor t = Tensor::from_host(v, {10, 100}, DType::kF32, s());
  EXPECT_EQ(t.to_host(s()), v);
  for (DType dt : {DType::kF16, DType::kBF16}) {  // storage exists on every backend
    Tensor h = Tensor::from_host(v, {1000}, dt, s());
    EXPECT_EQ(h.nbytes(), 2000u);
    auto back = h.to_host(s());
    for (size_t i = 0; i < v.size(); ++i)
      ASSERT_EQ(back[i], static_cast<float>(as_stored(v[i], dt))) << to_string(dt) << " " << v[i];
  }
}

#ifndef OPS_CUDA_VARIANT  // host-only: once, in the cpu binary
TEST(HalfConversions, EveryHalfAndBf16ValueRoundTrips) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const auto u = static_cast<uint16_t>(h);
    const float f = half_to_float(u);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(half_to_float(float_to_half(f))));
    } else {
      ASSERT_EQ(float_to_half(f), u) << std::hex << h;
    }
    const float g = bf16_to_float(u);
    if (std::isnan(g)) {
      ASSERT_TRUE(std::isnan(bf16_to_float(float_to_bf16(g))));
    } else {
      ASSERT_EQ(float_to_bf16(g), u) << std::hex << h;
    }
  }
}

TEST(HalfConversions, RoundToNearestEvenAndRanges) {
  EXPECT_EQ(float_to_half(1.0f), 0x3C00);
  EXPECT_EQ(float_to_half(-2.0f), 0xC000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7BFF);
  EXPECT_EQ(float_to_half(65519.0f), 0x7BFF);            // rounds down to the max
  EXPECT_EQ(float_to_half(65520.0f), 0x7C00);            // rounds to inf
  EXPECT_EQ(float_to_half(5.9604645e-8f), 0x0001);       // smallest subnormal
  EXPECT_EQ(float_to_half(2.9802322e-8f), 0x0000);       // half of it: ties to even (0)
  EXPECT_EQ(float_to_half(1.0f + 1.0f / 2048), 0x3C00);  // tie: to even
  EXPECT_EQ(float_to_half(1.0f + 3.0f / 2048), 0x3C02);  // tie: to even (up)
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(1.0f + 1.0f / 256), 0x3F80);  // tie: to even
  EXPECT_EQ(float_to_bf16(1.0f + 3.0f / 256), 0x3F82);
  EXPECT_EQ(bf16_to_float(0xC040), -3.0f);
  EXPECT_EQ(half_to_float(0x3555), 0.333251953125f);
}
#endif

TEST_F(OPS_SUITE, ViewsShareStorage) {
  std::vector<float> v(24);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  Tensor t = Tensor::from_host(v, {4, 6}, DType::kF32, s());
  Tensor r = t.reshape({2, -1, 3});
  EXPECT_EQ(r.shape(), (Shape{2, 4, 3}));
  EXPECT_TRUE(r.shares_storage(t));
  EXPECT_EQ(r.strides(), (Shape{12, 3, 1}));
  Tensor n = t.narrow(1, 2);
  EXPECT_EQ(n.shape(), (Shape{2, 6}));
  EXPECT_EQ(n.to_host(s()), std::vector<float>(v.begin() + 6, v.begin() + 18));
  EXPECT_EQ(t.row(3).to_host(s()), std::vector<float>(v.begin() + 18, v.end()));
  // Writing through a view changes the source.
  n.copy_from_host(std::vector<float>(12, -1.f), s());
  auto all = t.to_host(s());
  EXPECT_EQ(all[5], 5.f);
  EXPECT_EQ(all[6], -1.f);
  EXPECT_EQ(all[17], -1.f);
  EXPECT_EQ(all[18], 18.f);
  EXPECT_EQ(t.dim(-1), 6);
  EXPECT_EQ(t.rank(), 2);
  EXPECT_EQ(t.to_string(), "f32[4, 6] on " + dev_->name());
}

TEST_F(OPS_SUITE, CopyCloneAndCatRows) {
  auto va = random(3 * 5), vb = random(2 * 5), vc = random(1 * 5);
  Tensor a = Tensor::from_host(va, {3, 5}, DType::kF32, s());
  Tensor b = Tensor::from_host(vb, {2, 5}, DType::kF32, s());
  Tensor c = Tensor::from_host(vc, {1, 5}, DType::kF32, s());
  const Tensor parts[] = {a, b, c};
  Tensor cat = ops::cat_rows(s(), parts);
  EXPECT_EQ(cat.shape(), (Shape{6, 5}));
  std::vector<float> want = va;
  want.insert(want.end(), vb.begin(), vb.end());
  want.insert(want.end(), vc.begin(), vc.end());
  EXPECT_EQ(cat.to_host(s()), want);
  Tensor cl = ops::clone(s(), a);
  EXPECT_FALSE(cl.shares_storage(a));
  EXPECT_EQ(cl.to_host(s()), va);
  Tensor dst = Tensor::empty({15}, DType::kF32, s());
  ops::copy(s(), a, dst);
  EXPECT_EQ(dst.to_host(s()), va);
}

// An input made on one stream, used by an op on another after an event: the
// result is right, and the input's memory is held until the other stream
// has read it (record_stream by the op).
TEST_F(OPS_SUITE, InputsFromAnotherStreamAreRecordedOnIt) {
  Stream a = dev_->streams().at(1), b = dev_->streams().at(2);
  auto v = random(64 * 64);
  auto gate = std::make_shared<std::latch>(1);
  Tensor y;
  {
    Tensor x = Tensor::from_host(v, {64, 64}, DType::kF32, a);
    Event ready(*dev_);
    ready.record(a);
    ready.wait(b);
    if (is_cpu()) b.add_callback([gate] { gate->wait(); });  // b's relu waits for the gate
    y = ops::relu(b, x);
  }  // x freed here, while b has not read it yet
  // a allocates the same class again and writes it at once: it must not get
  // x's block before b is done.
  Tensor z = Tensor::from_host(std::vector<float>(64 * 64, -7.f), {64, 64}, DType::kF32, a);
  a.synchronize();
  gate->count_down();
  auto got = y.to_host(b);
  for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(got[i], v[i] > 0 ? v[i] : 0.f) << i;
  EXPECT_EQ(z.to_host(a)[0], -7.f);
}

// ---- Invalid arguments ------------------------------------------------------------------

TEST_F(OPS_SUITE, LinearRejectsBadShapesWithTheShapesInTheMessage) {
  Tensor x = Tensor::empty({8, 512}, DType::kF32, s());
  Tensor w = Tensor::empty({1024, 256}, DType::kF32, s());
  expect_invalid([&] { ops::linear(s(), x, w); },
                 "[ops::linear] x is [8, 512] but weight is [1024, 256]: x's last dim must equal "
                 "weight's dim 1");
  Tensor w2 = Tensor::empty({1024, 512}, DType::kF32, s());
  Tensor bad_bias = Tensor::empty({512}, DType::kF32, s());
  expect_invalid([&] { ops::linear(s(), x, w2, bad_bias); },
                 "[ops::linear] bias is [512] but weight is [1024, 512]: bias must be [1024]");
  Tensor w3 = Tensor::empty({4, 2, 512}, DType::kF32, s());
  expect_invalid([&] { ops::linear(s(), x, w3); },
                 "[ops::linear] weight is [4, 2, 512] but must be 2-d");
  expect_invalid([&] { ops::linear(s(), Tensor(), w2); },
                 "[ops::linear] x is an undefined (empty) tensor");
  expect_invalid([&] { ops::linear(s(), x, Tensor()); },
                 "[ops::linear] weight is an undefined (empty) tensor");
}

TEST_F(OPS_SUITE, EveryOpRejectsAnUndefinedTensor) {
  Tensor t = Tensor::empty({2, 3}, DType::kF32, s());
  Tensor u;
  expect_invalid([&] { ops::add(s(), u, t); }, "[ops::add] a is an undefined");
  expect_invalid([&] { ops::add(s(), t, u); }, "[ops::add] b is an undefined");
  expect_invalid([&] { ops::mul(s(), t, u); }, "[ops::mul] b is an undefined");
  expect_invalid([&] { ops::relu(s(), u); }, "[ops::relu] x is an undefined");
  expect_invalid([&] { ops::gelu(s(), u); }, "[ops::gelu] x is an undefined");
  expect_invalid([&] { ops::layernorm(s(), u, {}, {}); }, "[ops::layernorm] x is an undefined");
  expect_invalid([&] { ops::softmax(s(), u); }, "[ops::softmax] x is an undefined");
  expect_invalid([&] { ops::copy(s(), u, t); }, "[ops::copy] src is an undefined");
  expect_invalid([&] { ops::copy(s(), t, u); }, "[ops::copy] dst is an undefined");
  expect_invalid([&] { ops::clone(s(), u); }, "[ops::clone] src is an undefined");
  const Tensor parts[] = {t, u};
  expect_invalid([&] { ops::cat_rows(s(), parts); }, "[ops::cat_rows] tensor 1 is an undefined");
  expect_invalid([&] { ops::cat_rows(s(), std::span<const Tensor>()); },
                 "[ops::cat_rows] no tensors given");
  expect_invalid([&] { (void)u.to_host(s()); }, "[Tensor::to_host] the tensor is undefined");
}

TEST_F(OPS_SUITE, ShapeMismatchesNameTheOpAndTheShapes) {
  Tensor a = Tensor::empty({4, 6}, DType::kF32, s());
  Tensor b = Tensor::empty({4}, DType::kF32, s());
  expect_invalid([&] { ops::add(s(), a, b); },
                 "[ops::add] a is [4, 6] but b is [4]: b must have a's shape or a's trailing dims");
  expect_invalid([&] { ops::mul(s(), b, a); }, "[ops::mul] a is [4] but b is [4, 6]");
  expect_invalid([&] { ops::layernorm(s(), a, b, {}); },
                 "[ops::layernorm] x is [4, 6] but gamma is [4]: gamma must be [6]");
  expect_invalid([&] { ops::layernorm(s(), a, {}, b); }, "beta must be [6]");
  expect_invalid([&] { ops::layernorm(s(), a, {}, {}, 0.0); }, "[ops::layernorm] eps is 0");
  expect_invalid([&] { ops::softmax(s(), a, 0); },
                 "[ops::softmax] dim 0 of x [4, 6] is not supported");
  expect_invalid([&] { ops::copy(s(), a, b); },
                 "[ops::copy] src is [4, 6] but dst is [4]: both must have the same number");
  Tensor c = Tensor::empty({2, 5}, DType::kF32, s());
  const Tensor parts[] = {a, c};
  expect_invalid([&] { ops::cat_rows(s(), parts); },
                 "[ops::cat_rows] tensor 0 is [4, 6] but tensor 1 is [2, 5]");
}

TEST_F(OPS_SUITE, MixedDtypesAndMissingKernelsAreRejected) {
  Tensor f = Tensor::empty({4, 8}, DType::kF32, s());
  Tensor h = Tensor::empty({4, 8}, DType::kBF16, s());
  expect_invalid(
      [&] { ops::add(s(), f, h); },
      "[ops::add] b is bf16[4, 8] but the op runs in f32; give every input the same dtype");
  Tensor w = Tensor::empty({3, 8}, DType::kF16, s());
  expect_invalid([&] { ops::linear(s(), f, w); },
                 "[ops::linear] weight is f16[3, 8] but the op runs in f32");
  if (is_cpu()) {
    expect_invalid(
        [&] { ops::relu(s(), h); },
        "[ops::relu] cpu:0 has no bf16 kernel (relu_bf16); the cpu backend runs f32 only");
  }
}

TEST_F(OPS_SUITE, TensorsOfAnotherDeviceAreRejected) {
  auto other = Device::create(FLOTILLA_TEST_BACKEND, 0, Config::from_env());
  Tensor mine = Tensor::empty({2, 2}, DType::kF32, s());
  Tensor theirs = Tensor::empty({2, 2}, DType::kF32, other->streams().at(1));
  expect_invalid([&] { ops::add(s(), mine, theirs); }, "[ops::add] b is on ");
  expect_invalid([&] { ops::relu(s(), theirs); }, "but the stream is on");
}

TEST_F(OPS_SUITE, BadShapesAndViewsAreRejected) {
  expect_invalid([&] { Tensor::empty({}, DType::kF32, s()); },
                 "[Tensor::empty] shape [] has 0 dims");
  expect_invalid(
      [&] {
        Tensor::empty({2, 0}, DType::kF32, s());
      },
      "[Tensor::empty] shape [2, 0] has a dim below 1");
  expect_invalid(
      [&] {
        Tensor::empty({1, 1, 1, 1, 1, 1, 1, 1, 1}, DType::kF32, s());
      },
      "has 9 dims");
  expect_invalid(
      [&] {
        Tensor::from_host({1.f, 2.f}, {3}, DType::kF32, s());
      },
      "[Tensor::from_host] 2 values given for shape [3]");
  Tensor t = Tensor::empty({4, 6}, DType::kF32, s());
  expect_invalid([&] { t.reshape({5, 5}); }, "[Tensor::reshape] cannot reshape f32[4, 6]");
  expect_invalid([&] { t.reshape({-1, -1}); }, "more than one -1");
  expect_invalid([&] { t.reshape({-1, 7}); }, "do not divide by 7");
  expect_invalid([&] { t.narrow(3, 2); }, "[Tensor::narrow] rows [3, 5) are outside f32[4, 6]");
  expect_invalid([&] { t.narrow(0, 0); }, "[Tensor::narrow]");
  std::vector<float> small(3);
  expect_invalid([&] { t.to_host(std::span<float>(small), s()); }, "[Tensor::to_host] room for 3");
  expect_invalid([&] { t.copy_from_host(small, s()); }, "[Tensor::copy_from_host] 3 values given");
  expect_invalid([&] { (void)t.dim(2); }, "[Tensor::dim] dim 2 is out of range");
  EXPECT_THROW(parse_dtype("f64"), InvalidArgument);
  EXPECT_EQ(parse_dtype("bfloat16"), DType::kBF16);
  EXPECT_THROW(ops::parse_activation("swish"), InvalidArgument);
  EXPECT_EQ(ops::parse_activation("gelu_tanh"), Activation::kGeluTanh);
}

}  // namespace
}  // namespace flotilla::test
