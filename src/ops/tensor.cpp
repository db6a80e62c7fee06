#include "flotilla/ops/tensor.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "flotilla/common/error.h"
#include "flotilla/runtime/device.h"

namespace flotilla {

// ---- DType ---------------------------------------------------------------------------

const char* to_string(DType dtype) noexcept {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
  }
  return "?";
}

size_t dtype_size(DType dtype) noexcept { return dtype == DType::kF32 ? 4 : 2; }

DType parse_dtype(const std::string& s) {
  if (s == "f32" || s == "float32" || s == "float") return DType::kF32;
  if (s == "f16" || s == "float16" || s == "half") return DType::kF16;
  if (s == "bf16" || s == "bfloat16") return DType::kBF16;
  throw InvalidArgument(
      detail::str_cat("[parse_dtype] unknown dtype '", s, "'; use f32, f16 or bf16"));
}

std::string shape_to_string(std::span<const int64_t> shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

// ---- float <-> f16 / bf16 -----------------------------------------------------------

uint16_t float_to_half(float f) noexcept {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const auto sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t a = x & 0x7FFFFFFFu;
  if (a >= 0x7F800000u)  // inf or NaN (kept quiet)
    return sign | 0x7C00u | (a > 0x7F800000u ? 0x200u | ((a >> 13) & 0x3FFu) : 0u);
  if (a >= 0x477FF000u) return sign | 0x7C00u;  // rounds past 65504: inf
  if (a < 0x38800000u) {
    // Below 2^-14: a half subnormal m * 2^-24. The product is exact and
    // nearbyint rounds to nearest even in the default rounding mode.
    const float m = std::nearbyint(std::bit_cast<float>(a) * 16777216.0f);
    return sign | static_cast<uint16_t>(m);
  }
  // Rebias the exponent (127 -> 15) and round the 13 dropped bits to even.
  a += 0xC8000FFFu + ((a >> 13) & 1u);
  return sign | static_cast<uint16_t>(a >> 13);
}

float half_to_float(uint16_t h) noexcept {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // 2^-24
    return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(v));
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7F800000u | (mant << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t float_to_bf16(float f) noexcept {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

float bf16_to_float(uint16_t b) noexcept {
  return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

namespace {

constexpr int kMaxRank = 8;

int64_t checked_numel(const char* api, const Shape& shape) {
  FL_CHECK_ARG(!shape.empty() && shape.size() <= kMaxRank, "[", api, "] shape ",
               shape_to_string(shape), " has ", shape.size(), " dims; tensors have 1 to ", kMaxRank,
               " (a scalar is [1])");
  int64_t n = 1;
  for (int64_t d : shape) {
    FL_CHECK_ARG(d >= 1, "[", api, "] shape ", shape_to_string(shape),
                 " has a dim below 1; every dim must be at least 1 (there are no empty tensors)");
    FL_CHECK_ARG(n <= (int64_t{1} << 60) / d, "[", api, "] shape ", shape_to_string(shape),
                 " has too many elements");
    n *= d;
  }
  return n;
}

void convert_from_float(std::span<const float> in, DType dtype, void* out) {
  switch (dtype) {
    case DType::kF32: std::memcpy(out, in.data(), in.size_bytes()); return;
    case DType::kF16: {
      auto* o = static_cast<uint16_t*>(out);
      for (size_t i = 0; i < in.size(); ++i) o[i] = float_to_half(in[i]);
      return;
    }
    case DType::kBF16: {
      auto* o = static_cast<uint16_t*>(out);
      for (size_t i = 0; i < in.size(); ++i) o[i] = float_to_bf16(in[i]);
      return;
    }
  }
}

void convert_to_float(const void* in, DType dtype, std::span<float> out) {
  switch (dtype) {
    case DType::kF32: std::memcpy(out.data(), in, out.size_bytes()); return;
    case DType::kF16: {
      auto* i16 = static_cast<const uint16_t*>(in);
      for (size_t i = 0; i < out.size(); ++i) out[i] = half_to_float(i16[i]);
      return;
    }
    case DType::kBF16: {
      auto* i16 = static_cast<const uint16_t*>(in);
      for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_float(i16[i]);
      return;
    }
  }
}

}  // namespace

// ---- Tensor --------------------------------------------------------------------------

Tensor::Tensor(std::shared_ptr<Allocation> storage, Shape shape, DType dtype, int64_t offset_bytes)
    : storage_(std::move(storage)),
      shape_(std::move(shape)),
      numel_(checked_numel("Tensor", shape_)),
      dtype_(dtype),
      offset_bytes_(offset_bytes) {}

Tensor Tensor::empty(Shape shape, DType dtype, const Stream& stream) {
  const int64_t n = checked_numel("Tensor::empty", shape);
  auto alloc =
      stream.device().allocator().allocate(static_cast<size_t>(n) * dtype_size(dtype), stream);
  return Tensor(std::make_shared<Allocation>(std::move(alloc)), std::move(shape), dtype, 0);
}

Tensor Tensor::from_host(std::span<const float> data, Shape shape, DType dtype,
                         const Stream& stream) {
  const int64_t n = checked_numel("Tensor::from_host", shape);
  FL_CHECK_ARG(static_cast<int64_t>(data.size()) == n, "[Tensor::from_host] ", data.size(),
               " values given for shape ", shape_to_string(shape), ", which holds ", n,
               "; pass exactly one value per element");
  Tensor t = empty(std::move(shape), dtype, stream);
  t.copy_from_host(data, stream);
  return t;
}

Tensor Tensor::from_host(std::initializer_list<float> data, Shape shape, DType dtype,
                         const Stream& stream) {
  return from_host(std::span<const float>(data.begin(), data.size()), std::move(shape), dtype,
                   stream);
}

void Tensor::copy_from_host(std::span<const float> values, const Stream& stream) {
  FL_CHECK_ARG(defined(), "[Tensor::copy_from_host] the tensor is undefined");
  FL_CHECK_ARG(static_cast<int64_t>(values.size()) == numel_, "[Tensor::copy_from_host] ",
               values.size(), " values given for ", to_string(), "; pass exactly ", numel_);
  record_stream(stream);
  // The host converts into a staging block now, so `data` may be reused at
  // once; the device copies it in stream order. The staging block is reused
  // only after the copy has run (allocator.h).
  Allocation staging = device().allocator().allocate_host(nbytes(), stream);
  FL_INTERNAL_CHECK(staging.host_ptr() != nullptr, "staging memory is not host-visible");
  convert_from_float(values, dtype_, staging.host_ptr());
  Stream(stream).dispatch(
      "copy_bytes", backend::KernelArgs().ptr(data()).ptr(staging.device_ptr()).size(nbytes()));
}

std::vector<float> Tensor::to_host(const Stream& stream) const {
  FL_CHECK_ARG(defined(), "[Tensor::to_host] the tensor is undefined");
  std::vector<float> out(static_cast<size_t>(numel_));
  to_host(std::span<float>(out), stream);
  return out;
}

void Tensor::to_host(std::span<float> out, const Stream& stream) const {
  FL_CHECK_ARG(defined(), "[Tensor::to_host] the tensor is undefined");
  FL_CHECK_ARG(static_cast<int64_t>(out.size()) == numel_, "[Tensor::to_host] room for ",
               out.size(), " values given for ", to_string(), "; pass exactly ", numel_);
  record_stream(stream);
  Allocation staging = device().allocator().allocate_host(nbytes(), stream);
  FL_INTERNAL_CHECK(staging.host_ptr() != nullptr, "staging memory is not host-visible");
  Stream(stream).dispatch(
      "copy_bytes", backend::KernelArgs().ptr(staging.device_ptr()).ptr(data()).size(nbytes()));
  device().allocator().synchronize_stream(stream);  // also recycles staging blocks
  convert_to_float(staging.host_ptr(), dtype_, out);
  staging.release_idle();  // the stream has synchronized: the copy has run
}

int64_t Tensor::dim(int i) const {
  const int r = rank();
  FL_CHECK_ARG(i >= -r && i < r, "[Tensor::dim] dim ", i, " is out of range for ", to_string());
  return shape_[static_cast<size_t>(i < 0 ? i + r : i)];
}

Shape Tensor::strides() const {
  Shape s(shape_.size());
  int64_t st = 1;
  for (size_t i = shape_.size(); i-- > 0;) {
    s[i] = st;
    st *= shape_[i];
  }
  return s;
}

Device& Tensor::device() const {
  FL_CHECK_ARG(defined(), "[Tensor::device] the tensor is undefined");
  return storage_->stream().device();
}

Stream Tensor::stream() const {
  FL_CHECK_ARG(defined(), "[Tensor::stream] the tensor is undefined");
  return storage_->stream();
}

void* Tensor::data() const {
  if (!storage_) return nullptr;
  return static_cast<char*>(storage_->device_ptr()) + offset_bytes_;
}

std::string Tensor::to_string() const {
  if (!defined()) return "undefined tensor";
  return detail::str_cat(flotilla::to_string(dtype_), shape_to_string(shape_), " on ",
                         device().name());
}

Tensor Tensor::reshape(Shape shape) const {
  FL_CHECK_ARG(defined(), "[Tensor::reshape] the tensor is undefined");
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      FL_CHECK_ARG(infer < 0, "[Tensor::reshape] ", shape_to_string(shape),
                   " has more than one -1; at most one dim may be inferred");
      infer = static_cast<int>(i);
    } else {
      FL_CHECK_ARG(shape[i] >= 1, "[Tensor::reshape] ", shape_to_string(shape),
                   " has a dim below 1");
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    FL_CHECK_ARG(numel_ % known == 0, "[Tensor::reshape] cannot reshape ", to_string(), " to ",
                 shape_to_string(shape), ": ", numel_, " elements do not divide by ", known);
    shape[static_cast<size_t>(infer)] = numel_ / known;
  }
  const int64_t n = checked_numel("Tensor::reshape", shape);
  FL_CHECK_ARG(n == numel_, "[Tensor::reshape] cannot reshape ", to_string(), " (", numel_,
               " elements) to ", shape_to_string(shape), " (", n, " elements)");
  return Tensor(storage_, std::move(shape), dtype_, offset_bytes_);
}

Tensor Tensor::narrow(int64_t start, int64_t length) const {
  FL_CHECK_ARG(defined(), "[Tensor::narrow] the tensor is undefined");
  FL_CHECK_ARG(start >= 0 && length >= 1 && start + length <= shape_[0], "[Tensor::narrow] rows [",
               start, ", ", start + length, ") are outside ", to_string(),
               "; need 0 <= start and 1 <= length and start + length <= ", shape_[0]);
  Shape s = shape_;
  s[0] = length;
  const int64_t row_bytes = numel_ / shape_[0] * static_cast<int64_t>(dtype_size(dtype_));
  return Tensor(storage_, std::move(s), dtype_, offset_bytes_ + start * row_bytes);
}

void Tensor::record_stream(const Stream& stream) const {
  FL_CHECK_ARG(defined(), "[Tensor::record_stream] the tensor is undefined");
  storage_->record_stream(stream);
}

}  // namespace flotilla
