// flotilla run: the main job. Client threads run the model (the seed's MLP
// by default) through the legacy or the pool architecture; every output is
// checked against a single-thread reference. Exits 1 if any request crashed,
// broke a driver rule, failed, or came back wrong.
#include <cstdio>
#include <iostream>
#include <memory>

#include "commands.h"
#include "workload.h"

namespace flotilla::cli {

namespace {

void print_human(const WorkloadResult& r) {
  const auto& o = r.options;
  std::printf("flotilla run: %s, model %s (%s, %s), arch %s, policy %s, %d threads, batch %d\n",
              r.device_name.empty() ? o.backend.c_str() : r.device_name.c_str(),
              o.model_name().c_str(), r.model_shape.c_str(), to_string(o.dtype), arch_label(o),
              r.policy.c_str(), o.threads, o.batch);
  std::printf("  requests        %llu in %.3f s\n", static_cast<unsigned long long>(r.requests),
              r.seconds);
  std::printf("  throughput      %.1f requests/s, %.1f samples/s\n", r.requests_per_s,
              r.samples_per_s);
  std::printf("  latency         p50 %.1f us, p90 %.1f us, p99 %.1f us (mean %.1f, max %.1f)\n",
              r.p50_us, r.p90_us, r.p99_us, r.mean_us, r.max_us);
  std::printf("  crashes         %llu\n", static_cast<unsigned long long>(r.crashes));
  std::printf("  violations      %llu\n", static_cast<unsigned long long>(r.violations));
  std::printf("  wrong results   %llu of %llu checked\n",
              static_cast<unsigned long long>(r.wrong_results),
              static_cast<unsigned long long>(r.checks));
  std::printf("  other errors    %llu\n", static_cast<unsigned long long>(r.errors));
  std::printf("  streams used    %d\n", r.streams_used);
  if (o.batching.enabled)
    std::printf(
        "  batching        max batch %d, max delay %lld us, %d workers x %d in flight, window "
        "%d, spin %lld us%s: mean batch %.2f, rejected %llu, expired %llu, cancelled %llu\n",
        o.batching.max_batch, static_cast<long long>(o.batching.max_delay_us), o.batching.workers,
        o.batching.pipeline_depth, o.batching.window, static_cast<long long>(o.batching.spin_us),
        o.batching.record ? ", recorded" : "", r.mean_batch,
        static_cast<unsigned long long>(r.rejected), static_cast<unsigned long long>(r.expired),
        static_cast<unsigned long long>(r.cancelled));
  if (!r.first_error.empty()) std::printf("  first error     %s\n", r.first_error.c_str());
}

}  // namespace

void add_run_command(CLI::App& app) {
  auto* cmd =
      app.add_subcommand("run", "Serve the model to many client threads; every output is checked");
  auto o = std::make_shared<WorkloadOptions>();
  auto strings = std::make_shared<ModelOptionStrings>();
  auto arch = std::make_shared<std::string>("pool");
  auto json = std::make_shared<bool>(false);
  add_model_options(*cmd, *o, *strings);
  cmd->add_option("--threads", o->threads, "client threads")->capture_default_str();
  auto* requests = cmd->add_option("--requests", o->requests,
                                   "requests in all, over the threads (default 1000)");
  auto* seconds = cmd->add_option("--seconds", o->seconds, "run for this long instead");
  requests->excludes(seconds);
  cmd->add_option("--warmup-seconds", o->warmup_seconds,
                  "each client runs this long before the clock starts (outputs checked, not "
                  "timed): first uses, such as recording each batch size, stay out of the timed "
                  "figures (the queue's own metrics, such as mean_batch, include them)")
      ->capture_default_str();
  cmd->add_option("--batch", o->batch, "samples per request")->capture_default_str();
  cmd->add_option("--arch", *arch,
                  "legacy (Figure 1 made safe: one stream, one lock) or pool (a stream per "
                  "thread)")
      ->capture_default_str();
  cmd->add_option("--timeout", o->timeout_s, "seconds before the run counts as hung (0: auto)");
  cmd->add_flag("--json", *json, "print one JSON object on stdout");
  // Hidden (empty group): the CLI test's proof that a wrong output is caught.
  cmd->add_option("--corrupt-every", o->corrupt_every, "test hook")->group("");
  cmd->add_option("--crash-after", o->crash_after, "test hook")->group("");
  cmd->add_flag("--batching", o->batching.enabled,
                "client threads submit batch-1 requests to a BatchQueue that runs real batches");
  add_batching_options(*cmd, o->batching);
  cmd->callback([o, strings, arch, json] {
    strings->apply(*o);
    o->arch = parse_arch(*arch);
    if (o->requests == 0 && o->seconds == 0) o->requests = 1000;
    o->validate();
    const nn::MlpWeights weights = load_weights(*o);  // a bad file ends here, naming it
    const WorkloadResult r = run_workload_as_configured(weights, *o);
    if (*json)
      std::cout << r.to_json().dump() << std::endl;
    else
      print_human(r);
    if (r.failed()) throw CLI::RuntimeError(1);
  });
}

}  // namespace flotilla::cli
