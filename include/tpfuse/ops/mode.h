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
  // all_gather_base_mm and mm_reduce_scatter_base: the group's size, which
  // world_size must name. all_gather_base_mm: the GEMM's rows are
  // world_size * m, gathered; n may differ between ranks.
  std::int64_t world_size = 0;
  bool gather_output = true;
  // Their quant path: x1_scale, a per-row (per-token) scale, was given.
  bool has_row_scale = false;
  // mm_all_reduce_add_rms_norm: the norm's epsilon, as the fp32 it runs with.
  float epsilon = 0;
};

// The rows of the call's GEMM: the gathered rows for all_gather_base_mm,
// else m.
inline std::int64_t gemm_rows(const CallShape& shape) {
  return shape.op == pipeline::Operator::all_gather_mm ? shape.world_size * shape.m : shape.m;
}

}  // namespace tpfuse
