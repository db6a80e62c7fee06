// flotilla: run · stress · bench · info
#include <iostream>

#include "commands.h"
#include "flotilla/common/error.h"

int main(int argc, char** argv) {
  CLI::App app{"flotilla: many host threads sharing one GPU safely and fast"};
  app.require_subcommand(1);
  app.set_version_flag("--version", FLOTILLA_VERSION);
  flotilla::cli::add_info_command(app);
  flotilla::cli::add_stress_command(app);
  flotilla::cli::add_run_command(app);
  flotilla::cli::add_bench_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const flotilla::Error& e) {
    // One clear line naming what was wrong; the message says what to do.
    std::cerr << "flotilla: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "flotilla: error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
