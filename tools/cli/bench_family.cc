// `tpfuse bench fused`'s operators, each measured against tpfuse's own
// pieces run one after the other:
//
//   mm_all_reduce               GEMM, then all-reduce of the output
//   all_gather_mm               all-gather of x1, then GEMM of the gathered rows
//   mm_reduce_scatter           GEMM, then reduce-scatter of the output's rows
//   mm_all_reduce_add_rms_norm  GEMM, all-reduce, then the add-and-RMSNorm step
//                               (add_rms_norm_rows); and mm_all_reduce_base then
//                               that step, the unfused path through the library
//
// The GEMM alone is the one the operator runs (its operands, with its
// threads), over every row of the product; the collective alone goes through
// the same communicator.
#include "bench_family.h"

#include <memory>

#include "ops/add_rms_norm.h"
#include "tpfuse/comm/communicator.h"
#include "tpfuse/core/error.h"
#include "tpfuse/gemm/tile_gemm.h"
#include "tpfuse/ops/family.h"
#include "tpfuse/ops/gemm_operands.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/ops/validate.h"
#include "tpfuse/pipeline/plan.h"
#include "tpfuse/testing/family_inputs.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse::cli {

namespace {

// One rank's inputs and buffers; the calls hold it.
struct RankState {
  testing::RankInputs inputs;               // the product's, but for add-RMSNorm
  testing::AddRmsNormInputs norm;           // add-RMSNorm: the product's, residual and gamma
  const testing::RankArgs* args = nullptr;  // the product's arguments, in one or the other
  Tensor gathered;  // all_gather_mm: x1 of every rank, [m, k]
  Tensor out;       // the GEMM's [m, n] (all_gather_mm: the fused call's output too)
  Tensor reduced;   // zeros, [m, n]: reducing them in place never overflows
  Tensor shard;     // mm_reduce_scatter: this rank's rows
  Tensor gather_out, y, norm_out;
  gemm::GemmOperands operands;
  AddRmsNormRows step;
};

}  // namespace

const std::vector<FusedShape>& preset_shapes(FusedOp op) {
  // mm_all_reduce: the shapes: the seed's example (k = 512 per rank
  // over 8 ranks), Ascend's published case and its communication-heavy K=256
  // variant, and decode/prefill rows against a 4096 x 4096 weight.
  static const std::vector<FusedShape> all_reduce = {
      {"seed", 128, 64, 512 * 8, 8},   {"ascend", 4096, 8192, 4096, 2},   {"ascend_k256", 4096, 8192, 256, 2},
      {"decode_m1", 1, 4096, 4096, 2}, {"decode_m16", 16, 4096, 4096, 2}, {"prefill_m256", 256, 4096, 4096, 2}};
  // The family's targets, an MLP of hidden size 4096 on 2 ranks under
  // sequence parallelism: 2048 rows gathered against each rank's [4096, 4096]
  // column shard, and [2048, 4096] x [4096, 4096] row shards reduced (k of
  // the layer 8192); add-RMSNorm at that prefill and at decode (M = 1, 16).
  static const std::vector<FusedShape> all_gather = {{"prefill", 2048, 4096, 4096, 2}};
  static const std::vector<FusedShape> reduce_scatter = {{"prefill", 2048, 4096, 8192, 2}};
  static const std::vector<FusedShape> add_rms_norm = {
      {"prefill", 2048, 4096, 8192, 2}, {"decode_m1", 1, 4096, 8192, 2}, {"decode_m16", 16, 4096, 8192, 2}};
  switch (op) {
    case FusedOp::mm_all_reduce:
      return all_reduce;
    case FusedOp::all_gather_mm:
      return all_gather;
    case FusedOp::mm_reduce_scatter:
      return reduce_scatter;
    case FusedOp::mm_all_reduce_add_rms_norm:
      return add_rms_norm;
  }
  return all_reduce;
}

std::int64_t k_per_rank(FusedOp op, const FusedShape& shape, int ranks) {
  return op == FusedOp::all_gather_mm ? shape.k : shape.k / ranks;
}

std::string shape_problem(FusedOp op, const FusedShape& shape, int ranks) {
  if (op != FusedOp::all_gather_mm && shape.k % ranks != 0) return cat(ranks, " ranks do not divide K=", shape.k);
  if ((op == FusedOp::all_gather_mm || op == FusedOp::mm_reduce_scatter) && shape.m % ranks != 0) {
    return cat(ranks, " ranks do not divide M=", shape.m);
  }
  return "";
}

OpTexts op_texts(FusedOp op) {
  switch (op) {
    case FusedOp::mm_all_reduce:
      return {"mm_all_reduce_base_out", "tpfuse all_reduce of the output", "tpfuse GEMM, then all-reduce",
              "oneDNN GEMM, then MPI_Allreduce"};
    case FusedOp::all_gather_mm:
      return {"all_gather_base_mm_out", "tpfuse all_gather of x1", "tpfuse all-gather, then GEMM",
              "MPI_Allgather, then oneDNN GEMM"};
    case FusedOp::mm_reduce_scatter:
      return {"mm_reduce_scatter_base_out", "tpfuse reduce_scatter of the output", "tpfuse GEMM, then reduce-scatter",
              "oneDNN GEMM, then MPI_Reduce_scatter_block"};
    case FusedOp::mm_all_reduce_add_rms_norm:
      return {"mm_all_reduce_add_rms_norm_out", "tpfuse all_reduce of the output",
              "tpfuse GEMM, all-reduce, then add_rms_norm_rows",
              "oneDNN GEMM, MPI_Allreduce, then an add-and-RMSNorm loop"};
  }
  return {"", "", "", ""};
}

bool reduces_whole_output(FusedOp op) {
  return op == FusedOp::mm_all_reduce || op == FusedOp::mm_all_reduce_add_rms_norm;
}

RankVariants make_rank_variants(FusedOp op, comm::RankContext& ctx, const FusedShape& shape, DType dtype,
                                std::int64_t comm_turn) {
  const int p = ctx.size;
  const std::int64_t m = shape.m, n = shape.n, k = k_per_rank(op, shape, p);
  testing::CaseSpec spec;
  spec.mode = Mode::plain;
  spec.dtype = dtype;
  spec.m = op == FusedOp::all_gather_mm ? m / p : m;
  spec.n = n;
  spec.k = k;
  spec.comm_turn = comm_turn;
  auto s = std::make_shared<RankState>();
  if (op == FusedOp::mm_all_reduce_add_rms_norm) {
    s->norm = testing::make_add_rms_norm_inputs({spec}, ctx.rank);
    s->args = &s->norm.product.args;
  } else {
    s->inputs = testing::make_rank_inputs(spec, ctx.rank);
    s->args = &s->inputs.args;
  }
  const testing::RankArgs& args = *s->args;

  // The GEMM the operator runs, over every row of the product: its operands,
  // with its threads.
  std::shared_ptr<comm::Communicator> comm = ctx.comm;
  if (op == FusedOp::all_gather_mm) s->gathered = Tensor(dtype, {m, k});
  const TensorView gemm_x1 = op == FusedOp::all_gather_mm ? s->gathered.view() : args.x1;
  s->operands = make_gemm_operands(validate_call(gemm_x1, args.x2, args.options), gemm_x1, args.x2, args.options);
  s->operands.threads = pipeline::thread_budget(pipeline::progress_mode_for(*comm), comm->ranks_on_host()).gemm_threads;
  s->out = Tensor(dtype, {m, n});
  s->reduced = Tensor(dtype, {m, n});

  RankVariants v;
  v.threads = s->operands.threads;
  v.engine = gemm::prepare_gemm(s->operands)->engine();
  const std::string hcom = comm->name();
  const auto count = static_cast<std::size_t>(m * n);
  const auto compute = [s, m, n] { gemm::prepare_gemm(s->operands)->compute_rows(0, m, s->out.data(), n); };
  const auto all_reduce = [s, comm, count, dtype](void* data) { comm->all_reduce(data, data, count, dtype); };
  switch (op) {
    case FusedOp::mm_all_reduce:
      v.calls = {compute, [s, all_reduce] { all_reduce(s->reduced.data()); },
                 [s, compute, all_reduce] {
                   compute();
                   all_reduce(s->out.data());
                 },
                 [s, hcom] {
                   const testing::RankArgs& a = *s->args;
                   mm_all_reduce_base_out(a.x1, a.x2, hcom, a.options, s->out);
                 }};
      break;
    case FusedOp::all_gather_mm: {
      const std::vector<std::size_t> counts(static_cast<std::size_t>(p), static_cast<std::size_t>(m / p * k));
      const auto gather = [s, comm, counts, dtype] {
        comm->all_gather_start(s->args->x1.data(), s->gathered.data(), counts, dtype)->wait();
      };
      AllGatherMmOptions options;
      options.comm_turn = comm_turn;
      s->gather_out = Tensor(dtype, {m, k});
      v.calls = {compute, gather,
                 [gather, compute] {
                   gather();
                   compute();
                 },
                 [s, hcom, p, options] {
                   const testing::RankArgs& a = *s->args;
                   all_gather_base_mm_out(a.x1, a.x2, hcom, p, options, s->out, s->gather_out.view());
                 }};
      break;
    }
    case FusedOp::mm_reduce_scatter: {
      const std::vector<std::size_t> counts(static_cast<std::size_t>(p), static_cast<std::size_t>(m / p * n));
      s->shard = Tensor(dtype, {m / p, n});
      const auto scatter = [s, comm, counts, dtype](const void* data) {
        comm->reduce_scatter_start(data, s->shard.data(), counts, dtype)->wait();
      };
      MmReduceScatterOptions options;
      options.comm_turn = comm_turn;
      v.calls = {compute, [s, scatter] { scatter(s->reduced.data()); },
                 [s, compute, scatter] {
                   compute();
                   scatter(s->out.data());
                 },
                 [s, hcom, p, options] {
                   const testing::RankArgs& a = *s->args;
                   mm_reduce_scatter_base_out(a.x1, a.x2, hcom, p, options, s->shard);
                 }};
      break;
    }
    case FusedOp::mm_all_reduce_add_rms_norm: {
      s->y = Tensor(dtype, s->norm.residual.shape());
      s->norm_out = Tensor(dtype, s->norm.residual.shape());
      s->step = {dtype, n, static_cast<float>(s->norm.args.options.epsilon), s->norm.gamma.data()};
      const auto add_norm = [s, m] {
        add_rms_norm_rows(s->step, m, s->out.data(), s->norm.residual.data(), s->y.data(), s->norm_out.data());
      };
      v.calls = {compute, [s, all_reduce] { all_reduce(s->reduced.data()); },
                 [s, compute, all_reduce, add_norm] {
                   compute();
                   all_reduce(s->out.data());
                   add_norm();
                 },
                 [s, hcom] {
                   const testing::AddRmsNormArgs& a = s->norm.args;
                   mm_all_reduce_add_rms_norm_out(a.x1, a.x2, a.residual, a.gamma, hcom, a.options, s->y, s->norm_out);
                 },
                 [s, hcom, add_norm] {
                   const testing::RankArgs& a = *s->args;
                   mm_all_reduce_base_out(a.x1, a.x2, hcom, a.options, s->out);
                   add_norm();
                 }};
      break;
    }
  }
  return v;
}

}  // namespace tpfuse::cli
