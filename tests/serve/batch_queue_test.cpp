// BatchQueue unit tests: deterministic, driven by a ManualClock (and, most of
// them, by manual mode: workers = 0 and step()), so every max_delay and
// deadline decision happens exactly when the test says.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <latch>
#include <nlohmann/json.hpp>
#include <semaphore>
#include <thread>

#include "flotilla/nn/mlp.h"
#include "serve/recorded_sizes.h"
#include "serve/serve_test_util.h"

namespace flotilla::serve::test {
namespace {

using namespace std::chrono_literals;

class BatchQueueTest : public QueueTest {
 protected:
  // Manual mode, ManualClock, the tiny model (counting its calls).
  BatchQueueOptions manual(int max_batch = 4, std::chrono::microseconds max_delay = 100us) {
    return QueueTest::manual(max_batch, max_delay);
  }
  // Manual mode, max_batch 2, no max_delay, `capacity`, kBlock: for the
  // tests of submitters waiting for room.
  BatchQueueOptions blocking(size_t capacity) {
    BatchQueueOptions o = manual(2, 0us);
    o.capacity = capacity;
    o.when_full = OverflowPolicy::kBlock;
    return o;
  }
  // One worker thread, `depth` batches in flight, ManualClock, max_batch 2,
  // no max_delay: for the pipelined-lane tests.
  BatchQueueOptions one_worker(int depth) {
    BatchQueueOptions o = manual(2, 0us);
    o.workers = 1;
    o.pipeline_depth = depth;
    return o;
  }

  // Each handle's output against the MLP run on its input alone (batch 1),
  // within 1e-4 relative; returns how many were bit-identical.
  int expect_matches_unbatched(const nn::Mlp& mlp, const std::vector<std::vector<float>>& xs,
                               std::vector<RequestHandle>& hs) {
    Stream s = device_->streams().acquire_round_robin();
    int exact = 0;
    for (size_t i = 0; i < hs.size(); ++i) {
      std::vector<float> y;
      EXPECT_EQ(outcome_of(hs[i], &y), Outcome::kCompleted) << "request " << i;
      Tensor x = Tensor::from_host(xs[i], {1, mlp.in_features()}, DType::kF32, s);
      auto ref = mlp.forward(s, x).to_host(s);
      if (y.size() != ref.size()) {
        ADD_FAILURE() << "request " << i << " has " << y.size() << " values";
        continue;
      }
      double worst = 0;
      for (size_t k = 0; k < y.size(); ++k)
        worst = std::max(worst, static_cast<double>(std::abs(y[k] - ref[k])) /
                                    std::max(1e-3f, std::abs(ref[k])));
      EXPECT_LT(worst, 1e-4) << "request " << i;
      exact += y == ref;
    }
    return exact;
  }
};

// ---- max_batch and max_delay ---------------------------------------------------------

TEST_F(BatchQueueTest, MaxDelayHoldsTheFirstRequestForCompanyThenRuns) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 100us));
  auto h0 = q.submit(input(0));
  auto h1 = q.submit(input(1));
  EXPECT_EQ(q.step(), 0u) << "neither full nor waited max_delay: must wait for company";
  clock_->advance(99us);
  EXPECT_EQ(q.step(), 0u);
  EXPECT_FALSE(h0.done());
  EXPECT_EQ(h0.status(), RequestStatus::kQueued);
  clock_->advance(1us);
  EXPECT_EQ(q.step(), 2u) << "the oldest has waited max_delay: both run as one batch";
  EXPECT_EQ(calls_.load(), 1);
  EXPECT_EQ(h0.status(), RequestStatus::kCompleted);
  expect_output(h0, 0);
  expect_output(h1, 1);
  auto m = q.metrics();
  EXPECT_EQ(m.batches, 1u);
  EXPECT_EQ(m.batch_sizes.at(2), 1u);
  EXPECT_EQ(m.queue_wait.max_us, 100.0) << "queue wait is measured by the injected clock";
}

TEST_F(BatchQueueTest, AFullBatchRunsAtOnceAndTheRestWaits) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 100us));
  std::vector<RequestHandle> hs;
  submit_inputs(q, 0, 6, hs);
  EXPECT_EQ(q.step(), 4u);
  EXPECT_EQ(q.step(), 0u) << "2 left, not full, max_delay not reached";
  clock_->advance(100us);
  EXPECT_EQ(q.step(), 2u);
  EXPECT_EQ(calls_.load(), 2);
  EXPECT_EQ(rows_.load(), 6);
  for (int i = 0; i < 6; ++i) expect_output(hs[static_cast<size_t>(i)], i);
  auto m = q.metrics();
  EXPECT_EQ(m.batch_sizes.at(4), 1u);
  EXPECT_EQ(m.batch_sizes.at(2), 1u);
  EXPECT_DOUBLE_EQ(m.mean_batch(), 3.0);
}

// submit() keeps its own copy of the input (inside the request's one heap
// block, Note [One allocation per request]): the caller may overwrite or free
// its buffer at once, and each row of the batch is still its own input's.
TEST_F(BatchQueueTest, EachRequestKeepsItsOwnCopyOfTheInput) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(6, 100us));
  std::vector<RequestHandle> hs;
  std::vector<std::vector<float>> via_callback(3);
  std::vector<float> buffer;
  for (int i = 0; i < 6; ++i) {
    buffer = input(i);
    if (i % 2 == 0) {
      hs.push_back(q.submit(buffer));
    } else {
      auto& out = via_callback[static_cast<size_t>(i / 2)];
      q.submit(buffer,
               [&out](const Completion& c) { out.assign(c.output.begin(), c.output.end()); });
    }
    std::fill(buffer.begin(), buffer.end(), -1e6f);  // the caller reuses its buffer
    buffer.shrink_to_fit();
  }
  buffer = {};  // and frees it
  EXPECT_EQ(q.step(), 6u) << "one batch of all six";
  EXPECT_EQ(calls_.load(), 1);
  for (int i = 0; i < 6; i += 2) expect_output(hs[static_cast<size_t>(i / 2)], i);
  for (int i = 1; i < 6; i += 2) {
    const auto& y = via_callback[static_cast<size_t>(i / 2)];
    ASSERT_EQ(y.size(), static_cast<size_t>(kOut)) << "request " << i;
    EXPECT_LT(max_rel_error(y, model_->host_reference(input(i))), 1e-5) << "request " << i;
  }
}

// A BorrowedInput is read where the caller keeps it, when its batch is
// packed, not copied at submit(): what runs is what the buffer holds at
// step(). Copying submits in the same batch keep the input they were given.
// (Rewriting a borrowed input before its request completes breaks the
// caller's side of the contract, and the header calls what runs then
// undefined; this test pins what this implementation does, to show that
// nothing was copied.)
TEST_F(BatchQueueTest, ABorrowedInputIsReadInPlaceWhenItsBatchIsPacked) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(6, 100us));
  std::vector<std::vector<float>> buffers(6);
  std::vector<RequestHandle> hs;
  std::vector<std::vector<float>> via_callback(2);
  for (int i = 0; i < 6; ++i) {
    auto& buf = buffers[static_cast<size_t>(i)];
    buf = input(i);
    switch (i % 3) {
      case 0: hs.push_back(q.submit(BorrowedInput(buf))); break;
      case 1: {
        auto& out = via_callback[static_cast<size_t>(i / 3)];
        q.submit(BorrowedInput(buf),
                 [&out](const Completion& c) { out.assign(c.output.begin(), c.output.end()); });
        break;
      }
      default: hs.push_back(q.submit(buf)); break;  // a copy, for contrast
    }
  }
  for (int i = 0; i < 6; ++i) {  // the callers rewrite their buffers in place
    const auto next = input(100 + i);
    std::copy(next.begin(), next.end(), buffers[static_cast<size_t>(i)].begin());
  }
  EXPECT_EQ(q.step(), 6u) << "one batch of all six";
  EXPECT_EQ(calls_.load(), 1);
  expect_output(hs[0], 100);  // request 0: borrowed, so it ran on what the buffer held at step()
  expect_output(hs[1], 2);    // request 2: copied at submit
  expect_output(hs[2], 103);
  expect_output(hs[3], 5);
  for (int i : {1, 4}) {
    const auto& y = via_callback[static_cast<size_t>(i / 3)];
    ASSERT_EQ(y.size(), static_cast<size_t>(kOut)) << "request " << i;
    EXPECT_LT(max_rel_error(y, model_->host_reference(input(100 + i))), 1e-5) << "request " << i;
  }
}

// The queue never reads a borrowed input after its request completed: a
// refused, cancelled or expired request's buffer is freed as soon as the
// call that decided it returns (ASan reports a later read), and a completed
// one's buffer is overwritten with a row that fails any batch holding it.
TEST_F(BatchQueueTest, ABorrowedInputIsNotReadAfterItsRequestCompletes) {
  auto o = manual(4, 100us);
  o.capacity = 3;
  BatchQueue q(*device_, kIn, kOut, marked_failing(*model_), o);
  auto buffer = [&](int i) { return std::make_unique<std::vector<float>>(input(i)); };
  auto a = buffer(0), b = buffer(1), c = buffer(2), d = buffer(3), e = buffer(4);
  auto ha = q.submit(BorrowedInput(*a));
  auto hb = q.submit(BorrowedInput(*b), q.deadline_in(50us));
  bool c_done = false;
  const uint64_t c_id = q.submit(BorrowedInput(*c), [&](const Completion& done) {
    EXPECT_EQ(done.status, RequestStatus::kCancelled);
    c_done = true;
  });
  auto hd = q.submit(BorrowedInput(*d));  // the queue is full: refused at once
  EXPECT_EQ(outcome_of(hd), Outcome::kQueueFull);
  d.reset();
  EXPECT_TRUE(q.cancel(c_id));
  EXPECT_TRUE(c_done) << "a cancellation's callback runs before cancel() returns";
  c.reset();
  clock_->advance(110us);  // b expires; a has waited out max_delay
  EXPECT_EQ(q.step(), 1u) << "a runs alone";
  EXPECT_EQ(outcome_of(hb), Outcome::kTimeout);
  b.reset();
  expect_output(ha, 0);
  std::fill(a->begin(), a->end(), kFailMark);  // the caller reuses a's buffer
  auto he = q.submit(BorrowedInput(*e));
  clock_->advance(100us);
  EXPECT_EQ(q.step(), 1u);
  expect_output(he, 4);
  e.reset();
  auto m = q.metrics();
  EXPECT_EQ(m.completed, 2u);
  EXPECT_EQ(m.rejected, 1u);
  EXPECT_EQ(m.cancelled, 1u);
  EXPECT_EQ(m.expired, 1u);
}

// A batch that fails fails its borrowed requests like any other, and never
// reads their inputs again: each buffer is freed as soon as its get() has
// thrown (ASan sees a later read), and the next batch is right.
TEST_F(BatchQueueTest, ABorrowedInputOfAFailedBatchIsNotReadAgain) {
  BatchQueue q(*device_, kIn, kOut, marked_failing(*model_), manual(4, 0us));
  auto marked = std::make_unique<std::vector<float>>(input(0));
  (*marked)[0] = kFailMark;
  auto other = std::make_unique<std::vector<float>>(input(1));
  auto hm = q.submit(BorrowedInput(*marked));
  auto ho = q.submit(BorrowedInput(*other));
  EXPECT_EQ(q.step(), 2u);
  EXPECT_EQ(outcome_of(hm), Outcome::kFailed);
  EXPECT_EQ(outcome_of(ho), Outcome::kFailed) << "the marked row fails its whole batch";
  marked.reset();
  other.reset();
  auto next = std::make_unique<std::vector<float>>(input(2));
  auto hn = q.submit(BorrowedInput(*next));
  EXPECT_EQ(q.step(), 1u);
  expect_output(hn, 2);
  EXPECT_EQ(q.metrics().failed, 2u);
}

// Recorded batches replay from the staging, which the worker packs from the
// borrowed inputs each time: every size's replay gives each request its own
// input's output.
TEST_F(BatchQueueTest, RecordedBatchesOfBorrowedInputsAreRight) {
  auto o = manual(4, 0us);
  o.record_batches = true;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  int next = 0;
  for (int round = 0; round < 3; ++round) {  // the first runs eagerly, then replays
    for (int n : {1, 2, 3, 4}) {
      std::vector<std::vector<float>> bufs;
      std::vector<RequestHandle> hs;
      std::vector<int> ids;
      bufs.reserve(static_cast<size_t>(n));
      for (int i = 0; i < n; ++i, ++next) {
        bufs.push_back(input(next));
        ids.push_back(next);
        hs.push_back(q.submit(BorrowedInput(bufs.back())));
      }
      EXPECT_EQ(q.step(), static_cast<size_t>(n));
      for (int i = 0; i < n; ++i)
        expect_output(hs[static_cast<size_t>(i)], ids[static_cast<size_t>(i)]);
    }
  }
}

// ---- Inputs the device reads in place (InputBuffer) ------------------------------------

// Would catch: an InputBuffer row packed by the worker (read_in_place stays
// 0), read at submit (the rewrite before step() would not show), the gather
// table pointing at the wrong rows (outputs of other requests), a mixed
// batch's staged rows out of place, or recorded padding rows reading
// garbage: rows of one buffer, copied inputs and plain borrowed ones share
// each batch, eagerly and then replayed.
TEST_F(BatchQueueTest, InputBufferRowsAreReadInPlaceByTheDevice) {
  for (const bool record : {false, true}) {
    SCOPED_TRACE(record ? "recorded" : "eager");
    auto o = manual(8, 0us);
    o.record_batches = record;
    BatchQueue q(*device_, kIn, kOut, counted(), o);
    InputBuffer rows = q.make_input_buffer(6);
    uint64_t in_place = 0;
    int next = 0;
    for (int round = 0; round < 3; ++round) {
      // Sizes 7 (4 rows of the buffer, 2 copies, 1 borrowed), 3 (buffer
      // rows only, recorded as 4: a padding row) and 1.
      for (const int n : {7, 3, 1}) {
        std::vector<RequestHandle> hs;
        std::vector<int> want;  // the input each request must run on
        std::vector<float> plain;
        const int from_buffer = std::min(n, 4);
        for (int i = 0; i < n; ++i, ++next) {
          if (i < from_buffer) {
            const auto row = static_cast<size_t>((round + i) % 6);  // distinct in a batch
            const auto x = input(next);
            std::copy(x.begin(), x.end(), rows.row(row).begin());
            hs.push_back(q.submit(rows.input(row)));
            // Rewritten before step(): the device reads the row when the
            // batch runs, so the request runs on the new values.
            const auto later = input(1000 + next);
            std::copy(later.begin(), later.end(), rows.row(row).begin());
            want.push_back(1000 + next);
          } else if (i == n - 1 && n == 7) {
            plain = input(next);
            hs.push_back(q.submit(BorrowedInput(plain)));
            want.push_back(next);
          } else {
            hs.push_back(q.submit(input(next)));
            want.push_back(next);
          }
        }
        EXPECT_EQ(q.step(), static_cast<size_t>(n)) << "one batch of " << n;
        in_place += static_cast<uint64_t>(from_buffer);
        for (int i = 0; i < n; ++i)
          expect_output(hs[static_cast<size_t>(i)], want[static_cast<size_t>(i)]);
      }
    }
    const auto m = q.metrics();
    EXPECT_EQ(m.read_in_place, in_place) << "every buffer row was read by the device";
    EXPECT_EQ(m.completed, static_cast<uint64_t>(next));
    EXPECT_EQ(m.to_json().at("read_in_place"), in_place);
    EXPECT_NE(m.to_prometheus().find("\nflotilla_batch_queue_read_in_place_total " +
                                     std::to_string(in_place) + "\n"),
              std::string::npos);
  }
}

// Would catch: InputBuffer rows read in place in a batch larger than
// read_in_place_max_bytes (read_in_place would count them), the limit
// applied to the batch's requests instead of its recorded size (3 rows run
// as 4 and 5 as 8: with a limit of 4 rows, 3 gather and 5 pack), a limit
// of 0 that still reads in place, and packed buffer rows read at submit
// instead of when the batch runs (the outputs would not follow the rewrite
// before step()).
TEST_F(BatchQueueTest, InputBufferRowsOfBatchesOverTheLimitArePacked) {
  constexpr size_t kRowBytes = static_cast<size_t>(kIn) * sizeof(float);
  struct Case {
    bool record;
    size_t limit;                               // read_in_place_max_bytes
    std::vector<std::pair<int, bool>> batches;  // rows, read in place
  };
  const Case cases[] = {
      {false, 4 * kRowBytes, {{3, true}, {4, true}, {5, false}, {1, true}}},
      {true, 4 * kRowBytes, {{3, true}, {4, true}, {5, false}, {1, true}}},
      {true, 3 * kRowBytes, {{3, false}, {2, true}}},  // 3 rows run as 4
      {false, 0, {{1, false}, {5, false}}},
      {true, SIZE_MAX, {{8, true}}},
  };
  EXPECT_EQ(BatchQueueOptions{}.read_in_place_max_bytes, SIZE_MAX) << "no limit by default";
  int next = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message()
                 << (c.record ? "recorded" : "eager") << ", limit " << c.limit << " bytes");
    auto o = manual(8, 0us);
    o.record_batches = c.record;
    o.read_in_place_max_bytes = c.limit;
    BatchQueue q(*device_, kIn, kOut, counted(), o);
    InputBuffer rows = q.make_input_buffer(8);
    uint64_t in_place = 0;
    for (const auto& [n, read_in_place] : c.batches) {
      SCOPED_TRACE(::testing::Message() << "batch of " << n);
      std::vector<RequestHandle> hs;
      std::vector<int> want;
      for (int i = 0; i < n; ++i, ++next) {
        const auto row = static_cast<size_t>(i);
        const auto x = input(next);
        std::copy(x.begin(), x.end(), rows.row(row).begin());
        hs.push_back(q.submit(rows.input(row)));
        const auto later = input(5000 + next);  // rewritten before step()
        std::copy(later.begin(), later.end(), rows.row(row).begin());
        want.push_back(5000 + next);
      }
      EXPECT_EQ(q.step(), static_cast<size_t>(n));
      if (read_in_place) in_place += static_cast<uint64_t>(n);
      EXPECT_EQ(q.metrics().read_in_place, in_place);
      for (int i = 0; i < n; ++i)
        expect_output(hs[static_cast<size_t>(i)], want[static_cast<size_t>(i)]);
    }
  }
}

// Would catch: a row's address used on a device it does not belong to (the
// queue must pack another device's buffer like any borrowed input), and an
// InputBuffer whose rows share cache lines or ignore their bounds.
TEST_F(BatchQueueTest, InputBufferRowsAreCheckedAndAnotherDevicesArePacked) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 0us));
  EXPECT_THROW((void)q.make_input_buffer(0), InvalidArgument);
  InputBuffer rows = q.make_input_buffer(3);
  EXPECT_EQ(rows.rows(), 3u);
  EXPECT_EQ(rows.row_size(), static_cast<size_t>(kIn));
  EXPECT_EQ(rows.row(2).size(), static_cast<size_t>(kIn));
  const auto stride = reinterpret_cast<uintptr_t>(rows.row(1).data()) -
                      reinterpret_cast<uintptr_t>(rows.row(0).data());
  EXPECT_EQ(stride % 64, 0u) << "each row starts a cache line";
  EXPECT_GE(stride, static_cast<size_t>(kIn) * sizeof(float));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(rows.row(0).data()) % 64, 0u);
  EXPECT_THROW((void)rows.row(3), InvalidArgument);
  EXPECT_THROW((void)rows.input(3), InvalidArgument);
  const InputBuffer& const_rows = rows;
  EXPECT_THROW((void)const_rows.row(3), InvalidArgument);
  InputBuffer moved = std::move(rows);
  EXPECT_EQ(moved.rows(), 3u);
  EXPECT_EQ(rows.rows(), 0u);  // NOLINT(bugprone-use-after-move): moved-from is empty
  EXPECT_THROW((void)rows.input(0), InvalidArgument);

  // A buffer of another device (a second cpu device) is not this queue's to
  // read in place: its rows are packed, and still run right.
  auto other_device = make_device();
  BatchQueue other(*other_device, kIn, kOut, counted(), manual(4, 0us));
  InputBuffer foreign = other.make_input_buffer(2);
  std::vector<RequestHandle> hs;
  for (int i = 0; i < 2; ++i) {
    const auto x = input(i);
    std::copy(x.begin(), x.end(), foreign.row(static_cast<size_t>(i)).begin());
    hs.push_back(q.submit(foreign.input(static_cast<size_t>(i))));
  }
  const auto x = input(2);
  std::copy(x.begin(), x.end(), moved.row(0).begin());
  hs.push_back(q.submit(moved.input(0)));
  EXPECT_EQ(q.step(), 3u);
  for (int i = 0; i < 3; ++i) expect_output(hs[static_cast<size_t>(i)], i);
  EXPECT_EQ(q.metrics().read_in_place, 1u) << "only the queue's own device's row";
}

// Would catch: a short InputBuffer row or a NaN in one slipping past
// submit()'s checks (a buffer of another queue's width), and a refused one
// counted as read in place.
TEST_F(BatchQueueTest, InputBufferRowsOfTheWrongWidthOrWithNaNAreRefused) {
  auto o = manual(4, 0us);
  o.reject_nan = true;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  BatchQueue wider(*device_, kIn + 1, kOut, counted(), manual(4, 0us));
  InputBuffer wide = wider.make_input_buffer(1);
  EXPECT_THROW((void)q.submit(wide.input(0)), InvalidArgument);
  InputBuffer rows = q.make_input_buffer(1);
  const auto x = input(0);
  std::copy(x.begin(), x.end(), rows.row(0).begin());
  rows.row(0)[1] = std::nanf("");
  bool called = false;
  EXPECT_THROW((void)q.submit(rows.input(0), [&](const Completion&) { called = true; }),
               InvalidArgument);
  EXPECT_FALSE(called);
  EXPECT_EQ(q.step(), 0u);
  const auto m = q.metrics();
  EXPECT_EQ(m.invalid, 2u);
  EXPECT_EQ(m.read_in_place, 0u);
}

TEST_F(BatchQueueTest, ZeroMaxDelayRunsWhatIsThere) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(8, 0us));
  auto h = q.submit(input(0));
  EXPECT_EQ(q.step(), 1u);
  expect_output(h, 0);
}

// ---- Deadlines ---------------------------------------------------------------------

TEST_F(BatchQueueTest, ARequestPastItsDeadlineTimesOutAndNeverRuns) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 100us));
  auto late = q.submit(input(0), q.deadline_in(50us));
  auto patient = q.submit(input(1));
  clock_->advance(49us);
  EXPECT_EQ(q.step(), 0u);
  EXPECT_FALSE(late.done());
  clock_->advance(1us);
  EXPECT_EQ(q.step(), 0u) << "the deadline passed; the other still waits for company";
  EXPECT_TRUE(late.done());
  EXPECT_EQ(late.status(), RequestStatus::kExpired);
  std::string msg;
  EXPECT_EQ(outcome_of(late, nullptr, &msg), Outcome::kTimeout);
  EXPECT_NE(msg.find("deadline"), std::string::npos) << msg;
  EXPECT_FALSE(patient.done());
  clock_->advance(50us);
  EXPECT_EQ(q.step(), 1u);
  EXPECT_EQ(rows_.load(), 1) << "the expired request must never reach the model";
  expect_output(patient, 1);
  auto m = q.metrics();
  EXPECT_EQ(m.expired, 1u);
  EXPECT_EQ(m.completed, 1u);
}

TEST_F(BatchQueueTest, ExpiryWinsOverMaxDelayWhenBothHavePassed) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 100us));
  auto h = q.submit(input(0), q.deadline_in(100us));
  clock_->advance(200us);
  EXPECT_EQ(q.step(), 0u);
  EXPECT_EQ(outcome_of(h), Outcome::kTimeout);
  EXPECT_EQ(calls_.load(), 0);
}

TEST_F(BatchQueueTest, DefaultDeadlineAppliesAndAPassedDeadlineIsRefusedAtOnce) {
  auto o = manual(4, 100us);
  o.default_deadline = 30us;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  auto h = q.submit(input(0));
  auto already = q.submit(input(1), clock_->now());
  EXPECT_TRUE(already.done());
  EXPECT_EQ(outcome_of(already), Outcome::kTimeout);
  clock_->advance(30us);
  EXPECT_EQ(q.step(), 0u);
  EXPECT_EQ(outcome_of(h), Outcome::kTimeout);
  EXPECT_EQ(q.metrics().expired, 2u);
}

// ---- Cancellation ------------------------------------------------------------------

TEST_F(BatchQueueTest, CancelSucceedsOnlyBeforeTheRequestStarts) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 0us));
  auto a = q.submit(input(0));
  auto b = q.submit(input(1));
  EXPECT_TRUE(a.cancel());
  EXPECT_FALSE(a.cancel()) << "already cancelled";
  EXPECT_EQ(a.status(), RequestStatus::kCancelled);
  EXPECT_EQ(q.metrics().depth, 1u) << "a cancelled request leaves the queue at once";
  EXPECT_EQ(q.step(), 1u);
  EXPECT_EQ(rows_.load(), 1) << "the cancelled request must not run";
  EXPECT_FALSE(b.cancel()) << "b has run";
  EXPECT_EQ(outcome_of(a), Outcome::kCancelled);
  expect_output(b, 1);
  EXPECT_EQ(q.metrics().cancelled, 1u);
}

TEST_F(BatchQueueTest, CancellingTheOldestRestartsMaxDelayFromTheNext) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 100us));
  auto a = q.submit(input(0));
  clock_->advance(60us);
  auto b = q.submit(input(1));
  EXPECT_TRUE(a.cancel());
  clock_->advance(40us);  // a would be ready now; b has waited only 40 us
  EXPECT_EQ(q.step(), 0u);
  clock_->advance(60us);
  EXPECT_EQ(q.step(), 1u);
  expect_output(b, 1);
}

// A submitter overtaken between its id and its push (held there by the
// test hook): its request goes to its id's place in the FIFO, ahead of the
// later ones, where cancel() finds it. Would catch a FIFO that appends in
// push order: cancel() looks a request up by id in a FIFO it assumes sorted,
// and would fail an internal check (or cancel the wrong request); and the
// batch would run b before a.
struct Overtaken {
  RequestHandle a, b, c;
};

// a (input 0) takes its id, then is held at its push while b (input 1) and
// c (input 2) are pushed and c is cancelled, which moves b into the FIFO;
// then a pushes.
Overtaken overtake(BatchQueue& q, const std::function<std::vector<float>(int)>& input) {
  Overtaken o;
  PushHold hold;
  std::thread held([&] {
    PushHold::hold_my_next();
    o.a = q.submit(input(0));
  });
  hold.wait_held();
  o.b = q.submit(input(1));
  o.c = q.submit(input(2));
  EXPECT_TRUE(o.c.cancel());
  hold.release();
  held.join();
  return o;
}

TEST_F(BatchQueueTest, ARequestOvertakenBeforeItsPushKeepsItsPlaceInTheQueue) {
  std::vector<uint64_t> order;  // ids completed, in order (manual mode: one thread)
  BatchQueueOptions o = manual(4, 0us);
  o.on_complete = [&](uint64_t id, RequestStatus) { order.push_back(id); };
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  auto [a, b, c] = overtake(q, [this](int i) { return input(i); });
  ASSERT_LT(a.id(), b.id());
  RequestHandle a2;
  std::thread other([&] { a2 = q.submit(input(3)); });  // id 4, ordinary
  other.join();
  EXPECT_EQ(q.step(), 3u) << "a, b and a2 in one batch";
  ASSERT_EQ(order.size(), 4u);
  EXPECT_EQ(order[0], c.id()) << "c was cancelled first";
  EXPECT_EQ(order[1], a.id()) << "a keeps its place ahead of b";
  EXPECT_EQ(order[2], b.id());
  EXPECT_EQ(order[3], a2.id());
  expect_output(a, 0);
  expect_output(b, 1);
  expect_output(a2, 3);
}

TEST_F(BatchQueueTest, CancellingARequestOvertakenBeforeItsPushFindsIt) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 0us));
  auto [a, b, c] = overtake(q, [this](int i) { return input(i); });
  EXPECT_TRUE(a.cancel()) << "a is queued, behind nothing but in front of b";
  EXPECT_EQ(q.step(), 1u);
  EXPECT_EQ(rows_.load(), 1) << "only b runs";
  EXPECT_EQ(outcome_of(a), Outcome::kCancelled);
  expect_output(b, 1);
}

// Note [Inbox walks outside the lock] (queue_core.h): step() (like a worker
// with a batch in flight) takes the inbox without the queue's lock and walks
// it before it puts the requests in the FIFO. Held in that window, its
// requests are queued but in neither place. A cancel() then must wait for
// them: without the wait it found nothing, returned false at once while the
// request was still queued, and the request ran.
TEST_F(BatchQueueTest, CancelFindsARequestAWorkerHasTakenFromTheInbox) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 100us));  // 1 of 4: not ready
  RequestHandle a = q.submit(input(0));
  RequestHandle b = q.submit(input(1));
  DetachHold hold;
  std::thread stepper([&] {
    DetachHold::hold_my_next();
    EXPECT_EQ(q.step(), 0u) << "b alone, before max_delay: not a batch yet";
  });
  hold.wait_held();  // a and b are taken from the inbox, not yet in the FIFO
  std::atomic<int> cancelled{-1};
  std::thread canceller([&] { cancelled = a.cancel() ? 1 : 0; });
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(cancelled.load(), -1) << "cancel() returned before the taken requests were put back";
  hold.release();
  stepper.join();
  canceller.join();
  EXPECT_EQ(cancelled.load(), 1);
  EXPECT_EQ(outcome_of(a), Outcome::kCancelled);
  clock_->advance(100us);
  EXPECT_EQ(q.step(), 1u);
  EXPECT_EQ(rows_.load(), 1) << "only b runs";
  expect_output(b, 1);
}

// Waits up to 10 s for `flag`; false if it never came.
bool eventually(const std::atomic<bool>& flag) {
  for (int i = 0; i < 1000 && !flag.load(); ++i) std::this_thread::sleep_for(10ms);
  return flag.load();
}

// Note [Cancel after the queue is gone] (queue_core.h): a cancel() that
// waits for a list a worker has taken from its queue's inbox holds that
// queue's lifetime lock while it waits. A cancel on another queue's handle
// must go on meanwhile: with one lock for every queue it waited until the
// first queue's worker let go (and so did every queue's destructor).
TEST_F(BatchQueueTest, ACancelWaitingOnOneQueueDoesNotHoldUpACancelOnAnother) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 100us));  // 1 of 4: not ready
  RequestHandle a = q.submit(input(0));
  // Another queue whose core's lifetime lock is not q's (1 in 64 is).
  std::vector<std::unique_ptr<BatchQueue>> others;
  RequestHandle c;
  while (!c.valid() || detail::QueueCore::lifetime_stripe_for_testing(c) ==
                           detail::QueueCore::lifetime_stripe_for_testing(a)) {
    others.push_back(
        std::make_unique<BatchQueue>(*device_, kIn, kOut, counted(), manual(4, 100us)));
    c = others.back()->submit(input(1));
  }
  DetachHold hold;
  std::thread stepper([&] {
    DetachHold::hold_my_next();
    EXPECT_EQ(q.step(), 0u);
  });
  hold.wait_held();  // a is taken from the inbox, not yet in the FIFO
  std::atomic<int> cancelled_a{-1};
  std::thread canceller([&] { cancelled_a = a.cancel() ? 1 : 0; });
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(cancelled_a.load(), -1) << "a's cancel() waits for the taken list";
  std::atomic<bool> cancelled_c{false};
  std::thread other([&] { cancelled_c = c.cancel(); });
  EXPECT_TRUE(eventually(cancelled_c)) << "a cancel on another queue waited for q's worker";
  hold.release();
  stepper.join();
  canceller.join();
  other.join();
  EXPECT_EQ(cancelled_a.load(), 1);
  EXPECT_EQ(outcome_of(a), Outcome::kCancelled);
  EXPECT_EQ(outcome_of(c), Outcome::kCancelled);
  EXPECT_EQ(rows_.load(), 0) << "nothing ran";
}

// The same window for shutdown(kCancel): the requests a worker has taken
// from the inbox are cancelled when it puts them back, never run. Without
// that they went into the FIFO after the shutdown had cancelled it, and ran.
TEST_F(BatchQueueTest, ShutdownCancelCancelsRequestsAWorkerHasTakenFromTheInbox) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 100us));
  RequestHandle a = q.submit(input(0));
  RequestHandle b = q.submit(input(1));
  DetachHold hold;
  std::thread stepper([&] {
    DetachHold::hold_my_next();
    EXPECT_EQ(q.step(), 0u);
  });
  hold.wait_held();
  std::thread stopper([&] { q.shutdown(ShutdownMode::kCancel); });
  std::this_thread::sleep_for(20ms);  // the shutdown has cancelled the (empty) FIFO
  hold.release();
  stepper.join();
  stopper.join();
  EXPECT_EQ(outcome_of(a), Outcome::kCancelled);
  EXPECT_EQ(outcome_of(b), Outcome::kCancelled);
  EXPECT_EQ(rows_.load(), 0) << "nothing ran";
  const auto m = q.metrics();
  EXPECT_EQ(m.cancelled, 2u);
  EXPECT_EQ(m.depth, 0u);
}

// Note [Batches straight from the inbox] (queue_core.h): step(), like a
// worker with a batch in flight, makes a ready batch of the list it took
// from the inbox without putting it in the FIFO when nothing else is
// queued. That batch is in id order even when a submitter was overtaken at
// its push (without the sort, b ran first), and max_depth counts its
// requests though they were never in the FIFO (without that, it read 0).
TEST_F(BatchQueueTest, ABatchTakenStraightFromTheInboxIsInIdOrder) {
  std::vector<uint64_t> order;  // ids completed, in order (manual mode: one thread)
  BatchQueueOptions o = manual(4, 0us);
  o.on_complete = [&](uint64_t id, RequestStatus) { order.push_back(id); };
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  RequestHandle a;
  {
    PushHold hold;
    std::thread held([&] {
      PushHold::hold_my_next();
      a = q.submit(input(0));
    });
    hold.wait_held();  // a has its id; b overtakes it
    RequestHandle b = q.submit(input(1));
    hold.release();
    held.join();
    ASSERT_LT(a.id(), b.id());
    EXPECT_EQ(q.step(), 2u);
    EXPECT_EQ(calls_.load(), 1) << "one batch";
    ASSERT_EQ(order.size(), 2u);
    EXPECT_EQ(order[0], a.id()) << "a keeps its place ahead of b";
    EXPECT_EQ(order[1], b.id());
    expect_output(a, 0);
    expect_output(b, 1);
  }
  const auto m = q.metrics();
  EXPECT_EQ(m.max_depth, 2u) << "both were queued at once";
  EXPECT_EQ(m.depth, 0u);
  EXPECT_EQ(m.completed, 2u);
}

// Note [Lists longer than a batch] (queue_core.h): step(), like a worker
// with a batch in flight, makes its batch of the oldest max_batch requests
// of a longer list without the FIFO and returns the rest to the inbox,
// where they stay queued, cancellable, and run in order in the next
// steps; a list of more than kSplitLists batches goes through the FIFO.
// Would catch: a long list sent to the FIFO (no straight batches: the
// sticky locked mode that collapsed max_batch 512 on the H100), the rest
// lost or run twice, a batch of the wrong requests (the newest, or out of
// id order), the rest not cancellable, or depth miscounted.
std::atomic<int> g_straight{0};
std::atomic<int> g_splits{0};
void count_straight() { g_straight.fetch_add(1); }
void count_split() { g_splits.fetch_add(1); }

TEST_F(BatchQueueTest, AListLongerThanABatchRunsItsOldestStraightAndKeepsTheRestQueued) {
  std::vector<uint64_t> order;  // ids that ran, in order (manual mode: one thread)
  BatchQueueOptions o = manual(4, 0us);
  o.on_complete = [&](uint64_t id, RequestStatus st) {
    if (st == RequestStatus::kCompleted) order.push_back(id);
  };
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  detail::set_took_direct_hook_for_testing(&count_straight);
  detail::set_split_list_hook_for_testing(&count_split);
  g_straight = 0;
  g_splits = 0;
  std::vector<RequestHandle> hs;
  submit_inputs(q, 0, 10, hs);
  EXPECT_EQ(q.step(), 4u);
  EXPECT_EQ(q.metrics().depth, 6u);
  submit_inputs(q, 10, 2, hs);  // behind the returned ones
  EXPECT_EQ(q.step(), 4u);
  EXPECT_EQ(g_splits.load(), 2) << "10 and then 8 requests: each list split";
  // Returned twice, still queued: a cancel finds it (and moves the inbox
  // into the FIFO, Note [Inbox walks outside the lock]).
  EXPECT_TRUE(hs[9].cancel());
  EXPECT_EQ(q.step(), 3u);
  EXPECT_EQ(q.step(), 0u);
  const int straight_short = g_straight.load();

  // 40 requests are more than kSplitLists (8) batches of 4: the FIFO.
  submit_inputs(q, 12, 40, hs);
  for (int k = 0; k < 10; ++k) EXPECT_EQ(q.step(), 4u);
  detail::set_took_direct_hook_for_testing(nullptr);
  detail::set_split_list_hook_for_testing(nullptr);
  EXPECT_EQ(straight_short, 2) << "the two split lists; the last 3 came from the FIFO";
  EXPECT_EQ(g_straight.load(), 2) << "the 40 went through the FIFO";
  EXPECT_EQ(g_splits.load(), 2);

  std::vector<uint64_t> expected;
  for (size_t i = 0; i < hs.size(); ++i)
    if (i != 9) expected.push_back(hs[i].id());
  EXPECT_EQ(order, expected) << "oldest first, each once, the cancelled one never";
  for (int i = 0; i < static_cast<int>(hs.size()); ++i) {
    if (i == 9) {
      EXPECT_EQ(outcome_of(hs[9]), Outcome::kCancelled);
    } else {
      expect_output(hs[static_cast<size_t>(i)], i);
    }
  }
  const auto m = q.metrics();
  EXPECT_EQ(m.depth, 0u);
  EXPECT_EQ(m.completed, 51u);
  EXPECT_EQ(m.cancelled, 1u);
}

// Note [Lists longer than a batch]: a shutdown(kCancel) closes the inbox
// while a step() returns the rest of a split list. The hook lets a request
// H in at the return's first try (which fails and links the rest's tail to
// H), then holds the second until the shutdown has taken H and closed the
// inbox. Would catch: the tail left linked to H (the splice that cancels
// the rest walks on into H, which the shutdown took: a crash, or H
// finished twice), or the rest lost or run.
BatchQueue* g_returning_queue = nullptr;
std::vector<float> g_late_input;
RequestHandle g_late;
std::thread g_shutter;
int g_return_tries = 0;
void on_return_try() {  // on the step()'s thread
  if (++g_return_tries == 1) {
    g_late = g_returning_queue->submit(g_late_input);
  } else if (g_return_tries == 2) {
    g_shutter = std::thread([] { g_returning_queue->shutdown(ShutdownMode::kCancel); });
    while (!g_returning_queue->is_shut_down()) std::this_thread::yield();
  }
}

TEST_F(BatchQueueTest, TheRestOfASplitListIsCancelledOnceWhenTheInboxClosesAsItReturns) {
  BatchQueueOptions o = manual(4, 0us);
  std::vector<std::atomic<int>> finished(16);  // by id
  o.on_complete = [&](uint64_t id, RequestStatus) {
    if (id < finished.size()) finished[id].fetch_add(1);
  };
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  std::vector<RequestHandle> hs;
  submit_inputs(q, 0, 10, hs);
  g_returning_queue = &q;
  g_late_input = input(10);
  g_return_tries = 0;
  detail::set_before_return_hook_for_testing(&on_return_try);
  EXPECT_EQ(q.step(), 4u) << "the oldest 4 ran";
  detail::set_before_return_hook_for_testing(nullptr);
  g_shutter.join();
  EXPECT_EQ(g_return_tries, 2);
  for (int i = 0; i < 4; ++i) expect_output(hs[static_cast<size_t>(i)], i);
  for (int i = 4; i < 10; ++i) {
    std::string msg;
    EXPECT_EQ(outcome_of(hs[static_cast<size_t>(i)], nullptr, &msg), Outcome::kCancelled) << i;
    EXPECT_NE(msg.find("shutdown"), std::string::npos) << msg;
  }
  ASSERT_TRUE(g_late.done());
  EXPECT_EQ(outcome_of(g_late), Outcome::kCancelled);
  for (uint64_t id = 1; id <= 11; ++id) EXPECT_EQ(finished[id].load(), 1) << "request " << id;
  const auto m = q.metrics();
  EXPECT_EQ(m.completed, 4u);
  EXPECT_EQ(m.cancelled, 7u);
  EXPECT_EQ(m.depth, 0u);
  g_late = RequestHandle();
  g_returning_queue = nullptr;
}

// Note [Lists longer than a batch]: a cancel() of a request in the rest of
// a list being split waits for the worker (the list is detached), and then
// finds the request back in the inbox. The cancel starts just before the
// rest's return. Would catch: detached_ lowered before the return (the
// cancel looks in an empty inbox and FIFO, says no, and the request runs),
// or a cancel that does not wait.
RequestHandle* g_to_cancel = nullptr;
std::thread g_canceller;
std::atomic<int> g_cancel_said{-1};
void cancel_while_split() {            // before the rest's return, on the step()'s thread
  if (g_canceller.joinable()) return;  // a later try
  g_canceller = std::thread([] { g_cancel_said = g_to_cancel->cancel() ? 1 : 0; });
  std::this_thread::sleep_for(30ms);
  EXPECT_EQ(g_cancel_said.load(), -1) << "cancel() must wait for the detached list";
}

TEST_F(BatchQueueTest, ACancelDuringASplitFindsTheRestBackInTheInbox) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 0us));
  std::vector<RequestHandle> hs;
  submit_inputs(q, 0, 10, hs);
  g_to_cancel = &hs[7];
  g_cancel_said = -1;
  detail::set_before_return_hook_for_testing(&cancel_while_split);
  EXPECT_EQ(q.step(), 4u);
  detail::set_before_return_hook_for_testing(nullptr);
  g_canceller.join();
  EXPECT_EQ(g_cancel_said.load(), 1) << "the request was queued all along";
  EXPECT_EQ(outcome_of(hs[7]), Outcome::kCancelled);
  EXPECT_EQ(q.step(), 4u);
  EXPECT_EQ(q.step(), 1u);
  for (int i = 0; i < 10; ++i)
    if (i != 7) expect_output(hs[static_cast<size_t>(i)], i);
  EXPECT_EQ(rows_.load(), 9) << "the cancelled request never ran";
  g_to_cancel = nullptr;
}

// Joins `blocked`, a thread blocked in q.submit() that sets `returned`
// once it returns; fails with `what` if that does not come within 10 s,
// and then ends the wait with a shutdown. True if it came.
bool join_when_woken(BatchQueue& q, const std::atomic<bool>& returned, std::thread& blocked,
                     const char* what) {
  const bool woke = eventually(returned);
  EXPECT_TRUE(woke) << what;
  if (!woke) q.shutdown(ShutdownMode::kCancel);  // wakes it, with ShutDown
  blocked.join();
  return woke;
}

// The room a batch taken straight from the inbox gives back must wake a
// kBlock submitter waiting for it: that batch takes no lock on its way, and
// without the wake-up the submitter (no deadline) waited for ever.
TEST_F(BatchQueueTest, RoomFromABatchTakenStraightFromTheInboxWakesABlockedSubmitter) {
  BatchQueue q(*device_, kIn, kOut, counted(), blocking(1));
  RequestHandle a, b;
  std::atomic<bool> returned{false};
  PushHold hold;
  std::thread holder([&] {
    PushHold::hold_my_next();
    a = q.submit(input(0));
  });
  hold.wait_held();  // a holds the room, and is not in the inbox yet
  std::thread blocked([&] {
    b = q.submit(input(1));
    returned = true;
  });
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(returned.load()) << "submit must block while the queue is full";
  hold.release();
  holder.join();  // a is in the inbox; the FIFO is empty
  EXPECT_EQ(q.step(), 1u) << "a, straight from the inbox";
  const bool woke = join_when_woken(q, returned, blocked,
                                    "the blocked submitter was not woken when a's room came back");
  expect_output(a, 0);
  if (woke) {
    EXPECT_EQ(q.step(), 1u);
    expect_output(b, 1);
  }
}

// Note [Room in one step]: a fast-path submit that finds the queue full has
// counted itself in queued_ until it gives that back. A kBlock submitter
// woken in that moment sees a full queue and sleeps on, and the room goes
// to the submit that gave its count back, on its slow path; when that
// request runs, the blocked submitter gets its turn. Nothing is lost: with
// the count not given back, f was refused (QueueFull in a queue that had
// room) and the blocked submitter waited for ever.
TEST_F(BatchQueueTest, ACountGivenBackByAFullFastPathLosesNoRoom) {
  BatchQueue q(*device_, kIn, kOut, counted(), blocking(1));
  RequestHandle a = q.submit(input(0));  // the queue is full
  RequestHandle f, b;
  std::atomic<bool> returned{false}, f_returned{false};
  RoomRefusedHold hold;
  std::thread refused([&] {
    RoomRefusedHold::hold_my_next();
    f = q.submit(input(2));
    f_returned = true;
  });
  hold.wait_held();  // f's count is in queued_: 2 of capacity 1
  std::thread blocked([&] {
    b = q.submit(input(1));
    returned = true;
  });
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(returned.load()) << "submit must block while the queue is full";
  EXPECT_EQ(q.step(), 1u) << "a";  // its room is made while f's count is still in
  expect_output(a, 0);
  hold.release();
  if (!eventually(f_returned)) {
    ADD_FAILURE() << "f did not get the room a left";
    q.shutdown(ShutdownMode::kCancel);  // wakes both, with ShutDown
    refused.join();
    blocked.join();
    return;
  }
  refused.join();  // f took the room on its slow path
  EXPECT_EQ(f.status(), RequestStatus::kQueued);
  EXPECT_EQ(q.step(), 1u) << "f";
  expect_output(f, 2);
  const bool woke = join_when_woken(q, returned, blocked,
                                    "the blocked submitter was not woken when f's room came back");
  if (woke) {
    EXPECT_EQ(q.step(), 1u);
    expect_output(b, 1);
  }
  const auto m = q.metrics();
  EXPECT_EQ(m.rejected, 0u);
  EXPECT_LE(m.max_depth, 1u);
}

// ---- Batched equals unbatched ------------------------------------------------------

TEST_F(BatchQueueTest, BatchedOutputsEqualUnbatchedOnesRequestByRequest) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(8, 0us));
  const int n = 19;  // batches of 8, 8, 3
  std::vector<RequestHandle> hs;
  submit_inputs(q, 0, n, hs);
  while (q.step() > 0) {
  }
  EXPECT_EQ(calls_.load(), 3);
  Stream s = device_->streams().acquire_round_robin();
  int exact = 0;
  for (int i = 0; i < n; ++i) {
    std::vector<float> y;
    ASSERT_EQ(outcome_of(hs[static_cast<size_t>(i)], &y), Outcome::kCompleted);
    auto ref = model_->unbatched(s, input(i));
    ASSERT_EQ(y.size(), ref.size());
    double worst = 0;
    for (size_t k = 0; k < y.size(); ++k)
      worst = std::max(
          worst, static_cast<double>(std::abs(y[k] - ref[k])) / std::max(1.0f, std::abs(ref[k])));
    EXPECT_LT(worst, 1e-5) << "request " << i << " differs from its unbatched run";
    exact += y == ref;
    // Rows must not be swapped: each is far from its neighbour's reference.
    if (i > 0) {
      EXPECT_GT(max_rel_error(y, model_->host_reference(input(i - 1))), 1e-3);
    }
  }
  std::printf("bit-exact vs unbatched: %d of %d\n", exact, n);
}

TEST_F(BatchQueueTest, SeedMlpBatchedEqualsUnbatched) {
  const nn::MlpWeights w = nn::MlpWeights::seed();
  Stream up = device_->default_stream();
  const nn::Mlp mlp(w, DType::kF32, up);
  auto o = manual(16, 0us);
  BatchQueue q(
      *device_, mlp.in_features(), mlp.out_features(),
      [&mlp](const Stream& s, const Tensor& x) { return mlp.forward(s, x); }, o);
  const int n = 20;
  std::vector<std::vector<float>> xs;
  std::vector<RequestHandle> hs;
  for (int i = 0; i < n; ++i) {
    xs.push_back(nn::random_uniform(static_cast<size_t>(mlp.in_features()), 100 + i));
    hs.push_back(q.submit(xs.back()));
  }
  EXPECT_EQ(q.step(), 16u);
  EXPECT_EQ(q.step(), 4u);
  const int exact = expect_matches_unbatched(mlp, xs, hs);
  std::printf("seed MLP bit-exact vs unbatched: %d of %d\n", exact, n);
}

// One copy in, one forward, one copy out per batch: the stream's kernel
// count grows by 2 + the model's kernels, whatever the batch size.
TEST_F(BatchQueueTest, ABatchIsOneCopyInOneForwardOneCopyOut) {
  Stream probe = device_->streams().acquire_round_robin();
  probe.synchronize();
  const uint64_t before = probe.kernels_encoded();
  Tensor x = Tensor::empty({1, kIn}, DType::kF32, probe);
  (void)(*model_)(probe, x);
  probe.synchronize();
  const uint64_t model_kernels = probe.kernels_encoded() - before;
  ASSERT_GE(model_kernels, 1u);

  BatchQueue q(*device_, kIn, kOut, counted(), manual(8, 0us));
  Stream s = q.streams().at(0);
  std::vector<RequestHandle> hs;
  submit_inputs(q, 0, 8, hs);
  const uint64_t k0 = s.kernels_encoded();
  EXPECT_EQ(q.step(), 8u);
  EXPECT_EQ(s.kernels_encoded() - k0, 2 + model_kernels);
  EXPECT_EQ(calls_.load(), 1);
  for (int i = 0; i < 8; ++i) expect_output(hs[static_cast<size_t>(i)], i);
}

// ---- Recorded batches (Note [Recorded batches]) --------------------------------------

// Would catch: a replay computing on stale staging, padding rows leaking
// into results, a wrong size bucket, or the model being called per batch
// (it must run only to warm up and record each size once).
TEST_F(BatchQueueTest, RecordedBatchesEqualUnbatchedOnesAtEverySize) {
  auto o = manual(8, 0us);
  o.record_batches = true;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  Stream s = q.streams().at(0);
  int next = 0;
  // Sizes 1, 2, 3 (as 4), 5 (as 8), 8, then 3 and 1 again: replays only.
  for (int size : {1, 2, 3, 5, 8, 3, 1, 7}) {
    std::vector<RequestHandle> hs;
    const int first = next;
    submit_inputs(q, first, size, hs);
    next += size;
    const int calls_before = calls_.load();
    const uint64_t k0 = s.kernels_encoded();
    EXPECT_EQ(q.step(), static_cast<size_t>(size));
    if (size == 3 || size == 1 || size == 7) {
      if (calls_before >= 8) {  // every size bucket was recorded already
        EXPECT_EQ(calls_.load(), calls_before) << "the model ran for a recorded size " << size;
        EXPECT_GE(s.kernels_encoded() - k0, 3u);  // the replay counts its kernels
      }
    }
    for (int i = 0; i < size; ++i) expect_output(hs[static_cast<size_t>(i)], first + i);
  }
  // Buckets 1, 2, 4, 8: each run once eagerly and once to record.
  EXPECT_EQ(calls_.load(), 8);
  EXPECT_EQ(q.metrics().completed, static_cast<uint64_t>(next));
}

// Note [Recorded sizes]. Would catch: a size below its batch (rows cut
// off), padding past 1 + 1/steps above 64 rows (the device's work wasted), a gap
// or a repeat in the indices (slot.recorded is sized by the last one and
// indexed by them), two sizes under one index (a replay of the wrong size),
// or a size past max_batch (the staging holds max_batch rows).
TEST(RecordedSizes, AreTightContiguousAndEndAtMaxBatch) {
  using flotilla::serve::detail::size_bucket;
  EXPECT_EQ(size_bucket(1, 1024), (std::pair<size_t, int64_t>{0, 1}));
  EXPECT_EQ(size_bucket(3, 1024), (std::pair<size_t, int64_t>{2, 4}));
  EXPECT_EQ(size_bucket(64, 1024), (std::pair<size_t, int64_t>{6, 64}));
  EXPECT_EQ(size_bucket(65, 1024), (std::pair<size_t, int64_t>{7, 80}));
  EXPECT_EQ(size_bucket(128, 1024), (std::pair<size_t, int64_t>{10, 128}));
  EXPECT_EQ(size_bucket(129, 1024), (std::pair<size_t, int64_t>{11, 160}));
  EXPECT_EQ(size_bucket(185, 1024), (std::pair<size_t, int64_t>{12, 192}));
  EXPECT_EQ(size_bucket(297, 1024), (std::pair<size_t, int64_t>{15, 320}));
  EXPECT_EQ(size_bucket(1024, 1024), (std::pair<size_t, int64_t>{22, 1024}));
  // Eight steps: 72, 80, ..., 128, 144, ..., 256, 288, ...; one: the powers of two.
  EXPECT_EQ(size_bucket(65, 1024, 8), (std::pair<size_t, int64_t>{7, 72}));
  EXPECT_EQ(size_bucket(185, 1024, 8), (std::pair<size_t, int64_t>{18, 192}));
  EXPECT_EQ(size_bucket(297, 1024, 8), (std::pair<size_t, int64_t>{24, 320}));
  EXPECT_EQ(size_bucket(257, 1024, 8), (std::pair<size_t, int64_t>{23, 288}));
  EXPECT_EQ(size_bucket(1024, 1024, 8), (std::pair<size_t, int64_t>{38, 1024}));
  EXPECT_EQ(size_bucket(297, 1024, 1), (std::pair<size_t, int64_t>{9, 512}));
  EXPECT_EQ(size_bucket(1024, 1024, 1), (std::pair<size_t, int64_t>{10, 1024}));
  for (int64_t steps : {1, 2, 4, 8, 64}) {
    for (int64_t max_batch : {1, 5, 64, 65, 100, 300, 1000, 1024, 4096}) {
      size_t last_index = 0;
      int64_t last_rows = 0;
      for (int64_t n = 1; n <= max_batch; ++n) {
        const auto [index, rows] = size_bucket(n, max_batch, steps);
        ASSERT_GE(rows, n) << "n=" << n << " max_batch=" << max_batch << " steps=" << steps;
        ASSERT_LE(rows, max_batch) << "n=" << n << " steps=" << steps;
        if (n > 64) {
          ASSERT_LE(rows * steps, n * (steps + 1))
              << "n=" << n << " padded to " << rows << " steps=" << steps;
        }
        if (n > 1) {
          ASSERT_TRUE(index == last_index || index == last_index + 1)
              << "n=" << n << " index " << index << " after " << last_index << " steps=" << steps;
          ASSERT_EQ(index == last_index, rows == last_rows) << "n=" << n << " steps=" << steps;
        } else {
          ASSERT_EQ(index, 0u);
        }
        last_index = index;
        last_rows = rows;
      }
      EXPECT_EQ(last_rows, max_batch);
      EXPECT_EQ(size_bucket(max_batch, max_batch, steps).first, last_index);
    }
  }
}

// Note [Recorded sizes] in a queue: batches above 64 rows run padded to the
// next of four sizes an octave, each recorded once. Would catch: a batch
// run at a power of two (the model sees 128 rows for 65, here capped at max_batch, 100), a size
// recorded twice, or a wrong row in a padded batch.
TEST_F(BatchQueueTest, RecordedBatchesAbove64RowsRunAtTheNextQuarterOctave) {
  auto o = manual(100, 0us);
  o.record_batches = true;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  int next = 0;
  // 65 (as 80, recorded), 80 (replayed), 81 (as 96, recorded), 100 (as 100,
  // max_batch, recorded), 70 (replayed as 80).
  const std::pair<int, int64_t> runs[] = {{65, 80}, {80, 80}, {81, 96}, {100, 100}, {70, 80}};
  for (const auto& [size, padded] : runs) {
    std::vector<RequestHandle> hs;
    const int first = next;
    submit_inputs(q, first, size, hs);
    next += size;
    const int calls_before = calls_.load();
    const int64_t rows_before = rows_.load();
    EXPECT_EQ(q.step(), static_cast<size_t>(size));
    const int calls = calls_.load() - calls_before;
    if (calls != 0) {  // a new size: run once eagerly and once to record, both padded
      EXPECT_EQ(calls, 2) << "size " << size;
      EXPECT_EQ(rows_.load() - rows_before, 2 * padded) << "size " << size;
    }
    for (int i = 0; i < size; ++i) expect_output(hs[static_cast<size_t>(i)], first + i);
  }
  EXPECT_EQ(calls_.load(), 6) << "80, 96 and 100 recorded once each";
  EXPECT_EQ(rows_.load(), 2 * (80 + 96 + 100));
}

// BatchQueueOptions::record_steps reaches the sizes. Would catch: the
// option ignored (65 rows would run as 80 with the default four steps) or
// the slot's recordings sized for the default (eight steps have more sizes:
// the last, 200, would index past them).
TEST_F(BatchQueueTest, RecordStepsSetsTheSizesAbove64Rows) {
  auto o = manual(200, 0us);
  o.record_batches = true;
  o.record_steps = 8;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  int next = 0;
  // 65 as 72, 73 as 80, 190 as 192, 200 (max_batch): each recorded once.
  for (const int size : {65, 73, 190, 200}) {
    std::vector<RequestHandle> hs;
    const int first = next;
    submit_inputs(q, first, size, hs);
    next += size;
    EXPECT_EQ(q.step(), static_cast<size_t>(size));
    for (int i = 0; i < size; ++i) expect_output(hs[static_cast<size_t>(i)], first + i);
  }
  EXPECT_EQ(calls_.load(), 8);
  EXPECT_EQ(rows_.load(), 2 * (72 + 80 + 192 + 200));

  o.record_steps = 3;
  try {
    BatchQueue bad(*device_, kIn, kOut, counted(), o);
    ADD_FAILURE() << "record_steps 3 was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("record_steps is 3"), std::string::npos) << e.what();
  }
}

// Would catch: a failed recording that poisons its slot or its size.
TEST_F(BatchQueueTest, ARecordingThatFailsFailsOnlyItsBatchAndIsTriedAgain) {
  auto o = manual(2, 0us);
  o.record_batches = true;
  std::atomic<int> calls{0};
  BatchQueue q(
      *device_, kIn, kOut,
      [&](const Stream& st, const Tensor& x) {
        if (calls.fetch_add(1) == 1) throw InvalidState("[test model] fails while recording");
        return (*model_)(st, x);
      },
      o);
  auto a = q.submit(input(0));
  auto b = q.submit(input(1));
  EXPECT_EQ(q.step(), 2u);  // warm-up (call 0), recording (call 1) throws
  std::string msg;
  EXPECT_EQ(outcome_of(a, nullptr, &msg), Outcome::kFailed);
  EXPECT_NE(msg.find("fails while recording"), std::string::npos) << msg;
  EXPECT_EQ(outcome_of(b), Outcome::kFailed);
  auto c = q.submit(input(2));
  auto d = q.submit(input(3));
  EXPECT_EQ(q.step(), 2u);  // records again (calls 2, 3)
  expect_output(c, 2);
  expect_output(d, 3);
  auto e = q.submit(input(4));
  auto f = q.submit(input(5));
  EXPECT_EQ(q.step(), 2u);  // replays
  EXPECT_EQ(calls.load(), 4);
  expect_output(e, 4);
  expect_output(f, 5);
  EXPECT_EQ(device_->allocator().stats().held_bytes > 0, true);
}

TEST_F(BatchQueueTest, SeedMlpRecordedBatchesEqualUnbatched) {
  const nn::MlpWeights w = nn::MlpWeights::seed();
  Stream up = device_->default_stream();
  const nn::Mlp mlp(w, DType::kF32, up);
  auto o = manual(16, 0us);
  o.record_batches = true;
  BatchQueue q(
      *device_, mlp.in_features(), mlp.out_features(),
      [&mlp](const Stream& s, const Tensor& x) { return mlp.forward(s, x); }, o);
  const int n = 16 + 5 + 16;
  std::vector<std::vector<float>> xs;
  std::vector<RequestHandle> hs;
  for (int i = 0; i < n; ++i) {
    xs.push_back(nn::random_uniform(static_cast<size_t>(mlp.in_features()), 300 + i));
    hs.push_back(q.submit(xs.back()));
  }
  EXPECT_EQ(q.step(), 16u);
  EXPECT_EQ(q.step(), 16u);  // a replay
  EXPECT_EQ(q.step(), 5u);   // padded to 8
  expect_matches_unbatched(mlp, xs, hs);
}

// Would catch: workers sharing recordings or staging, or a recording racing
// another worker's batches (each worker records on its own stream).
TEST_F(BatchQueueTest, RecordedBatchesWithWorkerThreadsAreCorrect) {
  BatchQueueOptions o;
  o.workers = 3;
  o.max_batch = 8;
  o.record_batches = true;
  BatchQueue q(*device_, kIn, kOut, model_->model(), o);
  const int clients = 4, per = scaled(150, 20);
  std::atomic<int> wrong{0};
  std::vector<std::thread> ts;
  for (int c = 0; c < clients; ++c)
    ts.emplace_back([&, c] {
      std::vector<RequestHandle> hs;
      std::vector<int> ids;
      for (int i = 0; i < per; ++i) {
        const int id = c * per + i;
        hs.push_back(q.submit(input(id)));
        ids.push_back(id);
        if (hs.size() == 4 || i + 1 == per) {
          for (size_t k = 0; k < hs.size(); ++k) {
            std::vector<float> y;
            if (outcome_of(hs[k], &y) != Outcome::kCompleted ||
                max_rel_error(y, model_->host_reference(input(ids[k]))) > 1e-5)
              wrong.fetch_add(1);
          }
          hs.clear();
          ids.clear();
        }
      }
    });
  for (auto& t : ts) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(q.metrics().completed, static_cast<uint64_t>(clients * per));
}

// ---- Bad input -----------------------------------------------------------------------

TEST_F(BatchQueueTest, BadInputIsRefusedAtSubmitAndNeverPoisonsABatch) {
  auto o = manual(4, 0us);
  o.reject_nan = true;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  std::vector<float> short_input(kIn - 1, 0.5f);
  try {
    q.submit(short_input);
    FAIL() << "a short input was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("[BatchQueue::submit]"), std::string::npos) << e.what();
  }
  auto nan_input = input(0);
  nan_input[3] = std::nanf("");
  EXPECT_THROW(q.submit(nan_input), InvalidArgument);
  EXPECT_THROW(q.submit(std::vector<float>(kIn + 1, 0.f)), InvalidArgument);
  // A borrowed input is checked the same way.
  EXPECT_THROW(q.submit(BorrowedInput(short_input)), InvalidArgument);
  EXPECT_THROW(
      q.submit(BorrowedInput(nan_input),
               [](const Completion&) { ADD_FAILURE() << "the callback of a refused input ran"; }),
      InvalidArgument);
  auto good = q.submit(input(1));
  EXPECT_EQ(q.step(), 1u);
  expect_output(good, 1);
  auto m = q.metrics();
  EXPECT_EQ(m.invalid, 5u);
  EXPECT_EQ(m.submitted, 1u);
  EXPECT_EQ(rows_.load(), 1);
}

TEST_F(BatchQueueTest, WithoutRejectNanANanRowStaysInItsOwnRow) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 0us));
  auto nan_input = input(0);
  nan_input[0] = std::nanf("");
  auto a = q.submit(nan_input);
  auto b = q.submit(input(1));
  EXPECT_EQ(q.step(), 2u);
  std::vector<float> ya;
  ASSERT_EQ(outcome_of(a, &ya), Outcome::kCompleted);
  EXPECT_TRUE(std::isnan(ya[0]));
  expect_output(b, 1);
}

// ---- Failing batches ---------------------------------------------------------------

// The model reads its input (synchronizing) and fails on a marked row, by
// throwing on the host or by a kernel that fails on the device.
BatchQueue::Model failing_model(const TinyModel& m, bool on_device) {
  return [&m, on_device](const Stream& s, const Tensor& x) {
    auto v = x.to_host(s);
    for (int64_t r = 0; r < x.dim(0); ++r) {
      if (v[static_cast<size_t>(r * x.dim(1))] == 1000.f) {
        if (!on_device) throw InvalidState("[test model] marked row");
        Stream(s).dispatch("trap", backend::KernelArgs());
      }
    }
    return m(s, x);
  };
}

TEST_F(BatchQueueTest, ABatchThatFailsOnTheHostFailsOnlyItsOwnRequests) {
  BatchQueue q(*device_, kIn, kOut, failing_model(*model_, false), manual(2, 0us));
  auto bad = input(0);
  bad[0] = 1000.f;
  auto a = q.submit(bad);
  auto b = q.submit(input(1));  // same batch as a
  auto c = q.submit(input(2));
  auto d = q.submit(input(3));
  EXPECT_EQ(q.step(), 2u);
  EXPECT_EQ(q.step(), 2u);
  std::string msg;
  EXPECT_EQ(outcome_of(a, nullptr, &msg), Outcome::kFailed);
  EXPECT_NE(msg.find("marked row"), std::string::npos) << msg;
  EXPECT_EQ(outcome_of(b), Outcome::kFailed);
  EXPECT_EQ(b.status(), RequestStatus::kFailed);
  expect_output(c, 2);
  expect_output(d, 3);
  auto m = q.metrics();
  EXPECT_EQ(m.failed, 2u);
  EXPECT_EQ(m.completed, 2u);
}

TEST_F(BatchQueueTest, ABatchThatFailsOnTheDeviceFailsOnlyItsOwnRequests) {
  BatchQueue q(*device_, kIn, kOut, failing_model(*model_, true), manual(2, 0us));
  auto bad = input(0);
  bad[0] = 1000.f;
  auto c = q.submit(input(2));
  auto a = q.submit(bad);
  auto d = q.submit(input(3));
  auto e = q.submit(input(4));
  EXPECT_EQ(q.step(), 2u);
  EXPECT_EQ(q.step(), 2u);
  std::string msg;
  EXPECT_EQ(outcome_of(c, nullptr, &msg), Outcome::kFailed);
  EXPECT_NE(msg.find("trap"), std::string::npos) << msg;
  EXPECT_EQ(outcome_of(a), Outcome::kFailed);
  expect_output(d, 3);  // the next batch on the same stream is clean
  expect_output(e, 4);
}

// ---- Pipelined lanes (pipeline_depth) ------------------------------------------------

// Polls `pred` for up to 20 s of real time.
bool eventually_true(const std::function<bool()>& pred) {
  const auto end = std::chrono::steady_clock::now() + 20s;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(1ms);
  }
  return pred();
}

// A model whose first call leaves its batch held on the stream until open():
// a completion callback blocks a cpu execution thread, so nothing after it on
// that stream (the output copy, the fence) runs before. The first call also
// returns only after release_first_call(), so the test can queue more
// requests while the worker is still launching its first batch.
struct GatedFirstBatch {
  std::shared_ptr<std::latch> gate = std::make_shared<std::latch>(1);
  std::latch first_call_may_return{1};
  std::atomic<int> calls{0};
  std::atomic<bool> opened{false}, released{false};
  ~GatedFirstBatch() {
    release_first_call();
    open();
  }
  void open() {
    if (!opened.exchange(true)) gate->count_down();
  }
  void release_first_call() {
    if (!released.exchange(true)) first_call_may_return.count_down();
  }
  BatchQueue::Model model(const TinyModel& m) {
    return [this, &m](const Stream& s, const Tensor& x) {
      Tensor y = m(s, x);
      if (calls.fetch_add(1) == 0) {
        Stream held = s;
        held.add_callback([g = gate] { g->wait(); });
        first_call_may_return.wait();
      }
      return y;
    };
  }
};

// Requests queued while a worker launches a batch go out as the next batch
// before the first completes (pipeline_depth 2), or only after it (1).
TEST_F(BatchQueueTest, APipelinedWorkerLaunchesTheNextBatchBeforeTheFirstCompletes) {
  auto o = one_worker(2);
  GatedFirstBatch g;
  BatchQueue q(*device_, kIn, kOut, g.model(*model_), o);
  auto a = q.submit(input(0));
  auto b = q.submit(input(1));
  ASSERT_TRUE(eventually_true([&] { return g.calls.load() == 1; }));
  auto c = q.submit(input(2));
  auto d = q.submit(input(3));
  g.release_first_call();
  EXPECT_TRUE(eventually_true([&] { return g.calls.load() == 2; }))
      << "the worker did not launch the second batch while the first was in flight";
  EXPECT_FALSE(a.done()) << "the first batch completed while its stream was held";
  EXPECT_FALSE(c.done()) << "the second batch completed before the first";
  g.open();
  expect_output(a, 0);
  expect_output(b, 1);
  expect_output(c, 2);
  expect_output(d, 3);
  // a may have gone out alone (max_delay 0, before b arrived): 2 or 3 batches.
  EXPECT_GE(q.metrics().batches, 2u);
}

TEST_F(BatchQueueTest, DepthOneWaitsForEachBatchBeforeTheNext) {
  auto o = one_worker(1);
  GatedFirstBatch g;
  BatchQueue q(*device_, kIn, kOut, g.model(*model_), o);
  auto a = q.submit(input(0));
  auto b = q.submit(input(1));
  ASSERT_TRUE(eventually_true([&] { return g.calls.load() == 1; }));
  auto c = q.submit(input(2));
  g.release_first_call();
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(g.calls.load(), 1) << "depth 1 launched a batch while one was in flight";
  EXPECT_EQ(c.status(), RequestStatus::kQueued);
  g.open();
  expect_output(a, 0);
  expect_output(b, 1);
  expect_output(c, 2);
}

TEST_F(BatchQueueTest, APipelinedBatchThatFailsOnTheDeviceFailsOnlyItsOwnRequests) {
  auto o = one_worker(3);
  GatedFirstBatch g;  // holds the stream while the next batches are launched behind it
  std::atomic<int> failing_calls{0};
  BatchQueue::Model failing = failing_model(*model_, true);
  BatchQueue::Model gated = g.model(*model_);
  BatchQueue q(
      *device_, kIn, kOut,
      [&](const Stream& s, const Tensor& x) {
        // The first batch is held, the second may fail, the third is plain:
        // the failing model synchronizes to read its input, which would hand
        // it the error of the batch before (Stream::synchronize's rule).
        const int n = failing_calls.load();
        if (g.calls.load() == 0) return gated(s, x);
        failing_calls.fetch_add(1);
        return n == 0 ? failing(s, x) : (*model_)(s, x);
      },
      o);
  auto bad = input(3);
  bad[0] = 1000.f;  // the failing model traps on the device for this row
  auto a = q.submit(input(0));
  ASSERT_TRUE(eventually_true([&] { return g.calls.load() == 1; }));
  auto b = q.submit(input(1));
  auto c = q.submit(bad);
  auto d = q.submit(input(4));
  auto e = q.submit(input(5));
  g.release_first_call();
  std::this_thread::sleep_for(20ms);
  g.open();
  expect_output(a, 0);
  std::string msg;
  EXPECT_EQ(outcome_of(b, nullptr, &msg), Outcome::kFailed) << "b shares c's batch";
  EXPECT_NE(msg.find("trap"), std::string::npos) << msg;
  EXPECT_EQ(outcome_of(c), Outcome::kFailed);
  expect_output(d, 4);  // launched behind the failed batch, on the same stream
  expect_output(e, 5);
}

TEST_F(BatchQueueTest, AModelReturningTheWrongShapeFailsItsBatch) {
  auto wrong = [this](const Stream& s, const Tensor& x) { return (*model_)(s, x).reshape({-1}); };
  BatchQueue q(*device_, kIn, kOut, wrong, manual(2, 0us));
  auto a = q.submit(input(0));
  EXPECT_EQ(q.step(), 1u);
  std::string msg;
  EXPECT_EQ(outcome_of(a, nullptr, &msg), Outcome::kFailed);
  EXPECT_NE(msg.find("must return f32[1, 8]"), std::string::npos) << msg;
}

// ---- Capacity ------------------------------------------------------------------------

TEST_F(BatchQueueTest, RejectPolicyCompletesTheOverflowWithQueueFull) {
  auto o = manual(2, 0us);
  o.capacity = 3;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  std::vector<RequestHandle> hs;
  submit_inputs(q, 0, 5, hs);
  EXPECT_EQ(hs[3].status(), RequestStatus::kRejected);
  EXPECT_EQ(outcome_of(hs[4]), Outcome::kQueueFull);
  EXPECT_EQ(q.metrics().depth, 3u);
  while (q.step() > 0) {
  }
  for (int i = 0; i < 3; ++i) expect_output(hs[static_cast<size_t>(i)], i);
  auto m = q.metrics();
  EXPECT_EQ(m.rejected, 2u);
  EXPECT_EQ(m.max_depth, 3u);
}

TEST_F(BatchQueueTest, BlockPolicyWaitsUntilTheDeadlineThenTimesOut) {
  BatchQueue q(*device_, kIn, kOut, counted(), blocking(2));
  auto a = q.submit(input(0));
  auto b = q.submit(input(1));
  RequestHandle blocked;
  std::atomic<bool> returned{false};           // relaxed is enough: read after join or as a hint
  const auto deadline = q.deadline_in(100us);  // taken before the clock can move
  std::thread t([&] {
    blocked = q.submit(input(2), deadline);
    returned = true;
  });
  std::this_thread::sleep_for(30ms);
  EXPECT_FALSE(returned.load()) << "submit must block while the queue is full";
  clock_->advance(100us);
  t.join();
  EXPECT_EQ(outcome_of(blocked), Outcome::kTimeout);
  EXPECT_EQ(q.metrics().max_depth, 2u);
  EXPECT_EQ(q.step(), 2u);
  expect_output(a, 0);
  expect_output(b, 1);
}

TEST_F(BatchQueueTest, BlockPolicyGetsRoomWhenABatchIsPicked) {
  BatchQueue q(*device_, kIn, kOut, counted(), blocking(2));
  auto a = q.submit(input(0));
  auto b = q.submit(input(1));
  RequestHandle c;
  std::thread t([&] { c = q.submit(input(2)); });
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(q.step(), 2u);
  t.join();
  EXPECT_EQ(c.status(), RequestStatus::kQueued);
  EXPECT_EQ(q.step(), 1u);
  expect_output(c, 2);
  EXPECT_LE(q.metrics().max_depth, 2u);
}

TEST_F(BatchQueueTest, BlockedSubmitterGetsShutDownWhenTheQueueStops) {
  BatchQueue q(*device_, kIn, kOut, counted(), blocking(1));
  auto a = q.submit(input(0));
  RequestHandle c;
  std::thread t([&] { c = q.submit(input(1)); });
  std::this_thread::sleep_for(20ms);
  q.shutdown(ShutdownMode::kDrain);
  t.join();
  expect_output(a, 0);
  EXPECT_EQ(outcome_of(c), Outcome::kShutDown);
}

// ---- Group submits (submit_all, Note [Group submits] in queue_core.h) -----------------

// Inputs input(first) .. input(first + count - 1), and spans of them.
struct Group {
  std::vector<std::vector<float>> values;
  std::vector<std::span<const float>> spans;
  std::vector<BorrowedInput> borrowed;
};
Group group_of(const std::function<std::vector<float>(int)>& input, int first, int count) {
  Group g;
  for (int i = first; i < first + count; ++i) g.values.push_back(input(i));
  for (const auto& v : g.values) {
    g.spans.emplace_back(v);
    g.borrowed.emplace_back(std::span<const float>(v));
  }
  return g;
}

TEST_F(BatchQueueTest, AGroupSubmitQueuesEachRequestInOrderWithConsecutiveIds) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(8, 0us));
  const Group g = group_of([this](int i) { return input(i); }, 1, 11);
  auto before = q.submit(input(0));
  auto group = q.submit_all(g.spans);
  auto after = q.submit(input(12));
  ASSERT_EQ(group.size(), 11u);
  for (size_t i = 0; i < group.size(); ++i) {
    EXPECT_EQ(group[i].id(), before.id() + 1 + i) << "ids are consecutive, in the group's order";
    EXPECT_EQ(group[i].status(), RequestStatus::kQueued);
  }
  EXPECT_EQ(after.id(), before.id() + 12);
  EXPECT_EQ(q.metrics().depth, 13u);
  EXPECT_EQ(q.step(), 8u);
  EXPECT_EQ(q.step(), 5u);
  EXPECT_EQ(calls_.load(), 2) << "the group's requests share batches with the others";
  expect_output(before, 0);
  for (size_t i = 0; i < group.size(); ++i) expect_output(group[i], static_cast<int>(i) + 1);
  expect_output(after, 12);
  // An empty group queues nothing.
  EXPECT_TRUE(q.submit_all(std::span<const std::span<const float>>{}).empty());
  const auto m = q.metrics();
  EXPECT_EQ(m.submitted, 13u);
  EXPECT_EQ(m.completed, 13u);
}

TEST_F(BatchQueueTest, AGroupOfBorrowedInputsAndInputBufferRowsRunsEachInPlace) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(8, 0us));
  const Group g = group_of([this](int i) { return input(i); }, 0, 3);
  InputBuffer rows = q.make_input_buffer(3);
  for (int i = 0; i < 3; ++i) {
    const auto x = input(3 + i);
    std::copy(x.begin(), x.end(), rows.row(static_cast<size_t>(i)).begin());
  }
  std::vector<BorrowedInput> mixed = g.borrowed;
  for (size_t i = 0; i < 3; ++i) mixed.push_back(rows.input(i));
  auto hs = q.submit_all(mixed);
  ASSERT_EQ(hs.size(), 6u);
  EXPECT_EQ(q.step(), 6u);
  for (size_t i = 0; i < hs.size(); ++i) expect_output(hs[i], static_cast<int>(i));
}

TEST_F(BatchQueueTest, AGroupWithABadInputQueuesNoneOfIt) {
  auto o = manual(4, 0us);
  o.reject_nan = true;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  Group g = group_of([this](int i) { return input(i); }, 0, 3);
  g.values[1][2] = std::nanf("");
  try {
    q.submit_all(g.spans);
    FAIL() << "a group holding a NaN input was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("NaN"), std::string::npos) << e.what();
  }
  std::vector<float> short_input(kIn - 1, 0.5f);
  g.borrowed[2] = BorrowedInput(short_input);
  EXPECT_THROW(q.submit_all(g.borrowed), InvalidArgument);
  auto m = q.metrics();
  EXPECT_EQ(m.submitted, 0u) << "a request of a refused group was queued";
  EXPECT_EQ(m.depth, 0u);
  EXPECT_EQ(m.invalid, 2u);
  EXPECT_EQ(q.step(), 0u);
  auto good = q.submit(input(5));
  EXPECT_EQ(good.id(), 1u) << "a refused group took ids";
  EXPECT_EQ(q.step(), 1u);
  expect_output(good, 5);
}

TEST_F(BatchQueueTest, AGroupLargerThanTheRoomLeftIsSubmittedOneByOne) {
  auto o = manual(4, 0us);
  o.capacity = 3;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  auto a = q.submit(input(0));
  const Group g = group_of([this](int i) { return input(i); }, 1, 4);
  auto hs = q.submit_all(g.spans);
  ASSERT_EQ(hs.size(), 4u);
  EXPECT_EQ(hs[0].status(), RequestStatus::kQueued) << "the room left goes to the first ones";
  EXPECT_EQ(hs[1].status(), RequestStatus::kQueued);
  EXPECT_EQ(outcome_of(hs[2]), Outcome::kQueueFull);
  EXPECT_EQ(outcome_of(hs[3]), Outcome::kQueueFull);
  for (size_t i = 1; i < hs.size(); ++i) EXPECT_LT(hs[i - 1].id(), hs[i].id());
  EXPECT_EQ(q.metrics().depth, 3u);
  EXPECT_EQ(q.step(), 3u);
  expect_output(a, 0);
  expect_output(hs[0], 1);
  expect_output(hs[1], 2);
  const auto m = q.metrics();
  EXPECT_EQ(m.rejected, 2u);
  EXPECT_EQ(m.max_depth, 3u);
}

TEST_F(BatchQueueTest, AGroupUnderBlockWaitsForRoomRequestByRequest) {
  BatchQueue q(*device_, kIn, kOut, counted(), blocking(2));
  auto a = q.submit(input(0));
  const Group g = group_of([this](int i) { return input(i); }, 1, 2);
  std::vector<RequestHandle> hs;
  std::atomic<bool> returned{false};  // relaxed: a hint, and read after join
  std::thread t([&] {
    hs = q.submit_all(g.spans);
    returned = true;
  });
  std::this_thread::sleep_for(30ms);
  EXPECT_FALSE(returned.load()) << "the group's second request must wait for room";
  EXPECT_EQ(q.metrics().depth, 2u) << "the first took the room left";
  EXPECT_EQ(q.step(), 2u);  // a and the group's first
  t.join();
  ASSERT_EQ(hs.size(), 2u);
  EXPECT_EQ(q.step(), 1u);
  expect_output(a, 0);
  expect_output(hs[0], 1);
  expect_output(hs[1], 2);
  EXPECT_LE(q.metrics().max_depth, 2u);
}

TEST_F(BatchQueueTest, AGroupPastItsDeadlineOrAfterShutdownIsRefusedRequestByRequest) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, 0us));
  const Group g = group_of([this](int i) { return input(i); }, 0, 3);
  clock_->advance(10us);
  auto late = q.submit_all(g.spans, clock_->now());
  for (auto& h : late) EXPECT_EQ(outcome_of(h), Outcome::kTimeout);
  EXPECT_EQ(q.step(), 0u);
  q.shutdown();
  auto after = q.submit_all(g.borrowed);
  ASSERT_EQ(after.size(), 3u);
  for (auto& h : after) EXPECT_EQ(outcome_of(h), Outcome::kShutDown);
  const auto m = q.metrics();
  EXPECT_EQ(m.submitted, 6u);
  EXPECT_EQ(m.expired, 3u);
  EXPECT_EQ(m.shut_down, 3u);
  EXPECT_EQ(rows_.load(), 0);
}

// A group held between taking its ids and pushing its chain: a single
// submit overtakes it (a later id, pushed first). The group keeps its place
// ahead of it, in its own order, and its requests can be cancelled once
// pushed.
TEST_F(BatchQueueTest, AGroupOvertakenBeforeItsPushKeepsItsPlaceInTheQueue) {
  std::vector<uint64_t> order;  // ids completed, in order (manual mode: one thread)
  BatchQueueOptions o = manual(8, 0us);
  o.on_complete = [&](uint64_t id, RequestStatus) { order.push_back(id); };
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  const Group g = group_of([this](int i) { return input(i); }, 0, 3);
  std::vector<RequestHandle> hs;
  RequestHandle late;
  {
    PushHold hold;
    std::thread held([&] {
      PushHold::hold_my_next();
      hs = q.submit_all(g.spans);
    });
    hold.wait_held();
    late = q.submit(input(3));
    hold.release();
    held.join();
  }
  ASSERT_EQ(hs.size(), 3u);
  EXPECT_EQ(late.id(), hs[2].id() + 1);
  EXPECT_TRUE(hs[1].cancel()) << "a pushed group's request is queued";
  EXPECT_EQ(q.step(), 3u);
  ASSERT_EQ(order.size(), 4u);
  EXPECT_EQ(order[0], hs[1].id()) << "the cancel completed first";
  EXPECT_EQ(order[1], hs[0].id()) << "the group keeps its place ahead of the later submit";
  EXPECT_EQ(order[2], hs[2].id());
  EXPECT_EQ(order[3], late.id());
  expect_output(hs[0], 0);
  EXPECT_EQ(outcome_of(hs[1]), Outcome::kCancelled);
  expect_output(hs[2], 2);
  expect_output(late, 3);
}

// ---- Shutdown ------------------------------------------------------------------------

TEST_F(BatchQueueTest, ShutdownDrainRunsWhatIsQueued) {
  auto o = manual(4, 1000000us);
  o.workers = 2;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  std::vector<RequestHandle> hs;
  submit_inputs(q, 0, 6, hs);
  q.shutdown(ShutdownMode::kDrain);  // max_delay (1 s on a clock that never moves) is waived
  for (int i = 0; i < 6; ++i) expect_output(hs[static_cast<size_t>(i)], i);
  EXPECT_EQ(rows_.load(), 6);
  auto late = q.submit(input(9));
  std::string msg;
  EXPECT_EQ(outcome_of(late, nullptr, &msg), Outcome::kShutDown);
  EXPECT_NE(msg.find("shutting down"), std::string::npos) << msg;
  EXPECT_TRUE(q.is_shut_down());
  q.shutdown(ShutdownMode::kCancel);  // idempotent
}

TEST_F(BatchQueueTest, ShutdownCancelCompletesQueuedRequestsWithCancelled) {
  auto o = manual(4, 1000000us);
  o.workers = 2;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  std::vector<RequestHandle> hs;
  submit_inputs(q, 0, 3, hs);
  q.shutdown(ShutdownMode::kCancel);
  for (auto& h : hs) EXPECT_EQ(outcome_of(h), Outcome::kCancelled);
  EXPECT_EQ(calls_.load(), 0);
  EXPECT_EQ(q.metrics().cancelled, 3u);
}

TEST_F(BatchQueueTest, ManualModeDrainsOnShutdownAndTheDestructorDrains) {
  std::vector<RequestHandle> hs;
  {
    BatchQueue q(*device_, kIn, kOut, counted(), manual(2, 1000000us));
    submit_inputs(q, 0, 5, hs);
  }
  for (int i = 0; i < 5; ++i) expect_output(hs[static_cast<size_t>(i)], i);
  EXPECT_EQ(calls_.load(), 3);
}

// ---- Worker threads on a ManualClock -------------------------------------------------

TEST_F(BatchQueueTest, AWorkerWaitsMaxDelayByTheClockNotByRealTime) {
  auto o = manual(8, 1000us);
  o.workers = 1;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  auto h = q.submit(input(0));
  std::this_thread::sleep_for(30ms);  // 30x max_delay of real time: must not matter
  EXPECT_FALSE(h.done());
  clock_->advance(1000us);
  ASSERT_TRUE(h.wait_for(30s));
  expect_output(h, 0);
}

TEST_F(BatchQueueTest, AWaitingWorkerExpiresARequestWhenTheClockReachesItsDeadline) {
  auto o = manual(8, 1000000us);
  o.workers = 1;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  auto h = q.submit(input(0), q.deadline_in(100us));
  std::this_thread::sleep_for(20ms);
  EXPECT_FALSE(h.done());
  clock_->advance(100us);
  ASSERT_TRUE(h.wait_for(30s));
  EXPECT_EQ(outcome_of(h), Outcome::kTimeout);
  EXPECT_EQ(calls_.load(), 0);
}

// ---- Handles ---------------------------------------------------------------------------

TEST_F(BatchQueueTest, HandleMisuseIsAnErrorAndHandlesOutliveTheirQueue) {
  RequestHandle empty;
  EXPECT_FALSE(empty.valid());
  EXPECT_THROW(empty.get(), InvalidState);
  RequestHandle h;
  {
    BatchQueue q(*device_, kIn, kOut, counted(), manual(2, 0us));
    h = q.submit(input(0));
    EXPECT_EQ(q.step(), 1u);
  }
  EXPECT_TRUE(h.done());
  EXPECT_FALSE(h.cancel()) << "the queue is gone";
  expect_output(h, 0);
  EXPECT_THROW(h.get(), InvalidState) << "get() hands the output over once";
}

TEST_F(BatchQueueTest, OnCompleteRunsOncePerRequestBeforeTheHandleSeesIt) {
  std::vector<std::pair<uint64_t, RequestStatus>> seen;
  Mutex mu;
  auto o = manual(4, 0us);
  o.capacity = 2;
  o.on_complete = [&](uint64_t id, RequestStatus s) {
    MutexLock l(mu);
    seen.emplace_back(id, s);
  };
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  auto a = q.submit(input(0));
  auto b = q.submit(input(1));
  auto c = q.submit(input(2));  // QueueFull
  EXPECT_TRUE(b.cancel());
  EXPECT_EQ(q.step(), 1u);
  MutexLock l(mu);
  ASSERT_EQ(seen.size(), 3u);
  EXPECT_EQ(seen[0], std::make_pair(c.id(), RequestStatus::kRejected));
  EXPECT_EQ(seen[1], std::make_pair(b.id(), RequestStatus::kCancelled));
  EXPECT_EQ(seen[2], std::make_pair(a.id(), RequestStatus::kCompleted));
}

// ---- Metrics -------------------------------------------------------------------------

TEST_F(BatchQueueTest, MetricsAsStructJsonAndPrometheus) {
  auto o = manual(4, 100us);
  o.capacity = 5;
  BatchQueue q(*device_, kIn, kOut, counted(), o);
  std::vector<RequestHandle> hs;
  submit_inputs(q, 0, 6, hs);  // the 6th: QueueFull
  EXPECT_TRUE(hs[4].cancel());
  EXPECT_EQ(q.step(), 4u);  // picked at t0: waits 0
  EXPECT_THROW(q.submit(std::vector<float>(3)), InvalidArgument);
  auto late = q.submit(input(7), q.deadline_in(10us));
  clock_->advance(10us);
  EXPECT_EQ(q.step(), 0u);  // expires `late`
  auto last = q.submit(input(8));
  clock_->advance(100us);
  EXPECT_EQ(q.step(), 1u);  // waited 100 us

  auto m = q.metrics();
  EXPECT_EQ(m.capacity, 5u);
  EXPECT_EQ(m.depth, 0u);
  EXPECT_EQ(m.max_depth, 5u);
  EXPECT_EQ(m.submitted, 8u);
  EXPECT_EQ(m.completed, 5u);
  EXPECT_EQ(m.rejected, 1u);
  EXPECT_EQ(m.cancelled, 1u);
  EXPECT_EQ(m.expired, 1u);
  EXPECT_EQ(m.failed, 0u);
  EXPECT_EQ(m.invalid, 1u);
  EXPECT_EQ(m.submitted,
            m.completed + m.rejected + m.expired + m.cancelled + m.failed + m.shut_down);
  EXPECT_EQ(m.batches, 2u);
  EXPECT_EQ(m.batch_sizes.at(4), 1u);
  EXPECT_EQ(m.batch_sizes.at(1), 1u);
  EXPECT_EQ(m.queue_wait.count, 5u);
  EXPECT_DOUBLE_EQ(m.queue_wait.p50_us, 0.0);
  EXPECT_DOUBLE_EQ(m.queue_wait.p99_us, 100.0);
  EXPECT_DOUBLE_EQ(m.queue_wait.sum_us, 100.0);

  const nlohmann::json j = m.to_json();
  EXPECT_EQ(j.at("completed"), 5);
  EXPECT_EQ(j.at("rejected"), 1);
  EXPECT_EQ(j.at("expired"), 1);
  EXPECT_EQ(j.at("cancelled"), 1);
  EXPECT_DOUBLE_EQ(j.at("mean_batch").get<double>(), 2.5);
  EXPECT_EQ(j.at("batch_sizes").at("4"), 1);
  EXPECT_DOUBLE_EQ(j.at("queue_wait").at("p99_us").get<double>(), 100.0);

  const std::string p = m.to_prometheus();
  for (const char* line : {
           "# TYPE flotilla_batch_queue_depth gauge\n",
           "# HELP flotilla_batch_queue_requests_total ",
           "# TYPE flotilla_batch_queue_requests_total counter\n",
           "flotilla_batch_queue_requests_total{outcome=\"completed\"} 5\n",
           "flotilla_batch_queue_requests_total{outcome=\"rejected\"} 1\n",
           "flotilla_batch_queue_max_depth 5\n",
           "# TYPE flotilla_batch_queue_batch_size histogram\n",
           "flotilla_batch_queue_batch_size_bucket{le=\"1\"} 1\n",
           "flotilla_batch_queue_batch_size_bucket{le=\"2\"} 1\n",
           "flotilla_batch_queue_batch_size_bucket{le=\"4\"} 2\n",
           "flotilla_batch_queue_batch_size_bucket{le=\"+Inf\"} 2\n",
           "flotilla_batch_queue_batch_size_sum 5\n",
           "flotilla_batch_queue_batch_size_count 2\n",
           "# TYPE flotilla_batch_queue_queue_wait_seconds summary\n",
           "flotilla_batch_queue_queue_wait_seconds{quantile=\"0.99\"} 1e-04\n",
           "flotilla_batch_queue_queue_wait_seconds_count 5\n",
       })
    EXPECT_NE(p.find(line), std::string::npos) << "missing: " << line << "\n" << p;
  // Every sample line has a HELP and a TYPE for its family.
  std::istringstream lines(p);
  int helps = 0, types = 0;
  for (std::string l; std::getline(lines, l);) {
    helps += l.rfind("# HELP ", 0) == 0;
    types += l.rfind("# TYPE ", 0) == 0;
  }
  EXPECT_EQ(helps, types);
  EXPECT_GE(types, 9);
}

// Note [The queue's share of the device]: the queue claims its share on its
// workers' streams while it lives and gives it back when it goes; by default
// the number of distinct streams its workers got, which counts a stream the
// workers share once; manual mode and device_share 1 claim nothing; a
// stream's own setting and other queues' claims stand beside it (the largest
// wins). Would catch: the hint set and left on the pool's streams, a default
// counting workers rather than streams, a claim overriding a larger one, a
// claim not given back.
TEST_F(BatchQueueTest, TheQueueClaimsItsShareOfTheDeviceWhileItLives) {
  const auto shares = [](const std::vector<Stream>& streams) {
    std::vector<int> v;
    for (const Stream& s : streams) v.push_back(s.device_share());
    return v;
  };
  const auto with = [&](int workers, int device_share) {
    BatchQueueOptions o = manual();
    o.workers = workers;
    o.device_share = device_share;
    return o;
  };
  std::vector<Stream> used;
  {
    BatchQueue q(*device_, kIn, kOut, counted(), with(3, 0));
    used = q.streams();
    EXPECT_EQ(shares(used), std::vector<int>(3, 3));
    {
      // A second queue that wraps onto one of the same streams with a
      // larger claim: the stream plans with 8 while both live.
      BatchQueue big(*device_, kIn, kOut, counted(), with(1, 8));
      Stream shared = big.streams().front();
      EXPECT_EQ(shared.device_share(), 8);
      shared.set_device_share(2);  // the stream's own setting, below the claims
      EXPECT_EQ(shared.device_share(), 8);
      used.push_back(shared);
    }
    EXPECT_EQ(used.back().device_share(), 2) << "8 given back; the setting of 2 stands";
    used.back().set_device_share(1);
    used.pop_back();
    EXPECT_EQ(shares(used), std::vector<int>(3, 3)) << "the first queue's claims stand";
  }
  EXPECT_EQ(shares(used), std::vector<int>(3, 1)) << "claims given back with the queue";
  {
    BatchQueue q(*device_, kIn, kOut, counted(), with(0, 0));
    EXPECT_EQ(shares(q.streams()), std::vector<int>{1}) << "manual mode: one stream";
  }
  {
    BatchQueue q(*device_, kIn, kOut, counted(), with(2, 1));
    EXPECT_EQ(shares(q.streams()), std::vector<int>(2, 1)) << "1 claims nothing";
  }
  // Five workers on a pool of two streams: two streams run batches at once.
  Config small = Config::from_env();
  small.pool_size = 3;
  auto dev = Device::create("cpu", 0, small);
  TinyModel tiny(*dev, kIn, kOut);
  {
    BatchQueue q(*dev, kIn, kOut, tiny, with(5, 0));
    EXPECT_EQ(shares(q.streams()), std::vector<int>(5, 2));
  }
  EXPECT_EQ(dev->streams().at(1).device_share(), 1);
  EXPECT_EQ(dev->streams().at(2).device_share(), 1);
}

TEST_F(BatchQueueTest, BadOptionsAreRefused) {
  auto bad = [&](auto mutate) {
    auto o = manual();
    mutate(o);
    EXPECT_THROW(BatchQueue(*device_, kIn, kOut, counted(), o), InvalidArgument);
  };
  bad([](BatchQueueOptions& o) { o.max_batch = 0; });
  bad([](BatchQueueOptions& o) { o.capacity = 0; });
  bad([](BatchQueueOptions& o) { o.workers = -1; });
  bad([](BatchQueueOptions& o) { o.max_delay = -1us; });
  bad([](BatchQueueOptions& o) { o.metrics_window = 0; });
  bad([](BatchQueueOptions& o) { o.device_share = -1; });
  bad([](BatchQueueOptions& o) { o.device_share = 257; });
  EXPECT_THROW(BatchQueue(*device_, 0, kOut, counted(), manual()), InvalidArgument);
  EXPECT_THROW(BatchQueue(*device_, kIn, kOut, nullptr, manual()), InvalidArgument);
  BatchQueueOptions threaded = manual();
  threaded.workers = 1;
  BatchQueue q(*device_, kIn, kOut, counted(), threaded);
  EXPECT_THROW(q.step(), InvalidState);
  EXPECT_EQ(parse_overflow_policy("block"), OverflowPolicy::kBlock);
  EXPECT_THROW(parse_overflow_policy("drop"), InvalidArgument);
}

}  // namespace
}  // namespace flotilla::serve::test
