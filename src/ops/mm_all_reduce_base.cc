// The operator: validate -> agree across ranks -> plan the tiles along M ->
// run them, each tile's all-reduce overlapping the next tiles' GEMM (the
// pipeline folder has the planner and the executor).
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

// A validated call, agreed by every rank, and how this rank runs it.
struct AgreedCall {
  CallShape shape;
  pipeline::ProgressMode progress = pipeline::ProgressMode::interleaved;
  int gemm_threads = 1;
  pipeline::PlanRequest request;  // agreed: the same on every rank
};

// Validates locally, then agrees with the peers (one exchange, which also
// combines what the planner needs from every rank).
AgreedCall validate_and_agree(const TensorView& x1, const TensorView& x2,
                              const MmAllReduceOptions& options, const TensorView* out,
                              comm::Communicator& comm) {
  std::optional<CallShape> shape;
  std::string error;
  try {
    shape = validate_call(x1, x2, options);
    if (out != nullptr) validate_out(*shape, *out, x1, x2, options);
  } catch (const InvalidArgument& e) {
    shape.reset();
    error = e.what();
  }
  AgreedCall call;
  call.progress = pipeline::progress_mode_for(comm);
  // The ranks on this host share its cores.
  const pipeline::ThreadBudget budget =
      pipeline::thread_budget(call.progress, comm.ranks_on_host());
  call.gemm_threads = budget.gemm_threads;
  const RankFacts agreed = check_agreement(
      comm, shape, error, {shape ? shape->k : 0, budget.gemm_threads, budget.reduce_has_own_core});
  call.shape = *shape;
  call.request = pipeline::make_request(call.shape, agreed.threads, agreed.reduce_has_own_core);
  call.request.k = agreed.k;
  return call;
}

void run(const AgreedCall& call, const TensorView& x1, const TensorView& x2,
         const MmAllReduceOptions& options, const TensorView& out, comm::Communicator& comm) {
  const CallShape& shape = call.shape;
  gemm::GemmOperands operands = make_operands(shape, x1, x2, options);
  operands.threads = call.gemm_threads;
  const auto gemm = gemm::prepare_gemm(operands);

  pipeline::TileJob job;
  job.gemm = gemm.get();
  job.comm = &comm;
  job.n = shape.n;
  job.dtype = shape.out_dtype;
  job.out = out.data();
  job.progress = call.progress;
  job.after_tile_computed = test_hooks::after_tile_computed;

  const pipeline::TilePlan plan = pipeline::plan_call(comm, *gemm, call.request);
  log::debug("mm_all_reduce_base: m=", shape.m, " k=", shape.k, " n=", shape.n, " mode=",
             mode_name(shape.mode), " tiles=", plan.tile_rows.size(), " engine=", gemm->engine());
  pipeline::execute_plan(plan, job);
}

}  // namespace

Tensor mm_all_reduce_base(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                          const MmAllReduceOptions& options) {
  const auto comm = comm::find_communicator(hcom);
  const comm::ExclusiveUse use(*comm, "mm_all_reduce_base");
  const AgreedCall call = validate_and_agree(x1, x2, options, nullptr, *comm);
  Tensor out(call.shape.out_dtype, output_shape(call.shape));
  run(call, x1, x2, options, out, *comm);
  return out;
}

void mm_all_reduce_base_out(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                            const MmAllReduceOptions& options, const TensorView& out) {
  const auto comm = comm::find_communicator(hcom);
  const comm::ExclusiveUse use(*comm, "mm_all_reduce_base_out");
  const AgreedCall call = validate_and_agree(x1, x2, options, &out, *comm);
  run(call, x1, x2, options, out, *comm);
}

}  // namespace tpfuse
