// `tpfuse plan`: the tile schedule mm_all_reduce_base would run for a call,
// the constants measured for it on this machine (local ranks are launched to
// measure the transport; under mpirun, the job's ranks measure it), and the
// predicted time; with --run, also the measured time of the operator itself.
#include "tpfuse/pipeline/plan.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench_common.h"
#include "commands.h"
#include "tpfuse/ops/explain.h"
#include "tpfuse/comm/launcher.h"
#include "tpfuse/comm/mpi.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/core/error.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse::cli {

namespace {

struct PlanFlags {
  testing::CaseSpec spec;
  std::int64_t layer_k = 4096;
  std::string dtype = "f16";
  std::string mode = "plain";
  int ranks = 2;
  int run = 0;
  bool no_pin = false;
};

double slowest_rank(comm::Communicator& comm, double seconds) {
  const auto all =
      comm.all_gather(std::string_view(reinterpret_cast<const char*>(&seconds), sizeof seconds));
  double slowest = 0;
  for (const std::string& blob : all) {
    double value = 0;
    std::memcpy(&value, blob.data(), sizeof value);
    slowest = std::max(slowest, value);
  }
  return slowest;
}

// The operator's median time per call over `calls` calls, after one warm-up.
double time_operator(comm::RankContext& ctx, const testing::RankArgs& args, const CallShape& shape,
                     int calls) {
  Tensor out(shape.out_dtype, {shape.m, shape.n});
  mm_all_reduce_base_out(args.x1, args.x2, ctx.comm->name(), args.options, out);
  std::vector<double> seconds;
  for (int c = 0; c < calls; ++c) {
    ctx.comm->barrier();
    const auto start = std::chrono::steady_clock::now();
    mm_all_reduce_base_out(args.x1, args.x2, ctx.comm->name(), args.options, out);
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    seconds.push_back(slowest_rank(*ctx.comm, elapsed));
  }
  std::sort(seconds.begin(), seconds.end());
  return seconds[seconds.size() / 2];
}

// One rank's part: the plan the operator runs (explain_mm_all_reduce_base),
// rank 0 writes the account to `report_fd`.
int plan_rank(comm::RankContext& ctx, const PlanFlags& flags, int report_fd) {
  const std::string pinning = pinning_text(ctx.size, flags.no_pin);
  if (!flags.no_pin) pin_rank(ctx.rank, ctx.size, allowed_cores());
  const testing::RankInputs inputs = testing::make_rank_inputs(flags.spec, ctx.rank);
  const testing::RankArgs& args = inputs.args;
  const CallExplanation explained = explain_mm_all_reduce_base(args.x1, args.x2, *ctx.comm, args.options);
  const CallShape& shape = explained.shape;
  const pipeline::TilePlan& plan = explained.plan;

  std::string report = pipeline::describe_plan(explained.request, explained.constants, plan);
  report += cat("ranks     ", ctx.size, " (", pinning, "), progress ",
                explained.progress == pipeline::ProgressMode::interleaved ? "interleaved" : "helper_thread",
                ", GEMM engine ", explained.engine, "\n");
  if (flags.run > 0) {
    const double seconds = time_operator(ctx, args, shape, flags.run);
    char line[160];
    std::snprintf(line, sizeof line,
                  "measured  %.3f ms per call (median of %d, slowest rank), %.2fx the prediction\n",
                  seconds * 1e3, flags.run, seconds / plan.predicted_seconds);
    report += line;
  }
  if (ctx.rank == 0 &&
      write(report_fd, report.data(), report.size()) != static_cast<ssize_t>(report.size())) {
    return 3;
  }
  return 0;
}

// Under mpirun every process is one rank of the job's communicator (--ranks is
// mpirun's -np), so the constants are those of the MPI transport, across
// whatever hosts the job spans; rank 0 prints the account.
void plan_under_mpi(PlanFlags& flags) {
  comm::RankContext ctx = rank_context_from_env();
  flags.ranks = ctx.size;
  flags.spec.k = std::max<std::int64_t>(1, flags.layer_k / ctx.size);
  const int status = plan_rank(ctx, flags, STDOUT_FILENO);
  comm::unregister_communicator(ctx.comm->name());
  if (status != 0) throw CLI::RuntimeError("plan: could not write the report", status);
}

}  // namespace

void add_plan_command(CLI::App& app) {
  auto flags = std::make_shared<PlanFlags>();
  auto* plan = app.add_subcommand(
      "plan",
      "Print the tile schedule mm_all_reduce_base picks for a call, the constants measured for it "
      "on this machine, and the predicted time");
  auto& s = flags->spec;
  s.m = 4096;
  s.n = 8192;
  plan->add_option("--m", s.m, "Rows of x1 (tokens)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 24));
  plan->add_option("--n", s.n, "Columns of the output")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 24));
  plan->add_option("--k", flags->layer_k, "K of the whole layer, split evenly over the ranks")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 24));
  plan->add_option("--mode", flags->mode, "plain | weight_quant | full_quant")
      ->capture_default_str()
      ->check(CLI::IsMember({"plain", "weight_quant", "full_quant"}));
  plan->add_option("--dtype", flags->dtype,
                   "Activation dtype (plain, weight_quant) or output dtype (full_quant)")
      ->capture_default_str()
      ->check(CLI::IsMember({"f16", "bf16"}));
  plan->add_option("--ranks", flags->ranks,
                   "Local ranks (processes) to measure with (under mpirun: the job's ranks)")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  plan->add_option("--comm-turn", s.comm_turn, "Tiles along M (0: tpfuse decides)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 24));
  plan->add_option("--run", flags->run, "Also run the operator this many times and report its time")
      ->check(CLI::Range(0, 100000));
  plan->add_flag("--no-pin", flags->no_pin, "Do not pin ranks to cores");

  plan->callback([flags] {
    static const std::map<std::string, Mode> kModes = {{"plain", Mode::plain},
                                                       {"weight_quant", Mode::weight_quant},
                                                       {"full_quant", Mode::full_quant}};
    flags->spec.mode = kModes.at(flags->mode);
    flags->spec.dtype = parse_dtype(flags->dtype);
    if (comm::launched_by_mpi()) {
      plan_under_mpi(*flags);
      return;
    }
    flags->spec.k = std::max<std::int64_t>(1, flags->layer_k / flags->ranks);
    int fds[2];
    if (pipe(fds) != 0) throw_system_error("pipe", errno);
    comm::LaunchOptions options;
    options.ranks = flags->ranks;
    const comm::LaunchResult result = comm::launch_local(
        options, [&](comm::RankContext& ctx) { return plan_rank(ctx, *flags, fds[1]); });
    close(fds[1]);
    std::string report;
    char buffer[4096];
    ssize_t n = 0;
    while ((n = read(fds[0], buffer, sizeof buffer)) > 0)
      report.append(buffer, static_cast<std::size_t>(n));
    close(fds[0]);
    if (!result.ok()) throw CLI::RuntimeError(cat("plan: ", result.describe_failures()), 1);
    std::fputs(report.c_str(), stdout);
  });
}

}  // namespace tpfuse::cli
