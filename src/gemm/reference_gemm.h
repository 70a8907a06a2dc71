// The reference engine: a clean row-by-row loop with fp32 (int32) accumulation,
// correct for every mode and every CPU. Faster engines are checked against it.
#pragma once

#include <memory>

#include "tpfuse/gemm/tile_gemm.h"

namespace tpfuse::gemm {

std::unique_ptr<PreparedGemm> prepare_reference_gemm(const GemmOperands& operands);

}  // namespace tpfuse::gemm
