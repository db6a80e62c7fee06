// End-to-end smoke: a private CPU device runs kernels, events and callbacks.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>

#include "flotilla/flotilla.h"
#include "runtime/thread_streams.h"

namespace flotilla {
namespace {

using backend::KernelArgs;

TEST(Smoke, KernelsRunAndResultsAreRight) {
  auto dev = Device::create("cpu", 0, Config{});
  auto buf = dev->driver().allocate(1024 * sizeof(float));
  auto out = dev->driver().allocate(sizeof(uint64_t));
  Stream s = dev->current_stream();
  EXPECT_GE(s.index(), 1);
  s.dispatch("fill_f32", KernelArgs().ptr(buf->device_ptr()).f64(3.0).size(1024));
  s.dispatch("scale_f32",
             KernelArgs().ptr(buf->device_ptr()).ptr(buf->device_ptr()).f64(2.0).size(1024));
  s.dispatch("checksum_u32", KernelArgs().ptr(buf->device_ptr()).ptr(out->device_ptr()).size(1024));
  s.synchronize();
  float six = 6.0f;
  uint32_t bits;
  std::memcpy(&bits, &six, 4);
  EXPECT_EQ(*static_cast<uint64_t*>(out->host_ptr()), uint64_t{bits} * 1024);
}

TEST(Smoke, EventOrdersTwoStreams) {
  auto dev = Device::create("cpu", 0, Config{});
  auto buf = dev->driver().allocate(sizeof(float) * 16);
  Stream a = dev->streams().at(1), b = dev->streams().at(2);
  a.dispatch("sleep_us", KernelArgs().i64(20000));
  a.dispatch("fill_f32", KernelArgs().ptr(buf->device_ptr()).f64(7.0).size(16));
  Event e(*dev);
  e.record(a);
  e.wait(b);
  b.dispatch("scale_f32",
             KernelArgs().ptr(buf->device_ptr()).ptr(buf->device_ptr()).f64(2.0).size(16));
  b.synchronize();
  EXPECT_EQ(static_cast<float*>(buf->host_ptr())[15], 14.0f);
  std::atomic<int> ran{0};
  e.then([&] { ran++; });
  e.synchronize();
  EXPECT_EQ(ran.load(), 1);
}

}  // namespace
}  // namespace flotilla

namespace flotilla {
namespace {

// A thread that outlives many private devices must not keep a binding per
// dead device: current_stream() scans the list on every call.
TEST(Smoke, ThreadBindingsOfDestroyedDevicesArePruned) {
  for (int i = 0; i < 50; ++i) {
    auto dev = Device::create("cpu", 0, Config{});
    (void)dev->current_stream();
  }
  EXPECT_LE(detail::thread_binding_count(), 2u);
}

}  // namespace
}  // namespace flotilla
