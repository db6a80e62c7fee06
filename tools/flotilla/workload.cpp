#include "workload.h"

#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iostream>
#include <latch>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "flotilla/common/error.h"
#include "flotilla/common/futex.h"
#include "flotilla/common/sync.h"
#include "flotilla/common/thread_name.h"
#include "flotilla/runtime/device.h"
#include "flotilla/serve/batch_queue.h"
#include "isolate.h"

namespace flotilla::cli {

using Clock = std::chrono::steady_clock;

const char* to_string(Arch arch) noexcept {
  switch (arch) {
    case Arch::kLegacy: return "legacy";
    case Arch::kPool: return "pool";
  }
  return "?";
}

const char* arch_label(const WorkloadOptions& o) noexcept {
  return o.batching.enabled ? "batching" : to_string(o.arch);
}

Arch parse_arch(const std::string& s) {
  if (s == "legacy") return Arch::kLegacy;
  if (s == "pool") return Arch::kPool;
  throw InvalidArgument("[run] unknown --arch '" + s + "'; use legacy or pool");
}

void WorkloadOptions::validate() const {
  backend::find_backend(backend);  // InvalidArgument listing the built-in backends
  FL_CHECK_ARG(threads >= 1 && threads <= 1024, "[run] --threads must be in 1..1024, not ",
               threads);
  FL_CHECK_ARG(batch >= 1 && batch <= 65536, "[run] --batch must be in 1..65536, not ", batch);
  FL_CHECK_ARG(requests >= 0, "[run] --requests must not be negative");
  FL_CHECK_ARG(seconds >= 0 && std::isfinite(seconds), "[run] --seconds must not be negative");
  FL_CHECK_ARG((requests > 0) != (seconds > 0),
               "[run] give exactly one of --requests M or --seconds S (both positive)");
  FL_CHECK_ARG(distinct_inputs >= 1 && distinct_inputs <= 1024,
               "[run] distinct inputs must be in 1..1024");
  FL_CHECK_ARG(warmup >= 0, "[run] warmup must not be negative");
  FL_CHECK_ARG(warmup_seconds >= 0 && warmup_seconds <= 3600 && std::isfinite(warmup_seconds),
               "[run] --warmup-seconds must be in 0..3600, not ", warmup_seconds);
  FL_CHECK_ARG(corrupt_every >= 0, "[run] --corrupt-every must not be negative");
  FL_CHECK_ARG(crash_after >= 0, "[run] --crash-after must not be negative");
  FL_CHECK_ARG(timeout_s >= 0 && std::isfinite(timeout_s),
               "[run] --timeout must be a number of seconds, 0 for the default");
  FL_CHECK_ARG(dtype == DType::kF32 || backend != "cpu", "[run] --dtype ",
               flotilla::to_string(dtype),
               " needs --backend cuda: the cpu backend has f32 kernels only");
  if (batching.enabled) {
    FL_CHECK_ARG(batch == 1,
                 "[run] --batching sends batch-1 requests (the queue makes the "
                 "batches); drop --batch ",
                 batch, " or use --max-batch");
    FL_CHECK_ARG(dtype == DType::kF32, "[run] --batching runs f32 models only, not --dtype ",
                 flotilla::to_string(dtype));
    const auto in_range = [](const char* flag, int64_t v, int64_t lo, int64_t hi) {
      FL_CHECK_ARG(v >= lo && v <= hi, "[run] ", flag, " must be in ", lo, "..", hi, ", not ", v);
    };
    in_range("--max-batch", batching.max_batch, 1, 65536);
    in_range("--max-delay-us", batching.max_delay_us, 0, 10000000);
    in_range("--queue-workers", batching.workers, 1, 256);
    in_range("--window", batching.window, 1, 4096);
    in_range("--pipeline-depth", batching.pipeline_depth, 1, 64);
    in_range("--spin-us", batching.spin_us, 0, 1000000);
    in_range("--device-share", batching.device_share, 0, 256);
    in_range("--record-steps", batching.record_steps, 1, 64);
    FL_CHECK_ARG(std::has_single_bit(static_cast<unsigned>(batching.record_steps)),
                 "[run] --record-steps must be a power of two (1, 2, 4, ..., 64), not ",
                 batching.record_steps);
    FL_CHECK_ARG(batching.record || batching.record_steps == 4,
                 "[run] --record-steps sets the recorded batch sizes; it needs --record-batches");
    FL_CHECK_ARG(batching.read_in_place_max_bytes == -1 || batching.pinned,
                 "[run] --read-in-place-max-bytes limits the batches that read --pinned-inputs "
                 "rows in place; it needs --pinned-inputs");
    in_range("--read-in-place-max-bytes", batching.read_in_place_max_bytes, -1, int64_t{1} << 40);
    FL_CHECK_ARG(batching.refill == 0 || batching.callbacks,
                 "[run] --refill is how many of a full window's requests complete before its "
                 "client wakes; it needs --callbacks");
    in_range("--refill", batching.refill, 0, batching.window);
    FL_CHECK_ARG(batching.submit_group == 1 || batching.callbacks,
                 "[run] --submit-group is how many requests a client submits in one call; it "
                 "needs --callbacks");
    in_range("--submit-group", batching.submit_group, 1, 4096);
  } else {
    FL_CHECK_ARG(!batching.borrow && !batching.pinned && batching.read_in_place_max_bytes == -1,
                 "[run] --borrow-inputs, --pinned-inputs and --read-in-place-max-bytes let the "
                 "BatchQueue read the clients' inputs in place; they need --batching");
    FL_CHECK_ARG(batching.window == 1,
                 "[run] --window keeps several requests in flight through the BatchQueue; "
                 "it needs --batching");
    FL_CHECK_ARG(!batching.callbacks && batching.refill == 0 && batching.submit_group == 1,
                 "[run] --callbacks hands the BatchQueue's outputs to completion callbacks (and "
                 "--refill and --submit-group tune it); they need --batching");
    FL_CHECK_ARG(batching.device_share == 0,
                 "[run] --device-share is the BatchQueue's claim on its workers' streams; it "
                 "needs --batching");
  }
}

// ---- results ---------------------------------------------------------------------

nlohmann::json WorkloadResult::to_json() const {
  const auto& o = options;
  nlohmann::json j = {{"backend", o.backend},
                      {"device", device_name},
                      {"model", o.model_name()},
                      {"model_shape", model_shape},
                      {"activation", ops::to_string(o.activation)},
                      {"dtype", flotilla::to_string(o.dtype)},
                      {"arch", arch_label(o)},
                      {"policy", policy},
                      {"threads", o.threads},
                      {"batch", o.batch},
                      {"requests", requests},
                      {"samples", samples},
                      {"seconds", seconds},
                      {"warmup_seconds", o.warmup_seconds},
                      {"requests_per_s", requests_per_s},
                      {"samples_per_s", samples_per_s},
                      {"p50_us", p50_us},
                      {"p90_us", p90_us},
                      {"p99_us", p99_us},
                      {"mean_us", mean_us},
                      {"max_us", max_us},
                      {"checks", checks},
                      {"crashes", crashes},
                      {"violations", violations},
                      {"wrong_results", wrong_results},
                      {"errors", errors},
                      {"streams_used", streams_used},
                      {"first_error", first_error},
                      {"cpu_cores", cpu_cores},
                      {"cpu_us_per_request", cpu_us_per_request},
                      {"host_cores", host_cores},
                      // outputs went to completion callbacks (--callbacks; batching only)
                      {"callbacks", o.batching.enabled && o.batching.callbacks}};
  if (o.batching.enabled) {
    j["max_batch"] = o.batching.max_batch;
    j["max_delay_us"] = o.batching.max_delay_us;
    j["queue_workers"] = o.batching.workers;
    j["window"] = o.batching.window;
    j["pipeline_depth"] = o.batching.pipeline_depth;
    j["spin_us"] = o.batching.spin_us;
    j["record_batches"] = o.batching.record;
    if (o.batching.record) j["record_steps"] = o.batching.record_steps;
    j["device_share_option"] = o.batching.device_share;  // 0: the queue's streams
    j["device_share"] = device_share;  // the hint its first worker's stream planned with
    if (o.batching.callbacks) {
      j["refill"] = o.batching.refill_or_default();
      j["submit_group"] = o.batching.submit_group;
    }
    j["borrow_inputs"] = o.batching.borrow || o.batching.pinned;
    j["pinned_inputs"] = o.batching.pinned;
    if (o.batching.pinned) {
      j["read_in_place_max_bytes"] = o.batching.read_in_place_max_bytes;  // -1: no limit
      j["read_in_place"] = read_in_place;
    }
    j["mean_batch"] = mean_batch;
    j["rejected"] = rejected;
    j["expired"] = expired;
    j["cancelled"] = cancelled;
    j["queue_wait_p50_us"] = queue_wait_p50_us;
    j["queue_wait_p99_us"] = queue_wait_p99_us;
    j["compute_p50_us"] = compute_p50_us;
    j["compute_p99_us"] = compute_p99_us;
    j["max_depth"] = max_depth;
    j["client_submit_us"] = client_submit_us;
    j["client_get_us"] = client_get_us;
    j["client_check_us"] = client_check_us;
    if (o.batching.callbacks) j["client_waits"] = client_waits;
  }
  return j;
}

WorkloadResult WorkloadResult::from_json(const nlohmann::json& j, const WorkloadOptions& options) {
  WorkloadResult r;
  r.options = options;
  r.device_name = j.at("device");
  r.model_shape = j.at("model_shape");
  r.policy = j.at("policy");
  r.requests = j.at("requests");
  r.samples = j.at("samples");
  r.seconds = j.at("seconds");
  r.requests_per_s = j.at("requests_per_s");
  r.samples_per_s = j.at("samples_per_s");
  r.p50_us = j.at("p50_us");
  r.p90_us = j.at("p90_us");
  r.p99_us = j.at("p99_us");
  r.mean_us = j.at("mean_us");
  r.max_us = j.at("max_us");
  r.checks = j.at("checks");
  r.crashes = j.at("crashes");
  r.violations = j.at("violations");
  r.wrong_results = j.at("wrong_results");
  r.errors = j.at("errors");
  r.streams_used = j.at("streams_used");
  r.first_error = j.at("first_error");
  r.cpu_cores = j.value("cpu_cores", 0.0);
  r.cpu_us_per_request = j.value("cpu_us_per_request", 0.0);
  r.host_cores = j.value("host_cores", 0);
  r.mean_batch = j.value("mean_batch", 0.0);
  r.rejected = j.value("rejected", uint64_t{0});
  r.expired = j.value("expired", uint64_t{0});
  r.cancelled = j.value("cancelled", uint64_t{0});
  r.queue_wait_p50_us = j.value("queue_wait_p50_us", 0.0);
  r.queue_wait_p99_us = j.value("queue_wait_p99_us", 0.0);
  r.compute_p50_us = j.value("compute_p50_us", 0.0);
  r.compute_p99_us = j.value("compute_p99_us", 0.0);
  r.max_depth = j.value("max_depth", uint64_t{0});
  r.read_in_place = j.value("read_in_place", uint64_t{0});
  r.device_share = j.value("device_share", 1);
  r.client_submit_us = j.value("client_submit_us", 0.0);
  r.client_get_us = j.value("client_get_us", 0.0);
  r.client_check_us = j.value("client_check_us", 0.0);
  r.client_waits = j.value("client_waits", uint64_t{0});
  return r;
}

nn::MlpWeights load_weights(const WorkloadOptions& o) {
  if (o.model.empty()) {
    nn::MlpWeights w = nn::MlpWeights::seed();
    w.activation = o.activation;
    return w;
  }
  return nn::MlpWeights::load(o.model, o.activation);
}

// ---- the workload ----------------------------------------------------------------------

namespace {

// What every client thread shares: the device, the model, the inputs and
// their reference outputs (all read-only once the threads start).
struct RunContext {
  Device& device;
  const nn::Mlp& model;
  const WorkloadOptions& options;
  std::vector<std::vector<float>> inputs;      // [distinct][batch * in]
  std::vector<std::vector<float>> references;  // [distinct][batch * out]
  std::vector<std::vector<float>> tolerances;  // [distinct][batch * out]: --batching's bounds
  // The legacy architecture's one process-wide lock: held for each whole
  // request, it serialises all use of the default stream (it guards no field).
  Mutex legacy_mu;
  // --batching: the one queue every client submits to (made after the references).
  serve::BatchQueue* queue = nullptr;
  // --pinned-inputs: `inputs` again, in rows the queue's device reads in place.
  const serve::InputBuffer* pinned_inputs = nullptr;
};

// One request: upload, forward, download (which waits for the stream).
void infer(const RunContext& ctx, const Stream& stream, const std::vector<float>& in,
           std::span<float> out) {
  const auto& o = ctx.options;
  Tensor x = Tensor::from_host(in, {o.batch, ctx.model.in_features()}, o.dtype, stream);
  Tensor y = ctx.model.forward(stream, x);
  y.to_host(out, stream);
}

// How one client thread gets a request done: one implementation per
// architecture. Made on the client's own thread (the pool binds a stream to
// the calling thread). Issue 5 adds a BatchQueue client here.
class Client {
 public:
  virtual ~Client() = default;
  virtual int stream_index() const = 0;
  // Runs ctx.inputs[k] into `out`.
  virtual void request(size_t k, std::span<float> out) = 0;
};

class LegacyClient final : public Client {
 public:
  explicit LegacyClient(RunContext& ctx) : ctx_(ctx), stream_(ctx.device.default_stream()) {}
  int stream_index() const override { return stream_.index(); }
  void request(size_t k, std::span<float> out) override {
    MutexLock lock(ctx_.legacy_mu);
    infer(ctx_, stream_, ctx_.inputs[k], out);
  }

 private:
  RunContext& ctx_;
  Stream stream_;
};

class PoolClient final : public Client {
 public:
  explicit PoolClient(RunContext& ctx) : ctx_(ctx), stream_(ctx.device.current_stream()) {}
  int stream_index() const override { return stream_.index(); }
  void request(size_t k, std::span<float> out) override {
    infer(ctx_, stream_, ctx_.inputs[k], out);
  }

 private:
  const RunContext& ctx_;
  Stream stream_;
};

// A BatchQueue output holds one row of the model's output.
void check_row_size(const std::vector<float>& y, size_t n) {
  FL_INTERNAL_CHECK(y.size() == n, "the queue returned ", y.size(), " values, not ", n);
}

// A BatchQueue's output for one request, into the client's buffer.
void copy_output(const std::vector<float>& y, std::span<float> out) {
  check_row_size(y, out.size());
  std::copy(y.begin(), y.end(), out.begin());
}

// Whether the queue reads ctx.inputs in place: --pinned-inputs or
// --borrow-inputs (the run's inputs outlive the queue).
bool borrows_inputs(const RunContext& ctx) {
  return ctx.pinned_inputs != nullptr || ctx.options.batching.borrow;
}

// The input of request k as a borrowed one (borrows_inputs): a row of the
// run's InputBuffer with --pinned-inputs, else ctx.inputs[k] in place.
serve::BorrowedInput borrowed_input(const RunContext& ctx, size_t k) {
  if (ctx.pinned_inputs) return ctx.pinned_inputs->input(k);
  return serve::BorrowedInput(ctx.inputs[k]);
}

// Submits ctx.inputs[k] to the queue: borrowed (borrowed_input) or copied;
// `rest`: submit()'s other arguments (a callback).
template <typename... Rest>
auto submit_input(const RunContext& ctx, size_t k, Rest&&... rest) {
  serve::BatchQueue& queue = *ctx.queue;
  return borrows_inputs(ctx) ? queue.submit(borrowed_input(ctx, k), std::forward<Rest>(rest)...)
                             : queue.submit(ctx.inputs[k], std::forward<Rest>(rest)...);
}

// --batching: a batch-1 request through the shared BatchQueue; its workers'
// streams serve it, so the client has none of its own.
class BatchingClient final : public Client {
 public:
  explicit BatchingClient(RunContext& ctx) : ctx_(ctx) {}
  int stream_index() const override { return -1; }
  void request(size_t k, std::span<float> out) override {
    copy_output(submit_input(ctx_, k).get(), out);  // get() throws the request's error
  }

 private:
  const RunContext& ctx_;
};

std::unique_ptr<Client> make_client(RunContext& ctx) {
  if (ctx.options.batching.enabled) return std::make_unique<BatchingClient>(ctx);
  switch (ctx.options.arch) {
    case Arch::kLegacy: return std::make_unique<LegacyClient>(ctx);
    case Arch::kPool: return std::make_unique<PoolClient>(ctx);
  }
  FL_INTERNAL_CHECK(false, "unknown arch");
}

// --batching's check: every value within 1e-5 of the reference's magnitude,
// |a - b| <= 1e-5 (|b| + max |b|), the bound precomputed per value
// (`tolerance`, made once per reference by tolerance_of); batched rows
// differ from batch-1 ones by about 1e-7 on the seed's MLP, whose outputs
// are about 0.2. It runs for every output, on the queue's workers with
// --callbacks, which set the pace at 64 clients: in float, without an early
// exit and with an int to collect failures, so the loop vectorises (g++ left
// it scalar while it and-ed a bool: a quarter of the workers' time), and in
// an AVX2 copy where the processor has it (the check was still 19 % of the
// workers' samples on the H100 with SSE2 and the bound computed per value:
// docs/PERF.md). Non-zero if a value is out of bounds (NaN is).
inline __attribute__((always_inline)) int count_far(const float* out, const float* ref,
                                                    const float* tol, size_t n) {
  int bad = 0;
  for (size_t i = 0; i < n; ++i) bad |= !(std::abs(out[i] - ref[i]) <= tol[i]);
  return bad;
}
#if defined(__x86_64__)
__attribute__((target("avx2"))) int count_far_avx2(const float* out, const float* ref,
                                                   const float* tol, size_t n) {
  return count_far(out, ref, tol, n);
}
#endif
int count_far_default(const float* out, const float* ref, const float* tol, size_t n) {
  return count_far(out, ref, tol, n);
}

bool close_to_reference(std::span<const float> out, std::span<const float> ref,
                        std::span<const float> tolerance) {
#if defined(__x86_64__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return count_far_avx2(out.data(), ref.data(), tolerance.data(), out.size()) == 0;
#endif
  return count_far_default(out.data(), ref.data(), tolerance.data(), out.size()) == 0;
}

// The bounds of close_to_reference for `ref`: 1e-5 (|b| + max |b|) per value,
// in float, as the check computed them inline before.
std::vector<float> tolerance_of(std::span<const float> ref) {
  float scale = 0;
  for (float v : ref) scale = std::max(scale, std::abs(v));
  std::vector<float> tol(ref.size());
  for (size_t i = 0; i < ref.size(); ++i) tol[i] = 1e-5f * (std::abs(ref[i]) + scale);
  return tol;
}

struct ThreadStats {
  std::vector<float> latency_us;  // timed requests only
  uint64_t checks = 0, wrong = 0, violations = 0, errors = 0;
  uint64_t waits = 0;  // --callbacks: sleeps with a full window
  // False for --warmup-seconds' stats: its latencies are not kept (at
  // millions of requests a second they would grow by megabytes a second).
  bool timed = true;
  // --window: the client thread's own time per phase (submit() calls, get()
  // calls including waiting, copying and checking outputs), summed.
  std::chrono::nanoseconds submit_time{0}, get_time{0}, check_time{0};
  int stream = -1;
  std::string first_error;
};

// --batching's verdict: whether `out` matches inputs[k]'s reference within
// tolerance; `corrupt`: check a copy with its first value changed instead
// (by 1: a 1-ulp change would pass the tolerance).
bool output_ok(const RunContext& ctx, size_t k, std::span<const float> out, bool corrupt) {
  if (out.size() != ctx.references[k].size()) return false;
  if (!corrupt) return close_to_reference(out, ctx.references[k], ctx.tolerances[k]);
  std::vector<float> copy(out.begin(), out.end());
  copy[0] += 1.0f;
  return close_to_reference(copy, ctx.references[k], ctx.tolerances[k]);
}

// Checks the output of inputs[k] against its reference; counts a wrong one.
void check_output(const RunContext& ctx, size_t k, std::span<float> out, ThreadStats& st,
                  bool corrupt) {
  ++st.checks;
  if (ctx.options.batching.enabled) {
    if (!output_ok(ctx, k, out, corrupt)) ++st.wrong;
    return;
  }
  // Exact: the same model on the same device computes the same bits.
  if (corrupt) out[0] = std::nextafter(out[0], INFINITY);
  if (std::memcmp(out.data(), ctx.references[k].data(), out.size() * sizeof(float)) != 0)
    ++st.wrong;
}

// Runs `fn` (a request, or the wait for one); counts what it throws.
template <typename Fn>
void counting_errors(ThreadStats& st, Fn&& fn) {
  try {
    fn();
  } catch (const ValidationError& e) {
    ++st.violations;
    if (st.first_error.empty()) st.first_error = e.what();
  } catch (const Error& e) {
    ++st.errors;
    if (st.first_error.empty()) st.first_error = e.what();
  }
}

// Runs inputs[k] through the client, checks the output; counts what failed.
// Returns the latency in µs.
double one_request(Client& client, const RunContext& ctx, size_t k, std::vector<float>& out,
                   ThreadStats& st, bool corrupt = false) {
  const auto t0 = Clock::now();
  counting_errors(st, [&] {
    client.request(k, out);
    check_output(ctx, k, out, st, corrupt);
  });
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

// The CPU time (user and system) of every thread of this process so far, in
// seconds: over the timed span, it says how many cores a run kept busy and
// what a request cost the host, whoever (clients, queue workers, the
// backend's threads) spent it.
double process_cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  const auto s = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
  };
  return s(ru.ru_utime) + s(ru.ru_stime);
}

double percentile(std::vector<float>& v, double p) {
  if (v.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(p * static_cast<double>(v.size())));
  const size_t i = std::min(v.size() - 1, rank == 0 ? 0 : rank - 1);
  std::nth_element(v.begin(), v.begin() + static_cast<ptrdiff_t>(i), v.end());
  return v[i];
}

// --callbacks: one client's window of requests in flight, completed by
// callbacks on the queue's threads. Slot i holds a request from submit()
// until its callback has run (busy); the callback checks the output and
// writes its verdict into the slot, which the client reads (harvests) before
// it reuses the slot, or at the end. The client sleeps only when the window
// is full, until `refill` slots are free (--refill, default 7/8 of the
// window): one wake-up per `refill` requests, not one per request. It
// outlives the queue: the last callback touches `in_flight` after its client
// may have finished.
struct CallbackWindow {
  struct Slot {
    // Written by the client before submit(), read by the callback.
    size_t k = 0;
    Clock::time_point t0{};
    bool corrupt = false;
    // Written by the callback before it clears `busy` (release); read by the
    // client after it saw `busy` clear (acquire).
    float latency_us = 0;
    bool wrong = false;
    std::exception_ptr error;
    std::atomic<bool> busy{false};
    bool unread = false;  // the client's own: a verdict to harvest
  };
  CallbackWindow(const RunContext& ctx, size_t window, int refill)
      : ctx(ctx), slots(window), low_water(static_cast<int>(window) - refill) {}

  void complete(Slot& slot, const serve::Completion& c) {
    // The queue runs on the steady clock (run_on_device gives it no other),
    // and reads it once a batch: no clock read per request on its workers.
    slot.latency_us = static_cast<float>(
        std::chrono::duration<double, std::micro>(c.completed_at - slot.t0).count());
    slot.error = c.error;
    slot.wrong = !c.error && !output_ok(ctx, slot.k, c.output, slot.corrupt);
    slot.busy.store(false, std::memory_order_release);
    // seq_cst, with the read of `sleeping` after it: see wait_for_at_most().
    const int left = in_flight.fetch_sub(1, std::memory_order_seq_cst) - 1;
    if ((left == low_water || left == 0) && sleeping.load(std::memory_order_seq_cst))
      detail::futex_wake_all(in_flight);
  }
  // Blocks until at most `n` requests are in flight: a futex sleep on the
  // counter itself. The client raises `sleeping` and then reads the count; a
  // callback lowers the count and then reads `sleeping` (all seq_cst): one
  // of the two sees the other, so a wake-up is never lost, and the futex
  // refuses to sleep once the count moved. Not std::atomic::wait, whose
  // libstdc++ version calls sched_yield a dozen times before it sleeps: 10 %
  // of the clients' samples at 64 x 64 on the H100 (docs/PERF.md).
  void wait_for_at_most(int n) {
    for (int v = in_flight.load(std::memory_order_acquire); v > n;
         v = in_flight.load(std::memory_order_acquire)) {
      sleeping.store(true, std::memory_order_seq_cst);
      v = in_flight.load(std::memory_order_seq_cst);
      if (v > n) detail::futex_wait(in_flight, v);  // returns at once if the count moved
      sleeping.store(false, std::memory_order_relaxed);
    }
  }

  const RunContext& ctx;
  std::vector<Slot> slots;
  const int low_water;  // a full window wakes its client here
  std::atomic<int> in_flight{0};
  std::atomic<bool> sleeping{false};  // the client is (about to be) asleep on in_flight
};

// Records one completed request's latency in `st`; every 64th also counts
// 64 more in `completed`, the progress line's count.
void record_latency(ThreadStats& st, float us, std::atomic<uint64_t>& completed) {
  if (!st.timed) return;
  st.latency_us.push_back(us);
  if (st.latency_us.size() % 64 == 0) completed.fetch_add(64, std::memory_order_relaxed);
}

// Records `slot`'s verdict in `st` once.
void harvest(CallbackWindow::Slot& slot, ThreadStats& st, std::atomic<uint64_t>& completed) {
  if (!slot.unread) return;
  slot.unread = false;
  record_latency(st, slot.latency_us, completed);
  if (slot.error) {
    counting_errors(st, [&] { std::rethrow_exception(slot.error); });
    slot.error = nullptr;
    return;
  }
  ++st.checks;
  if (slot.wrong) ++st.wrong;
}

// A client's timed loop with --callbacks: submits while `next` gives
// tickets, keeping up to the window in flight: one submit() a request, or,
// with --submit-group G > 1, the window's free slots (up to G) in one
// submit_all().
template <typename Next>
void run_callback_client(const RunContext& ctx, CallbackWindow& win, size_t t, ThreadStats& st,
                         std::atomic<uint64_t>& completed, Next&& next) {
  const size_t window = win.slots.size();
  const auto group_max = static_cast<size_t>(ctx.options.batching.submit_group);
  const bool borrow = borrows_inputs(ctx);
  // A group's slots, inputs and callbacks; kept from group to group.
  std::vector<CallbackWindow::Slot*> group;
  std::vector<serve::BorrowedInput> borrowed;
  std::vector<std::span<const float>> copied;
  std::vector<serve::CompletionCallback> callbacks;
  size_t cursor = 0;
  bool corrupt = false, more = true;
  auto now = Clock::now();
  for (uint64_t r = t; more;) {
    if (win.in_flight.load(std::memory_order_acquire) >= static_cast<int>(window)) {
      const auto t_wait = now;
      ++st.waits;
      win.wait_for_at_most(win.low_water);
      now = Clock::now();
      st.get_time += now - t_wait;
    }
    // At least this many slots are free (a callback frees its slot before
    // it lowers the count).
    const size_t free = window - static_cast<size_t>(win.in_flight.load(std::memory_order_acquire));
    group.clear();
    while (group.size() < std::min(group_max, free)) {
      if (!next(corrupt)) {
        more = false;
        break;
      }
      while (win.slots[cursor].busy.load(std::memory_order_acquire)) cursor = (cursor + 1) % window;
      CallbackWindow::Slot& slot = win.slots[cursor];
      cursor = (cursor + 1) % window;
      harvest(slot, st, completed);
      slot.k = r % ctx.inputs.size();
      r += 7;
      slot.t0 = now;
      slot.corrupt = corrupt;
      slot.unread = true;
      slot.busy.store(true, std::memory_order_relaxed);  // published by the submit
      group.push_back(&slot);
    }
    if (group.empty()) break;
    win.in_flight.fetch_add(static_cast<int>(group.size()), std::memory_order_relaxed);
    // Two pointers: small enough for std::function to hold without a heap
    // block of its own (one malloc a request fewer).
    const auto callback_of = [w = &win](CallbackWindow::Slot* s) {
      return [w, s](const serve::Completion& c) { w->complete(*s, c); };
    };
    bool submitted = false;
    counting_errors(st, [&] {
      if (group_max == 1) {
        submit_input(ctx, group[0]->k, callback_of(group[0]));
      } else {
        callbacks.clear();
        for (CallbackWindow::Slot* s : group) callbacks.emplace_back(callback_of(s));
        if (borrow) {
          borrowed.clear();
          for (CallbackWindow::Slot* s : group) borrowed.push_back(borrowed_input(ctx, s->k));
          ctx.queue->submit_all(borrowed, callbacks);
        } else {
          copied.clear();
          for (CallbackWindow::Slot* s : group) copied.emplace_back(ctx.inputs[s->k]);
          ctx.queue->submit_all(copied, callbacks);
        }
      }
      submitted = true;
    });
    if (!submitted) {  // refused before any was queued: no callback comes
      for (CallbackWindow::Slot* s : group) {
        s->unread = false;
        s->busy.store(false, std::memory_order_relaxed);
      }
      win.in_flight.fetch_sub(static_cast<int>(group.size()), std::memory_order_relaxed);
    }
    const auto t_submit = now;
    now = Clock::now();
    st.submit_time += now - t_submit;
  }
  win.wait_for_at_most(0);
  for (auto& slot : win.slots) harvest(slot, st, completed);
}

// The progress line: a rewritten line on a terminal, a line per second otherwise.
class Progress {
 public:
  explicit Progress(bool enabled) : enabled_(enabled), tty_(isatty(STDERR_FILENO) != 0) {}
  void update(double elapsed_s, uint64_t done, uint64_t total) {
    if (!enabled_ || elapsed_s < 1.0) return;
    shown_ = true;
    std::fprintf(stderr, "%srun: %.0f s, %llu", tty_ ? "\r" : "", elapsed_s,
                 static_cast<unsigned long long>(done));
    if (total) std::fprintf(stderr, "/%llu", static_cast<unsigned long long>(total));
    std::fprintf(stderr, " requests, %.0f req/s%s", static_cast<double>(done) / elapsed_s,
                 tty_ ? "   " : "\n");
    std::fflush(stderr);
  }
  ~Progress() {
    if (shown_ && tty_) std::fprintf(stderr, "\n");
  }

 private:
  const bool enabled_, tty_;
  bool shown_ = false;
};

// Counts the client threads still running; the main thread waits on it.
class Countdown {
 public:
  explicit Countdown(int n) : left_(n) {}
  void done() {
    MutexLock lock(mu_);
    --left_;
    cv_.notify_all();
  }
  // True once every thread is done; false if `deadline` came first.
  bool wait_until(Clock::time_point deadline) {
    MutexLock lock(mu_);
    return cv_.wait_until(mu_, deadline, [&]() FL_REQUIRES(mu_) { return left_ == 0; });
  }

 private:
  Mutex mu_;
  CondVar cv_;
  int left_ FL_GUARDED_BY(mu_);
};

WorkloadResult run_on_device(Device& dev, const nn::MlpWeights& weights, const WorkloadOptions& o) {
  WorkloadResult result;
  result.options = o;
  result.model_shape = weights.describe();
  result.device_name = dev.name() + " (" + dev.info().name + ")";
  result.policy = o.arch == Arch::kLegacy ? "single-stream" : to_string(dev.config().policy);

  const Stream s0 = dev.default_stream();
  nn::Mlp model(weights, o.dtype, s0);
  RunContext ctx{dev, model, o, {}, {}, {}, {}};
  const size_t in_n = static_cast<size_t>(o.batch * model.in_features());
  const size_t out_n = static_cast<size_t>(o.batch * model.out_features());
  for (int k = 0; k < o.distinct_inputs; ++k) {
    ctx.inputs.push_back(nn::random_uniform(in_n, o.seed * 1000003 + static_cast<uint64_t>(k)));
    ctx.references.emplace_back(out_n);
    infer(ctx, s0, ctx.inputs.back(), ctx.references.back());  // one thread: the reference
    ctx.tolerances.push_back(tolerance_of(ctx.references.back()));
  }
  // --callbacks: each client's window; they outlive the queue (its last
  // callbacks run as it drains).
  std::vector<std::unique_ptr<CallbackWindow>> windows;
  if (o.batching.callbacks)
    for (int t = 0; t < o.threads; ++t)
      windows.push_back(std::make_unique<CallbackWindow>(
          ctx, static_cast<size_t>(o.batching.window), o.batching.refill_or_default()));
  // --pinned-inputs: outlives the queue, whose requests read it.
  std::optional<serve::InputBuffer> pinned;
  std::optional<serve::BatchQueue> queue;  // destroyed (drained) before the model
  if (o.batching.enabled) {
    serve::BatchQueueOptions qo;
    qo.max_batch = o.batching.max_batch;
    qo.max_delay = std::chrono::microseconds(o.batching.max_delay_us);
    qo.workers = o.batching.workers;
    qo.pipeline_depth = o.batching.pipeline_depth;
    qo.spin_wait = std::chrono::microseconds(o.batching.spin_us);
    qo.record_batches = o.batching.record;
    qo.record_steps = o.batching.record_steps;
    qo.device_share = o.batching.device_share;
    if (o.batching.read_in_place_max_bytes >= 0)
      qo.read_in_place_max_bytes = static_cast<size_t>(o.batching.read_in_place_max_bytes);
    // Room for every client's window: no client waits for room.
    qo.capacity = std::max<size_t>(
        1024, static_cast<size_t>(o.threads) * static_cast<size_t>(o.batching.window));
    qo.when_full = serve::OverflowPolicy::kBlock;
    queue.emplace(
        dev, model.in_features(), model.out_features(),
        [&model](const Stream& s, const Tensor& x) { return model.forward(s, x); }, qo);
    ctx.queue = &*queue;
    if (o.batching.pinned) {
      pinned.emplace(queue->make_input_buffer(ctx.inputs.size()));
      for (size_t k = 0; k < ctx.inputs.size(); ++k)
        std::copy(ctx.inputs[k].begin(), ctx.inputs[k].end(), pinned->row(k).begin());
      ctx.pinned_inputs = &*pinned;
    }
  }

  const size_t n = static_cast<size_t>(o.threads);
  std::vector<ThreadStats> stats(n);
  // Relaxed: a ticket counter (only the count matters) and a stop flag that
  // publishes nothing; the threads' results are read after join().
  std::atomic<uint64_t> next_ticket{0};
  std::atomic<uint64_t> completed{0};
  std::atomic<bool> stop{false};
  std::latch start(o.threads + 1);
  Countdown running(o.threads);

  auto body = [&](size_t t) {
    ::flotilla::detail::name_this_thread(::flotilla::detail::str_cat("fl-client-", t));
    ThreadStats& st = stats[t];
    std::unique_ptr<Client> client;
    std::vector<float> out(out_n);
    bool counted_down = false;
    try {
      client = make_client(ctx);
      st.stream = client->stream_index();
      // The client's loop in its mode, drawing tickets from `tickets` until it
      // gives none, into `s` and `done`: the warm-up's and the timed run's.
      const auto drive = [&](ThreadStats& s, std::atomic<uint64_t>& done, auto&& tickets) {
        const size_t window = static_cast<size_t>(o.batching.window);
        bool corrupt = false;
        if (o.batching.callbacks) {
          run_callback_client(ctx, *windows[t], t, s, done, tickets);
        } else if (window == 1) {
          for (uint64_t r = t; tickets(corrupt); r += 7) {
            const double us = one_request(*client, ctx, r % ctx.inputs.size(), out, s, corrupt);
            if (s.timed) s.latency_us.push_back(static_cast<float>(us));
            done.fetch_add(1, std::memory_order_relaxed);
          }
        } else {  // --window: keep `window` requests in flight through the queue
          struct Pending {
            serve::RequestHandle handle;
            size_t k;
            Clock::time_point t0;
            bool corrupt;
          };
          std::deque<Pending> pending;
          bool more = true;
          // One clock read ends each phase and starts the next (three per
          // request): at a million requests a second the harness's own clock
          // reads showed in profiles.
          auto now = Clock::now();
          for (uint64_t r = t;;) {
            while (more && pending.size() < window) {
              more = tickets(corrupt);
              if (!more) break;
              const size_t k = r % ctx.inputs.size();
              r += 7;
              Pending p{{}, k, now, corrupt};
              counting_errors(s, [&] { p.handle = submit_input(ctx, k); });
              now = Clock::now();
              s.submit_time += now - p.t0;
              if (p.handle.valid()) pending.push_back(std::move(p));
            }
            if (pending.empty()) break;
            Pending p = std::move(pending.front());
            pending.pop_front();
            const auto t_get = now;
            auto t_got = t_get;
            counting_errors(s, [&] {
              std::vector<float> y = p.handle.get();  // throws the request's error
              t_got = Clock::now();
              check_row_size(y, out_n);
              check_output(ctx, p.k, y, s, p.corrupt);  // in place: no copy per request
            });
            now = Clock::now();
            s.get_time += t_got - t_get;
            s.check_time += now - t_got;
            record_latency(
                s,
                static_cast<float>(std::chrono::duration<double, std::micro>(t_got - p.t0).count()),
                done);
          }
        }
      };
      for (int w = 0; w < o.warmup; ++w)
        one_request(*client, ctx, (t + static_cast<size_t>(w)) % ctx.inputs.size(), out, st);
      if (o.warmup_seconds > 0) {  // --warmup-seconds: checked, counted, not timed
        ThreadStats warm;
        warm.timed = false;
        std::atomic<uint64_t> warm_done{0};
        const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(o.warmup_seconds));
        drive(warm, warm_done, [&](bool& corrupt) {
          corrupt = false;
          return Clock::now() < until;
        });
        st.checks += warm.checks;
        st.wrong += warm.wrong;
        st.violations += warm.violations;
        st.errors += warm.errors;
        if (st.first_error.empty()) st.first_error = warm.first_error;
      }
      counted_down = true;
      start.arrive_and_wait();
      st.latency_us.reserve(o.requests > 0 ? static_cast<size_t>(o.requests) / n + 1 : 4096);
      // The next request's ticket, or none once the run is over; `corrupt`
      // says whether the corrupt-every hook picks it.
      // Timed runs number their own tickets (t, t + threads, ...): a shared
      // counter would be one more cache line every request of every client
      // fights over, which at a million requests a second is a cost of the
      // harness, not of what it measures.
      uint64_t own_ticket = t;
      auto next = [&](bool& corrupt) -> bool {
        if (o.requests == 0 && stop.load(std::memory_order_relaxed)) return false;
        uint64_t ticket = own_ticket;
        if (o.requests > 0)
          ticket = next_ticket.fetch_add(1, std::memory_order_relaxed);
        else
          own_ticket += n;
        if (o.requests > 0 && ticket >= static_cast<uint64_t>(o.requests)) return false;
        corrupt = o.corrupt_every > 0 && (ticket + 1) % static_cast<uint64_t>(o.corrupt_every) == 0;
        if (o.crash_after > 0 && ticket + 1 == static_cast<uint64_t>(o.crash_after)) std::abort();
        return true;
      };
      drive(st, completed, next);
    } catch (const Error& e) {  // the client could not be made (e.g. no free stream)
      ++st.errors;
      if (st.first_error.empty()) st.first_error = e.what();
    }
    if (!counted_down) start.count_down();
    client.reset();
    running.done();
  };

  std::vector<std::thread> threads;
  threads.reserve(n);
  for (size_t t = 0; t < n; ++t) threads.emplace_back(body, t);
  start.arrive_and_wait();
  const auto t0 = Clock::now();
  const double cpu0 = process_cpu_seconds();
  {
    Progress progress(o.progress);
    const auto deadline =
        t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.seconds));
    bool stopped = o.requests > 0;  // by tickets, not by the clock
    for (;;) {
      auto wake = Clock::now() + std::chrono::seconds(1);
      if (!stopped) wake = std::min(wake, deadline);
      if (running.wait_until(wake)) break;
      if (!stopped && Clock::now() >= deadline) {
        stop.store(true, std::memory_order_relaxed);
        stopped = true;
      }
      progress.update(std::chrono::duration<double>(Clock::now() - t0).count(),
                      completed.load(std::memory_order_relaxed), static_cast<uint64_t>(o.requests));
    }
  }
  for (auto& th : threads) th.join();
  const double cpu_seconds = process_cpu_seconds() - cpu0;  // first: no CPU after the clock
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  dev.synchronize();

  std::vector<float> all;
  std::set<int> streams;
  std::chrono::nanoseconds submit_time{0}, get_time{0}, check_time{0};
  for (auto& st : stats) {
    all.insert(all.end(), st.latency_us.begin(), st.latency_us.end());
    result.checks += st.checks;
    result.wrong_results += st.wrong;
    result.violations += st.violations;
    result.errors += st.errors;
    if (result.first_error.empty()) result.first_error = st.first_error;
    if (st.stream >= 0) streams.insert(st.stream);
    submit_time += st.submit_time;
    get_time += st.get_time;
    check_time += st.check_time;
    result.client_waits += st.waits;
  }
  result.requests = all.size();
  result.samples = result.requests * static_cast<uint64_t>(o.batch);
  result.seconds = seconds;
  result.requests_per_s = seconds > 0 ? static_cast<double>(result.requests) / seconds : 0;
  result.samples_per_s = seconds > 0 ? static_cast<double>(result.samples) / seconds : 0;
  result.cpu_cores = seconds > 0 ? cpu_seconds / seconds : 0;
  result.cpu_us_per_request =
      result.requests > 0 ? cpu_seconds * 1e6 / static_cast<double>(result.requests) : 0;
  result.host_cores = static_cast<int>(std::thread::hardware_concurrency());
  double sum = 0;
  for (float v : all) sum += v;
  result.mean_us = all.empty() ? 0 : sum / static_cast<double>(all.size());
  result.max_us = all.empty() ? 0 : *std::max_element(all.begin(), all.end());
  result.p50_us = percentile(all, 0.50);
  result.p90_us = percentile(all, 0.90);
  result.p99_us = percentile(all, 0.99);
  result.streams_used = static_cast<int>(streams.size());
  if ((o.batching.window > 1 || o.batching.callbacks) && result.requests > 0) {
    const auto per_request_us = [&](std::chrono::nanoseconds t) {
      return static_cast<double>(t.count()) / 1e3 / static_cast<double>(result.requests);
    };
    result.client_submit_us = per_request_us(submit_time);
    result.client_get_us = per_request_us(get_time);
    result.client_check_us = per_request_us(check_time);
  }
  if (queue) {
    const serve::BatchQueueMetrics m = queue->metrics();
    result.mean_batch = m.mean_batch();
    result.rejected = m.rejected;
    result.expired = m.expired;
    result.cancelled = m.cancelled;
    result.queue_wait_p50_us = m.queue_wait.p50_us;
    result.queue_wait_p99_us = m.queue_wait.p99_us;
    result.compute_p50_us = m.compute.p50_us;
    result.compute_p99_us = m.compute.p99_us;
    result.max_depth = m.max_depth;
    result.read_in_place = m.read_in_place;
    std::set<int> queue_streams;
    for (const Stream& s : queue->streams()) queue_streams.insert(s.index());
    result.streams_used = static_cast<int>(queue_streams.size());
    result.device_share = queue->streams().front().device_share();
  }
  return result;
}

}  // namespace

WorkloadResult run_workload(const nn::MlpWeights& weights, const WorkloadOptions& o) {
  o.validate();
  Config cfg = Config::from_env();
  if (o.policy) cfg.policy = *o.policy;
  // More client threads than exclusive slots: share streams rather than fail.
  cfg.exclusive_when_full = WhenFull::kShare;
  auto dev = Device::create(o.backend, 0, cfg);
  WorkloadResult r = run_on_device(*dev, weights, o);  // every tensor is gone on return
  dev->shutdown();
  return r;
}

// ---- isolation -------------------------------------------------------------------------

namespace {

double default_timeout(const WorkloadOptions& o) {
  if (o.timeout_s > 0) return o.timeout_s;
  return (o.requests > 0 ? 900.0 : 3 * o.seconds + 120.0) + 3 * o.warmup_seconds;
}

WorkloadResult crashed(const nn::MlpWeights& weights, const WorkloadOptions& o,
                       const ChildOutcome& child) {
  WorkloadResult r;
  r.options = o;
  r.crashes = 1;
  r.model_shape = weights.describe();
  r.seconds = child.seconds;
  r.policy =
      o.arch == Arch::kLegacy ? "single-stream" : (o.policy ? to_string(*o.policy) : "default");
  r.first_error = child.crash_text("the run", "the run hung: killed after the watchdog's timeout");
  return r;
}

}  // namespace

WorkloadResult run_workload_isolated(const nn::MlpWeights& weights, const WorkloadOptions& o) {
  o.validate();
  // The parent has loaded MlpWeights only (host memory): no GPU driver has
  // been touched before the fork (see workload.h).
  const ChildOutcome child =
      run_in_child("run", std::chrono::duration<double>(default_timeout(o)), [&] {
        nlohmann::json out;
        try {
          out = {{"result", run_workload(weights, o).to_json()}};
        } catch (const Error& e) {
          out = {{"fatal", {{"code", static_cast<int>(e.code())}, {"message", e.what()}}}};
        } catch (const std::exception& e) {
          out = {
              {"fatal", {{"code", static_cast<int>(ErrorCode::kInternal)}, {"message", e.what()}}}};
        }
        return ChildReport{out.dump() + "\n"};
      });
  if (child.died()) return crashed(weights, o, child);
  const nlohmann::json j = nlohmann::json::parse(child.output, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return crashed(weights, o, child);  // exited without a result
  if (j.contains("fatal")) {
    throw Error(static_cast<ErrorCode>(j["fatal"]["code"].get<int>()),
                j["fatal"]["message"].get<std::string>());
  }
  return WorkloadResult::from_json(j.at("result"), o);
}

WorkloadResult run_workload_as_configured(const nn::MlpWeights& weights, const WorkloadOptions& o) {
  return o.isolate ? run_workload_isolated(weights, o) : run_workload(weights, o);
}

// ---- shared CLI options ----------------------------------------------------------------

void ModelOptionStrings::apply(WorkloadOptions& o) const {
  o.activation = ops::parse_activation(activation);
  o.dtype = parse_dtype(dtype);
  if (!policy.empty()) o.policy = parse_stream_policy(policy);
}

void add_batching_options(CLI::App& cmd, WorkloadOptions::Batching& b) {
  cmd.add_option("--max-batch", b.max_batch, "batching: requests per batch")->capture_default_str();
  cmd.add_option("--max-delay-us", b.max_delay_us,
                 "batching: how long a request waits for company (us)")
      ->capture_default_str();
  cmd.add_option("--queue-workers", b.workers, "batching: worker threads, each with its own stream")
      ->capture_default_str();
  cmd.add_option("--window", b.window,
                 "batching: requests each client keeps in flight (1: one at a time)")
      ->capture_default_str();
  cmd.add_option("--pipeline-depth", b.pipeline_depth,
                 "batching: batches each worker keeps in flight")
      ->capture_default_str();
  cmd.add_option("--spin-us", b.spin_us,
                 "batching: how long waiting threads spin before they sleep (us)")
      ->capture_default_str();
  cmd.add_option("--device-share", b.device_share,
                 "batching: streams running batches at once, claimed on the workers' streams "
                 "as a hint for planning kernels (0: the streams the workers get; 1: claim "
                 "nothing)")
      ->capture_default_str();
  cmd.add_flag("--record-batches", b.record,
               "batching: record each batch size once and replay it (a CUDA graph on cuda)");
  cmd.add_option("--record-steps", b.record_steps,
                 "batching, with --record-batches: recorded sizes in each octave above 64 rows "
                 "(a power of two, 1 to 64): more pad batches less and record more sizes")
      ->capture_default_str();
  cmd.add_flag("--callbacks", b.callbacks,
               "batching: outputs go to completion callbacks (checked on the queue's workers) "
               "instead of handles the clients wait on");
  cmd.add_option("--refill", b.refill,
                 "batching, with --callbacks: requests of a full window that complete before "
                 "its client wakes (0: 7/8 of the window)")
      ->capture_default_str();
  cmd.add_option("--submit-group", b.submit_group,
                 "batching, with --callbacks: the most requests a client submits in one "
                 "BatchQueue::submit_all() (its window's free slots, up to this many; 1: one "
                 "submit() a request)")
      ->capture_default_str();
  cmd.add_flag("--borrow-inputs", b.borrow,
               "batching: submit inputs as serve::BorrowedInput, read in place by the queue "
               "instead of copied at submit");
  cmd.add_flag("--pinned-inputs", b.pinned,
               "batching: keep the inputs in a serve::InputBuffer and submit its rows, which "
               "the device reads in place (no copy at submit, none by the workers)");
  cmd.add_option("--read-in-place-max-bytes", b.read_in_place_max_bytes,
                 "batching, with --pinned-inputs: batches whose inputs take more bytes pack "
                 "their rows and copy them in on the copy engines (-1: no limit)")
      ->capture_default_str();
}

void add_model_options(CLI::App& cmd, WorkloadOptions& o, ModelOptionStrings& s) {
  cmd.add_option("--backend", o.backend, "cpu or cuda")->capture_default_str();
  cmd.add_option("--model", o.model,
                 "safetensors file of an nn.Sequential of Linear layers (default: the seed's "
                 "built-in 512-1024-1024-512 MLP)");
  cmd.add_option("--activation", s.activation, "between layers: relu, gelu or gelu_tanh")
      ->capture_default_str();
  cmd.add_option("--dtype", s.dtype, "f32; f16 or bf16 on cuda")->capture_default_str();
  cmd.add_option("--policy", s.policy,
                 "pool streams: round-robin or exclusive (default: FLOTILLA_POLICY or "
                 "round-robin)");
  cmd.add_option("--seed", o.seed, "seed of the inputs")->capture_default_str();
  cmd.add_flag(
      "--in-process", [&o](int64_t) { o.isolate = false; },
      "run in this process (a crash is not counted, it ends the command)");
  cmd.add_flag(
      "--no-progress", [&o](int64_t) { o.progress = false; }, "no progress line on stderr");
}

}  // namespace flotilla::cli
