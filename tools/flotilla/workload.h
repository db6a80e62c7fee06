// The inference workload behind `flotilla run` and `flotilla bench`: client
// threads send requests (a batch of inputs through the MLP, output back to
// the host) through one architecture, and every output is checked against a
// single-thread reference computed first on the same device.
//
// Architectures (Arch):
//  - legacy: the seed's Figure 1 made safe. Every thread uses the one default
//    stream and holds one process-wide mutex for each whole request (as
//    libtorch's `singleton` mode does): correct, and serial.
//  - pool: Figure 2. Each thread uses its own current stream from the pool
//    (Device::current_stream(), by --policy), and nothing is shared but the
//    read-only weights.
//  Issue 5 (BatchQueue) adds a third, `batching`: client threads submit
//  batch-1 requests to a queue whose workers run real batches. It slots in
//  as another Client in workload.cpp (see make_client) and adds its fields
//  to WorkloadOptions::batching and WorkloadResult; nothing else changes.
//
// Thread safety: run_workload is called from one thread; it owns and joins
// every thread it starts. Isolation: run_workload_isolated runs it in a
// forked child so that a crash is counted rather than fatal; the parent
// must not have touched a GPU driver before (a CUDA context does not
// survive fork), which holds as long as it only loads MlpWeights.
#pragma once

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "flotilla/common/config.h"
#include "flotilla/nn/mlp.h"
#include "flotilla/ops/ops.h"
#include "flotilla/ops/tensor.h"

namespace flotilla::cli {

enum class Arch { kLegacy, kPool };
const char* to_string(Arch arch) noexcept;
Arch parse_arch(const std::string& s);
struct WorkloadOptions;
// "batching" with --batching, else to_string(arch): how results are labelled.
const char* arch_label(const WorkloadOptions& o) noexcept;

struct WorkloadOptions {
  std::string backend = "cpu";
  std::string model;  // a safetensors file; empty: the seed's built-in MLP
  ops::Activation activation = ops::Activation::kRelu;
  DType dtype = DType::kF32;
  Arch arch = Arch::kPool;
  std::optional<StreamPolicy> policy;  // unset: Config::from_env()'s (round-robin)
  int threads = 8;
  int64_t requests = 0;  // total over all threads; 0: run for `seconds`
  double seconds = 0;
  int batch = 1;             // samples per request
  int distinct_inputs = 16;  // inputs cycled through (each with its reference output)
  int warmup = 2;            // requests per thread before the clock starts (checked, not timed)
  // Then each client runs its timed loop this long before the clock starts
  // (--warmup-seconds; checked, not timed): first uses (with
  // --record-batches, each batch size's recording) fall outside the figures.
  double warmup_seconds = 0;
  uint64_t seed = 1;     // of the inputs
  bool progress = true;  // a progress line on stderr every second
  bool isolate = true;   // run in a forked child (a crash is counted, not fatal)
  double timeout_s = 0;  // child watchdog; 0: from seconds/requests
  // Test hook (hidden --corrupt-every N): flips a bit in the output of every
  // Nth timed request before the check, to prove the check can fail.
  int corrupt_every = 0;
  // Test hook (hidden --crash-after N): the Nth timed request aborts the
  // process, to prove an isolated run counts a crash rather than dying.
  int64_t crash_after = 0;

  // Issue 5 (`--batching --max-batch B --max-delay-us D --queue-workers W ...`):
  // the client threads submit batch-1 requests to one serve::BatchQueue,
  // whose W workers run real batches. Outputs are checked against the
  // batch-1 reference within fp32 tolerance, not bit for bit: a batched row
  // goes through a GEMM of another shape, which BLAS may sum in another order.
  struct Batching {
    bool enabled = false;
    int max_batch = 64;
    // 0 and 4: the best of the CPU and H100 sweeps for closed-loop clients
    // (waiting for company only idles the workers; batches grow while they
    // are busy); see the issue-5 report's figures.
    int64_t max_delay_us = 0;
    int workers = 4;
    // Requests each client keeps in flight (--window): it submits that many,
    // then submits the next each time the oldest completes (a frontend thread
    // serving many connections). 1: one at a time (a closed loop).
    int window = 1;
    int pipeline_depth = 1;  // BatchQueueOptions::pipeline_depth (see its default)
    int64_t spin_us = 0;     // BatchQueueOptions::spin_wait
    bool record = false;     // BatchQueueOptions::record_batches
    int record_steps = 4;    // BatchQueueOptions::record_steps
    int device_share = 0;    // BatchQueueOptions::device_share (0: the workers' streams)
    // --callbacks: each request's output goes to a completion callback,
    // which checks it on the queue's worker, instead of a handle the client
    // waits on; a client with a full window sleeps until `refill` of its
    // requests have completed.
    bool callbacks = false;
    // --refill: with --callbacks, how many requests of a full window complete
    // before its client wakes (one wake-up per `refill` requests); 0: seven
    // eighths of the window (on the H100 with 64 clients x 32, 28 gave 9 %
    // more than 16: each wake-up costs the worker that makes it and the
    // client a context switch; docs/PERF.md).
    int refill = 0;
    // --submit-group: with --callbacks, the most requests a client submits
    // in one BatchQueue::submit_all() (the free slots of its window, up to
    // this many; Note [Group submits]); 1: one submit() a request.
    int submit_group = 1;
    // --borrow-inputs: clients submit their inputs as serve::BorrowedInput,
    // read in place by the queue (the inputs live for the whole run), not
    // copied at submit().
    bool borrow = false;
    // --pinned-inputs: clients submit rows of a serve::InputBuffer holding
    // the inputs, which the device reads in place (borrowed, and not packed
    // by the queue's workers).
    bool pinned = false;
    // --read-in-place-max-bytes: with --pinned-inputs,
    // BatchQueueOptions::read_in_place_max_bytes (-1: no limit, the
    // queue's default): larger batches pack their rows for the copy engines.
    int64_t read_in_place_max_bytes = -1;
    int refill_or_default() const { return refill > 0 ? refill : std::max(1, window - window / 8); }
  } batching;

  // Throws InvalidArgument naming the option. Touches no device.
  void validate() const;
  // "seed" or the model path, as reported.
  std::string model_name() const { return model.empty() ? "seed" : model; }
};

struct WorkloadResult {
  WorkloadOptions options;
  std::string model_shape;  // "512-1024-1024-512 relu"
  std::string policy;       // the stream policy in effect ("single-stream" for legacy)
  uint64_t requests = 0;    // timed requests that completed (right or wrong)
  uint64_t samples = 0;     // requests x batch
  double seconds = 0;
  double requests_per_s = 0, samples_per_s = 0;
  double p50_us = 0, p90_us = 0, p99_us = 0, mean_us = 0, max_us = 0;
  uint64_t checks = 0;         // outputs compared with the reference (warmup included)
  uint64_t wrong_results = 0;  // outputs that differed from it (bit for bit)
  uint64_t violations = 0;     // ValidationError: a driver rule broken
  uint64_t errors = 0;         // other flotilla::Error raised to a request
  uint64_t crashes = 0;        // the (isolated) run died or hung
  int streams_used = 0;        // distinct streams that served the client threads
  std::string device_name;     // the device's description
  std::string first_error;
  // The process's CPU time over the timed span (every thread: clients, queue
  // workers, the backend's own), per second (cores kept busy) and per
  // completed request (µs); and the host's core count, to read them against.
  double cpu_cores = 0, cpu_us_per_request = 0;
  int host_cores = 0;
  // With --batching (the queue's metrics, warmup included).
  double mean_batch = 0;
  uint64_t rejected = 0, expired = 0, cancelled = 0;
  // Requests whose inputs the device read in place (--pinned-inputs).
  uint64_t read_in_place = 0;
  // Where a request's time goes: queued (submit to picked into a batch) and
  // compute (picked to its batch's results in host memory), by the queue's
  // window of recent samples; max_depth: the most requests queued at once.
  double queue_wait_p50_us = 0, queue_wait_p99_us = 0, compute_p50_us = 0, compute_p99_us = 0;
  uint64_t max_depth = 0;
  // The device-share hint the queue's first worker's stream had at the end
  // (BatchQueueOptions::device_share, as claimed).
  int device_share = 1;
  // --window > 1 or --callbacks: a client thread's time per request, by
  // phase (submit(), get() including the wait, copying and checking the
  // output), in µs; with --callbacks, get is the wait for room in the window
  // and check is 0 (the callbacks check, on the workers).
  double client_submit_us = 0, client_get_us = 0, client_check_us = 0;
  // --callbacks: how many times the clients, together, slept with a full
  // window (one wake-up each; about requests / --refill).
  uint64_t client_waits = 0;

  bool failed() const { return crashes || violations || wrong_results || errors; }
  nlohmann::json to_json() const;
  static WorkloadResult from_json(const nlohmann::json& j, const WorkloadOptions& options);
};

// Loads the model the options name (host only; throws InvalidArgument naming
// the file and the problem).
nn::MlpWeights load_weights(const WorkloadOptions& options);

// Runs the workload in this process. Errors that stop the whole run (the
// device cannot be created, the reference fails) propagate as flotilla::Error.
WorkloadResult run_workload(const nn::MlpWeights& weights, const WorkloadOptions& options);
// The same in a forked child with a watchdog (options.isolate is ignored).
// A death by signal or a hang gives crashes = 1; an error that stopped the
// child's run is rethrown here with its code and message.
WorkloadResult run_workload_isolated(const nn::MlpWeights& weights, const WorkloadOptions& options);
// run_workload_isolated or run_workload, as options.isolate says.
WorkloadResult run_workload_as_configured(const nn::MlpWeights& weights,
                                          const WorkloadOptions& options);

// The options both commands share: --backend --model --activation --dtype
// --policy --seed. Call apply() in the command's callback (parses the
// strings; throws InvalidArgument naming the option).
struct ModelOptionStrings {
  std::string activation = "relu";
  std::string dtype = "f32";
  std::string policy;  // empty: default
  void apply(WorkloadOptions& o) const;
};
void add_model_options(CLI::App& cmd, WorkloadOptions& o, ModelOptionStrings& s);
// The BatchQueue's options both commands share: --max-batch --max-delay-us
// --queue-workers --window --pipeline-depth --spin-us.
void add_batching_options(CLI::App& cmd, WorkloadOptions::Batching& b);

}  // namespace flotilla::cli
