// The operator: validate -> agree across ranks -> plan the tiles along M ->
// run them (a call seen before may run first and be checked after; see
// ops/agreement.h), each tile's all-reduce overlapping the next tiles' GEMM (the
// pipeline folder has the planner and the executor).
#include "tpfuse/ops/mm_all_reduce_base.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "ops/agreement.h"
#include "ops/gemm_operands.h"
#include "pipeline/executor.h"
#include "ops/test_hooks.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"
#include "tpfuse/gemm/tile_gemm.h"
#include "tpfuse/pipeline/plan.h"
#include "tpfuse/ops/packed_weight.h"
#include "tpfuse/ops/validate.h"

namespace tpfuse {

namespace {

std::vector<std::int64_t> output_shape(const CallShape& s) {
  if (s.batch > 0) return {s.batch, s.seq, s.n};
  return {s.m, s.n};
}

// This rank's call, validated here, and how this rank would run it.
struct LocalCall {
  std::optional<CallShape> shape;  // nullopt when validation failed
  std::string error;               // why it failed
  pipeline::ProgressMode progress = pipeline::ProgressMode::interleaved;
  int gemm_threads = 1;
  RankFacts mine;
};

LocalCall validate_locally(const TensorView& x1, const TensorView& x2, const PackedWeight* packed,
                           const MmAllReduceOptions& options, const TensorView* out,
                           const comm::Communicator& comm) {
  LocalCall call;
  try {
    // A packed weight names the x1 dtype and scales it was made for first:
    // clearer than what they break in the call's rules.
    if (packed != nullptr) packed->check_call(x1, options);
    call.shape = validate_call(x1, x2, options);
    if (out != nullptr) validate_out(*call.shape, *out, x1, x2, options);
  } catch (const InvalidArgument& e) {
    call.shape.reset();
    call.error = e.what();
  }
  call.progress = pipeline::progress_mode_for(comm);
  // The ranks on this host share its cores.
  const pipeline::ThreadBudget budget =
      pipeline::thread_budget(call.progress, comm.ranks_on_host());
  call.gemm_threads = budget.gemm_threads;
  call.mine = {call.shape ? call.shape->k : 0, budget.gemm_threads, budget.reduce_has_own_core};
  return call;
}

pipeline::PlanRequest request_for(const CallShape& shape, const RankFacts& agreed) {
  pipeline::PlanRequest request =
      pipeline::make_request(shape, agreed.threads, agreed.reduce_has_own_core);
  request.k = agreed.k;
  return request;
}

// A run before hearing the peers: the combination of facts agreed for the
// same proposal before, and the one-tile plan it gives.
struct RunAhead {
  RankFacts assumed;
  pipeline::TilePlan plan;
};

// The run this rank may make before hearing its peers: one tile, planned
// from the combination agreed for the same proposal before, and small enough
// that the transport completes its all-reduce even if the peers' differ.
std::optional<RunAhead> run_ahead_for(const LocalCall& call, const comm::Communicator& comm) {
  if (!call.shape) return std::nullopt;
  const CallShape& shape = *call.shape;
  const double bytes = static_cast<double>(shape.m) * static_cast<double>(shape.n) *
                       static_cast<double>(dtype_size(shape.out_dtype));
  if (bytes > static_cast<double>(comm.max_mismatch_safe_reduce_bytes())) return std::nullopt;
  const auto assumed = remembered_agreement(comm, shape, call.mine);
  if (!assumed) return std::nullopt;
  auto plan = pipeline::cached_plan(comm, request_for(shape, *assumed));
  if (!plan || plan->tile_rows.size() != 1) return std::nullopt;
  return RunAhead{*assumed, std::move(*plan)};
}

// The call's GEMM, prepared. It is prepared once the peers may be waiting
// for this rank's tiles, so a failure (memory for the packed weight) aborts
// the communicator: they fail at once rather than at their deadline.
std::unique_ptr<gemm::PreparedGemm> prepare(const LocalCall& call, const TensorView& x1,
                                             const TensorView& x2, const PackedWeight* packed,
                                             const MmAllReduceOptions& options,
                                             comm::Communicator& comm) {
  gemm::GemmOperands operands = make_gemm_operands(*call.shape, x1, x2, options);
  operands.threads = call.gemm_threads;
  operands.packed = packed != nullptr ? packed->packing() : nullptr;
  try {
    return gemm::prepare_gemm(operands);
  } catch (const std::exception& error) {
    comm.abort(cat("rank ", comm.rank(), " could not prepare its GEMM: ", error.what()));
    throw;
  }
}

void run_plan(const pipeline::TilePlan& plan, const LocalCall& call,
              const gemm::PreparedGemm& gemm, const TensorView& out, comm::Communicator& comm) {
  const CallShape& shape = *call.shape;
  pipeline::TileJob job;
  job.gemm = &gemm;
  job.comm = &comm;
  job.n = shape.n;
  job.dtype = shape.out_dtype;
  job.out = out.data();
  job.progress = call.progress;
  job.after_tile_computed = test_hooks::after_tile_computed;
  log::debug("mm_all_reduce_base: m=", shape.m, " k=", shape.k, " n=", shape.n, " mode=",
             mode_name(shape.mode), " tiles=", plan.tile_rows.size(), " engine=", gemm.engine());
  pipeline::execute_plan(plan, job);
}

// Enters the all-reduce that a peer which ran ahead entered, with zeros: the
// round completes on every rank, and its result is discarded.
void join_round(comm::Communicator& comm, std::size_t count, DType dtype) {
  comm::ReduceBuffer buffer = comm.acquire_reduce_buffer(count, dtype);
  std::memset(buffer.data, 0, count * dtype_size(dtype));
  std::vector<std::byte> discarded(count * dtype_size(dtype));
  comm.all_reduce_start(std::move(buffer), discarded.data())->wait();
}

// Agrees with the peers (one all_gather), running ahead where this rank may,
// and runs the call into `out` (null only when validation failed here).
void agree_and_run(const LocalCall& call, const TensorView& x1, const TensorView& x2,
                   const PackedWeight* packed, const MmAllReduceOptions& options,
                   const TensorView* out, comm::Communicator& comm) {
  const auto ahead = run_ahead_for(call, comm);
  const std::optional<RankFacts> assumed =
      ahead ? std::optional<RankFacts>(ahead->assumed) : std::nullopt;
  auto pending = comm.all_gather_start(encode_proposal(
      {call.shape, call.error, call.mine, assumed}, comm.max_gather_bytes()));
  // Prepared while the proposals travel, where the transport sends them in
  // the background: packing the weight then overlaps the wait for the
  // slowest rank. One GEMM serves a run ahead and a run again alike.
  const auto gemm = call.shape ? prepare(call, x1, x2, packed, options, comm) : nullptr;
  // A run ahead writes into a tensor of its own (small, by the rule above),
  // copied into `out` once it counts: a call that fails leaves `out` as it was.
  Tensor staged;
  if (ahead) {
    staged = Tensor(call.shape->out_dtype, {call.shape->m, call.shape->n});
    run_plan(ahead->plan, call, *gemm, staged, comm);
  }
  const Agreement agreement = judge_proposals(pending->wait(), comm.rank(), call.error);
  if (agreement.ran_ahead && !ahead && !agreement.ran_ahead_rightly) {
    join_round(comm, agreement.ahead_count, agreement.ahead_dtype);
  }
  if (agreement.failure) std::rethrow_exception(agreement.failure);
  remember_agreement(comm, *call.shape, call.mine, agreement.facts);
  if (ahead) {
    log::debug("mm_all_reduce_base: ran ahead, ",
               agreement.ran_ahead_rightly ? "as agreed" : "on stale facts: running again");
  }
  if (ahead && agreement.ran_ahead_rightly) {
    std::memcpy(out->data(), staged.data(), staged.nbytes());
    test_hooks::after_agreement(test_hooks::Agreement::ran_ahead);
    return;
  }
  // Planned with the agreed facts (collective), then run.
  run_plan(pipeline::plan_call(comm, *gemm, request_for(*call.shape, agreement.facts)), call,
           *gemm, *out, comm);
  test_hooks::after_agreement(ahead ? test_hooks::Agreement::ran_ahead_then_again
                                    : test_hooks::Agreement::before_running);
}

// Both forms, with x2 or a packed weight: validate, agree, run.
Tensor run_call(const TensorView& x1, const TensorView& x2, const PackedWeight* packed,
                std::string_view hcom, const MmAllReduceOptions& options, const TensorView* out,
                const char* operation) {
  const auto comm = comm::find_communicator(hcom);
  const comm::ExclusiveUse use(*comm, operation);
  const LocalCall call = validate_locally(x1, x2, packed, options, out, *comm);
  Tensor made;
  if (call.shape && out == nullptr) made = Tensor(call.shape->out_dtype, output_shape(*call.shape));
  const TensorView* into = out != nullptr ? out : &made.view();
  agree_and_run(call, x1, x2, packed, options, call.shape ? into : nullptr, *comm);
  return made;
}

}  // namespace

Tensor mm_all_reduce_base(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                          const MmAllReduceOptions& options) {
  return run_call(x1, x2, nullptr, hcom, options, nullptr, "mm_all_reduce_base");
}

void mm_all_reduce_base_out(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                            const MmAllReduceOptions& options, const TensorView& out) {
  run_call(x1, x2, nullptr, hcom, options, &out, "mm_all_reduce_base_out");
}

Tensor mm_all_reduce_base(const TensorView& x1, const PackedWeight& x2, std::string_view hcom,
                          const MmAllReduceOptions& options) {
  return run_call(x1, x2.x2(), &x2, hcom, options, nullptr, "mm_all_reduce_base");
}

void mm_all_reduce_base_out(const TensorView& x1, const PackedWeight& x2, std::string_view hcom,
                            const MmAllReduceOptions& options, const TensorView& out) {
  run_call(x1, x2.x2(), &x2, hcom, options, &out, "mm_all_reduce_base_out");
}

}  // namespace tpfuse
