// Tensor: an n-dimensional array in device memory, with stream-ordered
// storage from the device's caching allocator (runtime/allocator.h).
//
// Layout: every Tensor is contiguous, row-major (the last dimension varies
// fastest); strides() are always the contiguous strides. The views offered
// keep that true: reshape() and narrow() along dimension 0 (row slices, what
// a batching queue needs). Views share storage with their source and keep it
// alive. Shapes have 1 to 8 dimensions, each at least 1: there are no empty
// or rank-0 tensors (a scalar is shape {1}).
//
// DTypes: f32 everywhere; f16 and bf16 have storage on every backend (so a
// model can be uploaded and read back), but only the CUDA backend has kernels
// for them; ops on a CPU f16/bf16 tensor throw InvalidArgument saying so.
// Host data is always float; from_host() converts to the tensor's dtype
// (round to nearest even) and to_host() converts back.
//
// Streams: a Tensor remembers the stream it was allocated on; its memory
// returns to that stream's cache when the last view is destroyed, without
// waiting for the device (work already encoded keeps it valid). Using a
// tensor on another stream: ops do record_stream() for you; code that hands
// device_ptr() to kernels on other streams must call record_stream() itself.
// Ordering reads after writes across streams is the caller's job (Event).
//
// Thread safety: a Tensor is a value handle (like a shared_ptr): copies may
// be used and destroyed on any threads at once. The data is not guarded:
// two streams writing the same tensor without an Event between them race,
// as on a GPU.
//
// What blocks: to_host() (it synchronizes the stream); nothing else waits
// for the device.
//
// Lifetime: not past its Device (see allocator.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "flotilla/runtime/allocator.h"
#include "flotilla/runtime/stream.h"

namespace flotilla {

class Device;

enum class DType { kF32, kF16, kBF16 };

const char* to_string(DType dtype) noexcept;  // "f32", "f16", "bf16"
size_t dtype_size(DType dtype) noexcept;      // 4, 2, 2
// Parses "f32"/"float32", "f16"/"float16"/"half", "bf16"/"bfloat16";
// throws InvalidArgument listing them.
DType parse_dtype(const std::string& s);

using Shape = std::vector<int64_t>;
// "[8, 512]"
std::string shape_to_string(std::span<const int64_t> shape);

// float <-> half / bfloat16 on the host (round to nearest even; NaN kept).
uint16_t float_to_half(float f) noexcept;
float half_to_float(uint16_t h) noexcept;
uint16_t float_to_bf16(float f) noexcept;
float bf16_to_float(uint16_t b) noexcept;

class Tensor {
 public:
  // An undefined tensor (defined() is false); ops reject it.
  Tensor() = default;

  // Uninitialised memory of `shape` on `stream`'s device, for use on `stream`.
  static Tensor empty(Shape shape, DType dtype, const Stream& stream);
  // A tensor holding `data` (row-major, numel(shape) values), converted to
  // `dtype`. The data is copied into a staging buffer before this returns,
  // so `data` may be reused at once; the device copy is encoded on `stream`.
  static Tensor from_host(std::span<const float> data, Shape shape, DType dtype,
                          const Stream& stream);
  static Tensor from_host(std::initializer_list<float> data, Shape shape, DType dtype,
                          const Stream& stream);

  // The values as float. Encodes the copy on `stream`, then synchronizes
  // `stream` (blocks the host; rethrows the stream's asynchronous error).
  std::vector<float> to_host(const Stream& stream) const;
  // Same, into `out` (numel() values).
  void to_host(std::span<float> out, const Stream& stream) const;
  // Overwrites the tensor with `data` (numel() values, converted to dtype),
  // stream-ordered on `stream`; `data` may be reused when this returns.
  void copy_from_host(std::span<const float> data, const Stream& stream);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const;  // negative counts from the end
  int rank() const { return static_cast<int>(shape_.size()); }
  Shape strides() const;  // contiguous strides, in elements
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device& device() const;
  // The stream the storage was allocated on.
  Stream stream() const;
  // The first element's device address (storage + view offset).
  void* data() const;
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data());
  }
  // "f32[8, 512] on cpu:0"
  std::string to_string() const;

  // ---- Views (share storage, never copy) --------------------------------
  // Same data, new shape with the same numel; one dim may be -1 (inferred).
  Tensor reshape(Shape shape) const;
  // Rows [start, start + length) along dimension 0.
  Tensor narrow(int64_t start, int64_t length) const;
  // Row i along dimension 0, keeping the rank (shape[0] becomes 1).
  Tensor row(int64_t i) const { return narrow(i, 1); }

  // Marks the storage as used on `stream` (see allocator.h). Never blocks.
  void record_stream(const Stream& stream) const;
  // True if both views share one storage.
  bool shares_storage(const Tensor& other) const { return storage_ == other.storage_; }

 private:
  Tensor(std::shared_ptr<Allocation> storage, Shape shape, DType dtype, int64_t offset_bytes);

  std::shared_ptr<Allocation> storage_;
  Shape shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::kF32;
  int64_t offset_bytes_ = 0;
};

}  // namespace flotilla
