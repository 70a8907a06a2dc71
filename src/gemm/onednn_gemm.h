// The oneDNN engines: bf16 plain (AVX512-BF16) and int8 full quant
// (AVX512-VNNI), each a oneDNN matmul into fp32 / int32 sums, finished by
// tpfuse's own epilogue (bias, dequant scale, x3, rounding as half.h).
#pragma once

#include <memory>

#include "gemm/microkernel.h"
#include "tpfuse/gemm/tile_gemm.h"

namespace tpfuse::gemm {

// operands.shape is bf16 plain or full quant; threads >= 1; kernels supplies
// the epilogue.
std::unique_ptr<PreparedGemm> prepare_onednn_gemm(const GemmOperands& operands,
                                                  const KernelTable& kernels, int threads);

}  // namespace tpfuse::gemm
