// The facts validation derives from a call: the GEMM it asks for (modes and
// scale layouts are the GEMM layer's, gemm/problem.h) and what only the
// call has.
#pragma once

#include <cstdint>

#include "tpfuse/gemm/problem.h"
#include "tpfuse/pipeline/plan.h"

namespace tpfuse {

// Everything validation learned about one rank's call.
struct CallShape : GemmProblem {
  pipeline::Operator op = pipeline::Operator::mm_all_reduce;
  std::int64_t batch = 0;  // b for a 3-D x1, 0 for 2-D
  std::int64_t seq = 0;    // s for a 3-D x1, 0 for 2-D
  std::int64_t comm_turn = 0;
};

}  // namespace tpfuse
