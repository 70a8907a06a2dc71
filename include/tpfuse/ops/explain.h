// How the operator would run a call, for tools that print it (tpfuse plan):
// the same validation, thread budget, GEMM operands, combined facts and
// planner as mm_all_reduce_base, so that what they print is what runs.
#pragma once

#include <string>

#include "tpfuse/comm/communicator.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/ops/mode.h"
#include "tpfuse/pipeline/plan.h"

namespace tpfuse {

struct CallExplanation {
  CallShape shape;
  pipeline::ProgressMode progress = pipeline::ProgressMode::interleaved;
  pipeline::PlanRequest request;      // with the facts combined across ranks
  pipeline::CostConstants constants;  // measured for it on this communicator
  pipeline::TilePlan plan;
  std::string engine;  // the GEMM engine this rank runs
};

// Collective, like the operator: every rank of `comm` calls it with its own
// arguments. An invalid call is this rank's InvalidArgument (its peers then
// wait, bounded, for it); the plan is the one mm_all_reduce_base runs on
// this communicator (its constants measured here when not yet cached).
CallExplanation explain_mm_all_reduce_base(const TensorView& x1, const TensorView& x2,
                                           comm::Communicator& comm,
                                           const MmAllReduceOptions& options = {});

}  // namespace tpfuse
