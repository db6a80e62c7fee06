// The child process of the sticky-failure test (cuda_fault_test.cpp): a
// kernel faults while other streams have work in flight, callbacks pending
// and threads waiting. It checks, in this order, that
//  - the faulting work and work that can never run (it waits for an event
//    recorded after the fault) end with DeviceLost; a thread waiting for it
//    wakes (no hang); each callback and completion handler runs exactly once;
//    work that was running elsewhere settles either way (CUDA leaves open
//    whether it completes);
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

// How a buffer ended, for the handler checks: 1 completed, 2 failed with
// DeviceLost, 3 anything else.
int outcome(CommandBuffer& cb) {
  if (cb.status() == backend::CommandBufferStatus::kCompleted) return 1;
  if (cb.status() != backend::CommandBufferStatus::kError || !cb.error()) return 3;
  try {
    std::rethrow_exception(cb.error());
  } catch (const DeviceLost&) {
    return 2;
  } catch (...) {
  }
  return 3;
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
  const auto fill = KernelArgs().ptr(buf->device_ptr()).f64(1).size(1024);

  // Everything is set up before the first fault can happen: each trap runs
  // only after a sleep of its own stream.
  //
  // (1) Work on another stream that may finish or be killed (CUDA leaves it
  // open whether kernels running on other streams complete after a fault):
  // a long kernel with a callback, which must run once either way.
  Stream busy = dev->streams().at(2);
  std::atomic<int> busy_runs{0};
  busy.dispatch("sleep_us", KernelArgs().i64(100000));
  busy.add_callback([&] { ++busy_runs; });

  // (2) A fault in a raw command buffer with a handler: it must see kError
  // with DeviceLost, once.
  auto q = drv.new_queue();
  auto raw = q->new_command_buffer();
  {
    auto& enc = raw->compute_encoder();
    enc.dispatch(drv.pipeline("sleep_us"), KernelArgs().i64(30000));
    enc.dispatch(drv.pipeline("trap"), KernelArgs());
    enc.end_encoding();
  }
  std::atomic<int> raw_runs{0}, raw_outcome{0};
  raw->add_completed_handler([&](CommandBuffer& cb) {
    ++raw_runs;
    raw_outcome = outcome(cb);
  });

  // (3) A fault on a runtime stream, and an event recorded after it.
  Stream bad = dev->streams().at(1);
  bad.dispatch("sleep_us", KernelArgs().i64(20000));
  bad.dispatch("fill_f32", fill);
  bad.dispatch("trap", KernelArgs());
  Event after_fault(*dev);
  after_fault.record(bad);

  // (4) Work that can never run: it waits on the GPU for that event. Its
  // callback must run once, and a thread waiting for it must get DeviceLost.
  Stream blocked = dev->streams().at(3);
  after_fault.wait(blocked);
  blocked.dispatch("fill_f32", fill);
  std::atomic<int> blocked_runs{0};
  blocked.add_callback([&] { ++blocked_runs; });
  raw->commit();

  std::string waiter_result = "did not finish";
  std::thread waiter([&] {
    try {
      blocked.synchronize();
      waiter_result = "synchronize returned without an error";
    } catch (const DeviceLost&) {
      waiter_result = "ok";
    } catch (const std::exception& e) {
      waiter_result = std::string("wrong error: ") + e.what();
    }
  });

  step("work in flight; now the faults");
  expect_lost("synchronize of the faulting stream", 30000, [&] { bad.synchronize(); });
  step("the faulting stream reported the loss");
  waiter.join();
  check(waiter_result == "ok", "the thread waiting for blocked work: " + waiter_result);
  check(blocked_runs.load() == 1,
        "blocked stream's callback ran " + std::to_string(blocked_runs.load()) + " times");
  raw->wait_until_completed();
  check(raw_runs.load() == 1, "raw handler ran " + std::to_string(raw_runs.load()) + " times");
  check(raw_outcome.load() == 2, "raw buffer with a trap: outcome " +
                                     std::to_string(raw_outcome.load()) +
                                     " (2 = kError with DeviceLost)");
  // The busy stream: finished or lost, but settled, and its callback ran once.
  std::string busy_result;
  try {
    busy.synchronize();
    busy_result = "completed";
  } catch (const DeviceLost&) {
    busy_result = "lost";
  } catch (const std::exception& e) {
    busy_result = std::string("wrong error: ") + e.what();
  }
  check(busy_result == "completed" || busy_result == "lost", "busy stream: " + busy_result);
  check(busy_runs.load() == 1,
        "busy stream's callback ran " + std::to_string(busy_runs.load()) + " times");
  std::printf("busy stream (running when the fault came): %s\n", busy_result.c_str());
  step("waiters, handlers and callbacks checked");

  // The device is lost for good, and says so at once.
  check(drv.device_error() != nullptr, "device_error() is null after the fault");
  expect_lost("dispatch after the fault", 100,
              [&] { dev->streams().at(4).dispatch("fill_f32", fill); });
  expect_lost("synchronize of another stream", 100, [&] { blocked.synchronize(); });
  expect_lost("event synchronize", 100, [&] { after_fault.synchronize(); });
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
