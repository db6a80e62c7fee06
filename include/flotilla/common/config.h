// Settings, in one struct. The CLI fills it; `Config::from_env()` reads the
// FLOTILLA_* environment variables, in this one place, once per call.
//
// Thread safety: a plain value. A Device copies the Config it was created with.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

namespace flotilla {

// How a thread without a current stream gets one from the pool.
enum class StreamPolicy {
  kRoundRobin,  // the seed's Figure 3: atomic counter modulo the pooled count
  kExclusive,   // a free slot bound to the thread until it exits
};

// What `exclusive` does when every pooled slot is bound.
enum class WhenFull {
  kWait,   // wait up to `exclusive_wait`, then throw Timeout
  kShare,  // fall back to round-robin sharing
};

// When a stream commits its command buffer on its own.
enum class SyncMode {
  kNone,           // only explicit commit()/synchronize() commit
  kCommit,         // commit after every kernel
  kCommitAndWait,  // commit and wait after every kernel
  kAdaptive,       // commit after `adaptive_commit_kernels` kernels
};

// Whether the runtime takes the device's EncodingLock around driver encoding.
enum class EncodingLockMode {
  kAuto,  // only when the driver says its encoding path is not thread-safe
  kOn,    // always (also on drivers that do not need it)
  kOff,   // never (to show what happens without it)
};

struct Config {
  // Streams per device: 0 is the default stream, 1..pool_size-1 are pooled.
  int pool_size = 32;
  StreamPolicy policy = StreamPolicy::kRoundRobin;
  WhenFull exclusive_when_full = WhenFull::kWait;
  std::chrono::milliseconds exclusive_wait{1000};

  SyncMode sync_mode = SyncMode::kAdaptive;
  int adaptive_commit_kernels = 64;

  EncodingLockMode encoding_lock = EncodingLockMode::kAuto;

  // CPU driver.
  int cpu_exec_threads = 0;    // 0: max(2, hardware_concurrency)
  bool cpu_agx_model = false;  // declare the encoding path not thread-safe (Apple's AGX)
  // Simulated cost of one driver encoding call. Real drivers spend about a
  // microsecond per encode; the validation layer's race windows need it to
  // be non-zero to be seen on a machine with few cores.
  std::chrono::nanoseconds cpu_encode_cost{200};
  size_t cpu_memory_limit = 0;  // bytes the cpu device may allocate; 0: physical memory

  // CUDA driver (Note [CUDA_DEVICE_MAX_CONNECTIONS] in src/backend/cuda).
  // Hardware work queues per CUDA context: how many streams' kernel chains
  // can overlap. 0: Flotilla's default (32). CUDA reads it once, when it
  // initialises, which Flotilla's first CUDA device count does; so it takes
  // effect through FLOTILLA_CUDA_MAX_CONNECTIONS (read by from_env() then),
  // and CUDA_DEVICE_MAX_CONNECTIONS, if set, wins over both.
  int cuda_max_connections = 0;
  // Completion threads per CUDA device (they observe finished command
  // buffers and run handlers). 0: auto (2 with 8+ cores, else 1).
  int cuda_completion_threads = 0;
  // How long a completion thread sleeps between polls that find nothing
  // done while buffers are pending (Note [Completion threads]). 0, the
  // default: it spins, a core per thread under load, and sees a completion
  // within a microsecond; a few microseconds give most of that core back to
  // the host's other threads for as much latency. 0..1000. On the H100 host
  // with 64 clients, 5 us cost 5 % of requests/s (docs/PERF.md), so the
  // default spins.
  std::chrono::microseconds cuda_completion_sleep{0};
  // How long a thread waiting for a CUDA command buffer (a fence, a
  // synchronize) spins on its flag before it sleeps until the completion
  // thread wakes it. Spinning sees a completion at once; sleeping costs a
  // futex wake-up, a few microseconds, and gives the core to the host's
  // other threads. 0..10000; default 100.
  std::chrono::microseconds cuda_wait_spin{100};
  // Most blocks (of 16 warps) a gather_rows launch uses: the copy in of a
  // batch of InputBuffer rows, which the device reads across PCIe (Note
  // [Gathered rows] in src/backend/cuda). Fewer blocks hold fewer SMs away
  // from other streams' GEMMs while they wait for host memory, and take
  // more round trips. 1..1024; default 32.
  int cuda_gather_blocks = 32;
  // Time cuBLASLt's candidates for the f32 GEMMs planned for a share of the
  // device (64 to 512 rows on a queue that claimed a share, as a
  // BatchQueue's workers do) the first time each shape is planned, and use
  // the fastest on every stream of the device (Note [Tuned GEMMs for a share
  // of the device] in src/backend/cuda/nn_kernels.cu). The heuristic's first
  // choice otherwise. A timed choice may differ between processes (the
  // outputs within rounding of each other).
  bool cuda_tune_gemm = false;

  // Events.
  int event_pool_size = 64;  // events kept for reuse per device

  // Allocator.
  bool allocator_caching = true;

  // Reads FLOTILLA_POOL_SIZE, FLOTILLA_POLICY, FLOTILLA_SYNC_MODE,
  // FLOTILLA_ENCODING_LOCK, FLOTILLA_CPU_THREADS, FLOTILLA_ALLOCATOR_CACHING,
  // FLOTILLA_CUDA_MAX_CONNECTIONS, FLOTILLA_CUDA_COMPLETION_THREADS,
  // FLOTILLA_CUDA_COMPLETION_SLEEP_US, FLOTILLA_CUDA_WAIT_SPIN_US,
  // FLOTILLA_CUDA_GATHER_BLOCKS, FLOTILLA_CUDA_TUNE_GEMM
  // over the defaults. Bad values throw InvalidArgument naming the variable.
  static Config from_env();

  // Throws InvalidArgument if a field is out of range.
  void validate() const;
};

StreamPolicy parse_stream_policy(const std::string& s);
SyncMode parse_sync_mode(const std::string& s);
EncodingLockMode parse_encoding_lock_mode(const std::string& s);
WhenFull parse_when_full(const std::string& s);
const char* to_string(StreamPolicy p) noexcept;
const char* to_string(SyncMode m) noexcept;
const char* to_string(EncodingLockMode m) noexcept;
const char* to_string(WhenFull w) noexcept;

}  // namespace flotilla
