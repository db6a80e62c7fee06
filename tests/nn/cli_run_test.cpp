// `flotilla run` end to end: the built binary runs the seed's MLP on 4
// threads and its JSON says every output was right; a bad model file or
// option ends with a non-zero exit and one line naming the problem; and a
// corrupted output (the hidden --corrupt-every hook) is caught.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "common/cli_runner.h"

#ifndef FLOTILLA_CLI
#error "FLOTILLA_CLI must name the built flotilla binary"
#endif

namespace {

using Outcome = flotilla::test::CliResult;

// Runs the built CLI with `args`; `redirect` is shell text for stderr.
Outcome run_cli(const std::string& args, const std::string& redirect) {
  return flotilla::test::run_cli_binary(FLOTILLA_CLI, args, redirect);
}

int lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

TEST(CliRun, FourThreadsTwoHundredRequestsAllRight) {
  const auto r = run_cli("run --threads 4 --requests 200 --json", "2>/dev/null");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const auto j = nlohmann::json::parse(r.out);
  for (const char* key : {"backend", "model", "threads", "batch", "requests", "seconds",
                          "requests_per_s", "samples_per_s", "p50_us", "p90_us", "p99_us",
                          "crashes", "violations", "wrong_results", "streams_used"})
    EXPECT_TRUE(j.contains(key)) << "missing key " << key << " in " << r.out;
  EXPECT_EQ(j["backend"], "cpu");
  EXPECT_EQ(j["model"], "seed");
  EXPECT_EQ(j["threads"], 4);
  EXPECT_EQ(j["batch"], 1);
  EXPECT_EQ(j["requests"], 200);
  EXPECT_EQ(j["wrong_results"], 0);
  EXPECT_EQ(j["violations"], 0);
  EXPECT_EQ(j["crashes"], 0);
  EXPECT_EQ(j["errors"], 0);
  EXPECT_GE(j["checks"].get<int>(), 200);
  EXPECT_EQ(j["streams_used"], 4) << "4 pool threads should get 4 streams";
  EXPECT_GT(j["requests_per_s"].get<double>(), 0);
  EXPECT_LE(j["p50_us"].get<double>(), j["p99_us"].get<double>());
  // The process's CPU use over the timed span: 200 CPU forwards cost something,
  // and a process cannot keep more cores busy than the host has (half a
  // core of slack for the clocks' granularity).
  const int host_cores = j.at("host_cores").get<int>();
  EXPECT_GE(host_cores, 1);
  EXPECT_GT(j.at("cpu_us_per_request").get<double>(), 0);
  EXPECT_GT(j.at("cpu_cores").get<double>(), 0);
  EXPECT_LE(j.at("cpu_cores").get<double>(), host_cores + 0.5);
}

TEST(CliRun, LegacyUsesOneStreamAndStaysRight) {
  const auto r =
      run_cli("run --arch legacy --threads 4 --requests 60 --batch 3 --json", "2>/dev/null");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["streams_used"], 1);
  EXPECT_EQ(j["requests"], 60);
  EXPECT_EQ(j["samples"], 180);
  EXPECT_EQ(j["wrong_results"], 0);
  EXPECT_EQ(j["arch"], "legacy");
}

TEST(CliRun, CatchesACorruptedOutput) {
  const auto r = run_cli("run --threads 2 --requests 50 --corrupt-every 10 --json", "2>/dev/null");
  EXPECT_EQ(r.exit_code, 1) << "a wrong result must fail the run: " << r.out;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["wrong_results"], 5);
  EXPECT_EQ(j["requests"], 50);
}

TEST(CliRun, CountsACrashOfTheIsolatedRun) {
  const auto r = run_cli("run --threads 2 --requests 50 --crash-after 10 --json", "2>/dev/null");
  EXPECT_EQ(r.exit_code, 1) << "a crash must fail the run: " << r.out;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["crashes"], 1);
  EXPECT_NE(j["first_error"].get<std::string>().find("signal"), std::string::npos) << r.out;
}

TEST(CliRun, WatchdogKillsAHungIsolatedRunAndCountsIt) {
  // A minute of work and a watchdog of half a second: only the watchdog ends it.
  const auto t0 = std::chrono::steady_clock::now();
  const auto r = run_cli("run --threads 2 --seconds 60 --timeout 0.5 --json", "2>/dev/null");
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.exit_code, 1) << "a hang must fail the run: " << r.out;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["crashes"], 1);
  EXPECT_EQ(j["first_error"], "the run hung: killed after the watchdog's timeout") << r.out;
  EXPECT_LT(wall, 5.0) << "the watchdog must not wait for the run";
}

TEST(CliRun, BadModelFileEndsWithOneLineNamingIt) {
  const auto path = std::filesystem::temp_directory_path() /
                    ("fl_cli_bad_" + std::to_string(::getpid()) + ".safetensors");
  {
    std::ofstream f(path, std::ios::binary);
    const char header[] = "\x40\x00\x00\x00\x00\x00\x00\x00{\"0.weight\":";  // truncated
    f.write(header, sizeof header - 1);
  }
  const auto r = run_cli("run --model '" + path.string() + "' --requests 10", "2>&1");
  std::filesystem::remove(path);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(lines(r.out), 1) << r.out;
  EXPECT_NE(r.out.find(path.string()), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("beyond the file"), std::string::npos) << r.out;

  const auto missing = run_cli("run --model /nonexistent/model.safetensors", "2>&1");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_EQ(lines(missing.out), 1) << missing.out;
  EXPECT_NE(missing.out.find("/nonexistent/model.safetensors"), std::string::npos);
}

TEST(CliRun, BadOptionsEndWithOneLine) {
  for (const char* args :
       {"run --threads 0", "run --arch figure1", "run --dtype f64", "run --activation swish",
        "run --backend tpu", "run --timeout -1", "run --timeout nan"}) {
    const auto r = run_cli(args, "2>&1");
    EXPECT_NE(r.exit_code, 0) << args;
    EXPECT_EQ(lines(r.out), 1) << args << ": " << r.out;
    EXPECT_NE(r.out.find("flotilla: error:"), std::string::npos) << r.out;
  }
}

}  // namespace
