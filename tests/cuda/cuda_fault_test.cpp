// A kernel fault makes the device sticky-failed (Note [Sticky errors] in
// src/backend/cuda/cuda_check.h). A fault kills the CUDA context for the
// whole process, so the scenario runs in a fresh child process
// (cuda_fault_child.cpp, started with posix_spawn: a fork() of this process,
// which has initialised CUDA, could not use CUDA at all). This test checks
// that the child reports success, exits by itself and does not hang.
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>

#include "cuda/cuda_test_util.h"

extern char** environ;

namespace flotilla::test {
namespace {

struct ChildOutput {
  bool timed_out = false;
  int status = 0;
  std::string out;
};

ChildOutput run_child(const char* path, std::chrono::seconds limit) {
  int fds[2];
  EXPECT_EQ(pipe(fds), 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDERR_FILENO);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  char* argv[] = {const_cast<char*>(path), nullptr};
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, path, &actions, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  ChildOutput r;
  if (rc != 0) {
    close(fds[0]);
    r.out = "posix_spawn failed: " + std::string(strerror(rc));
    r.status = -1;
    return r;
  }
  const auto deadline = std::chrono::steady_clock::now() + limit;
  char buf[4096];
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      r.timed_out = true;
      kill(pid, SIGKILL);
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    const int n = poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
    if (n <= 0) continue;
    const ssize_t got = read(fds[0], buf, sizeof buf);
    if (got <= 0) break;
    r.out.append(buf, static_cast<size_t>(got));
  }
  close(fds[0]);
  waitpid(pid, &r.status, 0);
  return r;
}

TEST(CudaFault, AKernelFaultLosesTheDeviceOnceAndNothingHangs) {
  FL_SKIP_WITHOUT_GPU();
  const auto r = run_child(FLOTILLA_CUDA_FAULT_CHILD, std::chrono::seconds(90));
  std::printf("---- child output ----\n%s---- end ----\n", r.out.c_str());
  ASSERT_FALSE(r.timed_out) << "the child hung";
  ASSERT_TRUE(WIFEXITED(r.status))
      << "the child died of signal " << (WIFSIGNALED(r.status) ? WTERMSIG(r.status) : -1)
      << " (SIGALRM=14 means it hung inside)";
  EXPECT_EQ(WEXITSTATUS(r.status), 0);
  EXPECT_NE(r.out.find("FAULT-OK"), std::string::npos);
}

}  // namespace
}  // namespace flotilla::test
