// The operator: validate -> agree across ranks in the call's first round ->
// plan the tiles along M -> run them (a call seen before runs in that first
// round when it is one tile; see ops/agreement.h), each tile's all-reduce
// overlapping the next tiles' GEMM (the pipeline folder has the planner and
// the executor).
#include "tpfuse/ops/mm_all_reduce_base.h"

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "core/trace.h"
#include "ops/agreement.h"
#include "ops/test_hooks.h"
#include "pipeline/executor.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"
#include "tpfuse/gemm/tile_gemm.h"
#include "tpfuse/ops/explain.h"
#include "tpfuse/ops/gemm_operands.h"
#include "tpfuse/ops/packed_weight.h"
#include "tpfuse/ops/validate.h"
#include "tpfuse/pipeline/plan.h"

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
  pipeline::PlanRequest request = pipeline::make_request(
      shape.op, shape, shape.comm_turn, agreed.threads, agreed.reduce_has_own_core);
  request.k = agreed.k;
  return request;
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

pipeline::TileJob job_for(const LocalCall& call, const gemm::PreparedGemm& gemm,
                          const TensorView& out, comm::Communicator& comm) {
  pipeline::TileJob job;
  job.gemm = &gemm;
  job.comm = &comm;
  job.n = call.shape->n;
  job.dtype = call.shape->out_dtype;
  job.out = out.data();
  job.progress = call.progress;
  job.after_tile_computed = test_hooks::after_tile_computed;
  return job;
}

void run_plan(const pipeline::TilePlan& plan, const LocalCall& call, const gemm::PreparedGemm& gemm,
              const TensorView& out, comm::Communicator& comm) {
  const CallShape& shape = *call.shape;
  log::debug("mm_all_reduce_base: m=", shape.m, " k=", shape.k, " n=", shape.n, " mode=",
             mode_name(shape.mode), " tiles=", plan.tile_rows.size(), " engine=", gemm.engine());
  pipeline::execute_plan(plan, job_for(call, gemm, out, comm));
}

// What this rank runs without hearing its peers: the combination agreed for
// the same call on this communicator before, and the plan it gives, if that
// needs nothing measured (collective).
std::optional<PlannedRun> planned_run(const LocalCall& call, const comm::Communicator& comm) {
  if (!call.shape) return std::nullopt;
  const auto facts = comm.attachment<AgreementCache>().find(*call.shape, call.mine);
  if (!facts) return std::nullopt;
  const auto plan = pipeline::cached_plan(comm, request_for(*call.shape, *facts));
  if (!plan) return std::nullopt;
  return PlannedRun{*facts, plan->tile_rows, plan->poll_rows};
}

// The call's plan, and how its ranks agreed on it, in its timeline event.
void trace_run(trace::Span& span, const std::vector<std::int64_t>& tile_rows,
               const char* agreement) {
  if (!span.active()) return;
  std::string rows = "[";
  for (std::size_t t = 0; t < tile_rows.size(); ++t) {
    if (t > 0) rows += ',';
    rows += std::to_string(tile_rows[t]);
  }
  span.args()
      .add("tiles", tile_rows.size())
      .add_raw("tile_rows", rows + "]")
      .add("agreement", agreement);
}

// Agrees with the peers in the call's first round and runs the call into
// `out` (null only when validation failed here). See ops/agreement.h.
void agree_and_run(const LocalCall& call, const TensorView& x1, const TensorView& x2,
                   const PackedWeight* packed, const MmAllReduceOptions& options,
                   const TensorView* out, comm::Communicator& comm, trace::Span& span) {
  const std::optional<PlannedRun> planned = planned_run(call, comm);
  const Proposal proposal{call.shape, call.error, call.mine};
  const comm::CallHeader header = make_header(proposal, planned, comm.rank());
  const auto gemm = call.shape ? prepare(call, x1, x2, packed, options, comm) : nullptr;
  // One tile that fits a reduce buffer travels in the first round itself.
  const bool one_round = planned && planned->tile_rows.size() == 1 &&
                         static_cast<double>(call.shape->m) * static_cast<double>(call.shape->n) *
                                 static_cast<double>(dtype_size(call.shape->out_dtype)) <=
                             static_cast<double>(comm.max_reduce_buffer_bytes());
  pipeline::Mismatch mismatch;
  if (one_round) {
    mismatch =
        pipeline::execute_checked_tile(job_for(call, *gemm, *out, comm), call.shape->m, header);
    if (!mismatch) {
      trace_run(span, planned->tile_rows, "in the call's one round");
      test_hooks::after_agreement(test_hooks::Agreement::in_first_round);
      return;
    }
  }
  std::optional<pipeline::TilePlan> plan;
  {
    trace::Span agreeing("agreement", "agreement");
    if (!one_round) mismatch = pipeline::checked_round(comm, header);
    if (!mismatch && planned) {
      plan.emplace();
      plan->tile_rows = planned->tile_rows;
      plan->poll_rows = planned->poll_rows;
      if (agreeing.active()) agreeing.args().add("outcome", "every rank planned alike");
    } else {
      // The digests differed (or this rank, alone in its group, planned
      // nothing): every rank judges the same proposals.
      const Agreement agreement = judge_headers(
          mismatch ? *mismatch : std::vector<comm::CallHeader>{header}, comm.rank(), call.error);
      if (agreement.failure) std::rethrow_exception(agreement.failure);
      comm.attachment<AgreementCache>().remember(*call.shape, call.mine, agreement.facts);
      // Planned with the agreed facts (collective).
      plan = pipeline::plan_call(comm, *gemm, request_for(*call.shape, agreement.facts));
      if (agreeing.active()) agreeing.args().add("outcome", "judged from every rank's proposal");
    }
  }
  run_plan(*plan, call, *gemm, *out, comm);
  const bool judged = mismatch || !planned;
  trace_run(span, plan->tile_rows,
            judged ? "judged from every rank's proposal" : "in the call's first round");
  test_hooks::after_agreement(judged ? test_hooks::Agreement::judged
                                     : test_hooks::Agreement::in_first_round);
}

// Both forms, with x2 or a packed weight: validate, agree, run.
Tensor run_call(const TensorView& x1, const TensorView& x2, const PackedWeight* packed,
                std::string_view hcom, const MmAllReduceOptions& options, const TensorView* out,
                const char* operation) {
  const auto comm = comm::find_communicator(hcom);
  const comm::ExclusiveUse use(*comm, operation);
  trace::Span span(operation, "op");
  const LocalCall call = validate_locally(x1, x2, packed, options, out, *comm);
  if (span.active() && call.shape) {
    const CallShape& s = *call.shape;
    span.args()
        .add("m", s.m)
        .add("n", s.n)
        .add("k", s.k)
        .add("mode", mode_name(s.mode))
        .add("x1", dtype_name(s.in_dtype))
        .add("out", dtype_name(s.out_dtype))
        .add("packed_weight", packed != nullptr ? "yes" : "no")
        .add("hcom", hcom);
  }
  Tensor made;
  if (call.shape && out == nullptr) made = Tensor(call.shape->out_dtype, output_shape(*call.shape));
  const TensorView* into = out != nullptr ? out : &made.view();
  agree_and_run(call, x1, x2, packed, options, call.shape ? into : nullptr, *comm, span);
  return made;
}

}  // namespace

CallExplanation explain_mm_all_reduce_base(const TensorView& x1, const TensorView& x2,
                                           comm::Communicator& comm,
                                           const MmAllReduceOptions& options) {
  const LocalCall call = validate_locally(x1, x2, nullptr, options, nullptr, comm);
  if (!call.shape) throw InvalidArgument(call.error);
  CallExplanation explained;
  explained.shape = *call.shape;
  explained.progress = call.progress;
  const auto gemm = prepare(call, x1, x2, nullptr, options, comm);
  explained.engine = gemm->engine();
  // The facts combined as the agreement combines them (agreement.h).
  explained.request = pipeline::agree_request(comm, request_for(*call.shape, call.mine));
  explained.plan = pipeline::plan_call(comm, *gemm, explained.request, &explained.constants);
  return explained;
}

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
