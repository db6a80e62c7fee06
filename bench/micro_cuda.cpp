// Micro-benchmarks of the CUDA backend (Google Benchmark), to set beside the
// raw-CUDA peer (shared/peer/cuda_limits.cu) run in the same command
// (scripts/gpu_check.sh). Skips, exiting 0, where no CUDA device is found.
//
// The tiny kernel is the peer's: add of 1024 floats (4 blocks of 256).
//   submit/T        tiny-kernel submission rate through the full Flotilla path:
//                   per op the thread's current stream (acquire), dispatch
//                   (encode + launch), commit every 64 kernels (adaptive sync
//                   mode, the default); one synchronize at the end. T threads,
//                   20000 ops each, each thread on its own pooled stream.
//                   Peer: "raw-cuda launch threads=T".
//   submit_commit_each/T   the same with a commit after every kernel.
//   driver_submit/T        the driver alone (one command buffer per 64
//                   kernels, no runtime), to split runtime from driver cost.
//   roundtrip/T     dispatch + synchronize per op, 5000 ops per thread.
//                   Peer: "raw-cuda roundtrip threads=T".
//   event_record_query     Event::record + Event::query on one stream.
//                   Peer: "raw-cuda event record+query".
//   legacy_submit/T the legacy architecture for comparison: every thread on
//                   one shared stream (pool_size 2: the seed's single stream,
//                   made safe by the stream's lock).
//   overlap         32 streams each run a chain of four 0.5 ms sleep kernels,
//                   launched stream after stream; "concurrent" is how many
//                   chains ran at once (Note [CUDA_DEVICE_MAX_CONNECTIONS]).
//
// ops_per_s is the aggregate rate of all threads, from their common start to
// the last thread's final synchronize (as in the peer); us_per_op_thread is
// the time per op of one thread. Every benchmark repeats 3 times; read the
// median.
//
// Flags: --cuda_max_connections=N builds the devices with that Config value
// (the environment variable CUDA_DEVICE_MAX_CONNECTIONS, if set, wins).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "flotilla/flotilla.h"

namespace {

using flotilla::Config;
using flotilla::Device;
using flotilla::Event;
using flotilla::Stream;
using flotilla::backend::KernelArgs;

constexpr int kSubmitOps = 20000;
constexpr int kRoundTripOps = 5000;
constexpr size_t kElems = 1024;

// One barrier per benchmark run, made by thread 0 before the timed loop
// (Google Benchmark starts all threads' loops together, after that).
std::unique_ptr<std::barrier<>> g_barrier;

struct ThreadBuffers {
  std::unique_ptr<flotilla::backend::Buffer> x, y;
  KernelArgs add;
  explicit ThreadBuffers(Device& dev)
      : x(dev.driver().allocate(kElems * 4)), y(dev.driver().allocate(kElems * 4)) {
    add = KernelArgs().ptr(y->device_ptr()).ptr(x->device_ptr()).ptr(y->device_ptr()).size(kElems);
    Stream s = dev.current_stream();
    s.dispatch("fill_f32", KernelArgs().ptr(x->device_ptr()).f64(1).size(kElems));
    s.dispatch("fill_f32", KernelArgs().ptr(y->device_ptr()).f64(0).size(kElems));
  }
};

void setup_run(benchmark::State& state) {
  if (state.thread_index() == 0) g_barrier = std::make_unique<std::barrier<>>(state.threads());
}

using Clock = std::chrono::steady_clock;

// Ends a timed run: waits for every thread, then thread 0 reports the
// aggregate rate from the common start to the last thread's finish (the
// peer's definition). Other threads add nothing to the summed counter.
void end_run(benchmark::State& state, Clock::time_point t0, int ops_per_thread) {
  g_barrier->arrive_and_wait();
  if (state.thread_index() != 0) return;
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  state.counters["ops_per_s"] = static_cast<double>(ops_per_thread) * state.threads() / secs;
  state.counters["us_per_op_thread"] = secs * 1e6 / ops_per_thread;
}

// Warm-up outside the timed loop: creates the thread's stream and command
// buffers, loads the kernels.
void warm_up(Device& dev, const flotilla::backend::Pipeline& p, const KernelArgs& a) {
  Stream s = dev.current_stream();
  for (int i = 0; i < 200; ++i) s.dispatch(p, a);
  s.synchronize();
}

void BM_Submit(benchmark::State& state, Device* dev) {
  setup_run(state);
  ThreadBuffers b(*dev);
  const auto& add = dev->pipeline("add_f32");
  warm_up(*dev, add, b.add);
  for (auto _ : state) {
    const auto t0 = Clock::now();
    for (int i = 0; i < kSubmitOps; ++i) dev->current_stream().dispatch(add, b.add);
    dev->current_stream().synchronize();
    end_run(state, t0, kSubmitOps);
  }
}

void BM_DriverSubmit(benchmark::State& state, Device* dev) {
  setup_run(state);
  ThreadBuffers b(*dev);
  auto& drv = dev->driver();
  auto q = drv.new_queue();  // the thread's own queue
  const auto& add = drv.pipeline("add_f32");
  auto batch = [&](int n) {
    std::shared_ptr<flotilla::backend::CommandBuffer> last;
    for (int done = 0; done < n;) {
      auto cb = q->new_command_buffer();
      auto& enc = cb->compute_encoder();
      for (int i = 0; i < 64 && done < n; ++i, ++done) enc.dispatch(add, b.add);
      enc.end_encoding();
      cb->commit();
      last = std::move(cb);
    }
    last->wait_until_completed();
  };
  batch(200);
  for (auto _ : state) {
    const auto t0 = Clock::now();
    batch(kSubmitOps);
    end_run(state, t0, kSubmitOps);
  }
}

void BM_RoundTrip(benchmark::State& state, Device* dev) {
  setup_run(state);
  ThreadBuffers b(*dev);
  const auto& add = dev->pipeline("add_f32");
  warm_up(*dev, add, b.add);
  for (auto _ : state) {
    const auto t0 = Clock::now();
    for (int i = 0; i < kRoundTripOps; ++i) {
      Stream s = dev->current_stream();
      s.dispatch(add, b.add);
      s.synchronize();
    }
    end_run(state, t0, kRoundTripOps);
  }
}

void BM_EventRecordQuery(benchmark::State& state, Device* dev) {
  Stream s = dev->current_stream();
  Event e(*dev);
  for (int i = 0; i < 1000; ++i) {
    e.record(s);
    benchmark::DoNotOptimize(e.query());
  }
  e.synchronize();
  for (auto _ : state) {
    e.record(s);
    benchmark::DoNotOptimize(e.query());
  }
  e.synchronize();
  state.SetItemsProcessed(state.iterations());
}

void BM_Overlap(benchmark::State& state, Device* dev) {
  // Each stream gets a chain of kernels, launched stream after stream, as a
  // thread submitting a sequence does. Streams sharing a hardware queue then
  // wait for each other's chains (false dependencies): with N connections
  // about N chains run at once.
  constexpr int kStreams = 32, kChain = 4;
  constexpr int64_t kSleepUs = 500;
  for (int i = 1; i <= kStreams; ++i) dev->streams().at(i).synchronize();  // create them
  double concurrent = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 1; i <= kStreams; ++i) {
      Stream s = dev->streams().at(i);
      for (int k = 0; k < kChain; ++k) s.dispatch("sleep_us", KernelArgs().i64(kSleepUs));
      s.commit();
    }
    dev->synchronize();
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    concurrent = kStreams * kChain * (kSleepUs / 1e6) / secs;
  }
  // Chains (streams) running at once: kStreams if all overlap.
  state.counters["concurrent"] = concurrent;
}

std::shared_ptr<Device> make(Config c, int max_connections) {
  c.cuda_max_connections = max_connections;
  return Device::create("cuda", 0, c);
}

}  // namespace

int main(int argc, char** argv) {
  int max_connections = 0;
  for (int i = 1; i < argc; ++i) {
    const char* flag = "--cuda_max_connections=";
    if (std::strncmp(argv[i], flag, std::strlen(flag)) == 0) {
      max_connections = std::atoi(argv[i] + std::strlen(flag));
      std::copy(argv + i + 1, argv + argc, argv + i);
      --argc;
      --i;
    }
  }
  const auto backends = Device::backends();
  if (std::find(backends.begin(), backends.end(), "cuda") == backends.end() ||
      Device::count("cuda") == 0) {
    std::printf("micro_cuda: no CUDA device (or no cuda backend in this build): skipped\n");
    return 0;
  }
  auto dev = make(Config{}, max_connections);
  Config each;
  each.sync_mode = flotilla::SyncMode::kCommit;
  auto dev_each = make(each, max_connections);
  Config legacy;
  legacy.pool_size = 2;  // one pooled stream: every thread shares it
  auto dev_legacy = make(legacy, max_connections);
  Config wide;
  wide.pool_size = 33;
  auto dev_wide = make(wide, max_connections);
  std::printf("micro_cuda: %s, %d SMs, completion threads per device: %s\n",
              dev->info().name.c_str(), dev->info().compute_units,
              std::getenv("FLOTILLA_CUDA_COMPLETION_THREADS")
                  ? std::getenv("FLOTILLA_CUDA_COMPLETION_THREADS")
                  : "auto");

  auto threads = [](benchmark::internal::Benchmark* b, std::initializer_list<int> ts) {
    for (int t : ts) b->Threads(t);
    b->Iterations(1)->Repetitions(3)->ReportAggregatesOnly(true)->UseRealTime();
  };
  threads(benchmark::RegisterBenchmark("submit", BM_Submit, dev.get()), {1, 2, 4, 8, 16});
  threads(benchmark::RegisterBenchmark("submit_commit_each", BM_Submit, dev_each.get()), {1, 8});
  threads(benchmark::RegisterBenchmark("driver_submit", BM_DriverSubmit, dev.get()), {1, 8});
  threads(benchmark::RegisterBenchmark("roundtrip", BM_RoundTrip, dev.get()), {1, 2, 4, 8, 16});
  threads(benchmark::RegisterBenchmark("legacy_submit", BM_Submit, dev_legacy.get()), {1, 8});
  benchmark::RegisterBenchmark("event_record_query", BM_EventRecordQuery, dev.get())
      ->Iterations(100000)
      ->Repetitions(3)
      ->ReportAggregatesOnly(true)
      ->UseRealTime();
  benchmark::RegisterBenchmark("overlap", BM_Overlap, dev_wide.get())
      ->Iterations(5)
      ->Repetitions(3)
      ->ReportAggregatesOnly(true)
      ->UseRealTime();

  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
