// Helpers for the serve tests: scale and seed, a private CPU device, and a
// tiny model built from ops (so most tests do not depend on nn::Mlp).
//
// Scale: FLOTILLA_TEST_SCALE multiplies iteration counts (CI's sanitizer
// lanes set 0.25). Seed: FLOTILLA_TEST_SEED fixes it; otherwise random, and
// printed by every test that uses one.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <latch>
#include <memory>
#include <random>
#include <semaphore>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/common/error.h"
#include "flotilla/ops/ops.h"
#include "flotilla/ops/tensor.h"
#include "flotilla/runtime/device.h"
#include "flotilla/serve/batch_queue.h"
#include "serve/queue_core.h"

namespace flotilla::serve::test {

inline int scaled(int n, int min = 1) {
  double scale = 1.0;
  if (const char* s = std::getenv("FLOTILLA_TEST_SCALE")) scale = std::atof(s);
  if (scale <= 0) scale = 1.0;
  return std::max(min, static_cast<int>(n * scale));
}

inline uint64_t test_seed() {
  uint64_t seed = 0;
  if (const char* s = std::getenv("FLOTILLA_TEST_SEED"))
    seed = std::strtoull(s, nullptr, 10);
  else
    seed = std::random_device{}();
  std::printf("[ seed     ] %llu (replay with FLOTILLA_TEST_SEED=%llu)\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  return seed;
}

// Holds a thread at one of the queue's test hooks (`Set` installs it): while
// a HookHold lives, the next time a thread that called hold_my_next()
// reaches the hook it waits there: wait_held() returns once it is there,
// release() lets it go on.
template <void (*Set)(void (*)())>
class HookHold {
 public:
  HookHold() { Set(&hook); }
  ~HookHold() { Set(nullptr); }
  HookHold(const HookHold&) = delete;
  HookHold& operator=(const HookHold&) = delete;
  static void hold_my_next() { mine_ = true; }
  void wait_held() { held_.acquire(); }
  void release() { go_.release(); }

 private:
  static void hook() {
    if (!mine_) return;
    mine_ = false;
    held_.release();
    go_.acquire();
  }
  static inline thread_local bool mine_ = false;
  static inline std::binary_semaphore held_{0}, go_{0};
};

// Holds a fast-path submit between taking its id and pushing onto the
// inbox, to make a submitter be overtaken on purpose.
using PushHold = HookHold<&detail::set_before_push_hook_for_testing>;
// Holds a take_ready() (a worker with a batch in flight, or step()) between
// taking the inbox without the queue's lock and putting its requests in the
// FIFO (Note [Inbox walks outside the lock]).
using DetachHold = HookHold<&detail::set_after_detach_hook_for_testing>;
// Holds a fast-path submit that found the queue full with its count still
// added (Note [Room in one step]).
using RoomRefusedHold = HookHold<&detail::set_room_refused_hook_for_testing>;

// A private cpu device with the environment's settings (so the sanitizer
// lanes' FLOTILLA_ALLOCATOR_CACHING=0 applies).
inline std::shared_ptr<Device> make_device() {
  return Device::create("cpu", 0, Config::from_env());
}

inline std::vector<float> random_vector(std::mt19937_64& rng, size_t n) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// y = x W^T + b, W [out, in]: one linear kernel. The host reference is in
// double, so it checks the device's arithmetic rather than copying it.
class TinyModel {
 public:
  TinyModel(Device& device, int64_t in, int64_t out, uint64_t seed = 7) : in_(in), out_(out) {
    std::mt19937_64 rng(seed);
    w_host_ = random_vector(rng, static_cast<size_t>(in * out));
    b_host_ = random_vector(rng, static_cast<size_t>(out));
    Stream s = device.default_stream();
    w_ = Tensor::from_host(w_host_, {out, in}, DType::kF32, s);
    b_ = Tensor::from_host(b_host_, {out}, DType::kF32, s);
    s.synchronize();
  }
  int64_t in() const { return in_; }
  int64_t out() const { return out_; }

  Tensor operator()(const Stream& s, const Tensor& x) const { return ops::linear(s, x, w_, b_); }
  BatchQueue::Model model() const {
    return [this](const Stream& s, const Tensor& x) { return (*this)(s, x); };
  }

  std::vector<double> host_reference(std::span<const float> x) const {
    std::vector<double> y(static_cast<size_t>(out_));
    for (int64_t o = 0; o < out_; ++o) {
      double acc = b_host_[static_cast<size_t>(o)];
      for (int64_t i = 0; i < in_; ++i)
        acc += static_cast<double>(x[static_cast<size_t>(i)]) *
               w_host_[static_cast<size_t>(o * in_ + i)];
      y[static_cast<size_t>(o)] = acc;
    }
    return y;
  }
  // The same model run unbatched ([1, in]) on `s`.
  std::vector<float> unbatched(const Stream& s, std::span<const float> x) const {
    Tensor t = Tensor::from_host(x, {1, in_}, DType::kF32, s);
    return (*this)(s, t).to_host(s);
  }

 private:
  int64_t in_, out_;
  std::vector<float> w_host_, b_host_;
  Tensor w_, b_;
};

// Largest |a - b| / max(1, |b|) over two outputs of the same length.
inline double max_rel_error(std::span<const float> a, std::span<const double> b) {
  if (a.size() != b.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, std::abs(a[i] - b[i]) / std::max(1.0, std::abs(b[i])));
  return worst;
}

// What a handle ended with, by the error's code.
enum class Outcome { kCompleted, kTimeout, kCancelled, kQueueFull, kShutDown, kFailed, kOther };
inline const char* outcome_name(Outcome o) {
  switch (o) {
    case Outcome::kCompleted: return "completed";
    case Outcome::kTimeout: return "timeout";
    case Outcome::kCancelled: return "cancelled";
    case Outcome::kQueueFull: return "queue_full";
    case Outcome::kShutDown: return "shut_down";
    case Outcome::kFailed: return "failed";
    case Outcome::kOther: return "other";
  }
  return "?";
}

// get()s the handle; the output goes to `out` when completed.
inline Outcome outcome_of(RequestHandle& h, std::vector<float>* out = nullptr,
                          std::string* message = nullptr) {
  try {
    auto y = h.get();
    if (out) *out = std::move(y);
    return Outcome::kCompleted;
  } catch (const Error& e) {
    if (message) *message = e.what();
    switch (e.code()) {
      case ErrorCode::kTimeout: return Outcome::kTimeout;
      case ErrorCode::kCancelled: return Outcome::kCancelled;
      case ErrorCode::kQueueFull: return Outcome::kQueueFull;
      case ErrorCode::kShutDown: return Outcome::kShutDown;
      default: return Outcome::kFailed;
    }
  } catch (...) {
    return Outcome::kOther;
  }
}

// A row whose first value is kFailMark fails its batch in marked_failing.
constexpr float kFailMark = 1000.f;

// The tiny model, failing (on the host) any batch holding a marked row.
inline BatchQueue::Model marked_failing(const TinyModel& m) {
  return [&m](const Stream& s, const Tensor& x) {
    auto v = x.to_host(s);
    for (int64_t r = 0; r < x.dim(0); ++r)
      if (v[static_cast<size_t>(r * x.dim(1))] == kFailMark)
        throw InvalidState("[test model] batch holds a marked row");
    return m(s, x);
  };
}

// The fixture of the deterministic queue tests: a private CPU device, the
// tiny model (kIn -> kOut), a ManualClock, and the model wrapped to count
// its calls and rows.
class QueueTest : public ::testing::Test {
 protected:
  void SetUp() override {
    device_ = make_device();
    model_ = std::make_unique<TinyModel>(*device_, kIn, kOut);
    clock_ = std::make_shared<ManualClock>();
  }

  // Manual mode (workers = 0, step()) on the ManualClock.
  BatchQueueOptions manual(int max_batch, std::chrono::microseconds max_delay) {
    BatchQueueOptions o;
    o.workers = 0;
    o.max_batch = max_batch;
    o.max_delay = max_delay;
    o.clock = clock_;
    return o;
  }
  // The tiny model, counting its calls and rows.
  BatchQueue::Model counted() {
    return [this](const Stream& s, const Tensor& x) {
      calls_.fetch_add(1);
      rows_.fetch_add(x.dim(0));
      return (*model_)(s, x);
    };
  }
  // Request i's input (the same for every test).
  std::vector<float> input(int i) {
    std::mt19937_64 rng(1000 + static_cast<uint64_t>(i));
    return random_vector(rng, kIn);
  }
  // Submits input(first) .. input(first + count - 1) to `q`, in that
  // order, appending their handles to `hs`.
  void submit_inputs(BatchQueue& q, int first, int count, std::vector<RequestHandle>& hs) {
    for (int i = first; i < first + count; ++i) hs.push_back(q.submit(input(i)));
  }
  // The handle completed with the model's output for input(i).
  void expect_output(RequestHandle& h, int i) {
    std::vector<float> y;
    ASSERT_EQ(outcome_of(h, &y), Outcome::kCompleted);
    EXPECT_LT(max_rel_error(y, model_->host_reference(input(i))), 1e-5) << "request " << i;
  }

  static constexpr int64_t kIn = 16, kOut = 8;
  std::shared_ptr<Device> device_;
  std::unique_ptr<TinyModel> model_;
  std::shared_ptr<ManualClock> clock_;
  std::atomic<int> calls_{0};
  std::atomic<int64_t> rows_{0};
};

// The background of a race round (the concurrency tests), each thread
// starting at `start` (count them in it: kThreads): one moves `clock` on in
// random steps, one steps `q` in manual mode (workers = 0), and one shuts
// `q` down with `mode` once `submitted` reaches `after`. join_shutdown()
// returns once that shutdown has; the destructor stops and joins the rest.
class RaceBackground {
 public:
  static constexpr int kThreads = 3;
  RaceBackground(BatchQueue& q, ManualClock& clock, uint64_t seed, std::latch& start,
                 const std::atomic<size_t>& submitted, size_t after, ShutdownMode mode) {
    ticker_ = std::thread([&clock, seed, &start, this] {
      std::mt19937_64 r(seed ^ 0xc10c);
      start.arrive_and_wait();
      while (!stop_.load(std::memory_order_acquire)) {
        clock.advance(std::chrono::microseconds(r() % 40));
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    });
    stepper_ = std::thread([&q, &start, this] {
      start.arrive_and_wait();
      while (q.options().workers == 0 && !stop_.load(std::memory_order_acquire))
        if (q.step() == 0) std::this_thread::yield();
    });
    closer_ = std::thread([&q, &start, &submitted, after, mode] {
      start.arrive_and_wait();
      while (submitted.load(std::memory_order_acquire) < after) std::this_thread::yield();
      q.shutdown(mode);
    });
  }
  RaceBackground(const RaceBackground&) = delete;
  RaceBackground& operator=(const RaceBackground&) = delete;
  void join_shutdown() {
    if (closer_.joinable()) closer_.join();
  }
  ~RaceBackground() {
    join_shutdown();
    stop_.store(true, std::memory_order_release);
    ticker_.join();
    stepper_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread ticker_, stepper_, closer_;
};

}  // namespace flotilla::serve::test
