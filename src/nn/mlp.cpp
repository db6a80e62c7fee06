#include "flotilla/nn/mlp.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>

#include "flotilla/common/error.h"

namespace flotilla::nn {

namespace {

// splitmix64: tiny, and its output is defined bit for bit (unlike the
// standard library's distributions), so "seeded" means the same everywhere.
struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [-bound, bound).
  float uniform(double bound) {
    const double u = static_cast<double>(next() >> 40) * 0x1.0p-24;  // [0, 1), 24 bits
    return static_cast<float>((2.0 * u - 1.0) * bound);
  }
};

// "<i>.weight" / "<i>.bias" -> (i, is_weight); false if the name is neither.
bool parse_param_name(const std::string& name, int64_t& index, bool& is_weight) {
  const auto dot = name.find('.');
  if (dot == std::string::npos || dot == 0) return false;
  const std::string_view num(name.data(), dot);
  const std::string_view kind(name.data() + dot + 1, name.size() - dot - 1);
  if (kind != "weight" && kind != "bias") return false;
  if (!std::all_of(num.begin(), num.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return false;
  const auto [p, ec] = std::from_chars(num.data(), num.data() + num.size(), index);
  if (ec != std::errc() || p != num.data() + num.size()) return false;
  is_weight = kind == "weight";
  return true;
}

std::string shape_str(const std::vector<int64_t>& s) { return shape_to_string(s); }

}  // namespace

std::vector<float> random_uniform(size_t count, uint64_t seed) {
  SplitMix64 rng{seed};
  std::vector<float> out(count);
  for (float& v : out) v = rng.uniform(1.0);
  return out;
}

MlpWeights MlpWeights::seed() {
  MlpWeights w = random({512, 1024, 1024, 512}, ops::Activation::kRelu, kSeedModelSeed);
  w.source = "seed";
  return w;
}

MlpWeights MlpWeights::random(const std::vector<int64_t>& sizes, ops::Activation activation,
                              uint64_t seed) {
  FL_CHECK_ARG(sizes.size() >= 2, "[MlpWeights::random] need at least two sizes, got ",
               sizes.size());
  for (int64_t s : sizes)
    FL_CHECK_ARG(s >= 1, "[MlpWeights::random] sizes must be positive, got ", shape_str(sizes));
  MlpWeights w;
  w.activation = activation;
  w.source = "random";
  SplitMix64 rng{seed};
  for (size_t i = 0; i + 1 < sizes.size(); ++i) {
    LinearWeights l;
    l.name = std::to_string(2 * i);  // Linear, activation, Linear, ...
    l.in = sizes[i];
    l.out = sizes[i + 1];
    // PyTorch's nn.Linear.reset_parameters: kaiming_uniform(a=sqrt(5)) on the
    // weight is uniform(+-1/sqrt(in)); the bias uses the same bound.
    const double bound = 1.0 / std::sqrt(static_cast<double>(l.in));
    l.weight.resize(static_cast<size_t>(l.in * l.out));
    for (float& v : l.weight) v = rng.uniform(bound);
    l.bias.resize(static_cast<size_t>(l.out));
    for (float& v : l.bias) v = rng.uniform(bound);
    w.layers.push_back(std::move(l));
  }
  return w;
}

MlpWeights MlpWeights::from_safetensors(const SafetensorsFile& file, ops::Activation activation) {
  const std::string where = "[Mlp::load] " + file.source() + ": ";
  struct Pair {
    const TensorView* weight = nullptr;
    const TensorView* bias = nullptr;
  };
  std::map<int64_t, Pair> by_index;
  for (const TensorView& t : file.tensors()) {
    int64_t index = 0;
    bool is_weight = false;
    FL_CHECK_ARG(parse_param_name(t.name, index, is_weight), where, "unexpected tensor '", t.name,
                 "'; an nn.Sequential of Linear layers has only '<i>.weight' and '<i>.bias'");
    FL_CHECK_ARG(is_float_dtype(t.dtype), where, "tensor '", t.name, "' has dtype ",
                 to_string(t.dtype), "; weights must be F32, F16, BF16 or F64");
    (is_weight ? by_index[index].weight : by_index[index].bias) = &t;
  }
  FL_CHECK_ARG(!by_index.empty(), where, "no Linear layers ('<i>.weight' and '<i>.bias') found");

  MlpWeights w;
  w.activation = activation;
  w.source = file.source();
  const LinearWeights* prev = nullptr;
  for (const auto& [index, p] : by_index) {
    const std::string i = std::to_string(index);
    FL_CHECK_ARG(p.weight, where, "tensor '", i, ".bias' has no '", i, ".weight'");
    FL_CHECK_ARG(p.bias, where, "layer ", i, " has '", i, ".weight' but no '", i,
                 ".bias'; Flotilla's MLP needs Linear layers with bias");
    FL_CHECK_ARG(p.weight->shape.size() == 2, where, "tensor '", i, ".weight' is ",
                 shape_str(p.weight->shape), "; a Linear weight is 2-D [out, in]");
    LinearWeights l;
    l.name = i;
    l.out = p.weight->shape[0];
    l.in = p.weight->shape[1];
    FL_CHECK_ARG(l.in >= 1 && l.out >= 1, where, "tensor '", i, ".weight' is ",
                 shape_str(p.weight->shape), "; a Linear layer needs non-empty dims");
    FL_CHECK_ARG(p.bias->shape == std::vector<int64_t>{l.out}, where, "tensor '", i, ".bias' is ",
                 shape_str(p.bias->shape), " but '", i, ".weight' is ", shape_str(p.weight->shape),
                 ": the bias must be [", l.out, "]");
    if (prev) {
      FL_CHECK_ARG(l.in == prev->out, where, "tensor '", i, ".weight' is ",
                   shape_str(p.weight->shape), " but the previous layer '", prev->name,
                   ".weight' outputs ", prev->out, " features: '", i, ".weight' dim 1 must be ",
                   prev->out);
    }
    l.weight = file.to_f32(p.weight->name);
    l.bias = file.to_f32(p.bias->name);
    w.layers.push_back(std::move(l));
    prev = &w.layers.back();
  }
  return w;
}

MlpWeights MlpWeights::load(const std::string& path, ops::Activation activation) {
  return from_safetensors(SafetensorsFile::load(path), activation);
}

int64_t MlpWeights::parameters() const {
  int64_t n = 0;
  for (const auto& l : layers) n += l.in * l.out + l.out;
  return n;
}

std::string MlpWeights::describe() const {
  std::string s;
  if (!layers.empty()) s = std::to_string(layers.front().in);
  for (const auto& l : layers) s += "-" + std::to_string(l.out);
  return s + " " + ops::to_string(activation);
}

// ---- Mlp -----------------------------------------------------------------------------

Mlp::Mlp(const MlpWeights& weights, DType dtype, const Stream& stream)
    : activation_(weights.activation), dtype_(dtype) {
  FL_CHECK_ARG(!weights.layers.empty(), "[Mlp] the weights have no layers");
  in_ = weights.in_features();
  out_ = weights.out_features();
  for (const auto& l : weights.layers) {
    FL_CHECK_ARG(l.weight.size() == static_cast<size_t>(l.in * l.out) &&
                     l.bias.size() == static_cast<size_t>(l.out),
                 "[Mlp] layer '", l.name, "' has ", l.weight.size(), " weights and ", l.bias.size(),
                 " biases for [", l.out, ", ", l.in, "]");
    weights_.push_back({Tensor::from_host(l.weight, {l.out, l.in}, dtype, stream),
                        Tensor::from_host(l.bias, {l.out}, dtype, stream)});
  }
  // Other streams read the weights without an Event: finish the upload now.
  Stream(stream).synchronize();
}

Tensor Mlp::forward(const Stream& stream, const Tensor& x) const {
  Tensor h = x;
  for (size_t i = 0; i < weights_.size(); ++i) {
    const bool last = i + 1 == weights_.size();
    h = ops::linear(stream, h, weights_[i].weight, weights_[i].bias,
                    last ? ops::Activation::kNone : activation_);
  }
  return h;
}

}  // namespace flotilla::nn
