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

#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

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

// The all-reduces in flight, oldest first, and whoever advances them.
class InFlight {
 public:
  virtual ~InFlight() = default;
  virtual void add(std::unique_ptr<comm::Work> work) = 0;
  // Called between blocks of GEMM rows.
  virtual void poll() = 0;
  // Waits until every all-reduce added has completed.
  virtual void finish() = 0;
};

// The GEMM's thread advances the all-reduces itself, between blocks.
class PolledInFlight final : public InFlight {
 public:
  void add(std::unique_ptr<comm::Work> work) override {
    works_.push_back(std::move(work));
    poll();
  }
  void poll() override {
    // Completion is in order, and the transport advances every all-reduce
    // in flight when asked about the oldest.
    while (!works_.empty() && works_.front()->test()) works_.pop_front();
  }
  void finish() override {
    for (auto& work : works_) work->wait();
    works_.clear();
  }

 private:
  std::deque<std::unique_ptr<comm::Work>> works_;
};

// A thread of its own advances the all-reduces while the GEMM computes.
class HelperThreadInFlight final : public InFlight {
 public:
  HelperThreadInFlight() : thread_([this] { run(); }) {}
  ~HelperThreadInFlight() override { close(); }

  void add(std::unique_ptr<comm::Work> work) override {
    {
      const std::lock_guard lock(mutex_);
      works_.push_back(std::move(work));
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

  // Waits on each all-reduce in turn: the transport's bounded wait sleeps
  // until a peer moves, so an idle helper costs the GEMM nothing (polling
  // every few tens of microseconds instead would take its core that often).
  void run() {
    try {
      while (true) {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return !works_.empty() || closing_; });
        if (works_.empty()) return;
        // Only this thread removes works; the GEMM's thread only appends, which
        // leaves the front element where it is.
        comm::Work& oldest = *works_.front();
        lock.unlock();
        oldest.wait();
        lock.lock();
        works_.pop_front();
      }
    } catch (...) {
      const std::lock_guard lock(mutex_);
      error_ = std::current_exception();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::unique_ptr<comm::Work>> works_;
  bool closing_ = false;
  std::exception_ptr error_;
  std::thread thread_;  // last: it starts once the members above exist
};

std::unique_ptr<InFlight> make_in_flight(ProgressMode mode) {
  if (mode == ProgressMode::helper_thread) return std::make_unique<HelperThreadInFlight>();
  return std::make_unique<PolledInFlight>();
}

// Rows [m0, m1) into `dst` (row stride n), polling between blocks of at
// most poll_rows rows, all of about the same size (a short last block would
// still pay a whole pass over the weight).
void compute_tile(const TileJob& job, std::int64_t m0, std::int64_t m1, std::int64_t poll_rows,
                  std::byte* dst, InFlight& in_flight) {
  const std::size_t row_bytes = static_cast<std::size_t>(job.n) * dtype_size(job.dtype);
  const std::int64_t rows = m1 - m0;
  const std::int64_t blocks = job.progress == ProgressMode::interleaved && poll_rows > 0
                                  ? (rows + poll_rows - 1) / poll_rows
                                  : 1;
  for (std::int64_t b = 0; b < blocks; ++b) {
    const std::int64_t begin = m0 + rows * b / blocks;
    const std::int64_t end = m0 + rows * (b + 1) / blocks;
    test_hooks::fault_point(test_hooks::FaultPoint::gemm_block);
    {
      trace::Span span("gemm", "gemm");
      if (span.active())
        span.args().add("row_begin", begin).add("row_end", end).add("engine", job.gemm->engine());
      job.gemm->compute_rows(begin, end, dst + static_cast<std::size_t>(begin - m0) * row_bytes,
                             job.n);
    }
    in_flight.poll();
  }
}

void run_tiles(const TilePlan& plan, const TileJob& job, InFlight& in_flight) {
  comm::Communicator& comm = *job.comm;
  const std::size_t element = dtype_size(job.dtype);
  const std::size_t row_bytes = static_cast<std::size_t>(job.n) * element;
  auto* out = static_cast<std::byte*>(job.out);
  // With one tile, nothing is in flight to poll for between blocks.
  const std::int64_t poll_rows = plan.tile_rows.size() == 1 ? plan.tile_rows[0] : plan.poll_rows;
  std::int64_t m0 = 0;
  for (std::size_t t = 0; t < plan.tile_rows.size(); ++t) {
    const std::int64_t m1 = m0 + plan.tile_rows[t];
    std::byte* out_rows = out + static_cast<std::size_t>(m0) * row_bytes;
    const std::size_t count = static_cast<std::size_t>(m1 - m0) * static_cast<std::size_t>(job.n);
    if (count * element <= comm.max_reduce_buffer_bytes()) {
      comm::ReduceBuffer buffer = comm.acquire_reduce_buffer(count, job.dtype);
      compute_tile(job, m0, m1, poll_rows, buffer.data, in_flight);
      if (job.after_tile_computed) job.after_tile_computed(static_cast<std::int64_t>(t));
      in_flight.add(comm.all_reduce_start(std::move(buffer), out_rows));
    } else {
      // A tile larger than the transport's buffers: computed in place, copied in.
      compute_tile(job, m0, m1, poll_rows, out_rows, in_flight);
      if (job.after_tile_computed) job.after_tile_computed(static_cast<std::int64_t>(t));
      in_flight.add(comm.all_reduce_start(out_rows, out_rows, count, job.dtype));
    }
    m0 = m1;
  }
  in_flight.finish();
}

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

void execute_plan(const TilePlan& plan, const TileJob& job) {
  // One tile leaves nothing to overlap: this thread computes it in one go
  // and waits for its reduce itself, as a plain all-reduce would. A helper
  // thread would only add a thread that, on a busy core, waits its turn
  // before the reduce moves: 2-4 ms a call across 4 emulated hosts on 2 cores.
  TileJob run = job;
  if (plan.tile_rows.size() == 1) run.progress = ProgressMode::interleaved;
  // Destroyed after the abort below: its all-reduces then fail at once
  // instead of waiting for peers that wait for us.
  const auto in_flight = make_in_flight(run.progress);
  try {
    run_tiles(plan, run, *in_flight);
  } catch (const std::exception& error) {
    job.comm->abort(cat("rank ", job.comm->rank(), " stopped its tile pipeline: ", error.what()));
    throw;
  }
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
    const std::size_t count = static_cast<std::size_t>(m) * static_cast<std::size_t>(job.n);
    comm::ReduceBuffer buffer = comm.acquire_reduce_buffer(count, job.dtype);
    PolledInFlight nothing_in_flight;
    compute_tile(job, 0, m, m, buffer.data, nothing_in_flight);
    if (job.after_tile_computed) job.after_tile_computed(0);
    return finish_checked(*comm.checked_all_reduce_start(std::move(buffer), job.out, header));
  } catch (const std::exception& error) {
    comm.abort(cat("rank ", comm.rank(), " stopped its tile pipeline: ", error.what()));
    throw;
  }
}

Mismatch checked_round(comm::Communicator& comm, const comm::CallHeader& header) {
  return finish_checked(
      *comm.checked_all_reduce_start(comm.acquire_reduce_buffer(0, DType::f16), nullptr, header));
}

}  // namespace tpfuse::pipeline
