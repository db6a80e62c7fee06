// flotilla info: version, backends, devices, pool configuration.
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "flotilla/flotilla.h"

namespace flotilla::cli {

namespace {

void run(bool json) {
  const Config cfg = Config::from_env();
  nlohmann::json devices = nlohmann::json::array();
  for (const auto& b : Device::backends()) {
    const int n = Device::count(b);
    for (int i = 0; i < n; ++i) {
      const auto& info = Device::get(b, i).info();
      devices.push_back({{"backend", info.backend},
                         {"index", info.index},
                         {"name", info.name},
                         {"memory_bytes", info.memory_bytes},
                         {"compute_units", info.compute_units},
                         {"encoding_thread_safe", info.encoding_thread_safe}});
    }
  }
  nlohmann::json pool = {{"size", cfg.pool_size},
                         {"default_stream", 0},
                         {"pooled", cfg.pool_size - 1},
                         {"policy", to_string(cfg.policy)},
                         {"exclusive_when_full", to_string(cfg.exclusive_when_full)},
                         {"exclusive_wait_ms", cfg.exclusive_wait.count()},
                         {"sync_mode", to_string(cfg.sync_mode)},
                         {"adaptive_commit_kernels", cfg.adaptive_commit_kernels},
                         {"encoding_lock", to_string(cfg.encoding_lock)}};
  nlohmann::json j = {{"version", FLOTILLA_VERSION},
                      {"backends", Device::backends()},
                      {"devices", devices},
                      {"pool", pool}};
  if (json) {
    std::cout << j.dump() << std::endl;
    return;
  }
  std::cout << "flotilla " << FLOTILLA_VERSION << "\n"
            << "backends: ";
  for (const auto& b : Device::backends()) std::cout << b << " ";
  std::cout << "\ndevices:\n";
  for (const auto& d : devices)
    std::cout << "  " << d["backend"].get<std::string>() << ":" << d["index"] << "  "
              << d["name"].get<std::string>() << ", " << d["compute_units"] << " compute units, "
              << d["memory_bytes"].get<size_t>() / (1024 * 1024) << " MiB"
              << (d["encoding_thread_safe"].get<bool>() ? "" : ", encoding not thread-safe")
              << "\n";
  std::cout << "pool: " << cfg.pool_size << " streams (0 default, 1.." << cfg.pool_size - 1
            << " pooled), policy " << to_string(cfg.policy) << ", sync mode "
            << to_string(cfg.sync_mode) << ", encoding lock " << to_string(cfg.encoding_lock)
            << "\n";
}

}  // namespace

void add_info_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("info", "Version, backends, devices and pool configuration");
  auto json = std::make_shared<bool>(false);
  cmd->add_flag("--json", *json, "print one JSON object");
  cmd->callback([json] { run(*json); });
}

}  // namespace flotilla::cli
