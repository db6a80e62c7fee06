// Device shutdown, single-threaded (label unit): it drains what was encoded,
// it is idempotent, and every later call gets ShutDown with a clear message.
// The many-thread cases are in shutdown_concurrency_test.cpp.
#include <atomic>
#include <cstring>
#include <functional>
#include <string>

#include "runtime/runtime_test_util.h"

namespace flotilla::test {
namespace {

using backend::KernelArgs;

class ShutdownTest : public RuntimeTest {};

// Expects `fn` to throw ShutDown whose message starts with "[api]" and says
// the device was shut down.
void expect_shut_down(const std::function<void()>& fn, const std::string& api) {
  try {
    fn();
    ADD_FAILURE() << api << ": no error after shutdown";
  } catch (const ShutDown& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("[" + api + "]", 0), 0u)
        << "message should start with [" << api << "]: " << msg;
    EXPECT_NE(msg.find("shut down"), std::string::npos) << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << api << ": expected ShutDown, got: " << e.what();
  }
}

// Work encoded but never committed, and work still running, both finish
// before shutdown() returns; completion callbacks have run.
TEST_F(ShutdownTest, ShutdownDrainsEncodedAndInFlightWork) {
  Config c = test_config();
  c.sync_mode = SyncMode::kNone;
  auto dev = make_device(c);
  const bool slow = has_kernel(*dev, "sleep_us");
  constexpr size_t kN = 256;
  // Kernels write device memory; the last copy lands in host memory we can
  // read after shutdown without the device.
  std::vector<std::unique_ptr<backend::Buffer>> bufs, hosts;
  std::atomic<int> callbacks{0};
  for (int i = 1; i <= 6; ++i) {
    Stream s = dev->streams().at(i);
    bufs.push_back(dev->driver().allocate(kN * sizeof(float)));
    hosts.push_back(dev->driver().allocate_host(kN * sizeof(float)));
    std::memset(hosts.back()->host_ptr(), 0, kN * sizeof(float));
    if (slow) s.dispatch("sleep_us", KernelArgs().i64(5000));
    s.dispatch("fill_f32", KernelArgs().ptr(bufs.back()->device_ptr()).f64(i).size(kN));
    s.add_callback([&] { callbacks.fetch_add(1); });  // commits what is encoded so far
    s.dispatch("scale_f32", KernelArgs()
                                .ptr(bufs.back()->device_ptr())
                                .ptr(bufs.back()->device_ptr())
                                .f64(10.0)
                                .size(kN));
    s.dispatch("copy_bytes", KernelArgs()
                                 .ptr(hosts.back()->device_ptr())
                                 .ptr(bufs.back()->device_ptr())
                                 .size(kN * sizeof(float)));
    // The scale and the copy are left uncommitted.
  }
  dev->shutdown();
  EXPECT_TRUE(dev->is_shut_down());
  EXPECT_EQ(callbacks.load(), 6);
  for (int i = 1; i <= 6; ++i) {
    const auto* h = static_cast<const float*>(hosts[static_cast<size_t>(i - 1)]->host_ptr());
    EXPECT_EQ(h[0], 10.0f * i) << "stream " << i << ": uncommitted work was lost at shutdown";
    EXPECT_EQ(h[kN - 1], 10.0f * i);
  }
}

TEST_F(ShutdownTest, ShutdownIsIdempotent) {
  auto dev = make_device();
  FloatBuffer b(*dev, 8);
  b.fill(dev->streams().at(1), 1.0f);
  dev->shutdown();
  EXPECT_NO_THROW(dev->shutdown());
  EXPECT_NO_THROW(dev->shutdown());
  EXPECT_TRUE(dev->is_shut_down());
}

TEST_F(ShutdownTest, EveryCallAfterShutdownIsShutDown) {
  auto dev = make_device();
  Stream used = dev->streams().at(1);
  FloatBuffer b(*dev, 8);
  b.fill(used, 1.0f);
  Event recorded(*dev);
  recorded.record(used);
  used.synchronize();
  Stream unused = dev->streams().at(7);
  dev->shutdown();

  const KernelArgs fill = KernelArgs().ptr(b.ptr()).f64(2.0).size(8);
  expect_shut_down([&] { used.dispatch("fill_f32", fill); }, "Device::pipeline");
  expect_shut_down([&] { unused.dispatch("fill_f32", fill); }, "Device::pipeline");
  expect_shut_down([&] { dev->current_stream().dispatch("fill_f32", fill); }, "Device::pipeline");
  expect_shut_down([&] { used.commit(); }, "Stream::commit");
  expect_shut_down([&] { used.synchronize(); }, "Stream::synchronize");
  expect_shut_down([&] { (void)used.query(); }, "Stream::query");
  expect_shut_down([&] { used.add_callback([] {}); }, "Stream::add_callback");
  expect_shut_down([&] { dev->synchronize(); }, "Device::synchronize");
  expect_shut_down([&] { (void)dev->driver(); }, "Device::driver");
  expect_shut_down([&] { (void)dev->pipeline("fill_f32"); }, "Device::pipeline");
  expect_shut_down([&] { (void)dev->streams().state(9); }, "StreamPool::state");
  expect_shut_down([&] { recorded.record(used); }, "Event::record");
  expect_shut_down([&] { recorded.wait(unused); }, "Event::wait");
  expect_shut_down([&] { Event fresh(*dev); }, "Event::Event");
}

// A pipeline looked up before shutdown does not get around the check.
TEST_F(ShutdownTest, DispatchWithAPipelineHandleAfterShutdownIsShutDown) {
  auto dev = make_device();
  const backend::Pipeline& fill = dev->pipeline("fill_f32");
  FloatBuffer b(*dev, 8);
  Stream s = dev->streams().at(2);
  dev->shutdown();
  expect_shut_down([&] { s.dispatch(fill, KernelArgs().ptr(b.ptr()).f64(1.0).size(8)); },
                   "Stream::dispatch");
}

// Destroying a device with work pending drains it too (the destructor shuts down).
TEST_F(ShutdownTest, DestroyingADeviceDrainsItsWork) {
  std::atomic<int> callbacks{0};
  {
    auto dev = make_device();
    for (int i = 1; i <= 4; ++i) dev->streams().at(i).add_callback([&] { callbacks.fetch_add(1); });
  }
  EXPECT_EQ(callbacks.load(), 4);
}

}  // namespace
}  // namespace flotilla::test
