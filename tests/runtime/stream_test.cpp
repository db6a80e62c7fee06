// Stream: sync modes, kernel coalescing, the EncodingLock's statistics,
// StreamGuard. Single-threaded (label unit).
#include <chrono>
#include <stdexcept>
#include <thread>

#include "runtime/runtime_test_util.h"

namespace flotilla::test {
namespace {

using backend::KernelArgs;
using std::chrono::milliseconds;

class StreamTest : public RuntimeTest {
 protected:
  std::shared_ptr<Device> device_with(SyncMode mode, int adaptive = 64) {
    Config c = test_config();
    c.sync_mode = mode;
    c.adaptive_commit_kernels = adaptive;
    return make_device(c);
  }
};

// ---- The device-share hint -------------------------------------------------

// Stream::set_device_share and claim_device_share: the hint a stream plans
// with is the largest of its own setting and the claims held on it; a claim
// gives its share back once, when released, moved over or destroyed. Kept
// on every backend (the CPU's kernels ignore it). Would catch: a claim that
// overrides a larger one or never goes, a claim given back twice, a bad
// share accepted, a hint shared between streams.
TEST_F(StreamTest, DeviceShareIsTheLargestOfTheSettingAndTheClaims) {
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  EXPECT_EQ(s.device_share(), 1);
  EXPECT_THROW(s.set_device_share(0), InvalidArgument);
  EXPECT_THROW((void)s.claim_device_share(-1), InvalidArgument);
  {
    DeviceShareClaim a = s.claim_device_share(4);
    EXPECT_TRUE(a.held());
    EXPECT_EQ(s.device_share(), 4);
    DeviceShareClaim b = s.claim_device_share(8);
    DeviceShareClaim c = s.claim_device_share(8);  // the same share twice
    EXPECT_EQ(s.device_share(), 8);
    b.release();
    EXPECT_FALSE(b.held());
    EXPECT_EQ(s.device_share(), 8) << "c still claims 8";
    b.release();  // given back once only
    EXPECT_EQ(s.device_share(), 8);
    c = std::move(a);  // c's 8 goes back; a's 4 moves into c
    EXPECT_FALSE(a.held());
    EXPECT_EQ(s.device_share(), 4);
    s.set_device_share(6);
    EXPECT_EQ(s.device_share(), 6);
    s.set_device_share(2);
    EXPECT_EQ(s.device_share(), 4) << "the claim outranks a smaller setting";
    EXPECT_EQ(dev->streams().at(2).device_share(), 1) << "a hint per stream";
  }
  EXPECT_EQ(s.device_share(), 2) << "the claims are gone; the setting stays";
}

// ---- Sync modes ------------------------------------------------------------

// Would catch: a stream that commits on its own under kNone (work split into
// many command buffers), or a commit() that commits an empty buffer.
TEST_F(StreamTest, SyncModeNoneCommitsOnlyWhenAsked) {
  auto dev = device_with(SyncMode::kNone);
  FloatBuffer b(*dev, 64);
  Stream s = dev->streams().at(1);
  for (int i = 0; i < 10; ++i) b.fill(s, static_cast<float>(i));
  EXPECT_EQ(s.kernels_encoded(), 10u);
  EXPECT_EQ(s.commits(), 0u);
  EXPECT_EQ(dev->driver().stats().command_buffers_committed, 0u);
  s.commit();
  EXPECT_EQ(s.commits(), 1u);
  s.commit();  // nothing new: no empty command buffer
  EXPECT_EQ(s.commits(), 1u);
  // The ten kernels coalesced into one command buffer.
  EXPECT_EQ(dev->driver().stats().command_buffers_committed, 1u);
  EXPECT_EQ(b.read(s)[63], 9.0f);
}

TEST_F(StreamTest, SyncModeCommitCommitsEveryKernel) {
  auto dev = device_with(SyncMode::kCommit);
  FloatBuffer b(*dev, 64);
  Stream s = dev->streams().at(1);
  for (int i = 0; i < 10; ++i) {
    b.fill(s, static_cast<float>(i));
    EXPECT_EQ(s.commits(), static_cast<uint64_t>(i + 1));
  }
  EXPECT_EQ(b.read(s)[0], 9.0f);
}

// Would catch: kCommitAndWait returning before the kernel ran.
TEST_F(StreamTest, SyncModeCommitAndWaitReturnsAfterTheKernelRan) {
  auto dev = device_with(SyncMode::kCommitAndWait);
  if (!has_kernel(*dev, "sleep_us")) GTEST_SKIP() << "the backend has no sleep_us kernel";
  Stream s = dev->streams().at(1);
  for (int i = 0; i < 3; ++i) {
    const auto start = std::chrono::steady_clock::now();
    s.dispatch("sleep_us", KernelArgs().i64(20000));
    EXPECT_GE(std::chrono::steady_clock::now() - start, milliseconds(19));
    EXPECT_TRUE(s.query()) << "dispatch returned with the kernel still pending";
    EXPECT_EQ(s.commits(), static_cast<uint64_t>(i + 1));
  }
}

// The control for the test above: kCommit does not wait.
TEST_F(StreamTest, SyncModeCommitDoesNotWait) {
  auto dev = device_with(SyncMode::kCommit);
  Stream s = dev->streams().at(1);
  Hold hold(s);
  FloatBuffer b(*dev, 16);
  b.fill(s, 1.0f);
  EXPECT_EQ(s.commits(), 2u);  // the hold's callback and the fill
  if (is_cpu()) {
    EXPECT_FALSE(s.query());
  }
  hold.release();
  s.synchronize();
  EXPECT_TRUE(s.query());
}

// Adaptive: a commit after every N kernels, the rest on demand.
TEST_F(StreamTest, SyncModeAdaptiveCommitsEveryNKernels) {
  auto dev = device_with(SyncMode::kAdaptive, 4);
  FloatBuffer b(*dev, 64);
  Stream s = dev->streams().at(1);
  for (int i = 1; i <= 10; ++i) {
    b.fill(s, static_cast<float>(i));
    EXPECT_EQ(s.commits(), static_cast<uint64_t>(i / 4)) << "after kernel " << i;
  }
  s.synchronize();  // commits the two left over
  EXPECT_EQ(s.commits(), 3u);
  EXPECT_EQ(dev->driver().stats().command_buffers_committed, 3u);
  EXPECT_EQ(b.read(s)[10], 10.0f);
}

// Kernels on one stream run in order even across command buffers.
TEST_F(StreamTest, KernelsRunInEncodingOrder) {
  auto dev = device_with(SyncMode::kAdaptive, 3);
  FloatBuffer a(*dev, 256), out(*dev, 256);
  Stream s = dev->streams().at(2);
  a.fill(s, 1.0f);
  for (int i = 0; i < 20; ++i)  // a = a * 2, twenty times, over seven command buffers
    s.dispatch("scale_f32", KernelArgs().ptr(a.ptr()).ptr(a.ptr()).f64(2.0).size(256));
  s.dispatch("add_f32", KernelArgs().ptr(a.ptr()).ptr(a.ptr()).ptr(out.ptr()).size(256));
  auto v = out.read(s);
  EXPECT_EQ(v[0], 2.0f * (1 << 20));
  EXPECT_EQ(v[255], 2.0f * (1 << 20));
}

// A kernel that fails makes synchronize() throw, once; the stream goes on.
TEST_F(StreamTest, FailedCommandBufferReachesSynchronizeOnce) {
  if (!is_cpu())
    GTEST_SKIP() << "on " << kBackend
                 << " a faulting kernel loses the device for the whole process (DeviceLost), "
                    "which the backend's own child-process fault test covers";
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  s.dispatch("trap", KernelArgs());
  EXPECT_THROW(s.synchronize(), InvalidState);
  EXPECT_NO_THROW(s.synchronize());
  FloatBuffer b(*dev, 8);
  b.fill(s, 3.0f);
  EXPECT_EQ(b.read(s)[7], 3.0f);
}

// ---- Fences (Stream::fence) -------------------------------------------------------

TEST_F(StreamTest, DefaultFenceAndFenceOfAnIdleStreamAreReached) {
  auto dev = make_device();
  StreamFence none;
  EXPECT_TRUE(none.reached());
  EXPECT_NO_THROW(none.wait());
  StreamFence idle = dev->streams().at(1).fence();  // nothing ever committed
  EXPECT_TRUE(idle.reached());
  EXPECT_NO_THROW(idle.wait());
}

TEST_F(StreamTest, FenceCommitsAndIsReachedOnlyAfterTheWorkBeforeIt) {
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  FloatBuffer b(*dev, 64);
  Hold hold(s);  // nothing committed after this runs until release()
  b.fill(s, 5.0f);
  const uint64_t commits = s.commits();
  StreamFence f = s.fence();
  EXPECT_GT(s.commits(), commits) << "fence() must commit what is encoded";
  if (is_cpu()) {
    EXPECT_FALSE(f.reached()) << "reached while the stream is held";
  }
  hold.release();
  f.wait();
  EXPECT_TRUE(f.reached());
  EXPECT_EQ(b.read(s)[63], 5.0f);
}

TEST_F(StreamTest, FenceDoesNotWaitForWorkEncodedAfterIt) {
  if (!is_cpu()) GTEST_SKIP() << "needs the cpu backend's exact Hold";
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  FloatBuffer b(*dev, 64);
  b.fill(s, 1.0f);
  StreamFence first = s.fence();
  first.wait();  // the stream is idle now
  b.fill(s, 2.0f);
  StreamFence second = s.fence();
  Hold hold(s);  // holds what comes after `second`
  b.fill(s, 3.0f);
  s.commit();
  second.wait();  // returns although later work is held
  EXPECT_TRUE(second.reached());
  hold.release();
  EXPECT_EQ(b.read(s)[0], 3.0f);
}

TEST_F(StreamTest, FenceWaitRethrowsAFailureBeforeItOnce) {
  if (!is_cpu())
    GTEST_SKIP() << "on " << kBackend
                 << " a faulting kernel loses the device for the whole process (DeviceLost)";
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  s.dispatch("trap", KernelArgs());
  StreamFence f = s.fence();
  EXPECT_THROW(f.wait(), InvalidState);
  // The stream's error went to this wait; the fenced buffer itself failed, so
  // a second wait on the same fence still reports it.
  EXPECT_THROW(f.wait(), InvalidState);
  EXPECT_NO_THROW(s.synchronize()) << "the stream's error was rethrown once, to the fence";
  FloatBuffer b(*dev, 8);
  b.fill(s, 4.0f);
  StreamFence ok = s.fence();
  EXPECT_NO_THROW(ok.wait());
  EXPECT_EQ(b.read(s)[7], 4.0f);
}

TEST_F(StreamTest, AnEarlierFenceDoesNotTakeALaterBuffersFailure) {
  if (!is_cpu())
    GTEST_SKIP() << "on " << kBackend
                 << " a faulting kernel loses the device for the whole process (DeviceLost)";
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  FloatBuffer b(*dev, 8);
  b.fill(s, 1.0f);
  StreamFence before = s.fence();
  s.dispatch("trap", KernelArgs());
  StreamFence after = s.fence();
  ASSERT_TRUE(eventually([&] { return after.reached(); }, std::chrono::seconds(20)));
  EXPECT_NO_THROW(before.wait()) << "the failure came after this fence";
  EXPECT_THROW(after.wait(), InvalidState);
  EXPECT_NO_THROW(s.synchronize()) << "the failure was rethrown once, to its own fence";
}

TEST_F(StreamTest, UnknownKernelIsInvalidArgumentNamingIt) {
  auto dev = make_device();
  try {
    dev->streams().at(1).dispatch("no_such_kernel", KernelArgs());
    FAIL() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("no_such_kernel"), std::string::npos) << e.what();
  }
}

// ---- EncodingLock statistics -----------------------------------------------------

std::shared_ptr<Device> device_with_lock(EncodingLockMode mode, bool agx = false) {
  Config c = test_config();
  c.encoding_lock = mode;
  c.cpu_agx_model = agx;
  return make_device(c);
}

void encode_some(Device& dev, int kernels) {
  FloatBuffer b(dev, 16);
  Stream s = dev.streams().at(1);
  for (int i = 0; i < kernels; ++i) b.fill(s, 1.0f);
  s.synchronize();
}

TEST_F(StreamTest, EncodingLockCountsAcquisitionsWhenOn) {
  auto dev = device_with_lock(EncodingLockMode::kOn);
  ASSERT_TRUE(dev->encoding_lock().enabled());
  EXPECT_EQ(dev->encoding_lock().stats().acquisitions, 0u);
  encode_some(*dev, 10);
  const auto st = dev->encoding_lock().stats();
  // At least one acquisition per kernel (plus opening and ending encoders).
  EXPECT_GE(st.acquisitions, 10u);
  EXPECT_EQ(st.contended, 0u) << "one thread cannot contend with itself";
  EXPECT_EQ(st.wait.count(), 0);
  dev->encoding_lock().reset_stats();
  EXPECT_EQ(dev->encoding_lock().stats().acquisitions, 0u);
}

TEST_F(StreamTest, EncodingLockCountsNothingWhenOff) {
  auto dev = device_with_lock(EncodingLockMode::kOff);
  EXPECT_FALSE(dev->encoding_lock().enabled());
  encode_some(*dev, 10);
  EXPECT_EQ(dev->encoding_lock().stats().acquisitions, 0u);
}

// Auto: on only when the driver says its encoding path is not thread-safe.
TEST_F(StreamTest, EncodingLockAutoFollowsTheDriver) {
  auto dev = device_with_lock(EncodingLockMode::kAuto);
  EXPECT_EQ(dev->encoding_lock().enabled(), !dev->driver().encoding_thread_safe());
  encode_some(*dev, 5);
  EXPECT_EQ(dev->encoding_lock().stats().acquisitions > 0, dev->encoding_lock().enabled());
  if (is_cpu()) {
    auto agx = device_with_lock(EncodingLockMode::kAuto, /*agx=*/true);
    EXPECT_FALSE(agx->driver().encoding_thread_safe());
    EXPECT_TRUE(agx->encoding_lock().enabled());
    encode_some(*agx, 5);
    EXPECT_GE(agx->encoding_lock().stats().acquisitions, 5u);
  }
}

// ---- StreamGuard -----------------------------------------------------------------

TEST_F(StreamTest, StreamGuardSetsAndRestoresNested) {
  auto dev = make_device();
  const Stream first = dev->current_stream();
  EXPECT_EQ(first.index(), 1);  // round-robin's first pick
  EXPECT_EQ(dev->current_stream(), first) << "the current stream is kept for the thread";
  {
    StreamGuard g(dev->streams().at(5));
    EXPECT_EQ(dev->current_stream().index(), 5);
    {
      StreamGuard g2(dev->default_stream());
      EXPECT_TRUE(dev->current_stream().is_default());
    }
    EXPECT_EQ(dev->current_stream().index(), 5);
  }
  EXPECT_EQ(dev->current_stream(), first);
}

TEST_F(StreamTest, StreamGuardRestoresWhenUnwinding) {
  auto dev = make_device();
  const Stream first = dev->current_stream();
  try {
    StreamGuard g(dev->streams().at(9));
    throw std::runtime_error("unwind");
  } catch (const std::runtime_error&) {
  }
  EXPECT_EQ(dev->current_stream(), first);
}

// A guard on a thread with no current stream restores "none": the thread's
// next current_stream() comes from the pool, not the guard's stream.
TEST_F(StreamTest, StreamGuardOnFreshThreadRestoresNone) {
  auto dev = make_device();
  EXPECT_EQ(dev->current_stream().index(), 1);  // takes round-robin pick 1
  int inside = -1, after = -1;
  std::thread t([&] {
    {
      StreamGuard g(dev->streams().at(7));
      inside = dev->current_stream().index();
    }
    after = dev->current_stream().index();
  });
  t.join();
  EXPECT_EQ(inside, 7);
  EXPECT_EQ(after, 2) << "expected the pool's next round-robin stream";
}

TEST_F(StreamTest, StreamGuardDoesNotTouchOtherDevices) {
  auto a = make_device();
  auto b = make_device();
  const Stream a_first = a->current_stream();
  {
    StreamGuard g(b->streams().at(4));
    EXPECT_EQ(b->current_stream().index(), 4);
    EXPECT_EQ(a->current_stream(), a_first);
  }
  EXPECT_EQ(a->current_stream(), a_first);
}

TEST_F(StreamTest, SetCurrentStreamOfAnotherDeviceIsInvalidArgument) {
  auto a = make_device();
  auto b = make_device();
  EXPECT_THROW(a->set_current_stream(b->streams().at(1)), InvalidArgument);
}

}  // namespace
}  // namespace flotilla::test
