// Helpers shared by the runtime and backend tests.
//
// The runtime tests run against the backend named by the compile definition
// FLOTILLA_TEST_BACKEND ("cpu" by default; tests/runtime/CMakeLists.txt builds
// a "cuda" variant too). RuntimeTest skips every test, and says so, when the
// backend finds no device. Tests that depend on the CPU driver's behaviour
// (blocking completion handlers, raw host pointers in kernels, fork) say why
// they skip on other backends.
//
// Scale and seed: FLOTILLA_TEST_SCALE multiplies iteration counts (default 1,
// 0.25 in sanitizer builds, where everything runs 5-20x slower);
// FLOTILLA_TEST_SEED fixes the seed that randomised tests print.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <latch>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "flotilla/flotilla.h"

#ifndef FLOTILLA_TEST_BACKEND
#define FLOTILLA_TEST_BACKEND "cpu"
#endif

namespace flotilla::test {

inline constexpr std::string_view kBackend = FLOTILLA_TEST_BACKEND;
inline bool is_cpu() { return kBackend == "cpu"; }

// Iteration count `n` times FLOTILLA_TEST_SCALE, at least `min`.
int scaled(int n, int min = 1);
// The seed of the running test (FLOTILLA_TEST_SEED or random), printed once
// per call so a failure can be replayed.
uint64_t test_seed();

// A configuration for tests: enough CPU execution threads that a held queue
// (Hold below) never starves the rest, everything else at its default.
Config test_config();
std::shared_ptr<Device> make_device(const Config& config = test_config());

// Skips the test when kBackend finds no device (the cuda variant on a
// machine without a GPU).
class RuntimeTest : public ::testing::Test {
 protected:
  void SetUp() override;
};

// True if the device's driver has a kernel of that name.
bool has_kernel(Device& device, std::string_view name);

// A device buffer of floats, with a host-visible staging buffer to read it.
class FloatBuffer {
 public:
  FloatBuffer(Device& device, size_t count);
  // Synchronizes the device first, so no queued kernel (say, one a failed
  // assertion left behind) writes the memory after it is freed.
  ~FloatBuffer();
  FloatBuffer(const FloatBuffer&) = delete;
  FloatBuffer& operator=(const FloatBuffer&) = delete;
  float* ptr(size_t offset = 0) const;  // device address of element `offset`
  size_t count() const { return count_; }
  // Encodes a fill of [offset, offset + n) on `s` (n = 0: to the end).
  void fill(Stream s, float value, size_t offset = 0, size_t n = 0) const;
  // Copies to the host on `s`, synchronizes `s`, returns the values.
  std::vector<float> read(Stream s) const;

 private:
  Device& dev_;
  size_t count_;
  std::unique_ptr<backend::Buffer> device_;
  std::unique_ptr<backend::Buffer> host_;
};

// Holds a stream's queue until release() (or destruction): nothing committed
// to the stream after it runs before then. On the cpu backend a completion
// handler blocks an execution thread on a latch, which is exact. On other
// backends it is a 300 ms sleep kernel (best effort; needs sleep_us).
// Declare it after the device, so it is released before the device drains.
class Hold {
 public:
  explicit Hold(Stream s);
  ~Hold() { release(); }
  Hold(const Hold&) = delete;
  Hold& operator=(const Hold&) = delete;
  void release();

 private:
  std::shared_ptr<std::latch> gate_;
  std::atomic<bool> released_{false};  // relaxed is enough: release() is called by the owner
};

// Polls `pred` until it holds or `timeout` passes; returns pred().
bool eventually(const std::function<bool()>& pred,
                std::chrono::milliseconds timeout = std::chrono::seconds(10));

// Aborts the process with `what` if not destroyed within `limit`: turns a
// hang into a failure that names itself (a hung thread cannot be joined).
class Watchdog {
 public:
  Watchdog(std::chrono::milliseconds limit, std::string what);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  Mutex mu_;
  CondVar cv_;
  bool disarmed_ FL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// ---- Child processes ------------------------------------------------------

struct ChildResult {
  bool timed_out = false;  // killed after the timeout: a hang
  bool exited = false;
  int exit_code = -1;
  int signal = 0;
  std::string output;  // what the child wrote to its pipe
  std::string describe() const;
};

// Forks; the child runs body(fd) (fd: the write end of a pipe to the parent)
// and then _exit(0); an exception in the child is written to the pipe and
// exits 98. The parent reads the pipe to EOF and reaps the child, killing it
// after `timeout`.
ChildResult run_child(const std::function<void(int fd)>& body, std::chrono::milliseconds timeout);

// Writes all of `s` to `fd` (a pipe), retrying short writes.
void write_all(int fd, std::string_view s);

// Collects failures inside a child process, where gtest assertions cannot be
// used, and turns them into an exit code: 0 and "PASS" on stderr, or 1 and
// each failure on stderr.
class ChildChecks {
 public:
  void check(bool ok, const std::string& what, int line);
  int finish(const char* name);
  bool failed() const { return failed_; }

 private:
  bool failed_ = false;
};
#define CHILD_CHECK(checks, cond, ...)                                                      \
  (checks).check((cond), ::flotilla::detail::str_cat(#cond " " __VA_OPT__(, ) __VA_ARGS__), \
                 __LINE__)

// Runs `fn` (returning an exit code) in a fresh process: a gtest death test in
// "threadsafe" style re-executes this binary, so nothing this process has
// initialised (Device::get, a GPU context) is inherited. Passes iff the fresh
// process exits 0 after printing PASS.
#define FL_EXPECT_IN_FRESH_PROCESS(fn)                                \
  do {                                                                \
    GTEST_FLAG_SET(death_test_style, "threadsafe");                   \
    EXPECT_EXIT(_exit((fn)()), ::testing::ExitedWithCode(0), "PASS"); \
  } while (0)

// The id of a std::thread::id as the CPU driver prints it in messages.
std::string thread_id_text(std::thread::id id);

}  // namespace flotilla::test
