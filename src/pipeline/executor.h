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
  // Once a tile's all-reduce has completed: work on its reduced rows
  // [m0, m1) of `out` (the add and normalise of mm_all_reduce_add_rms_norm),
  // or none.
  std::function<void(std::int64_t m0, std::int64_t m1)> finish_rows;
};

// The stages of that schedule; the GEMM polls between blocks of at most
// poll_rows rows (0: never) when its thread advances the all-reduces.
std::unique_ptr<TileStages> gemm_all_reduce_stages(const TileJob& job, std::int64_t poll_rows);

// Runs `plan` with those stages (execute()).
void execute_plan(const TilePlan& plan, const TileJob& job);

// all_gather_base_mm's schedule: begin starts gathering every rank's x1
// block into `gathered`; tile t is rows [m0, m1) counted from this rank's
// own block on (wrapping around the end), so the GEMM starts on the block
// that is here, and each tile waits only for the blocks it reads.
struct GatherJob {
  const gemm::PreparedGemm* gemm = nullptr;  // over `gathered`, every row
  comm::Communicator* comm = nullptr;
  const void* x1 = nullptr;  // this rank's [rows, k]
  std::int64_t rows = 0, k = 0;
  DType x1_dtype = DType::f16;
  void* gathered = nullptr;  // [ranks * rows, k]
  // The quant path's per-row scales, gathered alongside: [rows] f32 into
  // [ranks * rows], or null.
  const float* x1_scale = nullptr;
  float* gathered_scale = nullptr;
  std::int64_t n = 0;
  DType out_dtype = DType::f16;
  void* out = nullptr;  // [ranks * rows, n]
  std::function<void(std::int64_t tile)> after_tile_computed;
};
std::unique_ptr<TileStages> all_gather_gemm_stages(const GatherJob& job);

// mm_reduce_scatter_base's schedule: each tile's GEMM rows into `partials`,
// then their reduce-scatter: rank r keeps the rows of [r * m / p,
// (r + 1) * m / p) that the tile holds, in its `out`.
struct ReduceScatterJob {
  const gemm::PreparedGemm* gemm = nullptr;
  comm::Communicator* comm = nullptr;
  std::int64_t m = 0, n = 0;
  DType dtype = DType::f16;
  void* partials = nullptr;  // [m, n]: this rank's GEMM rows
  void* out = nullptr;       // [m / p, n]
  ProgressMode progress = ProgressMode::interleaved;
  std::function<void(std::int64_t tile)> after_tile_computed;
};
std::unique_ptr<TileStages> gemm_reduce_scatter_stages(const ReduceScatterJob& job,
                                                       std::int64_t poll_rows);

// The call's first round carrying its header (Communicator::checked_all_reduce_start):
// a plan of one tile that fits a reduce buffer, computed and reduced in
// that round; or, with a null job, a round without data. Null when every
// rank's digest matched (the tile's result is in job.out); else every rank's
// header, and nothing was summed: job.out is untouched. On an error `comm`
// is aborted, as execute() does, and the error rethrown.
using Mismatch = std::optional<std::vector<comm::CallHeader>>;
Mismatch execute_checked_tile(const TileJob& job, std::int64_t m, const comm::CallHeader& header);
Mismatch checked_round(comm::Communicator& comm, const comm::CallHeader& header);

}  // namespace tpfuse::pipeline
