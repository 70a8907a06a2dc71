// The bf16 pair engine (pair_gemm.cc): bf16 x1 with a bf16 x2, or with an
// int8 x2 dequantized into bf16, on CPUs with AVX512-BF16.
#pragma once

#include <memory>

#include "gemm/pair_kernels.h"
#include "tpfuse/gemm/tile_gemm.h"

namespace tpfuse::gemm {

// threads >= 1.
std::unique_ptr<PreparedGemm> prepare_pair_gemm(const GemmOperands& operands,
                                                const PairKernelTable& kernels, int threads);

}  // namespace tpfuse::gemm
