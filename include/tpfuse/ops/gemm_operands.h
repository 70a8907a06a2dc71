// The GEMM operands of a validated call: built here, and only here, for the
// operator, a packed weight and the tools alike.
#pragma once

#include "tpfuse/gemm/tile_gemm.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/ops/mode.h"

namespace tpfuse {

// x1 viewed as [m, k] (a 3-D x1 flattened); x2 as validated, with the
// canonical strides of its layout; the options' bias, x3 (as [m, n]) and
// the scale and offset of the mode.
gemm::GemmOperands make_gemm_operands(const CallShape& shape, const TensorView& x1,
                                      const TensorView& x2, const MmAllReduceOptions& options);

}  // namespace tpfuse
