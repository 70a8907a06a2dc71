// The cases `tpfuse run` and `tpfuse demo` run, one kind per operator: each
// rank's inputs and call, the outputs every rank must agree on, and the check
// against a reference that does not go through the operator's own path:
//
//   mm_all_reduce               the fp64 golden model (golden_mm_all_reduce)
//   all_gather_mm               gather_out bitwise the concatenation of every
//                               rank's x1; each block of output rows against the
//                               golden model of that block's product with x2
//   mm_reduce_scatter           the rank's rows bitwise those of mm_all_reduce_base
//                               on the same inputs, and within the golden model's
//                               bound of its rows
//   mm_all_reduce_add_rms_norm  mm_all_reduce_base on the same inputs against the
//                               golden model; y bitwise round(that + residual);
//                               norm_out against an fp64 RMSNorm of y, within the
//                               bound its roundings allow
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "case_runner.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/ops/family.h"
#include "tpfuse/ops/mm_all_reduce_base.h"

namespace tpfuse::cli {

namespace {

using testing::Comparison;
using testing::GoldenResult;

// Everything one rank's case owns; the calls hold it, the views of RankCall
// point into it.
struct CaseState {
  testing::RankInputs inputs;
  AddRmsNormInputs norm;
  Tensor out, gather_out, y, norm_out;
  Tensor x2_scale;  // all_gather_mm, mm_reduce_scatter: a bf16 dequant scale as f32
};

std::vector<testing::RankInputs> every_rank_inputs(const testing::CaseSpec& spec, int ranks) {
  std::vector<testing::RankInputs> inputs;
  for (int r = 0; r < ranks; ++r) inputs.push_back(testing::make_rank_inputs(spec, r));
  return inputs;
}

std::vector<testing::RankArgs> args_of(const std::vector<testing::RankInputs>& inputs) {
  std::vector<testing::RankArgs> args;
  for (const auto& in : inputs) args.push_back(in.args);
  return args;
}

// Element i of a contiguous f16, bf16 or f32 tensor.
double element(const TensorView& t, std::int64_t i) {
  switch (t.dtype()) {
    case DType::f16:
      return f16_to_f32(Half{t.data_as<std::uint16_t>()[i]});
    case DType::bf16:
      return bf16_to_f32(BFloat16{t.data_as<std::uint16_t>()[i]});
    case DType::f32:
      return t.data_as<float>()[i];
    default:
      throw Error(cat("element: unexpected dtype ", dtype_name(t.dtype())));
  }
}

// A reference that must be matched bit for bit (contiguous, the same dtype
// and element count): every element whose bytes differ is a mismatch.
Comparison same_bits(const TensorView& got, const TensorView& want) {
  const std::size_t size = dtype_size(want.dtype());
  Comparison result;
  if (got.dtype() != want.dtype() || got.numel() != want.numel()) {
    result.mismatches = std::max(got.numel(), want.numel());
    return result;
  }
  const auto* a = static_cast<const unsigned char*>(got.data());
  const auto* b = static_cast<const unsigned char*>(want.data());
  for (std::int64_t i = 0; i < want.numel(); ++i) {
    const std::size_t at = static_cast<std::size_t>(i) * size;
    if (std::memcmp(a + at, b + at, size) != 0) ++result.mismatches;
  }
  return result;
}

// Rows [row0, row0 + rows) of an [m, n] golden result.
GoldenResult rows_of(const GoldenResult& golden, std::int64_t row0, std::int64_t rows, std::int64_t n) {
  GoldenResult part;
  part.shape = golden.shape;
  const auto first = static_cast<std::ptrdiff_t>(row0 * n), last = static_cast<std::ptrdiff_t>((row0 + rows) * n);
  part.value.assign(golden.value.begin() + first, golden.value.begin() + last);
  part.bound.assign(golden.bound.begin() + first, golden.bound.begin() + last);
  return part;
}

// Rows [row0, row0 + rows) of a contiguous [*, n] tensor.
TensorView row_block(const Tensor& t, std::int64_t row0, std::int64_t rows, std::int64_t n) {
  auto* base = static_cast<unsigned char*>(t.data()) + static_cast<std::size_t>(row0 * n) * dtype_size(t.dtype());
  return TensorView(base, t.dtype(), {rows, n});
}

RankCall mm_all_reduce_call(comm::RankContext& ctx, const OpCase& c, std::shared_ptr<CaseState> state) {
  const testing::RankArgs& args = state->inputs.args;
  const std::string hcom = ctx.comm->name();
  state->out = mm_all_reduce_base(args.x1, args.x2, hcom, args.options);
  RankCall rc;
  rc.call = [state, hcom] {
    const testing::RankArgs& a = state->inputs.args;
    mm_all_reduce_base_out(a.x1, a.x2, hcom, a.options, state->out);
  };
  rc.replicated = {state->out};
  rc.check = [state, spec = c.spec, rank = ctx.rank, ranks = ctx.size]() -> std::optional<Comparison> {
    if (rank != 0) return std::nullopt;
    const auto all = every_rank_inputs(spec, ranks);
    return testing::compare(state->out, testing::golden_mm_all_reduce(args_of(all)));
  };
  return rc;
}

// The arguments all_gather_mm and mm_reduce_scatter share, from the inputs
// mm_all_reduce takes: on the quant path (full quant, per-channel scales) the
// dequant scale is x2_scale, an i64 one as it is (f16 output), a bf16 one as
// f32 (with output_dtype bf16).
void set_sequence_parallel_options(SequenceParallelOptions& options, CaseState& state) {
  const MmAllReduceOptions& given = state.inputs.args.options;
  options.bias = given.bias;
  options.comm_turn = given.comm_turn;
  if (!given.dequant_scale) return;
  const TensorView& scale = *given.dequant_scale;
  if (scale.dtype() == DType::i64) {
    options.x2_scale = scale;
    return;
  }
  state.x2_scale = Tensor(DType::f32, scale.shape());
  for (std::int64_t i = 0; i < scale.numel(); ++i) state.x2_scale.data_as<float>()[i] = element(scale, i);
  options.x2_scale = state.x2_scale.view();
  options.output_dtype = DType::bf16;
}

RankCall all_gather_mm_call(comm::RankContext& ctx, const OpCase& c, std::shared_ptr<CaseState> state) {
  const testing::RankArgs& args = state->inputs.args;
  const std::string hcom = ctx.comm->name();
  AllGatherMmOptions options;
  set_sequence_parallel_options(options, *state);
  AllGatherMmResult result = all_gather_base_mm(args.x1, args.x2, hcom, ctx.size, options);
  state->out = std::move(result.output);
  state->gather_out = std::move(result.gather_out);
  RankCall rc;
  rc.call = [state, hcom, options, ranks = ctx.size] {
    const testing::RankArgs& a = state->inputs.args;
    all_gather_base_mm_out(a.x1, a.x2, hcom, ranks, options, state->out, state->gather_out.view());
  };
  rc.replicated = {state->gather_out};
  rc.check = [state, spec = c.spec, ranks = ctx.size]() -> std::optional<Comparison> {
    const auto all = every_rank_inputs(spec, ranks);
    const std::int64_t m = spec.m, k = spec.k, n = spec.n;
    Tensor gathered(all[0].x1.dtype(), {ranks * m, k});
    for (int r = 0; r < ranks; ++r) {
      std::memcpy(row_block(gathered, r * m, m, k).data(), all[r].x1.data(), all[r].x1.nbytes());
    }
    Comparison result = same_bits(state->gather_out, gathered);
    for (int r = 0; r < ranks; ++r) {
      const testing::RankArgs block = {all[r].args.x1, state->inputs.args.x2, state->inputs.args.options};
      const GoldenResult golden = testing::golden_mm_all_reduce(std::span(&block, 1));
      add_comparison(result, testing::compare(row_block(state->out, r * m, m, n), golden));
    }
    return result;
  };
  return rc;
}

RankCall mm_reduce_scatter_call(comm::RankContext& ctx, const OpCase& c, std::shared_ptr<CaseState> state) {
  const testing::RankArgs& args = state->inputs.args;
  const std::string hcom = ctx.comm->name();
  MmReduceScatterOptions options;
  set_sequence_parallel_options(options, *state);
  state->out = mm_reduce_scatter_base(args.x1, args.x2, hcom, ctx.size, options);
  RankCall rc;
  rc.call = [state, hcom, options, ranks = ctx.size] {
    const testing::RankArgs& a = state->inputs.args;
    mm_reduce_scatter_base_out(a.x1, a.x2, hcom, ranks, options, state->out);
  };
  rc.check = [state, hcom, spec = c.spec, rank = ctx.rank, ranks = ctx.size]() -> std::optional<Comparison> {
    const testing::RankArgs& a = state->inputs.args;
    const Tensor reduced = mm_all_reduce_base(a.x1, a.x2, hcom, a.options);
    const std::int64_t rows = spec.m / ranks, row0 = rank * rows;
    Comparison result = same_bits(state->out, row_block(reduced, row0, rows, spec.n));
    const GoldenResult golden = testing::golden_mm_all_reduce(args_of(every_rank_inputs(spec, ranks)));
    add_comparison(result, testing::compare(state->out, rows_of(golden, row0, rows, spec.n)));
    return result;
  };
  return rc;
}

// norm_out's reference: y / sqrt(mean(y^2) + epsilon) * gamma in fp64, from
// y as the operator must have rounded it, and the bound of the contract's
// roundings: the fp32 sum of squares (16 running sums, then a tree) and the
// fp32 steps to rstd, then t = round(y * rstd) and round(t * gamma), each
// within half an ulp of the dtype (and half its smallest subnormal).
GoldenResult rms_norm_reference(const TensorView& y, const TensorView& gamma, std::int64_t n, double epsilon) {
  const bool bf16 = y.dtype() == DType::bf16;
  const double unit = bf16 ? 0x1p-8 : 0x1p-11;
  const double tiny = bf16 ? 0x1p-134 : 0x1p-25;
  const double relative = 1.01 * (2 * unit + (static_cast<double>(n) / 16 + 20) * 0x1p-24);
  GoldenResult norm;
  norm.value.resize(static_cast<std::size_t>(y.numel()));
  norm.bound.resize(norm.value.size());
  for (std::int64_t first = 0; first < y.numel(); first += n) {
    double squares = 0;
    for (std::int64_t j = 0; j < n; ++j) squares += element(y, first + j) * element(y, first + j);
    const double rstd = 1 / std::sqrt(squares / static_cast<double>(n) + epsilon);
    for (std::int64_t j = 0; j < n; ++j) {
      const double g = element(gamma, j), value = element(y, first + j) * rstd * g;
      const auto at = static_cast<std::size_t>(first + j);
      norm.value[at] = value;
      norm.bound[at] = std::fabs(value) * relative + tiny * (std::fabs(g) + 1);
    }
  }
  return norm;
}

RankCall add_rms_norm_call(comm::RankContext& ctx, const OpCase& c, std::shared_ptr<CaseState> state) {
  const testing::RankArgs& args = state->inputs.args;
  const std::string hcom = ctx.comm->name();
  MmAllReduceAddRmsNormOptions options;
  options.epsilon = c.epsilon;
  options.bias = args.options.bias;
  options.antiquant_scale = args.options.antiquant_scale;
  options.antiquant_offset = args.options.antiquant_offset;
  options.dequant_scale = args.options.dequant_scale;
  options.antiquant_group_size = args.options.antiquant_group_size;
  options.comm_turn = args.options.comm_turn;
  state->norm = make_add_rms_norm_inputs(c.spec);
  const Tensor& residual = state->norm.residual;
  state->y = Tensor(residual.dtype(), residual.shape());
  state->norm_out = Tensor(residual.dtype(), residual.shape());
  RankCall rc;
  rc.call = [state, hcom, options] {
    const testing::RankArgs& a = state->inputs.args;
    mm_all_reduce_add_rms_norm_out(a.x1, a.x2, state->norm.residual, state->norm.gamma, hcom, options, state->y,
                                   state->norm_out);
  };
  rc.call();
  rc.replicated = {state->y, state->norm_out};
  rc.check = [state, hcom, spec = c.spec, epsilon = c.epsilon, rank = ctx.rank,
              ranks = ctx.size]() -> std::optional<Comparison> {
    const testing::RankArgs& a = state->inputs.args;
    const Tensor reduced = mm_all_reduce_base(a.x1, a.x2, hcom, a.options);
    if (rank != 0) return std::nullopt;
    Comparison result =
        testing::compare(reduced, testing::golden_mm_all_reduce(args_of(every_rank_inputs(spec, ranks))));
    // y = round(f32(mm_out) + f32(residual)), bit for bit.
    const Tensor& residual = state->norm.residual;
    Tensor y(residual.dtype(), residual.shape());
    auto* bits = y.data_as<std::uint16_t>();
    for (std::int64_t i = 0; i < y.numel(); ++i) {
      const auto sum = static_cast<float>(element(reduced, i)) + static_cast<float>(element(residual, i));
      bits[i] = y.dtype() == DType::bf16 ? f32_to_bf16(sum).bits : f32_to_f16(sum).bits;
    }
    add_comparison(result, same_bits(state->y, y));
    add_comparison(result,
                   testing::compare(state->norm_out, rms_norm_reference(y, state->norm.gamma, spec.n, epsilon)));
    return result;
  };
  return rc;
}

// Uniform in [lo, hi], rounded to `t`'s dtype (f16 or bf16), from a stream of its own.
void fill(Tensor& t, std::uint64_t seed, double lo, double hi) {
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
  auto* bits = t.data_as<std::uint16_t>();
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    const auto value = static_cast<float>(lo + (hi - lo) * static_cast<double>(state >> 11) * 0x1p-53);
    bits[i] = t.dtype() == DType::bf16 ? f32_to_bf16(value).bits : f32_to_f16(value).bits;
  }
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

AddRmsNormInputs make_add_rms_norm_inputs(const testing::CaseSpec& spec) {
  const DType dtype = testing::output_dtype(spec);
  const std::int64_t batch = spec.batch > 0 ? spec.batch : 1;
  AddRmsNormInputs in{Tensor(dtype, {batch, spec.m / batch, spec.n}), Tensor(dtype, {spec.n})};
  fill(in.residual, 2 * spec.seed + 1, -1, 1);
  fill(in.gamma, 2 * spec.seed + 2, 0.5, 1.5);
  return in;
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
  state->inputs = testing::make_rank_inputs(c.spec, ctx.rank);
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
