// `tpfuse demo`: the request's example (8 ranks, x1 [128, 512], x2 [512, 64],
// f16), one weight-only-quant and one full-quant case, and one small case of
// each of the family's other operators, each checked against its reference,
// printed as a table.
#include <cstdio>
#include <vector>

#include "case_runner.h"
#include "commands.h"

namespace tpfuse::cli {

namespace {

struct DemoCase {
  OpCase op_case;
  int ranks;
};

std::vector<DemoCase> demo_cases() {
  testing::CaseSpec seed;  // the request's example
  seed.mode = Mode::plain;
  seed.dtype = DType::f16;
  seed.m = 128;
  seed.k = 512;
  seed.n = 64;

  testing::CaseSpec weight_quant = seed;
  weight_quant.mode = Mode::weight_quant;
  weight_quant.scale_kind = ScaleKind::per_group;
  weight_quant.group_size = 128;
  weight_quant.offset = true;
  weight_quant.bias = true;

  testing::CaseSpec full_quant = seed;
  full_quant.mode = Mode::full_quant;
  full_quant.scale_kind = ScaleKind::per_channel;
  full_quant.bias = true;
  full_quant.x3 = true;

  // The sequence-parallel pair of an MLP, and the row-parallel layer with the
  // residual add and the next layer's RMSNorm.
  testing::CaseSpec gather = seed;
  gather.dtype = DType::bf16;
  gather.m = 32;
  gather.k = 256;
  gather.bias = true;

  testing::CaseSpec scatter = seed;
  scatter.bias = true;

  testing::CaseSpec norm = seed;
  norm.dtype = DType::bf16;
  norm.batch = 4;
  norm.m = 64;
  norm.n = 256;

  return {{{FusedOp::mm_all_reduce, seed}, 8},        {{FusedOp::mm_all_reduce, weight_quant}, 4},
          {{FusedOp::mm_all_reduce, full_quant}, 4},  {{FusedOp::all_gather_mm, gather}, 4},
          {{FusedOp::mm_reduce_scatter, scatter}, 4}, {{FusedOp::mm_all_reduce_add_rms_norm, norm}, 2}};
}

}  // namespace

void add_demo_command(CLI::App& app) {
  auto* demo =
      app.add_subcommand("demo",
                         "Run the request's example (8 ranks, [128, 512] x [512, 64] f16), one case of each quantized "
                         "mode, and one of each other operator of the family, each checked against its reference");
  auto iterations = std::make_shared<int>(20);
  demo->add_option("--iterations", *iterations, "Timed calls per case")
      ->check(CLI::Range(1, 100000));
  demo->callback([iterations] {
    std::printf("tpfuse demo: the operators across local ranks (processes on this host)\n\n");
    print_table_header();
    bool all_ok = true;
    for (const auto& c : demo_cases()) {
      const CaseResult result = run_case(c.op_case, c.ranks, *iterations, /*check=*/true);
      print_table_row(c.op_case, c.ranks, result);
      all_ok = all_ok && result.ran && result.identical_across_ranks && result.comparison.ok();
    }
    std::printf(
        "\nmax error: largest |out - fp64 golden model| (gather_out: bit for bit); tolerance: the bound the "
        "contract's numerics allow at that element.\n");
    if (!all_ok) throw CLI::RuntimeError("demo: a case failed", 1);
  });
}

}  // namespace tpfuse::cli
