// safetensors: the weight format of Hugging Face's `safetensors` library.
//
// Layout: an 8-byte little-endian header length N; N bytes of JSON (an object
// whose keys are tensor names, each {"dtype", "shape", "data_offsets": [begin,
// end]}, plus an optional "__metadata__" object of strings), possibly padded
// with spaces; then the data section, which the tensors' byte ranges (relative
// to its start) must tile exactly, in order, without gaps or overlaps.
//
// SafetensorsFile::load() reads a whole file and validates everything before
// returning: a malformed file (truncated, header length beyond the file, bad
// JSON, a missing or ill-typed field, an unknown dtype, offsets out of bounds,
// overlapping, leaving gaps, or not matching shape x dtype size, duplicate
// names) is refused with InvalidArgument naming the file and the problem. No
// byte outside the buffer is ever read, whatever the input.
//
// save_safetensors() writes the same format (aligned to 8 bytes, as the
// reference writer does), for tests and tools.
//
// Thread safety: a SafetensorsFile is immutable after load(); any number of
// threads may read it at once. Lifetime: a TensorView's bytes live as long as
// the SafetensorsFile it came from.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace flotilla::nn {

// The element types of the format (the reference library's names).
enum class StDtype {
  kBool,
  kU8,
  kI8,
  kF8E5M2,
  kF8E4M3,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kI64,
  kU64,
  kF64,
};

// "F32", "BF16", ... as written in the header.
const char* to_string(StDtype dtype) noexcept;
size_t element_size(StDtype dtype) noexcept;
// Throws InvalidArgument naming the string and listing the known ones.
StDtype parse_st_dtype(std::string_view name);
// F64, F32, F16 and BF16: the ones to_f32()/to_f64() convert.
bool is_float_dtype(StDtype dtype) noexcept;

struct TensorView {
  std::string name;
  StDtype dtype = StDtype::kF32;
  std::vector<int64_t> shape;
  std::span<const std::byte> data;  // exactly numel() * element_size(dtype) bytes

  int64_t numel() const;
};

class SafetensorsFile {
 public:
  // Reads and validates `path`. Throws InvalidArgument naming the file.
  static SafetensorsFile load(const std::string& path);
  // Validates bytes already in memory; `source` names them in errors.
  static SafetensorsFile parse(std::vector<std::byte> bytes, std::string source);

  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& source() const { return source_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Tensors in file order (by offset).
  const std::vector<TensorView>& tensors() const { return tensors_; }
  bool contains(std::string_view name) const;
  // Throws InvalidArgument naming the file and the tensor if absent.
  const TensorView& at(std::string_view name) const;

  // The tensor's values converted to float / double (little-endian input).
  // Throws InvalidArgument for a non-float dtype.
  std::vector<float> to_f32(std::string_view name) const;
  std::vector<double> to_f64(std::string_view name) const;

 private:
  SafetensorsFile() = default;

  std::string source_;
  std::vector<std::byte> bytes_;  // the whole file; views point into it
  std::map<std::string, std::string> metadata_;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in tensors_
};

// One tensor to write: host values of `dtype` (converted from double).
struct TensorToSave {
  std::string name;
  StDtype dtype = StDtype::kF32;
  std::vector<int64_t> shape;
  std::vector<double> values;  // shape's product of them
};

// Encodes tensors (in the given order) and metadata to safetensors bytes;
// float dtypes only. Throws InvalidArgument on a size mismatch.
std::vector<std::byte> encode_safetensors(const std::vector<TensorToSave>& tensors,
                                          const std::map<std::string, std::string>& metadata = {});
// Writes encode_safetensors() to `path`. Throws InvalidArgument if it cannot.
void save_safetensors(const std::string& path, const std::vector<TensorToSave>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace flotilla::nn
