// The safetensors reader and writer. See nn/safetensors.h for the format.
//
// Note [Validating untrusted headers]
// The header is parsed with nlohmann-json and every field is checked before
// any data pointer is formed: sizes are computed with overflow checks, and a
// tensor's byte range is accepted only if it lies inside the data section and
// its length equals numel x element size. The tensors, sorted by offset, must
// tile the data section exactly (as the reference library requires), which
// also rules out overlaps. Only then are spans into the buffer created.
#include "flotilla/nn/safetensors.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "flotilla/common/error.h"
#include "flotilla/ops/tensor.h"  // float <-> half / bfloat16

namespace flotilla::nn {

namespace {

using nlohmann::json;

struct DtypeInfo {
  StDtype dtype;
  const char* name;
  size_t size;
};

constexpr std::array<DtypeInfo, 15> kDtypes{{
    {StDtype::kBool, "BOOL", 1},
    {StDtype::kU8, "U8", 1},
    {StDtype::kI8, "I8", 1},
    {StDtype::kF8E5M2, "F8_E5M2", 1},
    {StDtype::kF8E4M3, "F8_E4M3", 1},
    {StDtype::kI16, "I16", 2},
    {StDtype::kU16, "U16", 2},
    {StDtype::kF16, "F16", 2},
    {StDtype::kBF16, "BF16", 2},
    {StDtype::kI32, "I32", 4},
    {StDtype::kU32, "U32", 4},
    {StDtype::kF32, "F32", 4},
    {StDtype::kI64, "I64", 8},
    {StDtype::kU64, "U64", 8},
    {StDtype::kF64, "F64", 8},
}};

// The reference library refuses headers over 100 MB; so do we, before
// allocating anything for one.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

const DtypeInfo& info(StDtype d) { return kDtypes[static_cast<size_t>(d)]; }

// Errors are printed as one line: control characters from names in the
// header (JSON may encode a newline) become spaces.
[[noreturn]] void fail(const std::string& source, const std::string& problem) {
  std::string msg = detail::str_cat("[safetensors] ", source, ": ", problem);
  for (char& c : msg)
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  throw InvalidArgument(msg);
}

uint64_t read_le64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | std::to_integer<uint64_t>(p[i]);
  return v;
}

template <typename T>
T load_le(const std::byte* p) {
  static_assert(std::endian::native == std::endian::little, "big-endian hosts are not supported");
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// A JSON value that must be an unsigned integer (nlohmann parses
// non-negative integers that fit in 64 bits as number_unsigned).
uint64_t as_u64(const std::string& source, const json& v, const std::string& what) {
  if (!v.is_number_unsigned())
    fail(source, what + " must be a non-negative integer, got " + v.dump());
  return v.get<uint64_t>();
}

}  // namespace

const char* to_string(StDtype dtype) noexcept { return info(dtype).name; }
size_t element_size(StDtype dtype) noexcept { return info(dtype).size; }

StDtype parse_st_dtype(std::string_view name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.dtype;
  std::string known;
  for (const auto& d : kDtypes) known += std::string(known.empty() ? "" : ", ") + d.name;
  throw InvalidArgument(
      detail::str_cat("[safetensors] unknown dtype '", name, "'; known dtypes: ", known));
}

bool is_float_dtype(StDtype d) noexcept {
  return d == StDtype::kF64 || d == StDtype::kF32 || d == StDtype::kF16 || d == StDtype::kBF16;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated at load: no overflow
  return n;
}

// ---- SafetensorsFile -----------------------------------------------------------

SafetensorsFile SafetensorsFile::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open the file (does it exist and is it readable?)");
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0) fail(path, "cannot read the file's size");
  in.seekg(0, std::ios::beg);
  std::vector<std::byte> bytes(static_cast<size_t>(size));
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size))
    fail(path, "read error after " + std::to_string(in.gcount()) + " bytes");
  return parse(std::move(bytes), path);
}

SafetensorsFile SafetensorsFile::parse(std::vector<std::byte> bytes, std::string source) {
  const uint64_t file_size = bytes.size();
  if (file_size < 8)
    fail(source, detail::str_cat("truncated: ", file_size,
                                 " bytes, but a safetensors file starts with an 8-byte "
                                 "header length"));
  const uint64_t header_len = read_le64(bytes.data());
  if (header_len > file_size - 8)
    fail(source, detail::str_cat("header length ", header_len, " is beyond the file (", file_size,
                                 " bytes, so at most ", file_size - 8,
                                 "); the file is truncated or not safetensors"));
  if (header_len > kMaxHeaderBytes)
    fail(source, detail::str_cat("header length ", header_len, " exceeds the limit of ",
                                 kMaxHeaderBytes, " bytes"));
  if (header_len < 2) fail(source, detail::str_cat("header length ", header_len, " is too short"));
  const char* hbegin = reinterpret_cast<const char*>(bytes.data() + 8);
  std::string_view header(hbegin, header_len);
  if (header.front() != '{')
    fail(source, "the header does not start with '{': not a safetensors file");

  // Duplicate top-level keys: nlohmann keeps the last, the reference refuses.
  std::string duplicate;
  std::set<std::string> seen;
  json::parser_callback_t on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key && duplicate.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!seen.insert(key).second) duplicate = key;
    }
    return true;
  };
  json root;
  try {
    root = json::parse(header.begin(), header.end(), on_event);
  } catch (const json::exception& e) {
    fail(source, std::string("the JSON header is malformed: ") + e.what());
  }
  if (!duplicate.empty()) fail(source, "tensor '" + duplicate + "' appears twice in the header");
  if (!root.is_object()) fail(source, "the JSON header is not an object");

  SafetensorsFile file;
  file.source_ = std::move(source);
  const std::string& src = file.source_;
  const uint64_t data_size = file_size - 8 - header_len;

  struct Entry {
    std::string name;
    StDtype dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (const auto& [name, value] : root.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) fail(src, "__metadata__ must be an object of strings");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) fail(src, "__metadata__ value of '" + k + "' is not a string");
        file.metadata_[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string what = "tensor '" + name + "'";
    if (!value.is_object()) fail(src, what + " is not an object");
    const auto dtype_it = value.find("dtype");
    const auto shape_it = value.find("shape");
    const auto offs_it = value.find("data_offsets");
    if (dtype_it == value.end() || !dtype_it->is_string())
      fail(src, what + " has no \"dtype\" string");
    if (shape_it == value.end() || !shape_it->is_array())
      fail(src, what + " has no \"shape\" array");
    if (offs_it == value.end() || !offs_it->is_array() || offs_it->size() != 2)
      fail(src, what + " has no \"data_offsets\" pair [begin, end]");

    Entry e;
    e.name = name;
    try {
      e.dtype = parse_st_dtype(dtype_it->get<std::string>());
    } catch (const InvalidArgument&) {
      fail(src, what + " has unknown dtype '" + dtype_it->get<std::string>() +
                    "'; supported: F64, F32, F16, BF16 (and the integer and F8 types)");
    }
    uint64_t numel = 1;
    for (const auto& d : *shape_it) {
      const uint64_t dim = as_u64(src, d, what + " shape entry");
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          __builtin_mul_overflow(numel, dim, &numel))
        fail(src, what + " shape " + shape_it->dump() + " overflows");
      e.shape.push_back(static_cast<int64_t>(dim));
    }
    uint64_t nbytes = 0;
    if (__builtin_mul_overflow(numel, element_size(e.dtype), &nbytes) ||
        nbytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(src, what + " shape " + shape_it->dump() + " overflows");
    e.begin = as_u64(src, (*offs_it)[0], what + " data_offsets begin");
    e.end = as_u64(src, (*offs_it)[1], what + " data_offsets end");
    if (e.begin > e.end)
      fail(src, detail::str_cat(what, " data_offsets [", e.begin, ", ", e.end,
                                "] end before they begin"));
    if (e.end > data_size)
      fail(src, detail::str_cat(what, " data_offsets [", e.begin, ", ", e.end,
                                "] are beyond the data section (", data_size,
                                " bytes); the file is truncated or corrupt"));
    if (e.end - e.begin != nbytes)
      fail(src, detail::str_cat(what, " data_offsets [", e.begin, ", ", e.end, "] hold ",
                                e.end - e.begin, " bytes, but shape ", shape_it->dump(), " of ",
                                to_string(e.dtype), " needs ", nbytes));
    entries.push_back(std::move(e));
  }

  // The byte ranges, in order, must tile the data section (Note above).
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  const Entry* prev = nullptr;
  for (const Entry& e : entries) {
    if (e.begin < expected)
      fail(src, detail::str_cat("tensor '", e.name, "' data_offsets [", e.begin, ", ", e.end,
                                "] overlap tensor '", prev->name, "' [", prev->begin, ", ",
                                prev->end, "]"));
    if (e.begin > expected)
      fail(src, detail::str_cat("gap in the data section: bytes [", expected, ", ", e.begin,
                                ") before tensor '", e.name, "' belong to no tensor"));
    expected = e.end;
    prev = &e;
  }
  if (expected != data_size)
    fail(src, detail::str_cat("the data section has ", data_size, " bytes but the tensors cover ",
                              expected, "; the file has trailing bytes or is corrupt"));

  file.bytes_ = std::move(bytes);
  const std::byte* data = file.bytes_.data() + 8 + header_len;
  for (Entry& e : entries) {
    TensorView v;
    v.name = std::move(e.name);
    v.dtype = e.dtype;
    v.shape = std::move(e.shape);
    v.data = std::span<const std::byte>(data + e.begin, e.end - e.begin);
    file.index_.emplace(v.name, file.tensors_.size());
    file.tensors_.push_back(std::move(v));
  }
  return file;
}

bool SafetensorsFile::contains(std::string_view name) const { return index_.count(name) > 0; }

const TensorView& SafetensorsFile::at(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    std::string names;
    for (const auto& t : tensors_) names += (names.empty() ? "" : ", ") + t.name;
    fail(source_, detail::str_cat("no tensor named '", name,
                                  "' (the file has: ", names.empty() ? "none" : names, ")"));
  }
  return tensors_[it->second];
}

namespace {

template <typename Out>
std::vector<Out> convert(const std::string& source, const TensorView& t) {
  if (!is_float_dtype(t.dtype))
    fail(source, detail::str_cat("tensor '", t.name, "' has dtype ", to_string(t.dtype),
                                 "; only F64, F32, F16 and BF16 can be read as floats"));
  const size_t n = static_cast<size_t>(t.numel());
  std::vector<Out> out(n);
  const std::byte* p = t.data.data();
  const size_t es = element_size(t.dtype);
  for (size_t i = 0; i < n; ++i, p += es) {
    switch (t.dtype) {
      case StDtype::kF64: out[i] = static_cast<Out>(load_le<double>(p)); break;
      case StDtype::kF32: out[i] = static_cast<Out>(load_le<float>(p)); break;
      case StDtype::kF16: out[i] = static_cast<Out>(half_to_float(load_le<uint16_t>(p))); break;
      case StDtype::kBF16: out[i] = static_cast<Out>(bf16_to_float(load_le<uint16_t>(p))); break;
      default: break;  // unreachable: checked above
    }
  }
  return out;
}

}  // namespace

std::vector<float> SafetensorsFile::to_f32(std::string_view name) const {
  return convert<float>(source_, at(name));
}

std::vector<double> SafetensorsFile::to_f64(std::string_view name) const {
  return convert<double>(source_, at(name));
}

// ---- writer ------------------------------------------------------------------------

std::vector<std::byte> encode_safetensors(const std::vector<TensorToSave>& tensors,
                                          const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    FL_CHECK_ARG(is_float_dtype(t.dtype), "[save_safetensors] tensor '", t.name, "': dtype ",
                 to_string(t.dtype), " cannot be written; use F64, F32, F16 or BF16");
    FL_CHECK_ARG(t.name != "__metadata__", "[save_safetensors] '__metadata__' is reserved");
    FL_CHECK_ARG(!header.contains(t.name), "[save_safetensors] tensor '", t.name,
                 "' appears twice");
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      FL_CHECK_ARG(d >= 0, "[save_safetensors] tensor '", t.name, "' has a negative dimension");
      numel *= static_cast<uint64_t>(d);
    }
    FL_CHECK_ARG(numel == t.values.size(), "[save_safetensors] tensor '", t.name, "' has ",
                 t.values.size(), " values but its shape needs ", numel);
    const uint64_t nbytes = numel * element_size(t.dtype);
    header[t.name] = {{"dtype", to_string(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');  // the reference pads to 8

  std::vector<std::byte> out(8 + text.size() + offset);
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<std::byte>(n >> (8 * i));
  std::memcpy(out.data() + 8, text.data(), text.size());
  std::byte* p = out.data() + 8 + text.size();
  for (const auto& t : tensors) {
    for (double v : t.values) {
      switch (t.dtype) {
        case StDtype::kF64: std::memcpy(p, &v, 8); break;
        case StDtype::kF32: {
          const float f = static_cast<float>(v);
          std::memcpy(p, &f, 4);
          break;
        }
        case StDtype::kF16: {
          const uint16_t h = float_to_half(static_cast<float>(v));
          std::memcpy(p, &h, 2);
          break;
        }
        case StDtype::kBF16: {
          const uint16_t b = float_to_bf16(static_cast<float>(v));
          std::memcpy(p, &b, 2);
          break;
        }
        default: break;  // checked above
      }
      p += element_size(t.dtype);
    }
  }
  return out;
}

void save_safetensors(const std::string& path, const std::vector<TensorToSave>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  const auto bytes = encode_safetensors(tensors, metadata);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  FL_CHECK_ARG(out, "[save_safetensors] cannot open '", path, "' for writing");
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  FL_CHECK_ARG(out.good(), "[save_safetensors] write to '", path, "' failed");
}

}  // namespace flotilla::nn
