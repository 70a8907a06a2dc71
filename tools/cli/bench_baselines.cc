#include "bench_baselines.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>

#include "tpfuse/core/error.h"

namespace tpfuse::cli {

namespace {

namespace fs = std::filesystem;

fs::path program_dir() {
  std::error_code error;
  const fs::path self = fs::read_symlink("/proc/self/exe", error);
  return error ? fs::current_path() : self.parent_path();
}

bool is_executable(const fs::path& path) { return access(path.c_str(), X_OK) == 0; }

// `name` next to this program (the build tree), or in the helper directory of
// an installed tree (TPFUSE_LIBEXEC_FROM_BIN: libexec/tpfuse, relative to bin).
std::string find_beside_program(const std::string& name) {
  const fs::path dir = program_dir();
  for (const fs::path& candidate : {dir / name, dir / TPFUSE_LIBEXEC_FROM_BIN / name}) {
    if (fs::exists(candidate)) return fs::weakly_canonical(candidate).string();
  }
  return "";
}

std::string shell_quote(const std::string& word) {
  std::string quoted = "'";
  for (char c : word) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

// Runs `argv` through the shell, stderr folded into stdout; lines that parse
// as JSON objects become records, and on failure the output's last lines are
// the reason.
ToolRun run_tool(const std::vector<std::string>& argv) {
  std::string command;
  for (const std::string& word : argv) command += shell_quote(word) + " ";
  command += "2>&1";
  std::fflush(stdout);
  FILE* pipe = popen(command.c_str(), "r");
  ToolRun run;
  if (pipe == nullptr) {
    run.failure = cat("cannot start ", argv.front());
    return run;
  }
  std::vector<std::string> other_lines;
  char buffer[4096];
  std::string line;
  while (std::fgets(buffer, sizeof(buffer), pipe) != nullptr) {
    line += buffer;
    if (line.back() != '\n') continue;
    line.pop_back();
    JsonRecord record = line.rfind('{', 0) == 0 ? JsonRecord::parse(line, nullptr, false) : JsonRecord();
    if (record.is_object()) {
      run.records.push_back(std::move(record));
    } else if (!line.empty()) {
      other_lines.push_back(line);
    }
    line.clear();
  }
  const int status = pclose(pipe);
  if (status != 0) {
    std::string tail;
    const std::size_t from = other_lines.size() > 3 ? other_lines.size() - 3 : 0;
    for (std::size_t i = from; i < other_lines.size(); ++i) tail += cat(" | ", other_lines[i]);
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    run.failure = cat(fs::path(argv.front()).filename().string(), " exited with status ", code, tail);
  }
  return run;
}

}  // namespace

std::string find_program(const std::string& name) {
  if (name.find('/') != std::string::npos) return is_executable(name) ? name : "";
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path != nullptr ? path : "");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    if (!dir.empty() && is_executable(fs::path(dir) / name)) return (fs::path(dir) / name).string();
  }
  return "";
}

void add_baseline_options(CLI::App& cmd, BaselineOptions& options) {
  cmd.add_flag("--no-mpi", options.no_mpi, "Skip the MPI baselines");
  cmd.add_flag("--no-gloo", options.no_gloo, "Skip the gloo baseline");
  cmd.add_option("--mpirun", options.mpirun, "mpirun to start the MPI baselines with")->capture_default_str();
  cmd.add_option("--mpi-bench", options.mpi_bench, "tpfuse_mpi_bench (default: beside this program, or its installed helpers)");
  cmd.add_option("--python", options.python, "A Python with torch, for the gloo baseline")->capture_default_str();
  cmd.add_option("--gloo-script", options.gloo_script, "gloo_allreduce.py (default: beside this program, or its installed helpers)");
  cmd.add_flag("--no-pin", options.no_pin, "Do not pin ranks to cores (tpfuse's and the baselines')");
}

BaselineTools find_baseline_tools(const BaselineOptions& options) {
  BaselineTools tools;
  tools.no_pin = options.no_pin;
  const std::string mpirun = find_program(options.mpirun);
  tools.mpi_bench = options.mpi_bench.empty() ? find_beside_program("tpfuse_mpi_bench") : options.mpi_bench;
  if (options.no_mpi) {
    tools.mpi_unavailable = "--no-mpi";
  } else if (mpirun.empty()) {
    tools.mpi_unavailable = cat(options.mpirun, " not found (apt-get install openmpi-bin)");
  } else if (tools.mpi_bench.empty() || !is_executable(tools.mpi_bench)) {
    tools.mpi_unavailable = "tpfuse_mpi_bench not built (needs MPI at configure time: apt-get install libopenmpi-dev)";
  }
  // The ranks pin themselves (rank % cores, as tpfuse's ranks do), so mpirun
  // must not bind: its core binding refuses more ranks than cores.
  tools.mpi_command = {mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np"};

  tools.python = options.python;
  tools.gloo_script = options.gloo_script.empty() ? find_beside_program("gloo_allreduce.py") : options.gloo_script;
  if (options.no_gloo) {
    tools.gloo_unavailable = "--no-gloo";
  } else if (!is_executable(tools.python)) {
    tools.gloo_unavailable = cat(tools.python, " not found (apt-get install python3-torch)");
  } else if (tools.gloo_script.empty() || !fs::exists(tools.gloo_script)) {
    tools.gloo_unavailable = "gloo_allreduce.py not found beside this program or its installed helpers (--gloo-script)";
  }
  return tools;
}

ToolRun run_mpi_bench(const BaselineTools& tools, int ranks, const std::vector<std::string>& args) {
  std::vector<std::string> argv = tools.mpi_command;
  argv.push_back(std::to_string(ranks));
  argv.push_back(tools.mpi_bench);
  argv.insert(argv.end(), args.begin(), args.end());
  if (tools.no_pin) argv.push_back("--no-pin");
  return run_tool(argv);
}

ToolRun run_gloo_bench(const BaselineTools& tools, int ranks, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {tools.python, tools.gloo_script, "--ranks", std::to_string(ranks)};
  argv.insert(argv.end(), args.begin(), args.end());
  if (tools.no_pin) argv.push_back("--no-pin");
  return run_tool(argv);
}

double record_number(const JsonRecord& record, const std::string& key) {
  const auto it = record.find(key);
  return it != record.end() && it->is_number() ? it->get<double>() : std::nan("");
}

std::string record_text(const JsonRecord& record, const std::string& key) {
  const auto it = record.find(key);
  return it != record.end() && it->is_string() ? it->get<std::string>() : "";
}

}  // namespace tpfuse::cli
