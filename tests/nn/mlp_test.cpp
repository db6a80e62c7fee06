// The MLP: the seed's built-in model, loading an nn.Sequential's state_dict
// from safetensors, every naming and shape error, and forward against a
// float64 host reference.
#include "flotilla/nn/mlp.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "flotilla/nn/safetensors.h"
#include "nn_test_util.h"

namespace flotilla::nn {
namespace {

using test::host_forward;
using test::max_row_rel_error;

std::string temp_file(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("fl_mlp_" + std::to_string(::getpid()) + "_" + name + ".safetensors"))
      .string();
}

// A Sequential(Linear(in, hidden), act, Linear(hidden, out)) state_dict.
std::vector<TensorToSave> two_layers(int64_t in, int64_t hidden, int64_t out) {
  auto values = [](int64_t n, double scale) {
    std::vector<double> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = scale * std::sin(1.0 + i);
    return v;
  };
  return {{"0.weight", StDtype::kF32, {hidden, in}, values(hidden * in, 0.5)},
          {"0.bias", StDtype::kF32, {hidden}, values(hidden, 0.1)},
          {"2.weight", StDtype::kF32, {out, hidden}, values(out * hidden, 0.3)},
          {"2.bias", StDtype::kF32, {out}, values(out, 0.2)}};
}

// Expects from_safetensors to refuse the tensors with a message naming the
// file and containing each of `needles`.
void expect_model_refused(const std::vector<TensorToSave>& tensors,
                          std::initializer_list<std::string> needles) {
  auto file = SafetensorsFile::parse(encode_safetensors(tensors), "model.safetensors");
  try {
    MlpWeights::from_safetensors(file, ops::Activation::kRelu);
    ADD_FAILURE() << "accepted a bad model";
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("model.safetensors"), std::string::npos) << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << n << " in " << msg;
  }
}

TEST(MlpWeights, SeedModelIsTheSeedsShapeAndDeterministic) {
  const MlpWeights a = MlpWeights::seed(), b = MlpWeights::seed();
  ASSERT_EQ(a.layers.size(), 3u);
  EXPECT_EQ(a.describe(), "512-1024-1024-512 relu");
  EXPECT_EQ(a.layers[0].name, "0");
  EXPECT_EQ(a.layers[1].name, "2");
  EXPECT_EQ(a.layers[2].name, "4");
  EXPECT_EQ(a.parameters(), 512 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 512 + 512);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(a.layers[i].weight, b.layers[i].weight) << "seeded weights differ between calls";
    EXPECT_EQ(a.layers[i].bias, b.layers[i].bias);
    // PyTorch's Linear init: uniform in +-1/sqrt(in), and it fills the range.
    const double bound = 1.0 / std::sqrt(static_cast<double>(a.layers[i].in));
    const auto [lo, hi] = std::minmax_element(a.layers[i].weight.begin(), a.layers[i].weight.end());
    EXPECT_GE(*lo, -bound);
    EXPECT_LT(*hi, bound);
    EXPECT_LT(*lo, -0.99 * bound);
    EXPECT_GT(*hi, 0.99 * bound);
  }
  const MlpWeights c = MlpWeights::random({512, 1024, 1024, 512}, ops::Activation::kRelu, 7);
  EXPECT_NE(c.layers[0].weight, a.layers[0].weight) << "another seed must give other weights";
}

TEST(MlpWeights, LoadsASequentialStateDict) {
  const std::string path = temp_file("ok");
  auto tensors = two_layers(4, 6, 3);
  // File order must not matter: PyTorch writes them sorted by name.
  std::swap(tensors[0], tensors[3]);
  save_safetensors(path, tensors, {{"format", "pt"}});
  const MlpWeights w = MlpWeights::load(path, ops::Activation::kGelu);
  std::filesystem::remove(path);
  ASSERT_EQ(w.layers.size(), 2u);
  EXPECT_EQ(w.describe(), "4-6-3 gelu");
  EXPECT_EQ(w.source, path);
  EXPECT_EQ(w.layers[1].name, "2");
  EXPECT_EQ(w.layers[0].weight.size(), 24u);
  EXPECT_FLOAT_EQ(w.layers[0].weight[5], static_cast<float>(0.5 * std::sin(6.0)));
  EXPECT_FLOAT_EQ(w.layers[1].bias[2], static_cast<float>(0.2 * std::sin(3.0)));
}

TEST(MlpWeights, RefusesBadNamesAndShapesNamingTheTensor) {
  auto t = two_layers(4, 6, 3);
  {
    auto missing_bias = t;
    missing_bias.erase(missing_bias.begin() + 3);  // 2.bias
    expect_model_refused(missing_bias, {"'2.bias'", "layer 2"});
  }
  {
    auto missing_weight = t;
    missing_weight.erase(missing_weight.begin() + 2);  // 2.weight
    expect_model_refused(missing_weight, {"'2.weight'"});
  }
  {
    auto mismatch = t;
    mismatch[2] = {"2.weight", StDtype::kF32, {3, 5}, std::vector<double>(15, 0.0)};
    expect_model_refused(mismatch, {"'2.weight' is [3, 5]", "'0.weight' outputs 6", "must be 6"});
  }
  {
    auto bad_bias = t;
    bad_bias[1] = {"0.bias", StDtype::kF32, {5}, std::vector<double>(5, 0.0)};
    expect_model_refused(bad_bias, {"'0.bias' is [5]", "must be [6]"});
  }
  {
    auto not_2d = t;
    not_2d[0] = {"0.weight", StDtype::kF32, {24}, std::vector<double>(24, 0.0)};
    expect_model_refused(not_2d, {"'0.weight' is [24]", "2-D"});
  }
  {
    auto stray = t;
    stray.push_back({"1.running_mean", StDtype::kF32, {6}, std::vector<double>(6, 0.0)});
    expect_model_refused(stray, {"unexpected tensor '1.running_mean'"});
  }
  expect_model_refused({}, {"no Linear layers"});
}

TEST(MlpWeights, LoadNamesAMissingOrMalformedFile) {
  const std::string path = temp_file("missing");
  EXPECT_THROW(
      {
        try {
          MlpWeights::load(path, ops::Activation::kRelu);
        } catch (const InvalidArgument& e) {
          EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
          throw;
        }
      },
      InvalidArgument);
  const std::string garbage = temp_file("garbage");
  {
    std::ofstream f(garbage, std::ios::binary);
    f << "this is not a safetensors file at all";
  }
  try {
    MlpWeights::load(garbage, ops::Activation::kRelu);
    ADD_FAILURE() << "a text file was accepted as a model";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(garbage), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("beyond the file"), std::string::npos) << e.what();
  }
  std::filesystem::remove(garbage);
}

class NN_SUITE(MlpForward) : public ::testing::Test {
 protected:
  void SetUp() override { NN_SKIP_WITHOUT_DEVICE(); }
};

TEST_F(NN_SUITE(MlpForward), MatchesAFloat64HostReference) {
  auto dev = Device::create(test::kBackend, 0, Config{});
  for (auto act : {ops::Activation::kRelu, ops::Activation::kGelu}) {
    const MlpWeights w = MlpWeights::random({24, 40, 40, 8}, act, 11);
    Stream s = dev->current_stream();
    const Mlp model(w, DType::kF32, s);
    EXPECT_EQ(model.in_features(), 24);
    EXPECT_EQ(model.out_features(), 8);
    EXPECT_EQ(model.layers(), 3);
    for (int64_t batch : {1, 5, 33}) {
      const auto x = random_uniform(static_cast<size_t>(batch * 24), 100 + batch);
      const auto y = test::run_model(model, s, x, DType::kF32);
      ASSERT_EQ(y.size(), static_cast<size_t>(batch * 8));
      const double err = max_row_rel_error(y, host_forward(w, x), 8);
      EXPECT_LT(err, 1e-5) << ops::to_string(act) << " batch " << batch;
    }
  }
}

TEST_F(NN_SUITE(MlpForward), SeedModelRunsAndRefusesAWrongInput) {
  auto dev = Device::create(test::kBackend, 0, Config{});
  const MlpWeights w = MlpWeights::seed();
  Stream s = dev->current_stream();
  const Mlp model(w, DType::kF32, s);
  const auto x = random_uniform(2 * 512, 3);
  Tensor y = model.forward(s, Tensor::from_host(x, {2, 512}, DType::kF32, s));
  EXPECT_EQ(y.shape(), (Shape{2, 512}));
  EXPECT_LT(max_row_rel_error(y.to_host(s), host_forward(w, x), 512), 1e-5);
  // 256 features into a 512-input model: the op names the shapes.
  Tensor bad = Tensor::from_host(random_uniform(256, 4), {1, 256}, DType::kF32, s);
  try {
    model.forward(s, bad);
    ADD_FAILURE() << "a [1, 256] input was accepted by a 512-input model";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("[1, 256]"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace flotilla::nn
