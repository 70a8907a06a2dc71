// The tpfuse command-line tool. Exit codes: 0 success, 1 a run failed,
// 2 bad command-line flags.
#include <cstdio>
#include <exception>
#include <string>

#include "commands.h"
#include "tpfuse/version.h"

int main(int argc, char** argv) {
  CLI::App app{"tpfuse: fused matrix multiply + all-reduce for tensor-parallel layers on CPUs"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("tpfuse ") + tpfuse::version());
  tpfuse::cli::add_demo_command(app);
  tpfuse::cli::add_run_command(app);
  tpfuse::cli::add_plan_command(app);
  CLI::App& bench = *app.add_subcommand("bench", "Benchmarks")->require_subcommand(1);
  tpfuse::cli::add_bench_gemm_command(bench);
  tpfuse::cli::add_bench_fused_command(bench);
  tpfuse::cli::add_bench_allreduce_command(bench);
  tpfuse::cli::add_soak_command(app);
  tpfuse::cli::add_trace_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::RuntimeError& e) {
    std::fprintf(stderr, "tpfuse: %s\n", e.what());
    return e.get_exit_code();
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "tpfuse: %s\nRun with --help for usage.\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tpfuse: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
