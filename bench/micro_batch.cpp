// Micro-benchmark of one BatchQueue batch's device path (Note [One batch],
// Note [Recorded batches]), without the queue: the seed MLP on R rows, from
// pinned staging to pinned staging, eagerly (copy in, three GEMMs, copy out:
// five launches) or as one replay of a recording of the same (a CUDA graph on
// CUDA). Google Benchmark.
//
//   batch/eager/R, batch/recorded/R
//     launch_us     host time to encode the batch and take its fence
//     roundtrip_us  launch plus the wait for the fence (one batch in flight)
//
// The copies are the queue's: copy_pinned up to 64 KiB, copy_bytes above.
//   batch/recorded_copy/R/C  the same, recorded, with one copy kernel for
//     every size: C = 1 copy_pinned (a kernel on the mapped staging), 2
//     copy_bytes (the copy engines): which copy a batch of R rows wants; 3
//     gather_rows through a table of the rows' addresses (the copy in of a
//     batch of InputBuffer rows, Note [Inputs the device reads in place]).
//   batch/recorded_threads/R/S/C/threads:T  T threads at once, each replaying
//     its own recorded batch of R rows on its own stream and waiting for it
//     (one batch in flight per thread, as libtorch's `graph` mode with
//     batch R): rows_per_s, summed over the threads, is what the device
//     does for the queue's batches with no queue and no host work between
//     them, the ceiling of `flotilla run --batching` at that batch size.
//     S is the share each thread claims on its stream for the run
//     (Stream::claim_device_share): 1 plans GEMMs for the whole device, T
//     for a T-th of it, as a BatchQueue of T workers does. C: the copy in,
//     as above (0: the queue's rule).
// Runs on cuda when a GPU is found, else on cpu (--backend=cpu forces it).
// Every benchmark repeats 3 times; read the median.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "flotilla/flotilla.h"
#include "flotilla/nn/mlp.h"

namespace {

using flotilla::Device;
using flotilla::DType;
using flotilla::Recording;
using flotilla::Stream;
using flotilla::Tensor;
using flotilla::backend::KernelArgs;
using Clock = std::chrono::steady_clock;

Device* g_dev = nullptr;
const flotilla::nn::Mlp* g_mlp = nullptr;

// Pinned staging for `rows` rows each way; `in` ends with a table of the
// rows' device addresses, for copy mode 3.
struct Staging {
  explicit Staging(int64_t rows) {
    const auto n = static_cast<size_t>(rows);
    const size_t in_bytes = n * static_cast<size_t>(g_mlp->in_features()) * 4;
    in = g_dev->driver().allocate_host(in_bytes + n * sizeof(void*));
    out = g_dev->driver().allocate_host(n * static_cast<size_t>(g_mlp->out_features()) * 4);
    std::memset(in->host_ptr(), 0, in->size());
    table = static_cast<char*>(in->device_ptr()) + in_bytes;
    auto* t = reinterpret_cast<const void**>(static_cast<char*>(in->host_ptr()) + in_bytes);
    for (size_t i = 0; i < n; ++i)
      t[i] = static_cast<const char*>(in->device_ptr()) + i * (in_bytes / n);
  }
  std::unique_ptr<flotilla::backend::Buffer> in, out;
  const void* table = nullptr;
};

// copy_mode: 0 the queue's rule, 1 copy_pinned always, 2 copy_bytes always,
// 3 gather_rows through the staging's table (an InputBuffer's batch; the
// copy out as in mode 0).
void encode(Stream s, const Staging& st, int64_t rows, int64_t copy_mode) {
  const int64_t in = g_mlp->in_features(), out = g_mlp->out_features();
  const size_t in_bytes = static_cast<size_t>(rows * in) * 4,
               out_bytes = static_cast<size_t>(rows * out) * 4;
  auto copy = [copy_mode](size_t n) {
    if (copy_mode == 1 || copy_mode == 2) return copy_mode == 1 ? "copy_pinned" : "copy_bytes";
    return n <= 64 * 1024 ? "copy_pinned" : "copy_bytes";
  };
  Tensor x = Tensor::empty({rows, in}, DType::kF32, s);
  if (copy_mode == 3)
    s.dispatch("gather_rows", KernelArgs().ptr(x.data()).ptr(st.table).i64(in * 4).size(
                                  static_cast<uint64_t>(rows)));
  else
    s.dispatch(copy(in_bytes), KernelArgs().ptr(x.data()).ptr(st.in->device_ptr()).size(in_bytes));
  Tensor y = g_mlp->forward(s, x);
  s.dispatch(copy(out_bytes), KernelArgs().ptr(st.out->device_ptr()).ptr(y.data()).size(out_bytes));
}

void BM_Batch(benchmark::State& state, bool recorded) {
  const int64_t rows = state.range(0);
  const int64_t copy_mode = state.range(1);
  Stream s = g_dev->streams().at(1);
  const Staging st(rows);
  Recording rec;
  encode(s, st, rows, copy_mode);  // warm-up: plans, workspaces, cached blocks
  s.synchronize();
  if (recorded) rec = s.record([&] { encode(s, st, rows, copy_mode); });
  double launch = 0, total = 0;
  int64_t n = 0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    if (recorded)
      s.replay(rec);
    else
      encode(s, st, rows, copy_mode);
    flotilla::StreamFence f = s.fence();
    const auto t1 = Clock::now();
    f.wait();
    const auto t2 = Clock::now();
    launch += std::chrono::duration<double, std::micro>(t1 - t0).count();
    total += std::chrono::duration<double, std::micro>(t2 - t0).count();
    ++n;
  }
  state.counters["launch_us"] = launch / static_cast<double>(std::max<int64_t>(1, n));
  state.counters["roundtrip_us"] = total / static_cast<double>(std::max<int64_t>(1, n));
  state.counters["rows_per_s"] = benchmark::Counter(
      static_cast<double>(rows) * static_cast<double>(n), benchmark::Counter::kIsRate);
}

void BM_BatchThreads(benchmark::State& state) {
  const int64_t rows = state.range(0);
  Stream s = g_dev->streams().at(1 + state.thread_index());
  // Claimed for this run only: batch/eager and batch/recorded use stream 1 too.
  const flotilla::DeviceShareClaim share = s.claim_device_share(static_cast<int>(state.range(1)));
  const int64_t copy_mode = state.range(2);
  const Staging st(rows);
  encode(s, st, rows, copy_mode);  // warm-up: plans, workspaces, cached blocks
  s.synchronize();
  Recording rec = s.record([&] { encode(s, st, rows, copy_mode); });
  int64_t n = 0;
  for (auto _ : state) {
    s.replay(rec);
    s.fence().wait();
    ++n;
  }
  state.counters["rows_per_s"] = benchmark::Counter(
      static_cast<double>(rows) * static_cast<double>(n), benchmark::Counter::kIsRate);
}

}  // namespace

int main(int argc, char** argv) {
  std::string backend;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--backend=", 10) == 0) {
      backend = argv[i] + 10;
      std::copy(argv + i + 1, argv + argc, argv + i);
      --argc;
      --i;
    }
  }
  if (backend.empty()) {
    const auto b = Device::backends();
    backend = std::find(b.begin(), b.end(), "cuda") != b.end() && Device::count("cuda") > 0 ? "cuda"
                                                                                            : "cpu";
  }
  auto dev = Device::create(backend, 0, flotilla::Config::from_env());
  const flotilla::nn::Mlp mlp(flotilla::nn::MlpWeights::seed(), DType::kF32, dev->default_stream());
  g_dev = dev.get();
  g_mlp = &mlp;
  std::printf("micro_batch: %s (%s), seed MLP %lld-%lld\n", dev->name().c_str(), backend.c_str(),
              static_cast<long long>(mlp.in_features()),
              static_cast<long long>(mlp.out_features()));
  for (const char* mode : {"eager", "recorded"}) {
    const bool rec = std::string(mode) == "recorded";
    benchmark::RegisterBenchmark((std::string("batch/") + mode).c_str(),
                                 [rec](benchmark::State& s) { BM_Batch(s, rec); })
        ->Args({1, 0})
        ->Args({8, 0})
        ->Args({64, 0})
        ->Args({512, 0})
        ->Repetitions(3)
        ->ReportAggregatesOnly(true)
        ->UseRealTime()
        ->MinTime(0.3);
  }
  auto* copies = benchmark::RegisterBenchmark("batch/recorded_copy",
                                              [](benchmark::State& s) { BM_Batch(s, true); });
  // 1 to 8 rows: the small batches of a few closed-loop clients (Note
  // [Linear for a few rows]), with the small-copy kernel the queue uses there.
  for (int64_t rows : {1, 2, 4, 8}) copies->Args({rows, 1});
  for (int64_t rows : {16, 32, 64, 128, 256, 512})
    for (int64_t mode : {1, 2, 3}) copies->Args({rows, mode});
  copies->Repetitions(3)->ReportAggregatesOnly(true)->UseRealTime()->MinTime(0.3);
  auto* threads = benchmark::RegisterBenchmark("batch/recorded_threads", &BM_BatchThreads);
  // 8 streams of 1 or 8 rows at once: per-thread streams at batch 1, and a
  // queue's small batches under 8 clients.
  for (int64_t rows : {1, 8}) threads->Args({rows, 1, 0});
  for (int64_t rows : {64, 128, 160, 192, 256, 512, 1024})
    for (int64_t share : {1, 8}) threads->Args({rows, share, 0});
  // The queue's batches of InputBuffer rows: the copy in gathers.
  for (int64_t rows : {128, 192, 256, 512}) threads->Args({rows, 8, 3});
  threads->Threads(8)->Repetitions(3)->ReportAggregatesOnly(true)->UseRealTime()->MinTime(0.3);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_mlp = nullptr;
  dev->synchronize();
  return 0;
}
