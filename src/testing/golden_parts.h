// The pieces of the golden model that its operators share: one rank's exact
// partial product with its error before the rounding to the output dtype,
// the reduce of the ranks' partials as the contract does it, and the unit
// roundoffs the bounds are built from. golden.cc derives the bounds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "tpfuse/core/tensor.h"
#include "tpfuse/ops/mode.h"
#include "tpfuse/testing/golden.h"

namespace tpfuse::testing::golden_parts {

inline constexpr double kF32UnitRoundoff = 0x1p-24;
inline constexpr double kF32HalfMinSubnormal = 0x1p-150;
inline constexpr double kF64UnitRoundoff = 0x1p-52;

// gamma(n) = n*u / (1 - n*u), u the fp32 unit roundoff (Higham, ch. 3).
double gamma(double n);
// The output dtype's unit roundoff: 2^-11 (f16), 2^-8 (bf16), 2^-24 (f32).
double unit_roundoff(DType out);
// Half the output dtype's smallest subnormal: what a rounding may lose below it.
double half_min_subnormal(DType out);

// Element `index` (in elements from data()) of any dtype, as fp64.
double load(const TensorView& view, std::int64_t index);

// One rank's exact partial and its error before the rounding to the output
// dtype, per element of [m, n]; `slack` is the golden model's own fp64 error.
struct RankPartial {
  std::vector<double> value, error, slack;
};

// The partial of `args` for the shape validation gave it. In full quant the
// dequant scale may be f32, bf16 or packed i64, and `row_scale` ([m, 1] f32,
// the per-token x1_scale of the sequence-parallel operators) multiplies row
// i's scale when given.
RankPartial rank_partial(const RankArgs& args, const CallShape& s,
                         const std::optional<TensorView>& row_scale = std::nullopt);

// Sums the partials of `ranks` ranks (partial(r) is rank r's) as the contract
// does: each rounded to `out`, summed in fp32 in rank order, rounded once more.
// Fills result.value and result.bound.
void reduce_partials(std::size_t ranks, DType out,
                     const std::function<RankPartial(std::size_t)>& partial, GoldenResult& result);

// One partial rounded once to `out`, with no reduce: appends its values and
// bounds to result.value and result.bound.
void append_rounded(const RankPartial& part, DType out, GoldenResult& result);

}  // namespace tpfuse::testing::golden_parts
