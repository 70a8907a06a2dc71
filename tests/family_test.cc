// all_gather_base_mm, mm_reduce_scatter_base and mm_all_reduce_add_rms_norm
// end to end across local ranks: every mode of docs/SEMANTICS-FAMILY.md on
// 1, 2, 3, 4 and 8 ranks, with and without bias, against the golden model
// (golden_family.h); and what the contract makes exact: reduce-scatter rows
// are the all-reduce's, all-gather blocks are one-rank products, gather_out
// is the concatenation of x1, results are bitwise independent of comm_turn,
// comm_mode and the form of the call, and add-RMSNorm's outputs are the same
// on every rank and in place. family_errors_test.cc has the rejected calls.
#include "tpfuse/ops/family.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "family_harness.h"
#include "tpfuse/testing/family_inputs.h"
#include "tpfuse/testing/golden_family.h"

namespace tpfuse {
namespace {

using test::expect_rank;
using test::expect_same_on_every_rank;
using test::run_ranks;
using test::same_bytes;
using testing::AddRmsNormArgs;
using testing::AddRmsNormInputs;
using testing::AddRmsNormSpec;
using testing::AllGatherMmArgs;
using testing::CaseSpec;
using testing::MmReduceScatterArgs;
using testing::SequenceParallelInputs;
using testing::SequenceParallelSpec;

// ---- every rank's inputs, and one call checked against the golden model ----

std::vector<SequenceParallelInputs> sequence_inputs(const SequenceParallelSpec& spec, int size) {
  std::vector<SequenceParallelInputs> inputs;
  for (int r = 0; r < size; ++r) inputs.push_back(testing::make_sequence_parallel_inputs(spec, r));
  return inputs;
}

std::vector<AddRmsNormInputs> norm_inputs(const AddRmsNormSpec& spec, int size) {
  std::vector<AddRmsNormInputs> inputs;
  for (int r = 0; r < size; ++r) inputs.push_back(testing::make_add_rms_norm_inputs(spec, r));
  return inputs;
}

void expect_golden(const Tensor& out, const testing::GoldenResult& golden, comm::RankContext& ctx,
                   const std::string& what) {
  expect_rank(out.dtype() == golden.shape.out_dtype, "rank ", ctx.rank, ": ", what,
              ": expected dtype ", dtype_name(golden.shape.out_dtype), ", got ",
              dtype_name(out.dtype()));
  const testing::Comparison cmp = testing::compare(out, golden);
  expect_rank(cmp.ok(), "rank ", ctx.rank, ": ", what, ": ", cmp.mismatches,
              " elements beyond the bound (worst |err| ", cmp.max_abs_error, " against a bound of ",
              cmp.max_bound, ", ratio ", cmp.worst_ratio, ")");
}

// gather_out must be x1 of every rank, in rank order, on every rank.
void expect_gathered_x1(const Tensor& gather_out, const std::vector<SequenceParallelInputs>& all,
                        comm::RankContext& ctx) {
  const TensorView& x1 = all[0].all_gather.x1;
  const std::int64_t m = x1.size(0), k = x1.size(1);
  const auto* bytes = static_cast<const char*>(gather_out.data());
  const std::size_t block = static_cast<std::size_t>(m * k) * dtype_size(x1.dtype());
  expect_rank(gather_out.dtype() == x1.dtype() && gather_out.ndim() == 2 &&
                  gather_out.size(0) == ctx.size * m && gather_out.size(1) == k,
              "gather_out: expected [", ctx.size * m, ", ", k, "] ", dtype_name(x1.dtype()),
              ", got ", gather_out.view().describe());
  for (int q = 0; q < ctx.size; ++q) {
    expect_rank(std::memcmp(bytes + q * block, all[q].all_gather.x1.data(), block) == 0,
                "gather_out: rows of rank ", q, " are not its x1");
  }
  expect_same_on_every_rank(gather_out, ctx, "gather_out");
}

AllGatherMmResult check_all_gather(const SequenceParallelSpec& spec, comm::RankContext& ctx) {
  const auto all = sequence_inputs(spec, ctx.size);
  std::vector<AllGatherMmArgs> args;
  for (const auto& in : all) args.push_back(in.all_gather);
  const AllGatherMmArgs& mine = args[static_cast<std::size_t>(ctx.rank)];
  AllGatherMmResult result =
      all_gather_base_mm(mine.x1, mine.x2, ctx.comm->name(), ctx.size, mine.options);
  expect_rank(result.output.ndim() == 2 && result.output.size(0) == ctx.size * spec.m &&
                  result.output.size(1) == spec.n_for_rank(ctx.rank),
              "output: got ", result.output.view().describe());
  expect_golden(result.output, testing::golden_all_gather_mm(args, ctx.rank), ctx, "output");
  expect_gathered_x1(result.gather_out, all, ctx);
  return result;
}

Tensor check_reduce_scatter(const SequenceParallelSpec& spec, comm::RankContext& ctx) {
  const auto all = sequence_inputs(spec, ctx.size);
  std::vector<MmReduceScatterArgs> args;
  for (const auto& in : all) args.push_back(in.reduce_scatter);
  const MmReduceScatterArgs& mine = args[static_cast<std::size_t>(ctx.rank)];
  Tensor out = mm_reduce_scatter_base(mine.x1, mine.x2, ctx.comm->name(), ctx.size, mine.options);
  expect_rank(out.ndim() == 2 && out.size(0) == spec.m / ctx.size && out.size(1) == spec.n,
              "output: got ", out.view().describe());
  expect_golden(out, testing::golden_mm_reduce_scatter(args, ctx.rank), ctx, "output");
  return out;
}

// Also checks the in-place form: y in residual, the same bits.
AddRmsNormResult check_add_rms_norm(const AddRmsNormSpec& spec, comm::RankContext& ctx) {
  const auto all = norm_inputs(spec, ctx.size);
  std::vector<AddRmsNormArgs> args;
  for (const auto& in : all) args.push_back(in.args);
  const AddRmsNormArgs& mine = args[static_cast<std::size_t>(ctx.rank)];
  AddRmsNormResult result = mm_all_reduce_add_rms_norm(mine.x1, mine.x2, mine.residual, mine.gamma,
                                                       ctx.comm->name(), mine.options);
  for (const Tensor* out : {&result.y, &result.norm_out}) {
    expect_rank(out->dtype() == mine.residual.dtype() &&
                    std::ranges::equal(out->shape(), mine.residual.shape()),
                "y, norm_out: expected the residual's ", mine.residual.describe(), ", got ",
                out->view().describe());
  }
  const auto golden = testing::golden_mm_all_reduce_add_rms_norm(args);
  expect_golden(result.y, golden.y, ctx, "y");
  expect_golden(result.norm_out, golden.norm_out, ctx, "norm_out");
  expect_same_on_every_rank(result.y, ctx, "y");
  expect_same_on_every_rank(result.norm_out, ctx, "norm_out");

  Tensor residual(mine.residual.dtype(), mine.residual.shape());
  std::memcpy(residual.data(), mine.residual.data(), residual.nbytes());
  const Tensor norm_out = mm_all_reduce_add_rms_norm_(mine.x1, mine.x2, residual, mine.gamma,
                                                      ctx.comm->name(), mine.options);
  expect_rank(same_bytes(residual, result.y), "in place: residual differs from y");
  expect_rank(same_bytes(norm_out, result.norm_out), "in place: norm_out differs");
  return result;
}

// ---- every mode x ranks x bias ----

enum class Op { all_gather, reduce_scatter, add_rms_norm };

struct FamilyCase {
  const char* name;
  Op op;
  SequenceParallelSpec sequence;  // all-gather and reduce-scatter
  AddRmsNormSpec norm;            // add-RMSNorm
};

std::vector<FamilyCase> family_cases() {
  std::vector<FamilyCase> cases;
  for (const Op op : {Op::all_gather, Op::reduce_scatter}) {
    SequenceParallelSpec base;
    const bool gather = op == Op::all_gather;
    base.m = gather ? 5 : 24;  // reduce-scatter: a multiple of every world size
    base.n = 16;
    base.k = 40;
    base.uneven_n = gather;
    base.uneven_k = !gather;
    const auto add = [&](const char* name, auto edit) {
      SequenceParallelSpec spec = base;
      edit(spec);
      cases.push_back({name, op, spec, {}});
    };
    const bool g = gather;
    add(g ? "all_gather_plain_f16" : "reduce_scatter_plain_f16", [](auto&) {});
    add(g ? "all_gather_plain_bf16" : "reduce_scatter_plain_bf16",
        [](auto& s) { s.dtype = DType::bf16; });
    add(g ? "all_gather_quant_f32_scale_f16" : "reduce_scatter_quant_f32_scale_f16", [](auto& s) {
      s.quant = true;
      s.output_dtype = DType::f16;
    });
    add(g ? "all_gather_quant_f32_scale_bf16" : "reduce_scatter_quant_f32_scale_bf16",
        [](auto& s) { s.quant = true; });
    add(g ? "all_gather_quant_i64_scale" : "reduce_scatter_quant_i64_scale", [](auto& s) {
      s.quant = true;
      s.x2_scale_dtype = DType::i64;
      s.x2_scale_2d = true;
    });
  }
  CaseSpec product;
  product.m = 12;
  product.n = 16;
  product.k = 40;
  product.uneven_k = true;
  const auto add = [&](const char* name, auto edit) {
    AddRmsNormSpec spec;
    spec.product = product;
    edit(spec.product);
    cases.push_back({name, Op::add_rms_norm, {}, spec});
  };
  add("add_rms_norm_plain_f16", [](CaseSpec&) {});
  add("add_rms_norm_plain_bf16", [](CaseSpec& s) { s.dtype = DType::bf16; });
  add("add_rms_norm_wq_f16_per_channel", [](CaseSpec& s) {
    s.mode = Mode::weight_quant;
    s.offset = true;
  });
  add("add_rms_norm_wq_bf16_per_group", [](CaseSpec& s) {
    s.mode = Mode::weight_quant;
    s.dtype = DType::bf16;
    s.scale_kind = ScaleKind::per_group;
    s.group_size = 32;  // k = 40 + rank: the last group is short
  });
  add("add_rms_norm_full_quant_f16", [](CaseSpec& s) { s.mode = Mode::full_quant; });
  add("add_rms_norm_full_quant_bf16", [](CaseSpec& s) {
    s.mode = Mode::full_quant;
    s.dtype = DType::bf16;
    s.scale_kind = ScaleKind::per_tensor;
  });
  return cases;
}

class EveryMode : public ::testing::TestWithParam<std::tuple<int, int>> {};

// One launch per (case, ranks): without bias on a row-major x2 (2-D x1) in
// 2 tiles, then with bias on a transposed x2 (3-D x1 for add-RMSNorm) in 5.
// The tiles are given: the automatic choice measures the machine on a new
// communicator first, seconds on 8 ranks sharing 2 cores, so it has tests
// of its own (AutomaticTiling, and comm_turn 0 in FamilyExact).
TEST_P(EveryMode, MatchesGolden) {
  const auto [case_index, ranks] = GetParam();
  const FamilyCase c = family_cases()[static_cast<std::size_t>(case_index)];
  const auto result = run_ranks(ranks, [&](comm::RankContext& ctx) {
    for (const bool with_bias : {false, true}) {
      SequenceParallelSpec sequence = c.sequence;
      sequence.bias = sequence.x2_transposed = with_bias;
      sequence.comm_turn = with_bias ? 5 : 2;
      sequence.seed = with_bias ? 2 : 1;
      AddRmsNormSpec norm = c.norm;
      norm.product.bias = norm.product.x2_transposed = with_bias;
      norm.product.batch = with_bias ? 3 : 0;
      norm.product.comm_turn = with_bias ? 5 : 2;
      norm.product.seed = with_bias ? 2 : 1;
      switch (c.op) {
        case Op::all_gather:
          check_all_gather(sequence, ctx);
          break;
        case Op::reduce_scatter:
          check_reduce_scatter(sequence, ctx);
          break;
        case Op::add_rms_norm:
          check_add_rms_norm(norm, ctx);
          break;
      }
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

INSTANTIATE_TEST_SUITE_P(
    Family, EveryMode,
    ::testing::Combine(::testing::Range(0, static_cast<int>(family_cases().size())),
                       ::testing::Values(1, 2, 3, 4, 8)),
    [](const auto& info) {
      return std::string(family_cases()[static_cast<std::size_t>(std::get<0>(info.param))].name) +
             "_ranks" + std::to_string(std::get<1>(info.param));
    });

// comm_turn 0: tpfuse picks the tiles, on 8 ranks, each operator plain and
// on its quant path (f16 outputs: the machine is measured once).
TEST(AutomaticTiling, MatchesGoldenOnEightRanks) {
  const auto result = run_ranks(8, [](comm::RankContext& ctx) {
    for (const bool quant : {false, true}) {
      SequenceParallelSpec spec;
      spec.quant = quant;
      spec.x2_scale_dtype = DType::i64;
      spec.m = 4;
      spec.n = 16;
      spec.k = 40;
      spec.bias = true;
      spec.uneven_n = true;
      check_all_gather(spec, ctx);
      spec.m = 32;
      spec.uneven_n = false;
      spec.uneven_k = true;
      check_reduce_scatter(spec, ctx);
      AddRmsNormSpec norm;
      norm.product.mode = quant ? Mode::full_quant : Mode::plain;
      norm.product.m = 12;
      norm.product.n = 16;
      norm.product.k = 40;
      norm.product.uneven_k = true;
      norm.product.bias = true;
      check_add_rms_norm(norm, ctx);
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// One row, column or element of k where the shapes allow it, and a norm row
// of 17 (past a multiple of the sum's 16 lanes), in 2 tiles (more than add-RMSNorm's 1 row).
TEST(Family, EdgeShapes) {
  const auto result = run_ranks(3, [](comm::RankContext& ctx) {
    for (const bool quant : {false, true}) {
      SequenceParallelSpec spec;
      spec.quant = quant;
      spec.m = 1;
      spec.n = 1;
      spec.k = 1;
      spec.bias = true;
      spec.comm_turn = 2;
      spec.uneven_n = true;
      check_all_gather(spec, ctx);
      spec.m = ctx.size;
      spec.uneven_n = false;
      spec.uneven_k = true;
      check_reduce_scatter(spec, ctx);
    }
    for (const std::int64_t n : {1, 17}) {
      AddRmsNormSpec norm;
      norm.product.m = 1;
      norm.product.n = n;
      norm.product.k = 1;
      norm.product.bias = true;
      norm.product.comm_turn = 2;
      check_add_rms_norm(norm, ctx);
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// Each rank's x1_scale scales its own partial: ranks may give one or not.
TEST(ReduceScatter, X1ScaleOnSomeRanksOnly) {
  const auto result = run_ranks(3, [](comm::RankContext& ctx) {
    std::vector<SequenceParallelInputs> all;
    std::vector<MmReduceScatterArgs> args;
    for (int r = 0; r < ctx.size; ++r) {
      SequenceParallelSpec spec;
      spec.quant = true;
      spec.x1_scale = r != 1;
      spec.m = 6;
      spec.n = 8;
      spec.k = 16 + r;
      spec.bias = true;
      spec.comm_turn = 2;
      all.push_back(testing::make_sequence_parallel_inputs(spec, r));
      args.push_back(all.back().reduce_scatter);
    }
    const MmReduceScatterArgs& mine = args[static_cast<std::size_t>(ctx.rank)];
    const Tensor out =
        mm_reduce_scatter_base(mine.x1, mine.x2, ctx.comm->name(), ctx.size, mine.options);
    expect_golden(out, testing::golden_mm_reduce_scatter(args, ctx.rank), ctx, "output");
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// ---- exact properties ----

// The contract's own check: rank r's rows are, bitwise, rows [r*m/p,
// (r+1)*m/p) of mm_all_reduce_base's output for the same inputs (the quant
// path as mm_all_reduce_base has it: a packed scale, no per-token one).
TEST(FamilyExact, ReduceScatterRowsAreTheAllReduceRows) {
  for (const int ranks : {3, 4}) {
    const auto result = run_ranks(ranks, [](comm::RankContext& ctx) {
      for (const bool quant : {false, true}) {
        for (const DType dtype : {DType::f16, DType::bf16}) {
          if (quant && dtype == DType::bf16) continue;
          SequenceParallelSpec spec;
          spec.quant = quant;
          spec.dtype = dtype;
          spec.x2_scale_dtype = DType::i64;
          spec.x1_scale = false;
          spec.m = 24;
          spec.n = 20;
          spec.k = 48;
          spec.uneven_k = true;
          spec.bias = true;
          spec.comm_turn = 2;
          const Tensor mine = check_reduce_scatter(spec, ctx);
          const auto in = testing::make_sequence_parallel_inputs(spec, ctx.rank);
          MmAllReduceOptions options = in.product.args.options;
          if (quant) options.dequant_scale = in.x2_scale.view();
          const Tensor all =
              mm_all_reduce_base(in.product.args.x1, in.product.args.x2, ctx.comm->name(), options);
          const std::size_t bytes = mine.nbytes();
          expect_rank(std::memcmp(mine.data(),
                                  static_cast<const char*>(all.data()) +
                                      static_cast<std::size_t>(ctx.rank) * bytes,
                                  bytes) == 0,
                      "rank ", ctx.rank, " (quant ", quant, ", ", dtype_name(dtype),
                      "): rows differ from mm_all_reduce_base's");
        }
      }
      return 0;
    });
    EXPECT_TRUE(result.ok()) << ranks << " ranks: " << result.describe_failures();
  }
}

// Each row block of all_gather_base_mm's output is, bitwise, the product of
// that rank's x1 with this rank's x2 and bias alone: what a one-rank call
// gives. A one-rank job sends the hash of every (block, weight) product
// through a pipe; the three-rank job compares its blocks to them.
TEST(FamilyExact, AllGatherBlocksAreOneRankProducts) {
  constexpr int kRanks = 3;
  for (const bool quant : {false, true}) {
    SequenceParallelSpec spec;
    spec.quant = quant;
    spec.m = 7;
    spec.n = 12;
    spec.k = 36;
    spec.uneven_n = true;
    spec.bias = true;
    int fds[2];
    ASSERT_EQ(pipe(fds), 0);
    const auto alone = run_ranks(1, [&](comm::RankContext& ctx) {
      const auto all = sequence_inputs(spec, kRanks);
      for (int r = 0; r < kRanks; ++r) {
        for (int q = 0; q < kRanks; ++q) {
          const AllGatherMmArgs& block = all[static_cast<std::size_t>(q)].all_gather;
          const AllGatherMmArgs& weight = all[static_cast<std::size_t>(r)].all_gather;
          AllGatherMmOptions options = weight.options;
          options.x1_scale = block.options.x1_scale;  // gathered along with x1
          const AllGatherMmResult one =
              all_gather_base_mm(block.x1, weight.x2, ctx.comm->name(), 1, options);
          const std::uint64_t hash = test::fnv1a(one.output.data(), one.output.nbytes());
          if (write(fds[1], &hash, sizeof(hash)) != sizeof(hash)) return 3;
        }
      }
      return 0;
    });
    close(fds[1]);
    std::vector<std::uint64_t> hashes(kRanks * kRanks);
    const auto bytes = static_cast<ssize_t>(hashes.size() * sizeof(std::uint64_t));
    const ssize_t got = read(fds[0], hashes.data(), static_cast<std::size_t>(bytes));
    close(fds[0]);
    ASSERT_TRUE(alone.ok()) << alone.describe_failures();
    ASSERT_EQ(got, bytes);
    const auto together = run_ranks(kRanks, [&](comm::RankContext& ctx) {
      const AllGatherMmResult result = check_all_gather(spec, ctx);
      const std::size_t block = result.output.nbytes() / kRanks;
      for (int q = 0; q < kRanks; ++q) {
        const auto* data = static_cast<const char*>(result.output.data()) + q * block;
        expect_rank(
            test::fnv1a(data, block) == hashes[static_cast<std::size_t>(ctx.rank * kRanks + q)],
            "rank ", ctx.rank, " (quant ", quant, "): the block of rank ", q,
            " differs from its one-rank product");
      }
      return 0;
    });
    EXPECT_TRUE(together.ok()) << together.describe_failures();
  }
}

// comm_turn (0, 1, 2, 3, the rows, more), comm_mode, gather_output and the
// _out forms change no bit of any operator's result.
TEST(FamilyExact, BitwiseIndependentOfCommTurnCommModeAndForm) {
  const auto result = run_ranks(3, [](comm::RankContext& ctx) {
    const std::string hcom = ctx.comm->name();
    for (const bool quant : {false, true}) {
      SequenceParallelSpec spec;
      spec.quant = quant;
      spec.m = 9;
      spec.n = 20;
      spec.k = 40;
      spec.bias = true;
      spec.uneven_n = true;
      const AllGatherMmResult reference = check_all_gather(spec, ctx);
      auto in = testing::make_sequence_parallel_inputs(spec, ctx.rank);
      const std::int64_t rows = ctx.size * spec.m;
      for (const std::int64_t turn : {0L, 1L, 2L, 3L, spec.m, rows, rows + 5}) {
        for (const char* mode : {"", "aiv", "ai_cpu"}) {
          if (quant && std::string(mode) == "ai_cpu") continue;
          AllGatherMmOptions options = in.all_gather.options;
          options.comm_turn = turn;
          options.comm_mode = mode;
          const AllGatherMmResult got =
              all_gather_base_mm(in.all_gather.x1, in.all_gather.x2, hcom, ctx.size, options);
          expect_rank(same_bytes(got.output, reference.output) &&
                          same_bytes(got.gather_out, reference.gather_out),
                      "all-gather (quant ", quant, "): comm_turn ", turn, ", comm_mode '", mode,
                      "' changed the result");
        }
        AllGatherMmOptions options = in.all_gather.options;
        options.comm_turn = turn;
        options.gather_output = false;
        const AllGatherMmResult without =
            all_gather_base_mm(in.all_gather.x1, in.all_gather.x2, hcom, ctx.size, options);
        expect_rank(same_bytes(without.output, reference.output) &&
                        without.gather_out.ndim() == 1 && without.gather_out.size(0) == 0,
                    "all-gather without gather_output: got gather_out ",
                    without.gather_out.view().describe());
        const Tensor out(reference.output.dtype(), reference.output.shape());
        const Tensor gathered(reference.gather_out.dtype(), reference.gather_out.shape());
        all_gather_base_mm_out(in.all_gather.x1, in.all_gather.x2, hcom, ctx.size,
                               in.all_gather.options, out, gathered.view());
        expect_rank(same_bytes(out, reference.output) && same_bytes(gathered, reference.gather_out),
                    "all_gather_base_mm_out differs");
      }

      spec.m = 24;
      spec.uneven_n = false;
      spec.uneven_k = true;
      const Tensor scattered = check_reduce_scatter(spec, ctx);
      in = testing::make_sequence_parallel_inputs(spec, ctx.rank);
      for (const std::int64_t turn : {0L, 1L, 2L, 3L, spec.m / ctx.size, spec.m, spec.m + 5}) {
        for (const char* mode : {"", "aiv", "ai_cpu"}) {
          if (quant && std::string(mode) == "ai_cpu") continue;
          MmReduceScatterOptions options = in.reduce_scatter.options;
          options.comm_turn = turn;
          options.comm_mode = mode;
          const Tensor out = Tensor(scattered.dtype(), scattered.shape());
          mm_reduce_scatter_base_out(in.reduce_scatter.x1, in.reduce_scatter.x2, hcom, ctx.size,
                                     options, out);
          expect_rank(same_bytes(out, scattered), "reduce-scatter (quant ", quant, "): comm_turn ",
                      turn, ", comm_mode '", mode, "' changed the result");
        }
      }
    }

    for (const Mode mode : {Mode::plain, Mode::full_quant}) {
      AddRmsNormSpec spec;
      spec.product.mode = mode;
      spec.product.m = 12;
      spec.product.batch = 2;
      spec.product.n = 24;
      spec.product.k = 40;
      spec.product.bias = true;
      const AddRmsNormResult reference = check_add_rms_norm(spec, ctx);
      const auto in = testing::make_add_rms_norm_inputs(spec, ctx.rank);
      for (const std::int64_t turn : {0L, 1L, 2L, 3L, spec.product.m, spec.product.m + 5}) {
        auto options = in.args.options;
        options.comm_turn = turn;
        const Tensor y(reference.y.dtype(), reference.y.shape());
        const Tensor norm_out(reference.y.dtype(), reference.y.shape());
        mm_all_reduce_add_rms_norm_out(in.args.x1, in.args.x2, in.args.residual, in.args.gamma,
                                       hcom, options, y, norm_out);
        expect_rank(same_bytes(y, reference.y) && same_bytes(norm_out, reference.norm_out),
                    "add-RMSNorm (", mode_name(mode), "): comm_turn ", turn, " changed the result");
      }
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

}  // namespace
}  // namespace tpfuse
