// `tpfuse run`: one operator case with every input chosen by flags.
#include <map>
#include <memory>
#include <string>

#include "bench_common.h"
#include "case_runner.h"
#include "commands.h"
#include "tpfuse/comm/mpi.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/core/error.h"

namespace tpfuse::cli {

namespace {

struct RunFlags {
  testing::CaseSpec spec;
  std::string op = "mm_all_reduce";
  double epsilon = 1e-6;
  bool uneven_n = false;
  bool x1_scale = false;
  std::string dtype = "f16";
  std::string mode = "plain";
  std::string scale = "per_channel";
  int ranks = 2;
  int iterations = 10;
  bool no_check = false;
};

// Under mpirun every process is one rank (--ranks is mpirun's -np); rank 0
// prints the row. A rank's error reaches main, which prints it and exits 1.
void run_under_mpi(const OpCase& c, int iterations, bool check) {
  comm::RankContext ctx = rank_context_from_env();
  const auto result = run_case_on(ctx, c, iterations, check);
  comm::unregister_communicator(ctx.comm->name());
  if (!result) return;
  print_table_header();
  print_table_row(c, ctx.size, *result);
  const bool ok = result->ran && result->identical_across_ranks && result->comparison.ok();
  if (!ok) throw CLI::RuntimeError("run: the case failed", 1);
}

// The flags an operator does not take, as errors naming them (exit 2).
void check_flags_for_op(const OpCase& c, int ranks) {
  const testing::CaseSpec& s = c.spec;
  const std::string op(op_name(c.op));
  const auto refuse = [&](bool given, const char* flag, const char* why) {
    if (given) throw CLI::ValidationError(flag, cat("not taken by ", op, ": ", why));
  };
  const bool sequence_parallel = c.op == FusedOp::all_gather_mm || c.op == FusedOp::mm_reduce_scatter;
  refuse(c.op != FusedOp::all_gather_mm && c.uneven_n, "--uneven-n", "n must agree across ranks");
  refuse(!sequence_parallel && c.x1_scale, "--x1-scale", "it has no x1_scale");
  if (c.op == FusedOp::mm_all_reduce) return;
  refuse(s.x3, "--x3", "there is no x3");
  if (c.op == FusedOp::mm_all_reduce_add_rms_norm) return;
  refuse(s.mode == Mode::weight_quant, "--mode", "its modes are plain and full_quant");
  refuse(s.mode == Mode::full_quant && s.scale_kind != ScaleKind::per_channel, "--scale",
         "its x2_scale is per channel");
  refuse(s.mode != Mode::full_quant && c.x1_scale, "--x1-scale", "x1_scale is the quant path's (--mode full_quant)");
  refuse(s.batch > 0, "--batch", "x1 is 2-D");
  refuse(c.op == FusedOp::all_gather_mm && s.uneven_k, "--uneven-k", "k must agree across ranks");
  if (c.op == FusedOp::mm_reduce_scatter && s.m % ranks != 0) {
    throw CLI::ValidationError("--m", cat("must be a multiple of --ranks (", ranks, ") for ", op, ", got ", s.m));
  }
}

}  // namespace

void add_run_command(CLI::App& app) {
  auto flags = std::make_shared<RunFlags>();
  auto* run = app.add_subcommand("run",
                                 "Run an operator (mm_all_reduce_base by default) on each rank with the "
                                 "given shape and mode, check it, and time it");
  auto& s = flags->spec;
  run->add_option("--op", flags->op, "mm_all_reduce | all_gather_mm | mm_reduce_scatter | mm_all_reduce_add_rms_norm")
      ->check(CLI::IsMember(op_names()))
      ->capture_default_str();
  run->add_option("--m", s.m,
                  "Rows of x1 on each rank (m = b * s for a 3-D x1; all_gather_mm: the rows each rank "
                  "contributes; mm_reduce_scatter: m / ranks rows of the output per rank)")
      ->check(CLI::Range(1, 1 << 24));
  run->add_option("--k", s.k, "Columns of x1 per rank (the K-slice)")->check(CLI::Range(1, 1 << 24));
  run->add_option("--n", s.n, "Columns of x2")->check(CLI::Range(1, 1 << 24));
  run->add_option("--batch", s.batch, "Make x1 3-D [batch, m / batch, k]")
      ->check(CLI::Range(0, 1 << 24));
  run->add_option("--dtype", flags->dtype,
                  "Activation dtype (plain, weight_quant) or output dtype (full_quant)")
      ->check(CLI::IsMember({"f16", "bf16"}));
  run->add_option("--mode", flags->mode, "plain | weight_quant | full_quant")
      ->check(CLI::IsMember({"plain", "weight_quant", "full_quant"}));
  run->add_option("--scale", flags->scale, "Scale layout: per_tensor | per_channel | per_group")
      ->check(CLI::IsMember({"per_tensor", "per_channel", "per_group"}));
  run->add_option("--group-size", s.group_size, "antiquant_group_size for per_group scales")
      ->check(CLI::Range(0, 1 << 24));
  run->add_flag("--offset", s.offset, "Pass antiquant_offset (weight_quant)");
  run->add_flag("--bias", s.bias, "Pass a bias");
  run->add_flag("--x3", s.x3, "Pass x3");
  run->add_flag("--transpose-x2", s.x2_transposed, "Pass x2 as a transposed view of [n, k]");
  run->add_flag("--uneven-k", s.uneven_k, "Give rank r a K-slice of k + r");
  run->add_flag("--uneven-n", flags->uneven_n, "all_gather_mm: give rank r a column shard of n + r");
  run->add_flag("--x1-scale", flags->x1_scale,
                "all_gather_mm, mm_reduce_scatter with --mode full_quant: pass a per-token x1_scale");
  run->add_option("--comm-turn", s.comm_turn, "Tiles along M (0: tpfuse decides)")
      ->check(CLI::Range(0, 1 << 24));
  run->add_option("--ranks", flags->ranks, "Local ranks (processes)")->check(CLI::Range(1, 256));
  run->add_option("--iterations", flags->iterations, "Timed calls")->check(CLI::Range(1, 1000000));
  run->add_option("--seed", s.seed, "Seed of the random inputs");
  run->add_option("--epsilon", flags->epsilon, "The RMSNorm's epsilon (mm_all_reduce_add_rms_norm)")
      ->check(CLI::Range(1e-12, 0.999));
  run->add_flag("--no-check", flags->no_check, "Skip the check against the reference (large shapes)");

  run->callback([flags] {
    static const std::map<std::string, Mode> kModes = {
        {"plain", Mode::plain}, {"weight_quant", Mode::weight_quant}, {"full_quant", Mode::full_quant}};
    static const std::map<std::string, ScaleKind> kScales = {{"per_tensor", ScaleKind::per_tensor},
                                                             {"per_channel", ScaleKind::per_channel},
                                                             {"per_group", ScaleKind::per_group}};
    auto spec = flags->spec;
    spec.mode = kModes.at(flags->mode);
    spec.dtype = parse_dtype(flags->dtype);
    spec.scale_kind = kScales.at(flags->scale);
    if (spec.batch > 0 && spec.m % spec.batch != 0) {
      throw CLI::ValidationError("--batch", tpfuse::cat("must divide --m (", spec.m, "), got ", spec.batch));
    }
    const OpCase c{*parse_op(flags->op), spec, flags->epsilon, flags->uneven_n, flags->x1_scale};
    if (comm::launched_by_mpi()) {
      check_flags_for_op(c, 1);
      run_under_mpi(c, flags->iterations, !flags->no_check);
      return;
    }
    check_flags_for_op(c, flags->ranks);
    print_table_header();
    const CaseResult result = run_case(c, flags->ranks, flags->iterations, !flags->no_check);
    print_table_row(c, flags->ranks, result);
    const bool ok = result.ran && result.identical_across_ranks && result.comparison.ok();
    if (!ok) throw CLI::RuntimeError("run: the case failed", 1);
  });
}

}  // namespace tpfuse::cli
