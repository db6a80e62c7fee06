// The caching allocator's rules, one test each (CPU backend).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <string>
#include <vector>

#include "allocator/alloc_test_util.h"
#include "flotilla/runtime/event.h"

namespace flotilla::test {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

float first_float(const Allocation& a) { return *static_cast<const float*>(a.host_ptr()); }

bool all_equal(const Allocation& a, size_t count, float v) {
  const auto* p = static_cast<const float*>(a.host_ptr());
  return std::all_of(p, p + count, [v](float x) { return x == v; });
}

TEST(AllocatorSizeClass, RoundsUpWithBoundedWaste) {
  EXPECT_EQ(Allocator::size_class(1), 512u);
  EXPECT_EQ(Allocator::size_class(512), 512u);
  EXPECT_EQ(Allocator::size_class(513), 1024u);
  EXPECT_EQ(Allocator::size_class(kMiB), kMiB);
  EXPECT_EQ(Allocator::size_class(kMiB + 1), kMiB + kMiB / 4);
  EXPECT_EQ(Allocator::size_class(3 * kMiB), 3 * kMiB);
  EXPECT_EQ(Allocator::size_class(3 * kMiB + 1), 3 * kMiB + kMiB / 2);
  std::mt19937_64 rng(alloc_test_seed());
  size_t prev_n = 0, prev_c = 0;
  std::vector<size_t> sizes;
  for (int i = 0; i < 2000; ++i) sizes.push_back(1 + rng() % (64 * kMiB));
  std::sort(sizes.begin(), sizes.end());
  for (size_t n : sizes) {
    const size_t c = Allocator::size_class(n);
    ASSERT_GE(c, n);
    ASSERT_EQ(c % 512, 0u) << n;
    ASSERT_LE(c - n, std::max<size_t>(511, n / 4)) << n;  // at most 25% (or 511 B) wasted
    if (n >= prev_n) {
      ASSERT_GE(c, prev_c) << "size classes must grow with the size";
    }
    prev_n = n;
    prev_c = c;
  }
}

TEST(Allocator, SameStreamReuseIsImmediateAndStreamOrdered) {
  auto dev = Device::create("cpu", 0, alloc_config(/*caching=*/true));
  Allocator& al = dev->allocator();
  Stream s = dev->streams().at(1);
  Gate gate(s);  // nothing on s runs until the gate opens
  Allocation a = al.allocate(4000, s);
  void* p = a.device_ptr();
  fill(s, p, 1000, 1.0f);
  a.reset();                            // the fill has not run: the block is still in use on s
  Allocation b = al.allocate(3900, s);  // same class, same stream: reused at once
  EXPECT_EQ(b.device_ptr(), p);
  fill(s, b.device_ptr(), 1000, 2.0f);  // runs after the first fill, by stream order
  gate.open();
  s.synchronize();
  EXPECT_TRUE(all_equal(b, 1000, 2.0f)) << "first value " << first_float(b);
  const AllocatorStats st = al.stats();
  EXPECT_EQ(st.allocations, 2u);
  EXPECT_EQ(st.cache_hits, 1u);
  EXPECT_EQ(st.driver_allocations, 1u);
  EXPECT_EQ(st.in_use_bytes, 4096u);
  EXPECT_EQ(st.reserved_bytes, 4096u);
}

TEST(Allocator, OtherClassesAndStreamsDoNotGetTheBlock) {
  auto dev = Device::create("cpu", 0, alloc_config(true));
  Allocator& al = dev->allocator();
  Stream s1 = dev->streams().at(1), s2 = dev->streams().at(2);
  Allocation a = al.allocate(4096, s1);
  void* p = a.device_ptr();
  a.reset();
  Allocation other_class = al.allocate(8192, s1);
  Allocation other_stream = al.allocate(4096, s2);  // memory is plentiful: no cross-stream reuse
  EXPECT_NE(other_class.device_ptr(), p);
  EXPECT_NE(other_stream.device_ptr(), p);
  EXPECT_EQ(al.stats().cross_stream_reuses, 0u);
  Allocation again = al.allocate(4096, s1);
  EXPECT_EQ(again.device_ptr(), p);
}

// record_stream: a block used on another stream is not reused, even on its
// own stream, until that stream's work at free time has run.
TEST(Allocator, RecordStreamDefersReuseUntilTheOtherStreamIsDone) {
  auto dev = Device::create("cpu", 0, alloc_config(true));
  Allocator& al = dev->allocator();
  Stream a = dev->streams().at(1), b = dev->streams().at(2);
  Gate gate(b);
  Allocation x = al.allocate(4096, a);
  void* p = x.device_ptr();
  x.record_stream(b);
  fill(b, p, 1024, 1.0f);  // pending behind the gate
  b.commit();
  x.reset();
  // b has not run its fill: reusing the block now would let the new owner's
  // data be overwritten by it.
  Allocation y = al.allocate(4096, a);
  EXPECT_NE(y.device_ptr(), p) << "reused a block that stream b is still going to write";
  fill(a, y.device_ptr(), 1024, 2.0f);
  gate.open();
  b.synchronize();
  a.synchronize();
  EXPECT_TRUE(all_equal(y, 1024, 2.0f));
  // Now b is done: the block comes back on its own stream.
  Allocation z = al.allocate(4096, a);
  EXPECT_EQ(z.device_ptr(), p);
  EXPECT_GE(al.stats().deferred_frees, 1u);
}

TEST(Allocator, RecordStreamOnOwnStreamIsANoOp) {
  auto dev = Device::create("cpu", 0, alloc_config(true));
  Allocator& al = dev->allocator();
  Stream a = dev->streams().at(1);
  Allocation x = al.allocate(100, a);
  void* p = x.device_ptr();
  x.record_stream(a);
  x.reset();
  EXPECT_EQ(al.allocate(100, a).device_ptr(), p);
  EXPECT_EQ(al.stats().deferred_frees, 0u);
}

// Under memory pressure a block cached on stream A goes to stream B, which
// waits on the device for A's work first. The test would see the early
// reuse: A's late fill of 1.0 would overwrite B's 2.0.
TEST(Allocator, CrossStreamReuseWaitsForTheOwnerStream) {
  auto dev = Device::create("cpu", 0, alloc_config(true, 3 * kMiB));
  Allocator& al = dev->allocator();
  Stream a = dev->streams().at(1), b = dev->streams().at(2);
  const size_t n = 2 * kMiB / sizeof(float);
  Gate gate(a);
  Allocation x = al.allocate(2 * kMiB, a);
  void* p = x.device_ptr();
  fill(a, p, n, 1.0f);  // pending behind the gate
  a.commit();
  x.reset();
  Allocation y = al.allocate(2 * kMiB, b);  // the driver has no room: takes x's block
  ASSERT_EQ(y.device_ptr(), p);
  fill(b, y.device_ptr(), n, 2.0f);
  b.commit();
  gate.open();
  b.synchronize();
  a.synchronize();
  EXPECT_TRUE(all_equal(y, n, 2.0f)) << "stream b used the block before stream a was done";
  const AllocatorStats st = al.stats();
  EXPECT_EQ(st.cross_stream_reuses, 1u);
  EXPECT_EQ(st.driver_allocations, 1u);
  EXPECT_EQ(y.stream(), b);
}

TEST(Allocator, OutOfMemoryFreesTheCacheAndRetries) {
  auto dev = Device::create("cpu", 0, alloc_config(true, 4 * kMiB));
  Allocator& al = dev->allocator();
  Stream a = dev->streams().at(1), b = dev->streams().at(2);
  Allocation held = al.allocate(2 * kMiB, a);
  Allocation cached = al.allocate(kMiB + kMiB / 2, a);
  fill(a, cached.device_ptr(), 1024, 1.0f);
  cached.reset();
  EXPECT_EQ(al.stats().cached_bytes, kMiB + kMiB / 2);
  // 2 + 1.5 + 2 MiB is over the limit, and no 2 MiB block is cached: the
  // allocator frees its cache (waiting for a) and the retry succeeds.
  Allocation more = al.allocate(2 * kMiB, b);
  EXPECT_TRUE(more);
  AllocatorStats st = al.stats();
  EXPECT_EQ(st.oom_retries, 1u);
  EXPECT_EQ(st.cache_flushes, 1u);
  EXPECT_EQ(st.cached_bytes, 0u);
  EXPECT_EQ(st.driver_frees, 1u);
  EXPECT_EQ(st.in_use_bytes, 4 * kMiB);
}

TEST(Allocator, OutOfMemoryAfterTheRetryGivesTheFigures) {
  auto dev = Device::create("cpu", 0, alloc_config(true, 4 * kMiB));
  Allocator& al = dev->allocator();
  Stream a = dev->streams().at(1);
  Allocation held = al.allocate(3 * kMiB, a);
  Allocation cached = al.allocate(512 * 1024, a);
  cached.reset();
  try {
    (void)al.allocate(2 * kMiB, a);
    FAIL() << "expected OutOfMemory";
  } catch (const OutOfMemory& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("[Allocator::allocate] cpu:0 is out of memory"), std::string::npos) << m;
    EXPECT_NE(m.find("asked for 2097152 bytes"), std::string::npos) << m;
    EXPECT_NE(m.find("3145728 in use"), std::string::npos) << m;
    EXPECT_NE(m.find("0 cached"), std::string::npos) << m;
    EXPECT_NE(m.find("device limit 4194304"), std::string::npos) << m;
  }
  const AllocatorStats st = al.stats();
  EXPECT_EQ(st.oom_retries, 1u);
  EXPECT_EQ(st.cached_bytes, 0u);  // the cache was freed before giving up
  EXPECT_EQ(st.in_use_bytes, 3 * kMiB);
  EXPECT_EQ(st.reserved_bytes, 3 * kMiB);
  // The allocator still works after the failure.
  held.reset();
  EXPECT_TRUE(al.allocate(2 * kMiB, a));
}

TEST(Allocator, NoCachingModeReallyFreesOnceTheStreamIsDone) {
  auto dev = Device::create("cpu", 0, alloc_config(/*caching=*/false));
  Allocator& al = dev->allocator();
  EXPECT_FALSE(al.caching());
  Stream s = dev->streams().at(1);
  {
    Gate gate(s);
    Allocation a = al.allocate(4096, s);
    fill(s, a.device_ptr(), 1024, 1.0f);  // would write freed memory if the free were early
    a.reset();
    EXPECT_EQ(al.stats().driver_frees, 0u) << "freed while the stream still uses the block";
    Allocation b = al.allocate(4096, s);  // the pending free cannot be finished yet
    EXPECT_EQ(al.stats().driver_frees, 0u);
    EXPECT_EQ(al.stats().driver_allocations, 2u);
    gate.open();
    s.synchronize();
  }
  al.empty_cache();
  const AllocatorStats st = al.stats();
  EXPECT_EQ(st.cache_hits, 0u);
  EXPECT_EQ(st.driver_frees, 2u);
  EXPECT_EQ(st.reserved_bytes, 0u);
  EXPECT_EQ(st.cached_bytes, 0u);
  EXPECT_EQ(st.in_use_bytes, 0u);
}

TEST(Allocator, NoCachingModeFreesWithoutEmptyCache) {
  auto dev = Device::create("cpu", 0, alloc_config(false));
  Allocator& al = dev->allocator();
  Stream s = dev->streams().at(1);
  Allocation a = al.allocate(4096, s);
  a.reset();
  s.synchronize();
  // The free finishes at a later allocation, once the event it records
  // there is reached; the stream is idle, so that is soon.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (al.stats().driver_frees == 0 && std::chrono::steady_clock::now() < deadline)
    (void)al.allocate(100, s);
  EXPECT_GE(al.stats().driver_frees, 1u);
  EXPECT_EQ(al.stats().cache_hits, 0u);
}

#if defined(__SANITIZE_ADDRESS__)
// What the no-caching mode is for: ASan sees a use of a tensor's memory
// after the allocator freed it.
TEST(AllocatorDeathTest, AsanSeesUseAfterFreeWithoutCaching) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        auto dev = Device::create("cpu", 0, alloc_config(false));
        Stream s = dev->streams().at(1);
        Allocation a = dev->allocator().allocate(4096, s);
        auto* p = static_cast<volatile float*>(a.host_ptr());
        a.reset();
        dev->allocator().empty_cache();
        p[0] = 1.0f;
      },
      "heap-use-after-free");
}
#endif

TEST(Allocator, HostBlocksAreReusedOnlyAfterTheirCopyRan) {
  auto dev = Device::create("cpu", 0, alloc_config(true));
  Allocator& al = dev->allocator();
  Stream s = dev->streams().at(1);
  Allocation dst = al.allocate(4096, s);
  Gate gate(s);
  Allocation h = al.allocate_host(4096, s);
  EXPECT_TRUE(h.is_host());
  void* hp = h.host_ptr();
  static_cast<float*>(hp)[0] = 7.0f;
  s.dispatch("copy_bytes", backend::KernelArgs().ptr(dst.device_ptr()).ptr(h.device_ptr()).size(4));
  h.reset();
  // The host writes staging memory at once: the block must not come back
  // while the copy that reads it is pending, even on the same stream.
  Allocation h2 = al.allocate_host(4096, s);
  EXPECT_NE(h2.host_ptr(), hp);
  static_cast<float*>(h2.host_ptr())[0] = 9.0f;
  gate.open();
  s.synchronize();
  EXPECT_EQ(first_float(dst), 7.0f);
  h2.reset();
  Allocation h3 = al.allocate_host(4096, s);  // the copy ran: h's block is reusable
  (void)h3;
  EXPECT_GE(al.stats().cache_hits, 1u);
}

TEST(Allocator, SynchronizeStreamRecyclesBlocksThatWaitedForItAlone) {
  auto dev = Device::create("cpu", 0, alloc_config(true));
  Allocator& al = dev->allocator();
  Stream a = dev->streams().at(1), b = dev->streams().at(2);
  Allocation dst = al.allocate(4096, a);
  Allocation h = al.allocate_host(4096, a);
  void* hp = h.host_ptr();
  a.dispatch("copy_bytes", backend::KernelArgs().ptr(dst.device_ptr()).ptr(h.device_ptr()).size(4));
  h.reset();
  // A device block also used on b, which is held: a's synchronize says
  // nothing about b, so it must stay pending.
  Gate gate(b);
  Allocation x = al.allocate(8192, a);
  void* xp = x.device_ptr();
  x.record_stream(b);
  fill(b, xp, 2048, 1.0f);
  b.commit();
  x.reset();
  al.synchronize_stream(a);
  const uint64_t hits = al.stats().cache_hits;
  EXPECT_EQ(al.allocate_host(4096, a).host_ptr(), hp) << "the staging block waited for a alone";
  EXPECT_EQ(al.stats().cache_hits, hits + 1);
  EXPECT_NE(al.allocate(8192, a).device_ptr(), xp) << "stream b still has to write the block";
  gate.open();
  b.synchronize();
}

TEST(Allocator, ReleaseIdleMakesTheBlockReusableAtOnce) {
  auto dev = Device::create("cpu", 0, alloc_config(true));
  Allocator& al = dev->allocator();
  Stream s = dev->streams().at(1);
  Allocation h = al.allocate_host(1000, s);
  void* p = h.host_ptr();
  h.release_idle();
  EXPECT_FALSE(h);
  EXPECT_EQ(al.allocate_host(1000, s).host_ptr(), p);
}

TEST(Allocator, StatsTrackInUseCachedAndPeak) {
  auto dev = Device::create("cpu", 0, alloc_config(true));
  Allocator& al = dev->allocator();
  Stream s = dev->streams().at(1);
  {
    Allocation a = al.allocate(1000, s);  // 1024
    Allocation b = al.allocate(5000, s);  // 5120
    EXPECT_EQ(a.size(), 1000u);
    EXPECT_EQ(a.capacity(), 1024u);
    AllocatorStats st = al.stats();
    EXPECT_EQ(st.in_use_bytes, 6144u);
    EXPECT_EQ(st.peak_in_use_bytes, 6144u);
    a.reset();
    st = al.stats();
    EXPECT_EQ(st.in_use_bytes, 5120u);
    EXPECT_EQ(st.cached_bytes, 1024u);
    EXPECT_EQ(st.peak_in_use_bytes, 6144u);
  }
  al.reset_peak();
  EXPECT_EQ(al.stats().peak_in_use_bytes, 0u);
  s.synchronize();
  al.empty_cache();
  const AllocatorStats st = al.stats();
  EXPECT_EQ(st.reserved_bytes, 0u);
  EXPECT_EQ(st.cached_bytes, 0u);
  EXPECT_EQ(st.driver_frees, st.driver_allocations);
  EXPECT_NE(st.to_string().find("driver_frees=2"), std::string::npos) << st.to_string();
}

TEST(Allocator, BadArgumentsAreInvalidArgument) {
  auto dev = Device::create("cpu", 0, alloc_config(true));
  auto other = Device::create("cpu", 0, alloc_config(true));
  Allocator& al = dev->allocator();
  Stream s = dev->streams().at(1);
  try {
    (void)al.allocate(0, s);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("[Allocator::allocate] asked for 0 bytes"),
              std::string::npos)
        << e.what();
  }
  try {
    (void)al.allocate(16, other->streams().at(1));
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("belongs to"), std::string::npos) << e.what();
  }
  Allocation a = al.allocate(16, s);
  EXPECT_THROW(a.record_stream(other->streams().at(1)), InvalidArgument);
  Allocation empty;
  EXPECT_THROW(empty.record_stream(s), InvalidState);
  empty.reset();  // harmless
}

TEST(Allocator, ShutDownDeviceRefusesAndLateFreesAreSafe) {
  auto dev = Device::create("cpu", 0, alloc_config(true));
  Stream s = dev->streams().at(1);
  Allocation a = dev->allocator().allocate(64, s);
  Allocation b = dev->allocator().allocate(64, s);
  b.record_stream(dev->streams().at(2));
  dev->shutdown();
  EXPECT_THROW((void)dev->allocator().allocate(64, s), ShutDown);
  a.reset();  // to the cache; released when the device goes
  b.reset();  // its event cannot be recorded any more: released, the device has drained
  dev->allocator().empty_cache();
  EXPECT_EQ(dev->allocator().stats().in_use_bytes, 0u);
  EXPECT_EQ(dev->allocator().stats().reserved_bytes, 0u);
}

}  // namespace
}  // namespace flotilla::test
