#include "runtime/runtime_test_util.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <random>
#include <sstream>
#include <thread>

namespace flotilla::test {

namespace {
double scale_factor() {
  if (const char* s = std::getenv("FLOTILLA_TEST_SCALE")) return std::max(0.01, std::atof(s));
#ifdef FLOTILLA_TEST_SANITIZED
  return 0.25;
#else
  return 1.0;
#endif
}
}  // namespace

int scaled(int n, int min) {
  static const double s = scale_factor();
  return std::max(min, static_cast<int>(n * s));
}

uint64_t test_seed() {
  uint64_t seed = 0;
  if (const char* s = std::getenv("FLOTILLA_TEST_SEED"))
    seed = std::strtoull(s, nullptr, 10);
  else
    seed = (uint64_t{std::random_device{}()} << 32) | std::random_device{}();
  std::cout << "[ seed     ] " << seed << " (replay with FLOTILLA_TEST_SEED=" << seed << ")\n";
  ::testing::Test::RecordProperty("seed", std::to_string(seed));
  return seed;
}

Config test_config() {
  Config c;
  c.cpu_exec_threads = 4;
  return c;
}

std::shared_ptr<Device> make_device(const Config& config) {
  return Device::create(kBackend, 0, config);
}

void RuntimeTest::SetUp() {
  if (Device::count(kBackend) == 0) GTEST_SKIP() << "no " << kBackend << " device on this machine";
}

bool has_kernel(Device& device, std::string_view name) {
  for (const auto& n : device.driver().pipeline_names())
    if (n == name) return true;
  return false;
}

// ---- FloatBuffer ------------------------------------------------------------

FloatBuffer::FloatBuffer(Device& device, size_t count)
    : dev_(device),
      count_(count),
      device_(device.driver().allocate(count * sizeof(float))),
      host_(device.driver().allocate_host(count * sizeof(float))) {}

FloatBuffer::~FloatBuffer() {
  try {
    if (!dev_.is_shut_down()) dev_.synchronize();
  } catch (...) {
    // A stream error the test did not collect, or a fork child: nothing to drain.
  }
}

float* FloatBuffer::ptr(size_t offset) const {
  return static_cast<float*>(device_->device_ptr()) + offset;
}

void FloatBuffer::fill(Stream s, float value, size_t offset, size_t n) const {
  if (n == 0) n = count_ - offset;
  s.dispatch("fill_f32", backend::KernelArgs().ptr(ptr(offset)).f64(value).size(n));
}

std::vector<float> FloatBuffer::read(Stream s) const {
  s.dispatch("copy_bytes", backend::KernelArgs()
                               .ptr(host_->device_ptr())
                               .ptr(device_->device_ptr())
                               .size(count_ * sizeof(float)));
  s.synchronize();
  const auto* h = static_cast<const float*>(host_->host_ptr());
  return std::vector<float>(h, h + count_);
}

// ---- Hold -------------------------------------------------------------------------

Hold::Hold(Stream s) : gate_(std::make_shared<std::latch>(1)) {
  if (is_cpu()) {
    // The handler owns the latch, so releasing after the Hold is gone is safe.
    s.add_callback([gate = gate_] { gate->wait(); });
  } else {
    s.dispatch("sleep_us", backend::KernelArgs().i64(300000));
    s.commit();
  }
}

void Hold::release() {
  if (!released_.exchange(true, std::memory_order_relaxed)) gate_->count_down();
}

bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return pred();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

Watchdog::Watchdog(std::chrono::milliseconds limit, std::string what) {
  thread_ = std::thread([this, limit, what = std::move(what)] {
    MutexLock lock(mu_);
    if (!cv_.wait_for(mu_, limit, [&]() FL_REQUIRES(mu_) { return disarmed_; })) {
      std::cerr << "WATCHDOG: " << what << " did not finish within " << limit.count()
                << " ms (a hang); aborting" << std::endl;
      std::abort();
    }
  });
}

Watchdog::~Watchdog() {
  {
    MutexLock lock(mu_);
    disarmed_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

// ---- Child processes ----------------------------------------------------------------

std::string ChildResult::describe() const {
  std::ostringstream out;
  if (timed_out)
    out << "child hung (killed after the timeout)";
  else if (exited)
    out << "child exited with code " << exit_code;
  else
    out << "child killed by signal " << signal;
  out << "; its output: [" << output << "]";
  return out.str();
}

void write_all(int fd, std::string_view s) {
  while (!s.empty()) {
    ssize_t n = ::write(fd, s.data(), s.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    s.remove_prefix(static_cast<size_t>(n));
  }
}

ChildResult run_child(const std::function<void(int fd)>& body, std::chrono::milliseconds timeout) {
  int fds[2];
  if (::pipe(fds) != 0) throw std::runtime_error("pipe() failed");
  std::fflush(nullptr);  // do not let the child flush the parent's buffers again
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork() failed");
  if (pid == 0) {
    ::close(fds[0]);
    try {
      body(fds[1]);
    } catch (const std::exception& e) {
      write_all(fds[1], std::string("\nchild threw: ") + e.what());
      _exit(98);
    } catch (...) {
      write_all(fds[1], "\nchild threw a non-std exception");
      _exit(98);
    }
    _exit(0);
  }
  ::close(fds[1]);
  ChildResult r;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto left_ms = [&] {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    return static_cast<int>(std::max<int64_t>(0, left.count()));
  };
  char buf[4096];
  for (;;) {
    pollfd p{fds[0], POLLIN, 0};
    int ready = ::poll(&p, 1, left_ms());
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) {
      r.timed_out = true;
      break;
    }
    ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // EOF: every writer (the child and its threads) is gone
    r.output.append(buf, static_cast<size_t>(n));
  }
  ::close(fds[0]);
  int status = 0;
  for (;;) {
    pid_t w = ::waitpid(pid, &status, WNOHANG);
    if (w == pid) break;
    if (w < 0 && errno != EINTR) return r;
    if (r.timed_out || left_ms() == 0) {
      r.timed_out = true;
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return r;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (WIFEXITED(status)) {
    r.exited = true;
    r.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    r.signal = WTERMSIG(status);
  }
  return r;
}

void ChildChecks::check(bool ok, const std::string& what, int line) {
  if (ok) return;
  failed_ = true;
  std::cerr << "FAIL (line " << line << "): " << what << std::endl;
}

int ChildChecks::finish(const char* name) {
  if (failed_) {
    std::cerr << name << ": FAILED" << std::endl;
    return 1;
  }
  std::cerr << name << ": PASS" << std::endl;
  return 0;
}

std::string thread_id_text(std::thread::id id) {
  std::ostringstream out;
  out << "thread " << id;
  return out.str();
}

}  // namespace flotilla::test
