// The tpfuse command-line tool's subcommands; each file adds one to the app.
#pragma once

#include <CLI/CLI.hpp>

namespace tpfuse::cli {

void add_demo_command(CLI::App& app);
void add_run_command(CLI::App& app);
void add_plan_command(CLI::App& app);
// `bench gemm`, added to the `bench` subcommand.
void add_bench_gemm_command(CLI::App& bench_app);
// `bench fused` and `bench allreduce`, added to the `bench` subcommand.
void add_bench_fused_command(CLI::App& bench_app);
void add_bench_allreduce_command(CLI::App& bench_app);
// `soak`: many random calls, checked, watching for leaks.
void add_soak_command(CLI::App& app);
// `trace`: merge, summarise and draw the timelines of TPFUSE_TRACE.
void add_trace_command(CLI::App& app);

}  // namespace tpfuse::cli
