// Event: query, elapsed time, callbacks (ownership, errors), cross-stream wait.
// Single-threaded from the test's side (label unit); callbacks run on driver threads.
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>

#include "runtime/event_state.h"
#include "runtime/runtime_test_util.h"

namespace flotilla::test {
namespace {

using backend::KernelArgs;
using std::chrono::milliseconds;

class EventTest : public RuntimeTest {};

TEST_F(EventTest, QueryFollowsTheMarker) {
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  Event e(*dev);
  EXPECT_TRUE(e.query()) << "a never-recorded event counts as reached (as in CUDA)";
  EXPECT_EQ(e.recorded_value(), 0u);
  {
    Hold hold(s);
    e.record(s);
    EXPECT_NE(e.recorded_value(), 0u);
    EXPECT_FALSE(e.query()) << "reached while the stream is held";
    EXPECT_FALSE(e.synchronize_for(milliseconds(20)));
    hold.release();
    e.synchronize();
  }
  EXPECT_TRUE(e.query());
  EXPECT_TRUE(e.synchronize_for(milliseconds(0)));
}

// record() commits the stream, so the marker is reached without a commit.
TEST_F(EventTest, RecordCommitsTheStream) {
  Config c = test_config();
  c.sync_mode = SyncMode::kNone;
  auto dev = make_device(c);
  FloatBuffer b(*dev, 8);
  Stream s = dev->streams().at(1);
  b.fill(s, 2.0f);
  EXPECT_EQ(s.commits(), 0u);
  Event e(*dev);
  e.record(s);
  EXPECT_EQ(s.commits(), 1u);
  ASSERT_TRUE(e.synchronize_for(std::chrono::seconds(10))) << "the recorded marker never came";
}

TEST_F(EventTest, ElapsedTimeMeasuresTheWorkBetween) {
  auto dev = make_device();
  if (!has_kernel(*dev, "sleep_us")) GTEST_SKIP() << "the backend has no sleep_us kernel";
  Stream s = dev->streams().at(1);
  Event start(*dev), end(*dev);
  EXPECT_THROW(start.elapsed_ms(end), InvalidState) << "neither is recorded";
  start.record(s);
  s.dispatch("sleep_us", KernelArgs().i64(30000));
  end.record(s);
  end.synchronize();
  const double ms = start.elapsed_ms(end);
  EXPECT_GE(ms, 29.0);
  EXPECT_LT(ms, 5000.0);
  EXPECT_LE(end.elapsed_ms(start), -29.0) << "elapsed time is signed";
}

TEST_F(EventTest, ElapsedTimeBeforeTheMarkerIsReachedIsInvalidState) {
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  Event start(*dev), end(*dev);
  start.record(s);
  start.synchronize();
  Hold hold(s);
  end.record(s);
  try {
    (void)start.elapsed_ms(end);
    FAIL() << "no error while the end marker is pending";
  } catch (const InvalidState& e) {
    EXPECT_NE(std::string(e.what()).find("[Event::elapsed_ms]"), std::string::npos) << e.what();
  }
  hold.release();
  end.synchronize();
  EXPECT_GE(start.elapsed_ms(end), 0.0);
}

TEST_F(EventTest, ThenRunsAfterTheMarkerOrAtOnce) {
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  Event e(*dev);
  EXPECT_THROW(e.then([] {}), InvalidState) << "then() needs a record()";
  std::atomic<int> ran{0};
  {
    Hold hold(s);
    e.record(s);
    e.then([&] { ran.fetch_add(1); });
    std::this_thread::sleep_for(milliseconds(10));
    EXPECT_EQ(ran.load(), 0) << "the callback ran before the marker";
    hold.release();
    e.synchronize();  // waits for the callbacks registered so far
    EXPECT_EQ(ran.load(), 1);
  }
  e.then([&] { ran.fetch_add(10); });  // already reached: runs at once, here
  EXPECT_EQ(ran.load(), 11);
}

// An event dropped with callbacks pending: the callback still runs, and the
// event's state is not returned to the pool (or freed) until it has. The bug
// this catches is the seed's use-after-free: a callback that captured a raw
// pointer to an event its owner already freed (ASan reports it; the pool's
// count shows it without ASan).
TEST_F(EventTest, DroppedEventWithPendingCallbacksIsSafe) {
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  const size_t cached_before = dev->events().cached();
  auto payload = std::make_shared<std::vector<int>>(1024, 0);
  std::weak_ptr<std::vector<int>> payload_alive = payload;
  std::atomic<int> ran{0};
  Hold hold(s);
  {
    Event e(*dev);
    e.record(s);
    for (int i = 0; i < 4; ++i)
      e.then([p = payload, &ran, i] {
        (*p)[1023 - static_cast<size_t>(i)] = i + 1;
        ran.fetch_add(1);
      });
    ASSERT_FALSE(e.query());
  }  // the last Event handle is gone
  payload.reset();
  EXPECT_FALSE(payload_alive.expired()) << "the callbacks' captures were freed early";
  EXPECT_EQ(dev->events().cached(), cached_before)
      << "the event went back to the pool while its callbacks were pending";
  hold.release();
  ASSERT_TRUE(eventually([&] { return ran.load() == 4; })) << "callbacks ran: " << ran.load();
  // Once they have run, the captures are released and the event is reused.
  EXPECT_TRUE(eventually([&] { return payload_alive.expired(); }));
  EXPECT_TRUE(eventually([&] { return dev->events().cached() == cached_before + 1; }));
  // A reused event starts clean.
  Event again(*dev);
  EXPECT_TRUE(again.query());
  EXPECT_EQ(again.recorded_value(), 0u);
  again.record(s);
  EXPECT_TRUE(again.synchronize_for(std::chrono::seconds(10)))
      << "a reused event carries its previous owner's pending callbacks";
}

// A callback that throws: the thread that ran it survives, the others run,
// and Event::synchronize rethrows the first error once.
TEST_F(EventTest, ThrowingCallbackReachesSynchronizeOnce) {
  Config c = test_config();
  c.cpu_exec_threads = 2;  // few threads: a killed one would stall the device
  auto dev = make_device(c);
  Stream s = dev->streams().at(1);
  Event e(*dev);
  std::atomic<int> others{0};
  {
    Hold hold(s);
    e.record(s);
    e.then([&] { others.fetch_add(1); });
    e.then([] { throw std::runtime_error("callback boom"); });
    e.then([] { throw std::logic_error("second error, not reported"); });
    e.then([&] { others.fetch_add(1); });
  }  // released: the callbacks run on a driver thread
  try {
    e.synchronize();
    FAIL() << "the callback's error did not reach synchronize()";
  } catch (const std::runtime_error& err) {
    EXPECT_STREQ(err.what(), "callback boom");
  }
  EXPECT_EQ(others.load(), 2);
  EXPECT_NO_THROW(e.synchronize()) << "the error is reported once";
  // The driver threads are alive: more work on several streams completes.
  for (int i = 1; i <= 4; ++i) {
    FloatBuffer b(*dev, 32);
    Stream t = dev->streams().at(i);
    b.fill(t, static_cast<float>(i));
    EXPECT_EQ(b.read(t)[31], static_cast<float>(i));
  }
}

TEST_F(EventTest, ThrowingStreamCallbackReachesStreamSynchronizeOnce) {
  Config c = test_config();
  c.cpu_exec_threads = 2;
  auto dev = make_device(c);
  Stream s = dev->streams().at(3);
  std::atomic<int> after{0};
  s.add_callback([] { throw std::runtime_error("stream callback boom"); });
  s.add_callback([&] { after.fetch_add(1); });
  try {
    s.synchronize();
    FAIL() << "the callback's error did not reach Stream::synchronize()";
  } catch (const std::runtime_error& err) {
    EXPECT_STREQ(err.what(), "stream callback boom");
  }
  EXPECT_EQ(after.load(), 1) << "a throwing callback stopped the next one";
  EXPECT_NO_THROW(s.synchronize());
  FloatBuffer b(*dev, 8);
  b.fill(s, 5.0f);
  EXPECT_EQ(b.read(s)[0], 5.0f);
}

// The consumer waits on the device for the producer's marker. With the
// producer held, the consumer cannot have run; without the wait it would
// read the old value.
TEST_F(EventTest, WaitOrdersAConsumerStreamAfterTheProducer) {
  auto dev = make_device();
  Stream producer = dev->streams().at(1), consumer = dev->streams().at(2);
  FloatBuffer in(*dev, 128), out(*dev, 128);
  in.fill(producer, 1.0f);
  producer.synchronize();
  Event ready(*dev);
  {
    Hold hold(producer);
    in.fill(producer, 21.0f);
    ready.record(producer);
    ready.wait(consumer);
    consumer.dispatch("scale_f32", KernelArgs().ptr(in.ptr()).ptr(out.ptr()).f64(2.0).size(128));
    consumer.commit();
    if (is_cpu()) {
      std::this_thread::sleep_for(milliseconds(20));
      EXPECT_FALSE(consumer.query()) << "the consumer ran before the producer's marker";
    }
  }
  auto v = out.read(consumer);
  EXPECT_EQ(v[0], 42.0f);
  EXPECT_EQ(v[127], 42.0f);
}

TEST_F(EventTest, WaitOnNeverRecordedEventDoesNothing) {
  auto dev = make_device();
  Stream s = dev->streams().at(1);
  Event e(*dev);
  e.wait(s);
  FloatBuffer b(*dev, 4);
  b.fill(s, 4.0f);
  EXPECT_EQ(b.read(s)[3], 4.0f);
}

TEST_F(EventTest, EventOfAnotherDeviceIsInvalidArgument) {
  auto a = make_device();
  auto b = make_device();
  Event e(*a);
  EXPECT_THROW(e.record(b->streams().at(1)), InvalidArgument);
  e.record(a->streams().at(1));
  EXPECT_THROW(e.wait(b->streams().at(1)), InvalidArgument);
  e.synchronize();
}

}  // namespace
}  // namespace flotilla::test
