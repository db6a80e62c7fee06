#include "isolate.h"

#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>

#include "flotilla/common/error.h"

namespace flotilla::cli {

using Clock = std::chrono::steady_clock;

namespace {

void write_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t w = write(fd, s.data() + off, s.size() - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    off += static_cast<size_t>(w);
  }
}

// noexcept: an exception thrown in the child ends it here (std::terminate)
// instead of unwinding into the parent's code, which the child shares.
ChildReport run_work(const std::function<ChildReport()>& work) noexcept { return work(); }

[[noreturn]] void child_main(int write_fd, const std::function<ChildReport()>& work) {
  const ChildReport report = run_work(work);
  write_all(write_fd, report.output);
  close(write_fd);
  // _exit: skip the parent's atexit handlers and static destructors; the
  // child's devices were shut down by their owners inside `work`.
  _exit(report.exit_code);
}

// Reads `fd` until EOF or the deadline; false if the deadline came first.
bool read_until(int fd, Clock::time_point t0, std::chrono::duration<double> timeout,
                std::string& out) {
  // A double deadline: any timeout the user gives, with no overflow.
  const auto deadline = t0 + timeout;
  char buf[4096];
  for (;;) {
    const double left_ms =
        std::chrono::duration<double, std::milli>(deadline - Clock::now()).count();
    if (!(left_ms >= 1)) return false;  // under a millisecond left (or NaN): time is up
    pollfd p{fd, POLLIN, 0};
    const int rc = poll(&p, 1, static_cast<int>(std::min(left_ms, 1000.0)));
    if (rc <= 0) continue;  // timeout or EINTR: check the deadline again
    const ssize_t got = read(fd, buf, sizeof buf);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return true;
    out.append(buf, static_cast<size_t>(got));
  }
}

}  // namespace

bool ChildOutcome::died() const { return timed_out || WIFSIGNALED(wait_status); }

std::string ChildOutcome::crash_text(std::string_view subject, std::string_view hung) const {
  if (timed_out) return std::string(hung);
  if (WIFSIGNALED(wait_status))
    return detail::str_cat(subject, " crashed with signal ", strsignal(WTERMSIG(wait_status)));
  return detail::str_cat(subject, " exited (status ", WEXITSTATUS(wait_status),
                         ") without a result");
}

ChildOutcome run_in_child(std::string_view who, std::chrono::duration<double> timeout,
                          const std::function<ChildReport()>& work) {
  int fds[2];
  FL_CHECK_STATE(pipe(fds) == 0, "[", who, "] pipe() failed: ", std::strerror(errno));
  // Whatever the parent has buffered would otherwise be written by the child
  // too, if the child flushed it.
  std::cout.flush();
  std::fflush(nullptr);
  const auto t0 = Clock::now();
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    const int err = errno;
    close(fds[0]);
    close(fds[1]);
    throw InvalidState(detail::str_cat("[", who, "] fork() failed: ", std::strerror(err)));
  }
  if (pid == 0) {
    close(fds[0]);
    // Dies with the parent: a parent killed (a CI job's timeout, a user's
    // kill -9) leaves no child running on, holding the GPU. The check after
    // it covers a parent that died before the prctl.
    (void)prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    child_main(fds[1], work);
  }
  close(fds[1]);
  ChildOutcome c;
  c.timed_out = !read_until(fds[0], t0, timeout, c.output);
  close(fds[0]);
  if (c.timed_out) kill(pid, SIGKILL);
  while (waitpid(pid, &c.wait_status, 0) < 0 && errno == EINTR) {
  }
  c.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return c;
}

}  // namespace flotilla::cli
