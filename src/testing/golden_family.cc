// The golden model of the family: the partial products and the reduce are
// golden.cc's (golden_parts.h); this file adds the operators' own steps and
// the bounds they need.
//
// all_gather_base_mm: row block q of rank r's output is rank q's x1 times
// rank r's x2 plus r's bias, accumulated in fp32 (int32 on the quant path)
// and rounded once to the output dtype, with no reduce: the partial's error
// (golden.cc) plus u_out * (|value| + that error) + half the output's
// smallest subnormal.
//
// mm_reduce_scatter_base: golden_mm_all_reduce's reduce, rows of it.
//
// Quant path of both: the int32 sum of the int8 products and the bias is
// exact; x1_scale * x2_scale, the sum's conversion to fp32 and their product
// round three times in fp32: gamma(3) * |value| (golden.cc).
//
// mm_all_reduce_add_rms_norm, per row of n elements, u = 2^-24 (fp32),
// u_out the output dtype's unit roundoff, and r = u + u_out * (1 + u) the
// relative error of an fp32 result rounded to the output dtype:
//   y = round(f32(mm) + f32(residual)). With B the bound on mm
//     (golden_mm_all_reduce) and Y = mm_value + residual:
//     E_y = B + r * (|Y| + B) + half the smallest subnormal.
//   rstd = 1 / sqrt(fl(sum(y^2)) / n + eps) in fp32. The exact sum of the
//     impl's y^2 differs from Q = sum(Y^2) by at most
//     dQ = sum(E_y * (2|Y| + E_y)); the fp32 sum of n rounded squares adds
//     gamma(n) of it, the division, eps's rounding to fp32 and the add one u
//     each. So D = fl(mean + eps) is within rho * (Q/n + eps) of Q/n + eps:
//     rho = gamma(n+2) + (dQ/n * (1 + gamma(n+2)) + (n+2) * 2^-150) / (Q/n + eps).
//     Then 1/sqrt(D) is within sigma1 = rho / (s * (1 + s)), s = sqrt(1 - rho),
//     of the exact R, and the fp32 sqrt and division round twice more:
//     sigma = (1 + sigma1) * (1 + gamma(2)) - 1.
//   t = round(f32(y) * rstd): with A = E_y * R * (1 + sigma) + |Y| * R * sigma,
//     E_t = A + r * (|Y * R| + A) + 2^-150 + half the smallest subnormal.
//   norm_out = round(f32(t) * f32(gamma)): with N = Y * R * gamma,
//     E_norm = E_t * |gamma| + r * (|N| + E_t * |gamma|) + 2^-150 + half the
//     smallest subnormal.
// The golden model's own fp64 roundings add (n+4) * 2^-52 to rho, 2^-52 * |Y|
// to E_y and 3 * 2^-52 * |N| to E_norm. Where rho reaches 1 (y's error as
// large as y) the bound is infinite.
//   The fp32 sum of squares overflows where the squares are too large: below
//   (Q - dQ) * (1 - gamma(n+2)) >= 2^128 (Q finite) it is inf for sure, rstd
//   0 and norm_out zero exactly; where (Q + dQ) * (1 + gamma(n+2)) reaches the
//   largest fp32 it may be, and the row's bound is infinite.
#include "tpfuse/testing/golden_family.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "golden_parts.h"
#include "tpfuse/core/error.h"
#include "tpfuse/ops/validate.h"

namespace tpfuse::testing {

namespace {

using golden_parts::gamma;
using golden_parts::half_min_subnormal;
using golden_parts::kF32HalfMinSubnormal;
using golden_parts::kF32UnitRoundoff;
using golden_parts::kF64UnitRoundoff;
using golden_parts::load;
using golden_parts::unit_roundoff;

// One rank's call of a sequence-parallel operator as golden.cc computes it:
// the shape, and the arguments in mm_all_reduce_base's terms (x2_scale as
// the dequant scale).
struct SequenceParallelCall {
  CallShape shape;
  RankArgs args;
  std::optional<TensorView> x1_scale;
};

void check_quant_scales(const SequenceParallelOptions& options, const CallShape& shape) {
  require(options.x2_scale.has_value(),
          "x2_scale: expected an f32 or i64 tensor [n] or [1, n] on the quant path, got none");
  const TensorView& x2_scale = *options.x2_scale;
  require(x2_scale.dtype() == DType::f32 || x2_scale.dtype() == DType::i64,
          "x2_scale: expected dtype f32 or i64, got ", x2_scale.describe());
  const bool per_channel =
      (x2_scale.ndim() == 1 && x2_scale.size(0) == shape.n) ||
      (x2_scale.ndim() == 2 && x2_scale.size(0) == 1 && x2_scale.size(1) == shape.n);
  require(per_channel && x2_scale.is_contiguous(), "x2_scale: expected shape [", shape.n,
          "] or [1, ", shape.n, "], got ", x2_scale.describe());
  if (options.x1_scale) {
    const TensorView& x1_scale = *options.x1_scale;
    require(x1_scale.dtype() == DType::f32 && x1_scale.ndim() == 2 && x1_scale.size(0) == shape.m &&
                x1_scale.size(1) == 1 && x1_scale.is_contiguous(),
            "x1_scale: expected [", shape.m, ", 1] f32, got ", x1_scale.describe());
  }
}

// The output dtype of a call whose product alone would give `natural`
// (x1's dtype in plain mode, f16 with an i64 x2_scale); `choice` is whether
// output_dtype may pick f16 or bf16 (an f32 x2_scale).
DType output_dtype_of(const SequenceParallelOptions& options, DType natural, bool choice) {
  if (!options.output_dtype) return natural;
  const DType asked = *options.output_dtype;
  require(choice ? (asked == DType::f16 || asked == DType::bf16) : asked == natural,
          "output_dtype: expected ", choice ? "f16 or bf16" : dtype_name(natural), ", got ",
          dtype_name(asked));
  return asked;
}

SequenceParallelCall sequence_parallel_call(const TensorView& x1, const TensorView& x2,
                                            const SequenceParallelOptions& options) {
  require(x1.ndim() == 2, "x1: expected 2-D [m, k], got ", x1.describe());
  SequenceParallelCall call;
  call.args.x1 = x1;
  call.args.x2 = x2;
  call.args.options.bias = options.bias;
  if (x1.dtype() != DType::i8) {
    require(x2.dtype() == x1.dtype(), "x2: expected dtype ", dtype_name(x1.dtype()),
            " (same as x1), got ", x2.describe());
    require(!options.x1_scale && !options.x2_scale,
            "x1_scale, x2_scale: expected none in plain mode");
    call.shape = validate_call(x1, x2, call.args.options);
    call.shape.out_dtype = output_dtype_of(options, x1.dtype(), false);
    return call;
  }
  require(options.x2_scale.has_value(),
          "x2_scale: expected an f32 or i64 tensor [n] or [1, n] on the quant path, got none");
  // mm_all_reduce_base's full quant checks x1, x2 and the i32 bias; a
  // per-tensor i64 stand-in takes the place of x2_scale, checked here.
  call.args.options.dequant_scale = TensorView(options.x2_scale->data(), DType::i64, {1});
  call.shape = validate_call(x1, x2, call.args.options);
  check_quant_scales(options, call.shape);
  call.args.options.dequant_scale = options.x2_scale;
  call.shape.scale_kind = ScaleKind::per_channel;
  const bool f32_scale = options.x2_scale->dtype() == DType::f32;
  call.shape.out_dtype = output_dtype_of(options, f32_scale ? DType::bf16 : DType::f16, f32_scale);
  call.x1_scale = options.x1_scale;
  return call;
}

template <class Args>
std::vector<SequenceParallelCall> sequence_parallel_calls(std::span<const Args> ranks, int rank) {
  require(!ranks.empty(), "ranks: expected at least one rank's arguments, got none");
  require(rank >= 0 && static_cast<std::size_t>(rank) < ranks.size(), "rank: expected [0, ",
          ranks.size(), "), got ", rank);
  std::vector<SequenceParallelCall> calls;
  for (const Args& args : ranks) {
    calls.push_back(sequence_parallel_call(args.x1, args.x2, args.options));
  }
  return calls;
}

void check_same(const char* what, std::size_t rank, std::int64_t first, std::int64_t other) {
  if (first != other) {
    throw DisagreementError(cat("golden: rank ", rank, " has ", what, " = ", other, ", rank 0 has ",
                                first, " (every rank must pass the same)"));
  }
}

// What every rank must agree on in both sequence-parallel operators.
void check_agreement(const std::vector<SequenceParallelCall>& calls) {
  const SequenceParallelCall& first = calls[0];
  for (std::size_t r = 1; r < calls.size(); ++r) {
    const SequenceParallelCall& other = calls[r];
    check_same("x1 dtype", r, static_cast<std::int64_t>(first.shape.in_dtype),
               static_cast<std::int64_t>(other.shape.in_dtype));
    check_same("output dtype", r, static_cast<std::int64_t>(first.shape.out_dtype),
               static_cast<std::int64_t>(other.shape.out_dtype));
    check_same("m", r, first.shape.m, other.shape.m);
  }
}

}  // namespace

GoldenResult golden_all_gather_mm(std::span<const AllGatherMmArgs> ranks, int rank) {
  const std::vector<SequenceParallelCall> calls = sequence_parallel_calls(ranks, rank);
  check_agreement(calls);
  // x1_scale travels with x1: every block is scaled, or none.
  for (std::size_t r = 1; r < calls.size(); ++r) {
    check_same("k", r, calls[0].shape.k, calls[r].shape.k);
    check_same("x1_scale given", r, calls[0].x1_scale.has_value(), calls[r].x1_scale.has_value());
  }
  const SequenceParallelCall& mine = calls[static_cast<std::size_t>(rank)];
  GoldenResult result;
  result.shape = mine.shape;
  result.shape.op = pipeline::Operator::all_gather_mm;
  result.shape.m = mine.shape.m * static_cast<std::int64_t>(calls.size());
  for (const SequenceParallelCall& block : calls) {
    RankArgs args = mine.args;
    args.x1 = block.args.x1;
    const golden_parts::RankPartial part =
        golden_parts::rank_partial(args, mine.shape, block.x1_scale);
    golden_parts::append_rounded(part, mine.shape.out_dtype, result);
  }
  return result;
}

GoldenResult golden_mm_reduce_scatter(std::span<const MmReduceScatterArgs> ranks, int rank) {
  const std::vector<SequenceParallelCall> calls = sequence_parallel_calls(ranks, rank);
  check_agreement(calls);
  for (std::size_t r = 1; r < calls.size(); ++r) {
    check_same("n", r, calls[0].shape.n, calls[r].shape.n);
  }
  const auto p = static_cast<std::int64_t>(calls.size());
  const CallShape& shape = calls[0].shape;
  require(shape.m % p == 0, "x1: expected m % world_size == 0, got m = ", shape.m,
          ", world_size = ", p);
  GoldenResult full;
  golden_parts::reduce_partials(
      calls.size(), shape.out_dtype,
      [&](std::size_t r) {
        return golden_parts::rank_partial(calls[r].args, calls[r].shape, calls[r].x1_scale);
      },
      full);
  GoldenResult result;
  result.shape = shape;
  result.shape.op = pipeline::Operator::mm_reduce_scatter;
  result.shape.m = shape.m / p;
  const auto first = static_cast<std::ptrdiff_t>(rank * result.shape.m * shape.n);
  const auto count = static_cast<std::ptrdiff_t>(result.shape.m * shape.n);
  result.value.assign(full.value.begin() + first, full.value.begin() + first + count);
  result.bound.assign(full.bound.begin() + first, full.bound.begin() + first + count);
  return result;
}

namespace {

bool same_bytes(const TensorView& a, const TensorView& b) {
  return a.numel() == b.numel() && a.dtype() == b.dtype() &&
         std::memcmp(a.data(), b.data(),
                     static_cast<std::size_t>(a.numel()) * dtype_size(a.dtype())) == 0;
}

void check_norm_arguments(const AddRmsNormArgs& args, const CallShape& shape) {
  const TensorView& residual = args.residual;
  require(residual.ndim() == 3 && residual.size(0) * residual.size(1) == shape.m &&
              residual.size(2) == shape.n && residual.dtype() == shape.out_dtype &&
              residual.is_contiguous(),
          "residual: expected 3-D [b, s, ", shape.n, "] with b*s = ", shape.m, ", ",
          dtype_name(shape.out_dtype), ", got ", residual.describe());
  require(args.gamma.ndim() == 1 && args.gamma.size(0) == shape.n &&
              args.gamma.dtype() == shape.out_dtype && args.gamma.is_contiguous(),
          "gamma: expected [", shape.n, "] ", dtype_name(shape.out_dtype), ", got ",
          args.gamma.describe());
  require(args.options.epsilon > 0 && args.options.epsilon < 1,
          "epsilon: expected a value in (0, 1), got ", args.options.epsilon);
}

// The bounds of one row's norm_out from y's values and bounds (header).
void normalise_row(const double* y, const double* y_bound, const TensorView& gamma_view,
                   std::int64_t n, double epsilon, DType out, double* norm, double* norm_bound) {
  const double u = kF32UnitRoundoff;
  const double r = u + unit_roundoff(out) * (1 + u);
  const double tiny = kF32HalfMinSubnormal + half_min_subnormal(out);
  const auto count = static_cast<double>(n);
  double squares = 0;
  double squares_error = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    squares += y[j] * y[j];
    squares_error += y_bound[j] * (2 * std::fabs(y[j]) + y_bound[j]);
  }
  const double denominator = squares / count + epsilon;
  const double rho =
      gamma(count + 2) +
      (squares_error / count * (1 + gamma(count + 2)) + (count + 2) * kF32HalfMinSubnormal) /
          denominator +
      (count + 4) * kF64UnitRoundoff;
  const double low_squares = (squares - squares_error) * (1 - gamma(count + 2));
  const double high_squares = (squares + squares_error) * (1 + gamma(count + 2));
  if (std::isfinite(squares) && low_squares >= std::ldexp(1.0, 128)) {
    for (std::int64_t j = 0; j < n; ++j) {
      norm[j] = 0 * load(gamma_view, j);
      norm_bound[j] = 0;
    }
    return;
  }
  const double rstd = 1 / std::sqrt(denominator);
  double sigma = std::numeric_limits<double>::infinity();
  if (rho < 1 && high_squares < std::numeric_limits<float>::max()) {
    const double s = std::sqrt(1 - rho);
    sigma = (1 + rho / (s * (1 + s))) * (1 + gamma(2)) - 1;
  }
  for (std::int64_t j = 0; j < n; ++j) {
    const double g = load(gamma_view, j);
    const double t = y[j] * rstd;
    const double a = y_bound[j] * rstd * (1 + sigma) + std::fabs(y[j]) * rstd * sigma;
    const double t_bound = a + r * (std::fabs(t) + a) + tiny;
    norm[j] = t * g;
    norm_bound[j] = t_bound * std::fabs(g) + r * (std::fabs(norm[j]) + t_bound * std::fabs(g)) +
                    tiny + 3 * kF64UnitRoundoff * std::fabs(norm[j]);
    // 0 * inf where y or gamma is zero: no bound is known either.
    if (std::isinf(sigma)) norm_bound[j] = sigma;
  }
}

}  // namespace

GoldenAddRmsNorm golden_mm_all_reduce_add_rms_norm(std::span<const AddRmsNormArgs> ranks) {
  require(!ranks.empty(), "ranks: expected at least one rank's arguments, got none");
  std::vector<RankArgs> products;
  for (const AddRmsNormArgs& args : ranks) {
    RankArgs& product = products.emplace_back();
    product.x1 = args.x1;
    product.x2 = args.x2;
    product.options.reduce_op = args.options.reduce_op;
    product.options.bias = args.options.bias;
    product.options.antiquant_scale = args.options.antiquant_scale;
    product.options.antiquant_offset = args.options.antiquant_offset;
    product.options.dequant_scale = args.options.dequant_scale;
    product.options.antiquant_group_size = args.options.antiquant_group_size;
    product.options.comm_turn = args.options.comm_turn;
  }
  const GoldenResult mm = golden_mm_all_reduce(products);
  const AddRmsNormArgs& first = ranks[0];
  for (std::size_t r = 0; r < ranks.size(); ++r) {
    check_norm_arguments(ranks[r], mm.shape);
    if (r == 0) continue;
    if (!same_bytes(ranks[r].residual, first.residual) ||
        !same_bytes(ranks[r].gamma, first.gamma)) {
      throw DisagreementError(cat("golden: rank ", r,
                                  " has another residual or gamma than rank 0 (y and norm_out "
                                  "are the same on every rank only when they are)"));
    }
    if (ranks[r].options.epsilon != first.options.epsilon) {
      throw DisagreementError(cat("golden: rank ", r, " has epsilon = ", ranks[r].options.epsilon,
                                  ", rank 0 has ", first.options.epsilon));
    }
  }

  const DType out = mm.shape.out_dtype;
  const double r = kF32UnitRoundoff + unit_roundoff(out) * (1 + kF32UnitRoundoff);
  GoldenAddRmsNorm result;
  result.y.shape = mm.shape;
  result.y.shape.op = pipeline::Operator::mm_all_reduce_add_rms_norm;
  result.y.shape.batch = first.residual.size(0);
  result.y.shape.seq = first.residual.size(1);
  result.norm_out.shape = result.y.shape;
  const std::size_t count = mm.value.size();
  result.y.value.resize(count);
  result.y.bound.resize(count);
  result.norm_out.value.resize(count);
  result.norm_out.bound.resize(count);
  for (std::size_t e = 0; e < count; ++e) {
    const double y = mm.value[e] + load(first.residual, static_cast<std::int64_t>(e));
    result.y.value[e] = y;
    result.y.bound[e] = mm.bound[e] + r * (std::fabs(y) + mm.bound[e]) + half_min_subnormal(out) +
                        kF64UnitRoundoff * std::fabs(y);
  }
  const std::int64_t n = mm.shape.n;
  for (std::int64_t i = 0; i < mm.shape.m; ++i) {
    const auto row = static_cast<std::size_t>(i * n);
    normalise_row(&result.y.value[row], &result.y.bound[row], first.gamma, n, first.options.epsilon,
                  out, &result.norm_out.value[row], &result.norm_out.bound[row]);
  }
  return result;
}

}  // namespace tpfuse::testing
