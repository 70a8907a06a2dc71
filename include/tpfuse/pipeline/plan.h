// Tile plans: how the fused operator cuts its output along M so that one
// tile's all-reduce overlaps the next tile's GEMM, the machine constants the
// choice rests on, and the predicted time. `tpfuse plan` and the benchmarks
// print them; the operator runs them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tpfuse/comm/communicator.h"
#include "tpfuse/core/dtype.h"
#include "tpfuse/gemm/problem.h"
#include "tpfuse/gemm/tile_gemm.h"

namespace tpfuse::pipeline {

// Which operator a plan is for: each pipelines its collective differently,
// so plans (and the agreement on a call) never mix them.
enum class Operator : std::uint8_t {
  mm_all_reduce,
  all_gather_mm,
  mm_reduce_scatter,
  mm_all_reduce_add_rms_norm,
};

std::string_view operator_name(Operator op);

// Who advances the all-reduces in flight.
enum class ProgressMode {
  interleaved,    // the GEMM's thread, between blocks of at most poll_rows rows
  helper_thread,  // a thread of its own, while the GEMM's threads compute
};

// TPFUSE_PIPELINE_PROGRESS (auto, interleaved or helper_thread), read once;
// auto: a helper thread where `comm` moves data only while it is called,
// else interleaved.
ProgressMode progress_mode_for(const comm::Communicator& comm);

// How one rank's cores are shared: GEMM threads, and whether the reduce
// gets a core of its own (a helper thread, when the rank has two cores or
// more; the GEMM then leaves it one).
struct ThreadBudget {
  int gemm_threads = 1;
  bool reduce_has_own_core = false;
};
ThreadBudget thread_budget(ProgressMode mode, int ranks_on_host);

// What the plan depends on in a call: the same on every rank (k is the
// largest K-slice of any rank, since the slowest rank paces the pipeline).
struct PlanRequest {
  Operator op = Operator::mm_all_reduce;
  std::int64_t m = 0, n = 0, k = 0;
  Mode mode = Mode::plain;
  DType in_dtype = DType::f16;
  DType out_dtype = DType::f16;
  int threads = 1;             // GEMM threads per rank
  std::int64_t comm_turn = 0;  // > 0: exactly that many tiles (capped at m)
  // The group's size: all_gather_mm's m is that many ranks' blocks of rows.
  int ranks = 1;
  // Whether the reduce runs on a core of its own, alongside the GEMM (else
  // it takes turns with the GEMM on the GEMM's cores, and only its time off
  // the CPU, reduce_cpu_share's complement, overlaps the GEMM).
  bool reduce_has_own_core = false;
};

// The cost model's constants, measured on this machine by each rank, then
// agreed (the slowest rank's figure), so that every rank plans alike.
struct CostConstants {
  // GEMM: one compute_rows call of r rows takes
  //   max(2 r n k / gemm_flops + gemm_call_seconds, gemm_pass_seconds),
  // the pass being what any call costs at least: reading the prepared weight
  // once (a call of one row). Few rows per call are bound by the pass (a
  // decode step), many by the arithmetic. gemm_call_seconds is what cutting
  // rows into one more call adds: each call reads the weight again, which a
  // long call overlaps with its arithmetic only in part (f16, K=2048, N=8192,
  // one thread: calls of 168 to 512 rows ran 6-11% slower than one call; at
  // K=128, whose weight stays in cache, they cost nothing more).
  double gemm_flops = 0;
  double gemm_pass_seconds = 0;
  double gemm_call_seconds = 0;
  // One tile's all-reduce from the transport's buffer, in wall time:
  // seconds = reduce_round_seconds + bytes * reduce_seconds_per_byte.
  double reduce_round_seconds = 0;
  double reduce_seconds_per_byte = 0;
  // The part of that time the rank's thread spends on its core (the rest it
  // waits for the wire or for peers). Where the reduce takes turns with the
  // GEMM on the same cores, only this part competes with the GEMM: about 1
  // for shared memory (the reduce is the CPU's own loads and adds), little
  // for MPI across hosts (the bytes are on the network).
  double reduce_cpu_share = 1;
  // The part of that time that another reduce in flight can use too: 2 less
  // the time of two reduces started together over that of one. About 0 for
  // shared memory (the same cores and memory do both) and where one reduce
  // keeps the link busy; more across hosts, where a reduce also waits for
  // its peers' steps and the link idles meanwhile.
  double reduce_overlap = 0;
  // The plain all-reduce copies its private input into the transport first:
  // bytes * this more, on top of the reduce.
  double copy_seconds_per_byte = 0;
  // Largest tile the transport takes without a copy, and tiles in flight.
  std::int64_t buffer_bytes = 0;
  int max_in_flight = 1;
};

struct TilePlan {
  std::vector<std::int64_t> tile_rows;  // along M, in order; they sum to m
  // At most this many rows per GEMM call between two polls of the
  // transport (interleaved progress); a tile's blocks are of equal size.
  std::int64_t poll_rows = 0;
  double predicted_seconds = 0;         // the plan, under the cost model
  double predicted_serial_seconds = 0;  // GEMM of all rows, then one all-reduce
  std::string reason;                   // why this shape of plan, in words
};

// The request for one rank's validated call (its operator, GEMM and
// comm_turn), with its own k and GEMM threads.
PlanRequest make_request(Operator op, const GemmProblem& shape, std::int64_t comm_turn, int threads,
                         bool reduce_has_own_core);

// The request with the facts that may differ between ranks agreed (one
// all_gather; collective): the largest k and n, the fewest threads, and a core of
// its own for the reduce only where every rank has one. The operator gets the
// same from its agreement step instead.
PlanRequest agree_request(comm::Communicator& comm, PlanRequest request);

// The plan for `request` under `constants`: a pure function, the same on
// every rank given the same inputs.
TilePlan make_plan(const PlanRequest& request, const CostConstants& constants);

// The plan for a call on `comm` whose GEMM is `gemm` (collective: every rank
// calls it, in the same order, with the same agreed request). The transport's constants
// are measured on the first call that needs them, the GEMM's on the first
// call of each (mode, dtypes, n, k, threads), each agreed across the ranks and
// cached for the communicator's life: a few milliseconds, once. `constants`,
// when not null, receives the constants the plan used.
TilePlan plan_call(comm::Communicator& comm, const gemm::PreparedGemm& gemm,
                   const PlanRequest& request, CostConstants* constants = nullptr);

// Forgets this rank's constants measured on `comm`, and its plans: the next
// plan_call measures them again, collectively, so every rank forgets them
// at the same point of its calls. (Run with TPFUSE_CHECK_CACHES=1, ranks that
// do not are named at their next lookup.)
void forget_measurements(const comm::Communicator& comm);

// The plan plan_call would return, where that needs nothing measured or
// agreed (it is in this rank's cache, or needs no constants); nullopt
// otherwise. Not collective: a rank may call it alone.
std::optional<TilePlan> cached_plan(const comm::Communicator& comm, const PlanRequest& request);

// A readable account of a plan: the tiles, the constants and the prediction.
std::string describe_plan(const PlanRequest& request, const CostConstants& constants,
                          const TilePlan& plan);

}  // namespace tpfuse::pipeline
