// Note [Pooled request blocks]: the pool that serves requests' blocks. Each
// test measures what the pool took from the heap and gave back to it, so
// it fails if blocks are not reused, if a thread or the shared pool keeps
// more than its bound, or if a thread's blocks are not returned at its exit.
// Under AddressSanitizer the pool is off by design; there every test checks
// that every block comes from the heap and goes back to it instead.
#include "serve/request_blocks.h"

#include <gtest/gtest.h>

#include <cstring>
#include <thread>
#include <vector>

#include "serve/serve_test_util.h"

namespace flotilla::serve::test {
namespace {

using detail::block_counts_for_testing;
using detail::block_pool_enabled;
using detail::give_block;
using detail::kBlockBatch;
using detail::kPooledBlockBytes;
using detail::kSharedBatches;
using detail::take_block;
using detail::thread_blocks_for_testing;

constexpr size_t kSmall = 300;  // a request with a borrowed input: about this

std::vector<void*> take_small(size_t n) {
  std::vector<void*> v;
  for (size_t i = 0; i < n; ++i) v.push_back(take_block(kSmall));
  return v;
}

void give_small(const std::vector<void*>& v) {
  for (void* b : v) give_block(b, true);
}

TEST(RequestBlocks, ABlockFreedOnAThreadIsReusedThere) {
  const auto before = block_counts_for_testing();
  for (int round = 0; round < 1000; ++round) {
    auto v = take_small(8);
    for (void* b : v) std::memset(b, round & 0xff, kPooledBlockBytes);  // the whole block is ours
    give_small(v);
  }
  const auto after = block_counts_for_testing();
  if (block_pool_enabled()) {
    EXPECT_LE(after.from_heap - before.from_heap, 8u)
        << "8000 blocks, 8 at a time: 8 from the heap";
    EXPECT_EQ(after.to_heap, before.to_heap);
  } else {
    EXPECT_EQ(after.from_heap - before.from_heap, 8000u) << "no pool: every block from the heap";
    EXPECT_EQ(after.to_heap - before.to_heap, 8000u);
  }
}

TEST(RequestBlocks, AThreadKeepsAtMostTwoBatches) {
  std::thread t([] {
    give_small(take_small(5 * kBlockBatch));
    EXPECT_LE(thread_blocks_for_testing(), 2 * kBlockBatch);
    if (block_pool_enabled()) {
      EXPECT_GE(thread_blocks_for_testing(), kBlockBatch);
    }
  });
  t.join();
}

// Blocks taken on one thread and freed on another (a client's request, a
// worker's free) come back through the shared pool; the freeing thread's
// own list goes back to the heap when it exits.
TEST(RequestBlocks, BlocksFreedOnAnotherThreadComeBackThroughTheSharedPool) {
  constexpr size_t n = 10 * kBlockBatch;
  std::vector<void*> blocks;
  std::thread owner([&] { blocks = take_small(n); });
  owner.join();
  const auto before_free = block_counts_for_testing();
  size_t kept_by_freer = 0;
  std::thread freer([&] {
    give_small(blocks);
    kept_by_freer = thread_blocks_for_testing();
  });
  freer.join();
  const auto after_free = block_counts_for_testing();
  std::thread again([&] { blocks = take_small(n); });
  again.join();
  const auto after_again = block_counts_for_testing();
  give_small(blocks);
  if (!block_pool_enabled()) {
    EXPECT_EQ(after_free.to_heap - before_free.to_heap, n);
    EXPECT_EQ(after_again.from_heap - after_free.from_heap, n);
    return;
  }
  EXPECT_LE(kept_by_freer, 2 * kBlockBatch);
  EXPECT_GE(after_free.to_heap - before_free.to_heap, kept_by_freer)
      << "the freeing thread's own list goes to the heap at its exit";
  EXPECT_LE(after_again.from_heap - after_free.from_heap, kept_by_freer)
      << "the rest came back from the shared pool";
}

TEST(RequestBlocks, TheSharedPoolKeepsAtMostItsBound) {
  constexpr size_t n = (kSharedBatches + 8) * kBlockBatch + 2 * kBlockBatch;
  std::vector<void*> blocks;
  std::thread owner([&] { blocks = take_small(n); });
  owner.join();
  const auto before = block_counts_for_testing();
  std::thread freer([&] { give_small(blocks); });
  freer.join();
  const auto freed = block_counts_for_testing().to_heap - before.to_heap;
  if (block_pool_enabled()) {
    EXPECT_GE(freed, n - kSharedBatches * kBlockBatch)
        << "the shared pool holds at most " << kSharedBatches << " batches";
  } else {
    EXPECT_EQ(freed, n);
  }
}

TEST(RequestBlocks, LargeBlocksAreNotPooled) {
  const auto before = block_counts_for_testing();
  void* b = take_block(kPooledBlockBytes + 1);
  std::memset(b, 0, kPooledBlockBytes + 1);
  give_block(b, false);
  const auto after = block_counts_for_testing();
  EXPECT_EQ(after.from_heap, before.from_heap);
  EXPECT_EQ(after.to_heap, before.to_heap);
}

// A request with a borrowed input is small enough to be pooled: requests
// submitted and completed on this thread reuse their blocks.
TEST_F(QueueTest, RequestsWithBorrowedInputsReuseTheirBlocks) {
  BatchQueue q(*device_, kIn, kOut, counted(), manual(4, std::chrono::microseconds(0)));
  const std::vector<float> x = input(1);
  const auto before = block_counts_for_testing();
  int done = 0;
  for (int round = 0; round < 100; ++round) {
    for (int i = 0; i < 4; ++i) q.submit(BorrowedInput(x), [&](const Completion&) { ++done; });
    EXPECT_EQ(q.step(), 4u);
  }
  EXPECT_EQ(done, 400);
  const auto after = block_counts_for_testing();
  if (block_pool_enabled()) {
    EXPECT_LE(after.from_heap - before.from_heap, 8u) << "400 requests, 4 at a time";
  } else {
    EXPECT_EQ(after.from_heap - before.from_heap, 400u) << "no pool: every request from the heap";
  }
}

}  // namespace
}  // namespace flotilla::serve::test
