// `flotilla run --batching` and `flotilla bench --batching` end to end: the
// built binary merges client threads' batch-1 requests in a BatchQueue,
// every output is checked against the unbatched reference, the JSON carries
// the queue's figures, a corrupted output is caught, and bad options end
// with one line.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
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

using Result = flotilla::test::CliResult;

// Runs the built CLI with `args`; `redirect` is shell text for stderr.
Result run_cli(const std::string& args, const std::string& redirect) {
  return flotilla::test::run_cli_binary(FLOTILLA_CLI, args, redirect);
}

// Runs `flotilla ARGS --json` (stderr dropped): its exit code must be 0;
// returns the JSON object it printed.
nlohmann::json run_json(const std::string& args) {
  const auto r = run_cli(args + " --json", "2>/dev/null");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  return r.exit_code == 0 ? nlohmann::json::parse(r.out) : nlohmann::json::object();
}

// A run's outputs were all checked and right: no wrong result, no error,
// and at least `requests` checks.
void expect_every_output_right(const nlohmann::json& j, int requests) {
  EXPECT_EQ(j.value("wrong_results", -1), 0);
  EXPECT_EQ(j.value("errors", -1), 0);
  EXPECT_GE(j.value("checks", 0), requests);
}

TEST(CliBatching, RunMergesRequestsAndEveryOutputIsRight) {
  const auto r = run_cli(
      "run --batching --threads 8 --requests 400 --max-batch 16 --max-delay-us 2000 "
      "--queue-workers 2 --device-share 3 --json",
      "2>/dev/null");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const auto j = nlohmann::json::parse(r.out);
  for (const char* key :
       {"mean_batch", "rejected", "expired", "cancelled", "max_batch", "max_delay_us",
        "queue_workers", "requests_per_s", "p99_us", "device_share", "device_share_option"})
    EXPECT_TRUE(j.contains(key)) << "missing key " << key << " in " << r.out;
  EXPECT_EQ(j["arch"], "batching");
  EXPECT_EQ(j["requests"], 400);
  EXPECT_EQ(j["batch"], 1);
  EXPECT_EQ(j["device_share_option"], 3);
  EXPECT_EQ(j["device_share"], 3) << "the queue's claim on its streams";
  EXPECT_EQ(j["wrong_results"], 0);
  EXPECT_EQ(j["errors"], 0);
  EXPECT_EQ(j["crashes"], 0);
  EXPECT_GE(j["checks"].get<int>(), 400);
  EXPECT_EQ(j["rejected"], 0);
  EXPECT_EQ(j["expired"], 0);
  EXPECT_EQ(j["cancelled"], 0);
  EXPECT_EQ(j["streams_used"], 2) << "the queue's two workers serve every client";
  EXPECT_GT(j["mean_batch"].get<double>(), 1.0) << "8 clients and a 2 ms delay: real batches";
  EXPECT_LE(j["mean_batch"].get<double>(), 16.0);
}

// --record-batches with --record-steps reaches the queue: batches above 64
// rows run at the finer sizes, every output checked. Would catch: the option
// dropped on the way (the JSON echoes what the queue was given) or a padded
// row handed to a client.
TEST(CliBatching, RecordedBatchesAtEightStepsAnOctaveAreRight) {
  const auto j = run_json(
      "run --batching --record-batches --record-steps 8 --threads 8 --window 32 --callbacks "
      "--max-batch 256 --queue-workers 2 --requests 3000");
  EXPECT_EQ(j.value("record_batches", false), true);
  EXPECT_EQ(j.value("record_steps", 0), 8);
  expect_every_output_right(j, 3000);
}

TEST(CliBatching, CallbacksCheckEveryOutputAndKeepTheWindowFull) {
  const auto j = run_json(
      "run --batching --callbacks --threads 4 --window 16 --requests 2000 --max-batch 32 "
      "--queue-workers 2");
  EXPECT_EQ(j["callbacks"], true);
  EXPECT_EQ(j["requests"], 2000) << "every submitted request comes back once";
  expect_every_output_right(j, 2000);
  EXPECT_EQ(j["client_check_us"], 0.0) << "the callbacks check, on the workers";
  EXPECT_GT(j["mean_batch"].get<double>(), 1.0) << "4 clients x 16 in flight: real batches";
  EXPECT_EQ(j["refill"], 14) << "by default a full window's client wakes when 7/8 are free";
  // Latency runs from submit to Completion::completed_at, which the queue
  // reads by the same (steady) clock.
  EXPECT_GT(j["p50_us"].get<double>(), 0.0);
  EXPECT_LE(j["p50_us"].get<double>(), j["max_us"].get<double>());
}

// --warmup-seconds: each client runs its loop before the clock starts, on
// every client path; those outputs are checked and counted, not timed.
// Would catch: a warm-up that never ran (checks no more than the timed
// requests and the two closed-loop warm-up requests a client), one counted
// as timed (requests past --requests), or one that left requests in flight
// into the timed run (a window's slots still busy: the run hangs or loses
// a request).
TEST(CliBatching, WarmupSecondsRunChecksAndStayOutOfTheFigures) {
  for (const std::string how : {"", "--window 8", "--callbacks --window 8"}) {
    const auto r = run_cli("run --batching " + how +
                               " --threads 3 --requests 300 --warmup-seconds 0.3 "
                               "--max-batch 16 --queue-workers 2 --json",
                           "2>/dev/null");
    ASSERT_EQ(r.exit_code, 0) << how << ": " << r.out;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["warmup_seconds"], 0.3) << how;
    EXPECT_EQ(j["requests"], 300) << how;
    EXPECT_EQ(j["wrong_results"], 0) << how;
    EXPECT_EQ(j["errors"], 0) << how;
    EXPECT_GT(j["checks"].get<int>(), 300 + 3 * 2) << how << ": the warm-up ran no request";
  }
  const auto bad = run_cli("run --batching --requests 10 --warmup-seconds -1", "2>&1");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.out.find("--warmup-seconds"), std::string::npos) << bad.out;
}

// --borrow-inputs: the clients' inputs are read in place (BorrowedInput) on
// every client path: closed loop, windows, callbacks; --pinned-inputs: from
// an InputBuffer, read in place by the device. Every output is still
// checked, and a corrupted one still fails the run.
TEST(CliBatching, BorrowedInputsAreCheckedOnEveryClientPath) {
  for (const std::string how : {"--borrow-inputs", "--pinned-inputs"}) {
    for (const char* path : {"", " --window 8", " --callbacks --window 8"}) {
      const auto r = run_cli(
          "run --batching " + how + " --threads 4 --requests 400 --queue-workers 2 --json" + path,
          "2>/dev/null");
      ASSERT_EQ(r.exit_code, 0) << how << path << ": " << r.out;
      const auto j = nlohmann::json::parse(r.out);
      EXPECT_EQ(j["borrow_inputs"], true) << how << path;
      EXPECT_EQ(j["pinned_inputs"], how == "--pinned-inputs") << how << path;
      EXPECT_EQ(j["requests"], 400) << how << path;
      EXPECT_GE(j["checks"].get<int>(), 400) << how << path;
      EXPECT_EQ(j["wrong_results"], 0) << how << path;
      EXPECT_EQ(j["errors"], 0) << how << path;
      const auto bad = run_cli(
          "run --batching " + how + " --threads 4 --requests 100 --corrupt-every 10 --json" + path,
          "2>/dev/null");
      EXPECT_EQ(bad.exit_code, 1) << "a wrong result must fail the run" << how << path << ": "
                                  << bad.out;
      EXPECT_EQ(nlohmann::json::parse(bad.out)["wrong_results"], 10) << how << path;
    }
  }
}

// --read-in-place-max-bytes reaches the queue: with no limit every
// --pinned-inputs request is read in place, with 0 none is (the rows are
// packed), and the outputs stay right either way. Would catch: the flag
// parsed and dropped, or read_in_place missing from the JSON.
TEST(CliBatching, ReadInPlaceMaxBytesPacksTheRowsOfLargerBatches) {
  for (const char* limit : {"", " --read-in-place-max-bytes 0"}) {
    const auto r = run_cli(std::string("run --batching --pinned-inputs --threads 4 --requests 400 "
                                       "--queue-workers 1 --window 8 --json") +
                               limit,
                           "2>/dev/null");
    ASSERT_EQ(r.exit_code, 0) << limit << ": " << r.out;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["wrong_results"], 0) << limit;
    EXPECT_EQ(j["requests"], 400) << limit;
    if (*limit == '\0') {
      EXPECT_EQ(j["read_in_place_max_bytes"], -1);
      EXPECT_GE(j["read_in_place"].get<uint64_t>(), 400u) << "no limit: every row in place";
    } else {
      EXPECT_EQ(j["read_in_place_max_bytes"], 0);
      EXPECT_EQ(j["read_in_place"], 0) << "limit 0: every row packed";
    }
  }
}

TEST(CliBatching, RefillSetsHowManyCompleteBeforeAClientWakes) {
  uint64_t waits[2] = {0, 0};
  int n = 0;
  for (const char* refill : {"1", "16"}) {
    const auto r = run_cli(std::string("run --batching --callbacks --threads 4 --window 16 "
                                       "--requests 1000 --max-batch 32 --queue-workers 2 --json "
                                       "--refill ") +
                               refill,
                           "2>/dev/null");
    ASSERT_EQ(r.exit_code, 0) << refill << ": " << r.out;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["refill"], std::stoi(refill));
    EXPECT_EQ(j["requests"], 1000) << "refill " << refill << ": every request comes back once";
    EXPECT_EQ(j["wrong_results"], 0);
    EXPECT_EQ(j["errors"], 0);
    waits[n++] = j["client_waits"].get<uint64_t>();
  }
  // After a wait a client has `refill` free slots, so it waits at most once
  // per `refill` requests: with 16 (the whole window), at most 1000 / 16 + 4
  // times for the 4 clients together (a client that woke at the first free
  // slot, refill 1, waited 67 to 100 times in trial runs). With refill 1 the
  // windows do fill.
  EXPECT_LE(waits[1], 1000u / 16u + 4u) << "refill 16 woke a client before its window emptied";
  EXPECT_GT(waits[0], 0u);
}

// --submit-group: clients submit their windows' free slots in groups
// (BatchQueue::submit_all), with copied, borrowed and pinned inputs; every
// request comes back once, each output is checked (a corrupted one is
// caught), and the JSON says so. Would catch: a group that lost or
// duplicated a request (requests != --requests, or a hang), callbacks
// crossed between a group's slots (wrong results), or the flag dropped.
TEST(CliBatching, SubmitGroupsCheckEveryOutputOnEveryInputKind) {
  for (const char* how : {"", " --borrow-inputs", " --pinned-inputs"}) {
    const std::string args =
        std::string(
            "run --batching --callbacks --threads 4 --window 16 --submit-group 16 "
            "--queue-workers 2 --json") +
        how;
    const auto r = run_cli(args + " --requests 1000", "2>/dev/null");
    ASSERT_EQ(r.exit_code, 0) << how << ": " << r.out;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["submit_group"], 16) << how;
    EXPECT_EQ(j["requests"], 1000) << how << ": every request comes back once";
    expect_every_output_right(j, 1000);
    EXPECT_GT(j["mean_batch"].get<double>(), 1.0) << how;
    const auto bad = run_cli(args + " --requests 200 --corrupt-every 10", "2>/dev/null");
    EXPECT_EQ(bad.exit_code, 1) << "a wrong result must fail the run" << how << ": " << bad.out;
    EXPECT_EQ(nlohmann::json::parse(bad.out)["wrong_results"], 20) << how;
  }
}

TEST(CliBatching, CatchesACorruptedOutput) {
  // Closed loop, with windows (whose client checks the queue's output in
  // place), and with callbacks (which check on the queue's workers, closed
  // loop or windowed): each path has its own check call.
  for (const char* window : {"", " --window 8", " --callbacks", " --window 8 --callbacks"}) {
    const auto r =
        run_cli(std::string("run --batching --threads 4 --requests 100 --corrupt-every 10 "
                            "--json") +
                    window,
                "2>/dev/null");
    EXPECT_EQ(r.exit_code, 1) << "a wrong result must fail the run" << window << ": " << r.out;
    const auto j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["wrong_results"], 10) << window;
  }
}

TEST(CliBatching, BadOptionsEndWithOneLine) {
  for (const char* args : {"run --batching --batch 4",
                           "run --batching --max-batch 0",
                           "run --batching --max-delay-us -1",
                           "run --batching --queue-workers 0",
                           "run --callbacks",
                           "run --batching --refill 2",
                           "run --batching --callbacks --window 8 --refill 9",
                           "run --batching --callbacks --window 8 --refill -1",
                           "run --batching --submit-group 4",
                           "run --batching --callbacks --submit-group 0",
                           "run --submit-group 2",
                           "bench --submit-group 2",
                           "run --batching --device-share -1",
                           "run --batching --device-share 257",
                           "run --device-share 2",
                           "bench --callbacks",
                           "bench --window 4",
                           "bench --device-share 4",
                           "run --borrow-inputs",
                           "bench --borrow-inputs",
                           "run --pinned-inputs",
                           "bench --pinned-inputs",
                           "run --batching --read-in-place-max-bytes 65536",
                           "run --batching --pinned-inputs --read-in-place-max-bytes -2",
                           "run --read-in-place-max-bytes 0",
                           "bench --read-in-place-max-bytes 0",
                           "run --batching --record-batches --record-steps 3",
                           "run --batching --record-batches --record-steps 128",
                           "run --batching --record-steps 8"}) {
    const auto r = run_cli(args, "2>&1");
    EXPECT_NE(r.exit_code, 0) << args;
    int lines = 0;
    for (char c : r.out) lines += c == '\n';
    EXPECT_EQ(lines, 1) << args << ": " << r.out;
    EXPECT_NE(r.out.find("flotilla: error:"), std::string::npos) << r.out;
  }
}

// Runs `flotilla bench ARGS --no-plot --out DIR` into a fresh directory:
// `r` gets its exit code (checked: 0) and its table; returns its bench.json
// (null if it wrote none, which fails the test too).
nlohmann::json run_bench(const std::string& name, const std::string& args, Result& r) {
  const auto dir = std::filesystem::temp_directory_path() /
                   ("fl_bench_" + name + "_" + std::to_string(::getpid()));
  r = run_cli("bench " + args + " --no-plot --out '" + dir.string() + "'", "2>/dev/null");
  std::ifstream in(dir / "bench.json");
  nlohmann::json j =
      in ? nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false) : nlohmann::json();
  std::filesystem::remove_all(dir);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_TRUE(j.is_object()) << "no bench.json from: bench " << args;
  return j;
}

TEST(CliBatching, BenchAddsABatchingSeries) {
  Result r;
  const auto j = run_bench("batching",
                           "--batching --threads-list 1,4 --batches 1 --archs pool "
                           "--seconds-per-point 0.2",
                           r);
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["batching"], true);
  int pool = 0, batching = 0;
  for (const auto& p : j["points"]) {
    EXPECT_EQ(p["wrong_results"], 0);
    if (p["arch"] == "batching") {
      ++batching;
      EXPECT_TRUE(p.contains("mean_batch"));
    } else {
      ++pool;
    }
  }
  EXPECT_EQ(pool, 2);
  EXPECT_EQ(batching, 2);
  EXPECT_NE(r.out.find("batching"), std::string::npos) << r.out;
}

// --warmup-seconds applies to every point of both series, and bench.json
// says so. Would catch: the option dropped on the way to the points (their
// checks then no more than their timed requests and two closed-loop
// warm-up requests a client).
TEST(CliBatching, BenchWarmsEveryPointUp) {
  Result r;
  const auto j = run_bench("warmup",
                           "--batching --threads-list 2 --batches 1 --archs pool "
                           "--seconds-per-point 0.2 --warmup-seconds 0.2",
                           r);
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["warmup_seconds"], 0.2);
  int points = 0;
  for (const auto& p : j["points"]) {
    ++points;
    EXPECT_EQ(p["warmup_seconds"], 0.2) << p.dump();
    EXPECT_EQ(p["wrong_results"], 0) << p.dump();
    EXPECT_GT(p["checks"].get<int64_t>(), p["requests"].get<int64_t>() + 2 * 2) << p.dump();
  }
  EXPECT_EQ(points, 2) << "a pool point and a batching point";
}

// --callbacks (and --window) set up the batching series only: its points
// hand their outputs to completion callbacks, while the pool points run as
// without the flags (they used to refuse them, so the bench could not run).
// bench.json says which points used callbacks (and borrowed inputs), and so
// does the table.
TEST(CliBatching, BenchWithCallbacksRunsTheBatchingSeriesThroughCallbacks) {
  Result r;
  const auto j = run_bench(
      "callbacks",
      "--backend cpu --batching --callbacks --window 4 --borrow-inputs --threads-list 1,2 "
      "--batches 1 --archs pool --max-batch 8 --queue-workers 1 --seconds-per-point 0.2",
      r);
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["batching"], true);
  EXPECT_EQ(j["callbacks"], true) << "the batching series used callbacks";
  EXPECT_EQ(j["borrow_inputs"], true) << "and borrowed its inputs";
  int pool = 0, batching = 0;
  for (const auto& p : j["points"]) {
    EXPECT_EQ(p["wrong_results"], 0) << p.dump();
    EXPECT_EQ(p["errors"], 0) << p.dump();
    EXPECT_EQ(p["crashes"], 0) << p.dump();
    EXPECT_GT(p["requests"].get<int>(), 0) << p.dump();
    if (p["arch"] == "batching") {
      ++batching;
      EXPECT_EQ(p["callbacks"], true) << p.dump();
      EXPECT_EQ(p["borrow_inputs"], true) << p.dump();
      EXPECT_EQ(p["window"], 4) << p.dump();
      EXPECT_EQ(p["refill"], 4) << "7/8 of a window of 4, at least 1: " << p.dump();
      EXPECT_TRUE(p.contains("client_waits")) << p.dump();
      EXPECT_EQ(p["client_check_us"], 0.0) << "the callbacks check, on the workers: " << p.dump();
    } else {
      ++pool;
      EXPECT_EQ(p["arch"], "pool");
      EXPECT_EQ(p["callbacks"], false) << p.dump();
      EXPECT_FALSE(p.contains("window"))
          << "a pool point ran with the queue's options: " << p.dump();
    }
  }
  EXPECT_EQ(pool, 2);
  EXPECT_EQ(batching, 2);
  EXPECT_NE(r.out.find("batching+callbacks+borrowed"), std::string::npos) << r.out;
}

// --pinned-inputs: the batching series reads its inputs from an InputBuffer;
// bench.json says so and the table names the series "+pinned".
TEST(CliBatching, BenchWithPinnedInputsLabelsItsSeries) {
  Result r;
  const auto j =
      run_bench("pinned",
                "--backend cpu --batching --pinned-inputs --threads-list 1,2 --batches 1 "
                "--archs pool --max-batch 8 --queue-workers 1 --seconds-per-point 0.2",
                r);
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["pinned_inputs"], true);
  int batching = 0;
  for (const auto& p : j["points"]) {
    EXPECT_EQ(p["wrong_results"], 0) << p.dump();
    EXPECT_EQ(p["errors"], 0) << p.dump();
    if (p["arch"] != "batching") continue;
    ++batching;
    EXPECT_EQ(p["pinned_inputs"], true) << p.dump();
  }
  EXPECT_EQ(batching, 2);
  EXPECT_NE(r.out.find("batching+pinned"), std::string::npos) << r.out;
}

}  // namespace
