// flotilla bench: sweeps client threads x batch sizes x architectures with
// the run workload (workload.h), each point in its own child process, and
// writes bench.json, bench.dat, bench.gp and bench.png (gnuplot) to --out,
// and a table on stdout. Exits 1 if any point saw a crash, a violation, an
// error or a wrong result.
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <thread>

#include "commands.h"
#include "flotilla/common/error.h"
#include "workload.h"

extern char** environ;

namespace flotilla::cli {

namespace {

struct BenchOptions {
  WorkloadOptions base;
  std::vector<int> threads{1, 2, 4, 8, 16, 32};
  std::vector<int> batches{1, 8, 64};
  std::vector<std::string> archs{"legacy", "pool"};
  double seconds_per_point = 1.0;
  std::string out = "bench-out";
  bool plot = true;
  // --batching: a `batching` series (batch-1 requests through a BatchQueue)
  // over the same threads, beside pool batch 1 (batching off). The
  // BatchQueue's options (base.batching: --window, --callbacks, ...) apply
  // to that series only; the other points run without them.
  bool batching = false;
};

// How a point's series is named in the table and the plot: its arch, and
// whether its outputs went to completion callbacks (--callbacks) and its
// inputs were borrowed (--borrow-inputs) or read in place by the device
// (--pinned-inputs).
std::string series_label(const WorkloadOptions& o) {
  std::string label = arch_label(o);
  if (o.batching.enabled && o.batching.callbacks) label += "+callbacks";
  if (o.batching.enabled && o.batching.pinned)
    label += "+pinned";
  else if (o.batching.enabled && o.batching.borrow)
    label += "+borrowed";
  return label;
}

std::string utc_now() {
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown cpu";
}

std::string host_name() {
  char buf[256] = {};
  gethostname(buf, sizeof buf - 1);
  return buf;
}

void print_header() {
  std::printf("%-18s %6s %7s %12s %12s %10s %10s %10s %6s %5s %5s %7s\n", "arch", "batch",
              "threads", "requests/s", "samples/s", "p50_us", "p90_us", "p99_us", "wrong", "viol",
              "crash", "streams");
}

void print_row(const WorkloadResult& r) {
  std::printf("%-18s %6d %7d %12.1f %12.1f %10.1f %10.1f %10.1f %6llu %5llu %5llu %7d\n",
              series_label(r.options).c_str(), r.options.batch, r.options.threads, r.requests_per_s,
              r.samples_per_s, r.p50_us, r.p90_us, r.p99_us,
              static_cast<unsigned long long>(r.wrong_results),
              static_cast<unsigned long long>(r.violations + r.errors),
              static_cast<unsigned long long>(r.crashes), r.streams_used);
}

// bench.dat: one gnuplot data block per (series, batch), in sweep order.
// bench.gp: throughput and p99 latency against threads, one line per series.
void write_plot_files(const std::filesystem::path& dir, const std::vector<WorkloadResult>& points,
                      const std::string& title) {
  std::map<std::pair<std::string, int>, std::vector<const WorkloadResult*>> series;
  std::vector<std::pair<std::string, int>> order;
  for (const auto& p : points) {
    const std::pair<std::string, int> key{series_label(p.options), p.options.batch};
    if (!series.count(key)) order.push_back(key);
    series[key].push_back(&p);
  }
  {
    std::ofstream dat(dir / "bench.dat");
    FL_CHECK_ARG(dat, "[bench] cannot write ", (dir / "bench.dat").string());
    for (const auto& key : order) {
      dat << "# arch=" << key.first << " batch=" << key.second
          << "\n# threads samples_per_s requests_per_s p50_us p99_us\n";
      for (const auto* p : series[key])
        dat << p->options.threads << " " << p->samples_per_s << " " << p->requests_per_s << " "
            << p->p50_us << " " << p->p99_us << "\n";
      dat << "\n\n";
    }
  }
  const std::string abs = std::filesystem::absolute(dir).string();
  std::ofstream gp(dir / "bench.gp");
  FL_CHECK_ARG(gp, "[bench] cannot write ", (dir / "bench.gp").string());
  gp << "# Written by flotilla bench; re-run with: gnuplot " << abs << "/bench.gp\n"
     << "set terminal pngcairo noenhanced size 1500,620 font 'sans,10'\n"
     << "set output '" << abs << "/bench.png'\n"
     << "data = '" << abs << "/bench.dat'\n"
     << "set multiplot layout 1,2 title \"" << title << "\"\n"
     << "set logscale x 2\nset logscale y\nset grid\nset xlabel 'client threads'\n"
     << "set format y '%g'\nset key outside right top vertical\n"
     << "set title 'throughput'\nset ylabel 'samples/s'\n";
  auto plot = [&](const char* column) {
    gp << "plot ";
    const char* colors[] = {"#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"};
    std::map<int, int> color_of_batch;
    for (size_t i = 0; i < order.size(); ++i) {
      const auto& [arch, batch] = order[i];
      if (!color_of_batch.count(batch)) {
        const int next = static_cast<int>(color_of_batch.size());
        color_of_batch[batch] = next;
      }
      gp << (i ? ", \\\n     " : "") << "data index " << i << " using 1:" << column
         << " with linespoints lw 2 pt 7 dt " << (arch == "legacy" ? 2 : 1) << " lc rgb '"
         << (arch.rfind("batching", 0) == 0 ? "#000000" : colors[color_of_batch[batch] % 6])
         << "' title '" << arch << ", batch " << batch << "'";
    }
    gp << "\n";
  };
  plot("2");
  gp << "set title 'p99 latency'\nset ylabel 'p99 latency (ms)'\n";
  plot("($5/1000.0)");
  gp << "unset multiplot\n";
}

// Runs gnuplot on bench.gp; false (with a warning) if it is missing or fails.
bool run_gnuplot(const std::filesystem::path& dir) {
  const std::string script = (dir / "bench.gp").string();
  char* argv[] = {const_cast<char*>("gnuplot"), const_cast<char*>(script.c_str()), nullptr};
  pid_t pid;
  if (posix_spawnp(&pid, "gnuplot", nullptr, nullptr, argv, environ) != 0) {
    std::fprintf(stderr, "bench: gnuplot not found; the plot script is %s\n", script.c_str());
    return false;
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "bench: gnuplot failed on %s\n", script.c_str());
    return false;
  }
  return true;
}

void run_bench(const BenchOptions& b) {
  FL_CHECK_ARG(b.seconds_per_point > 0, "[bench] --seconds-per-point must be positive");
  FL_CHECK_ARG(!b.threads.empty() && !b.batches.empty() && !b.archs.empty(),
               "[bench] --threads-list, --batches and --archs must not be empty");
  const WorkloadOptions::Batching no_batching;
  const WorkloadOptions::Batching& queue_opts = b.base.batching;
  FL_CHECK_ARG(
      b.batching || (!queue_opts.callbacks && queue_opts.refill == 0 &&
                     queue_opts.submit_group == no_batching.submit_group &&
                     queue_opts.window == no_batching.window &&
                     queue_opts.device_share == no_batching.device_share && !queue_opts.borrow &&
                     !queue_opts.pinned && queue_opts.read_in_place_max_bytes == -1),
      "[bench] --callbacks, --refill, --submit-group, --window, --device-share, "
      "--borrow-inputs, "
      "--pinned-inputs and --read-in-place-max-bytes set up the batching series; add "
      "--batching, or drop them");
  std::vector<Arch> archs;
  for (const auto& a : b.archs) archs.push_back(parse_arch(a));
  WorkloadOptions base = b.base;
  base.requests = 0;
  base.seconds = b.seconds_per_point;
  base.progress = false;
  // The legacy and pool points run without the BatchQueue's options (a
  // client per stream has no window and no callbacks).
  WorkloadOptions unbatched = base;
  unbatched.batching = no_batching;
  // Check every point's options before the first runs.
  for (int t : b.threads)
    for (int batch : b.batches) {
      WorkloadOptions o = unbatched;
      o.threads = t;
      o.batch = batch;
      o.validate();
    }
  auto batching_point = [&](int t) {
    WorkloadOptions o = base;
    o.threads = t;
    o.batch = 1;
    o.batching.enabled = true;
    return o;
  };
  if (b.batching)
    for (int t : b.threads) batching_point(t).validate();
  const nn::MlpWeights weights = load_weights(base);  // a bad file ends here, naming it
  const std::filesystem::path dir(b.out);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  FL_CHECK_ARG(!ec, "[bench] cannot create --out directory '", b.out, "': ", ec.message());

  const size_t total =
      archs.size() * b.batches.size() * b.threads.size() + (b.batching ? b.threads.size() : 0);
  std::vector<WorkloadResult> points;
  size_t done = 0;
  for (Arch arch : archs)
    for (int batch : b.batches)
      for (int t : b.threads) {
        WorkloadOptions o = unbatched;
        o.arch = arch;
        o.batch = batch;
        o.threads = t;
        std::fprintf(stderr, "bench: point %zu/%zu: arch %s, batch %d, %d threads\n", ++done, total,
                     to_string(arch), batch, t);
        points.push_back(run_workload_as_configured(weights, o));
      }
  if (b.batching)
    for (int t : b.threads) {
      std::fprintf(stderr, "bench: point %zu/%zu: %s, batch 1, %d threads\n", ++done, total,
                   series_label(batching_point(t)).c_str(), t);
      points.push_back(run_workload_as_configured(weights, batching_point(t)));
    }

  const WorkloadResult& first = points.front();
  std::ostringstream title;
  title << "flotilla bench: " << first.model_shape << " " << to_string(base.dtype) << " on "
        << (first.device_name.empty() ? base.backend : first.device_name) << ", "
        << b.seconds_per_point << " s per point, " << utc_now();
  nlohmann::json j = {{"tool", "flotilla bench"},
                      {"date", utc_now()},
                      {"host", host_name()},
                      {"cpu", cpu_model()},
                      {"cpus", std::thread::hardware_concurrency()},
                      {"backend", base.backend},
                      {"device", first.device_name},
                      {"model", base.model_name()},
                      {"model_shape", first.model_shape},
                      {"dtype", to_string(base.dtype)},
                      {"seconds_per_point", b.seconds_per_point},
                      {"warmup_seconds", base.warmup_seconds},
                      {"threads", b.threads},
                      {"batches", b.batches},
                      {"archs", b.archs},
                      {"batching", b.batching},
                      // the batching series' outputs went to completion callbacks
                      {"callbacks", b.batching && base.batching.callbacks},
                      // and the queue read their inputs in place (--borrow-inputs)
                      {"borrow_inputs", b.batching && base.batching.borrow},
                      // or the device read them in place (--pinned-inputs)
                      {"pinned_inputs", b.batching && base.batching.pinned},
                      {"points", nlohmann::json::array()}};
  bool failed = false;
  for (const auto& p : points) {
    j["points"].push_back(p.to_json());
    failed = failed || p.failed();
  }
  {
    std::ofstream out(dir / "bench.json");
    FL_CHECK_ARG(out, "[bench] cannot write ", (dir / "bench.json").string());
    out << j.dump(2) << "\n";
  }
  write_plot_files(dir, points, title.str());
  const bool plotted = b.plot && run_gnuplot(dir);

  std::printf("%s\n", title.str().c_str());
  print_header();
  for (const auto& p : points) print_row(p);
  std::printf("wrote %s/bench.json%s\n", b.out.c_str(),
              plotted ? (", " + b.out + "/bench.png").c_str() : "");
  if (failed) {
    std::printf("FAILED: some points saw crashes, violations, errors or wrong results\n");
    throw CLI::RuntimeError(1);
  }
}

// Re-renders bench.png from an earlier run's bench.json, without running
// anything: for results taken on a machine without gnuplot (the GPU machine).
void replot(const std::string& out) {
  const std::filesystem::path dir(out);
  std::ifstream in(dir / "bench.json");
  FL_CHECK_ARG(in, "[bench --replot] cannot read ", (dir / "bench.json").string(),
               "; pass the --out directory of an earlier flotilla bench");
  nlohmann::json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    throw InvalidArgument(detail::str_cat("[bench --replot] ", (dir / "bench.json").string(),
                                          " is not valid JSON: ", e.what()));
  }
  std::vector<WorkloadResult> points;
  std::ostringstream title;
  try {
    for (const auto& p : j.at("points")) {
      WorkloadOptions o;
      const std::string arch = p.at("arch");
      o.batching.enabled = arch == "batching";
      o.batching.callbacks = o.batching.enabled && p.value("callbacks", false);
      o.batching.borrow = o.batching.enabled && p.value("borrow_inputs", false);
      o.batching.pinned = o.batching.enabled && p.value("pinned_inputs", false);
      o.arch = o.batching.enabled ? Arch::kPool : parse_arch(arch);
      o.batch = p.at("batch");
      o.threads = p.at("threads");
      points.push_back(WorkloadResult::from_json(p, o));
    }
    title << "flotilla bench: " << j.at("model_shape").get<std::string>() << " "
          << j.at("dtype").get<std::string>() << " on " << j.at("device").get<std::string>() << ", "
          << j.at("seconds_per_point").get<double>() << " s per point, "
          << j.at("date").get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    throw InvalidArgument(detail::str_cat("[bench --replot] ", (dir / "bench.json").string(),
                                          " is not a flotilla bench result: ", e.what()));
  }
  FL_CHECK_ARG(!points.empty(), "[bench --replot] ", (dir / "bench.json").string(),
               " has no points");
  write_plot_files(dir, points, title.str());
  FL_CHECK_STATE(run_gnuplot(dir),
                 "[bench --replot] gnuplot is missing or failed; install "
                 "gnuplot-nox (Debian) and run again");
  std::printf("%s\n", title.str().c_str());
  print_header();
  for (const auto& p : points) print_row(p);
  std::printf("wrote %s/bench.png\n", out.c_str());
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "bench", "Sweep threads x batch sizes for legacy and pool; JSON, a PNG plot and a table");
  auto b = std::make_shared<BenchOptions>();
  auto strings = std::make_shared<ModelOptionStrings>();
  add_model_options(*cmd, b->base, *strings);
  auto* threads_opt = cmd->add_option("--threads-list", b->threads, "client thread counts")
                          ->delimiter(',')
                          ->capture_default_str();
  cmd->add_option("--batches", b->batches, "batch sizes")->delimiter(',')->capture_default_str();
  cmd->add_option("--archs", b->archs, "architectures: legacy, pool")
      ->delimiter(',')
      ->capture_default_str();
  cmd->add_option("--seconds-per-point", b->seconds_per_point, "seconds each point runs")
      ->capture_default_str();
  cmd->add_option("--warmup-seconds", b->base.warmup_seconds,
                  "each point's clients run this long before its clock starts (checked, not "
                  "timed), as flotilla run's")
      ->capture_default_str();
  cmd->add_option("--out", b->out, "directory for bench.json, bench.png, bench.dat, bench.gp")
      ->capture_default_str();
  cmd->add_flag(
      "--no-plot", [b](int64_t) { b->plot = false; }, "do not run gnuplot");
  cmd->add_flag("--batching", b->batching,
                "add a batching series: batch-1 requests through a BatchQueue (threads "
                "1..64 unless --threads-list); the batching options below (--callbacks, "
                "--window, ...) apply to that series only");
  add_batching_options(*cmd, b->base.batching);
  auto replot_dir = std::make_shared<std::string>();
  cmd->add_option("--replot", *replot_dir,
                  "only re-render DIR/bench.png from DIR/bench.json of an earlier run (for "
                  "results from a machine without gnuplot)");
  cmd->callback([b, strings, threads_opt, replot_dir] {
    if (!replot_dir->empty()) {
      replot(*replot_dir);
      return;
    }
    strings->apply(b->base);
    if (b->batching && threads_opt->count() == 0) b->threads = {1, 2, 4, 8, 16, 32, 64};
    run_bench(*b);
  });
}

}  // namespace flotilla::cli
