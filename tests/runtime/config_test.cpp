// Config::from_env: the FLOTILLA_* variables, read in one place. Bad values
// throw InvalidArgument naming the variable (config.h). Label unit.
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "runtime/runtime_test_util.h"

namespace flotilla::test {
namespace {

// Sets an environment variable for its scope, restoring the old value.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    ::setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_)
      ::setenv(name_, old_->c_str(), 1);
    else
      ::unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

const char* const kVars[] = {"FLOTILLA_POOL_SIZE",
                             "FLOTILLA_POLICY",
                             "FLOTILLA_SYNC_MODE",
                             "FLOTILLA_ENCODING_LOCK",
                             "FLOTILLA_CPU_THREADS",
                             "FLOTILLA_ALLOCATOR_CACHING",
                             "FLOTILLA_CUDA_COMPLETION_SLEEP_US",
                             "FLOTILLA_CUDA_WAIT_SPIN_US",
                             "FLOTILLA_CUDA_GATHER_BLOCKS",
                             "FLOTILLA_CUDA_TUNE_GEMM"};

// Clears the FLOTILLA_* variables for each test (CI sets some, such as
// FLOTILLA_ALLOCATOR_CACHING) and restores them afterwards.
class ConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* v : kVars) {
      const char* old = std::getenv(v);
      saved_.emplace_back(v, old ? std::optional<std::string>(old) : std::nullopt);
      ::unsetenv(v);
    }
  }
  void TearDown() override {
    for (const auto& [name, value] : saved_)
      if (value) ::setenv(name, value->c_str(), 1);
  }

 private:
  std::vector<std::pair<const char*, std::optional<std::string>>> saved_;
};

TEST_F(ConfigTest, DefaultsWithoutVariables) {
  const Config c = Config::from_env();
  const Config d;
  EXPECT_EQ(c.pool_size, d.pool_size);
  EXPECT_EQ(c.policy, d.policy);
  EXPECT_EQ(c.sync_mode, d.sync_mode);
  EXPECT_EQ(c.encoding_lock, d.encoding_lock);
  EXPECT_EQ(c.cpu_exec_threads, d.cpu_exec_threads);
  EXPECT_EQ(c.allocator_caching, d.allocator_caching);
  EXPECT_EQ(c.cuda_completion_sleep, d.cuda_completion_sleep);
  EXPECT_EQ(d.cuda_completion_sleep.count(), 0) << "completion threads spin by default";
  EXPECT_EQ(c.cuda_wait_spin, d.cuda_wait_spin);
  EXPECT_EQ(d.cuda_wait_spin.count(), 100);
  EXPECT_EQ(c.cuda_gather_blocks, d.cuda_gather_blocks);
  EXPECT_EQ(d.cuda_gather_blocks, 32);
  EXPECT_EQ(c.cuda_tune_gemm, d.cuda_tune_gemm);
}

TEST_F(ConfigTest, ReadsEveryVariable) {
  ScopedEnv a("FLOTILLA_POOL_SIZE", "8");
  ScopedEnv b("FLOTILLA_POLICY", "exclusive");
  ScopedEnv c("FLOTILLA_SYNC_MODE", "commit-and-wait");
  ScopedEnv d("FLOTILLA_ENCODING_LOCK", "on");
  ScopedEnv e("FLOTILLA_CPU_THREADS", "3");
  ScopedEnv f("FLOTILLA_ALLOCATOR_CACHING", "off");
  ScopedEnv g("FLOTILLA_CUDA_COMPLETION_SLEEP_US", "20");
  ScopedEnv h("FLOTILLA_CUDA_WAIT_SPIN_US", "7");
  ScopedEnv i("FLOTILLA_CUDA_GATHER_BLOCKS", "8");
  ScopedEnv j("FLOTILLA_CUDA_TUNE_GEMM", Config{}.cuda_tune_gemm ? "off" : "on");
  const Config cfg = Config::from_env();
  EXPECT_EQ(cfg.pool_size, 8);
  EXPECT_EQ(cfg.policy, StreamPolicy::kExclusive);
  EXPECT_EQ(cfg.sync_mode, SyncMode::kCommitAndWait);
  EXPECT_EQ(cfg.encoding_lock, EncodingLockMode::kOn);
  EXPECT_EQ(cfg.cpu_exec_threads, 3);
  EXPECT_FALSE(cfg.allocator_caching);
  EXPECT_EQ(cfg.cuda_completion_sleep, std::chrono::microseconds(20));
  EXPECT_EQ(cfg.cuda_wait_spin, std::chrono::microseconds(7));
  EXPECT_EQ(cfg.cuda_gather_blocks, 8);
  EXPECT_NE(cfg.cuda_tune_gemm, Config{}.cuda_tune_gemm);
}

// Each bad value throws InvalidArgument whose message names the variable and
// the bad text. Would catch: a parse error that does not say which variable.
struct BadValue {
  const char* var;
  const char* value;
};
class ConfigBadValueTest : public ConfigTest, public ::testing::WithParamInterface<BadValue> {};

TEST_P(ConfigBadValueTest, ThrowsInvalidArgumentNamingTheVariable) {
  const BadValue& p = GetParam();
  ScopedEnv env(p.var, p.value);
  try {
    (void)Config::from_env();
    FAIL() << p.var << "='" << p.value << "' was accepted";
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("[Config", 0), 0u) << msg;
    EXPECT_NE(msg.find(p.var), std::string::npos)
        << "the message does not name " << p.var << ": " << msg;
    EXPECT_NE(msg.find(p.value), std::string::npos) << msg;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Values, ConfigBadValueTest,
    ::testing::Values(BadValue{"FLOTILLA_POOL_SIZE", "abc"}, BadValue{"FLOTILLA_POOL_SIZE", "1"},
                      BadValue{"FLOTILLA_POOL_SIZE", "65"}, BadValue{"FLOTILLA_POOL_SIZE", "8x"},
                      BadValue{"FLOTILLA_POLICY", "fifo"}, BadValue{"FLOTILLA_SYNC_MODE", "always"},
                      BadValue{"FLOTILLA_ENCODING_LOCK", "maybe"},
                      BadValue{"FLOTILLA_CPU_THREADS", "-1"},
                      BadValue{"FLOTILLA_CPU_THREADS", "many"},
                      BadValue{"FLOTILLA_ALLOCATOR_CACHING", "yes please"},
                      BadValue{"FLOTILLA_CUDA_COMPLETION_SLEEP_US", "1001"},
                      BadValue{"FLOTILLA_CUDA_COMPLETION_SLEEP_US", "-5"},
                      BadValue{"FLOTILLA_CUDA_WAIT_SPIN_US", "10001"},
                      BadValue{"FLOTILLA_CUDA_TUNE_GEMM", "fast"}),
    [](const ::testing::TestParamInfo<BadValue>& info) {
      std::string name = std::string(info.param.var + 9) + "_" + std::to_string(info.index);
      return name;
    });

TEST(ConfigParse, NamesRoundTrip) {
  for (auto p : {StreamPolicy::kRoundRobin, StreamPolicy::kExclusive})
    EXPECT_EQ(parse_stream_policy(to_string(p)), p);
  for (auto m : {SyncMode::kNone, SyncMode::kCommit, SyncMode::kCommitAndWait, SyncMode::kAdaptive})
    EXPECT_EQ(parse_sync_mode(to_string(m)), m);
  for (auto m : {EncodingLockMode::kAuto, EncodingLockMode::kOn, EncodingLockMode::kOff})
    EXPECT_EQ(parse_encoding_lock_mode(to_string(m)), m);
  for (auto w : {WhenFull::kWait, WhenFull::kShare}) EXPECT_EQ(parse_when_full(to_string(w)), w);
  EXPECT_THROW(parse_when_full("block"), InvalidArgument);
}

TEST(ConfigValidate, RejectsOutOfRangeFields) {
  auto bad = [](auto mutate) {
    Config c;
    mutate(c);
    EXPECT_THROW(c.validate(), InvalidArgument);
  };
  bad([](Config& c) { c.pool_size = 1; });
  bad([](Config& c) { c.adaptive_commit_kernels = 0; });
  bad([](Config& c) { c.cpu_exec_threads = -2; });
  bad([](Config& c) { c.exclusive_wait = std::chrono::milliseconds(-1); });
  bad([](Config& c) { c.event_pool_size = -1; });
  bad([](Config& c) { c.cuda_completion_sleep = std::chrono::microseconds(1001); });
  bad([](Config& c) { c.cuda_wait_spin = std::chrono::microseconds(-1); });
  bad([](Config& c) { c.cuda_completion_sleep = std::chrono::microseconds(-1); });
  bad([](Config& c) { c.cuda_gather_blocks = 0; });
  bad([](Config& c) { c.cuda_gather_blocks = 1025; });
  EXPECT_NO_THROW(Config{}.validate());
}

}  // namespace
}  // namespace flotilla::test
