// run_in_child, the fork-and-watchdog helper behind `flotilla run` and
// `flotilla stress`: the child's output and exit code come back whole, and a
// death by signal, an escaped exception or a hang is seen as such, with the
// words the commands report.
#include "isolate.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>

namespace flotilla::cli {
namespace {

using namespace std::chrono_literals;

TEST(RunInChild, HandsBackTheOutputAndExitCode) {
  const ChildOutcome c = run_in_child("test", 5s, [] { return ChildReport{"a line\n", 3}; });
  EXPECT_FALSE(c.timed_out);
  EXPECT_FALSE(c.died());
  EXPECT_EQ(c.output, "a line\n");
  ASSERT_TRUE(WIFEXITED(c.wait_status));
  EXPECT_EQ(WEXITSTATUS(c.wait_status), 3);
  // What a caller reports when that output does not parse.
  EXPECT_EQ(c.crash_text("x", "x hung"), "x exited (status 3) without a result");
}

TEST(RunInChild, OutputLargerThanThePipeArrivesWhole) {
  std::string big(1 << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>('a' + i % 26);
  const ChildOutcome c = run_in_child("test", 5s, [&] { return ChildReport{big}; });
  EXPECT_FALSE(c.died());
  EXPECT_EQ(c.output.size(), big.size());
  EXPECT_TRUE(c.output == big);
}

TEST(RunInChild, CountsADeathBySignal) {
  const ChildOutcome c = run_in_child("test", 5s, []() -> ChildReport {
    raise(SIGTERM);  // no core file, unlike abort()
    return {"never sent"};
  });
  EXPECT_FALSE(c.timed_out);
  EXPECT_TRUE(c.died());
  EXPECT_EQ(c.output, "");
  EXPECT_EQ(c.crash_text("x", "x hung"),
            std::string("x crashed with signal ") + strsignal(SIGTERM));
}

TEST(RunInChild, AnEscapedExceptionEndsOnlyTheChild) {
  // Were it to unwind, the child would go on running this test as a second parent.
  const ChildOutcome c = run_in_child("test", 5s, []() -> ChildReport {
    throw std::runtime_error("escaped (this message is expected)");
  });
  EXPECT_TRUE(c.died());
  ASSERT_TRUE(WIFSIGNALED(c.wait_status));
  EXPECT_EQ(WTERMSIG(c.wait_status), SIGABRT);
}

TEST(RunInChild, WatchdogKillsAHungChild) {
  const ChildOutcome c = run_in_child("test", 300ms, []() -> ChildReport {
    for (;;) pause();
  });
  EXPECT_TRUE(c.timed_out);
  EXPECT_TRUE(c.died());
  ASSERT_TRUE(WIFSIGNALED(c.wait_status));
  EXPECT_EQ(WTERMSIG(c.wait_status), SIGKILL);
  EXPECT_EQ(c.crash_text("x", "x hung"), "x hung");
  EXPECT_GE(c.seconds, 0.29);  // it fires with under a millisecond left
  EXPECT_LT(c.seconds, 5.0);
}

// Where a parent's atexit handler writes, once the test has pointed it at a pipe.
int g_atexit_fd = -1;

void write_from_atexit() {
  if (g_atexit_fd >= 0) (void)!write(g_atexit_fd, "x", 1);
}

TEST(RunInChild, TheChildSkipsTheParentsAtexitHandlers) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  g_atexit_fd = fds[1];
  ASSERT_EQ(std::atexit(write_from_atexit), 0);
  const ChildOutcome c = run_in_child("test", 5s, [] { return ChildReport{"done"}; });
  g_atexit_fd = -1;
  close(fds[1]);
  char buf[8];
  EXPECT_EQ(read(fds[0], buf, sizeof buf), 0) << "the child ran the parent's atexit handler";
  close(fds[0]);
  EXPECT_EQ(c.output, "done");
}

// A process whose state letter in /proc is not Z (zombie) or X (dead): one
// that still runs. False once it is gone or only a zombie waiting for init.
bool still_running(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  const size_t close_paren = line.rfind(')');
  if (close_paren == std::string::npos || close_paren + 2 >= line.size()) return false;
  const char state = line[close_paren + 2];
  return state != 'Z' && state != 'X';
}

// The parent is killed while its child works: the child must not run on (a
// killed `flotilla run` would leave a child holding the GPU). Without
// PR_SET_PDEATHSIG the child here sleeps its 30 s and the test fails.
TEST(RunInChild, TheChildDiesWithItsParent) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t middle = fork();
  ASSERT_GE(middle, 0);
  if (middle == 0) {  // the parent to be killed: it runs a child that reports its pid
    close(fds[0]);
    (void)run_in_child("test", 60s, [&] {
      const pid_t me = getpid();
      (void)!write(fds[1], &me, sizeof me);
      close(fds[1]);
      std::this_thread::sleep_for(30s);
      return ChildReport{"slept", 0};
    });
    _exit(0);
  }
  close(fds[1]);
  pid_t child = 0;
  ASSERT_EQ(read(fds[0], &child, sizeof child), static_cast<ssize_t>(sizeof child));
  close(fds[0]);
  ASSERT_TRUE(still_running(child));
  ASSERT_EQ(kill(middle, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(middle, &status, 0), middle);
  const auto give_up = std::chrono::steady_clock::now() + 10s;
  while (still_running(child) && std::chrono::steady_clock::now() < give_up)
    std::this_thread::sleep_for(10ms);
  EXPECT_FALSE(still_running(child)) << "the child outlived its killed parent";
  if (still_running(child)) kill(child, SIGKILL);
}

}  // namespace
}  // namespace flotilla::cli
