// Engine selection with the instruction-set level given, so that tests can
// run every engine at every level this CPU supports in one process.
// prepare_gemm() is prepare_gemm_for_isa(operands, active_isa()).
#pragma once

#include <memory>

#include "core/cpu_isa.h"
#include "tpfuse/gemm/tile_gemm.h"

namespace tpfuse::gemm {

enum class Engine { float_kernels, pairs, onednn };

struct EngineChoice {
  Engine engine;
  const char* why;  // the rule that chose it, for benchmarks and logs
};

// The engine a call gets at this level, and why (prepare_gemm.cc).
EngineChoice choose_engine(const GemmOperands& operands, IsaLevel level);

std::unique_ptr<PreparedGemm> prepare_gemm_for_isa(const GemmOperands& operands, IsaLevel level);
std::shared_ptr<const PackedX2> pack_x2_for_isa(const GemmOperands& operands, IsaLevel level);

}  // namespace tpfuse::gemm
