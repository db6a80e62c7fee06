// The flotilla CLI's subcommands. Each lives in cmd_<name>.cpp and adds
// itself to the app; main.cpp calls every add_*_command.
#pragma once

#include <CLI/CLI.hpp>

namespace flotilla::cli {

void add_info_command(CLI::App& app);
void add_stress_command(CLI::App& app);
void add_run_command(CLI::App& app);
void add_bench_command(CLI::App& app);

}  // namespace flotilla::cli
