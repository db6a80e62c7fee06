// The CUDA driver's contract: the Metal state machine's rules, completion
// handlers, shared events with GPU-side cross-stream waits, shutdown.
#include <atomic>
#include <chrono>
#include <latch>
#include <mutex>
#include <thread>

#include "cuda/cuda_test_util.h"

namespace flotilla::test {
namespace {

using backend::CommandBuffer;
using backend::CommandBufferStatus;
using backend::KernelArgs;
using Clock = std::chrono::steady_clock;

std::shared_ptr<Device> make_cuda(Config c = Config{}) { return Device::create("cuda", 0, c); }

template <typename Fn>
void expect_rule(const char* rule, Fn fn) {
  try {
    fn();
    ADD_FAILURE() << "no ValidationError; expected rule " << rule;
  } catch (const ValidationError& e) {
    EXPECT_EQ(e.rule(), rule) << e.what();
  }
}

TEST(CudaDriver, EveryStateMachineRuleIsAValidationError) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  auto& drv = dev->driver();
  auto q = drv.new_queue();
  auto buf = drv.allocate(64);
  const auto& fill = drv.pipeline("fill_f32");
  const uint64_t before = drv.stats().violations;

  auto cb = q->new_command_buffer();
  auto& enc = cb->compute_encoder();
  enc.dispatch(fill, KernelArgs().ptr(buf->device_ptr()).f64(1).size(16));
  expect_rule("encoder-already-open", [&] { cb->compute_encoder(); });
  expect_rule("commit-with-open-encoder", [&] { cb->commit(); });
  auto ev = drv.new_shared_event();
  expect_rule("encoder-already-open", [&] { cb->encode_signal(*ev, 1); });
  expect_rule("wait-not-committed", [&] { cb->wait_until_completed(); });
  enc.end_encoding();
  EXPECT_FALSE(enc.is_encoding());
  expect_rule("encoder-ended",
              [&] { enc.dispatch(fill, KernelArgs().ptr(buf->device_ptr()).f64(1).size(16)); });
  expect_rule("encoder-ended", [&] { enc.end_encoding(); });
  cb->commit();
  expect_rule("commit-twice", [&] { cb->commit(); });
  expect_rule("encode-after-commit", [&] { cb->compute_encoder(); });
  expect_rule("encode-after-commit", [&] { cb->encode_signal(*ev, 1); });
  expect_rule("encode-after-commit", [&] { cb->encode_wait(*ev, 1); });
  expect_rule("handler-after-commit", [&] { cb->add_completed_handler([](CommandBuffer&) {}); });
  cb->wait_until_completed();
  EXPECT_EQ(cb->status(), CommandBufferStatus::kCompleted);
  EXPECT_EQ(cb->kernel_count(), 1u);
  EXPECT_EQ(drv.stats().violations - before, 11u);
}

TEST(CudaDriver, TwoThreadsRacingToCommitOneBufferOneWins) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  auto q = dev->driver().new_queue();
  for (int rep = 0; rep < 50; ++rep) {
    auto cb = q->new_command_buffer();
    std::atomic<int> ok{0}, twice{0}, other{0};
    std::latch go(4);
    std::vector<std::thread> ts;
    for (int t = 0; t < 4; ++t)
      ts.emplace_back([&] {
        go.arrive_and_wait();
        try {
          cb->commit();
          ++ok;
        } catch (const ValidationError& e) {
          (e.rule() == "commit-twice" ? twice : other)++;
        } catch (...) {
          ++other;
        }
      });
    for (auto& t : ts) t.join();
    ASSERT_EQ(ok.load(), 1) << "repetition " << rep;
    ASSERT_EQ(twice.load(), 3);
    ASSERT_EQ(other.load(), 0);
    cb->wait_until_completed();
  }
}

// 200 buffers on one queue, the first held up by a sleep kernel: every
// handler runs once, in commit order, on a completion thread, after its
// buffer's work, whatever the completion threads' polling (`c`).
void expect_handlers_once_in_commit_order_after_the_work(const Config& c) {
  auto dev = make_cuda(c);
  auto& drv = dev->driver();
  auto q = drv.new_queue();
  const auto& fill = drv.pipeline("fill_f32");
  const auto& copy = drv.pipeline("copy_bytes");
  const auto& sleep = drv.pipeline("sleep_us");
  constexpr int kBuffers = 200;
  auto d = drv.allocate(4 * kBuffers);
  auto h = drv.allocate_host(4 * kBuffers);
  auto* host = static_cast<float*>(h->host_ptr());
  std::memset(host, 0, 4 * kBuffers);
  std::mutex mu;
  std::vector<int> order;
  std::vector<int> runs(kBuffers, 0);
  std::atomic<int> on_caller{0}, saw_result{0}, not_completed{0};
  const auto caller = std::this_thread::get_id();
  const uint64_t errors_before = drv.stats().handler_errors;
  std::vector<std::shared_ptr<CommandBuffer>> cbs;
  for (int i = 0; i < kBuffers; ++i) {
    auto cb = q->new_command_buffer();
    auto& enc = cb->compute_encoder();
    if (i == 0) enc.dispatch(sleep, KernelArgs().i64(20000));  // the rest queue behind it
    float* slot = static_cast<float*>(d->device_ptr()) + i;
    enc.dispatch(fill, KernelArgs().ptr(slot).f64(i + 1).size(1));
    enc.dispatch(copy, KernelArgs().ptr(host + i).ptr(slot).size(4));
    enc.end_encoding();
    cb->add_completed_handler([&, i](CommandBuffer& self) {
      if (std::this_thread::get_id() == caller) ++on_caller;
      if (self.status() != CommandBufferStatus::kCompleted) ++not_completed;
      // The buffer's work is done when its handler runs.
      if (host[i] == static_cast<float>(i + 1)) ++saw_result;
      std::lock_guard<std::mutex> lock(mu);
      order.push_back(i);
      ++runs[static_cast<size_t>(i)];
    });
    if (i == 17) cb->add_completed_handler([](CommandBuffer&) { throw std::runtime_error("x"); });
    cb->commit();
    cbs.push_back(std::move(cb));
  }
  for (auto& cb : cbs) cb->wait_until_completed();
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_EQ(order.size(), static_cast<size_t>(kBuffers));
  for (int i = 0; i < kBuffers; ++i) {
    EXPECT_EQ(order[static_cast<size_t>(i)], i);
    EXPECT_EQ(runs[static_cast<size_t>(i)], 1);
  }
  EXPECT_EQ(on_caller.load(), 0);
  EXPECT_EQ(not_completed.load(), 0);
  EXPECT_EQ(saw_result.load(), kBuffers);
  // The throwing handler was counted, and nothing after it was lost.
  EXPECT_EQ(drv.stats().handler_errors - errors_before, 1u);
}

TEST(CudaDriver, HandlersRunOnceInCommitOrderOffTheCallersThreadAfterTheWork) {
  FL_SKIP_WITHOUT_GPU();
  expect_handlers_once_in_commit_order_after_the_work(Config{});
}

// Config::cuda_completion_sleep: threads that sleep between polls still
// complete every buffer, once and in order.
TEST(CudaDriver, CompletionThreadsThatSleepBetweenPollsStillRunEveryHandlerOnceInOrder) {
  FL_SKIP_WITHOUT_GPU();
  Config c;
  c.cuda_completion_sleep = std::chrono::microseconds(20);
  expect_handlers_once_in_commit_order_after_the_work(c);
}

TEST(CudaDriver, AHandlerMayEncodeAndCommitMoreWork) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  auto& drv = dev->driver();
  auto q = drv.new_queue();
  auto h = drv.allocate_host(4);
  auto* host = static_cast<float*>(h->host_ptr());
  *host = 0;
  const auto& fill = drv.pipeline("fill_f32");
  std::shared_ptr<CommandBuffer> second;
  std::atomic<bool> committed{false};
  auto first = q->new_command_buffer();
  first->add_completed_handler([&](CommandBuffer&) {
    // CUDA calls from the completion thread are allowed (no host callback).
    second = q->new_command_buffer();
    auto& enc = second->compute_encoder();
    enc.dispatch(fill, KernelArgs().ptr(host).f64(9).size(1));
    enc.end_encoding();
    second->commit();
    committed = true;
  });
  first->commit();
  first->wait_until_completed();
  ASSERT_TRUE(committed.load());
  second->wait_until_completed();
  EXPECT_EQ(*host, 9.0f);
}

TEST(CudaDriver, ASignalOrdersAnotherQueueOnTheGpu) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  auto& drv = dev->driver();
  auto q1 = drv.new_queue(), q2 = drv.new_queue();
  auto ev = drv.new_shared_event();
  auto d = drv.allocate(4 * 256);
  auto h = drv.allocate_host(4 * 256);
  auto* host = static_cast<float*>(h->host_ptr());
  for (int rep = 0; rep < 5; ++rep) {
    const uint64_t v = static_cast<uint64_t>(rep) + 1;
    auto a = q1->new_command_buffer();
    auto& ea = a->compute_encoder();
    ea.dispatch(drv.pipeline("sleep_us"), KernelArgs().i64(20000));
    ea.dispatch(drv.pipeline("fill_f32"), KernelArgs().ptr(d->device_ptr()).f64(7).size(256));
    ea.end_encoding();
    a->encode_signal(*ev, v);
    a->commit();
    auto b = q2->new_command_buffer();
    b->encode_wait(*ev, v);  // without it, b would scale before the fill
    auto& eb = b->compute_encoder();
    eb.dispatch(drv.pipeline("scale_f32"),
                KernelArgs().ptr(d->device_ptr()).ptr(d->device_ptr()).f64(2).size(256));
    eb.dispatch(drv.pipeline("copy_bytes"), KernelArgs().ptr(host).ptr(d->device_ptr()).size(1024));
    eb.end_encoding();
    b->commit();
    // The host thread did not wait: the order was kept on the GPU.
    b->wait_until_completed();
    EXPECT_EQ(host[0], 14.0f);
    EXPECT_EQ(host[255], 14.0f);
    // The host view follows once the signaling buffer's completion is seen
    // (possibly by another completion thread than b's).
    EXPECT_TRUE(ev->wait_until(v, Clock::now() + std::chrono::seconds(5)));
  }
}

TEST(CudaDriver, SharedEventHostWaitsListenersAndTimes) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  auto& drv = dev->driver();
  auto q = drv.new_queue();
  auto ev = drv.new_shared_event();
  std::atomic<int> fired3{0}, fired10{0};
  std::atomic<bool> on_caller{false};
  const auto caller = std::this_thread::get_id();
  ev->notify(3, [&] {
    ++fired3;
    if (std::this_thread::get_id() == caller) on_caller = true;
  });
  ev->notify(10, [&] { ++fired10; });
  auto cb = q->new_command_buffer();
  cb->encode_signal(*ev, 1);
  auto& enc = cb->compute_encoder();
  enc.dispatch(drv.pipeline("sleep_us"), KernelArgs().i64(20000));
  enc.end_encoding();
  cb->encode_signal(*ev, 5);
  cb->commit();
  EXPECT_TRUE(ev->wait_until(5, Clock::now() + std::chrono::seconds(10)));
  EXPECT_EQ(ev->signaled_value(), 5u);
  EXPECT_FALSE(ev->wait_until(6, Clock::now() + std::chrono::milliseconds(50)));
  cb->wait_until_completed();
  EXPECT_EQ(fired3.load(), 1);
  EXPECT_FALSE(on_caller.load());
  EXPECT_EQ(fired10.load(), 0);
  int inline_runs = 0;
  ev->notify(4, [&] { ++inline_runs; });  // already reached: runs now
  EXPECT_EQ(inline_runs, 1);
  const double ms = static_cast<double>(ev->signal_time_ns(5) - ev->signal_time_ns(1)) / 1e6;
  EXPECT_GE(ms, 19.0);
  EXPECT_LT(ms, 1000.0);
  EXPECT_THROW(ev->signal_time_ns(6), InvalidState);
}

TEST(CudaDriver, AWaitForAValueNobodySignaledSaysToSignalFirst) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  auto q = dev->driver().new_queue();
  auto ev = dev->driver().new_shared_event();
  auto cb = q->new_command_buffer();
  try {
    cb->encode_wait(*ev, 5);
    FAIL() << "a wait for a value never signaled was accepted";
  } catch (const InvalidState& e) {
    EXPECT_NE(std::string(e.what()).find("encode the signal"), std::string::npos) << e.what();
  }
}

TEST(CudaRuntime, EventsOrderStreamsAndMeasureTime) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  Stream a = dev->streams().at(1), b = dev->streams().at(2);
  Mirrored buf(*dev, 4 * 1024);
  Event start(*dev), done(*dev);
  start.record(a);
  a.dispatch("sleep_us", KernelArgs().i64(30000));
  a.dispatch("fill_f32", KernelArgs().ptr(buf.dev()).f64(3).size(1024));
  done.record(a);
  done.wait(b);
  b.dispatch("scale_f32", KernelArgs().ptr(buf.dev()).ptr(buf.dev()).f64(5).size(1024));
  buf.download(b);
  EXPECT_EQ(buf.host()[0], 15.0f);
  EXPECT_EQ(buf.host()[1023], 15.0f);
  done.synchronize();
  EXPECT_TRUE(done.query());
  const double ms = start.elapsed_ms(done);
  EXPECT_GE(ms, 29.0);
  EXPECT_LT(ms, 2000.0);
  std::atomic<int> ran{0};
  done.then([&] { ++ran; });
  done.synchronize();
  EXPECT_EQ(ran.load(), 1);
}

TEST(CudaRuntime, ShutdownDrainsCommittedWorkThenRefuses) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  Stream s = dev->current_stream();
  std::atomic<int> ran{0};
  s.dispatch("sleep_us", KernelArgs().i64(50000));
  s.add_callback([&] { ++ran; });
  s.dispatch("sleep_us", KernelArgs().i64(1000));  // encoded, not committed
  dev->shutdown();
  EXPECT_EQ(ran.load(), 1);
  EXPECT_THROW(s.dispatch("sleep_us", KernelArgs().i64(1)), ShutDown);
  EXPECT_THROW(dev->driver(), ShutDown);
}

}  // namespace
}  // namespace flotilla::test
