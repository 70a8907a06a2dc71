// The path every operator's call takes: validate -> agree across ranks in the
// call's first round -> plan the tiles -> run the operator's schedule (the
// pipeline folder has the planner and the executor; ops/agreement.h the
// agreement). An operator says only what is its own: its rules, its GEMM's
// operands, its outputs and its schedule's stages.
#pragma once

#include <memory>
#include <optional>
#include <string_view>

#include "pipeline/executor.h"
#include "tpfuse/comm/communicator.h"
#include "tpfuse/core/tensor.h"
#include "tpfuse/gemm/tile_gemm.h"
#include "tpfuse/ops/explain.h"
#include "tpfuse/ops/mode.h"
#include "tpfuse/pipeline/plan.h"

namespace tpfuse {

// How this rank runs a call: who advances the collectives, and its threads.
struct RunSetup {
  pipeline::ProgressMode progress = pipeline::ProgressMode::interleaved;
  int gemm_threads = 1;
};

class OperatorCall {
 public:
  virtual ~OperatorCall() = default;
  // The call's name in messages and traces ("all_gather_base_mm").
  virtual const char* name() const = 0;
  // Checks this rank's arguments (InvalidArgument) on a group of this size.
  virtual CallShape validate(int group_size) const = 0;
  // Once validation passed on this rank: the outputs it returns, made, and
  // its scratch memory (CallScratch, kept on `comm` between calls).
  virtual void make_outputs(const CallShape& shape, const comm::Communicator& comm) {
    (void)shape, (void)comm;
  }
  // The GEMM's operands (a packed weight's packing included).
  virtual gemm::GemmOperands operands(const CallShape& shape) const = 0;
  // The schedule of GEMM then all-reduce, whose one tile may travel in the
  // call's first round: its job; nullopt for the other schedules.
  virtual std::optional<pipeline::TileJob> all_reduce_job(const CallShape& shape,
                                                          const gemm::PreparedGemm& gemm,
                                                          comm::Communicator& comm,
                                                          const RunSetup& setup) {
    (void)shape, (void)gemm, (void)comm, (void)setup;
    return std::nullopt;
  }
  // The other schedules' stages, for the tiles of `plan`.
  virtual std::unique_ptr<pipeline::TileStages> stages(const CallShape& shape,
                                                       const gemm::PreparedGemm& gemm,
                                                       comm::Communicator& comm,
                                                       const RunSetup& setup,
                                                       const pipeline::TilePlan& plan) {
    (void)shape, (void)gemm, (void)comm, (void)setup, (void)plan;
    return nullptr;
  }
};

// Memory a call needs only while it runs (a reduce-scatter's partial rows, a
// gather nobody keeps), kept on the communicator from call to call: a
// prefill call's 16 MiB allocated anew would cost each call its page faults
// (about 1.5% of a 2048x4096x4096 bf16 call on one core). Calls on one
// communicator never overlap (ExclusiveUse), so one set serves them all.
class CallScratch {
 public:
  // `bytes` of slot `slot` (0 or 1), 64-byte aligned; what it held before
  // is lost once a larger size is asked for.
  void* get(std::size_t slot, std::size_t bytes);

 private:
  Tensor slots_[2];
};

// The job of the GEMM-then-all-reduce schedule for a call whose reduced
// rows land in `out` (the test hooks' tile callback included).
pipeline::TileJob all_reduce_job_into(void* out, const CallShape& shape,
                                      const gemm::PreparedGemm& gemm, comm::Communicator& comm,
                                      const RunSetup& setup);

// Runs `call` on the group `hcom` (collective); `operation` names it in the
// trace ("mm_all_reduce_base_out").
void run_operator_call(OperatorCall& call, std::string_view hcom, const char* operation);

// The plan `call` would run with on `comm` (collective; see explain.h).
CallExplanation explain_operator_call(const OperatorCall& call, comm::Communicator& comm);

}  // namespace tpfuse
