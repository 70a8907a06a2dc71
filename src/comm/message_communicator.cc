// The transport over an engine's point-to-point messages (see
// tpfuse/comm/messages.h).
#include <algorithm>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "comm/collective_math.h"
#include "comm/poll_pacer.h"
#include "comm/shm_reduce_kernels.h"
#include "tpfuse/comm/messages.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"

namespace tpfuse::comm {

namespace {

using Clock = std::chrono::steady_clock;
using Transfer = MessageEngine::Transfer;

// A collective's messages go under tag index * kKinds + kind, so each
// collective's are its own; tag 0 carries abort notices.
enum Kind : int { kShares = 1, kResults = 2, kSlots = 3, kBytes = 4, kKinds = 8 };
constexpr int kNoticeTag = 0;
constexpr std::size_t kNoticeBytes = 1024;
constexpr std::uint64_t kTagCycle = std::uint64_t{1} << 24;
constexpr int kMaxInFlight = 3;
constexpr std::size_t kSlotBytes = 2048;
// A wait on an engine that tells of its completions still checks its
// deadline this often.
constexpr std::chrono::milliseconds kLongestAwait{5};
std::size_t first_bytes(std::size_t length) { return std::min(length, kSlotBytes - 8); }

struct Message {
  int peer = 0;
  bool incoming = false;
  std::unique_ptr<Transfer> transfer;
  bool done = false;
};

// One collective in flight: an all-reduce (phase 1, the shares to their
// owners; phase 2, the owners' sums to everyone), or messages alone (the
// gathers), complete once every message is.
struct Op {
  bool all_reduce = false;
  std::uint64_t index = 0;
  const std::byte* input = nullptr;
  std::byte* output = nullptr;
  DType dtype = DType::f32;      // of the contributions
  DType out_dtype = DType::f32;  // of the sums
  std::vector<std::size_t> shares;
  std::unique_ptr<std::byte[]> staging;  // the peers' contributions to my share
  int phase = 1;
  bool complete = false;
  std::vector<Message> messages;
  Clock::time_point heard = Clock::now();  // started, or last message completed
};

class MessageCommunicator;

class MessageWork final : public GatherWork {
 public:
  MessageWork(std::shared_ptr<MessageCommunicator> comm, std::shared_ptr<Op> op,
              std::shared_ptr<std::byte[]> scratch = nullptr)
      : comm_(std::move(comm)), op_(std::move(op)), scratch_(std::move(scratch)) {}
  ~MessageWork() override;
  bool test() override { return test(-1); }
  void wait() override { wait(-1); }
  bool test(int rank) override;
  void wait(int rank) override;

 private:
  std::shared_ptr<MessageCommunicator> comm_;
  std::shared_ptr<Op> op_;
  std::shared_ptr<std::byte[]> scratch_;  // an acquired buffer, kept to the end
};

class MessageCommunicator final : public Communicator,
                                  public std::enable_shared_from_this<MessageCommunicator> {
 public:
  MessageCommunicator(std::shared_ptr<MessageEngine> engine, MessageOptions options)
      : engine_(std::move(engine)), options_(std::move(options)) {
    require(options_.timeout.count() > 0, "message transport: timeout must be positive, got ",
            options_.timeout.count(), " ms");
    require(options_.job_ranks.empty() || static_cast<int>(options_.job_ranks.size()) == size(),
            "message transport: job_ranks must name ", size(), " ranks, got ",
            options_.job_ranks.size());
    const int p = size();
    notices_.resize(static_cast<std::size_t>(p));
    for (int r = 0; r < p; ++r) {
      if (r == rank()) continue;
      Notice& notice = notices_[r];
      notice.text.assign(kNoticeBytes, std::byte{0});
      notice.transfer = engine_->receive(r, kNoticeTag, notice.text.data(), kNoticeBytes);
    }
  }
  ~MessageCommunicator() override {
    for (Notice& notice : notices_) {
      if (notice.transfer) notice.transfer->cancel();
    }
  }

  int rank() const override { return engine_->rank(); }
  int size() const override { return engine_->size(); }
  const std::string& name() const override { return options_.name; }
  std::chrono::milliseconds timeout() const override { return options_.timeout; }
  std::string transport() const override { return options_.transport; }
  int ranks_on_host() const override { return options_.ranks_on_host; }
  int hosts() const override { return options_.hosts; }
  bool progresses_only_when_called() const override { return true; }
  std::size_t max_gather_bytes() const override { return std::size_t{1} << 20; }
  int max_reduces_in_flight() const override { return kMaxInFlight; }

  void abort(std::string_view reason) override {
    const std::lock_guard lock(mutex_);
    if (failure_) return;
    const std::string text = cat("aborted by rank ", job_rank(rank()), ": ", reason);
    send_notices_locked(text);
    failure_ = std::make_exception_ptr(AbortedError(text, {job_rank(rank())}));
  }

  // Advances every collective; whether `op` is complete (or, rank >= 0,
  // whether rank's message of it has arrived).
  bool test(const Op& op, int rank) {
    const std::lock_guard lock(mutex_);
    advance_locked();
    return reached(op, rank);
  }

  // Gives up once nothing of `op` has come for timeout(): so a wait that
  // began after the collective stalled (the hierarchical pipeline's, which
  // first polls for a while) still ends a timeout after the stall began.
  void wait(const Op& op, int rank) {
    PollPacer pacer;
    for (;;) {
      bool progressed = false;
      const std::optional<std::uint64_t> seen = engine_->completions();
      {
        const std::lock_guard lock(mutex_);
        const std::uint64_t before = progress_;
        advance_locked();
        if (reached(op, rank)) return;
        if (Clock::now() > op.heard + options_.timeout) time_out_locked(op);
        progressed = progress_ != before;
      }
      if (seen) {
        engine_->await_completion(*seen, kLongestAwait);
      } else {
        std::this_thread::sleep_for(pacer.next(progressed));
      }
    }
  }

 protected:
  std::unique_ptr<Work> do_all_reduce_start(const void* input, void* output, std::size_t count,
                                            DType dtype) override {
    finish(0);
    return std::make_unique<MessageWork>(
        shared_from_this(),
        start_reduce(static_cast<const std::byte*>(input), dtype, output, dtype, count));
  }
  std::unique_ptr<Work> do_all_reduce_rounding_start(const float* input, void* output,
                                                     std::size_t count, DType dtype) override {
    finish(0);
    return std::make_unique<MessageWork>(
        shared_from_this(),
        start_reduce(reinterpret_cast<const std::byte*>(input), DType::f32, output, dtype, count));
  }
  ReduceBuffer do_acquire_reduce_buffer(std::size_t count, DType dtype) override {
    finish(kMaxInFlight - 1);
    return Communicator::do_acquire_reduce_buffer(count, dtype);
  }
  std::unique_ptr<Work> do_all_reduce_start(ReduceBuffer buffer, void* output) override {
    require(buffer.scratch != nullptr && buffer.data == buffer.scratch.get(),
            "all_reduce_start: the buffer was not acquired from this communicator");
    auto op = start_reduce(buffer.data, buffer.dtype, output, buffer.dtype, buffer.count);
    return std::make_unique<MessageWork>(shared_from_this(), std::move(op),
                                         std::move(buffer.scratch));
  }

  std::unique_ptr<GatherWork> do_all_gather_start(const void* input, void* output,
                                                  std::span<const std::size_t> counts,
                                                  DType dtype) override {
    finish(0);
    const std::size_t element = dtype_size(dtype);
    auto* out = static_cast<std::byte*>(output);
    std::vector<std::size_t> offsets(counts.size() + 1, 0);
    for (std::size_t r = 0; r < counts.size(); ++r)
      offsets[r + 1] = offsets[r] + counts[r] * element;
    const auto me = static_cast<std::size_t>(rank());
    const std::size_t mine = offsets[me + 1] - offsets[me];
    if (mine > 0 && input != out + offsets[me]) std::memcpy(out + offsets[me], input, mine);
    const std::lock_guard lock(mutex_);
    rethrow_locked();
    auto op = new_op_locked(false);
    for (int r = 0; r < size(); ++r) {
      if (r == rank()) continue;
      const std::size_t theirs = offsets[r + 1] - offsets[r];
      if (theirs > 0) receive_locked(*op, r, kBytes, out + offsets[r], theirs);
      if (mine > 0) send_locked(*op, r, kBytes, out + offsets[me], mine);
    }
    advance_locked();
    return std::make_unique<MessageWork>(shared_from_this(), std::move(op));
  }

  // One round where every contribution fits a slot (the agreement's
  // headers do): a slot of kSlotBytes carries its length and its first
  // bytes; a second round carries what did not fit.
  std::vector<std::string> do_all_gather(std::string_view mine) override {
    finish(0);
    const int p = size();
    const std::size_t first = first_bytes(mine.size());
    std::vector<std::vector<std::byte>> slots(static_cast<std::size_t>(p),
                                              std::vector<std::byte>(kSlotBytes));
    const std::uint64_t length = mine.size();
    std::memcpy(slots[rank()].data(), &length, 8);
    if (first > 0) std::memcpy(slots[rank()].data() + 8, mine.data(), first);
    std::shared_ptr<Op> op;
    {
      const std::lock_guard lock(mutex_);
      rethrow_locked();
      op = new_op_locked(false);
      for (int r = 0; r < p; ++r) {
        if (r == rank()) continue;
        receive_locked(*op, r, kSlots, slots[r].data(), kSlotBytes);
        send_locked(*op, r, kSlots, slots[rank()].data(), kSlotBytes);
      }
    }
    wait(*op, -1);
    std::vector<std::string> gathered(static_cast<std::size_t>(p));
    bool rest = false;
    for (int r = 0; r < p; ++r) {
      std::uint64_t bytes = 0;
      std::memcpy(&bytes, slots[r].data(), 8);
      require(bytes <= max_gather_bytes(), "all_gather: rank ", job_rank(r), " sent ", bytes,
              " bytes, over the limit of ", max_gather_bytes());
      gathered[r].resize(bytes);
      const std::size_t in_slot = first_bytes(bytes);
      if (in_slot > 0) std::memcpy(gathered[r].data(), slots[r].data() + 8, in_slot);
      rest = rest || bytes > in_slot;
    }
    if (!rest) return gathered;
    {
      const std::lock_guard lock(mutex_);
      rethrow_locked();
      op = new_op_locked(false);
      for (int r = 0; r < p; ++r) {
        if (r == rank()) continue;
        if (gathered[r].size() > first_bytes(gathered[r].size())) {
          receive_locked(*op, r, kBytes,
                         reinterpret_cast<std::byte*>(gathered[r].data()) + (kSlotBytes - 8),
                         gathered[r].size() - (kSlotBytes - 8));
        }
        if (mine.size() > first) {
          send_locked(*op, r, kBytes, reinterpret_cast<const std::byte*>(mine.data()) + first,
                      mine.size() - first);
        }
      }
    }
    wait(*op, -1);
    gathered[rank()] = std::string(mine);
    return gathered;
  }

 private:
  friend class MessageWork;
  struct Notice {
    std::vector<std::byte> text;
    std::unique_ptr<Transfer> transfer;
  };

  std::shared_ptr<Op> start_reduce(const std::byte* input, DType dtype, void* output,
                                   DType out_dtype, std::size_t count) {
    const int p = size(), me = rank();
    const std::lock_guard lock(mutex_);
    rethrow_locked();
    auto op = new_op_locked(true);
    op->input = input;
    op->output = static_cast<std::byte*>(output);
    op->dtype = dtype;
    op->out_dtype = out_dtype;
    for (int r = 0; r <= p; ++r) op->shares.push_back(share_begin(count, p, r));
    const std::size_t element = dtype_size(dtype);
    const std::size_t mine = op->shares[me + 1] - op->shares[me];
    op->staging = std::make_unique<std::byte[]>(std::max<std::size_t>(mine * element * (p - 1), 1));
    for (int r = 0, slot = 0; r < p; ++r) {
      if (r == me) continue;
      if (mine > 0) {
        receive_locked(*op, r, kShares, op->staging.get() + (slot++) * mine * element,
                       mine * element);
      }
      const std::size_t theirs = op->shares[r + 1] - op->shares[r];
      if (theirs > 0) {
        send_locked(*op, r, kShares, input + op->shares[r] * element, theirs * element);
      }
    }
    advance_locked();
    return op;
  }

  // The rank errors name for the engine's rank r.
  int job_rank(int r) const {
    return options_.job_ranks.empty() ? r : options_.job_ranks[static_cast<std::size_t>(r)];
  }

  std::shared_ptr<Op> new_op_locked(bool all_reduce) {
    auto op = std::make_shared<Op>();
    op->all_reduce = all_reduce;
    op->index = ++collectives_;
    in_flight_.push_back(op);
    return op;
  }
  int tag(const Op& op, Kind kind) const {
    return static_cast<int>(1 + op.index % kTagCycle) * kKinds + kind;
  }
  void send_locked(Op& op, int peer, Kind kind, const std::byte* data, std::size_t bytes) {
    op.messages.push_back({peer, false, engine_->send(peer, tag(op, kind), data, bytes)});
  }
  void receive_locked(Op& op, int peer, Kind kind, std::byte* data, std::size_t bytes) {
    op.messages.push_back({peer, true, engine_->receive(peer, tag(op, kind), data, bytes)});
  }

  // Whether `op` is complete, or rank's incoming message of it has arrived.
  static bool reached(const Op& op, int rank) {
    if (op.complete || rank < 0) return op.complete;
    for (const Message& m : op.messages) {
      if (m.incoming && m.peer == rank) return m.done;
    }
    return true;  // nothing to come from that rank
  }

  void advance_locked() {
    rethrow_locked();
    check_notices_locked();
    for (const std::shared_ptr<Op>& op : in_flight_) advance_locked(*op);
    std::erase_if(in_flight_, [](const std::shared_ptr<Op>& op) { return op->complete; });
  }

  void advance_locked(Op& op) {
    bool all_done = true;
    for (Message& m : op.messages) {
      if (m.done) continue;
      bool done = false;
      try {
        done = m.transfer->test();
      } catch (const std::exception& error) {
        fail_locked(std::make_exception_ptr(
            PeerLostError(cat(name(), ": rank ", job_rank(m.peer), " is lost (", error.what(), ")"),
                          {job_rank(m.peer)})));
      }
      if (done) {
        m.done = true;
        ++progress_;
        op.heard = Clock::now();
      } else {
        all_done = false;
      }
    }
    if (!all_done) return;
    if (op.all_reduce && op.phase == 1) {
      reduce_my_share_locked(op);
      return;
    }
    op.complete = true;
    op.staging.reset();
    op.messages.clear();
  }

  // Phase 1 is complete: every contribution to my share is here. Sums it
  // and sends it to every peer (phase 2).
  void reduce_my_share_locked(Op& op) {
    const int p = size(), me = rank();
    const std::size_t element = dtype_size(op.dtype), out_element = dtype_size(op.out_dtype);
    const std::size_t begin = op.shares[me], mine = op.shares[me + 1] - begin;
    std::vector<const std::byte*> sources(static_cast<std::size_t>(p));
    for (int r = 0, slot = 0; r < p; ++r) {
      sources[r] =
          r == me ? op.input + begin * element : op.staging.get() + (slot++) * mine * element;
    }
    std::byte* out = op.output + begin * out_element;
    if (mine > 0 && op.out_dtype == op.dtype) {
      shm::sum_in_rank_order(op.dtype, sources, mine, out);
    } else if (mine > 0) {  // fp32 sums, then the one rounding
      std::vector<float> sums(mine);
      shm::sum_in_rank_order(DType::f32, sources, mine, reinterpret_cast<std::byte*>(sums.data()));
      narrow_from_f32(op.out_dtype, sums.data(), mine, out);
    }
    op.phase = 2;
    op.messages.clear();
    for (int r = 0; r < p; ++r) {
      if (r == me) continue;
      const std::size_t theirs = op.shares[r + 1] - op.shares[r];
      if (theirs > 0) {
        receive_locked(op, r, kResults, op.output + op.shares[r] * out_element,
                       theirs * out_element);
      }
      if (mine > 0) send_locked(op, r, kResults, out, mine * out_element);
    }
    ++progress_;
  }

  void check_notices_locked() {
    for (int r = 0; r < size(); ++r) {
      Notice& notice = notices_[r];
      if (!notice.transfer) continue;
      bool arrived = false;
      try {
        arrived = notice.transfer->test();
      } catch (const std::exception&) {
        notice.transfer.reset();  // the peer is gone: its messages say so
        continue;
      }
      if (!arrived) continue;
      notice.transfer.reset();
      const auto* text = reinterpret_cast<const char*>(notice.text.data());
      failure_ = std::make_exception_ptr(
          AbortedError(std::string(text, strnlen(text, kNoticeBytes)), {job_rank(r)}));
      rethrow_locked();
    }
  }

  // The deadline of a wait for `op`: names the ranks whose messages did not come.
  [[noreturn]] void time_out_locked(const Op& op) {
    std::vector<int> missing;
    for (const Message& m : op.messages) {
      const int peer = job_rank(m.peer);
      if (!m.done && std::find(missing.begin(), missing.end(), peer) == missing.end()) {
        missing.push_back(peer);
      }
    }
    std::sort(missing.begin(), missing.end());
    fail_locked(std::make_exception_ptr(
        TimeoutError(cat(name(), ": rank ", job_rank(rank()), " waited ", options_.timeout.count(),
                         " ms (TPFUSE_TIMEOUT_MS) for rank(s) ", format_ranks(missing), " over ",
                         options_.transport),
                     missing)));
  }

  // Keeps the failure for every later call and tells the peers.
  [[noreturn]] void fail_locked(std::exception_ptr failure) {
    failure_ = failure;
    try {
      std::rethrow_exception(failure);
    } catch (const std::exception& error) {
      send_notices_locked(cat("rank ", job_rank(rank()), " failed: ", error.what()));
    }
    std::rethrow_exception(failure_);
  }

  void send_notices_locked(const std::string& text) {
    auto& sent = sent_notices_.emplace_back();
    sent.text.assign(kNoticeBytes, std::byte{0});
    std::memcpy(sent.text.data(), text.data(), std::min(text.size(), kNoticeBytes - 1));
    for (int r = 0; r < size(); ++r) {
      if (r == rank()) continue;
      try {
        sent.transfers.push_back(engine_->send(r, kNoticeTag, sent.text.data(), kNoticeBytes));
      } catch (const std::exception& error) {
        log::debug("notice to rank ", r, " not sent: ", error.what());
      }
    }
  }

  void rethrow_locked() const {
    if (failure_) std::rethrow_exception(failure_);
  }

  // Waits until at most `left` collectives are in flight, oldest first.
  void finish(std::size_t left) {
    for (;;) {
      std::shared_ptr<Op> oldest;
      {
        const std::lock_guard lock(mutex_);
        advance_locked();
        if (in_flight_.size() <= left) return;
        oldest = in_flight_.front();
      }
      wait(*oldest, -1);
    }
  }

  struct SentNotice {
    std::vector<std::byte> text;
    std::vector<std::unique_ptr<Transfer>> transfers;
  };

  std::shared_ptr<MessageEngine> engine_;
  MessageOptions options_;
  std::mutex mutex_;
  std::uint64_t collectives_ = 0;
  std::uint64_t progress_ = 0;  // messages completed, for waits to see progress
  std::deque<std::shared_ptr<Op>> in_flight_;
  std::vector<Notice> notices_;
  std::deque<SentNotice> sent_notices_;
  std::exception_ptr failure_;
};

MessageWork::~MessageWork() {
  try {
    wait(-1);
  } catch (const std::exception& error) {
    log::debug("unfinished collective dropped: ", error.what());
  }
}
bool MessageWork::test(int rank) { return comm_->test(*op_, rank); }
void MessageWork::wait(int rank) { comm_->wait(*op_, rank); }

}  // namespace

std::shared_ptr<Communicator> create_message_communicator(std::shared_ptr<MessageEngine> engine,
                                                          const MessageOptions& options) {
  require(engine != nullptr, "message transport: engine must not be null");
  return std::make_shared<MessageCommunicator>(std::move(engine), options);
}

}  // namespace tpfuse::comm
