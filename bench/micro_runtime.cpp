// Micro-benchmarks of the runtime on the CPU backend (issue 2, item 8).
//
// Each configuration gets its own private device (Device::create), kept for
// the whole process, so settings never leak between benchmarks and the
// process-wide device is untouched. Config::cpu_encode_cost is 0 except in
// rows named encode_cost_ns:200 (the default): that knob busy-waits in every
// driver encoding call to model a real driver's encode work for the
// validation tests, and would otherwise swamp the runtime's own overhead.
//
// Multi-threaded rows (->Threads(N)) use real time: the reported time is wall
// time divided by the operations of all threads together (inverse
// throughput); the CPU column is the CPU of all threads per operation. Work
// left queued is synchronised (outside the timed region where the timer can
// be paused without distorting the figure) so queues never grow unboundedly.
//
// Results: docs/PERF.md, with the command that produced them.
#include <benchmark/benchmark.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "flotilla/flotilla.h"

namespace {

using flotilla::Config;
using flotilla::Device;
using flotilla::Event;
using flotilla::Stream;
using namespace std::chrono_literals;

// ---- Devices, one per configuration --------------------------------------------

// The common base: no simulated encode cost, nothing committed on its own.
Config base_config() {
  Config c;
  c.cpu_encode_cost = 0ns;
  c.sync_mode = flotilla::SyncMode::kNone;
  return c;
}

class Devices {
 public:
  // The device for `key`, made from `config` on first use.
  Device& get(const std::string& key, const Config& config) {
    flotilla::MutexLock lock(mu_);
    auto& d = devices_[key];
    if (!d) d = Device::create("cpu", 0, config);
    return *d;
  }
  // Drains and shuts every device down (end of main).
  void clear() {
    std::map<std::string, std::shared_ptr<Device>> devices;
    {
      flotilla::MutexLock lock(mu_);
      devices.swap(devices_);
    }
    for (auto& [key, d] : devices) d->shutdown();
  }

 private:
  flotilla::Mutex mu_;
  std::map<std::string, std::shared_ptr<Device>> devices_ FL_GUARDED_BY(mu_);
};

Devices& devices() {
  static Devices* d = new Devices;  // never destroyed: main() clears it
  return *d;
}

Device& round_robin_device() { return devices().get("round-robin", base_config()); }

Device& exclusive_device() {
  Config c = base_config();
  c.policy = flotilla::StreamPolicy::kExclusive;
  return devices().get("exclusive", c);
}

Device& cost_device(int64_t encode_cost_ns) {
  Config c = base_config();
  c.cpu_encode_cost = std::chrono::nanoseconds(encode_cost_ns);
  return devices().get("cost" + std::to_string(encode_cost_ns), c);
}

Device& lock_device(flotilla::EncodingLockMode mode) {
  Config c = base_config();
  c.encoding_lock = mode;
  return devices().get(std::string("lock-") + flotilla::to_string(mode), c);
}

// A tiny kernel: fill one float. Its arguments are fixed before the loop.
struct TinyKernel {
  explicit TinyKernel(Device& dev)
      : pipeline(dev.pipeline("fill_f32")), buffer(dev.driver().allocate(64)) {
    args.ptr(buffer->device_ptr()).f64(1.0).size(1);
  }
  const flotilla::backend::Pipeline& pipeline;
  std::unique_ptr<flotilla::backend::Buffer> buffer;
  flotilla::backend::KernelArgs args;
};

// Kernels encoded between two synchronize() calls in the encode benchmarks;
// the synchronize runs with the timer paused.
constexpr int kEncodeBatch = 512;

// ---- Stream acquisition -------------------------------------------------------------

// Round-robin: one relaxed fetch_add on the pool's counter (Figure 3).
void BM_AcquireRoundRobin(benchmark::State& state) {
  auto& pool = round_robin_device().streams();
  for (auto _ : state) benchmark::DoNotOptimize(pool.acquire().index());
}
BENCHMARK(BM_AcquireRoundRobin)->Threads(1)->Threads(2)->Threads(4)->Threads(8)->UseRealTime();

// Exclusive, thread already bound: a scan of the thread's bindings.
void BM_AcquireExclusiveBound(benchmark::State& state) {
  auto& pool = exclusive_device().streams();
  pool.acquire();  // binds a slot outside the timed loop
  for (auto _ : state) benchmark::DoNotOptimize(pool.acquire().index());
}
BENCHMARK(BM_AcquireExclusiveBound)->Threads(1)->Threads(2)->Threads(4)->Threads(8)->UseRealTime();

// Device::current_stream() once the thread has one: the hot path of every op.
void BM_CurrentStream(benchmark::State& state) {
  auto& dev = round_robin_device();
  dev.current_stream();
  for (auto _ : state) benchmark::DoNotOptimize(dev.current_stream().index());
}
BENCHMARK(BM_CurrentStream)->Threads(1)->Threads(2)->Threads(4)->Threads(8)->UseRealTime();

// flotilla::current_stream(): the same through Device::get() (process-wide
// device: backend table lookup and call_once fast path added).
void BM_CurrentStreamGlobal(benchmark::State& state) {
  flotilla::current_stream();
  for (auto _ : state) benchmark::DoNotOptimize(flotilla::current_stream().index());
}
BENCHMARK(BM_CurrentStreamGlobal);

// ---- Commit-and-wait round trips ------------------------------------------------

// The driver alone: an empty command buffer committed and waited for (the
// hand-off to an execution thread and back).
void BM_DriverEmptyCommitWait(benchmark::State& state) {
  auto& dev = round_robin_device();
  auto queue = dev.driver().new_queue();
  for (auto _ : state) {
    auto cb = queue->new_command_buffer();
    cb->commit();
    cb->wait_until_completed();
  }
}
BENCHMARK(BM_DriverEmptyCommitWait)->Unit(benchmark::kMicrosecond);

// Stream::synchronize() with nothing encoded: no command buffer is made.
void BM_StreamSynchronizeNothing(benchmark::State& state) {
  Stream s = round_robin_device().streams().at(1);
  s.synchronize();
  for (auto _ : state) s.synchronize();
}
BENCHMARK(BM_StreamSynchronizeNothing);

// One tiny kernel, then synchronize(): a full round trip through a stream.
// Arg: Config::cpu_encode_cost in ns (0, and the default 200).
void BM_StreamOneKernelSynchronize(benchmark::State& state) {
  auto& dev = cost_device(state.range(0));
  Stream s = dev.streams().at(1);
  TinyKernel k(dev);
  for (auto _ : state) {
    s.dispatch(k.pipeline, k.args);
    s.synchronize();
  }
}
BENCHMARK(BM_StreamOneKernelSynchronize)
    ->ArgName("encode_cost_ns")
    ->Arg(0)
    ->Arg(200)
    ->Unit(benchmark::kMicrosecond);

// ---- Per-kernel encode overhead on an open encoder ------------------------------

// Single thread, encode only: kernels go into the stream's open encoder
// (SyncMode::kNone) and every kEncodeBatch the stream is synchronised with the
// timer paused. Args: cpu_encode_cost in ns; EncodingLock forced on (1) or
// off (0).
void BM_Encode(benchmark::State& state) {
  Config c = base_config();
  c.cpu_encode_cost = std::chrono::nanoseconds(state.range(0));
  c.encoding_lock =
      state.range(1) ? flotilla::EncodingLockMode::kOn : flotilla::EncodingLockMode::kOff;
  auto& dev = devices().get(
      "encode-" + std::to_string(state.range(0)) + "-" + std::to_string(state.range(1)), c);
  Stream s = dev.streams().at(1);
  TinyKernel k(dev);
  int n = 0;
  for (auto _ : state) {
    s.dispatch(k.pipeline, k.args);
    if (++n == kEncodeBatch) {
      state.PauseTiming();
      s.synchronize();
      state.ResumeTiming();
      n = 0;
    }
  }
  s.synchronize();
}
BENCHMARK(BM_Encode)
    ->ArgNames({"encode_cost_ns", "lock"})
    ->Args({0, 0})
    ->Args({0, 1})
    ->Args({200, 0});

// The same kernel looked up by name on every dispatch (a map lookup).
void BM_EncodeByName(benchmark::State& state) {
  auto& dev = round_robin_device();
  Stream s = dev.streams().at(1);
  TinyKernel k(dev);
  int n = 0;
  for (auto _ : state) {
    s.dispatch("fill_f32", k.args);
    if (++n == kEncodeBatch) {
      state.PauseTiming();
      s.synchronize();
      state.ResumeTiming();
      n = 0;
    }
  }
  s.synchronize();
}
BENCHMARK(BM_EncodeByName);

// Multi-threaded encoding, amortised: each thread commits every kEncodeBatch
// kernels and synchronises every kSyncEvery commits, inside the timed region
// (pausing one thread's timer while the others run would make the per-thread
// real times overlap and flatter the figure). A row's time is wall time per
// kernel of all threads together, commits and waits included; its CPU time is
// the CPU of all threads per kernel, flat when nothing is contended.
constexpr int kSyncEvery = 8;

void encode_amortised(benchmark::State& state, Stream s, const TinyKernel& k) {
  int n = 0;
  int commits = 0;
  for (auto _ : state) {
    s.dispatch(k.pipeline, k.args);
    if (++n == kEncodeBatch) {
      n = 0;
      if (++commits == kSyncEvery) {
        commits = 0;
        s.synchronize();
      } else {
        s.commit();
      }
    }
  }
  s.synchronize();
}

// All threads on one stream: its mutex serialises them (what round-robin
// sharing costs when threads outnumber streams).
void BM_EncodeSharedStream(benchmark::State& state) {
  auto& dev = round_robin_device();
  TinyKernel k(dev);
  encode_amortised(state, dev.streams().at(1), k);
}
BENCHMARK(BM_EncodeSharedStream)->Threads(1)->Threads(2)->Threads(4)->Threads(8)->UseRealTime();

// Each thread on its own stream (1 + thread index), EncodingLock forced off
// or on (Config::encoding_lock; off is what kAuto picks on this driver).
// Thread 0 reports the share of lock acquisitions that had to wait and the
// wait per kernel, from EncodingLock::stats().
template <flotilla::EncodingLockMode kMode>
void BM_EncodeLock(benchmark::State& state) {
  auto& dev = lock_device(kMode);
  TinyKernel k(dev);
  if (state.thread_index() == 0) dev.encoding_lock().reset_stats();
  encode_amortised(state, dev.streams().at(1 + state.thread_index()), k);
  if (state.thread_index() == 0) {
    const auto st = dev.encoding_lock().stats();
    const double kernels = static_cast<double>(state.iterations()) * state.threads();
    state.counters["contended_pct"] =
        st.acquisitions ? 100.0 * static_cast<double>(st.contended) / st.acquisitions : 0.0;
    state.counters["wait_ns_per_kernel"] =
        kernels > 0 ? static_cast<double>(st.wait.count()) / kernels : 0.0;
  }
}
BENCHMARK_TEMPLATE(BM_EncodeLock, flotilla::EncodingLockMode::kOff)
    ->Threads(1)
    ->Threads(2)
    ->Threads(4)
    ->Threads(8)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_EncodeLock, flotilla::EncodingLockMode::kOn)
    ->Threads(1)
    ->Threads(2)
    ->Threads(4)
    ->Threads(8)
    ->UseRealTime();

// ---- Commit per kernel ---------------------------------------------------------

// One tiny kernel then commit() (what SyncMode::kCommit does), each thread on
// its own stream, synchronised every 64 commits inside the timed region: the
// cost of the commit path (a new command buffer, its completion handler, the
// hand-off to the driver's execution threads) and how it scales.
void BM_CommitPerKernel(benchmark::State& state) {
  auto& dev = round_robin_device();
  TinyKernel k(dev);
  Stream s = dev.streams().at(1 + state.thread_index());
  int n = 0;
  for (auto _ : state) {
    s.dispatch(k.pipeline, k.args);
    s.commit();
    if (++n == 64) {
      s.synchronize();
      n = 0;
    }
  }
  s.synchronize();
}
BENCHMARK(BM_CommitPerKernel)->Threads(1)->Threads(2)->Threads(4)->Threads(8)->UseRealTime();

// ---- Events -------------------------------------------------------------------------

// Taking an event from the device's pool and giving it back.
void BM_EventCreate(benchmark::State& state) {
  auto& dev = round_robin_device();
  { Event warm(dev); }
  for (auto _ : state) {
    Event e(dev);
    benchmark::DoNotOptimize(e.recorded_value());
  }
}
BENCHMARK(BM_EventCreate);

// record() (which commits the stream) then query(); drained every 256.
void BM_EventRecordQuery(benchmark::State& state) {
  auto& dev = round_robin_device();
  Stream s = dev.streams().at(1);
  Event e(dev);
  int n = 0;
  for (auto _ : state) {
    e.record(s);
    benchmark::DoNotOptimize(e.query());
    if (++n == 256) {
      state.PauseTiming();
      e.synchronize();
      state.ResumeTiming();
      n = 0;
    }
  }
  e.synchronize();
}
BENCHMARK(BM_EventRecordQuery);

// record() then synchronize(): the event's host round trip.
void BM_EventRecordSynchronize(benchmark::State& state) {
  auto& dev = round_robin_device();
  Stream s = dev.streams().at(1);
  Event e(dev);
  for (auto _ : state) {
    e.record(s);
    e.synchronize();
  }
}
BENCHMARK(BM_EventRecordSynchronize)->Unit(benchmark::kMicrosecond);

// ---- Whole device -------------------------------------------------------------------

// Device::synchronize() with every stream created and idle: the cost of a
// synchronize_all that finds nothing to do.
void BM_DeviceSynchronizeIdle(benchmark::State& state) {
  auto& dev = round_robin_device();
  for (int i = 0; i < dev.streams().size(); ++i) dev.streams().at(i).synchronize();
  for (auto _ : state) dev.synchronize();
}
BENCHMARK(BM_DeviceSynchronizeIdle)->Unit(benchmark::kMicrosecond);

// ---- Thread bindings of devices that no longer exist ----------------------------

// current_stream() on a thread that has used `range(0)` other devices since
// destroyed. A thread's bindings are a list scanned by device id, and entries
// of destroyed devices stay until the thread exits, so a long-lived thread
// that uses many short-lived devices pays a longer scan. Runs last: it leaves
// those entries on the main thread.
void BM_CurrentStreamAfterDeadDevices(benchmark::State& state) {
  thread_local int dead_devices = 0;  // entries this thread has left behind
  while (dead_devices < state.range(0)) {
    Device::create("cpu", 0, base_config())->current_stream();
    ++dead_devices;
  }
  auto& dev = devices().get("after-dead-" + std::to_string(state.range(0)), base_config());
  dev.current_stream();
  for (auto _ : state) benchmark::DoNotOptimize(dev.current_stream().index());
}
BENCHMARK(BM_CurrentStreamAfterDeadDevices)->ArgName("dead_devices")->Arg(0)->Arg(16)->Arg(256);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  devices().clear();
  return 0;
}
