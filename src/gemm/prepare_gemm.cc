// Engine selection: the one place that decides which engine computes a call.
#include "gemm/reference_gemm.h"
#include "tpfuse/gemm/tile_gemm.h"

namespace tpfuse::gemm {

std::unique_ptr<PreparedGemm> prepare_gemm(const GemmOperands& operands) {
  return prepare_reference_gemm(operands);
}

}  // namespace tpfuse::gemm
