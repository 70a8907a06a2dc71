// The executor: runs a tile plan for one call through a schedule's stages,
// overlapping each tile's collective with the next tiles' work; and the
// stages of mm_all_reduce_base, the GEMM producing each tile straight into
// the transport's buffer. See executor.cc for why it is built the way it is.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "tpfuse/comm/communicator.h"
#include "tpfuse/gemm/tile_gemm.h"
#include "tpfuse/pipeline/plan.h"

namespace tpfuse::pipeline {

// One tile of a schedule: rows [m0, m1) of the call's output, the index-th.
struct Tile {
  std::size_t index = 0;
  std::int64_t m0 = 0, m1 = 0;
};

// A schedule's work on each tile, in stages that the executor runs in order:
// await_input (the tile's input has arrived, e.g. a gathered block), produce
// (its rows, calling `poll` between blocks so that the collectives in flight
// advance), communicate (start its collective, if any) and, once that has
// completed, finish (work on its result, e.g. add and normalise). begin()
// runs before the first tile (e.g. starts the gather of the input). Tiles
// are produced in order and finished in order; finish runs on the thread
// that advances the collectives (ProgressMode), perhaps while later tiles
// are produced. So "GEMM then reduce" is produce + communicate, "gather then
// GEMM" begin + await_input + produce, "reduce then normalise" produce +
// communicate + finish: three schedules of one executor, and each stage may
// be run, and tested, alone.
class TileStages {
 public:
  virtual ~TileStages() = default;
  virtual void begin() {}
  virtual void await_input(const Tile& tile) { (void)tile; }
  virtual void produce(const Tile& tile, const std::function<void()>& poll) = 0;
  virtual std::unique_ptr<comm::Work> communicate(const Tile& tile) {
    (void)tile;
    return nullptr;
  }
  virtual void finish(const Tile& tile) { (void)tile; }
};

// Runs `stages` over the tiles of `plan` (collective: every rank runs the
// same plan), `progress` saying who advances the collectives in flight. On
// an error `comm` is aborted, so the peers fail at once rather than at their
// deadline, and the error is rethrown.
void execute(const TilePlan& plan, TileStages& stages, comm::Communicator& comm,
             ProgressMode progress);

// mm_all_reduce_base's schedule: each tile's GEMM rows straight into the
// transport's reduce buffer, then its all-reduce into `out`.
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

// The stages of that schedule; the GEMM polls between blocks of at most
// poll_rows rows (0: never) when its thread advances the all-reduces.
std::unique_ptr<TileStages> gemm_all_reduce_stages(const TileJob& job, std::int64_t poll_rows);

// Runs `plan` with those stages (execute()).
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
