// flotilla stress: the seed's Figure 1 failing and Figure 2 holding.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "flotilla/backend/driver.h"
#include "flotilla/common/error.h"
#include "stress.h"

namespace flotilla::cli {

namespace {

nlohmann::json summary_json(const StressOptions& o, const StressTally& t, int rounds_failed) {
  const double lock_share =
      t.seconds > 0 ? t.lock_wait_s / (t.seconds * std::max(1, o.threads)) : 0.0;
  return {{"backend", o.backend},
          {"arch", o.arch},
          {"policy", o.arch == "legacy" ? "single-stream" : to_string(o.policy)},
          {"threads", o.threads},
          {"rounds", o.rounds},
          {"rounds_failed", rounds_failed},
          {"crashes", t.crashes},
          {"violations", t.violations},
          {"violations_by_rule", t.by_rule},
          {"wrong_results", t.wrong_results},
          {"errors", t.errors},
          {"checks", t.checks},
          {"ops", t.ops},
          {"seconds", t.seconds},
          {"ops_per_s", t.seconds > 0 ? static_cast<double>(t.ops) / t.seconds : 0.0},
          {"encoding_lock", o.encoding_lock},
          {"agx_model", o.agx_model},
          {"encoding_lock_wait_share", lock_share},
          {"streams_used", t.streams_used},
          {"seed", o.seed},
          {"first_error", t.first_error}};
}

void run(const StressOptions& o, bool json) {
  // Only device-free checks here: the parent must not initialise a GPU
  // driver before fork() (a CUDA context does not survive into a child).
  backend::find_backend(o.backend);
  FL_CHECK_ARG(o.arch == "legacy" || o.arch == "pool",
               "[stress] --arch must be legacy or pool, not '", o.arch, "'");
  FL_CHECK_ARG(o.threads >= 1 && o.threads <= 4096, "[stress] --threads must be in 1..4096");
  FL_CHECK_ARG(o.rounds >= 1, "[stress] --rounds must be at least 1");
  FL_CHECK_ARG(o.ops_per_thread >= 5, "[stress] --ops-per-thread must be at least 5");
  FL_CHECK_ARG(o.crash_after >= 0, "[stress] --crash-after must not be negative");
  // Not `> 0` alone: NaN passes no comparison, and every round would count as hung.
  FL_CHECK_ARG(o.round_timeout_s > 0,
               "[stress] --round-timeout must be a positive number of "
               "seconds (the watchdog's limit for one round)");
  const bool tty = isatty(STDERR_FILENO);
  StressTally total;
  int rounds_failed = 0;
  for (int r = 0; r < o.rounds; ++r) {
    const uint64_t seed = o.seed + static_cast<uint64_t>(r);
    StressTally round =
        o.fork_rounds ? run_stress_round_isolated(o, seed) : run_stress_round(o, seed);
    if (round.failed()) ++rounds_failed;
    total.add(round);
    // Progress on stderr, so --json output stays one clean object.
    std::fprintf(stderr, "%sround %d/%d: %s  ops=%llu violations=%llu wrong=%llu crashes=%llu%s",
                 tty ? "\r" : "", r + 1, o.rounds, round.failed() ? "FAILED" : "ok",
                 static_cast<unsigned long long>(round.ops),
                 static_cast<unsigned long long>(round.violations),
                 static_cast<unsigned long long>(round.wrong_results),
                 static_cast<unsigned long long>(round.crashes), tty ? "   " : "\n");
  }
  if (tty) std::fprintf(stderr, "\n");
  auto j = summary_json(o, total, rounds_failed);
  // Exits 1 when a round failed, as `flotilla run` does on a wrong result,
  // so a script or CI job running the pool architecture sees it; for the
  // legacy architecture a failure is the expected finding, and the report
  // (and the exit status) says so.
  if (json) {
    std::cout << j.dump() << std::endl;
    if (rounds_failed > 0) throw CLI::RuntimeError(1);
    return;
  }
  std::cout << "flotilla stress: backend=" << o.backend << " arch=" << o.arch
            << " policy=" << j["policy"].get<std::string>() << " threads=" << o.threads
            << " rounds=" << o.rounds << "\n"
            << "  rounds failed   " << rounds_failed << " of " << o.rounds << "\n"
            << "  crashes         " << total.crashes << "\n"
            << "  violations      " << total.violations << "\n";
  for (const auto& [rule, n] : total.by_rule) std::cout << "    " << rule << ": " << n << "\n";
  std::cout << "  wrong results   " << total.wrong_results << " of " << total.checks << " checked\n"
            << "  other errors    " << total.errors << "\n"
            << "  ops             " << total.ops << " in " << total.seconds << " s ("
            << j["ops_per_s"].get<double>() << " ops/s)\n"
            << "  streams used    " << total.streams_used << "\n"
            << "  encoding lock   " << (o.encoding_lock ? "auto" : "off")
            << (o.agx_model ? " (AGX model)" : "") << ", wait share "
            << j["encoding_lock_wait_share"].get<double>() << "\n";
  if (!total.first_error.empty()) std::cout << "  first error     " << total.first_error << "\n";
  if (rounds_failed > 0) throw CLI::RuntimeError(1);
}

}  // namespace

void add_stress_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "stress", "Many threads run kernels with known answers; every result is checked");
  auto o = std::make_shared<StressOptions>();
  auto json = std::make_shared<bool>(false);
  auto policy = std::make_shared<std::string>("round-robin");
  auto no_lock = std::make_shared<bool>(false);
  auto in_process = std::make_shared<bool>(false);
  cmd->add_option("--backend", o->backend, "cpu or cuda")->capture_default_str();
  cmd->add_option("--arch", o->arch, "legacy (the seed's Figure 1) or pool (Figure 2)")
      ->check(CLI::IsMember({"legacy", "pool"}))
      ->capture_default_str();
  cmd->add_option("--policy", *policy, "round-robin or exclusive")
      ->check(CLI::IsMember({"round-robin", "exclusive"}))
      ->capture_default_str();
  cmd->add_option("--threads", o->threads, "threads")->capture_default_str();
  cmd->add_option("--ops-per-thread", o->ops_per_thread, "kernels per thread per round")
      ->capture_default_str();
  cmd->add_option("--rounds", o->rounds, "rounds, each in its own child process")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "seed of the known answers")->capture_default_str();
  cmd->add_option("--elements", o->elements, "floats per buffer")->capture_default_str();
  cmd->add_option("--round-timeout", o->round_timeout_s, "seconds before a round counts as hung")
      ->capture_default_str();
  cmd->add_flag("--no-encoding-lock", *no_lock, "never take the EncodingLock");
  cmd->add_flag("--agx-model", o->agx_model,
                "the cpu driver declares its encoding path not thread-safe (Apple's AGX)");
  cmd->add_flag("--in-process", *in_process, "run rounds in this process (no crash isolation)");
  cmd->add_flag("--json", *json, "print one JSON object");
  // Hidden (empty group): the CLI test's proof that an isolated round counts a crash.
  cmd->add_option("--crash-after", o->crash_after, "test hook")->group("");
  cmd->callback([o, json, policy, no_lock, in_process] {
    o->policy = parse_stream_policy(*policy);
    o->encoding_lock = !*no_lock;
    o->fork_rounds = !*in_process;
    run(*o, *json);
  });
}

}  // namespace flotilla::cli
