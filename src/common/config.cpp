#include "flotilla/common/config.h"

#include <cstdlib>

#include "flotilla/common/error.h"

namespace flotilla {

namespace {

int parse_int(const char* var, const std::string& text, int lo, int hi) {
  try {
    size_t used = 0;
    int v = std::stoi(text, &used);
    if (used == text.size() && v >= lo && v <= hi) return v;
  } catch (const std::exception&) {
  }
  throw InvalidArgument(detail::str_cat("[Config::from_env] ", var, "='", text,
                                        "' is not a whole number in [", lo, ", ", hi, "]"));
}

bool parse_bool(const char* var, const std::string& text) {
  if (text == "1" || text == "true" || text == "on") return true;
  if (text == "0" || text == "false" || text == "off") return false;
  throw InvalidArgument(detail::str_cat("[Config::from_env] ", var, "='", text,
                                        "' is not a boolean; use 1/0, true/false or on/off"));
}

// An enum value from variable `var`: the parser's error, naming the variable.
template <typename Parse>
auto parse_enum(const char* var, const std::string& text, Parse parse) {
  try {
    return parse(text);
  } catch (const InvalidArgument& e) {
    std::string why = e.what();
    if (why.rfind("[Config] ", 0) == 0) why.erase(0, 9);
    throw InvalidArgument(detail::str_cat("[Config::from_env] ", var, ": ", why));
  }
}

}  // namespace

StreamPolicy parse_stream_policy(const std::string& s) {
  if (s == "round-robin") return StreamPolicy::kRoundRobin;
  if (s == "exclusive") return StreamPolicy::kExclusive;
  throw InvalidArgument("[Config] unknown stream policy '" + s + "'; use round-robin or exclusive");
}

SyncMode parse_sync_mode(const std::string& s) {
  if (s == "none") return SyncMode::kNone;
  if (s == "commit") return SyncMode::kCommit;
  if (s == "commit-and-wait") return SyncMode::kCommitAndWait;
  if (s == "adaptive") return SyncMode::kAdaptive;
  throw InvalidArgument("[Config] unknown sync mode '" + s +
                        "'; use none, commit, commit-and-wait or adaptive");
}

EncodingLockMode parse_encoding_lock_mode(const std::string& s) {
  if (s == "auto") return EncodingLockMode::kAuto;
  if (s == "on") return EncodingLockMode::kOn;
  if (s == "off") return EncodingLockMode::kOff;
  throw InvalidArgument("[Config] unknown encoding lock mode '" + s + "'; use auto, on or off");
}

WhenFull parse_when_full(const std::string& s) {
  if (s == "wait") return WhenFull::kWait;
  if (s == "share") return WhenFull::kShare;
  throw InvalidArgument("[Config] unknown exclusive-when-full behaviour '" + s +
                        "'; use wait or share");
}

const char* to_string(StreamPolicy p) noexcept {
  return p == StreamPolicy::kRoundRobin ? "round-robin" : "exclusive";
}
const char* to_string(SyncMode m) noexcept {
  switch (m) {
    case SyncMode::kNone: return "none";
    case SyncMode::kCommit: return "commit";
    case SyncMode::kCommitAndWait: return "commit-and-wait";
    case SyncMode::kAdaptive: return "adaptive";
  }
  return "?";
}
const char* to_string(EncodingLockMode m) noexcept {
  switch (m) {
    case EncodingLockMode::kAuto: return "auto";
    case EncodingLockMode::kOn: return "on";
    case EncodingLockMode::kOff: return "off";
  }
  return "?";
}
const char* to_string(WhenFull w) noexcept { return w == WhenFull::kWait ? "wait" : "share"; }

Config Config::from_env() {
  Config c;
  auto get = [](const char* var) -> const char* { return std::getenv(var); };
  if (const char* v = get("FLOTILLA_POOL_SIZE"))
    c.pool_size = parse_int("FLOTILLA_POOL_SIZE", v, 2, 64);
  if (const char* v = get("FLOTILLA_POLICY"))
    c.policy = parse_enum("FLOTILLA_POLICY", v, parse_stream_policy);
  if (const char* v = get("FLOTILLA_SYNC_MODE"))
    c.sync_mode = parse_enum("FLOTILLA_SYNC_MODE", v, parse_sync_mode);
  if (const char* v = get("FLOTILLA_ENCODING_LOCK"))
    c.encoding_lock = parse_enum("FLOTILLA_ENCODING_LOCK", v, parse_encoding_lock_mode);
  if (const char* v = get("FLOTILLA_CPU_THREADS"))
    c.cpu_exec_threads = parse_int("FLOTILLA_CPU_THREADS", v, 0, 1024);
  if (const char* v = get("FLOTILLA_CUDA_MAX_CONNECTIONS"))
    c.cuda_max_connections = parse_int("FLOTILLA_CUDA_MAX_CONNECTIONS", v, 0, 32);
  if (const char* v = get("FLOTILLA_CUDA_COMPLETION_THREADS"))
    c.cuda_completion_threads = parse_int("FLOTILLA_CUDA_COMPLETION_THREADS", v, 0, 64);
  if (const char* v = get("FLOTILLA_CUDA_COMPLETION_SLEEP_US"))
    c.cuda_completion_sleep =
        std::chrono::microseconds(parse_int("FLOTILLA_CUDA_COMPLETION_SLEEP_US", v, 0, 1000));
  if (const char* v = get("FLOTILLA_CUDA_WAIT_SPIN_US"))
    c.cuda_wait_spin =
        std::chrono::microseconds(parse_int("FLOTILLA_CUDA_WAIT_SPIN_US", v, 0, 10000));
  if (const char* v = get("FLOTILLA_CUDA_GATHER_BLOCKS"))
    c.cuda_gather_blocks = parse_int("FLOTILLA_CUDA_GATHER_BLOCKS", v, 1, 1024);
  if (const char* v = get("FLOTILLA_CUDA_TUNE_GEMM"))
    c.cuda_tune_gemm = parse_bool("FLOTILLA_CUDA_TUNE_GEMM", v);
  if (const char* v = get("FLOTILLA_ALLOCATOR_CACHING"))
    c.allocator_caching = parse_bool("FLOTILLA_ALLOCATOR_CACHING", v);
  c.validate();
  return c;
}

void Config::validate() const {
  FL_CHECK_ARG(pool_size >= 2 && pool_size <= 64, "[Config] pool_size=", pool_size,
               " is out of range; use 2..64 (stream 0 is the default stream, the rest are pooled)");
  FL_CHECK_ARG(adaptive_commit_kernels >= 1,
               "[Config] adaptive_commit_kernels=", adaptive_commit_kernels, " must be at least 1");
  FL_CHECK_ARG(cpu_exec_threads >= 0, "[Config] cpu_exec_threads=", cpu_exec_threads,
               " must be 0 (auto) or positive");
  FL_CHECK_ARG(exclusive_wait.count() >= 0, "[Config] exclusive_wait must not be negative");
  FL_CHECK_ARG(cuda_max_connections >= 0 && cuda_max_connections <= 32,
               "[Config] cuda_max_connections=", cuda_max_connections,
               " is out of range; use 0 (Flotilla's default) or 1..32");
  FL_CHECK_ARG(cuda_completion_threads >= 0,
               "[Config] cuda_completion_threads=", cuda_completion_threads,
               " must be 0 (auto) or positive");
  FL_CHECK_ARG(cuda_completion_sleep.count() >= 0 && cuda_completion_sleep.count() <= 1000,
               "[Config] cuda_completion_sleep=", cuda_completion_sleep.count(),
               " us is out of range; use 0 (spin) to 1000 us");
  FL_CHECK_ARG(cuda_wait_spin.count() >= 0 && cuda_wait_spin.count() <= 10000,
               "[Config] cuda_wait_spin=", cuda_wait_spin.count(),
               " us is out of range; use 0 (sleep at once) to 10000 us");
  FL_CHECK_ARG(cuda_gather_blocks >= 1 && cuda_gather_blocks <= 1024,
               "[Config] cuda_gather_blocks=", cuda_gather_blocks,
               " is out of range; use 1..1024 blocks of 16 warps");
  FL_CHECK_ARG(event_pool_size >= 0, "[Config] event_pool_size must not be negative");
}

}  // namespace flotilla
