#include "stress.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <latch>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include "flotilla/flotilla.h"
#include "flotilla/runtime/legacy.h"
#include "isolate.h"

namespace flotilla::cli {

using backend::KernelArgs;
using Clock = std::chrono::steady_clock;

void StressTally::add(const StressTally& r) {
  ops += r.ops;
  checks += r.checks;
  wrong_results += r.wrong_results;
  violations += r.violations;
  errors += r.errors;
  crashes += r.crashes;
  seconds += r.seconds;
  lock_wait_s += r.lock_wait_s;
  streams_used = std::max(streams_used, r.streams_used);
  for (const auto& [rule, n] : r.by_rule) by_rule[rule] += n;
  if (first_error.empty()) first_error = r.first_error;
}

namespace {

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// The work of one thread, written once for both architectures: `Sink` is a
// Stream (pool) or the shared LegacyStream (legacy).
struct ThreadResult {
  uint64_t ops = 0, checks = 0, wrong = 0, violations = 0, errors = 0;
  std::map<std::string, uint64_t> by_rule;
  std::string first_error;
  int stream = -1;
  // The thread's buffers outlive the thread: under the legacy architecture
  // its kernels can sit in a command buffer another thread commits later,
  // so they are freed only after the device has drained (run_stress_round).
  std::vector<std::unique_ptr<backend::Buffer>> buffers;
};

// After an error a pool thread lets its stream's work finish before it goes
// on. Without the encoding lock on an AGX-model driver, a check's
// synchronize() can throw in end_encoder() (another thread was encoding):
// its copy into host_sums then stays in the open command buffer, which a
// later dispatch commits with nobody waiting, and that copy raced with the
// next check's poison (TSan saw it once in several CI runs, in
// StressTool.AgxModelNeedsTheEncodingLock). The legacy architecture's
// shared stream is left as it is: its failures are what it shows.
template <typename Sink>
void drain_after_error(Sink& sink) {
  if constexpr (requires { sink.drain(); }) sink.drain();
}

template <typename Sink>
void thread_body(Device& dev, Sink& sink, const StressOptions& o, uint64_t seed, int tid,
                 ThreadResult& r) {
  auto& drv = dev.driver("stress");
  const size_t n = static_cast<size_t>(o.elements);
  const size_t slots = static_cast<size_t>(o.check_every);
  auto* a = r.buffers.emplace_back(drv.allocate(n * sizeof(float))).get();
  auto* b = r.buffers.emplace_back(drv.allocate(n * sizeof(float))).get();
  auto* c = r.buffers.emplace_back(drv.allocate(n * sizeof(float))).get();
  auto* sums = r.buffers.emplace_back(drv.allocate(slots * sizeof(uint64_t))).get();
  auto* host = r.buffers.emplace_back(drv.allocate_host(slots * sizeof(uint64_t))).get();
  auto* host_sums = static_cast<uint64_t*>(host->host_ptr());
  std::vector<uint64_t> expected(slots);

  const int iterations = std::max(1, o.ops_per_thread / 5);  // 5 kernels each, + a copy per check
  size_t slot = 0;
  auto check = [&] {
    // Poison first: a copy that never happened must not look right.
    std::memset(host_sums, 0xA5, slots * sizeof(uint64_t));
    sink.dispatch(
        "copy_bytes",
        KernelArgs().ptr(host->device_ptr()).ptr(sums->device_ptr()).size(slot * sizeof(uint64_t)));
    ++r.ops;
    sink.synchronize();
    for (size_t i = 0; i < slot; ++i) {
      ++r.checks;
      if (host_sums[i] != expected[i]) ++r.wrong;
    }
    slot = 0;
  };
  for (int it = 0; it < iterations; ++it) {
    if (o.crash_after > 0 && tid == 0 && r.ops >= static_cast<uint64_t>(o.crash_after))
      std::abort();
    try {
      // Small integers: every float operation below is exact on any device.
      const auto v1 = static_cast<float>(
          (seed + static_cast<uint64_t>(tid) * 7919 + static_cast<uint64_t>(it)) % 1000);
      const auto v2 = static_cast<float>(tid + 1);
      const float s = (it % 2) ? 2.0f : 3.0f;
      sink.dispatch("fill_f32", KernelArgs().ptr(a->device_ptr()).f64(v1).size(n));
      sink.dispatch("fill_f32", KernelArgs().ptr(b->device_ptr()).f64(v2).size(n));
      sink.dispatch(
          "add_f32",
          KernelArgs().ptr(a->device_ptr()).ptr(b->device_ptr()).ptr(c->device_ptr()).size(n));
      sink.dispatch("scale_f32",
                    KernelArgs().ptr(c->device_ptr()).ptr(c->device_ptr()).f64(s).size(n));
      auto* out = static_cast<uint64_t*>(sums->device_ptr()) + slot;
      sink.dispatch("checksum_u32", KernelArgs().ptr(c->device_ptr()).ptr(out).size(n));
      r.ops += 5;
      expected[slot] = uint64_t{float_bits((v1 + v2) * s)} * n;
      if (++slot == slots || it + 1 == iterations) check();
    } catch (const ValidationError& e) {
      ++r.violations;
      ++r.by_rule[e.rule()];
      if (r.first_error.empty()) r.first_error = e.what();
      slot = 0;  // that group's results are unknowable now; start a new one
      drain_after_error(sink);
    } catch (const Error& e) {
      ++r.errors;
      if (r.first_error.empty()) r.first_error = e.what();
      slot = 0;
      drain_after_error(sink);
    }
  }
  // Leave nothing running on our buffers before they are freed.
  try {
    sink.synchronize();
  } catch (const Error&) {
  }
}

struct PoolSink {
  Stream stream;
  void dispatch(std::string_view k, const KernelArgs& a) { stream.dispatch(k, a); }
  void synchronize() { stream.synchronize(); }
  // Commits and waits until a synchronize() returns without an error (each
  // error is reported once; a concurrent-encoding violation is transient).
  void drain() {
    for (int i = 0; i < 1000; ++i) {
      try {
        stream.synchronize();
        return;
      } catch (const Error&) {
      }
    }
  }
};

}  // namespace

StressTally run_stress_round(const StressOptions& o, uint64_t seed) {
  Config cfg;
  cfg.policy = o.policy;
  cfg.cpu_agx_model = o.agx_model;
  cfg.encoding_lock = o.encoding_lock ? EncodingLockMode::kAuto : EncodingLockMode::kOff;
  // The stress threads outnumber exclusive slots at high counts: share then.
  cfg.exclusive_when_full = WhenFull::kShare;
  auto dev = Device::create(o.backend, 0, cfg);
  std::optional<LegacyStream> legacy;
  if (o.arch == "legacy") legacy.emplace(*dev);

  std::vector<ThreadResult> results(static_cast<size_t>(o.threads));
  std::latch start(o.threads + 1);
  std::latch acquired(o.threads);  // every thread holds its stream
  std::vector<std::thread> threads;
  threads.reserve(results.size());
  for (int t = 0; t < o.threads; ++t) {
    threads.emplace_back([&, t] {
      auto& r = results[static_cast<size_t>(t)];
      start.arrive_and_wait();
      // Every thread takes its stream (at once: acquisition races too), and
      // none runs until all hold one: an exclusive stream goes back to the
      // pool when its thread ends, and a fast thread could otherwise hand
      // its stream to a slow one, so the streams used would not say whether
      // each thread had its own.
      std::optional<Stream> stream;
      std::exception_ptr acquire_error;
      try {
        if (!legacy) stream = dev->current_stream();
      } catch (...) {
        acquire_error = std::current_exception();
      }
      acquired.arrive_and_wait();
      try {
        if (acquire_error) std::rethrow_exception(acquire_error);
        if (legacy) {
          thread_body(*dev, *legacy, o, seed, t, r);
          r.stream = 0;
        } else {
          PoolSink sink{*stream};
          r.stream = sink.stream.index();
          thread_body(*dev, sink, o, seed, t, r);
        }
      } catch (const Error& e) {
        ++r.errors;
        if (r.first_error.empty()) r.first_error = e.what();
      }
    });
  }
  const auto t0 = Clock::now();
  start.arrive_and_wait();
  for (auto& th : threads) th.join();
  StressTally tally;
  tally.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  try {
    dev->synchronize();
  } catch (const Error& e) {
    ++tally.errors;
    if (tally.first_error.empty()) tally.first_error = e.what();
  }
  tally.lock_wait_s = std::chrono::duration<double>(dev->encoding_lock().stats().wait).count();
  legacy.reset();
  dev->shutdown();  // drains everything still queued before buffers are freed
  std::set<int> streams;
  for (const auto& r : results) {
    tally.ops += r.ops;
    tally.checks += r.checks;
    tally.wrong_results += r.wrong;
    tally.violations += r.violations;
    tally.errors += r.errors;
    for (const auto& [rule, k] : r.by_rule) tally.by_rule[rule] += k;
    if (tally.first_error.empty()) tally.first_error = r.first_error;
    if (r.stream >= 0) streams.insert(r.stream);
  }
  tally.streams_used = static_cast<int>(streams.size());
  return tally;
}

namespace {

nlohmann::json to_json(const StressTally& t) {
  return {{"ops", t.ops},
          {"checks", t.checks},
          {"wrong", t.wrong_results},
          {"violations", t.violations},
          {"errors", t.errors},
          {"seconds", t.seconds},
          {"lock_wait_s", t.lock_wait_s},
          {"streams", t.streams_used},
          {"by_rule", t.by_rule},
          {"first_error", t.first_error}};
}

StressTally from_json(const nlohmann::json& j) {
  StressTally t;
  t.ops = j.at("ops");
  t.checks = j.at("checks");
  t.wrong_results = j.at("wrong");
  t.violations = j.at("violations");
  t.errors = j.at("errors");
  t.seconds = j.at("seconds");
  t.lock_wait_s = j.at("lock_wait_s");
  t.streams_used = j.at("streams");
  t.by_rule = j.at("by_rule").get<std::map<std::string, uint64_t>>();
  t.first_error = j.at("first_error");
  return t;
}

StressTally crashed(const std::string& why, double seconds) {
  StressTally t;
  t.crashes = 1;
  t.seconds = seconds;
  t.first_error = why;
  return t;
}

}  // namespace

StressTally run_stress_round_isolated(const StressOptions& o, uint64_t seed) {
  // The parent must not have touched a GPU driver before fork(): this
  // function runs only device-free code here (see cmd_stress.cpp).
  const ChildOutcome child =
      run_in_child("stress", std::chrono::duration<double>(o.round_timeout_s), [&] {
        try {
          return ChildReport{to_json(run_stress_round(o, seed)).dump() + "\n"};
        } catch (const std::exception& e) {
          StressTally t;
          t.errors = 1;
          t.first_error = e.what();
          return ChildReport{to_json(t).dump() + "\n", 3};
        }
      });
  if (!child.died()) {
    try {
      return from_json(nlohmann::json::parse(child.output));
    } catch (const std::exception&) {
      // No result: counted as a crash below, with the child's exit status.
    }
  }
  return crashed(child.crash_text("round", "round hung: killed after the watchdog timeout"),
                 child.seconds);
}

}  // namespace flotilla::cli
