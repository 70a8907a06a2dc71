// The fp32 engine: tpfuse's own micro-kernels (kernels-inl.h) for the modes
// no library covers on every CPU: f16 plain, weight-only int8 (f16 or bf16
// activations), and bf16 plain and int8 full quant where oneDNN has no bf16
// or VNNI kernel.
#pragma once

#include <memory>

#include "gemm/microkernel.h"
#include "tpfuse/gemm/tile_gemm.h"

namespace tpfuse::gemm {

// True when this engine would read x2 where it lies, without converting or
// copying it (few rows: decode). It then beats any engine that reorders x2
// first, whatever that engine's kernel.
bool float_gemm_reads_x2_in_place(const GemmOperands& operands);

// threads >= 1.
std::unique_ptr<PreparedGemm> prepare_float_gemm(const GemmOperands& operands,
                                                 const KernelTable& kernels, int threads);

}  // namespace tpfuse::gemm
