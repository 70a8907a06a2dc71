// The operator: validate -> agree across ranks (computing the first tile's
// rows meanwhile) -> plan the tiles along M -> run them, each tile's
// all-reduce overlapping the next tiles' GEMM (the pipeline folder has the
// planner and the executor).
#include "tpfuse/ops/mm_all_reduce_base.h"

#include <algorithm>
#include <optional>

#include "ops/agreement.h"
#include "pipeline/executor.h"
#include "ops/test_hooks.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"
#include "tpfuse/gemm/tile_gemm.h"
#include "tpfuse/pipeline/plan.h"
#include "tpfuse/ops/validate.h"

namespace tpfuse {

namespace {

std::vector<std::int64_t> output_shape(const CallShape& s) {
  if (s.batch > 0) return {s.batch, s.seq, s.n};
  return {s.m, s.n};
}

gemm::GemmOperands make_operands(const CallShape& shape, const TensorView& x1,
                                 const TensorView& x2, const MmAllReduceOptions& options) {
  gemm::GemmOperands ops;
  ops.shape = shape;
  const std::int64_t x1_shape[2] = {shape.m, shape.k};
  ops.x1 = TensorView(x1.data(), x1.dtype(), x1_shape);
  // x2 as validated: a row-major [k, n] or a transposed row-major [n, k],
  // whose size-1 dims may carry any stride (never stepped over). oneDNN reads
  // such a stride as a layout all the same (a [k, 1] of strides [1, 2] gave
  // garbage), so the engines get the canonical strides of the same memory.
  const std::int64_t x2_shape[2] = {shape.k, shape.n};
  const std::int64_t x2_strides[2] = {shape.x2_transposed ? 1 : shape.n,
                                      shape.x2_transposed ? shape.k : 1};
  ops.x2 = TensorView(x2.data(), x2.dtype(), x2_shape, x2_strides);
  ops.bias = options.bias;
  if (options.x3) {
    const std::int64_t x3_shape[2] = {shape.m, shape.n};
    ops.x3 = TensorView(options.x3->data(), options.x3->dtype(), x3_shape);
  }
  ops.scale = shape.mode == Mode::full_quant ? options.dequant_scale : options.antiquant_scale;
  ops.offset = options.antiquant_offset;
  return ops;
}

// This rank's call before its peers have a say: validated, the GEMM
// prepared; or, where this rank's validation failed, the error.
struct LocalCall {
  std::optional<CallShape> shape;
  std::string error;
  pipeline::ProgressMode progress = pipeline::ProgressMode::interleaved;
  pipeline::ThreadBudget budget;
  std::unique_ptr<gemm::PreparedGemm> gemm;
};

LocalCall prepare_locally(const TensorView& x1, const TensorView& x2,
                          const MmAllReduceOptions& options, const TensorView* out,
                          const comm::Communicator& comm) {
  LocalCall call;
  call.progress = pipeline::progress_mode_for(comm);
  // The ranks on this host share its cores.
  call.budget = pipeline::thread_budget(call.progress, comm.ranks_on_host());
  try {
    call.shape = validate_call(x1, x2, options);
    if (out != nullptr) validate_out(*call.shape, *out, x1, x2, options);
    gemm::GemmOperands operands = make_operands(*call.shape, x1, x2, options);
    operands.threads = call.budget.gemm_threads;
    call.gemm = gemm::prepare_gemm(operands);
  } catch (const InvalidArgument& e) {
    call.shape.reset();
    call.gemm.reset();
    call.error = e.what();
  }
  return call;
}

// Rows computed while the agreement travels hold at most this much output.
constexpr std::size_t kEarlyBytes = std::size_t{4} << 20;

// While the agreement's exchange travels, this rank computes the rows its
// first tile will need, which otherwise it would compute right after: the
// wait for the slowest rank, which the agreement adds to every call, then
// overlaps the GEMM. The first tile is that of the plan this rank ran for the
// same call before (a plan is known only once planned: the first call of a
// shape computes nothing early). The rows go to a buffer of this thread's,
// reused across calls, and are copied into the first tile's reduce buffer
// after the agreement: that buffer cannot be taken before, since a failed
// agreement would leave it taken on some ranks only. Returns the rows.
std::int64_t compute_early_rows(const LocalCall& call, const comm::Communicator& comm,
                                std::vector<std::byte>& early) {
  if (!call.gemm) return 0;
  const CallShape& shape = *call.shape;
  const auto plan = pipeline::cached_plan(
      comm,
      pipeline::make_request(shape, call.budget.gemm_threads, call.budget.reduce_has_own_core));
  if (!plan) return 0;
  const std::size_t row_bytes = static_cast<std::size_t>(shape.n) * dtype_size(shape.out_dtype);
  const std::int64_t rows = std::min<std::int64_t>(
      plan->tile_rows.front(),
      std::max<std::int64_t>(1, static_cast<std::int64_t>(kEarlyBytes / row_bytes)));
  early.resize(static_cast<std::size_t>(rows) * row_bytes);
  call.gemm->compute_rows(0, rows, early.data(), shape.n);
  return rows;
}

// Validates, agrees with the peers (one exchange, which also combines what
// the planner needs from every rank), plans the tiles and runs them, into
// `out`, or into a tensor made once the call is agreed.
void run(const TensorView& x1, const TensorView& x2, const MmAllReduceOptions& options,
         const TensorView* out, Tensor* made, comm::Communicator& comm) {
  const LocalCall call = prepare_locally(x1, x2, options, out, comm);
  const RankFacts mine{call.shape ? call.shape->k : 0, call.budget.gemm_threads,
                       call.budget.reduce_has_own_core};
  thread_local std::vector<std::byte> early;
  std::int64_t early_rows = 0;
  RankFacts agreed;
  {
    const auto exchange = start_agreement(comm, call.shape, call.error, mine);
    try {
      early_rows = compute_early_rows(call, comm, early);
    } catch (const std::exception& error) {
      comm.abort(cat("rank ", comm.rank(), " failed before its tile pipeline: ", error.what()));
      throw;
    }
    agreed = finish_agreement(*exchange, comm.rank(), call.error, mine);
  }
  const CallShape& shape = *call.shape;
  pipeline::PlanRequest request =
      pipeline::make_request(shape, agreed.threads, agreed.reduce_has_own_core);
  request.k = agreed.k;
  if (made != nullptr) *made = Tensor(shape.out_dtype, output_shape(shape));

  pipeline::TileJob job;
  job.gemm = call.gemm.get();
  job.comm = &comm;
  job.n = shape.n;
  job.dtype = shape.out_dtype;
  job.out = made != nullptr ? made->data() : out->data();
  job.early = early.data();
  job.early_rows = early_rows;
  job.progress = call.progress;
  job.after_tile_computed = test_hooks::after_tile_computed;

  const pipeline::TilePlan plan = pipeline::plan_call(comm, *call.gemm, request);
  log::debug("mm_all_reduce_base: m=", shape.m, " k=", shape.k, " n=", shape.n, " mode=",
             mode_name(shape.mode), " tiles=", plan.tile_rows.size(), " early rows=", early_rows,
             " engine=", call.gemm->engine());
  pipeline::execute_plan(plan, job);
}
}  // namespace

Tensor mm_all_reduce_base(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                          const MmAllReduceOptions& options) {
  const auto comm = comm::find_communicator(hcom);
  const comm::ExclusiveUse use(*comm, "mm_all_reduce_base");
  Tensor out;
  run(x1, x2, options, nullptr, &out, *comm);
  return out;
}

void mm_all_reduce_base_out(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                            const MmAllReduceOptions& options, const TensorView& out) {
  const auto comm = comm::find_communicator(hcom);
  const comm::ExclusiveUse use(*comm, "mm_all_reduce_base_out");
  run(x1, x2, options, &out, nullptr, *comm);
}

}  // namespace tpfuse
