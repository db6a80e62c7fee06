// DoneFlag (common/done_flag.h): the one-shot signal behind a BatchQueue
// request's result. Each test names what it would catch.
#include "flotilla/common/done_flag.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>
#include <vector>

namespace flotilla {
namespace {

using namespace std::chrono_literals;

// A wait that should end gets this long before the test calls it hung.
constexpr auto kHung = 20s;

TEST(DoneFlagTest, SetBeforeWaitReturnsAtOnce) {
  DoneFlag f;
  EXPECT_FALSE(f.is_set());
  f.set();
  EXPECT_TRUE(f.is_set());
  f.wait();  // would hang if wait() ignored a flag set before it
  EXPECT_TRUE(f.wait_for(0s));
  f.set();  // a second set() is harmless
  EXPECT_TRUE(f.is_set());
}

TEST(DoneFlagTest, WaitForTimesOutWhenNotSet) {
  DoneFlag f;
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE(f.wait_for(30ms));
  // Would fail if the timed wait returned early (or slept on without a timeout).
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 30ms);
  EXPECT_FALSE(f.is_set());
}

// Waiters that are asleep in the futex when set() comes are all woken: a
// set() that forgot to wake (or woke one) would leave a future unready.
TEST(DoneFlagTest, SetWakesEverySleepingWaiter) {
  DoneFlag f;
  std::atomic<int> woken{0};
  std::vector<std::future<void>> waiters;
  for (int i = 0; i < 8; ++i)
    waiters.push_back(std::async(std::launch::async, [&, i] {
      if (i % 2 == 0)
        f.wait();
      else
        EXPECT_TRUE(f.wait_for(600s));
      woken.fetch_add(1);
    }));
  std::this_thread::sleep_for(50ms);  // let them fall asleep
  EXPECT_EQ(woken.load(), 0) << "a waiter returned before set()";
  f.set();
  for (auto& w : waiters) ASSERT_EQ(w.wait_for(kHung), std::future_status::ready) << "lost wake-up";
  EXPECT_EQ(woken.load(), 8);
}

// set() racing a waiter's announce-then-sleep, many times, each round with
// a fresh flag: a lost wake-up hangs a round (caught by the timeout), and a
// result read without the flag's ordering is a data race TSan reports.
TEST(DoneFlagTest, SetRacingWaitersNeverLosesAWakeUpAndPublishesTheResult) {
  constexpr int kRounds = 3000;
  for (int round = 0; round < kRounds; ++round) {
    DoneFlag f;
    int payload = 0;  // plain: ordered by the flag alone
    std::atomic<bool> go{false};
    auto waiter = std::async(std::launch::async, [&] {
      while (!go.load(std::memory_order_acquire)) {
      }
      if (round % 3 == 0)
        f.wait();
      else
        EXPECT_TRUE(f.wait_for(600s));
      return payload;
    });
    go.store(true, std::memory_order_release);
    for (int spin = 0; spin < round % 200; ++spin)
      std::atomic_signal_fence(std::memory_order_seq_cst);
    payload = round + 1;
    f.set();
    ASSERT_EQ(waiter.wait_for(kHung), std::future_status::ready)
        << "lost wake-up in round " << round;
    ASSERT_EQ(waiter.get(), round + 1);
  }
}

}  // namespace
}  // namespace flotilla
