// The safetensors reader: valid files, every malformed case, and sweeps of
// truncations and byte corruptions of a valid file (run under ASan in the
// address lane: any out-of-bounds read fails the lane).
#include "flotilla/nn/safetensors.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "flotilla/common/error.h"
#include "flotilla/ops/tensor.h"

namespace flotilla::nn {
namespace {

std::vector<std::byte> raw_file(const std::string& header, const std::vector<uint8_t>& data,
                                uint64_t header_len = UINT64_MAX) {
  if (header_len == UINT64_MAX) header_len = header.size();
  std::vector<std::byte> out(8);
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>(header_len >> (8 * i));
  for (char c : header) out.push_back(static_cast<std::byte>(c));
  for (uint8_t b : data) out.push_back(static_cast<std::byte>(b));
  return out;
}

std::vector<uint8_t> f32_bytes(std::initializer_list<float> values) {
  std::vector<uint8_t> out;
  for (float v : values) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(bits >> (8 * i)));
  }
  return out;
}

// Expects parse() to refuse `bytes` with a message naming the source and
// containing `problem`.
void expect_refused(std::vector<std::byte> bytes, const std::string& problem) {
  try {
    SafetensorsFile::parse(std::move(bytes), "case.safetensors");
    ADD_FAILURE() << "accepted a file that should fail with: " << problem;
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("case.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find(problem), std::string::npos) << "expected '" << problem << "' in: " << msg;
  }
}

std::vector<TensorToSave> sample_tensors() {
  return {
      {"0.weight", StDtype::kF32, {2, 3}, {1.5, -2.0, 0.25, 3.0, 4.0, -0.5}},
      {"0.bias", StDtype::kF64, {2}, {0.1, -0.2}},
      {"h", StDtype::kF16, {3}, {1.0, -0.5, 65504.0}},
      {"b", StDtype::kBF16, {1, 2}, {2.0, -3.0}},
      {"empty", StDtype::kF32, {0, 4}, {}},
  };
}

TEST(Safetensors, ReadsHandWrittenReferenceBytes) {
  // Exactly what safetensors.torch.save_file writes for {"a": tensor([1., 2.])}
  // apart from padding: header, then little-endian f32 data.
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("__metadata__":{"format":"pt"}})";
  auto f = SafetensorsFile::parse(raw_file(header, f32_bytes({1.0f, 2.0f})), "ref");
  ASSERT_EQ(f.tensors().size(), 1u);
  const TensorView& a = f.at("a");
  EXPECT_EQ(a.dtype, StDtype::kF32);
  EXPECT_EQ(a.shape, std::vector<int64_t>{2});
  EXPECT_EQ(a.data.size(), 8u);
  EXPECT_EQ(f.to_f32("a"), (std::vector<float>{1.0f, 2.0f}));
  EXPECT_EQ(f.metadata().at("format"), "pt");
}

TEST(Safetensors, RoundTripsEveryFloatDtypeAndMetadata) {
  auto bytes = encode_safetensors(sample_tensors(), {{"format", "pt"}, {"who", "flotilla"}});
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | std::to_integer<uint64_t>(bytes[i]);
  EXPECT_EQ((8 + header_len) % 8, 0u) << "the data section starts 8-aligned, as the reference's";
  auto f = SafetensorsFile::parse(bytes, "mem");
  ASSERT_EQ(f.tensors().size(), 5u);
  // File order is the order given (by offset).
  EXPECT_EQ(f.tensors()[0].name, "0.weight");
  EXPECT_EQ(f.tensors()[4].name, "empty");
  EXPECT_EQ(f.at("0.weight").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(f.to_f32("0.weight"), (std::vector<float>{1.5f, -2.0f, 0.25f, 3.0f, 4.0f, -0.5f}));
  EXPECT_EQ(f.to_f64("0.bias"), (std::vector<double>{0.1, -0.2}));
  EXPECT_EQ(f.to_f32("h"), (std::vector<float>{1.0f, -0.5f, 65504.0f}));
  EXPECT_EQ(f.to_f32("b"), (std::vector<float>{2.0f, -3.0f}));
  EXPECT_EQ(f.at("empty").numel(), 0);
  EXPECT_EQ(f.metadata().size(), 2u);
  EXPECT_EQ(f.metadata().at("who"), "flotilla");
  EXPECT_TRUE(f.contains("h"));
  EXPECT_FALSE(f.contains("nope"));
}

TEST(Safetensors, LoadsFromDiskAndNamesMissingTensor) {
  const auto path = std::filesystem::temp_directory_path() /
                    ("fl_st_" + std::to_string(::getpid()) + ".safetensors");
  save_safetensors(path.string(), sample_tensors());
  auto f = SafetensorsFile::load(path.string());
  EXPECT_EQ(f.source(), path.string());
  try {
    f.at("2.bias");
    ADD_FAILURE() << "no error for a missing tensor";
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("2.bias"), std::string::npos) << msg;
    EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
  }
  std::filesystem::remove(path);
  try {
    SafetensorsFile::load(path.string());
    ADD_FAILURE() << "no error for a missing file";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
}

// The loader reads F16/BF16 through the ops layer's conversions: pin them.
TEST(Safetensors, HalfConversionsRoundToNearestEven) {
  EXPECT_EQ(float_to_half(1.0f), 0x3c00);
  EXPECT_EQ(float_to_half(-2.0f), 0xc000);
  EXPECT_EQ(float_to_half(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_half(65520.0f), 0x7c00);                      // rounds to inf
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -24)), 0x0001);         // smallest subnormal
  EXPECT_EQ(float_to_half(std::ldexp(1.0f, -25)), 0x0000);         // tie to even: zero
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie to even
  EXPECT_EQ(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(half_to_float(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_TRUE(std::isinf(half_to_float(0x7c00)));
  EXPECT_TRUE(std::isnan(half_to_float(0x7e00)));
  // Every f16 survives f16 -> f32 -> f16 (except NaN payloads).
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;
    ASSERT_EQ(float_to_half(half_to_float(static_cast<uint16_t>(h))), h) << std::hex << h;
  }
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // tie to even
  EXPECT_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // tie to even, up
  EXPECT_EQ(bf16_to_float(0xc040), -3.0f);
}

TEST(Safetensors, RefusesEveryMalformedCase) {
  const auto d8 = f32_bytes({1.0f, 2.0f});
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  expect_refused({}, "truncated: 0 bytes");
  expect_refused(std::vector<std::byte>(7), "truncated: 7 bytes");
  expect_refused(raw_file(ok, d8, ok.size() + 9), "header length");
  expect_refused(raw_file(ok, d8, ok.size() + 9), "beyond the file");
  expect_refused(raw_file(ok, d8, UINT64_MAX - 3), "beyond the file");
  expect_refused(raw_file("[]", {}), "does not start with '{'");
  expect_refused(raw_file("{", {}), "too short");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", d8),
                 "JSON header is malformed");
  expect_refused(raw_file(R"({"a":5})", {}), "tensor 'a' is not an object");
  expect_refused(raw_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", d8), "no \"dtype\"");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", d8), "no \"shape\"");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[2]}})", d8), "no \"data_offsets\"");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", d8),
                 "no \"data_offsets\"");
  expect_refused(raw_file(R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", d8),
                 "unknown dtype 'F33'");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", d8),
                 "shape entry must be a non-negative integer");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", d8),
                 "shape entry must be a non-negative integer");
  expect_refused(
      raw_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", d8),
      "overflows");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,"8"]}})", d8),
                 "data_offsets end must be a non-negative integer");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", d8),
                 "end before they begin");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", d8),
                 "beyond the data section (8 bytes)");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", d8),
                 "hold 8 bytes, but shape [3] of F32 needs 12");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                          R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                          d8),
                 "overlap tensor 'a'");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", d8),
                 "gap in the data section: bytes [0, 4)");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", d8),
                 "data section has 8 bytes but the tensors cover 4");
  expect_refused(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                          R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                          d8),
                 "tensor 'a' appears twice");
  expect_refused(raw_file(R"({"__metadata__":{"k":1}})", {}), "__metadata__ value of 'k'");
  expect_refused(raw_file(R"({"__metadata__":[]})", {}), "__metadata__ must be an object");
  expect_refused(raw_file("{\"\xff\":{}}", {}), "JSON header is malformed");  // bad UTF-8
}

TEST(Safetensors, IntegerDtypesParseButDoNotConvert) {
  const std::string h = R"({"i":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})";
  auto f = SafetensorsFile::parse(raw_file(h, std::vector<uint8_t>(8, 0)), "ints");
  EXPECT_EQ(f.at("i").dtype, StDtype::kI64);
  EXPECT_THROW(f.to_f32("i"), InvalidArgument);
}

// Every proper prefix of a valid file is refused with an error naming the
// file: never a crash or an out-of-bounds read (ASan checks the latter).
TEST(Safetensors, EveryTruncationIsRefused) {
  const auto bytes = encode_safetensors(sample_tensors(), {{"format", "pt"}});
  for (size_t len = 0; len < bytes.size(); ++len) {
    std::vector<std::byte> cut(bytes.begin(), bytes.begin() + static_cast<ptrdiff_t>(len));
    try {
      SafetensorsFile::parse(std::move(cut), "cut.safetensors");
      ADD_FAILURE() << "accepted a file truncated to " << len << " of " << bytes.size();
    } catch (const InvalidArgument& e) {
      ASSERT_NE(std::string(e.what()).find("cut.safetensors"), std::string::npos) << e.what();
    }
  }
}

// Flipping bits at every position: a header corruption is refused or yields
// a consistent file; a data-section corruption (no checksum in the format)
// parses and changes exactly that byte of the one tensor covering it.
TEST(Safetensors, EveryByteCorruptionIsRefusedOrConsistent) {
  const auto bytes = encode_safetensors(sample_tensors(), {{"format", "pt"}});
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | std::to_integer<uint64_t>(bytes[i]);
  const size_t data_start = 8 + header_len;
  int refused = 0, accepted_header = 0;
  for (size_t pos = 0; pos < bytes.size(); ++pos) {
    for (uint8_t mask : {0x01, 0x10, 0x80, 0xff}) {
      auto bad = bytes;
      bad[pos] ^= static_cast<std::byte>(mask);
      try {
        auto f = SafetensorsFile::parse(bad, "bad.safetensors");
        size_t covered = 0;
        for (const auto& t : f.tensors()) {
          covered += t.data.size();
          ASSERT_EQ(t.data.size(), static_cast<size_t>(t.numel()) * element_size(t.dtype));
          if (is_float_dtype(t.dtype)) (void)f.to_f64(t.name);  // reads every byte
        }
        ASSERT_EQ(covered, bad.size() - data_start) << "pos " << pos;
        if (pos >= data_start) {
          const auto ref = SafetensorsFile::parse(bytes, "ref");
          for (const auto& t : f.tensors()) {
            const auto& r = ref.at(t.name);
            ASSERT_EQ(t.data.size(), r.data.size());
            const size_t off = static_cast<size_t>(t.data.data() - f.tensors()[0].data.data());
            for (size_t i = 0; i < t.data.size(); ++i)
              ASSERT_EQ(t.data[i] != r.data[i], data_start + off + i == pos) << t.name << " " << i;
          }
        } else {
          ++accepted_header;
        }
      } catch (const InvalidArgument& e) {
        ASSERT_LT(pos, data_start) << "a data byte corruption was refused: " << e.what();
        ASSERT_NE(std::string(e.what()).find("bad.safetensors"), std::string::npos) << e.what();
        ++refused;
      }
    }
  }
  // Most header corruptions break its structure; a few (a letter of a name or
  // of a metadata value) give another valid file.
  EXPECT_GT(refused, static_cast<int>(header_len * 2)) << "accepted " << accepted_header;
  std::cout << "header corruptions refused: " << refused << ", accepted: " << accepted_header
            << "\n";
}

}  // namespace
}  // namespace flotilla::nn
