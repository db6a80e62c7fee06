// Stream::record / replay (Note [Recording] in stream.cpp): a replay runs
// the recorded kernels on the memory's contents at replay time; recording
// runs nothing; the stream is the recording thread's alone meanwhile; memory
// allocated while recording is held until the recording goes. Both backends
// (a CUDA graph on cuda).
#include <chrono>
#include <thread>

#include "runtime/runtime_test_util.h"

namespace flotilla::test {
namespace {

using backend::KernelArgs;

class RecordingTest : public RuntimeTest {};

void add(Stream s, const FloatBuffer& a, const FloatBuffer& b, const FloatBuffer& out) {
  s.dispatch("add_f32", KernelArgs().ptr(a.ptr()).ptr(b.ptr()).ptr(out.ptr()).size(a.count()));
}

// Would catch: a recorder that runs what it records, or a replay that
// computes on the values seen at recording time instead of the current ones.
TEST_F(RecordingTest, AReplayRunsTheRecordedKernelsOnTheCurrentContents) {
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  FloatBuffer a(*dev, 256), b(*dev, 256), out(*dev, 256);
  a.fill(s, 1.0f);
  b.fill(s, 2.0f);
  out.fill(s, -1.0f);
  s.synchronize();
  Recording rec = s.record([&] {
    add(s, a, b, out);
    s.dispatch("scale_f32", KernelArgs().ptr(out.ptr()).ptr(out.ptr()).f64(10.0).size(256));
  });
  ASSERT_TRUE(rec.valid());
  EXPECT_EQ(rec.kernels(), 2u);
  EXPECT_EQ(rec.stream(), s);
  EXPECT_EQ(out.read(s)[0], -1.0f) << "recording ran the kernels";

  s.replay(rec);
  EXPECT_EQ(out.read(s)[255], 30.0f);
  a.fill(s, 5.0f);  // new inputs, same addresses
  s.replay(rec);
  s.replay(rec);  // twice: the same result, nothing accumulates
  EXPECT_EQ(out.read(s)[100], 70.0f);
}

// Would catch: replays reordered against the stream's other work.
TEST_F(RecordingTest, ReplaysKeepTheStreamsOrder) {
  auto dev = make_device();
  Stream s = dev->streams().at(2);
  FloatBuffer a(*dev, 1024), b(*dev, 1024), out(*dev, 1024);
  b.fill(s, 1.0f);
  Recording rec = s.record([&] { add(s, a, b, out); });
  for (int i = 0; i < 20; ++i) {
    a.fill(s, static_cast<float>(i));
    s.replay(rec);
    out.read(s);  // synchronizes
  }
  a.fill(s, 100.0f);
  s.replay(rec);
  a.fill(s, 0.0f);  // after the replay: must not change its result
  EXPECT_EQ(out.read(s)[1023], 101.0f);
}

// Would catch: a recording thread able to commit (on CUDA the completion
// would land in the graph), to wait for its own recording, or to nest.
TEST_F(RecordingTest, InsideARecordingOnlyDispatchIsAllowed) {
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  FloatBuffer a(*dev, 64), b(*dev, 64), out(*dev, 64);
  Recording inner = s.record([&] { add(s, a, b, out); });
  Event e(*dev);
  int refused = 0;
  Recording rec = s.record([&] {
    add(s, a, b, out);
    for (auto* call : {+[](Stream x) { x.commit(); }, +[](Stream x) { x.synchronize(); },
                       +[](Stream x) { x.fence(); }, +[](Stream x) { x.add_callback([] {}); }}) {
      try {
        call(s);
      } catch (const InvalidState& err) {
        ++refused;
        EXPECT_NE(std::string(err.what()).find("recording"), std::string::npos) << err.what();
      }
    }
    EXPECT_THROW(e.record(s), InvalidState);
    EXPECT_THROW(s.record([] {}), InvalidState);  // no nesting
    EXPECT_THROW(s.replay(inner), InvalidState);  // no replay inside a recording
  });
  EXPECT_EQ(refused, 4);
  EXPECT_EQ(rec.kernels(), 1u);
  // The stream works normally afterwards.
  a.fill(s, 3.0f);
  b.fill(s, 4.0f);
  s.replay(rec);
  EXPECT_EQ(out.read(s)[0], 7.0f);
}

// Would catch: another thread's work landing inside the recording (it would
// then run at every replay, and not at its own time).
TEST_F(RecordingTest, AnotherThreadsWorkWaitsForTheRecordingToEnd) {
  auto dev = make_device();
  Stream s = dev->streams().at(3);
  FloatBuffer a(*dev, 64), b(*dev, 64), out(*dev, 64), other(*dev, 64);
  std::atomic<bool> started{false}, encoded{false};
  std::thread t;
  Recording rec = s.record([&] {
    add(s, a, b, out);
    t = std::thread([&] {
      started.store(true);
      other.fill(s, 9.0f);  // waits until the recording ends
      encoded.store(true);
    });
    while (!started.load()) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_FALSE(encoded.load()) << "another thread encoded on a recording stream";
  });
  t.join();
  EXPECT_TRUE(encoded.load());
  EXPECT_EQ(rec.kernels(), 1u);
  EXPECT_EQ(other.read(s)[0], 9.0f);
}

// Would catch: a replay on a stream whose memory order does not cover the
// recording (on CUDA its cuBLASLt workspace belongs to the recording stream).
TEST_F(RecordingTest, ARecordingReplaysOnlyOnItsStream) {
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  FloatBuffer a(*dev, 64), b(*dev, 64), out(*dev, 64);
  Recording rec = s.record([&] { add(s, a, b, out); });
  EXPECT_THROW(dev->streams().at(2).replay(rec), InvalidArgument);
  EXPECT_THROW(s.replay(Recording()), InvalidArgument);
}

// Would catch: memory a replay writes handed to another tensor (the
// recording must hold what the body allocated until it is destroyed).
TEST_F(RecordingTest, MemoryAllocatedWhileRecordingIsHeldUntilTheRecordingGoes) {
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  Allocator& alloc = dev->allocator();
  void* inside = nullptr;
  const size_t bytes = 4096;
  Recording rec = s.record([&] {
    Allocation tmp = alloc.allocate(bytes, s);
    inside = tmp.device_ptr();
    s.dispatch("fill_f32", KernelArgs().ptr(tmp.device_ptr()).f64(1.0).size(bytes / 4));
  });  // tmp freed inside: held, not cached
  EXPECT_GE(alloc.stats().held_bytes, bytes);
  std::vector<Allocation> later;
  for (int i = 0; i < 4; ++i) {
    later.push_back(alloc.allocate(bytes, s));
    EXPECT_NE(later.back().device_ptr(), inside) << "a held block was handed out again";
  }
  s.replay(rec);
  s.synchronize();
  later.clear();
  rec = Recording();  // the last copy goes: the hold is released
  EXPECT_EQ(alloc.stats().held_bytes, 0u);
  if (alloc.caching()) {
    bool reused = false;
    std::vector<Allocation> again;
    for (int i = 0; i < 8 && !reused; ++i) {
      again.push_back(alloc.allocate(bytes, s));
      reused = again.back().device_ptr() == inside;
    }
    EXPECT_TRUE(reused) << "the released block never came back to the cache";
  }
}

// Would catch: a failed body leaving the stream locked or half-recorded.
TEST_F(RecordingTest, ABodyThatThrowsRecordsNothingAndLeavesTheStreamUsable) {
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  FloatBuffer a(*dev, 64), b(*dev, 64), out(*dev, 64);
  EXPECT_THROW(s.record([&] {
    add(s, a, b, out);
    throw std::runtime_error("model failed");
  }),
               std::runtime_error);
  EXPECT_EQ(dev->allocator().stats().held_bytes, 0u);
  a.fill(s, 1.0f);
  b.fill(s, 1.0f);
  add(s, a, b, out);  // runs eagerly again
  EXPECT_EQ(out.read(s)[0], 2.0f);
  Recording rec = s.record([&] { add(s, a, b, out); });
  EXPECT_EQ(rec.kernels(), 1u);
}

// Would catch: a driver that lets a command buffer use a recording queue.
TEST_F(RecordingTest, TheDriverRefusesCommandBuffersOnARecordingQueue) {
  auto dev = make_device();
  backend::Driver& driver = dev->driver();
  auto queue = driver.new_queue();
  FloatBuffer out(*dev, 16);
  auto recorder = queue->new_recorder();
  EXPECT_THROW(queue->new_recorder(), InvalidState);
  auto cb = queue->new_command_buffer();
  auto& enc = cb->compute_encoder();
  try {
    enc.dispatch(driver.pipeline("fill_f32"), KernelArgs().ptr(out.ptr()).f64(1.0).size(16));
    FAIL() << "a kernel was encoded on a recording queue";
  } catch (const ValidationError& e) {
    EXPECT_EQ(std::string(e.rule()), "encode-while-recording");
  }
  recorder->dispatch(driver.pipeline("fill_f32"), KernelArgs().ptr(out.ptr()).f64(4.0).size(16));
  auto list = recorder->finish();
  EXPECT_EQ(list->kernel_count(), 1u);
  enc.execute(*list);
  enc.end_encoding();
  cb->commit();
  cb->wait_until_completed();
  EXPECT_EQ(cb->status(), backend::CommandBufferStatus::kCompleted);
  Stream s = dev->streams().at(1);
  EXPECT_EQ(out.read(s)[15], 4.0f);
  // Another queue's list is refused.
  auto other = driver.new_queue();
  auto cb2 = other->new_command_buffer();
  auto& enc2 = cb2->compute_encoder();
  EXPECT_THROW(enc2.execute(*list), InvalidArgument);
  enc2.end_encoding();
  cb2->commit();
  cb2->wait_until_completed();
}

}  // namespace
}  // namespace flotilla::test
