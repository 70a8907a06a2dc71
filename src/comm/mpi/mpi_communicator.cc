// The MPI Communicator (see tpfuse/comm/mpi.h for its algorithm and
// guarantees): setup, the all-reduce's two phases, all_gather and abort.
//
// Every MPI call of a communicator is made under its mutex, so a helper
// thread advancing Works and the thread starting all-reduces never call MPI
// at once (MPI_THREAD_SERIALIZED is enough). Waits poll, paced by
// PollPacer, and give up the lock while they sleep.
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "comm/collective_math.h"
#include "comm/mpi/mpi_group.h"
#include "comm/mpi/mpi_notices.h"
#include "comm/mpi/mpi_requests.h"
#include "comm/poll_pacer.h"
#include "comm/shm_reduce_kernels.h"
#include "tpfuse/comm/hierarchical.h"
#include "tpfuse/comm/mpi.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"

namespace tpfuse::comm {

namespace {

using Clock = std::chrono::steady_clock;
using mpi::decode_notice;
using mpi::encode_notice;
using mpi::Failure;
using mpi::kStillWaiting;

// Tags: one for abort notices, one for all-gathers, and two per all-reduce
// (contributions, results), numbered by the collective so that all-reduces
// in flight at once never match each other's messages.
constexpr int kAbortTag = 1;
constexpr int kGatherTag = 2;
constexpr int kFirstReduceTag = 16;
constexpr std::uint64_t kReduceTagCycle = 4096;
constexpr std::size_t kMaxGatherBytes = 4096;
constexpr std::size_t kMaxAbortBytes = 1024;
constexpr int kMaxInFlight = 4;

// One collective in flight. The all-reduce: phase 1 exchanges contributions
// to each share, phase 2 the summed shares. The reduce-scatter is phase 1
// with the caller's shares; the all-gather, phase 2 with each rank's block
// as its share.
enum class Collective { all_reduce, reduce_scatter, all_gather };

struct Reduce {
  Collective kind = Collective::all_reduce;
  std::uint64_t index = 0;
  int tag = 0;
  const std::byte* input = nullptr;
  std::byte* output = nullptr;
  std::size_t count = 0;
  DType dtype = DType::f32;      // of the contributions
  DType out_dtype = DType::f32;  // of the result (f32 contributions may be rounded once to it)
  std::shared_ptr<std::byte[]> owned_input;  // a pipelined buffer's memory
  std::unique_ptr<std::byte[]> staging;      // the others' contributions to my share
  // Rank r's share is elements [shares[r], shares[r + 1]).
  std::vector<std::size_t> shares;
  mpi::Requests requests;
  int phase = 0;  // 1, 2; 3 once the result is in place
};

class MpiCommunicator;

class MpiWork final : public GatherWork {
 public:
  MpiWork(std::shared_ptr<MpiCommunicator> comm, std::shared_ptr<Reduce> reduce)
      : comm_(std::move(comm)), reduce_(std::move(reduce)) {}
  MpiWork(const MpiWork&) = delete;
  MpiWork& operator=(const MpiWork&) = delete;
  ~MpiWork() override;
  bool test() override;
  void wait() override;
  // An all-gather's: whether `rank`'s block has landed.
  bool test(int rank) override;
  void wait(int rank) override;

 private:
  std::shared_ptr<MpiCommunicator> comm_;
  std::shared_ptr<Reduce> reduce_;
};

class MpiCommunicator final : public Communicator,
                              public std::enable_shared_from_this<MpiCommunicator> {
 public:
  // Over `members`, ranks of `comm` in increasing order, this process among
  // them; rank() is this process's place in that list.
  MpiCommunicator(MPI_Comm comm, const MpiOptions& options, std::vector<int> members);
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  std::chrono::milliseconds timeout() const override { return timeout_; }
  std::size_t max_gather_bytes() const override { return kMaxGatherBytes; }
  int ranks_on_host() const override { return ranks_on_host_; }
  bool progresses_only_when_called() const override { return true; }
  std::string transport() const override { return "mpi"; }
  int hosts() const override {
    return static_cast<int>(std::set<std::string>(host_keys_.begin(), host_keys_.end()).size());
  }

  std::size_t max_reduce_buffer_bytes() const override { return std::size_t{1} << 30; }
  int max_reduces_in_flight() const override { return kMaxInFlight; }
  void abort(std::string_view reason) override;

  std::unique_ptr<Work> start(const void* input, void* output, std::size_t count, DType dtype,
                              DType out_dtype);
  const std::vector<std::string>& host_keys() const { return host_keys_; }

  // Learns the group's name and host layout (collective, at setup).
  void introduce();

  // Advances every collective in flight; true once `reduce` has completed,
  // or (rank >= 0) once rank's share of it has arrived.
  bool test(const std::shared_ptr<Reduce>& reduce, int rank = -1);
  // Polls test(reduce, rank) until it holds or the deadline passes.
  void wait(const std::shared_ptr<Reduce>& reduce, int rank = -1);

 protected:
  std::unique_ptr<Work> do_all_reduce_start(const void* input, void* output, std::size_t count,
                                            DType dtype) override;
  ReduceBuffer do_acquire_reduce_buffer(std::size_t count, DType dtype) override;
  std::unique_ptr<Work> do_all_reduce_start(ReduceBuffer buffer, void* output) override;
  // The sums cross the network in the output's dtype.
  std::unique_ptr<Work> do_all_reduce_rounding_start(const float* input, void* output,
                                                     std::size_t count, DType dtype) override {
    return start(input, output, count, DType::f32, dtype);
  }
  std::unique_ptr<Work> do_reduce_scatter_start(const void* input, void* output,
                                                std::span<const std::size_t> counts,
                                                DType dtype) override;
  std::unique_ptr<GatherWork> do_all_gather_start(const void* input, void* output,
                                                  std::span<const std::size_t> counts,
                                                  DType dtype) override;
  std::vector<std::string> do_all_gather(std::string_view mine) override;

 private:
  // Whether `reduce` is complete, or rank's share of it has arrived.
  bool reached_locked(const Reduce& reduce, int rank) const;
  // Posts phase 2: rank r's share to output at shares[r], mine from `mine`.
  void exchange_shares_locked(Reduce& reduce, const std::byte* mine);
  // Starts a reduce-scatter or an all-gather of `counts`.
  std::unique_ptr<MpiWork> start_sharded(Collective kind, const void* input, void* output,
                                         std::span<const std::size_t> counts, DType dtype);
  void check_failed_locked();
  void fail_locked(Failure failure);
  void poll_abort_locked();
  void advance_locked();
  void advance_locked(Reduce& reduce);
  std::shared_ptr<Reduce> start_locked(std::shared_ptr<Reduce> reduce);
  void wait_all_locked(std::unique_lock<std::mutex>& lock);
  // The deadline of one wait: three quarters in, this rank tells the others
  // it is alive and whom it waits for; at the deadline it fails, naming the
  // ranks it suspects.
  struct WaitClock {
    Clock::time_point start = Clock::now();
    bool announced = false;
  };
  // The ranks awaited and what for are asked of `requests` and `describe`
  // only once the notice or the deadline is due: a wait polls every few
  // microseconds, and building them each time was 2-3% of the CPU of a
  // fused call across 2 emulated hosts.
  template <class Describe>
  void check_deadline_locked(WaitClock& clock, const mpi::Requests& requests,
                             Describe&& describe);
  std::vector<int> suspects(const WaitClock& clock, const std::vector<int>& pending) const;
  void send_notice_locked(const std::string& notice);
  // Waits for `requests` with the deadline; names the ranks still missing.
  void wait_requests_locked(std::unique_lock<std::mutex>& lock, mpi::Requests& requests,
                            std::string_view operation, std::uint64_t index,
                            std::string_view step);

  // The rank of members_[r] in comm_, which messages and errors name.
  int to(int r) const { return members_[static_cast<std::size_t>(r)]; }

  MPI_Comm comm_;
  std::vector<int> members_;
  int me_ = 0;  // this process's rank in comm_
  int rank_ = 0;
  int size_ = 1;
  int ranks_on_host_ = 1;
  std::vector<std::string> host_keys_;  // by member
  std::chrono::milliseconds timeout_;
  std::string name_;
  std::mutex mutex_;
  std::uint64_t collectives_ = 0;
  std::uint64_t advances_ = 0;  // phases of all-reduces completed, for waits to see progress
  std::deque<std::shared_ptr<Reduce>> in_flight_;
  std::deque<std::shared_ptr<Reduce>> acquired_;
  std::optional<Failure> failure_;
  // The standing receive for a peer's abort notice, and the notices this rank sent.
  std::string abort_inbox_;
  MPI_Request abort_receive_ = MPI_REQUEST_NULL;
  std::deque<std::string> abort_outbox_;
  mpi::Requests abort_sends_;
  // The last still-waiting notice of each rank that sent one: when, and whom
  // that rank was waiting for.
  std::map<int, std::pair<Clock::time_point, std::vector<int>>> still_waiting_;
};

MpiWork::~MpiWork() {
  try {
    comm_->wait(reduce_);
  } catch (const std::exception& error) {
    // The failure is kept by the communicator: its next call throws it.
    log::debug("unfinished all-reduce dropped: ", error.what());
  }
}

bool MpiWork::test() { return comm_->test(reduce_); }
void MpiWork::wait() { comm_->wait(reduce_); }
bool MpiWork::test(int rank) { return comm_->test(reduce_, rank); }
void MpiWork::wait(int rank) { comm_->wait(reduce_, rank); }

MpiCommunicator::MpiCommunicator(MPI_Comm comm, const MpiOptions& options,
                                 std::vector<int> members)
    : comm_(comm), members_(std::move(members)), timeout_(options.timeout) {
  MPI_Comm_rank(comm_, &me_);
  rank_ = static_cast<int>(std::find(members_.begin(), members_.end(), me_) - members_.begin());
  size_ = static_cast<int>(members_.size());
  if (rank_ == size_) throw InternalError(cat("mpi: rank ", me_, " is not among the members"));
  abort_inbox_.resize(kMaxAbortBytes);
  mpi::check_mpi(MPI_Irecv(abort_inbox_.data(), static_cast<int>(kMaxAbortBytes), MPI_BYTE,
                           MPI_ANY_SOURCE, kAbortTag, comm_, &abort_receive_),
                 "MPI_Irecv (abort notices)");
}

MpiCommunicator::~MpiCommunicator() {
  std::unique_lock lock(mutex_);
  if (!failure_) {
    try {
      wait_all_locked(lock);
    } catch (const std::exception& error) {
      log::warn("mpi: all-reduces in flight at destruction failed: ", error.what());
    }
  }
  if (abort_receive_ != MPI_REQUEST_NULL) {
    MPI_Cancel(&abort_receive_);
    MPI_Wait(&abort_receive_, MPI_STATUS_IGNORE);
  }
  // Messages that cannot complete (a failure) would keep MPI_Finalize waiting.
  bool settled = true;
  const auto test = [&](mpi::Requests& requests) {
    try {
      settled = requests.test_all() && settled;
    } catch (const mpi::RequestError&) {
      settled = false;
    }
  };
  test(abort_sends_);
  for (auto& reduce : in_flight_) test(reduce->requests);
  if (!settled) mpi::skip_finalize_at_exit();
  if (!failure_) MPI_Comm_free(&comm_);
}

void MpiCommunicator::check_failed_locked() {
  poll_abort_locked();
  if (failure_) failure_->raise();
}

void MpiCommunicator::fail_locked(Failure failure) {
  if (failure_) return;
  failure_ = std::move(failure);
  // Receives that will never match would write into freed memory if their
  // message came after all: cancel them. The buffers stay owned by the
  // Reduces in in_flight_, which live as long as the communicator.
  for (auto& reduce : in_flight_) reduce->requests.cancel_receives();
  // Tell the others, so that they fail now rather than at their deadline.
  send_notice_locked(encode_notice(*failure_, me_));
}

void MpiCommunicator::send_notice_locked(const std::string& notice) {
  abort_sends_.test_all();
  abort_outbox_.push_back(notice.substr(0, kMaxAbortBytes));
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    try {
      abort_sends_.isend(reinterpret_cast<const std::byte*>(abort_outbox_.back().data()),
                         abort_outbox_.back().size(), to(r), kAbortTag, comm_);
    } catch (const CommError& error) {
      log::warn("mpi: could not send rank ", to(r), " a notice: ", error.what());
    }
  }
}

void MpiCommunicator::poll_abort_locked() {
  if (failure_ || abort_receive_ == MPI_REQUEST_NULL) return;
  MPI_Status status;
  int arrived = 0;
  if (MPI_Test(&abort_receive_, &arrived, &status) != MPI_SUCCESS || !arrived) return;
  int bytes = 0;
  MPI_Get_count(&status, MPI_BYTE, &bytes);
  const std::string notice = abort_inbox_.substr(0, static_cast<std::size_t>(bytes));
  if (notice.starts_with(cat(kStillWaiting, " "))) {
    still_waiting_[status.MPI_SOURCE] = {Clock::now(),
                                         decode_notice(notice, status.MPI_SOURCE).ranks};
    mpi::check_mpi(MPI_Irecv(abort_inbox_.data(), static_cast<int>(kMaxAbortBytes), MPI_BYTE,
                             MPI_ANY_SOURCE, kAbortTag, comm_, &abort_receive_),
                   "MPI_Irecv (notices)");
    return;
  }
  failure_ = decode_notice(notice, status.MPI_SOURCE);
  for (auto& reduce : in_flight_) reduce->requests.cancel_receives();
}

// The ranks this wait did not hear from, less those that said during it that
// they are alive, plus those that such ranks were waiting for in turn: with
// a host cut off, a rank waiting for a result that a live peer could not
// compute names the cut host's ranks, not the live peer. Just the ranks it
// waits for when that leaves none.
std::vector<int> MpiCommunicator::suspects(const WaitClock& clock,
                                           const std::vector<int>& pending) const {
  std::vector<int> candidates = pending;
  std::vector<int> alive;
  for (const auto& [rank, report] : still_waiting_) {
    if (report.first < clock.start) continue;
    alive.push_back(rank);
    candidates.insert(candidates.end(), report.second.begin(), report.second.end());
  }
  std::vector<int> named;
  for (int r : candidates) {
    if (r != me_ && std::find(alive.begin(), alive.end(), r) == alive.end() &&
        std::find(named.begin(), named.end(), r) == named.end()) {
      named.push_back(r);
    }
  }
  std::sort(named.begin(), named.end());
  return named.empty() ? pending : named;
}

template <class Describe>
void MpiCommunicator::check_deadline_locked(WaitClock& clock, const mpi::Requests& requests,
                                            Describe&& describe) {
  const auto now = Clock::now();
  if (!clock.announced && now >= clock.start + timeout_ * 3 / 4) {
    clock.announced = true;
    std::string ranks;
    for (int r : requests.pending_peers()) ranks += cat(ranks.empty() ? "" : ",", r);
    send_notice_locked(cat(kStillWaiting, " ", ranks, "\n"));
  }
  if (now < clock.start + timeout_) return;
  const auto missing = suspects(clock, requests.pending_peers());
  fail_locked({Failure::Kind::timeout,
               cat(describe(), ": timed out after ", timeout_.count(), " ms waiting for ranks ",
                   format_ranks(missing)),
               missing});
  failure_->raise();
}

void MpiCommunicator::advance_locked(Reduce& reduce) {
  if (reduce.phase == 3 || !reduce.requests.test_all()) return;
  ++advances_;
  if (reduce.phase == 2) {
    reduce.phase = 3;
    reduce.staging.reset();
    reduce.owned_input.reset();
    return;
  }
  const std::size_t element = dtype_size(reduce.dtype);
  const std::size_t out_element = dtype_size(reduce.out_dtype);
  const std::size_t begin = reduce.shares[rank_];
  const std::size_t mine = reduce.shares[rank_ + 1] - begin;
  // Phase 1 is complete: every contribution to my share is here.
  std::vector<const std::byte*> sources(static_cast<std::size_t>(size_));
  for (int r = 0, slot = 0; r < size_; ++r) {
    sources[r] = r == rank_ ? reduce.input + begin * element
                            : reduce.staging.get() + (slot++) * mine * element;
  }
  // A reduce-scatter's output is the share alone.
  std::byte* out = reduce.kind == Collective::reduce_scatter ? reduce.output
                                                             : reduce.output + begin * out_element;
  if (reduce.out_dtype == reduce.dtype) {
    if (mine > 0) shm::sum_in_rank_order(reduce.dtype, sources, mine, out);
  } else {  // fp32 sums, then the one rounding
    std::vector<float> sums(mine);
    shm::sum_in_rank_order(DType::f32, sources, mine, reinterpret_cast<std::byte*>(sums.data()));
    narrow_from_f32(reduce.out_dtype, sums.data(), mine, out);
  }
  if (reduce.kind == Collective::reduce_scatter) {
    reduce.phase = 3;
    reduce.staging.reset();
    return;
  }
  reduce.phase = 2;
  exchange_shares_locked(reduce, out);
  if (reduce.requests.test_all()) advance_locked(reduce);
}

void MpiCommunicator::exchange_shares_locked(Reduce& reduce, const std::byte* mine) {
  const std::size_t element = dtype_size(reduce.out_dtype);
  const auto bytes = [&](int r) { return (reduce.shares[r + 1] - reduce.shares[r]) * element; };
  // Received in the order an all-gather's consumer takes the blocks: the
  // next rank's first.
  for (int step = 1; step < size_; ++step) {
    const int peer = (rank_ + step) % size_;
    reduce.requests.irecv_pieces(reduce.output + reduce.shares[peer] * element, bytes(peer),
                                 to(peer), reduce.tag + 1, comm_);
  }
  for (int step = 1; step < size_; ++step) {
    const int peer = (rank_ + step) % size_;
    reduce.requests.isend_pieces(mine, bytes(rank_), to(peer), reduce.tag + 1, comm_);
  }
}

void MpiCommunicator::advance_locked() {
  check_failed_locked();
  try {
    for (auto& reduce : in_flight_) advance_locked(*reduce);
  } catch (const mpi::RequestError& error) {
    fail_locked({Failure::Kind::lost, error.what(), {error.peer()}});
    failure_->raise();
  }
  while (!in_flight_.empty() && in_flight_.front()->phase == 3) in_flight_.pop_front();
}

std::shared_ptr<Reduce> MpiCommunicator::start_locked(std::shared_ptr<Reduce> reduce) {
  Reduce& r = *reduce;
  r.tag = kFirstReduceTag + static_cast<int>((r.index % kReduceTagCycle) * 2);
  if (r.shares.empty()) {
    for (int share = 0; share <= size_; ++share) {
      r.shares.push_back(share_begin(r.count, size_, share));
    }
  }
  if (r.kind == Collective::all_gather) {
    r.phase = 2;
    const std::size_t element = dtype_size(r.dtype);
    std::byte* place = r.output + r.shares[rank_] * element;
    const std::size_t bytes = (r.shares[rank_ + 1] - r.shares[rank_]) * element;
    if (place != r.input && bytes > 0) std::memcpy(place, r.input, bytes);
    exchange_shares_locked(r, place);
    in_flight_.push_back(reduce);
    advance_locked();
    return reduce;
  }
  r.phase = 1;
  const std::size_t element = dtype_size(r.dtype);
  const std::size_t mine = r.shares[rank_ + 1] - r.shares[rank_];
  if (size_ > 1) r.staging = std::make_unique<std::byte[]>((size_ - 1) * mine * element);
  for (int peer = 0, slot = 0; peer < size_; ++peer) {
    if (peer == rank_) continue;
    r.requests.irecv_pieces(r.staging.get() + (slot++) * mine * element, mine * element,
                            to(peer), r.tag, comm_);
  }
  // Send in the order the peers will sum, starting after this rank, so that
  // not every rank sends to rank 0 first.
  for (int step = 1; step < size_; ++step) {
    const int peer = (rank_ + step) % size_;
    const std::size_t theirs = r.shares[peer + 1] - r.shares[peer];
    r.requests.isend_pieces(r.input + r.shares[peer] * element, theirs * element, to(peer), r.tag,
                            comm_);
  }
  in_flight_.push_back(reduce);
  advance_locked();
  return reduce;
}

bool MpiCommunicator::reached_locked(const Reduce& reduce, int rank) const {
  return reduce.phase == 3 ||
         (rank >= 0 && reduce.phase == 2 && !reduce.requests.receiving_from(to(rank)));
}

bool MpiCommunicator::test(const std::shared_ptr<Reduce>& reduce, int rank) {
  std::lock_guard lock(mutex_);
  if (reached_locked(*reduce, rank)) return true;
  advance_locked();
  return reached_locked(*reduce, rank);
}

void MpiCommunicator::wait(const std::shared_ptr<Reduce>& reduce, int rank) {
  std::unique_lock lock(mutex_);
  if (reached_locked(*reduce, rank)) return;
  WaitClock clock;
  PollPacer pacer;
  for (;;) {
    const std::uint64_t advances = advances_;
    advance_locked();
    if (reached_locked(*reduce, rank)) return;
    check_deadline_locked(clock, reduce->requests, [&] {
      if (reduce->index == 0) return std::string("sharing the result inside the host");
      const char* name = reduce->kind == Collective::all_gather       ? "all-gather"
                         : reduce->kind == Collective::reduce_scatter ? "reduce-scatter"
                                                                      : "all-reduce";
      return cat(name, " #", reduce->index, " (", reduce->phase == 1 ? "contributions" : "results",
                 ")");
    });
    if (const auto pause = pacer.next(advances_ != advances); pause.count() > 0) {
      lock.unlock();
      std::this_thread::sleep_for(pause);
      lock.lock();
    }
  }
}

void MpiCommunicator::wait_all_locked(std::unique_lock<std::mutex>& lock) {
  while (!in_flight_.empty()) {
    auto oldest = in_flight_.front();
    lock.unlock();
    wait(oldest);
    lock.lock();
  }
}

std::unique_ptr<Work> MpiCommunicator::do_all_reduce_start(const void* input, void* output,
                                                           std::size_t count, DType dtype) {
  return start(input, output, count, dtype, dtype);
}

// The arguments passed the entry point's checks (or, for the hierarchical
// transport's rounding all-reduce, are its own buffers); only MPI's own
// limit is left.
std::unique_ptr<Work> MpiCommunicator::start(const void* input, void* output, std::size_t count,
                                             DType dtype, DType out_dtype) {
  const std::size_t element = dtype_size(dtype);
  const std::size_t max_share = static_cast<std::size_t>(std::numeric_limits<int>::max());
  require(count / size_ + 1 <= max_share / element, "all_reduce: count ", count, " of ",
          dtype_name(dtype), " gives shares over ", max_share, " bytes (MPI's message limit)");
  std::unique_lock lock(mutex_);
  wait_all_locked(lock);
  check_failed_locked();
  auto reduce = std::make_shared<Reduce>();
  reduce->index = ++collectives_;
  reduce->input = static_cast<const std::byte*>(input);
  reduce->output = static_cast<std::byte*>(output);
  reduce->count = count;
  reduce->dtype = dtype;
  reduce->out_dtype = out_dtype;
  return std::make_unique<MpiWork>(shared_from_this(), start_locked(std::move(reduce)));
}

ReduceBuffer MpiCommunicator::do_acquire_reduce_buffer(std::size_t count, DType dtype) {
  ReduceBuffer buffer = Communicator::do_acquire_reduce_buffer(count, dtype);
  std::unique_lock lock(mutex_);
  // At most kMaxInFlight acquired or in flight: wait for the oldest.
  while (in_flight_.size() + acquired_.size() >= static_cast<std::size_t>(kMaxInFlight) &&
         !in_flight_.empty()) {
    auto oldest = in_flight_.front();
    lock.unlock();
    wait(oldest);
    lock.lock();
  }
  check_failed_locked();
  auto reduce = std::make_shared<Reduce>();
  reduce->index = ++collectives_;
  reduce->owned_input = buffer.scratch;
  reduce->input = buffer.data;
  reduce->count = count;
  reduce->dtype = dtype;
  reduce->out_dtype = dtype;
  buffer.round = reduce->index;
  acquired_.push_back(std::move(reduce));
  return buffer;
}

std::unique_ptr<Work> MpiCommunicator::do_all_reduce_start(ReduceBuffer buffer, void* output) {
  std::unique_lock lock(mutex_);
  require(!acquired_.empty() && buffer.round == acquired_.front()->index &&
              buffer.data == acquired_.front()->input,
          "all_reduce_start: the buffer was not acquired from this communicator, or not the "
          "oldest one acquired");
  check_failed_locked();
  auto reduce = std::move(acquired_.front());
  acquired_.pop_front();
  reduce->output = static_cast<std::byte*>(output);
  return std::make_unique<MpiWork>(shared_from_this(), start_locked(std::move(reduce)));
}

void MpiCommunicator::wait_requests_locked(std::unique_lock<std::mutex>& lock,
                                           mpi::Requests& requests, std::string_view operation,
                                           std::uint64_t index, std::string_view step) {
  WaitClock clock;
  PollPacer pacer;
  for (;;) {
    try {
      check_failed_locked();
      if (requests.test_all()) return;
    } catch (const mpi::RequestError& error) {
      requests.cancel_receives();
      fail_locked({Failure::Kind::lost, error.what(), {error.peer()}});
      failure_->raise();
    } catch (...) {
      // The receives' buffers belong to the caller, who is about to free them.
      requests.cancel_receives();
      throw;
    }
    try {
      check_deadline_locked(clock, requests,
                            [&] { return cat(operation, " #", index, " (", step, ")"); });
    } catch (...) {
      requests.cancel_receives();
      throw;
    }
    if (const auto pause = pacer.next(false); pause.count() > 0) {
      lock.unlock();
      std::this_thread::sleep_for(pause);
      lock.lock();
    }
  }
}

std::unique_ptr<MpiWork> MpiCommunicator::start_sharded(Collective kind, const void* input,
                                                        void* output,
                                                        std::span<const std::size_t> counts,
                                                        DType dtype) {
  const std::size_t element = dtype_size(dtype);
  const auto max_message = static_cast<std::size_t>(std::numeric_limits<int>::max());
  auto reduce = std::make_shared<Reduce>();
  reduce->kind = kind;
  reduce->shares.assign(1, 0);
  for (std::size_t r = 0; r < counts.size(); ++r) {
    require(counts[r] <= max_message / element,
            kind == Collective::all_gather ? "all_gather_start" : "reduce_scatter", ": rank ", r,
            "'s count ", counts[r], " of ", dtype_name(dtype), " is over ", max_message,
            " bytes (MPI's message limit)");
    reduce->shares.push_back(reduce->shares.back() + counts[r]);
  }
  reduce->input = static_cast<const std::byte*>(input);
  reduce->output = static_cast<std::byte*>(output);
  reduce->count = reduce->shares.back();
  reduce->dtype = dtype;
  reduce->out_dtype = dtype;
  std::unique_lock lock(mutex_);
  wait_all_locked(lock);
  check_failed_locked();
  reduce->index = ++collectives_;
  return std::make_unique<MpiWork>(shared_from_this(), start_locked(std::move(reduce)));
}

std::unique_ptr<Work> MpiCommunicator::do_reduce_scatter_start(const void* input, void* output,
                                                               std::span<const std::size_t> counts,
                                                               DType dtype) {
  return start_sharded(Collective::reduce_scatter, input, output, counts, dtype);
}

std::unique_ptr<GatherWork> MpiCommunicator::do_all_gather_start(
    const void* input, void* output, std::span<const std::size_t> counts, DType dtype) {
  return start_sharded(Collective::all_gather, input, output, counts, dtype);
}

std::vector<std::string> MpiCommunicator::do_all_gather(std::string_view mine) {
  std::unique_lock lock(mutex_);
  wait_all_locked(lock);
  check_failed_locked();
  const std::uint64_t index = ++collectives_;
  std::vector<std::string> gathered(static_cast<std::size_t>(size_));
  mpi::Requests requests;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    gathered[r].resize(kMaxGatherBytes);
    requests.irecv(reinterpret_cast<std::byte*>(gathered[r].data()), kMaxGatherBytes, to(r),
                   kGatherTag, comm_);
  }
  for (int step = 1; step < size_; ++step) {
    requests.isend(reinterpret_cast<const std::byte*>(mine.data()), mine.size(),
                   to((rank_ + step) % size_), kGatherTag, comm_);
  }
  wait_requests_locked(lock, requests, "all-gather", index, "contributions");
  for (int r = 0; r < size_; ++r) {
    if (r != rank_) gathered[r].resize(requests.received_bytes(to(r)));
  }
  gathered[rank_] = std::string(mine);
  return gathered;
}

void MpiCommunicator::abort(std::string_view reason) {
  std::lock_guard lock(mutex_);
  fail_locked({Failure::Kind::aborted, cat("aborted by rank ", me_, ": ", reason), {me_}});
}

// The group's name is rank 0's random token; the host of a process is
// this_host_key().
void MpiCommunicator::introduce() {
  std::string token;
  if (rank_ == 0) {
    std::random_device device;
    token = cat(std::hex, device(), device(), device());
  }
  const std::string host = this_host_key();
  const auto blobs = all_gather(cat(token, "\n", host));
  name_ = "tpfuse-mpi-" + blobs[0].substr(0, blobs[0].find('\n'));
  for (const auto& blob : blobs) host_keys_.push_back(blob.substr(blob.find('\n') + 1));
  ranks_on_host_ = static_cast<int>(std::count(host_keys_.begin(), host_keys_.end(), host));
}

}  // namespace

namespace mpi {

std::shared_ptr<Communicator> create_group(const MpiOptions& options,
                                           const std::vector<int>& members) {
  MPI_Comm comm = MPI_COMM_NULL;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Comm_idup(MPI_COMM_WORLD, &comm, &request), "MPI_Comm_idup");
  wait_collective(request, options.timeout, "mpi setup (MPI_Comm_idup)");
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  if (std::find(members.begin(), members.end(), rank) == members.end()) {
    MPI_Comm_free(&comm);
    return nullptr;
  }
  auto communicator = std::make_shared<MpiCommunicator>(comm, options, members);
  communicator->introduce();
  return communicator;
}

const std::vector<std::string>& host_keys(const Communicator& comm) {
  return dynamic_cast<const MpiCommunicator&>(comm).host_keys();
}

}  // namespace mpi

std::shared_ptr<Communicator> create_mpi_communicator(const MpiOptions& options) {
  require(options.timeout.count() > 0, "mpi: timeout must be positive, got ",
          options.timeout.count(), " ms");
  mpi::init_mpi();
  int size = 0, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  log::set_rank(rank);
  std::vector<int> everyone(static_cast<std::size_t>(size));
  for (int r = 0; r < size; ++r) everyone[r] = r;
  auto flat = mpi::create_group(options, everyone);
  auto communicator = mpi::make_hierarchical(flat, options);
  log::info("mpi communicator ", communicator->name(), " ready: ", communicator->size(),
            " ranks on ", communicator->hosts(), " hosts, ", communicator->ranks_on_host(),
            " on this host, transport ", communicator->transport());
  return communicator;
}

}  // namespace tpfuse::comm
