// The CPU driver's validation layer, one rule at a time (label unit), and the
// rest of its contract: states, handlers, events, memory, shutdown.
//
// Every Metal state-machine rule of DESIGN.md §3 is broken on purpose: the
// call must throw ValidationError naming the rule, count it once, and do
// nothing else, so the object stays usable (checked by finishing the work).
#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include "backend/backend_test_util.h"

namespace flotilla::test {
namespace {

using backend::CommandBuffer;
using backend::CommandBufferStatus;
using backend::KernelArgs;

class ValidationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    drv_ = make_cpu_driver();
    queue_ = drv_->new_queue();
    buf_ = drv_->allocate(64 * sizeof(float));
    fill_ = &drv_->pipeline("fill_f32");
  }
  std::shared_ptr<CommandBuffer> new_cb() { return queue_->new_command_buffer(); }
  KernelArgs fill_args(float v) const {
    return KernelArgs().ptr(buf_->device_ptr()).f64(v).size(64);
  }
  float value() const { return static_cast<const float*>(buf_->host_ptr())[63]; }
  // Encodes one fill and commits.
  std::shared_ptr<CommandBuffer> committed_fill(float v) {
    auto cb = new_cb();
    auto& enc = cb->compute_encoder();
    enc.dispatch(*fill_, fill_args(v));
    enc.end_encoding();
    cb->commit();
    return cb;
  }

  std::unique_ptr<backend::Driver> drv_;
  std::unique_ptr<backend::Queue> queue_;
  std::unique_ptr<backend::Buffer> buf_;
  const backend::Pipeline* fill_ = nullptr;
};

TEST_F(ValidationTest, CommitTwice) {
  auto cb = committed_fill(1.0f);
  const auto msg =
      expect_violation(*drv_, "commit-twice", "CommandBuffer::commit", [&] { cb->commit(); });
  EXPECT_NE(msg.find("already committed"), std::string::npos) << msg;
  cb->wait_until_completed();
  EXPECT_EQ(drv_->stats().command_buffers_committed, 1u) << "the second commit enqueued again";
  EXPECT_EQ(drv_->stats().kernels_executed, 1u);
}

TEST_F(ValidationTest, EncodeAfterCommit) {
  auto cb = new_cb();
  auto& enc = cb->compute_encoder();
  enc.end_encoding();
  cb->commit();
  expect_violation(*drv_, "encode-after-commit", "CommandBuffer::compute_encoder",
                   [&] { cb->compute_encoder(); });
  // A kernel into the (ended) encoder of a committed buffer: the state is
  // checked first, so it is reported as encoding after commit.
  const auto msg = expect_violation(*drv_, "encode-after-commit", "CommandBuffer::dispatch",
                                    [&] { enc.dispatch(*fill_, fill_args(1.0f)); });
  EXPECT_NE(msg.find("fill_f32"), std::string::npos) << "names the lost kernel: " << msg;
  auto ev = drv_->new_shared_event();
  expect_violation(*drv_, "encode-after-commit", "CommandBuffer::encode_signal",
                   [&] { cb->encode_signal(*ev, 1); });
  expect_violation(*drv_, "encode-after-commit", "CommandBuffer::encode_wait",
                   [&] { cb->encode_wait(*ev, 1); });
  cb->wait_until_completed();
  EXPECT_EQ(cb->kernel_count(), 0u);
  EXPECT_EQ(drv_->stats().kernels_executed, 0u);
}

TEST_F(ValidationTest, EncoderAlreadyOpen) {
  auto cb = new_cb();
  auto& enc = cb->compute_encoder();
  expect_violation(*drv_, "encoder-already-open", "CommandBuffer::compute_encoder",
                   [&] { cb->compute_encoder(); });
  auto ev = drv_->new_shared_event();
  expect_violation(*drv_, "encoder-already-open", "CommandBuffer::encode_signal",
                   [&] { cb->encode_signal(*ev, 1); });
  // The first encoder is still the open one and still works.
  EXPECT_TRUE(enc.is_encoding());
  enc.dispatch(*fill_, fill_args(4.0f));
  enc.end_encoding();
  cb->commit();
  cb->wait_until_completed();
  EXPECT_EQ(value(), 4.0f);
}

TEST_F(ValidationTest, CommitWithOpenEncoder) {
  auto cb = new_cb();
  auto& enc = cb->compute_encoder();
  enc.dispatch(*fill_, fill_args(5.0f));
  expect_violation(*drv_, "commit-with-open-encoder", "CommandBuffer::commit",
                   [&] { cb->commit(); });
  EXPECT_EQ(cb->status(), CommandBufferStatus::kNotEnqueued) << "the refused commit enqueued";
  enc.end_encoding();
  cb->commit();
  cb->wait_until_completed();
  EXPECT_EQ(value(), 5.0f);
}

TEST_F(ValidationTest, HandlerAfterCommit) {
  auto cb = committed_fill(1.0f);
  expect_violation(*drv_, "handler-after-commit", "CommandBuffer::add_completed_handler",
                   [&] { cb->add_completed_handler([](CommandBuffer&) {}); });
  cb->wait_until_completed();
}

TEST_F(ValidationTest, WaitNotCommitted) {
  auto cb = new_cb();
  const auto msg =
      expect_violation(*drv_, "wait-not-committed", "CommandBuffer::wait_until_completed",
                       [&] { cb->wait_until_completed(); });
  EXPECT_NE(msg.find("commit() it first"), std::string::npos) << msg;
  cb->commit();
  cb->wait_until_completed();
  EXPECT_EQ(cb->status(), CommandBufferStatus::kCompleted);
}

TEST_F(ValidationTest, EncoderEnded) {
  auto cb = new_cb();
  auto& enc = cb->compute_encoder();
  enc.end_encoding();
  EXPECT_FALSE(enc.is_encoding());
  expect_violation(*drv_, "encoder-ended", "CommandBuffer::dispatch",
                   [&] { enc.dispatch(*fill_, fill_args(1.0f)); });
  expect_violation(*drv_, "encoder-ended", "CommandBuffer::end_encoding",
                   [&] { enc.end_encoding(); });
  // An ended encoder does not touch the buffer's next encoder either.
  auto& enc2 = cb->compute_encoder();
  expect_violation(*drv_, "encoder-ended", "CommandBuffer::dispatch",
                   [&] { enc.dispatch(*fill_, fill_args(1.0f)); });
  enc2.dispatch(*fill_, fill_args(6.0f));
  enc2.end_encoding();
  cb->commit();
  cb->wait_until_completed();
  EXPECT_EQ(cb->kernel_count(), 1u);
  EXPECT_EQ(value(), 6.0f);
}

// Each violation is counted, and only violations are.
TEST_F(ValidationTest, ViolationsAreCountedInDriverStats) {
  EXPECT_EQ(drv_->stats().violations, 0u);
  committed_fill(1.0f)->wait_until_completed();
  EXPECT_EQ(drv_->stats().violations, 0u);
  for (int i = 0; i < 3; ++i) {
    auto cb = committed_fill(1.0f);
    EXPECT_THROW(cb->commit(), ValidationError);
    cb->wait_until_completed();
  }
  EXPECT_EQ(drv_->stats().violations, 3u);
}

// ---- The rest of the driver contract ---------------------------------------------

TEST_F(ValidationTest, StatusGoesThroughMetalsStates) {
  auto cb = new_cb();
  EXPECT_EQ(cb->status(), CommandBufferStatus::kNotEnqueued);
  std::atomic<int> seen{-1};
  cb->add_completed_handler([&](CommandBuffer& c) { seen = static_cast<int>(c.status()); });
  committed_fill(0.0f);  // unrelated work ahead in the queue
  auto& enc = cb->compute_encoder();
  enc.dispatch(*fill_, fill_args(2.0f));
  enc.end_encoding();
  cb->commit();
  const auto s = cb->status();
  EXPECT_TRUE(s == CommandBufferStatus::kCommitted || s == CommandBufferStatus::kScheduled ||
              s == CommandBufferStatus::kCompleted);
  cb->wait_until_completed();
  EXPECT_EQ(cb->status(), CommandBufferStatus::kCompleted);
  EXPECT_EQ(seen.load(), static_cast<int>(CommandBufferStatus::kCompleted))
      << "the handler ran before the status was final";
  EXPECT_EQ(cb->error(), nullptr);
}

TEST_F(ValidationTest, FailedKernelPutsTheBufferInError) {
  auto cb = new_cb();
  auto& enc = cb->compute_encoder();
  enc.dispatch(drv_->pipeline("trap"), KernelArgs());
  enc.dispatch(*fill_, fill_args(9.0f));  // skipped after the failure
  enc.end_encoding();
  cb->commit();
  cb->wait_until_completed();
  EXPECT_EQ(cb->status(), CommandBufferStatus::kError);
  ASSERT_NE(cb->error(), nullptr);
  EXPECT_THROW(std::rethrow_exception(cb->error()), InvalidState);
  EXPECT_NE(value(), 9.0f);
  // The queue goes on.
  committed_fill(3.0f)->wait_until_completed();
  EXPECT_EQ(value(), 3.0f);
}

// A handler that throws is counted, the other handlers run, the execution
// thread survives.
TEST_F(ValidationTest, ThrowingHandlerIsCountedAndContained) {
  auto cb = new_cb();
  std::atomic<int> ran{0};
  cb->add_completed_handler([](CommandBuffer&) { throw std::runtime_error("handler boom"); });
  cb->add_completed_handler([&](CommandBuffer&) { ran.fetch_add(1); });
  cb->commit();
  cb->wait_until_completed();
  EXPECT_EQ(ran.load(), 1);
  EXPECT_EQ(drv_->stats().handler_errors, 1u);
  for (int i = 0; i < 4; ++i) committed_fill(static_cast<float>(i))->wait_until_completed();
  EXPECT_EQ(value(), 3.0f);
}

TEST_F(ValidationTest, HandlersRunInCommitOrderOnAQueue) {
  std::vector<int> order;
  Mutex mu;
  std::vector<std::shared_ptr<CommandBuffer>> cbs;
  for (int i = 0; i < 20; ++i) {
    auto cb = new_cb();
    cb->add_completed_handler([&, i](CommandBuffer&) {
      MutexLock lock(mu);
      order.push_back(i);
    });
    cb->commit();
    cbs.push_back(cb);
  }
  cbs.back()->wait_until_completed();
  MutexLock lock(mu);
  ASSERT_EQ(order.size(), 20u);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(order[static_cast<size_t>(i)], i);
}

TEST_F(ValidationTest, SharedEventSignalWaitAndListeners) {
  auto ev = drv_->new_shared_event();
  EXPECT_EQ(ev->signaled_value(), 0u);
  EXPECT_THROW(ev->signal_time_ns(1), InvalidState);
  std::atomic<int> heard{0};
  ev->notify(2, [&] { heard.fetch_add(1); });
  auto q2 = drv_->new_queue();
  // Queue 2 waits for value 2 before its fill; queue 1 signals 1 then 2.
  auto waiter = q2->new_command_buffer();
  waiter->encode_wait(*ev, 2);
  auto& enc = waiter->compute_encoder();
  enc.dispatch(*fill_, fill_args(8.0f));
  enc.end_encoding();
  waiter->commit();
  EXPECT_FALSE(ev->wait_until(2, std::chrono::steady_clock::now() + std::chrono::milliseconds(20)));
  EXPECT_NE(waiter->status(), CommandBufferStatus::kCompleted);
  auto s1 = new_cb();
  s1->encode_signal(*ev, 1);
  s1->commit();
  s1->wait_until_completed();
  EXPECT_EQ(heard.load(), 0);
  auto s2 = new_cb();
  s2->encode_signal(*ev, 2);
  s2->commit();
  waiter->wait_until_completed();
  EXPECT_EQ(value(), 8.0f);
  EXPECT_EQ(ev->signaled_value(), 2u);
  EXPECT_EQ(heard.load(), 1);
  EXPECT_GT(ev->signal_time_ns(2), 0);
  ev->notify(1, [&] { heard.fetch_add(10); });  // already reached: runs here, now
  EXPECT_EQ(heard.load(), 11);
}

TEST_F(ValidationTest, UnknownPipelineListsTheKernels) {
  try {
    drv_->pipeline("gemm_f64");
    FAIL();
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("gemm_f64"), std::string::npos) << msg;
    EXPECT_NE(msg.find("fill_f32"), std::string::npos) << msg;
  }
}

TEST(CpuDriverMemory, AllocationBeyondTheLimitIsOutOfMemory) {
  Config c;
  c.cpu_memory_limit = 1 << 20;
  auto drv = make_cpu_driver(c);
  auto a = drv->allocate(512 * 1024);
  try {
    drv->allocate(768 * 1024);
    FAIL();
  } catch (const OutOfMemory& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("786432"), std::string::npos) << "says how much was asked: " << msg;
    EXPECT_NE(msg.find("free"), std::string::npos) << msg;
  }
  a.reset();
  EXPECT_NO_THROW(drv->allocate(768 * 1024)) << "freed memory is available again";
  EXPECT_THROW(drv->allocate(0), InvalidArgument);
}

TEST(CpuDriverShutdown, LaterCallsAreShutDown) {
  auto drv = make_cpu_driver();
  auto q = drv->new_queue();
  auto cb = q->new_command_buffer();
  drv->shutdown();
  drv->shutdown();  // idempotent
  EXPECT_THROW(drv->new_queue(), ShutDown);
  EXPECT_THROW(q->new_command_buffer(), ShutDown);
  EXPECT_THROW(drv->allocate(64), ShutDown);
  EXPECT_THROW(drv->new_shared_event(), ShutDown);
  EXPECT_THROW(cb->commit(), ShutDown);
}

// A buffer waiting for an event nobody will signal does not hang shutdown:
// the wait fails with ShutDown and the buffer completes in error.
TEST(CpuDriverShutdown, AbandonedWaitFailsInsteadOfHanging) {
  auto drv = make_cpu_driver();
  auto q = drv->new_queue();
  auto ev = drv->new_shared_event();
  auto cb = q->new_command_buffer();
  std::atomic<int> handled{0};
  cb->encode_wait(*ev, 1);
  cb->add_completed_handler([&](CommandBuffer&) { handled.fetch_add(1); });
  cb->commit();
  drv->shutdown();
  EXPECT_EQ(handled.load(), 1);
  EXPECT_EQ(cb->status(), CommandBufferStatus::kError);
  ASSERT_NE(cb->error(), nullptr);
  EXPECT_THROW(std::rethrow_exception(cb->error()), ShutDown);
}

// Runs one kernel on the CPU driver and waits; fails the test if its
// command buffer did not complete.
void run_kernel(backend::Driver& drv, backend::Queue& q, const char* name, const KernelArgs& args) {
  auto cb = q.new_command_buffer();
  auto& enc = cb->compute_encoder();
  enc.dispatch(drv.pipeline(name), args);
  enc.end_encoding();
  cb->commit();
  cb->wait_until_completed();
  ASSERT_EQ(cb->status(), CommandBufferStatus::kCompleted) << name;
}

// Would catch: a CPU gather_rows that reads the table in the wrong order or
// reads rows from the wrong place (scrambled, with a row repeated), stops
// early or writes past the last row, rounds or truncates a row that is not
// a multiple of 16 bytes, assumes aligned sources or destinations, or
// cannot read a driver's host staging (allocate_host) as well as its
// device memory: the batch queue's copy in of InputBuffer rows on CPU.
TEST(CpuKernels, GatherRowsCopiesEveryRowInTableOrder) {
  auto drv = make_cpu_driver();
  auto q = drv->new_queue();
  std::mt19937_64 rng(20240611);
  constexpr size_t kPool = 24, kStride = 4352, kGuard = 64;
  auto host_rows = drv->allocate_host(kPool * kStride);
  auto dev_rows = drv->allocate(kPool * kStride);
  for (auto* b : {host_rows.get(), dev_rows.get()}) {
    auto* p = static_cast<uint8_t*>(b->host_ptr());
    for (size_t i = 0; i < kPool * kStride; ++i) p[i] = static_cast<uint8_t>(rng());
  }
  struct Case {
    size_t row_bytes, src_off, dst_off;
  };
  for (const Case c : {Case{2048, 0, 0}, Case{4144, 0, 0}, Case{2047, 0, 0}, Case{2048, 4, 0},
                       Case{2048, 0, 4}, Case{13, 3, 1}}) {
    for (size_t rows : {size_t{1}, size_t{7}, size_t{300}}) {
      SCOPED_TRACE(::testing::Message()
                   << "row_bytes " << c.row_bytes << ", source offset " << c.src_off
                   << ", destination offset " << c.dst_off << ", rows " << rows);
      // Row i reads source pick[i]: below kPool a host row, else a device
      // row; scrambled, and the last row repeats the first.
      std::vector<size_t> pick(rows);
      for (auto& p : pick) p = static_cast<size_t>(rng() % (2 * kPool));
      if (rows > 1) pick.back() = pick.front();
      auto table = drv->allocate_host(rows * sizeof(void*));
      auto** t = static_cast<const void**>(table->host_ptr());
      std::vector<const uint8_t*> want(rows);
      for (size_t i = 0; i < rows; ++i) {
        const auto& from = pick[i] < kPool ? host_rows : dev_rows;
        const size_t at = (pick[i] % kPool) * kStride + c.src_off;
        t[i] = static_cast<const uint8_t*>(from->device_ptr()) + at;
        want[i] = static_cast<const uint8_t*>(from->host_ptr()) + at;
      }
      auto dst = drv->allocate(c.dst_off + rows * c.row_bytes + kGuard);
      auto* base = static_cast<uint8_t*>(dst->host_ptr());
      std::memset(base, 0xCD, dst->size());
      run_kernel(*drv, *q, "gather_rows",
                 KernelArgs()
                     .ptr(base + c.dst_off)
                     .ptr(table->device_ptr())
                     .i64(static_cast<int64_t>(c.row_bytes))
                     .size(rows));
      const uint8_t* out = base + c.dst_off;
      for (size_t i = 0; i < rows; ++i)
        ASSERT_EQ(std::memcmp(out + i * c.row_bytes, want[i], c.row_bytes), 0)
            << "row " << i << " (source " << pick[i] << ")";
      for (size_t i = 0; i < c.dst_off; ++i)
        ASSERT_EQ(base[i], 0xCD) << "wrote before the first row";
      for (size_t i = 0; i < kGuard; ++i)
        ASSERT_EQ(out[rows * c.row_bytes + i], 0xCD) << "wrote past the last row";
    }
  }
}

// Would catch: a gather of 0 rows (or of rows of 0 bytes) that writes a
// row or reads its table, one that refuses the null pointers every kernel
// accepts for n = 0, and a negative row size taken as a huge one instead of
// failing its command buffer.
TEST(CpuKernels, GatherRowsOfNothingWritesNothingAndANegativeRowFails) {
  auto drv = make_cpu_driver();
  auto q = drv->new_queue();
  auto src = drv->allocate_host(2048);
  std::memset(src->host_ptr(), 0x11, 2048);
  auto table = drv->allocate_host(sizeof(void*));
  *static_cast<const void**>(table->host_ptr()) = src->device_ptr();
  auto dst = drv->allocate(4096);
  auto* out = static_cast<uint8_t*>(dst->host_ptr());
  std::memset(out, 0xCD, 4096);
  run_kernel(*drv, *q, "gather_rows",
             KernelArgs().ptr(dst->device_ptr()).ptr(table->device_ptr()).i64(2048).size(0));
  run_kernel(*drv, *q, "gather_rows", KernelArgs().ptr(nullptr).ptr(nullptr).i64(2048).size(0));
  run_kernel(*drv, *q, "gather_rows",
             KernelArgs().ptr(dst->device_ptr()).ptr(table->device_ptr()).i64(0).size(1));
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(out[i], 0xCD) << "byte " << i;

  auto cb = q->new_command_buffer();
  auto& enc = cb->compute_encoder();
  enc.dispatch(drv->pipeline("gather_rows"),
               KernelArgs().ptr(dst->device_ptr()).ptr(table->device_ptr()).i64(-1).size(1));
  enc.end_encoding();
  cb->commit();
  cb->wait_until_completed();
  EXPECT_EQ(cb->status(), CommandBufferStatus::kError);
  ASSERT_NE(cb->error(), nullptr);
  EXPECT_THROW(std::rethrow_exception(cb->error()), InvalidArgument);
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(out[i], 0xCD) << "byte " << i;
}

}  // namespace
}  // namespace flotilla::test
