// The executor: runs a tile plan for one call, the GEMM producing each tile
// straight into the transport's buffer and the transport reducing finished
// tiles while later ones are computed. See executor.cc for why it is built
// the way it is.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "tpfuse/comm/communicator.h"
#include "tpfuse/gemm/tile_gemm.h"
#include "tpfuse/pipeline/plan.h"

namespace tpfuse::pipeline {

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

struct TileJob {
  const gemm::PreparedGemm* gemm = nullptr;
  comm::Communicator* comm = nullptr;
  std::int64_t n = 0;
  DType dtype = DType::f16;
  void* out = nullptr;  // [m, n] row-major, dtype: the reduced result
  ProgressMode progress = ProgressMode::interleaved;
  // Called after a tile's GEMM, before its all-reduce starts (tests stall or
  // kill a rank there).
  std::function<void(std::int64_t tile)> after_tile_computed;
};

// Runs `plan` (collective: every rank runs the same plan). On an error the
// communicator is aborted, so the peers fail at once rather than at their
// deadline, and the error is rethrown.
void execute_plan(const TilePlan& plan, const TileJob& job);

// The call's first round carrying its header (Communicator::checked_all_reduce_start):
// a plan of one tile that fits a reduce buffer, computed and reduced in
// that round; or, with a null job, a round without data. Null when every
// rank's digest matched (the tile's result is in job.out); else every rank's
// header, and nothing was summed: job.out is untouched.
using Mismatch = std::optional<std::vector<comm::CallHeader>>;
Mismatch execute_checked_tile(const TileJob& job, std::int64_t m, const comm::CallHeader& header);
Mismatch checked_round(comm::Communicator& comm, const comm::CallHeader& header);

}  // namespace tpfuse::pipeline
