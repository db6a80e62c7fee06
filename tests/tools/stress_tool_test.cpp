// The stress tool must be able to see a race: the legacy architecture (the
// seed's Figure 1) fails under it, the pool (Figure 2) does not.
#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#include "common/cli_runner.h"
#include "stress.h"

namespace flotilla::cli {
namespace {

// Sanitizer lanes are 5-20x slower: FLOTILLA_TEST_SCALE shrinks the work.
int scaled(int n) {
  const char* s = std::getenv("FLOTILLA_TEST_SCALE");
  const double f = s ? std::atof(s) : 1.0;
  return std::max(50, static_cast<int>(n * (f > 0 ? f : 1.0)));
}

StressOptions options(const std::string& arch, int threads) {
  StressOptions o;
  o.arch = arch;
  o.threads = threads;
  o.ops_per_thread = scaled(4000);
  o.seed = 42;
  return o;
}

TEST(StressTool, SeesTheLegacyArchitectureFail) {
  // Each round is independent; within a few rounds of 8 threads on one shared
  // command buffer the driver's validation must report the races.
  StressTally total;
  int failed_rounds = 0;
  for (int r = 0; r < 5; ++r) {
    StressTally t = run_stress_round(options("legacy", 8), 42 + static_cast<uint64_t>(r));
    failed_rounds += t.failed() ? 1 : 0;
    total.add(t);
  }
  std::printf("legacy: %d/5 rounds failed, %llu violations, %llu wrong results\n", failed_rounds,
              static_cast<unsigned long long>(total.violations),
              static_cast<unsigned long long>(total.wrong_results));
  EXPECT_GT(failed_rounds, 0);
  EXPECT_GT(total.violations + total.wrong_results, 0u);
  EXPECT_EQ(total.crashes, 0u) << "legacy races must be logic races, not crashes";
  EXPECT_EQ(total.streams_used, 1);
}

TEST(StressTool, PoolHoldsWithBothPolicies) {
  for (auto policy : {StreamPolicy::kRoundRobin, StreamPolicy::kExclusive}) {
    auto o = options("pool", 8);
    o.policy = policy;
    StressTally t = run_stress_round(o, 7);
    EXPECT_FALSE(t.failed()) << to_string(policy) << ": " << t.first_error;
    EXPECT_GT(t.checks, 0u);
    EXPECT_EQ(t.streams_used, 8) << "8 threads should get 8 distinct pooled streams";
  }
}

TEST(StressTool, AgxModelNeedsTheEncodingLock) {
  auto o = options("pool", 8);
  o.agx_model = true;
  o.encoding_lock = false;
  StressTally without;
  for (int r = 0; r < 5 && without.by_rule["concurrent-encoding"] == 0; ++r)
    without.add(run_stress_round(o, 100 + static_cast<uint64_t>(r)));
  EXPECT_GT(without.by_rule["concurrent-encoding"], 0u)
      << "without the lock, concurrent encoding on an AGX-model driver must be reported";
  o.encoding_lock = true;
  StressTally with = run_stress_round(o, 200);
  EXPECT_FALSE(with.failed()) << with.first_error;
}

std::string run_cli(const std::string& args, int* exit_code) {
  const test::CliResult r = test::run_cli_binary(FLOTILLA_CLI, args, "2>/dev/null");
  EXPECT_NE(r.exit_code, -1) << "could not start the shell";
  *exit_code = r.exit_code;
  return r.out;
}

TEST(StressTool, CliJsonReportsLegacyFailuresAndPoolSuccess) {
  const std::string ops = std::to_string(scaled(3000));
  int code = 0;
  auto legacy = nlohmann::json::parse(run_cli(
      "stress --arch legacy --threads 8 --rounds 8 --ops-per-thread " + ops + " --json", &code));
  EXPECT_EQ(code, 1) << "a failed round makes the exit status 1";
  for (const char* key :
       {"backend", "arch", "policy", "threads", "rounds", "rounds_failed", "crashes", "violations",
        "wrong_results", "ops", "seconds", "ops_per_s", "encoding_lock_wait_share", "streams_used"})
    EXPECT_TRUE(legacy.contains(key)) << key;
  EXPECT_GT(legacy["rounds_failed"].get<int>(), 0);
  auto pool = nlohmann::json::parse(
      run_cli("stress --arch pool --policy exclusive --threads 8 --rounds 2 --ops-per-thread " +
                  ops + " --json",
              &code));
  EXPECT_EQ(code, 0);
  EXPECT_EQ(pool["rounds_failed"].get<int>(), 0) << pool.dump();
  EXPECT_EQ(pool["streams_used"].get<int>(), 8);
  EXPECT_GE(pool["ops"].get<uint64_t>(), 2u * 8u * static_cast<uint64_t>(scaled(3000)));
}

// An isolated round (the CLI's default) that dies is counted, round by round,
// and the command goes on to report it.
TEST(StressTool, CliCountsACrashOfEachIsolatedRound) {
  int code = 0;
  const auto j = nlohmann::json::parse(run_cli(
      "stress --threads 2 --rounds 2 --ops-per-thread 1000 --crash-after 50 --json", &code));
  EXPECT_EQ(code, 1) << "crashed rounds make the exit status 1";
  EXPECT_EQ(j["crashes"].get<int>(), 2) << j.dump();
  EXPECT_EQ(j["rounds_failed"].get<int>(), 2) << j.dump();
  EXPECT_EQ(j["first_error"].get<std::string>().rfind("round crashed with signal ", 0), 0u)
      << j.dump();
}

TEST(StressTool, WatchdogKillsAHungRoundAndCountsIt) {
  auto o = options("pool", 2);
  o.ops_per_thread = 1'000'000'000;  // hours of work: only the watchdog ends the round
  o.round_timeout_s = 0.3;
  const auto t0 = std::chrono::steady_clock::now();
  const StressTally t = run_stress_round_isolated(o, 1);
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(t.crashes, 1u);
  EXPECT_EQ(t.first_error, "round hung: killed after the watchdog timeout");
  EXPECT_GE(t.seconds, 0.29);  // it fires with under a millisecond left
  EXPECT_LT(wall, 5.0) << "the watchdog must not wait for the round";
}

TEST(StressTool, BadOptionsExitNonZeroWithOneLine) {
  int code = 0;
  run_cli("stress --backend tpu --json", &code);
  EXPECT_NE(code, 0);
  for (const char* timeout : {"0", "-1", "nan"}) {
    const test::CliResult r = test::run_cli_binary(
        FLOTILLA_CLI, std::string("stress --threads 1 --rounds 1 --round-timeout ") + timeout,
        "2>&1");
    EXPECT_NE(r.exit_code, 0) << timeout;
    EXPECT_NE(r.out.find("--round-timeout must be a positive number"), std::string::npos)
        << timeout << ": " << r.out;
  }
}

}  // namespace
}  // namespace flotilla::cli
