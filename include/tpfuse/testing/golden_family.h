// The golden model of the rest of the family (docs/SEMANTICS-FAMILY.md):
// all_gather_base_mm, mm_reduce_scatter_base and mm_all_reduce_add_rms_norm,
// in fp64 from every rank's arguments, each output element with the largest
// error the contract's roundings allow (as golden_mm_all_reduce, golden.h).
// An output is correct when compare(out, golden).ok().
#pragma once

#include <span>

#include "tpfuse/core/tensor.h"
#include "tpfuse/ops/family.h"
#include "tpfuse/testing/golden.h"

namespace tpfuse::testing {

// One rank's arguments to each operator.
struct AllGatherMmArgs {
  TensorView x1;
  TensorView x2;
  AllGatherMmOptions options;
};

struct MmReduceScatterArgs {
  TensorView x1;
  TensorView x2;
  MmReduceScatterOptions options;
};

struct AddRmsNormArgs {
  TensorView x1;
  TensorView x2;
  TensorView residual;
  TensorView gamma;
  MmAllReduceAddRmsNormOptions options;
};

// Rank `rank`'s `output` ([p*m, n], its own n): every rank's x1 in rank
// order times this rank's x2, plus its bias, each row block rounded once.
// Checks what the computation needs of each rank's arguments (dtypes, shapes
// of x1, x2, bias and the scales), that m, k and the dtypes agree, and that
// x1_scale (gathered with x1) is given on every rank or on none.
GoldenResult golden_all_gather_mm(std::span<const AllGatherMmArgs> ranks, int rank);

// Rank `rank`'s `output`: rows [rank*m/p, (rank+1)*m/p) of the partials'
// reduce, which is the reduce of golden_mm_all_reduce (each partial rounded,
// summed in fp32 in rank order, rounded once more). m, n and the dtypes must
// agree, and m be a multiple of p. Each rank's x1_scale scales its own
// partial, so some ranks may give one and others not.
GoldenResult golden_mm_reduce_scatter(std::span<const MmReduceScatterArgs> ranks, int rank);

// y and norm_out, the same on every rank. Besides mm_all_reduce_base's rules
// (golden_mm_all_reduce validates the product's arguments), residual and
// gamma must hold the same values on every rank, and epsilon be the same.
struct GoldenAddRmsNorm {
  GoldenResult y;
  GoldenResult norm_out;
};
GoldenAddRmsNorm golden_mm_all_reduce_add_rms_norm(std::span<const AddRmsNormArgs> ranks);

}  // namespace tpfuse::testing
