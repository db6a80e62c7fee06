// StreamPool, single-threaded (label unit): the round-robin sequence of the
// seed's Figure 3, lazy creation, exclusive binding, argument checks.
#include <set>
#include <thread>

#include "runtime/runtime_test_util.h"

namespace flotilla::test {
namespace {

class PoolTest : public RuntimeTest {};

// Figure 3: request k gets pooled stream 1 + (k mod pooled): 1, 2, ..., 31,
// then wraps to 1. Stream 0 (the default) is never handed out.
TEST_F(PoolTest, RoundRobinHandsOutIndicesInOrderAndWraps) {
  auto dev = make_device();
  auto& pool = dev->streams();
  ASSERT_EQ(pool.size(), 32);
  ASSERT_EQ(pool.pooled(), 31);
  for (int k = 0; k < 3 * 31 + 5; ++k)
    ASSERT_EQ(pool.acquire_round_robin().index(), 1 + k % 31) << "request " << k;
}

TEST_F(PoolTest, RoundRobinWrapsOnASmallPool) {
  Config c = test_config();
  c.pool_size = 4;  // default + 3 pooled
  auto dev = make_device(c);
  const int expected[] = {1, 2, 3, 1, 2, 3, 1};
  for (int want : expected) EXPECT_EQ(dev->streams().acquire(), dev->streams().at(want));
}

TEST_F(PoolTest, SmallestPoolHasOnePooledStream) {
  Config c = test_config();
  c.pool_size = 2;
  auto dev = make_device(c);
  for (int k = 0; k < 5; ++k) EXPECT_EQ(dev->streams().acquire_round_robin().index(), 1);
}

TEST_F(PoolTest, DefaultStreamIsIndexZero) {
  auto dev = make_device();
  EXPECT_TRUE(dev->default_stream().is_default());
  EXPECT_EQ(dev->default_stream(), dev->streams().at(0));
  EXPECT_FALSE(dev->streams().at(1).is_default());
}

// Streams are created on first use, not when handed out.
TEST_F(PoolTest, StreamsAreCreatedLazily) {
  auto dev = make_device();
  auto& pool = dev->streams();
  EXPECT_EQ(pool.created(), 0);
  Stream s = pool.acquire();
  (void)dev->current_stream();
  EXPECT_EQ(pool.created(), 0) << "handing out a stream must not create it";
  FloatBuffer b(*dev, 4);
  b.fill(s, 1.0f);
  EXPECT_EQ(pool.created(), 1);
  b.fill(dev->default_stream(), 1.0f);
  EXPECT_EQ(pool.created(), 2);
  b.fill(s, 2.0f);
  EXPECT_EQ(pool.created(), 2);
  EXPECT_EQ(&pool.state(s.index()), &pool.state(s.index()));
  dev->synchronize();
}

TEST_F(PoolTest, OutOfRangeIndicesAreInvalidArgument) {
  auto dev = make_device();
  EXPECT_THROW(dev->streams().at(-1), InvalidArgument);
  EXPECT_THROW(dev->streams().at(32), InvalidArgument);
  EXPECT_THROW(dev->streams().state(32), InvalidArgument);
  try {
    dev->streams().at(40);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("0..31"), std::string::npos) << e.what();
  }
}

TEST_F(PoolTest, PoolSizeOutOfRangeIsInvalidArgument) {
  for (int bad : {0, 1, 65}) {
    Config c = test_config();
    c.pool_size = bad;
    EXPECT_THROW(make_device(c), InvalidArgument) << "pool_size " << bad;
  }
  Config c = test_config();
  c.pool_size = 64;
  EXPECT_EQ(make_device(c)->streams().pooled(), 63);
}

// Exclusive: a thread keeps its slot; the lowest free slot is taken first.
TEST_F(PoolTest, ExclusiveThreadKeepsItsSlot) {
  Config c = test_config();
  c.policy = StreamPolicy::kExclusive;
  auto dev = make_device(c);
  auto& pool = dev->streams();
  EXPECT_EQ(pool.bound(), 0);
  const Stream mine = pool.acquire();
  EXPECT_EQ(mine.index(), 1);
  EXPECT_EQ(pool.acquire(), mine);
  EXPECT_EQ(dev->current_stream(), mine);
  EXPECT_EQ(pool.bound(), 1);
  int other = -1;
  std::thread t([&] { other = dev->current_stream().index(); });
  t.join();
  EXPECT_EQ(other, 2) << "a second thread takes the next free slot";
  EXPECT_EQ(pool.bound(), 1) << "the exited thread's slot was not returned";
  std::thread t2([&] { other = dev->current_stream().index(); });
  t2.join();
  EXPECT_EQ(other, 2) << "the returned slot is reused";
}

}  // namespace
}  // namespace flotilla::test
