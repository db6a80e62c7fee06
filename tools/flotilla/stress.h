// The stress workload behind `flotilla stress`: many threads run kernels with
// known answers through the legacy (Figure 1) or pool (Figure 2)
// architecture, and every result is checked. Each round can run in a child
// process, so a crash is counted, not fatal.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "flotilla/common/config.h"

namespace flotilla::cli {

struct StressOptions {
  std::string backend = "cpu";
  std::string arch = "pool";  // legacy | pool
  StreamPolicy policy = StreamPolicy::kRoundRobin;
  int threads = 8;
  int ops_per_thread = 10000;  // kernel dispatches per thread per round
  int rounds = 5;
  bool encoding_lock = true;  // false: --no-encoding-lock
  bool agx_model = false;
  uint64_t seed = 1;
  int elements = 256;    // floats per buffer
  int check_every = 16;  // iterations (5 kernels each) between result checks
  double round_timeout_s = 120;
  bool fork_rounds = true;  // false: run rounds in this process
  // Test hook (hidden --crash-after N): thread 0 aborts the process once it
  // has dispatched N kernels, to prove an isolated round counts a crash.
  int crash_after = 0;
};

// What one round (or, summed, a whole run) saw.
struct StressTally {
  uint64_t ops = 0;            // kernels dispatched
  uint64_t checks = 0;         // results checked
  uint64_t wrong_results = 0;  // results that differed from the known answer
  uint64_t violations = 0;     // driver rule violations (ValidationError)
  uint64_t errors = 0;         // other flotilla::Error raised to the threads
  uint64_t crashes = 0;        // rounds whose process died or hung
  double seconds = 0;          // wall time of the rounds
  double lock_wait_s = 0;      // time spent waiting for the EncodingLock
  int streams_used = 0;        // distinct streams that served the threads (max over rounds)
  std::map<std::string, uint64_t> by_rule;  // violations per rule
  std::string first_error;                  // the first error message seen, for the report

  bool failed() const { return crashes || violations || wrong_results || errors; }
  void add(const StressTally& round);
};

// One round in this process.
StressTally run_stress_round(const StressOptions& options, uint64_t seed);
// One round in a forked child, with a watchdog; a death or hang is a crash.
StressTally run_stress_round_isolated(const StressOptions& options, uint64_t seed);

}  // namespace flotilla::cli
