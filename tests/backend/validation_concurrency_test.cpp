// The CPU driver's threading rules under real races (label concurrency):
//  - two threads racing to commit one command buffer: one wins, the other
//    gets InvalidState;
//  - concurrent-object-use: two threads inside one command buffer or encoder,
//    reported with both thread ids;
//  - concurrent-encoding: the AGX model forbids any two encoding calls at once
//    on the device; the runtime's EncodingLock makes them sequential.
//
// To make two calls overlap on a machine with few cores, the driver's
// simulated encoding cost (Config::cpu_encode_cost) is raised to many
// milliseconds: a call stays inside the object that long, and the second
// thread starts well inside that window.
#include <atomic>
#include <chrono>
#include <latch>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "backend/backend_test_util.h"
#include "runtime/runtime_test_util.h"

namespace flotilla::test {
namespace {

using backend::CommandBuffer;
using backend::KernelArgs;
using std::chrono::milliseconds;

// ---- Two threads racing to commit one command buffer ---------------------------------

// Would catch: a commit whose state check and state change are not atomic
// (both threads pass "not yet committed" and the buffer is enqueued twice).
TEST(CommitRace, ExactlyOneCommitSucceeds) {
  auto drv = make_cpu_driver();
  auto q = drv->new_queue();
  auto out = drv->allocate(sizeof(float) * 8);
  const auto& fill = drv->pipeline("fill_f32");
  const int iterations = scaled(300, 40);
  int bad = 0;
  for (int i = 0; i < iterations; ++i) {
    auto cb = q->new_command_buffer();
    auto& enc = cb->compute_encoder();
    enc.dispatch(fill, KernelArgs().ptr(out->device_ptr()).f64(i).size(8));
    enc.end_encoding();
    const uint64_t committed_before = drv->stats().command_buffers_committed;
    std::atomic<int> ok{0}, invalid_state{0}, other{0};
    std::latch go(2);
    auto racer = [&] {
      go.arrive_and_wait();
      try {
        cb->commit();
        ok.fetch_add(1);
      } catch (const ValidationError& e) {
        // commit-twice if the winner was done, concurrent-object-use if it was inside.
        if (e.rule() == "commit-twice" || e.rule() == "concurrent-object-use")
          invalid_state.fetch_add(1);
        else
          other.fetch_add(1);
      } catch (...) {
        other.fetch_add(1);
      }
    };
    std::thread a(racer), b(racer);
    a.join();
    b.join();
    cb->wait_until_completed();
    if (ok.load() != 1 || invalid_state.load() != 1 || other.load() != 0 ||
        drv->stats().command_buffers_committed != committed_before + 1) {
      ++bad;
      ADD_FAILURE() << "iteration " << i << ": " << ok.load() << " commits succeeded, "
                    << invalid_state.load() << " InvalidState, " << other.load() << " other";
    }
    if (bad > 3) break;
  }
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(drv->stats().kernels_executed, drv->stats().command_buffers_committed);
}

// ---- concurrent-object-use ---------------------------------------------------------

struct RaceOutcome {
  std::optional<ValidationError> error;  // the one violation, if exactly one
  int violations = 0;
  int successes = 0;
  std::string a_id, b_id;   // the two threads
  bool overlapped = false;  // the later call started before the earlier one returned
};

// Runs call() on thread A and, a little later (inside A's encoding window),
// on thread B; collects what happened.
RaceOutcome race_two(const std::function<void()>& call) {
  using Clock = std::chrono::steady_clock;
  RaceOutcome r;
  Mutex mu;
  std::latch a_started(1);
  Clock::time_point start[2], end[2];
  auto body = [&](int who, std::string* id) {
    *id = thread_id_text(std::this_thread::get_id());
    start[who] = Clock::now();
    try {
      call();
      end[who] = Clock::now();
      MutexLock lock(mu);
      ++r.successes;
    } catch (const ValidationError& e) {
      end[who] = Clock::now();
      MutexLock lock(mu);
      ++r.violations;
      r.error.emplace(e);
    } catch (const std::exception& e) {
      end[who] = Clock::now();
      ADD_FAILURE() << "unexpected: " << e.what();
    }
  };
  std::thread a([&] {
    a_started.count_down();
    body(0, &r.a_id);
  });
  a_started.wait();
  std::this_thread::sleep_for(milliseconds(15));
  std::thread b([&] { body(1, &r.b_id); });
  a.join();
  b.join();
  r.overlapped = std::max(start[0], start[1]) < std::min(end[0], end[1]);
  return r;
}

// Runs `attempt` (fresh objects, then race_two) until the two calls overlap:
// on a loaded machine a thread may start too late to meet the other inside.
template <typename Attempt>
RaceOutcome overlapping(Attempt attempt) {
  RaceOutcome r;
  for (int i = 0; i < 5; ++i) {
    r = attempt();
    if (r.overlapped) break;
  }
  EXPECT_TRUE(r.overlapped) << "the two calls never overlapped in 5 tries";
  return r;
}

Config slow_encoding(bool agx = false) {
  Config c;
  c.cpu_exec_threads = 2;
  c.cpu_encode_cost = milliseconds(150);
  c.cpu_agx_model = agx;
  return c;
}

// Two threads inside one encoder: one is refused, naming both threads; the
// refused call does nothing (one kernel encoded).
TEST(ConcurrentObjectUse, TwoThreadsInOneEncoder) {
  auto drv = make_cpu_driver(slow_encoding());
  auto q = drv->new_queue();
  auto out = drv->allocate(64);
  const auto& fill = drv->pipeline("fill_f32");
  std::shared_ptr<CommandBuffer> cb;
  uint64_t before = 0;
  RaceOutcome r = overlapping([&] {
    cb = q->new_command_buffer();
    auto& enc = cb->compute_encoder();
    before = drv->stats().violations;
    return race_two(
        [&] { enc.dispatch(fill, KernelArgs().ptr(out->device_ptr()).f64(1).size(16)); });
  });
  ASSERT_EQ(r.violations, 1) << "both calls were refused, or neither";
  EXPECT_EQ(r.successes, 1);
  EXPECT_EQ(r.error->rule(), "concurrent-object-use");
  const std::string msg = r.error->what();
  EXPECT_EQ(msg.rfind("[ComputeEncoder::dispatch]", 0), 0u) << msg;
  EXPECT_NE(msg.find(r.a_id), std::string::npos) << "names thread A (" << r.a_id << "): " << msg;
  EXPECT_NE(msg.find(r.b_id), std::string::npos) << "names thread B (" << r.b_id << "): " << msg;
  EXPECT_EQ(drv->stats().violations, before + 1);
  EXPECT_EQ(cb->kernel_count(), 1u);
}

TEST(ConcurrentObjectUse, TwoThreadsInOneCommandBuffer) {
  auto drv = make_cpu_driver(slow_encoding());
  auto q = drv->new_queue();
  RaceOutcome r = overlapping([&] {
    auto cb = q->new_command_buffer();
    return race_two([cb] { cb->compute_encoder(); });
  });
  ASSERT_EQ(r.violations, 1);
  EXPECT_EQ(r.successes, 1);
  EXPECT_EQ(r.error->rule(), "concurrent-object-use");
  const std::string msg = r.error->what();
  EXPECT_EQ(msg.rfind("[CommandBuffer::compute_encoder]", 0), 0u) << msg;
  EXPECT_NE(msg.find(r.a_id), std::string::npos) << msg;
  EXPECT_NE(msg.find(r.b_id), std::string::npos) << msg;
}

// Two threads each opening an encoder on their own command buffer.
RaceOutcome race_two_encoders(backend::Driver& drv) {
  auto q1 = drv.new_queue(), q2 = drv.new_queue();
  auto cb1 = q1->new_command_buffer(), cb2 = q2->new_command_buffer();
  std::atomic<int> which{0};
  return race_two([&] {
    auto& cb = which.fetch_add(1) == 0 ? cb1 : cb2;
    cb->compute_encoder();
  });
}

// Different objects on a thread-safe driver: no violation (the control for
// the AGX test below).
TEST(ConcurrentEncoding, ThreadSafeDriverAllowsParallelEncoding) {
  auto drv = make_cpu_driver(slow_encoding(/*agx=*/false));
  RaceOutcome r = overlapping([&] { return race_two_encoders(*drv); });
  EXPECT_EQ(r.violations, 0);
  EXPECT_EQ(r.successes, 2);
}

// The AGX model: two encoding calls at once anywhere on the device.
TEST(ConcurrentEncoding, AgxModelForbidsParallelEncoding) {
  auto drv = make_cpu_driver(slow_encoding(/*agx=*/true));
  EXPECT_FALSE(drv->encoding_thread_safe());
  RaceOutcome r = overlapping([&] { return race_two_encoders(*drv); });
  ASSERT_EQ(r.violations, 1);
  EXPECT_EQ(r.successes, 1);
  EXPECT_EQ(r.error->rule(), "concurrent-encoding");
  const std::string msg = r.error->what();
  EXPECT_EQ(msg.rfind("[ComputeEncoder::compute_encoder]", 0), 0u) << msg;
  EXPECT_NE(msg.find(r.a_id), std::string::npos) << msg;
  EXPECT_NE(msg.find(r.b_id), std::string::npos) << msg;
  EXPECT_NE(msg.find("EncodingLock"), std::string::npos) << "says what to do: " << msg;
}

// ---- The runtime on the AGX model: the EncodingLock is what keeps it legal ---------------

struct AgxRun {
  uint64_t violations = 0;
  int refused = 0;     // ValidationErrors the threads saw
  int unfinished = 0;  // threads whose last round never got through (lock off)
  int misnamed = 0;    // concurrent-encoding messages naming one thread twice
  EncodingLock::Stats lock;
};

// The two thread ids of a concurrent-encoding message ("thread A made an
// encoding call while thread B was encoding") must differ.
bool names_two_threads(const std::string& msg) {
  const auto a = msg.find("] thread ");
  const auto b = msg.find(" while thread ");
  if (a == std::string::npos || b == std::string::npos) return false;
  const std::string first = msg.substr(a + 9, msg.find(' ', a + 9) - (a + 9));
  const std::string second = msg.substr(b + 14, msg.find(' ', b + 14) - (b + 14));
  return first != second;
}

AgxRun run_agx_threads(EncodingLockMode lock_mode) {
  constexpr int kThreads = 8;
  Config c;
  c.cpu_agx_model = true;
  c.encoding_lock = lock_mode;
  c.cpu_exec_threads = 2;
  c.cpu_encode_cost = std::chrono::microseconds(20);
  c.adaptive_commit_kernels = 4;
  auto dev = Device::create("cpu", 0, c);
  std::vector<std::unique_ptr<FloatBuffer>> bufs;
  for (int t = 0; t < kThreads; ++t) bufs.push_back(std::make_unique<FloatBuffer>(*dev, 32));
  std::atomic<int> refused{0}, wrong{0}, unfinished{0}, misnamed{0};
  auto refuse = [&](const ValidationError& e) {
    refused.fetch_add(1);
    if (e.rule() == "concurrent-encoding" && !names_two_threads(e.what())) {
      if (misnamed.fetch_add(1) == 0) ADD_FAILURE() << "misnamed: " << e.what();
    }
  };
  std::latch go(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      FloatBuffer& b = *bufs[static_cast<size_t>(t)];
      go.arrive_and_wait();
      Stream s = dev->current_stream();
      for (int k = 0; k < scaled(200, 40); ++k) {
        try {
          b.fill(s, static_cast<float>(k));
        } catch (const ValidationError& e) {
          refuse(e);
        }
      }
      // A last round, checked. Without the lock, 8 threads retrying at once
      // can keep colliding; a thread that gives up leaves its stream's open
      // work to the thread-exit commit (which has no caller to tell).
      bool done = false;
      for (int attempt = 0; attempt < 100 && !done; ++attempt) {
        try {
          b.fill(s, -1.0f);
          if (b.read(s)[31] != -1.0f) wrong.fetch_add(1);
          done = true;
        } catch (const ValidationError& e) {
          refuse(e);
        }
      }
      if (!done) unfinished.fetch_add(1);
    });
  for (auto& t : threads) t.join();
  AgxRun run;
  run.violations = dev->driver().stats().violations;
  run.refused = refused.load();
  run.unfinished = unfinished.load();
  run.misnamed = misnamed.load();
  run.lock = dev->encoding_lock().stats();
  EXPECT_EQ(wrong.load(), 0);
  return run;
}

TEST(EncodingLockOnAgx, LockOnMeansNoViolations) {
  const AgxRun run = run_agx_threads(EncodingLockMode::kAuto);  // auto: on for the AGX model
  EXPECT_EQ(run.violations, 0u);
  EXPECT_EQ(run.refused, 0);
  EXPECT_EQ(run.unfinished, 0);
  EXPECT_GE(run.lock.acquisitions, 8u * static_cast<uint64_t>(scaled(200, 40)));
}

// The control: the same run without the lock breaks the AGX rule. Encoding
// calls of 8 threads overlap on any machine with two cores, so a few runs
// see it.
TEST(EncodingLockOnAgx, LockOffShowsViolations) {
  AgxRun run;
  for (int attempt = 0; attempt < 5 && run.violations == 0; ++attempt)
    run = run_agx_threads(EncodingLockMode::kOff);
  EXPECT_GT(run.violations, 0u);
  // Every violation reached a caller as a ValidationError, except at most one
  // per thread that gave up: its thread-exit commit has no caller.
  EXPECT_LE(static_cast<uint64_t>(run.refused), run.violations);
  EXPECT_LE(run.violations - static_cast<uint64_t>(run.refused),
            static_cast<uint64_t>(run.unfinished));
  EXPECT_EQ(run.misnamed, 0) << "concurrent-encoding messages that name one thread twice";
  EXPECT_EQ(run.lock.acquisitions, 0u);
}

// Under contention the lock measures its waits. Whether 8 threads overlap
// at all depends on the scheduler (on 2 busy cores one may finish before the
// next starts), so a few runs are allowed to see contention; none may see a
// violation.
TEST(EncodingLockOnAgx, ContentionIsMeasured) {
  AgxRun run;
  for (int attempt = 0; attempt < 5 && run.lock.contended == 0; ++attempt) {
    run = run_agx_threads(EncodingLockMode::kOn);
    EXPECT_EQ(run.violations, 0u);
  }
  EXPECT_GT(run.lock.contended, 0u);
  EXPECT_GT(run.lock.wait.count(), 0);
  EXPECT_LE(run.lock.contended, run.lock.acquisitions);
}

}  // namespace
}  // namespace flotilla::test

namespace flotilla::test {
namespace {

// Threads commit and wait on raw command buffers while another thread shuts
// the driver down. A commit either fails with ShutDown or its buffer
// completes: a commit that slipped in after the drain had finished would be
// queued on stopped execution threads and its waiter would hang (the
// Watchdog turns that into a failure).
TEST(CpuDriverShutdown, CommitRacingShutdownNeverHangs) {
  constexpr int kThreads = 4;
  std::mt19937_64 rng(test_seed());
  for (int iter = 0; iter < scaled(200, 20); ++iter) {
    Watchdog dog(std::chrono::seconds(30), "a commit racing the driver's shutdown");
    auto drv = make_cpu_driver();
    std::atomic<int> other_errors{0};
    std::latch go(kThreads + 1);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&] {
        std::unique_ptr<backend::Queue> q;
        try {
          q = drv->new_queue();
        } catch (const ShutDown&) {
        }
        go.arrive_and_wait();
        if (!q) return;
        try {
          for (;;) {
            auto cb = q->new_command_buffer();
            cb->commit();
            cb->wait_until_completed();
          }
        } catch (const ShutDown&) {
        } catch (const std::exception& e) {
          ADD_FAILURE() << e.what();
          other_errors.fetch_add(1);
        }
      });
    go.arrive_and_wait();
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
    drv->shutdown();
    for (auto& t : threads) t.join();
    ASSERT_EQ(other_errors.load(), 0) << "iteration " << iter;
  }
}

}  // namespace
}  // namespace flotilla::test
