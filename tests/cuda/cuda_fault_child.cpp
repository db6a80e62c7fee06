// The child process of the sticky-failure test (cuda_fault_test.cpp): a
// kernel faults while other streams have work in flight, callbacks pending
// and threads waiting. It checks, in this order, that
//  - the waiters wake with DeviceLost (no hang), each callback and each
//    completion handler runs exactly once, handlers see kError + DeviceLost;
//  - device_error() holds the DeviceLost, and every later call throws it
//    at once (well under 100 ms);
//  - event waits on the lost device throw instead of hanging;
//  - the process exits cleanly (the exit drain does not hang).
// Prints "FAULT-OK" and exits 0 when all hold; otherwise prints what failed
// and exits 1. An alarm kills it if anything hangs.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <typeinfo>
#include <vector>

#include "flotilla/flotilla.h"

using namespace flotilla;
using backend::CommandBuffer;
using backend::KernelArgs;
using Clock = std::chrono::steady_clock;

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what.c_str());
    std::fflush(stdout);
    ++failures;
  }
}

// Progress, so a crash shows where it happened.
void step(const char* what) {
  std::printf("step: %s\n", what);
  std::fflush(stdout);
}

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Runs `fn`, which must throw DeviceLost within `limit_ms`.
template <typename Fn>
void expect_lost(const std::string& what, double limit_ms, Fn fn) {
  const auto t0 = Clock::now();
  try {
    fn();
    check(false, what + ": no error");
  } catch (const DeviceLost& e) {
    const double ms = ms_since(t0);
    static bool shown = false;
    if (!shown) {
      shown = true;
      std::printf("lost: %s\n", e.what());
    }
    check(ms < limit_ms, what + ": took " + std::to_string(ms) + " ms");
    check(std::string(e.what()).find("lost") != std::string::npos,
          what + ": message does not say the device is lost: " + e.what());
  } catch (const std::exception& e) {
    check(false, what + ": wrong error (" + typeid(e).name() + "): " + e.what());
  }
}

}  // namespace

int main() {
  alarm(60);  // a hang anywhere below is a failure the parent sees
  if (Device::count("cuda") == 0) {
    std::printf("NO-GPU\n");
    return 2;
  }
  auto dev = Device::create("cuda", 0, Config{});
  auto& drv = dev->driver();
  auto buf = drv.allocate(1 << 20);

  // Work in flight elsewhere: a long kernel on stream 2 with a callback and a
  // raw command buffer with a handler on a queue of its own.
  Stream busy = dev->streams().at(2);
  std::atomic<int> callback_runs{0};
  busy.dispatch("sleep_us", KernelArgs().i64(300000));
  busy.add_callback([&] { ++callback_runs; });
  auto q = drv.new_queue();
  auto raw = q->new_command_buffer();
  std::atomic<int> handler_runs{0}, handler_saw_error{0};
  {
    auto& enc = raw->compute_encoder();
    enc.dispatch(drv.pipeline("sleep_us"), KernelArgs().i64(300000));
    enc.end_encoding();
  }
  raw->add_completed_handler([&](CommandBuffer& cb) {
    ++handler_runs;
    if (cb.status() == backend::CommandBufferStatus::kError && cb.error()) {
      try {
        std::rethrow_exception(cb.error());
      } catch (const DeviceLost&) {
        ++handler_saw_error;
      } catch (...) {
      }
    }
  });
  raw->commit();
  Event marker(*dev);
  Stream other = dev->streams().at(3);
  other.dispatch("sleep_us", KernelArgs().i64(300000));
  marker.record(other);

  // A thread blocked in synchronize() when the fault comes.
  std::atomic<bool> waiter_done{false};
  std::string waiter_result = "did not finish";
  std::thread waiter([&] {
    try {
      busy.synchronize();
      waiter_result = "synchronize returned without an error";
    } catch (const DeviceLost&) {
      waiter_result = "ok";
    } catch (const std::exception& e) {
      waiter_result = std::string("wrong error: ") + e.what();
    }
    waiter_done = true;
  });

  step("work in flight; now the fault");
  Stream bad = dev->streams().at(1);
  bad.dispatch("fill_f32", KernelArgs().ptr(buf->device_ptr()).f64(1).size(1024));
  bad.dispatch("trap", KernelArgs());
  expect_lost("synchronize of the faulting stream", 30000, [&] { bad.synchronize(); });
  step("the faulting stream reported the loss");
  waiter.join();
  check(waiter_result == "ok", "the waiting thread: " + waiter_result);
  raw->wait_until_completed();
  check(raw->status() == backend::CommandBufferStatus::kError, "raw buffer status is not kError");
  check(handler_runs.load() == 1, "handler ran " + std::to_string(handler_runs.load()) + " times");
  check(handler_saw_error.load() == 1, "handler did not see kError with DeviceLost");
  check(callback_runs.load() == 1,
        "stream callback ran " + std::to_string(callback_runs.load()) + " times");

  step("waiters, handlers and callbacks checked");
  // The device is lost for good, and says so at once.
  check(drv.device_error() != nullptr, "device_error() is null after the fault");
  expect_lost("dispatch after the fault", 100, [&] {
    dev->streams().at(4).dispatch("fill_f32", KernelArgs().ptr(buf->device_ptr()).f64(2).size(16));
  });
  expect_lost("synchronize of another stream", 100, [&] { other.synchronize(); });
  expect_lost("event synchronize", 100, [&] { marker.synchronize(); });
  expect_lost("allocate", 100, [&] { drv.allocate(4096); });
  expect_lost("raw commit", 100, [&] {
    auto cb = q->new_command_buffer();
    cb->commit();
  });
  expect_lost("Device::synchronize", 100, [&] { dev->synchronize(); });
  // A second read of the same error: the first one is kept.
  check(drv.device_error() == drv.device_error(), "device_error() changed");

  step("later calls checked; shutting down");
  const auto t0 = Clock::now();
  dev->shutdown();  // must not hang on work that will never complete
  check(ms_since(t0) < 5000, "shutdown took " + std::to_string(ms_since(t0)) + " ms");
  dev.reset();
  step("device destroyed");

  if (failures == 0) std::printf("FAULT-OK\n");
  std::fflush(stdout);
  return failures == 0 ? 0 : 1;
}
