// The family's rejected calls (docs/SEMANTICS-FAMILY.md, errors): each rule
// broken on one rank only, of three. That rank must get an InvalidArgument
// naming the argument, the others a DisagreementError naming that rank; and
// where each rank's call is valid alone but one rank passes another value
// of what must agree, every rank a DisagreementError naming the field and
// the rank. Every rank fails well before the deadline (nothing hangs) and
// leaves its outputs, marked with a pattern beforehand, as they were.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "family_harness.h"
#include "tpfuse/ops/family.h"
#include "tpfuse/testing/family_inputs.h"

namespace tpfuse {
namespace {

using test::expect_rank;
using test::marked;
using test::still_marked;
using testing::AddRmsNormSpec;
using testing::SequenceParallelSpec;

constexpr int kRanks = 3;

enum class Op { all_gather, reduce_scatter, add_rms_norm };

// One rank's call, built from the specs, its outputs marked; edits change
// its arguments, keeping any tensor they make.
struct RankCall {
  Op op = Op::all_gather;
  std::int64_t world_size = kRanks;
  testing::SequenceParallelInputs sequence;
  testing::AllGatherMmArgs gather;
  testing::MmReduceScatterArgs scatter;
  testing::AddRmsNormInputs norm_inputs;
  testing::AddRmsNormArgs norm;
  std::vector<Tensor> kept;
  Tensor out, gather_out, norm_out, residual;
  bool pass_gather_out = true;
  bool in_place = false;

  TensorView keep(DType dtype, const std::vector<std::int64_t>& shape) {
    kept.emplace_back(dtype, shape);
    std::memset(kept.back().data(), 0, kept.back().nbytes());
    return kept.back().view();
  }

  void run(const std::string& hcom) {
    switch (op) {
      case Op::all_gather:
        all_gather_base_mm_out(gather.x1, gather.x2, hcom, world_size, gather.options, out,
                               pass_gather_out ? std::optional(gather_out.view()) : std::nullopt);
        return;
      case Op::reduce_scatter:
        mm_reduce_scatter_base_out(scatter.x1, scatter.x2, hcom, world_size, scatter.options, out);
        return;
      case Op::add_rms_norm:
        if (in_place) {
          residual = Tensor(norm.residual.dtype(), norm.residual.shape());
          std::memcpy(residual.data(), norm.residual.data(), residual.nbytes());
          mm_all_reduce_add_rms_norm_(norm.x1, norm.x2, residual, norm.gamma, hcom, norm.options);
        } else {
          mm_all_reduce_add_rms_norm_out(norm.x1, norm.x2, norm.residual, norm.gamma, hcom,
                                         norm.options, out, norm_out);
        }
        return;
    }
  }

  bool untouched() const {
    switch (op) {
      case Op::all_gather:
        return still_marked(out) && still_marked(gather_out);
      case Op::reduce_scatter:
        return still_marked(out);
      case Op::add_rms_norm:
        return in_place ? test::same_bytes(residual, norm.residual)
                        : still_marked(out) && still_marked(norm_out);
    }
    return false;
  }
};

DType sequence_output_dtype(const SequenceParallelSpec& spec) {
  if (!spec.quant) return spec.dtype;
  if (spec.x2_scale_dtype == DType::i64) return DType::f16;
  return spec.output_dtype.value_or(DType::bf16);
}

RankCall make_call(Op op, const SequenceParallelSpec& sequence, const AddRmsNormSpec& norm,
                   int rank) {
  RankCall call;
  call.op = op;
  if (op == Op::add_rms_norm) {
    call.norm_inputs = testing::make_add_rms_norm_inputs(norm, rank);
    call.norm = call.norm_inputs.args;
    const TensorView& residual = call.norm.residual;
    const std::vector<std::int64_t> shape(residual.shape().begin(), residual.shape().end());
    call.out = marked(residual.dtype(), shape);
    call.norm_out = marked(residual.dtype(), shape);
    return call;
  }
  call.sequence = testing::make_sequence_parallel_inputs(sequence, rank);
  call.gather = call.sequence.all_gather;
  call.scatter = call.sequence.reduce_scatter;
  const DType out = sequence_output_dtype(sequence);
  const std::int64_t m = sequence.m, n = sequence.n_for_rank(rank);
  if (op == Op::all_gather) {
    call.out = marked(out, {kRanks * m, n});
    call.gather_out = marked(call.gather.x1.dtype(), {kRanks * m, sequence.k_for_rank(rank)});
  } else {
    call.out = marked(out, {m / kRanks, n});
  }
  return call;
}

using SpecEdit = std::function<void(SequenceParallelSpec&, AddRmsNormSpec&)>;
using CallEdit = std::function<void(RankCall&)>;

struct ErrorCase {
  std::string name;
  Op op;
  int bad;  // the rank that breaks the rule, or passes another value
  // true: every rank's call is valid alone; `argument` is the field that differs.
  bool disagreement;
  std::string argument;
  std::vector<std::string> fragments;
  SpecEdit every_rank;  // applied on every rank (a quant path, say)
  SpecEdit spec_edit;   // on rank `bad`, before its inputs are built
  CallEdit call_edit;   // on rank `bad`, after
};

SequenceParallelSpec base_sequence() {
  SequenceParallelSpec spec;
  spec.m = 6;
  spec.n = 8;
  spec.k = 16;
  spec.bias = true;
  return spec;
}

AddRmsNormSpec base_norm() {
  AddRmsNormSpec spec;
  spec.product.m = 6;
  spec.product.n = 8;
  spec.product.k = 16;
  spec.product.bias = true;
  return spec;
}

class Rejected : public ::testing::TestWithParam<int> {};

std::vector<ErrorCase> error_cases();

TEST_P(Rejected, OnEveryRankBeforeAnyDataMoves) {
  const ErrorCase c = error_cases()[static_cast<std::size_t>(GetParam())];
  const auto result = test::run_ranks(
      kRanks,
      [&](comm::RankContext& ctx) {
        SequenceParallelSpec sequence = base_sequence();
        AddRmsNormSpec norm = base_norm();
        if (c.every_rank) c.every_rank(sequence, norm);
        const bool bad = ctx.rank == c.bad;
        if (bad && c.spec_edit) c.spec_edit(sequence, norm);
        RankCall call = make_call(c.op, sequence, norm, ctx.rank);
        if (bad && c.call_edit) c.call_edit(call);
        const std::string hcom = ctx.comm->name();
        if (c.disagreement) {
          test::expect_disagreement(ctx, c.bad, c.argument, [&] { call.run(hcom); });
        } else {
          test::expect_rejected(ctx, c.bad, c.argument, c.fragments, [&] { call.run(hcom); });
        }
        expect_rank(call.untouched(), "rank ", ctx.rank, ": the failed call wrote its outputs");
        return 0;
      },
      std::chrono::seconds(10));
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

INSTANTIATE_TEST_SUITE_P(Family, Rejected,
                         ::testing::Range(0, static_cast<int>(error_cases().size())),
                         [](const auto& info) {
                           return error_cases()[static_cast<std::size_t>(info.param)].name;
                         });

// ---- the rules ----

void quant(SequenceParallelSpec& s, AddRmsNormSpec&) { s.quant = true; }

void quant_i64(SequenceParallelSpec& s, AddRmsNormSpec&) {
  s.quant = true;
  s.x2_scale_dtype = DType::i64;
}

// Rank `odd`, valid alone, passes another `field` (edited in its spec).
ErrorCase differs(const std::string& name, Op op, int odd, const std::string& field,
                  SpecEdit every_rank, SpecEdit edit) {
  return {name, op, odd, true, field, {}, std::move(every_rank), std::move(edit), nullptr};
}

// The rules both sequence-parallel operators share, for `op`.
void add_sequence_rules(std::vector<ErrorCase>& cases, Op op, const std::string& prefix) {
  const auto add = [&](const std::string& name, int bad, const std::string& argument,
                       std::vector<std::string> fragments, SpecEdit every_rank, CallEdit edit) {
    cases.push_back({prefix + name, op, bad, false, argument, std::move(fragments),
                     std::move(every_rank), nullptr, std::move(edit)});
  };
  add("WorldSizeNotTheGroupSize", 1, "world_size", {"4"}, nullptr,
      [](RankCall& c) { c.world_size = kRanks + 1; });
  add("ThreeDimensionalX1", 2, "x1", {"2-D"}, nullptr, [](RankCall& c) {
    TensorView& x1 = c.op == Op::all_gather ? c.gather.x1 : c.scatter.x1;
    x1 = TensorView(x1.data(), x1.dtype(), {2, x1.size(0) / 2, x1.size(1)});
  });
  add("NegativeCommTurn", 1, "comm_turn", {"-1"}, nullptr,
      [](RankCall& c) { c.gather.options.comm_turn = c.scatter.options.comm_turn = -1; });
  add("UnknownCommMode", 2, "comm_mode", {"nccl"}, nullptr,
      [](RankCall& c) { c.gather.options.comm_mode = c.scatter.options.comm_mode = "nccl"; });
  add("AiCpuCommModeOnTheQuantPath", 1, "comm_mode", {"ai_cpu"}, quant,
      [](RankCall& c) { c.gather.options.comm_mode = c.scatter.options.comm_mode = "ai_cpu"; });
  add("OutputDtypeInPlainMode", 2, "output_dtype", {"bf16"}, nullptr, [](RankCall& c) {
    c.gather.options.output_dtype = c.scatter.options.output_dtype = DType::bf16;
  });
  add("OutputDtypeWithAnI64Scale", 1, "output_dtype", {"bf16"}, quant_i64, [](RankCall& c) {
    c.gather.options.output_dtype = c.scatter.options.output_dtype = DType::bf16;
  });
  add("OutputDtypeF32", 2, "output_dtype", {"f32"}, quant, [](RankCall& c) {
    c.gather.options.output_dtype = c.scatter.options.output_dtype = DType::f32;
  });
  add("X1ScaleShape", 1, "x1_scale", {"[6, 2]"}, quant, [](RankCall& c) {
    c.gather.options.x1_scale = c.scatter.options.x1_scale = c.keep(DType::f32, {6, 2});
  });
  add("X1ScaleDtype", 2, "x1_scale", {"f16"}, quant, [](RankCall& c) {
    c.gather.options.x1_scale = c.scatter.options.x1_scale = c.keep(DType::f16, {6, 1});
  });
  add("X2ScaleShape", 1, "x2_scale", {"[9]"}, quant, [](RankCall& c) {
    c.gather.options.x2_scale = c.scatter.options.x2_scale = c.keep(DType::f32, {9});
  });
  add("X2ScaleDtype", 2, "x2_scale", {"bf16"}, quant, [](RankCall& c) {
    c.gather.options.x2_scale = c.scatter.options.x2_scale = c.keep(DType::bf16, {8});
  });
  add("X2ScaleMissingOnTheQuantPath", 1, "x2_scale", {}, quant, [](RankCall& c) {
    c.gather.options.x2_scale.reset();
    c.scatter.options.x2_scale.reset();
  });
  add("X1ScaleInPlainMode", 2, "x1_scale", {}, nullptr, [](RankCall& c) {
    c.gather.options.x1_scale = c.scatter.options.x1_scale = c.keep(DType::f32, {6, 1});
  });
  add("X2ScaleInPlainMode", 1, "x2_scale", {}, nullptr, [](RankCall& c) {
    c.gather.options.x2_scale = c.scatter.options.x2_scale = c.keep(DType::f32, {8});
  });
  add("BiasDtypeOnTheQuantPath", 2, "bias", {"i32", "f16"}, quant, [](RankCall& c) {
    c.gather.options.bias = c.scatter.options.bias = c.keep(DType::f16, {8});
  });
  add("BiasShape", 1, "bias", {"[9]"}, nullptr, [](RankCall& c) {
    c.gather.options.bias = c.scatter.options.bias = c.keep(DType::f16, {9});
  });
  add("KBeyond65535OnTheQuantPath", 2, "x1", {"65535"}, quant, [](RankCall& c) {
    c.gather.x1 = c.scatter.x1 = c.keep(DType::i8, {6, 65536});
    c.gather.x2 = c.scatter.x2 = c.keep(DType::i8, {65536, 8});
  });
  add("OutputShape", 2, "output", {}, nullptr, [](RankCall& c) {
    c.out = marked(c.out.dtype(), {c.out.size(0), c.out.size(1) + 1});
  });

  const auto differ = [&](const std::string& name, int odd, const std::string& field,
                          SpecEdit edit) {
    cases.push_back(differs(prefix + name, op, odd, field, nullptr, std::move(edit)));
  };
  differ("DtypesDiffer", 1, "dtype",
         [](SequenceParallelSpec& s, AddRmsNormSpec&) { s.dtype = DType::bf16; });
  differ("QuantPathOnOneRank", 2, "mode", [](SequenceParallelSpec& s, AddRmsNormSpec&) {
    s.quant = true;
    s.output_dtype = DType::f16;
  });
  differ("MDiffers", 2, "m", [](SequenceParallelSpec& s, AddRmsNormSpec&) { s.m = 9; });
  differ("CommTurnDiffers", 1, "comm_turn",
         [](SequenceParallelSpec& s, AddRmsNormSpec&) { s.comm_turn = 2; });
}

std::vector<ErrorCase> error_cases() {
  std::vector<ErrorCase> cases;
  add_sequence_rules(cases, Op::all_gather, "AllGather");
  add_sequence_rules(cases, Op::reduce_scatter, "ReduceScatter");

  const auto gather = [&](const std::string& name, int bad, const std::string& argument,
                          std::vector<std::string> fragments, CallEdit edit) {
    cases.push_back({"AllGather" + name, Op::all_gather, bad, false, argument, std::move(fragments),
                     nullptr, nullptr, std::move(edit)});
  };
  gather("GatherIndexOne", 1, "gather_index", {"1"},
         [](RankCall& c) { c.gather.options.gather_index = 1; });
  gather("TransposedX1", 2, "x1", {}, [](RankCall& c) {
    const TensorView& x1 = c.gather.x1;
    c.gather.x1 = c.keep(x1.dtype(), {x1.size(1), x1.size(0)}).transposed();
  });
  gather("WeightOnlyQuantDtypes", 1, "x2", {"i8"}, [](RankCall& c) {
    c.gather.x2 = c.keep(DType::i8, {c.gather.x2.size(0), 8});
  });
  gather("GatherOutWithoutGatherOutput", 2, "gather_out", {},
         [](RankCall& c) { c.gather.options.gather_output = false; });
  gather("NoGatherOutWithGatherOutput", 1, "gather_out", {},
         [](RankCall& c) { c.pass_gather_out = false; });
  cases.push_back(differs("AllGatherKDiffers", Op::all_gather, 2, "k", nullptr,
                          [](SequenceParallelSpec& s, AddRmsNormSpec&) { s.k = 24; }));
  // x1_scale travels with x1: without it on one rank, its rows would be scaled nowhere.
  cases.push_back(differs("AllGatherX1ScaleOnSomeRanksOnly", Op::all_gather, 1, "x1_scale", quant,
                          [](SequenceParallelSpec& s, AddRmsNormSpec&) { s.x1_scale = false; }));

  const auto scatter = [&](const std::string& name, int bad, const std::string& argument,
                           std::vector<std::string> fragments, SpecEdit spec_edit, CallEdit edit) {
    cases.push_back({"ReduceScatter" + name, Op::reduce_scatter, bad, false, argument,
                     std::move(fragments), nullptr, std::move(spec_edit), std::move(edit)});
  };
  scatter("ReduceOpNotSum", 1, "reduce_op", {"max"}, nullptr,
          [](RankCall& c) { c.scatter.options.reduce_op = "max"; });
  scatter(
      "MNotAMultipleOfTheWorldSize", 2, "m % world_size", {"7"},
      [](SequenceParallelSpec& s, AddRmsNormSpec&) { s.m = 7; }, nullptr);
  cases.push_back(differs("ReduceScatterNDiffers", Op::reduce_scatter, 1, "n", nullptr,
                          [](SequenceParallelSpec& s, AddRmsNormSpec&) { s.n = 12; }));

  const auto norm = [&](const std::string& name, int bad, const std::string& argument,
                        std::vector<std::string> fragments, SpecEdit every_rank, CallEdit edit) {
    cases.push_back({"AddRmsNorm" + name, Op::add_rms_norm, bad, false, argument,
                     std::move(fragments), std::move(every_rank), nullptr, std::move(edit)});
  };
  const SpecEdit full_quant_bf16 = [](SequenceParallelSpec&, AddRmsNormSpec& s) {
    s.product.mode = Mode::full_quant;
    s.product.dtype = DType::bf16;
  };
  norm("ReduceOpNotSum", 1, "reduce_op", {"max"}, nullptr,
       [](RankCall& c) { c.norm.options.reduce_op = "max"; });
  norm("ResidualTwoDimensional", 2, "residual", {"[6, 8]"}, nullptr, [](RankCall& c) {
    c.norm.residual = c.keep(DType::f16, {6, 8});
  });
  norm("ResidualRows", 1, "residual", {"[1, 5, 8]"}, nullptr, [](RankCall& c) {
    c.norm.residual = c.keep(DType::f16, {1, 5, 8});
  });
  norm("ResidualDtype", 2, "residual", {"bf16"}, nullptr, [](RankCall& c) {
    c.norm.residual = c.keep(DType::bf16, {1, 6, 8});
  });
  norm("ResidualNotTheFullQuantOutputDtype", 1, "residual", {"f16"}, full_quant_bf16,
       [](RankCall& c) {
         c.norm.residual = c.keep(DType::f16, {1, 6, 8});
       });
  norm(
      "ResidualBatchNotX1s", 2, "residual", {"[3, 2, 8]"},
      [](SequenceParallelSpec&, AddRmsNormSpec& s) { s.product.batch = 2; },
      [](RankCall& c) {
        c.norm.residual = c.keep(DType::f16, {3, 2, 8});
      });
  norm("GammaShape", 2, "gamma", {"[9]"}, nullptr,
       [](RankCall& c) { c.norm.gamma = c.keep(DType::f16, {9}); });
  norm("GammaDtype", 1, "gamma", {"bf16"}, nullptr,
       [](RankCall& c) { c.norm.gamma = c.keep(DType::bf16, {8}); });
  norm("EpsilonZero", 2, "epsilon", {}, nullptr, [](RankCall& c) { c.norm.options.epsilon = 0; });
  norm("EpsilonOne", 1, "epsilon", {}, nullptr, [](RankCall& c) { c.norm.options.epsilon = 1; });
  norm("EpsilonNaN", 2, "epsilon", {}, nullptr,
       [](RankCall& c) { c.norm.options.epsilon = std::numeric_limits<double>::quiet_NaN(); });
  norm("EpsilonNegativeInPlace", 1, "epsilon", {}, nullptr, [](RankCall& c) {
    c.norm.options.epsilon = -1e-6;
    c.in_place = true;
  });
  norm("ProductRuleInPlace", 2, "antiquant_scale", {}, nullptr, [](RankCall& c) {
    c.norm.x2 = c.keep(DType::i8, {c.norm.x2.size(0), 8});
    c.in_place = true;
  });
  norm("YShape", 1, "y", {}, nullptr, [](RankCall& c) {
    c.out = marked(c.out.dtype(), {1, 6, 9});
  });

  const auto differ = [&](const std::string& name, int odd, const std::string& field,
                          SpecEdit edit) {
    cases.push_back(
        differs("AddRmsNorm" + name, Op::add_rms_norm, odd, field, nullptr, std::move(edit)));
  };
  differ("NDiffers", 1, "n", [](SequenceParallelSpec&, AddRmsNormSpec& s) { s.product.n = 12; });
  differ("MDiffers", 2, "m", [](SequenceParallelSpec&, AddRmsNormSpec& s) { s.product.m = 9; });
  differ("DtypesDiffer", 1, "dtype",
         [](SequenceParallelSpec&, AddRmsNormSpec& s) { s.product.dtype = DType::bf16; });
  differ("CommTurnDiffers", 2, "comm_turn",
         [](SequenceParallelSpec&, AddRmsNormSpec& s) { s.product.comm_turn = 3; });
  differ("EpsilonDiffers", 1, "epsilon",
         [](SequenceParallelSpec&, AddRmsNormSpec& s) { s.epsilon = 1e-5; });
  return cases;
}

}  // namespace
}  // namespace tpfuse
