// The golden model: a plain scalar implementation of the whole operator, for
// all modes, accumulating in fp64, used by the tests and the CLI's checks.
//
// Besides the fp64 value of every output element it returns the largest error
// the contract's numerics allow for that element (fp32 accumulation, rounding
// of each rank's partial to the output dtype, fp32 reduce in rank order, final
// rounding), derived per element from the magnitudes involved. An output is
// correct when |out - value| <= bound everywhere.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "tpfuse/core/tensor.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/ops/mode.h"

namespace tpfuse::testing {

// One rank's arguments to the operator.
struct RankArgs {
  TensorView x1;
  TensorView x2;
  MmAllReduceOptions options;
};

struct GoldenResult {
  CallShape shape;            // of rank 0's call
  std::vector<double> value;  // m * n, row-major
  std::vector<double> bound;  // m * n, allowed |error| per element
};

// Computes the reduced output of all ranks' calls (ranks[r] is rank r's).
// Validates each rank's arguments first.
GoldenResult golden_mm_all_reduce(std::span<const RankArgs> ranks);

struct Comparison {
  double max_abs_error = 0;   // largest |out - value| over finite elements
  double max_bound = 0;       // the bound at that element
  double worst_ratio = 0;     // max over elements of |out - value| / bound
  std::int64_t mismatches = 0;  // elements beyond their bound (NaN/inf must match exactly)
  bool ok() const { return mismatches == 0; }
};

// Compares an output tensor (f16, bf16 or f32, m*n elements) to the golden result.
Comparison compare(const TensorView& out, const GoldenResult& golden);

}  // namespace tpfuse::testing
