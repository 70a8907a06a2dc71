// The operators `tpfuse bench fused` measures (bench_family.cc): for each,
// its named shapes, how a shape splits over the ranks, what its figures are
// of, and one rank's calls. The timing, statistics, baselines and output are
// bench_fused.cc's, the same for every operator.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "operators.h"
#include "tpfuse/comm/launcher.h"
#include "tpfuse/core/dtype.h"

namespace tpfuse::cli {

// m is the rows of the whole product, for every operator: all_gather_mm
// gathers m rows (m / p from each rank) of k columns and multiplies them by
// each rank's [k, n] column shard; the others multiply [m, k] by [k, n] with
// k split over the ranks (the layer's k: each rank holds k / p).
struct FusedShape {
  std::string name;
  std::int64_t m = 0, n = 0, k = 0;
  int ranks = 2;  // when --ranks is not given
};

const std::vector<FusedShape>& preset_shapes(FusedOp op);

// The columns of x1 on each rank.
std::int64_t k_per_rank(FusedOp op, const FusedShape& shape, int ranks);

// Why `shape` cannot be split over `ranks` for `op`; empty when it can.
std::string shape_problem(FusedOp op, const FusedShape& shape, int ranks);

// The figures' descriptions, for headers and plots.
struct OpTexts {
  const char* fused;   // the fused call
  const char* comm;    // T_comm: tpfuse's collective alone
  const char* serial;  // T_serial: tpfuse's pieces one after the other
  const char* peer;    // T_peer: the unfused peer
};
OpTexts op_texts(FusedOp op);

// Whether the operator's collective is an all-reduce of the output (then
// gloo's all_reduce of it is a reference too).
bool reduces_whole_output(FusedOp op);

// The calls each rank times, in this order in RankVariants::calls.
enum Variant : std::size_t { kGemm, kComm, kSerial, kFused, kBaseThenNorm };

struct RankVariants {
  // T_gemm, T_comm, T_serial, T_fused and, for mm_all_reduce_add_rms_norm,
  // mm_all_reduce_base then the add-and-RMSNorm step.
  std::vector<std::function<void()>> calls;
  std::string engine;  // tpfuse's GEMM engine
  int threads = 0;     // the GEMM threads of a rank
};

// One rank's inputs (plain mode, `dtype`) and calls; every rank calls them
// collectively, in the same order.
RankVariants make_rank_variants(FusedOp op, comm::RankContext& ctx, const FusedShape& shape, DType dtype,
                                std::int64_t comm_turn);

}  // namespace tpfuse::cli
