// The cases `tpfuse run` and `tpfuse demo` run, one kind per operator: each
// rank's inputs and call, the outputs every rank must agree on, and the check
// against the fp64 golden model (golden.h, golden_family.h), which each rank
// computes from every rank's inputs (rebuilt from the spec):
//
//   mm_all_reduce               the output (rank 0: it is the same on every rank)
//   all_gather_mm               each rank its own output, and gather_out bit for
//                               bit the concatenation of every rank's x1
//   mm_reduce_scatter           each rank its own rows
//   mm_all_reduce_add_rms_norm  y and norm_out (rank 0)
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "case_runner.h"
#include "tpfuse/ops/family.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/testing/family_inputs.h"
#include "tpfuse/testing/golden_family.h"

namespace tpfuse::cli {

namespace {

using testing::Comparison;

// Everything one rank's case owns; the calls hold it, the views of RankCall
// point into it.
struct CaseState {
  testing::RankInputs product;               // mm_all_reduce
  testing::SequenceParallelInputs sequence;  // all_gather_mm, mm_reduce_scatter
  testing::AddRmsNormInputs norm;            // mm_all_reduce_add_rms_norm
  Tensor out, gather_out, y, norm_out;
};

// all_gather_mm's and mm_reduce_scatter's inputs for a case: plain, or the
// quant path (full_quant) with an i64 x2_scale for f16 output and an f32 one
// for bf16 output.
testing::SequenceParallelSpec sequence_parallel_spec(const OpCase& c) {
  const testing::CaseSpec& s = c.spec;
  testing::SequenceParallelSpec spec;
  spec.quant = s.mode == Mode::full_quant;
  spec.dtype = s.dtype;
  spec.x2_scale_dtype = s.dtype == DType::f16 ? DType::i64 : DType::f32;
  spec.x1_scale = c.x1_scale;
  spec.m = s.m;
  spec.n = s.n;
  spec.k = s.k;
  spec.uneven_n = c.uneven_n;
  spec.uneven_k = s.uneven_k;
  spec.x2_transposed = s.x2_transposed;
  spec.bias = s.bias;
  spec.comm_turn = s.comm_turn;
  spec.seed = s.seed;
  return spec;
}

// Every rank's inputs, rebuilt from the spec, as `build(rank)` makes them.
template <class Build>
auto every_rank(int ranks, const Build& build) {
  std::vector<decltype(build(0))> inputs;
  for (int r = 0; r < ranks; ++r) inputs.push_back(build(r));
  return inputs;
}

RankCall mm_all_reduce_call(comm::RankContext& ctx, const OpCase& c, std::shared_ptr<CaseState> state) {
  state->product = testing::make_rank_inputs(c.spec, ctx.rank);
  const testing::RankArgs& args = state->product.args;
  const std::string hcom = ctx.comm->name();
  state->out = mm_all_reduce_base(args.x1, args.x2, hcom, args.options);
  RankCall rc;
  rc.call = [state, hcom] {
    const testing::RankArgs& a = state->product.args;
    mm_all_reduce_base_out(a.x1, a.x2, hcom, a.options, state->out);
  };
  rc.replicated = {state->out};
  rc.check = [state, spec = c.spec, rank = ctx.rank, ranks = ctx.size]() -> std::optional<Comparison> {
    if (rank != 0) return std::nullopt;
    const auto all = every_rank(ranks, [&](int r) { return testing::make_rank_inputs(spec, r); });
    std::vector<testing::RankArgs> args;
    for (const auto& in : all) args.push_back(in.args);
    return testing::compare(state->out, testing::golden_mm_all_reduce(args));
  };
  return rc;
}

RankCall all_gather_mm_call(comm::RankContext& ctx, const OpCase& c, std::shared_ptr<CaseState> state) {
  const testing::SequenceParallelSpec spec = sequence_parallel_spec(c);
  state->sequence = testing::make_sequence_parallel_inputs(spec, ctx.rank);
  const testing::AllGatherMmArgs& args = state->sequence.all_gather;
  const std::string hcom = ctx.comm->name();
  AllGatherMmResult result = all_gather_base_mm(args.x1, args.x2, hcom, ctx.size, args.options);
  state->out = std::move(result.output);
  state->gather_out = std::move(result.gather_out);
  RankCall rc;
  rc.call = [state, hcom, ranks = ctx.size] {
    const testing::AllGatherMmArgs& a = state->sequence.all_gather;
    all_gather_base_mm_out(a.x1, a.x2, hcom, ranks, a.options, state->out, state->gather_out.view());
  };
  rc.replicated = {state->gather_out};
  rc.check = [state, spec, rank = ctx.rank, ranks = ctx.size]() -> std::optional<Comparison> {
    const auto all = every_rank(ranks, [&](int r) { return testing::make_sequence_parallel_inputs(spec, r); });
    std::vector<testing::AllGatherMmArgs> args;
    for (const auto& in : all) args.push_back(in.all_gather);
    Comparison result = testing::compare(state->out, testing::golden_all_gather_mm(args, rank));
    // gather_out: every rank's x1, in rank order, bit for bit.
    const auto* gathered = static_cast<const unsigned char*>(state->gather_out.data());
    std::int64_t offset = 0;
    for (const auto& in : all) {
      const TensorView& x1 = in.all_gather.x1;
      const std::size_t size = dtype_size(x1.dtype());
      for (std::int64_t i = 0; i < x1.numel(); ++i, ++offset) {
        const auto* theirs = static_cast<const unsigned char*>(x1.data()) + static_cast<std::size_t>(i) * size;
        if (std::memcmp(gathered + static_cast<std::size_t>(offset) * size, theirs, size) != 0) ++result.mismatches;
      }
    }
    return result;
  };
  return rc;
}

RankCall mm_reduce_scatter_call(comm::RankContext& ctx, const OpCase& c, std::shared_ptr<CaseState> state) {
  const testing::SequenceParallelSpec spec = sequence_parallel_spec(c);
  state->sequence = testing::make_sequence_parallel_inputs(spec, ctx.rank);
  const testing::MmReduceScatterArgs& args = state->sequence.reduce_scatter;
  const std::string hcom = ctx.comm->name();
  state->out = mm_reduce_scatter_base(args.x1, args.x2, hcom, ctx.size, args.options);
  RankCall rc;
  rc.call = [state, hcom, ranks = ctx.size] {
    const testing::MmReduceScatterArgs& a = state->sequence.reduce_scatter;
    mm_reduce_scatter_base_out(a.x1, a.x2, hcom, ranks, a.options, state->out);
  };
  rc.check = [state, spec, rank = ctx.rank, ranks = ctx.size]() -> std::optional<Comparison> {
    const auto all = every_rank(ranks, [&](int r) { return testing::make_sequence_parallel_inputs(spec, r); });
    std::vector<testing::MmReduceScatterArgs> args;
    for (const auto& in : all) args.push_back(in.reduce_scatter);
    return testing::compare(state->out, testing::golden_mm_reduce_scatter(args, rank));
  };
  return rc;
}

RankCall add_rms_norm_call(comm::RankContext& ctx, const OpCase& c, std::shared_ptr<CaseState> state) {
  const testing::AddRmsNormSpec spec{c.spec, c.epsilon};
  state->norm = testing::make_add_rms_norm_inputs(spec, ctx.rank);
  const Tensor& residual = state->norm.residual;
  state->y = Tensor(residual.dtype(), residual.shape());
  state->norm_out = Tensor(residual.dtype(), residual.shape());
  const std::string hcom = ctx.comm->name();
  RankCall rc;
  rc.call = [state, hcom] {
    const testing::AddRmsNormArgs& a = state->norm.args;
    mm_all_reduce_add_rms_norm_out(a.x1, a.x2, a.residual, a.gamma, hcom, a.options, state->y, state->norm_out);
  };
  rc.call();
  rc.replicated = {state->y, state->norm_out};
  rc.check = [state, spec, rank = ctx.rank, ranks = ctx.size]() -> std::optional<Comparison> {
    if (rank != 0) return std::nullopt;
    const auto all = every_rank(ranks, [&](int r) { return testing::make_add_rms_norm_inputs(spec, r); });
    std::vector<testing::AddRmsNormArgs> args;
    for (const auto& in : all) args.push_back(in.args);
    const testing::GoldenAddRmsNorm golden = testing::golden_mm_all_reduce_add_rms_norm(args);
    Comparison result = testing::compare(state->y, golden.y);
    add_comparison(result, testing::compare(state->norm_out, golden.norm_out));
    return result;
  };
  return rc;
}

}  // namespace

void add_comparison(Comparison& into, const Comparison& c) {
  into.mismatches += c.mismatches;
  into.worst_ratio = std::max(into.worst_ratio, c.worst_ratio);
  if (c.max_abs_error >= into.max_abs_error) {
    into.max_abs_error = c.max_abs_error;
    into.max_bound = c.max_bound;
  }
}

std::string_view replicated_outputs(FusedOp op) {
  switch (op) {
    case FusedOp::mm_all_reduce:
      return "identical";
    case FusedOp::all_gather_mm:
      return "gather_out identical";
    case FusedOp::mm_reduce_scatter:
      return "";
    case FusedOp::mm_all_reduce_add_rms_norm:
      return "y and norm_out identical";
  }
  return "";
}

RankCall make_rank_call(comm::RankContext& ctx, const OpCase& c) {
  auto state = std::make_shared<CaseState>();
  RankCall rc;
  switch (c.op) {
    case FusedOp::mm_all_reduce:
      rc = mm_all_reduce_call(ctx, c, state);
      break;
    case FusedOp::all_gather_mm:
      rc = all_gather_mm_call(ctx, c, state);
      break;
    case FusedOp::mm_reduce_scatter:
      rc = mm_reduce_scatter_call(ctx, c, state);
      break;
    case FusedOp::mm_all_reduce_add_rms_norm:
      rc = add_rms_norm_call(ctx, c, state);
      break;
  }
  return rc;
}

}  // namespace tpfuse::cli
