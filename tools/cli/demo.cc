// `tpfuse demo`: the request's example (8 ranks, x1 [128, 512], x2 [512, 64],
// f16) and one weight-only-quant and one full-quant case, each checked against
// the golden model, printed as a table.
#include <cstdio>
#include <vector>

#include "case_runner.h"
#include "commands.h"

namespace tpfuse::cli {

namespace {

struct DemoCase {
  testing::CaseSpec spec;
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

  return {{seed, 8}, {weight_quant, 4}, {full_quant, 4}};
}

}  // namespace

void add_demo_command(CLI::App& app) {
  auto* demo = app.add_subcommand(
      "demo", "Run the request's example (8 ranks, [128, 512] x [512, 64] f16) and one case of "
              "each quantized mode, checked against the golden model");
  auto iterations = std::make_shared<int>(20);
  demo->add_option("--iterations", *iterations, "Timed calls per case")
      ->check(CLI::Range(1, 100000));
  demo->callback([iterations] {
    std::printf("tpfuse demo: mm_all_reduce_base across local ranks (processes on this host)\n\n");
    print_table_header();
    bool all_ok = true;
    for (const auto& c : demo_cases()) {
      const CaseResult result = run_case(c.spec, c.ranks, *iterations, /*check=*/true);
      print_table_row(c.spec, c.ranks, result);
      all_ok = all_ok && result.ran && result.identical_across_ranks && result.comparison.ok();
    }
    std::printf("\nmax error: largest |out - fp64 golden|; tolerance: the bound the contract's "
                "numerics allow at that element.\n");
    if (!all_ok) throw CLI::RuntimeError("demo: a case failed", 1);
  });
}

}  // namespace tpfuse::cli
