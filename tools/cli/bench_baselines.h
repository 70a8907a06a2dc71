// The benchmarks' outside baselines, run as separate programs: MPI_Allreduce
// and the oneDNN + MPI peer (tpfuse_mpi_bench under mpirun) and
// torch.distributed's gloo all_reduce (tools/bench/gloo_allreduce.py under
// Debian's python3, which has torch). Each prints one flat JSON object per
// line; a baseline whose tool is missing, or that fails, is skipped with the
// reason, and the benchmark goes on without it.
#pragma once

#include <CLI/CLI.hpp>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace tpfuse::cli {

struct BaselineOptions {
  std::string mpirun = "mpirun";      // a name looked up in PATH, or a path
  std::string mpi_bench;              // empty: tpfuse_mpi_bench next to this program
  std::string python = "/usr/bin/python3";
  std::string gloo_script;            // empty: gloo_allreduce.py next to this program
  bool no_mpi = false;
  bool no_gloo = false;
  bool no_pin = false;                // passed on, so the baselines pin as tpfuse does
};

// --no-mpi, --no-gloo, --mpirun, --mpi-bench, --python, --gloo-script, --no-pin.
void add_baseline_options(CLI::App& cmd, BaselineOptions& options);

// What was found; a non-empty *_unavailable says why that baseline is skipped.
struct BaselineTools {
  std::vector<std::string> mpi_command;  // mpirun and its flags, up to "-np"
  std::string mpi_bench;
  std::string python;
  std::string gloo_script;
  std::string mpi_unavailable;
  std::string gloo_unavailable;
  bool no_pin = false;
};

BaselineTools find_baseline_tools(const BaselineOptions& options);

// One output line that parsed as a JSON object.
using JsonRecord = nlohmann::json;

struct ToolRun {
  std::vector<JsonRecord> records;
  std::string failure;  // empty when the tool ran and exited 0
};

// `ranks` processes of tpfuse_mpi_bench with `args`.
ToolRun run_mpi_bench(const BaselineTools& tools, int ranks, const std::vector<std::string>& args);
// The gloo script with `--ranks ranks` and `args`.
ToolRun run_gloo_bench(const BaselineTools& tools, int ranks, const std::vector<std::string>& args);

// `name` itself when it holds a '/', else its first executable match in
// PATH; empty when there is none.
std::string find_program(const std::string& name);

// The number under `key`, NaN when absent or not a number.
double record_number(const JsonRecord& record, const std::string& key);
std::string record_text(const JsonRecord& record, const std::string& key);

}  // namespace tpfuse::cli
