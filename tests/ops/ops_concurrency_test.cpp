// Many threads running ops at once, each on its stream, sharing the weights:
// every thread's outputs equal one thread's, bit for bit (same kernels, same
// inputs). Exercises OpenBLAS called from many driver threads at once, the
// allocator under load and record_stream on the shared weights.
#include <gtest/gtest.h>

#include <cstdlib>
#include <iostream>
#include <latch>
#include <random>
#include <thread>
#include <vector>

#include "flotilla/flotilla.h"
#include "flotilla/ops/ops.h"

#ifndef FLOTILLA_TEST_BACKEND
#define FLOTILLA_TEST_BACKEND "cpu"
#endif
#ifndef OPS_CONC_SUITE
#define OPS_CONC_SUITE OpsConcurrency
#endif

namespace flotilla::test {
namespace {

#ifdef FLOTILLA_TEST_SANITIZED
constexpr int kIterations = 3;
#else
constexpr int kIterations = 20;
#endif
constexpr int kThreads = 16;

std::vector<float> random(std::mt19937_64& rng, size_t n, float scale) {
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

TEST(OPS_CONC_SUITE, ThreadsGetTheSameOutputsAsOneThread) {
  if (Device::count(FLOTILLA_TEST_BACKEND) == 0)
    GTEST_SKIP() << "no " FLOTILLA_TEST_BACKEND " device on this machine";
  auto dev = Device::create(FLOTILLA_TEST_BACKEND, 0, Config::from_env());
  uint64_t seed = std::random_device{}();
  if (const char* e = std::getenv("FLOTILLA_TEST_SEED")) seed = std::strtoull(e, nullptr, 10);
  std::cout << "[ seed     ] " << seed << " (replay with FLOTILLA_TEST_SEED=" << seed << ")\n";
  std::mt19937_64 rng(seed);
  Stream s0 = dev->default_stream();
  const int64_t B = 4, D = 128, H = 256;
  Tensor w1 = Tensor::from_host(random(rng, H * D, 0.1f), {H, D}, DType::kF32, s0);
  Tensor b1 = Tensor::from_host(random(rng, H, 0.1f), {H}, DType::kF32, s0);
  Tensor w2 = Tensor::from_host(random(rng, D * H, 0.1f), {D, H}, DType::kF32, s0);
  Tensor g = Tensor::from_host(random(rng, D, 1.f), {D}, DType::kF32, s0);
  s0.synchronize();  // the weights are ready before any thread reads them

  std::vector<std::vector<float>> inputs;
  for (int t = 0; t < kThreads; ++t) inputs.push_back(random(rng, B * D, 1.f));
  auto run = [&](Stream s, const std::vector<float>& in) {
    Tensor x = Tensor::from_host(in, {B, D}, DType::kF32, s);
    Tensor h = ops::linear(s, x, w1, b1, ops::Activation::kGelu);
    Tensor y = ops::linear(s, h, w2, {}, ops::Activation::kNone);
    y = ops::add(s, y, x);
    y = ops::layernorm(s, y, g, {});
    y = ops::mul(s, y, g);
    return ops::softmax(s, y).to_host(s);
  };
  std::vector<std::vector<float>> expected;
  for (int t = 0; t < kThreads; ++t) expected.push_back(run(dev->streams().at(1), inputs[t]));

  std::vector<int> wrong(kThreads, 0);
  for (int round = 0; round < 3; ++round) {
    std::latch start(kThreads);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, t] {
        Stream s = dev->current_stream();  // the pool's policy picks it
        start.arrive_and_wait();
        for (int i = 0; i < kIterations; ++i) {
          const int which = (t + i) % kThreads;
          if (run(s, inputs[static_cast<size_t>(which)]) != expected[static_cast<size_t>(which)])
            ++wrong[static_cast<size_t>(t)];
        }
      });
    for (auto& th : threads) th.join();
  }
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(wrong[static_cast<size_t>(t)], 0) << "thread " << t;
  // Only the weights are still allocated: every temporary went back.
  size_t weights = 0;
  for (const Tensor* t : {&w1, &b1, &w2, &g}) weights += Allocator::size_class(t->nbytes());
  EXPECT_EQ(dev->allocator().stats().in_use_bytes, weights) << dev->allocator().stats().to_string();
}

}  // namespace
}  // namespace flotilla::test
