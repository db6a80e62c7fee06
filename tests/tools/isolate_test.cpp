// run_in_child, the fork-and-watchdog helper behind `flotilla run` and
// `flotilla stress`: the child's output and exit code come back whole, and a
// death by signal, an escaped exception or a hang is seen as such, with the
// words the commands report.
#include "isolate.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

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

}  // namespace
}  // namespace flotilla::cli
