// The executor of a tile plan.
//
// Why the pipeline looks like this. Tile t's rows go straight from the GEMM's
// epilogue into the buffer the transport hands out for round t (its shared
// slot: no copy), and the all-reduce of round t then runs while tiles t+1,
// t+2, ... are computed. The transport keeps max_reduces_in_flight() (3)
// slots per rank: one being filled, one being reduced, and one of slack, so
// that a peer a tile behind does not stall this rank's GEMM; acquiring the
// slot for tile t waits only for tile t-3 to be read by every rank.
//
// Who advances the all-reduces matters on a CPU, where the reduce is work
// for the same cores as the GEMM. Interleaved (the default): the GEMM's
// thread polls the transport after each tile (and between blocks of a tile
// where the weight is cheap to read again), and reduces whatever round is
// ready; a round that is not ready is left for the next poll, so nothing
// waits until the last tile. Helper thread: a thread of its own sleeps in
// the transport's wait and reduces each round as soon as it is ready.
//
// Measured with 2 ranks pinned one per core (M=4096, N=8192, K=256, medians
// of 15, f16 and bf16, three runs each), the two were equal within the run-
// to-run noise: hidden fractions of 0.4 to 1.0 for either, fused / serial
// 0.80 to 0.95 for either; at K=4096 both were within 2% of serial. That
// much is hidden on a shared core because the GEMM writes each tile into
// shared memory itself (no copy-in) and the reduce writes the output around
// the caches, its stores draining while the GEMM computes. With nothing to
// choose on speed, interleaved is the default for shm: no second thread,
// nothing left to the scheduler. A helper pays off where the rank has a spare
// core, which thread_budget then leaves it (the GEMM gets one core fewer);
// this 2-core machine could not measure that case. It is the default for MPI,
// whose data moves over TCP only while MPI is called: between two hosts at
// 1 Gbit/s (256x4096x512, 8 tiles) fused took 116 ms polling between blocks
// against 37 ms with the helper thread, serial about 80 ms.
#include "pipeline/executor.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "core/fault_hooks.h"
#include "core/trace.h"
#include "tpfuse/core/config.h"
#include "tpfuse/core/error.h"

namespace tpfuse::pipeline {

namespace {

const EnvSetting<std::string> kProgressMode{
    "TPFUSE_PIPELINE_PROGRESS", "auto",
    "who advances the fused operator's all-reduces: interleaved (the GEMM's thread, between "
    "blocks of rows), helper_thread, or auto (helper_thread for transports that move data only "
    "while called, such as MPI; else interleaved)"};

// The tiles whose collectives are in flight, oldest first, and whoever
// advances them; each tile's finish stage runs once its collective has
// completed, in tile order.
struct Pending {
  std::unique_ptr<comm::Work> work;  // null: no collective
  std::function<void()> finish;
  bool done() const { return work == nullptr || work->test(); }
};

class InFlight {
 public:
  virtual ~InFlight() = default;
  virtual void add(Pending pending) = 0;
  // Called between blocks of rows.
  virtual void poll() = 0;
  // Waits until every tile added has finished.
  virtual void finish() = 0;
};

// The producing thread advances the collectives itself, between blocks.
class PolledInFlight final : public InFlight {
 public:
  void add(Pending pending) override {
    pending_.push_back(std::move(pending));
    poll();
  }
  void poll() override {
    // Completion is in order, and the transport advances every collective
    // in flight when asked about the oldest.
    while (!pending_.empty() && pending_.front().done()) pop();
  }
  void finish() override {
    while (!pending_.empty()) {
      if (pending_.front().work) pending_.front().work->wait();
      pop();
    }
  }

 private:
  void pop() {
    Pending oldest = std::move(pending_.front());
    pending_.pop_front();
    if (oldest.finish) oldest.finish();
  }

  std::deque<Pending> pending_;
};

// A thread of its own advances the collectives while the tiles are produced.
class HelperThreadInFlight final : public InFlight {
 public:
  HelperThreadInFlight() : thread_([this] { run(); }) {}
  ~HelperThreadInFlight() override { close(); }

  void add(Pending pending) override {
    {
      const std::lock_guard lock(mutex_);
      pending_.push_back(std::move(pending));
    }
    wake_.notify_one();
    poll();
  }
  void poll() override {
    const std::lock_guard lock(mutex_);
    if (error_) std::rethrow_exception(error_);
  }
  void finish() override {
    close();
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void close() {
    {
      const std::lock_guard lock(mutex_);
      closing_ = true;
    }
    wake_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

  // Waits on each collective in turn: the transport's bounded wait sleeps
  // until a peer moves, so an idle helper costs the producer nothing
  // (polling every few tens of microseconds instead would take its core
  // that often).
  void run() {
    try {
      while (true) {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return !pending_.empty() || closing_; });
        if (pending_.empty()) return;
        // Only this thread removes entries; the producer only appends, which
        // leaves the front element where it is.
        Pending& oldest = pending_.front();
        lock.unlock();
        if (oldest.work) oldest.work->wait();
        if (oldest.finish) oldest.finish();
        lock.lock();
        pending_.pop_front();
      }
    } catch (...) {
      const std::lock_guard lock(mutex_);
      error_ = std::current_exception();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Pending> pending_;
  bool closing_ = false;
  std::exception_ptr error_;
  std::thread thread_;  // last: it starts once the members above exist
};

std::unique_ptr<InFlight> make_in_flight(ProgressMode mode) {
  if (mode == ProgressMode::helper_thread) return std::make_unique<HelperThreadInFlight>();
  return std::make_unique<PolledInFlight>();
}

void run_tiles(const TilePlan& plan, TileStages& stages, InFlight& in_flight) {
  stages.begin();
  const std::function<void()> poll = [&in_flight] { in_flight.poll(); };
  std::int64_t m0 = 0;
  for (std::size_t t = 0; t < plan.tile_rows.size(); ++t) {
    const Tile tile{t, m0, m0 + plan.tile_rows[t]};
    stages.await_input(tile);
    stages.produce(tile, poll);
    in_flight.add({stages.communicate(tile), [&stages, tile] { stages.finish(tile); }});
    m0 = tile.m1;
  }
  in_flight.finish();
}

// Rows [m0, m1) of `gemm` into `dst` (row m0 first, rows of row_bytes), in
// `blocks` calls of about the same size (a short last block would still
// pay a whole pass over the weight), polling after each.
void compute_rows_polled(const gemm::PreparedGemm& gemm, std::int64_t m0, std::int64_t m1,
                         std::byte* dst, std::int64_t n, std::size_t row_bytes, std::int64_t blocks,
                         const std::function<void()>& poll) {
  const std::int64_t rows = m1 - m0;
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::int64_t begin = m0 + rows * b / blocks;
    const std::int64_t end = m0 + rows * (b + 1) / blocks;
    test_hooks::fault_point(test_hooks::FaultPoint::gemm_block);
    {
      trace::Span span("gemm", "gemm");
      if (span.active()) {
        span.args().add("row_begin", begin).add("row_end", end).add("engine", gemm.engine());
      }
      gemm.compute_rows(begin, end, dst + static_cast<std::size_t>(begin - m0) * row_bytes, n);
    }
    poll();
  }
}

// The blocks a tile is computed in: of at most poll_rows rows where the
// GEMM's thread advances the collectives, else one.
std::int64_t blocks_of(const Tile& tile, ProgressMode progress, std::int64_t poll_rows) {
  const std::int64_t rows = tile.m1 - tile.m0;
  if (progress != ProgressMode::interleaved || poll_rows <= 0) return 1;
  return (rows + poll_rows - 1) / poll_rows;
}

// GEMM then all-reduce: tile t's rows go into the reduce buffer of round t
// (or, for a tile larger than the transport's buffers, into the output,
// copied in by a plain all-reduce).
class GemmAllReduceStages final : public TileStages {
 public:
  GemmAllReduceStages(const TileJob& job, std::int64_t poll_rows)
      : job_(job),
        poll_rows_(poll_rows),
        row_bytes_(static_cast<std::size_t>(job.n) * dtype_size(job.dtype)) {}

  void produce(const Tile& tile, const std::function<void()>& poll) override {
    comm::Communicator& comm = *job_.comm;
    const std::size_t count = elements(tile);
    std::byte* dst = out_rows(tile);
    buffer_.reset();
    if (count * dtype_size(job_.dtype) <= comm.max_reduce_buffer_bytes()) {
      buffer_ = comm.acquire_reduce_buffer(count, job_.dtype);
      dst = buffer_->data;
    }
    compute_rows_polled(*job_.gemm, tile.m0, tile.m1, dst, job_.n, row_bytes_,
                        blocks_of(tile, job_.progress, poll_rows_), poll);
    if (job_.after_tile_computed) job_.after_tile_computed(static_cast<std::int64_t>(tile.index));
  }

  std::unique_ptr<comm::Work> communicate(const Tile& tile) override {
    comm::Communicator& comm = *job_.comm;
    if (buffer_) {
      auto work = comm.all_reduce_start(std::move(*buffer_), out_rows(tile));
      buffer_.reset();
      return work;
    }
    return comm.all_reduce_start(out_rows(tile), out_rows(tile), elements(tile), job_.dtype);
  }

  void finish(const Tile& tile) override {
    if (job_.finish_rows) job_.finish_rows(tile.m0, tile.m1);
  }

  // The tile's all-reduce as the call's checked round (see execute_checked_tile).
  std::unique_ptr<comm::CheckedWork> communicate_checked(const Tile& tile,
                                                         const comm::CallHeader& header) {
    if (!buffer_) {
      throw InternalError(cat("the call's one round needs its ", elements(tile),
                              " elements in a reduce buffer, which holds at most ",
                              job_.comm->max_reduce_buffer_bytes(), " bytes"));
    }
    auto work = job_.comm->checked_all_reduce_start(std::move(*buffer_), out_rows(tile), header);
    buffer_.reset();
    return work;
  }

 private:
  std::size_t elements(const Tile& tile) const {
    return static_cast<std::size_t>(tile.m1 - tile.m0) * static_cast<std::size_t>(job_.n);
  }
  std::byte* out_rows(const Tile& tile) const {
    return static_cast<std::byte*>(job_.out) + static_cast<std::size_t>(tile.m0) * row_bytes_;
  }

  TileJob job_;
  std::int64_t poll_rows_;
  std::size_t row_bytes_;
  std::optional<comm::ReduceBuffer> buffer_;  // the tile's, between produce and communicate
};

// Gather then GEMM (GatherJob).
class GatherGemmStages final : public TileStages {
 public:
  explicit GatherGemmStages(const GatherJob& job)
      : job_(job),
        ranks_(job.comm->size()),
        rank_(job.comm->rank()),
        total_(job.rows * ranks_),
        row_bytes_(static_cast<std::size_t>(job.n) * dtype_size(job.out_dtype)) {}

  void begin() override {
    comm::Communicator& comm = *job_.comm;
    const auto ranks = static_cast<std::size_t>(ranks_);
    if (job_.x1_scale != nullptr) {
      // A few bytes a rank; the gather of x1 below would complete it first
      // anyway (one gather in flight at a time).
      const std::vector<std::size_t> counts(ranks, static_cast<std::size_t>(job_.rows));
      comm.all_gather_start(job_.x1_scale, job_.gathered_scale, counts, DType::f32)->wait();
    }
    const std::vector<std::size_t> counts(ranks, static_cast<std::size_t>(job_.rows * job_.k));
    gather_ = comm.all_gather_start(job_.x1, job_.gathered, counts, job_.x1_dtype);
  }

  void await_input(const Tile& tile) override {
    for_each_part(tile, [&](std::int64_t r0, std::int64_t r1) {
      for (std::int64_t block = r0 / job_.rows; block * job_.rows < r1; ++block) {
        gather_->wait(static_cast<int>(block));
      }
    });
  }

  void produce(const Tile& tile, const std::function<void()>& poll) override {
    const std::function<void()> advance = [&] {
      poll();
      gather_->test();
    };
    for_each_part(tile, [&](std::int64_t r0, std::int64_t r1) {
      compute_rows_polled(*job_.gemm, r0, r1, out_rows(r0), job_.n, row_bytes_, 1, advance);
    });
    if (job_.after_tile_computed) job_.after_tile_computed(static_cast<std::int64_t>(tile.index));
  }

  // The last tile hands the gather to the executor, which waits for all of
  // it (every block has landed by then; the transport may still be
  // finishing its rounds).
  std::unique_ptr<comm::Work> communicate(const Tile& tile) override {
    if (tile.m1 == total_) return std::move(gather_);
    return nullptr;
  }

 private:
  // The tile's rows, counted from this rank's block on, as at most two
  // ranges of the gathered rows.
  template <class Body>
  void for_each_part(const Tile& tile, Body&& body) const {
    const std::int64_t start = (tile.m0 + rank_ * job_.rows) % total_;
    const std::int64_t rows = tile.m1 - tile.m0;
    const std::int64_t first = std::min(rows, total_ - start);
    body(start, start + first);
    if (first < rows) body(0, rows - first);
  }
  std::byte* out_rows(std::int64_t row) const {
    return static_cast<std::byte*>(job_.out) + static_cast<std::size_t>(row) * row_bytes_;
  }

  GatherJob job_;
  int ranks_, rank_;
  std::int64_t total_;
  std::size_t row_bytes_;
  std::unique_ptr<comm::GatherWork> gather_;
};

// GEMM then reduce-scatter (ReduceScatterJob).
class GemmReduceScatterStages final : public TileStages {
 public:
  GemmReduceScatterStages(const ReduceScatterJob& job, std::int64_t poll_rows)
      : job_(job),
        poll_rows_(poll_rows),
        ranks_(job.comm->size()),
        shard_rows_(job.m / ranks_),
        row_bytes_(static_cast<std::size_t>(job.n) * dtype_size(job.dtype)) {}

  void produce(const Tile& tile, const std::function<void()>& poll) override {
    compute_rows_polled(*job_.gemm, tile.m0, tile.m1, partial_rows(tile.m0), job_.n, row_bytes_,
                        blocks_of(tile, job_.progress, poll_rows_), poll);
    if (job_.after_tile_computed) job_.after_tile_computed(static_cast<std::int64_t>(tile.index));
  }

  std::unique_ptr<comm::Work> communicate(const Tile& tile) override {
    // Rank r's shard of the tile: its rows of [r * m / p, (r + 1) * m / p).
    std::vector<std::size_t> counts(static_cast<std::size_t>(ranks_));
    for (int r = 0; r < ranks_; ++r) {
      const std::int64_t from = std::max(tile.m0, r * shard_rows_);
      const std::int64_t to = std::min(tile.m1, (r + 1) * shard_rows_);
      counts[static_cast<std::size_t>(r)] =
          static_cast<std::size_t>(std::max<std::int64_t>(0, to - from) * job_.n);
    }
    const std::int64_t mine = job_.comm->rank() * shard_rows_;
    const std::int64_t first = std::clamp(tile.m0, mine, mine + shard_rows_) - mine;
    std::byte* out =
        static_cast<std::byte*>(job_.out) + static_cast<std::size_t>(first) * row_bytes_;
    return job_.comm->reduce_scatter_start(partial_rows(tile.m0), out, counts, job_.dtype);
  }

 private:
  std::byte* partial_rows(std::int64_t row) const {
    return static_cast<std::byte*>(job_.partials) + static_cast<std::size_t>(row) * row_bytes_;
  }

  ReduceScatterJob job_;
  std::int64_t poll_rows_;
  int ranks_;
  std::int64_t shard_rows_;
  std::size_t row_bytes_;
};

}  // namespace

ProgressMode progress_mode_for(const comm::Communicator& comm) {
  const std::string& name = kProgressMode.get();
  if (name == "interleaved") return ProgressMode::interleaved;
  if (name == "helper_thread") return ProgressMode::helper_thread;
  if (name == "auto") {
    return comm.progresses_only_when_called() ? ProgressMode::helper_thread
                                              : ProgressMode::interleaved;
  }
  throw InvalidArgument(cat(kProgressMode.name(),
                            ": expected auto, interleaved or helper_thread, got \"", name, "\""));
}

ThreadBudget thread_budget(ProgressMode mode, int ranks_on_host) {
  const int cores = gemm::default_gemm_threads(ranks_on_host);
  if (mode == ProgressMode::helper_thread && cores >= 2) return {cores - 1, true};
  return {cores, false};
}

void execute(const TilePlan& plan, TileStages& stages, comm::Communicator& comm,
             ProgressMode progress) {
  // Destroyed after the abort below: its collectives then fail at once
  // instead of waiting for peers that wait for us.
  const auto in_flight = make_in_flight(progress);
  try {
    run_tiles(plan, stages, *in_flight);
  } catch (const std::exception& error) {
    comm.abort(cat("rank ", comm.rank(), " stopped its tile pipeline: ", error.what()));
    throw;
  }
}

std::unique_ptr<TileStages> gemm_all_reduce_stages(const TileJob& job, std::int64_t poll_rows) {
  return std::make_unique<GemmAllReduceStages>(job, poll_rows);
}

std::unique_ptr<TileStages> all_gather_gemm_stages(const GatherJob& job) {
  return std::make_unique<GatherGemmStages>(job);
}

std::unique_ptr<TileStages> gemm_reduce_scatter_stages(const ReduceScatterJob& job,
                                                       std::int64_t poll_rows) {
  return std::make_unique<GemmReduceScatterStages>(job, poll_rows);
}

void execute_plan(const TilePlan& plan, const TileJob& job) {
  // One tile leaves nothing to overlap: this thread computes it in one go
  // and waits for its reduce itself, as a plain all-reduce would. A helper
  // thread would only add a thread that, on a busy core, waits its turn
  // before the reduce moves: 2-4 ms a call across 4 emulated hosts on 2 cores.
  TileJob run = job;
  const bool one_tile = plan.tile_rows.size() == 1;
  if (one_tile) run.progress = ProgressMode::interleaved;
  // With one tile, nothing is in flight to poll for between blocks.
  GemmAllReduceStages stages(run, one_tile ? 0 : plan.poll_rows);
  execute(plan, stages, *job.comm, run.progress);
}

namespace {

Mismatch finish_checked(comm::CheckedWork& work) {
  work.wait();
  if (const std::vector<comm::CallHeader>* headers = work.mismatch()) return *headers;
  return std::nullopt;
}

}  // namespace

Mismatch execute_checked_tile(const TileJob& job, std::int64_t m, const comm::CallHeader& header) {
  comm::Communicator& comm = *job.comm;
  try {
    TileJob run = job;
    run.progress = ProgressMode::interleaved;
    GemmAllReduceStages stages(run, 0);
    const Tile tile{0, 0, m};
    stages.produce(tile, [] {});
    Mismatch mismatch = finish_checked(*stages.communicate_checked(tile, header));
    if (!mismatch) stages.finish(tile);
    return mismatch;
  } catch (const std::exception& error) {
    comm.abort(cat("rank ", comm.rank(), " stopped its tile pipeline: ", error.what()));
    throw;
  }
}

Mismatch checked_round(comm::Communicator& comm, const comm::CallHeader& header) {
  try {
    return finish_checked(
        *comm.checked_all_reduce_start(comm.acquire_reduce_buffer(0, DType::f16), nullptr, header));
  } catch (const std::exception& error) {
    // The peers that got through the round go on to the call's tiles and
    // would wait for this rank there until their deadline.
    comm.abort(cat("rank ", comm.rank(), " stopped in the call's first round: ", error.what()));
    throw;
  }
}

}  // namespace tpfuse::pipeline
