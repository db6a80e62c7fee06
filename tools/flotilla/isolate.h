// Crash isolation for the CLI's commands that count a crash rather than die
// of it (`flotilla run`, `flotilla stress`): run a piece of work in a forked
// child under a watchdog and hand its serialized result back to the parent.
//
// The caller must not have touched a GPU driver before fork(): a CUDA context
// does not survive into a child, so each caller runs only device-free code
// in the parent and creates its device inside `work`.
//
// Thread safety: run_in_child forks the calling thread only, so call it
// while no other thread holds a lock that `work` needs (the CLI calls it from
// its one thread). It blocks until the child exits, or until the watchdog's
// timeout and then until the killed child is reaped.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <string_view>

namespace flotilla::cli {

// What `work` hands back inside the child: the bytes for the parent, and the
// child's exit code.
struct ChildReport {
  std::string output;
  int exit_code = 0;
};

// How the child ended, as the parent saw it. A plain value.
struct ChildOutcome {
  std::string output;      // all the child wrote before it exited or was killed
  bool timed_out = false;  // the watchdog killed it
  int wait_status = 0;     // waitpid's status
  double seconds = 0;      // from just before fork() until the child was reaped

  // The watchdog or a signal ended the child: its output is not a result.
  bool died() const;
  // Why the child gave no result, in the words of the command that ran it:
  // `hung` if the watchdog killed it, else "<subject> crashed with signal
  // <name>", else "<subject> exited (status N) without a result".
  std::string crash_text(std::string_view subject, std::string_view hung) const;
};

// Forks; the child runs `work`, writes its output to a pipe and leaves with
// _exit(exit_code), so none of the parent's atexit handlers or static
// destructors run there (`work` shuts down the devices it made). The child
// keeps the parent's stdout and stderr, flushed before the fork so that
// nothing buffered is written twice. An exception that escapes `work` aborts
// the child: it must not unwind into the parent's code. The parent reads the
// pipe until the child closes it or `timeout` has passed since the fork;
// then it kills a child that is still running (SIGKILL) and reaps it. The
// child also gets SIGKILL if the parent dies first (PR_SET_PDEATHSIG: the
// death of the thread that called run_in_child, which in the CLI is the
// process's one thread).
// Throws InvalidState starting "[<who>]" if pipe() or fork() fails.
ChildOutcome run_in_child(std::string_view who, std::chrono::duration<double> timeout,
                          const std::function<ChildReport()>& work);

}  // namespace flotilla::cli
