// The README's API example, compiled and run on the CPU backend, so the
// README stays true.
#include <gtest/gtest.h>

#include <algorithm>

#include "flotilla/flotilla.h"

namespace flotilla {
namespace {

TEST(ReadmeExample, RunsAsWritten) {
  auto device = Device::create("cpu", 0, Config{});
  Device& dev = *device;
  Stream s0 = dev.current_stream();
  nn::Mlp model(nn::MlpWeights::seed(), DType::kF32, s0);

  Stream s = dev.current_stream();
  std::vector<float> input(512, 0.5f);
  Tensor x = Tensor::from_host(input, {1, 512}, DType::kF32, s);
  Tensor y = model.forward(s, x);
  std::vector<float> out = y.to_host(s);
  ASSERT_EQ(out.size(), 512u);

  serve::BatchQueueOptions opts;
  opts.max_batch = 64;
  serve::BatchQueue queue(
      dev, 512, 512, [&](const Stream& st, const Tensor& xb) { return model.forward(st, xb); },
      opts);
  std::vector<float> row = queue.submit(input).get();
  ASSERT_EQ(row.size(), out.size());
  for (size_t i = 0; i < out.size(); ++i)
    EXPECT_NEAR(row[i], out[i], 1e-5f * (1 + std::abs(out[i])));
  std::vector<std::span<const float>> inputs{input, input};
  std::vector<serve::RequestHandle> handles = queue.submit_all(inputs);
  ASSERT_EQ(handles.size(), 2u);
  for (auto& h : handles) {
    const std::vector<float> r = h.get();
    ASSERT_EQ(r.size(), out.size());
    for (size_t i = 0; i < out.size(); ++i)
      EXPECT_NEAR(r[i], out[i], 1e-5f * (1 + std::abs(out[i])));
  }
  std::vector<float> row2 = queue.submit(serve::BorrowedInput(input)).get();
  serve::InputBuffer rows = queue.make_input_buffer(64);
  std::copy(input.begin(), input.end(), rows.row(0).begin());
  std::vector<float> row3 = queue.submit(rows.input(0)).get();
  for (const auto* r : {&row2, &row3}) {
    ASSERT_EQ(r->size(), out.size());
    for (size_t i = 0; i < out.size(); ++i)
      EXPECT_NEAR((*r)[i], out[i], 1e-5f * (1 + std::abs(out[i])));
  }

  Event done(dev);
  done.record(s);
  bool ran = false;
  done.then([&] { ran = true; });
  s.synchronize();
  done.synchronize();
  EXPECT_TRUE(ran);
}

}  // namespace
}  // namespace flotilla
