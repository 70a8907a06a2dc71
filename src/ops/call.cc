// The path every operator's call takes (ops/call.h). A call seen before on
// this communicator runs in its first round when it is one tile of GEMM then
// all-reduce; see ops/agreement.h.
#include "ops/call.h"

#include <optional>
#include <string>
#include <vector>

#include "core/trace.h"
#include "ops/agreement.h"
#include "ops/test_hooks.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"

namespace tpfuse {

namespace {

// This rank's call, validated here, and how this rank would run it.
struct LocalCall {
  std::optional<CallShape> shape;  // nullopt when validation failed
  std::string error;               // why it failed
  RunSetup setup;
  RankFacts mine;
};

LocalCall validate_locally(const OperatorCall& op, const comm::Communicator& comm) {
  LocalCall call;
  try {
    call.shape = op.validate(comm.size());
  } catch (const InvalidArgument& e) {
    call.shape.reset();
    call.error = e.what();
  }
  call.setup.progress = pipeline::progress_mode_for(comm);
  // The ranks on this host share its cores.
  const pipeline::ThreadBudget budget =
      pipeline::thread_budget(call.setup.progress, comm.ranks_on_host());
  call.setup.gemm_threads = budget.gemm_threads;
  if (call.shape) {
    call.mine = {call.shape->k, call.shape->n, budget.gemm_threads, budget.reduce_has_own_core};
  } else {
    call.mine = {0, 0, budget.gemm_threads, budget.reduce_has_own_core};
  }
  return call;
}

pipeline::PlanRequest request_for(const CallShape& shape, const RankFacts& agreed, int ranks) {
  CallShape planned = shape;
  planned.m = gemm_rows(shape);
  pipeline::PlanRequest request = pipeline::make_request(
      shape.op, planned, shape.comm_turn, agreed.threads, agreed.reduce_has_own_core);
  request.k = agreed.k;
  request.n = agreed.n;
  request.ranks = ranks;
  return request;
}

// The call's GEMM, prepared. It is prepared once the peers may be waiting
// for this rank's tiles, so a failure (memory for the packed weight) aborts
// the communicator: they fail at once rather than at their deadline.
std::unique_ptr<gemm::PreparedGemm> prepare(const OperatorCall& op, const LocalCall& call,
                                            comm::Communicator& comm) {
  gemm::GemmOperands operands = op.operands(*call.shape);
  operands.threads = call.setup.gemm_threads;
  try {
    return gemm::prepare_gemm(operands);
  } catch (const std::exception& error) {
    comm.abort(cat("rank ", comm.rank(), " could not prepare its GEMM: ", error.what()));
    throw;
  }
}

void run_plan(OperatorCall& op, const pipeline::TilePlan& plan, const LocalCall& call,
              const gemm::PreparedGemm& gemm, comm::Communicator& comm) {
  const CallShape& shape = *call.shape;
  log::debug(op.name(), ": m=", shape.m, " k=", shape.k, " n=", shape.n,
             " mode=", mode_name(shape.mode), " tiles=", plan.tile_rows.size(),
             " engine=", gemm.engine());
  if (auto job = op.all_reduce_job(shape, gemm, comm, call.setup)) {
    pipeline::execute_plan(plan, *job);
    return;
  }
  // One tile leaves nothing to overlap: this thread runs it in one go.
  RunSetup setup = call.setup;
  if (plan.tile_rows.size() == 1) setup.progress = pipeline::ProgressMode::interleaved;
  const auto stages = op.stages(shape, gemm, comm, setup, plan);
  pipeline::execute(plan, *stages, comm, setup.progress);
}

// What this rank runs without hearing its peers: the combination agreed for
// the same call on this communicator before, and the plan it gives, if that
// needs nothing measured (collective).
std::optional<PlannedRun> planned_run(const LocalCall& call, const comm::Communicator& comm) {
  if (!call.shape) return std::nullopt;
  const auto facts = comm.attachment<AgreementCache>().find(*call.shape, call.mine);
  if (!facts) return std::nullopt;
  const auto plan = pipeline::cached_plan(comm, request_for(*call.shape, *facts, comm.size()));
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

// Agrees with the peers in the call's first round and runs the call.
void agree_and_run(OperatorCall& op, const LocalCall& call, comm::Communicator& comm,
                   trace::Span& span) {
  const std::optional<PlannedRun> planned = planned_run(call, comm);
  const Proposal proposal{call.shape, call.error, call.mine};
  const comm::CallHeader header = make_header(proposal, planned, comm.rank());
  const auto gemm = call.shape ? prepare(op, call, comm) : nullptr;
  const std::optional<pipeline::TileJob> job =
      call.shape ? op.all_reduce_job(*call.shape, *gemm, comm, call.setup) : std::nullopt;
  // One tile of GEMM then all-reduce that fits a reduce buffer travels in
  // the first round itself.
  const bool one_round = planned && job && planned->tile_rows.size() == 1 &&
                         static_cast<double>(call.shape->m) * static_cast<double>(call.shape->n) *
                                 static_cast<double>(dtype_size(call.shape->out_dtype)) <=
                             static_cast<double>(comm.max_reduce_buffer_bytes());
  pipeline::Mismatch mismatch;
  if (one_round) {
    mismatch = pipeline::execute_checked_tile(*job, call.shape->m, header);
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
      const Agreement agreement =
          judge_headers(mismatch ? *mismatch : std::vector<comm::CallHeader>{header}, comm.rank(),
                        call.error, op.name());
      if (agreement.failure) std::rethrow_exception(agreement.failure);
      comm.attachment<AgreementCache>().remember(*call.shape, call.mine, agreement.facts);
      // Planned with the agreed facts (collective).
      plan =
          pipeline::plan_call(comm, *gemm, request_for(*call.shape, agreement.facts, comm.size()));
      if (agreeing.active()) agreeing.args().add("outcome", "judged from every rank's proposal");
    }
  }
  run_plan(op, *plan, call, *gemm, comm);
  const bool judged = mismatch || !planned;
  trace_run(span, plan->tile_rows,
            judged ? "judged from every rank's proposal" : "in the call's first round");
  test_hooks::after_agreement(judged ? test_hooks::Agreement::judged
                                     : test_hooks::Agreement::in_first_round);
}

}  // namespace

pipeline::TileJob all_reduce_job_into(void* out, const CallShape& shape,
                                      const gemm::PreparedGemm& gemm, comm::Communicator& comm,
                                      const RunSetup& setup) {
  pipeline::TileJob job;
  job.gemm = &gemm;
  job.comm = &comm;
  job.n = shape.n;
  job.dtype = shape.out_dtype;
  job.out = out;
  job.progress = setup.progress;
  job.after_tile_computed = test_hooks::after_tile_computed;
  return job;
}

void* CallScratch::get(std::size_t slot, std::size_t bytes) {
  Tensor& held = slots_[slot];
  if (held.view().data() == nullptr || static_cast<std::size_t>(held.size(0)) < bytes) {
    held = Tensor(DType::i8, {static_cast<std::int64_t>(bytes)});
  }
  return held.view().data();
}

void run_operator_call(OperatorCall& op, std::string_view hcom, const char* operation) {
  const auto comm = comm::find_communicator(hcom);
  const comm::ExclusiveUse use(*comm, operation);
  trace::Span span(operation, "op");
  const LocalCall call = validate_locally(op, *comm);
  if (span.active() && call.shape) {
    const CallShape& s = *call.shape;
    span.args()
        .add("m", s.m)
        .add("n", s.n)
        .add("k", s.k)
        .add("mode", mode_name(s.mode))
        .add("x1", dtype_name(s.in_dtype))
        .add("out", dtype_name(s.out_dtype))
        .add("hcom", hcom);
  }
  if (call.shape) op.make_outputs(*call.shape, *comm);
  agree_and_run(op, call, *comm, span);
}

CallExplanation explain_operator_call(const OperatorCall& op, comm::Communicator& comm) {
  const LocalCall call = validate_locally(op, comm);
  if (!call.shape) throw InvalidArgument(call.error);
  CallExplanation explained;
  explained.shape = *call.shape;
  explained.progress = call.setup.progress;
  const auto gemm = prepare(op, call, comm);
  explained.engine = gemm->engine();
  // The facts combined as the agreement combines them (agreement.h).
  pipeline::PlanRequest request = request_for(*call.shape, call.mine, comm.size());
  explained.request = pipeline::agree_request(comm, request);
  explained.plan = pipeline::plan_call(comm, *gemm, explained.request, &explained.constants);
  return explained;
}

}  // namespace tpfuse
