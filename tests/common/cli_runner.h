// Runs the built `flotilla` binary through the shell, for the CLI's
// end-to-end tests: its output and its exit code (128 + signal if a signal
// ended it).
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <string>

namespace flotilla::test {

struct CliResult {
  int exit_code = -1;  // -1: the shell could not be started
  std::string out;     // stdout, plus stderr if `redirect` merges it
};

// `binary` runs with `args`; `redirect` is shell text for stderr ("2>&1",
// "2>/dev/null").
inline CliResult run_cli_binary(const std::string& binary, const std::string& args,
                                const std::string& redirect) {
  const std::string cmd = "'" + binary + "' " + args + " " + redirect;
  CliResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

}  // namespace flotilla::test
