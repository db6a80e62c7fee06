// Mlp: a multi-layer perceptron, as PyTorch's nn.Sequential of Linear and
// activation layers, e.g. Sequential(Linear(512, 1024), ReLU(), Linear(1024,
// 1024), ReLU(), Linear(1024, 512)) -- the seed's model.
//
// Two parts, so weights are read or generated once and uploaded to as many
// devices as wanted:
//  - MlpWeights: the layers on the host (float), from a safetensors file as
//    written by safetensors.torch.save_file(model.state_dict()) (tensors
//    "<i>.weight" [out, in] and "<i>.bias" [out] for each Linear at position i
//    of the Sequential), or generated (the seed's model is built in).
//  - Mlp: those weights on a device in a dtype (f32; f16/bf16 on CUDA), with
//    forward() running the layers on a caller's stream with the ops.
//
// The activation is not in the file (activation modules have no
// parameters): it is an option, applied after every Linear but the last.
//
// Thread safety: both are immutable after construction. Any number of threads
// may call Mlp::forward at once, each on its own stream (or on shared ones).
// Lifetime: an Mlp holds device tensors and must not outlive its Device.
// What blocks: the Mlp constructor (it waits for the upload); forward never
// waits for the device.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "flotilla/nn/safetensors.h"
#include "flotilla/ops/ops.h"
#include "flotilla/ops/tensor.h"

namespace flotilla::nn {

// One Linear layer on the host, PyTorch's layout.
struct LinearWeights {
  std::string name;  // the Sequential index, "0", "2", ...
  int64_t in = 0, out = 0;
  std::vector<float> weight;  // [out, in], row-major
  std::vector<float> bias;    // [out]
};

struct MlpWeights {
  std::vector<LinearWeights> layers;
  ops::Activation activation = ops::Activation::kRelu;
  std::string source;  // the file, or "seed" / "random" for generated ones

  // The seed's model: 512 -> 1024 -> 1024 -> 512 with ReLU, weights from
  // random(kSeedSizes, relu, kSeedModelSeed).
  static constexpr uint64_t kSeedModelSeed = 0x5eed;
  static MlpWeights seed();
  // Layers sizes[0] -> sizes[1] -> ... with PyTorch's default Linear init
  // (weight and bias uniform in [-1/sqrt(in), 1/sqrt(in)]) from a
  // deterministic generator: the same seed gives the same bits everywhere.
  static MlpWeights random(const std::vector<int64_t>& sizes, ops::Activation activation,
                           uint64_t seed);
  // From a loaded file. Throws InvalidArgument naming the file and the tensor
  // for: a tensor that is not "<i>.weight"/"<i>.bias", a weight without its
  // bias (or the reverse), a weight that is not 2-D or a bias that is not
  // [out], a layer whose input size differs from the previous layer's output
  // size, a non-float dtype, or no layers at all.
  static MlpWeights from_safetensors(const SafetensorsFile& file, ops::Activation activation);
  // SafetensorsFile::load + from_safetensors.
  static MlpWeights load(const std::string& path, ops::Activation activation);

  int64_t in_features() const { return layers.front().in; }
  int64_t out_features() const { return layers.back().out; }
  int64_t parameters() const;
  // "512-1024-1024-512 relu"
  std::string describe() const;
};

// `count` values uniform in [-1, 1) from the generator behind
// MlpWeights::random (deterministic: the same seed gives the same bits), for
// inputs of workloads and tests.
std::vector<float> random_uniform(size_t count, uint64_t seed);

class Mlp {
 public:
  // Uploads `weights` in `dtype` on `stream` and waits for the upload, so
  // forward() may then run on any stream of the device.
  Mlp(const MlpWeights& weights, DType dtype, const Stream& stream);

  // x [batch, in] (or [..., in]) of the model's dtype, on the same device.
  // Returns [batch, out] on `stream`. Encodes one linear (with the
  // activation fused where the backend can) per layer; never waits.
  // Throws InvalidArgument (from the ops) naming the shapes on a bad x.
  Tensor forward(const Stream& stream, const Tensor& x) const;

  DType dtype() const { return dtype_; }
  ops::Activation activation() const { return activation_; }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  int layers() const { return static_cast<int>(weights_.size()); }

 private:
  struct Layer {
    Tensor weight, bias;
  };
  std::vector<Layer> weights_;
  ops::Activation activation_;
  DType dtype_;
  int64_t in_, out_;
};

}  // namespace flotilla::nn
