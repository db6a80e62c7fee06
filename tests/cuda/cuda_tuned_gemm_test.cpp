// Config::cuda_tune_gemm (Note [Tuned GEMMs] in src/backend/cuda/nn_kernels.cu):
// the seed MLP with timed algorithm choice gives the CPU backend's answers,
// the same bits on every stream of the device, and the same bits replayed
// from a recording as computed eagerly. Each test says what it would catch.
#include <cmath>
#include <thread>
#include <vector>

#include "cuda/cuda_test_util.h"
#include "flotilla/nn/mlp.h"

namespace flotilla::test {
namespace {

Config tuned() {
  Config c;
  c.cuda_tune_gemm = true;
  return c;
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double scale = 1e-3, worst = 0;
  for (float v : b) scale = std::max(scale, static_cast<double>(std::abs(v)));
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, std::abs(static_cast<double>(a[i]) - b[i]) / scale);
  return worst;
}

// Would catch: a tuned algorithm that computes something else (a candidate
// run with the wrong operands or epilogue), or tuning that leaves y holding a
// candidate's output instead of the real matmul's.
TEST(CudaTunedGemm, TheSeedMlpMatchesTheCpuBackendAtEverySize) {
  FL_SKIP_WITHOUT_GPU();
  auto gpu = Device::create("cuda", 0, tuned());
  auto cpu = Device::create("cpu", 0, Config{});
  const auto w = nn::MlpWeights::seed();
  const nn::Mlp on_gpu(w, DType::kF32, gpu->default_stream());
  const nn::Mlp on_cpu(w, DType::kF32, cpu->default_stream());
  Stream gs = gpu->streams().at(1), cs = cpu->default_stream();
  for (int64_t rows : {1, 2, 8, 16, 64, 128}) {
    const auto in =
        nn::random_uniform(static_cast<size_t>(rows * 512), 40 + static_cast<uint64_t>(rows));
    const auto y =
        on_gpu.forward(gs, Tensor::from_host(in, {rows, 512}, DType::kF32, gs)).to_host(gs);
    const auto ref =
        on_cpu.forward(cs, Tensor::from_host(in, {rows, 512}, DType::kF32, cs)).to_host(cs);
    EXPECT_LT(max_rel_diff(y, ref), 1e-5) << rows << " rows";
  }
}

// Would catch: each stream tuning on its own (timing noise picks different
// algorithms, whose results differ in the last bits): the device-wide table
// must give every stream the same algorithm. Streams tune at once from
// several threads, which also races the table's first entries.
TEST(CudaTunedGemm, EveryStreamComputesTheSameBits) {
  FL_SKIP_WITHOUT_GPU();
  auto gpu = Device::create("cuda", 0, tuned());
  const nn::Mlp mlp(nn::MlpWeights::seed(), DType::kF32, gpu->default_stream());
  const int64_t rows = 24;  // a shape no other test here uses first
  const auto in = nn::random_uniform(static_cast<size_t>(rows * 512), 77);
  constexpr int kThreads = 6;
  std::vector<std::vector<float>> out(kThreads);
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      Stream s = gpu->streams().at(1 + t);
      out[static_cast<size_t>(t)] =
          mlp.forward(s, Tensor::from_host(in, {rows, 512}, DType::kF32, s)).to_host(s);
    });
  for (auto& t : ts) t.join();
  for (int t = 1; t < kThreads; ++t)
    EXPECT_EQ(out[static_cast<size_t>(t)], out[0])
        << "stream " << 1 + t << " differs from stream 1";
}

// Would catch: tuning attempted inside a capture (timing a capturing stream
// fails the recording), or a recorded forward using another algorithm than
// the eager one (different bits).
TEST(CudaTunedGemm, ARecordingReplaysTheEagerBits) {
  FL_SKIP_WITHOUT_GPU();
  auto gpu = Device::create("cuda", 0, tuned());
  const nn::Mlp mlp(nn::MlpWeights::seed(), DType::kF32, gpu->default_stream());
  Stream s = gpu->streams().at(2);
  const int64_t rows = 12;
  const auto in = nn::random_uniform(static_cast<size_t>(rows * 512), 91);
  Tensor x = Tensor::from_host(in, {rows, 512}, DType::kF32, s);
  const auto eager = mlp.forward(s, x).to_host(s);  // tunes this shape
  Tensor y;
  Recording rec = s.record([&] { y = mlp.forward(s, x); });
  s.replay(rec);
  EXPECT_EQ(y.to_host(s), eager);
  // A shape first seen inside a recording is not tuned there, and still runs.
  Tensor x2 = Tensor::from_host(nn::random_uniform(3 * 512, 92), {3, 512}, DType::kF32, s);
  Tensor y2;
  Recording rec2 = s.record([&] { y2 = mlp.forward(s, x2); });
  s.replay(rec2);
  EXPECT_EQ(y2.to_host(s).size(), 3u * 512u);
}

}  // namespace
}  // namespace flotilla::test
