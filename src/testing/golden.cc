// The golden model: every rank's partial in fp64 straight from the
// definitions in docs/SEMANTICS.md, their exact sum, and per element the largest
// error the contract's numerics allow.
//
// Derivation of the bound (Higham, "Accuracy and Stability of Numerical
// Algorithms", ch. 3). With u = 2^-24 (fp32) and gamma(n) = n*u / (1 - n*u),
// a sum of k fp32 products in any order, each product rounded, is within
// gamma(k) * S of the exact sum, S = sum_l |x1_il * w_lj|. Per rank r:
//   plain / weight quant: the weight may be rounded twice on its way to fp32
//     ((x2 + offset) then * scale) and the product once more, so the
//     accumulation is within gamma(k+3) * S. Adding bias and then x3 in fp32
//     rounds twice more: 2u * (S + |bias| + |x3|), plus second-order terms
//     the extra gamma slack covers.
//   full quant: the int32 sum (wrapped two's complement, as the device's int32
//     sum is) is exact; converting it to fp32, multiplying by the fp32 scale
//     and adding x3 round three times: gamma(3) * (|acc * scale| + |x3|).
//     The sequence-parallel operators (golden_family.h) have no x3 but a
//     per-token x1_scale: the product of the two scales is rounded instead,
//     still three roundings, and its underflow costs 2^-150 * |acc| more.
//   Every fp32 operation can also lose up to half the smallest fp32 subnormal
//   (2^-150) when its result underflows: (operations) * 2^-150, absolute.
//   With bf16 x1 the engine may be AVX512-BF16's dot product, which flushes
//   a subnormal fp32 sum to zero: up to 2^-126 per step, k * 2^-126. And in
//   weight-only mode it multiplies the weight dequantized into bf16, one more
//   rounding of each weight: u_bf16 = 2^-8 of |w|, so u_bf16 * S more.
// The operands are the contract's (docs/SEMANTICS.md, numerics): a bf16
// subnormal in x1 or a plain x2 counts as zero, and so does a dequantized
// weight below 2^-126 in magnitude (its fp32 value, as the engines compute
// it); the model zeroes them before it multiplies.
// The partial is then rounded to the output dtype (unit roundoff u_out = 2^-11
// for f16, 2^-8 for bf16): u_out * (|part| + its error) + half the output
// dtype's smallest subnormal. The p rounded partials, each at most
// |part_r| + error_r in magnitude, are summed in fp32 in rank order:
// gamma(p-1) * sum_r (|part_r| + error_r) (+ (p-1) * 2^-150). The sum is
// rounded once more to the output dtype: u_out * (|value| + error so far) +
// half the smallest subnormal. Last, the golden model's own fp64 rounding:
// (k+3) * 2^-52 * (S + |bias| + |x3|) per rank plus 2^-52 per rank of the
// running sum. The bound assumes no result overflows the output dtype.
#include "tpfuse/testing/golden.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "golden_parts.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/ops/quant_param.h"
#include "tpfuse/ops/validate.h"

namespace tpfuse::testing {

namespace golden_parts {

double gamma(double n) { return n * kF32UnitRoundoff / (1 - n * kF32UnitRoundoff); }

double unit_roundoff(DType out) {
  switch (out) {
    case DType::f16:
      return 0x1p-11;
    case DType::bf16:
      return 0x1p-8;
    default:
      return kF32UnitRoundoff;
  }
}

double half_min_subnormal(DType out) {
  switch (out) {
    case DType::f16:
      return 0x1p-25;
    case DType::bf16:
      return 0x1p-134;
    default:
      return kF32HalfMinSubnormal;
  }
}

double load(const TensorView& view, std::int64_t index) {
  switch (view.dtype()) {
    case DType::f16:
      return f16_to_f32(view.data_as<const Half>()[index]);
    case DType::bf16:
      return bf16_to_f32(view.data_as<const BFloat16>()[index]);
    case DType::f32:
      return view.data_as<const float>()[index];
    case DType::i8:
      return view.data_as<const std::int8_t>()[index];
    case DType::i32:
      return view.data_as<const std::int32_t>()[index];
    case DType::i64:
      return static_cast<double>(view.data_as<const std::int64_t>()[index]);
  }
  throw InternalError("golden: unknown dtype");
}

namespace {

constexpr double kF32MinNormal = 0x1p-126;

// Element `index` of a GEMM operand (x1, or a plain x2), as fp64: a bf16
// subnormal counts as zero.
double load_operand(const TensorView& view, std::int64_t index) {
  if (view.dtype() == DType::bf16) return bf16_operand_to_f32(view.data_as<const BFloat16>()[index]);
  return load(view, index);
}

// The fp32 dequant scale of output column j in full quant.
double dequant_scale_at(const TensorView& scale, ScaleKind kind, std::int64_t j) {
  const std::int64_t index = kind == ScaleKind::per_tensor ? 0 : j;
  if (scale.dtype() == DType::i64) {
    return unpack_quant_scale(scale.data_as<const std::int64_t>()[index]);
  }
  return load(scale, index);
}

// The weight matrix [k, n] as the contract defines it, read through x2's
// strides: x2 itself (plain), (x2 + offset) * scale (weight quant), or the
// int8 values (full quant).
std::vector<double> weights(const CallShape& s, const TensorView& x2,
                            const MmAllReduceOptions& options) {
  std::vector<double> w(static_cast<std::size_t>(s.k * s.n));
  for (std::int64_t l = 0; l < s.k; ++l) {
    for (std::int64_t j = 0; j < s.n; ++j) {
      const std::int64_t at = l * x2.stride(0) + j * x2.stride(1);
      double value = s.mode == Mode::plain ? load_operand(x2, at) : load(x2, at);
      if (s.mode == Mode::weight_quant) {
        std::int64_t index = 0;
        if (s.scale_kind == ScaleKind::per_channel) index = j;
        if (s.scale_kind == ScaleKind::per_group) index = (l / s.group_size) * s.n + j;
        const double offset = options.antiquant_offset ? load(*options.antiquant_offset, index) : 0.0;
        const double scale = load(*options.antiquant_scale, index);
        // Flushed as the engines decide it, on the fp32 value they compute.
        const float in_f32 = (static_cast<float>(value) + static_cast<float>(offset)) * static_cast<float>(scale);
        value = std::fabs(in_f32) < kF32MinNormal ? 0.0 : (value + offset) * scale;
      }
      w[static_cast<std::size_t>(l * s.n + j)] = value;
    }
  }
  return w;
}

}  // namespace

RankPartial rank_partial(const RankArgs& args, const CallShape& s,
                         const std::optional<TensorView>& row_scale) {
  const std::vector<double> w = weights(s, args.x2, args.options);
  const auto& bias = args.options.bias;
  const auto& x3 = args.options.x3;
  const auto k = static_cast<double>(s.k);
  RankPartial part;
  const auto count = static_cast<std::size_t>(s.m * s.n);
  part.value.resize(count);
  part.error.resize(count);
  part.slack.resize(count);
  for (std::int64_t i = 0; i < s.m; ++i) {
    for (std::int64_t j = 0; j < s.n; ++j) {
      double acc = 0;
      double magnitude = 0;
      for (std::int64_t l = 0; l < s.k; ++l) {
        const double product =
            load_operand(args.x1, i * s.k + l) * w[static_cast<std::size_t>(l * s.n + j)];
        acc += product;
        magnitude += std::fabs(product);
      }
      const double b = bias ? load(*bias, j) : 0.0;
      const double add = x3 ? load(*x3, i * s.n + j) : 0.0;
      const auto e = static_cast<std::size_t>(i * s.n + j);
      if (s.mode == Mode::full_quant) {
        // acc and bias are exact integers (|acc| < 2^31 for k <= 65535).
        const auto sum = static_cast<std::uint64_t>(static_cast<std::int64_t>(acc) +
                                                    static_cast<std::int64_t>(b));
        const auto wrapped = static_cast<std::int32_t>(static_cast<std::uint32_t>(sum));
        const double row = row_scale ? load(*row_scale, i) : 1.0;
        const double scaled =
            wrapped * (row * dequant_scale_at(*args.options.dequant_scale, s.scale_kind, j));
        part.value[e] = scaled + add;
        part.error[e] = gamma(3) * (std::fabs(scaled) + std::fabs(add)) + 3 * kF32HalfMinSubnormal;
        // The product of the two scales may underflow in fp32 before it meets the sum.
        if (row_scale)
          part.error[e] += kF32HalfMinSubnormal * std::fabs(static_cast<double>(wrapped));
        part.slack[e] = 2 * kF64UnitRoundoff * (std::fabs(scaled) + std::fabs(add));
      } else {
        const double others = magnitude + std::fabs(b) + std::fabs(add);
        part.value[e] = acc + b + add;
        part.error[e] = gamma(k + 3) * magnitude + 2 * kF32UnitRoundoff * others +
                        (k + 5) * kF32HalfMinSubnormal;
        if (s.in_dtype == DType::bf16) {
          part.error[e] += k * kF32MinNormal;
          if (s.mode == Mode::weight_quant) part.error[e] += 0x1p-8 * magnitude;
        }
        part.slack[e] = (k + 3) * kF64UnitRoundoff * others;
      }
    }
  }
  return part;
}

void reduce_partials(std::size_t ranks, DType out,
                     const std::function<RankPartial(std::size_t)>& partial, GoldenResult& result) {
  const double u_out = unit_roundoff(out);
  const double tiny_out = half_min_subnormal(out);
  std::vector<double> error, magnitude, slack;
  for (std::size_t r = 0; r < ranks; ++r) {
    const RankPartial part = partial(r);
    const std::size_t count = part.value.size();
    if (r == 0) {
      result.value.assign(count, 0.0);
      error.assign(count, 0.0);
      magnitude.assign(count, 0.0);
      slack.assign(count, 0.0);
    }
    for (std::size_t e = 0; e < count; ++e) {
      const double rounding = u_out * (std::fabs(part.value[e]) + part.error[e]) + tiny_out;
      const double rank_error = part.error[e] + rounding;
      result.value[e] += part.value[e];
      error[e] += rank_error;
      magnitude[e] += std::fabs(part.value[e]) + rank_error;
      slack[e] += part.slack[e] + kF64UnitRoundoff * std::fabs(result.value[e]);
    }
  }
  const auto p = static_cast<double>(ranks);
  result.bound.resize(result.value.size());
  for (std::size_t e = 0; e < result.value.size(); ++e) {
    const double reduced = error[e] + gamma(p - 1) * magnitude[e] + (p - 1) * kF32HalfMinSubnormal;
    const double final_rounding = u_out * (std::fabs(result.value[e]) + reduced) + tiny_out;
    result.bound[e] = reduced + final_rounding + slack[e];
  }
}

void append_rounded(const RankPartial& part, DType out, GoldenResult& result) {
  const double u_out = unit_roundoff(out);
  const double tiny_out = half_min_subnormal(out);
  for (std::size_t e = 0; e < part.value.size(); ++e) {
    const double rounding = u_out * (std::fabs(part.value[e]) + part.error[e]) + tiny_out;
    result.value.push_back(part.value[e]);
    result.bound.push_back(part.error[e] + rounding + part.slack[e]);
  }
}

}  // namespace golden_parts

namespace {

using golden_parts::load;

// The fields every rank must agree on for the sum to be defined.
void check_agreement(const CallShape& first, const CallShape& other, std::size_t rank) {
  const auto differs = [&](const char* what, std::int64_t a, std::int64_t b) {
    if (a != b) {
      throw DisagreementError(cat("golden: rank ", rank, " has ", what, " = ", b, ", rank 0 has ",
                                  a, " (every rank must pass the same)"));
    }
  };
  differs("mode", static_cast<std::int64_t>(first.mode), static_cast<std::int64_t>(other.mode));
  differs("output dtype", static_cast<std::int64_t>(first.out_dtype),
          static_cast<std::int64_t>(other.out_dtype));
  differs("m", first.m, other.m);
  differs("b", first.batch, other.batch);
  differs("s", first.seq, other.seq);
  differs("n", first.n, other.n);
  differs("comm_turn", first.comm_turn, other.comm_turn);
}

}  // namespace

GoldenResult golden_mm_all_reduce(std::span<const RankArgs> ranks) {
  require(!ranks.empty(), "ranks: expected at least one rank's arguments, got none");
  std::vector<CallShape> shapes;
  for (const RankArgs& args : ranks)
    shapes.push_back(validate_call(args.x1, args.x2, args.options));
  for (std::size_t r = 1; r < shapes.size(); ++r) check_agreement(shapes[0], shapes[r], r);

  GoldenResult result;
  result.shape = shapes[0];
  golden_parts::reduce_partials(
      ranks.size(), result.shape.out_dtype,
      [&](std::size_t r) { return golden_parts::rank_partial(ranks[r], shapes[r]); }, result);
  return result;
}

Comparison compare(const TensorView& out, const GoldenResult& golden) {
  const DType dtype = out.dtype();
  require(dtype == DType::f16 || dtype == DType::bf16 || dtype == DType::f32,
          "out: expected dtype f16, bf16 or f32, got ", dtype_name(dtype));
  require(out.is_contiguous(), "out: expected a contiguous tensor, got ", out.describe());
  require(out.numel() == static_cast<std::int64_t>(golden.value.size()), "out: expected ",
          golden.value.size(), " elements (m * n), got ", out.describe());
  Comparison result;
  constexpr double kInfinity = std::numeric_limits<double>::infinity();
  for (std::size_t e = 0; e < golden.value.size(); ++e) {
    const double got = load(out, static_cast<std::int64_t>(e));
    const double want = golden.value[e];
    const double bound = golden.bound[e];
    if (!std::isfinite(want) || !std::isfinite(got)) {
      const bool same = std::isnan(want) ? std::isnan(got) : got == want;
      if (!same) {
        ++result.mismatches;
        result.worst_ratio = kInfinity;
      }
      continue;
    }
    const double error = std::fabs(got - want);
    const double ratio = error == 0 ? 0.0 : (bound > 0 ? error / bound : kInfinity);
    if (error > result.max_abs_error) {
      result.max_abs_error = error;
      result.max_bound = bound;
    }
    result.worst_ratio = std::max(result.worst_ratio, ratio);
    if (error > bound) ++result.mismatches;
  }
  return result;
}

}  // namespace tpfuse::testing
