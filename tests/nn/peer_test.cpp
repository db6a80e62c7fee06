// Correctness against a peer: PyTorch. scripts/make_peer_data.py writes, with
// the real `safetensors` library, two small nn.Sequential MLPs (ReLU and
// GELU) and inputs with PyTorch's float64 outputs into tests/data/. Flotilla
// loads the same files and must match: relative error under 1e-5 in f32,
// under 1e-2 in bf16 and 5e-3 in f16 (CUDA only; a host simulation of
// bf16 rounding on such models gives about 5e-3, of f16 about 7e-4).
#include <gtest/gtest.h>

#include <filesystem>

#include "flotilla/nn/mlp.h"
#include "flotilla/nn/safetensors.h"
#include "nn_test_util.h"

#ifndef FLOTILLA_TEST_DATA_DIR
#error "FLOTILLA_TEST_DATA_DIR must name tests/data"
#endif

namespace flotilla::nn {
namespace {

std::string data(const std::string& name) {
  return std::string(FLOTILLA_TEST_DATA_DIR) + "/" + name;
}

#define SKIP_WITHOUT_PEER_FILE(path)                                                  \
  do {                                                                                \
    if (!std::filesystem::exists(path))                                               \
      GTEST_SKIP() << "missing " << (path)                                            \
                   << ": generate it on a machine with torch and safetensors with "   \
                      "`python3 scripts/make_peer_data.py tests/data` and commit it"; \
  } while (0)

class NN_SUITE(Peer) : public ::testing::Test {
 protected:
  void SetUp() override {
    NN_SKIP_WITHOUT_DEVICE();
    for (const char* f :
         {"peer_io.safetensors", "peer_mlp_relu.safetensors", "peer_mlp_gelu.safetensors"})
      SKIP_WITHOUT_PEER_FILE(data(f));
  }

  // Flotilla's outputs on the peer's inputs, against the peer's float64.
  void compare(const std::string& act, DType dtype, double tolerance) {
    SCOPED_TRACE(act + " " + to_string(dtype));
    const auto io = SafetensorsFile::load(data("peer_io.safetensors"));
    const auto w =
        MlpWeights::load(data("peer_mlp_" + act + ".safetensors"), ops::parse_activation(act));
    const auto file = SafetensorsFile::load(data("peer_mlp_" + act + ".safetensors"));
    EXPECT_EQ(file.metadata().count("activation") ? file.metadata().at("activation") : act, act);
    const auto& in = io.at("input");
    const auto& out = io.at("output_" + act);
    ASSERT_EQ(in.shape.size(), 2u);
    ASSERT_EQ(in.shape[1], w.in_features());
    ASSERT_EQ(out.shape, (std::vector<int64_t>{in.shape[0], w.out_features()}));
    EXPECT_EQ(out.dtype, StDtype::kF64) << "the peer's outputs must be float64";

    auto dev = Device::create(test::kBackend, 0, Config{});
    const Stream s = dev->current_stream();
    const Mlp model(w, dtype, s);
    const auto y = test::run_model(model, s, io.to_f32("input"), dtype);
    const double err = test::max_row_rel_error(y, io.to_f64("output_" + act), w.out_features());
    std::printf("%s %s on %s: max row relative error %.3g (limit %.0e)\n", act.c_str(),
                to_string(dtype), test::kBackend.c_str(), err, tolerance);
    EXPECT_LT(err, tolerance);
    // The check can fail: a model with the other activation is far off.
    const auto other =
        MlpWeights::load(data("peer_mlp_" + act + ".safetensors"),
                         act == "relu" ? ops::Activation::kGelu : ops::Activation::kRelu);
    const Mlp wrong(other, dtype, s);
    const auto z = test::run_model(wrong, s, io.to_f32("input"), dtype);
    EXPECT_GT(test::max_row_rel_error(z, io.to_f64("output_" + act), w.out_features()), 1e-3);
  }
};

TEST_F(NN_SUITE(Peer), Float32MatchesPyTorchFloat64) {
  compare("relu", DType::kF32, 1e-5);
  compare("gelu", DType::kF32, 1e-5);
}

#if NN_TEST_CUDA  // bf16/f16 kernels are CUDA only
TEST_F(NN_SUITE(Peer), HalfPrecisionMatchesPyTorchFloat64) {
  compare("relu", DType::kBF16, 1e-2);
  compare("gelu", DType::kBF16, 1e-2);
  compare("relu", DType::kF16, 5e-3);
  compare("gelu", DType::kF16, 5e-3);
}
#endif

}  // namespace
}  // namespace flotilla::nn
