// The shared-memory Communicator: setup (rendezvous, attach, unlink), the
// collectives' hooks, the byte all_gather and abort. The segment's layout
// lives in shm_segment, waiting in shm_wait, the collectives' rounds in
// shm_rounds (arithmetic in shm_reduce_kernels), the ring of rounds in
// shm_round_queue.
#include "tpfuse/comm/shm.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <optional>
#include <sstream>
#include <thread>

#include "comm/shm_group.h"
#include "comm/shm_reduce_kernels.h"
#include "comm/shm_round_queue.h"
#include "comm/shm_rounds.h"
#include "comm/shm_segment.h"
#include "comm/shm_wait.h"
#include "core/fault_hooks.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/core/config.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"

namespace tpfuse::comm {

namespace {

const EnvSetting<std::int64_t> kTimeoutMs{"TPFUSE_TIMEOUT_MS", 300000,
                                          "deadline of every communicator wait, in ms"};
const EnvSetting<std::int64_t> kSlotBytes{"TPFUSE_SHM_SLOT_BYTES", std::int64_t{4} << 20,
                                          "bytes of each rank's slot in the shm transport"};
const EnvSetting<std::string> kAlgorithm{
    "TPFUSE_SHM_ALGORITHM", "auto",
    "shm all-reduce algorithm: auto, one_shot or reduce_scatter (reduce-scatter + all-gather)"};

constexpr std::size_t kMaxSlotBytes = std::size_t{1} << 30;

// An all-reduce writing at least this much output writes it around the
// caches: skipping the read-for-ownership of every output line halves that
// traffic (the reduce of tiles into a cold 64 MiB output ran twice as fast;
// 2 ranks, out of place: 4 MiB in 0.71 ms instead of 0.98). But an output
// that is also the input is read again by the next all-reduce on the same
// buffer, and from memory then, which cost more than it saved below 16 MiB
// (in place: 4 MiB in 0.99 ms streamed, 0.87 cached). A pipelined caller's
// tiles are judged one by one; tiles of a MiB come from outputs larger still.
constexpr std::size_t kStreamingOutputBytes = std::size_t{1} << 20;
constexpr std::size_t kStreamingInPlaceBytes = std::size_t{16} << 20;

shm::OutputStore output_store_for(std::size_t output_bytes, bool in_place) {
  return output_bytes >= (in_place ? kStreamingInPlaceBytes : kStreamingOutputBytes)
             ? shm::OutputStore::streaming
             : shm::OutputStore::cached;
}

using shm::PeerWait;
using shm::RoundQueue;
using shm::RoundSpec;
using shm::ShmGroup;

// Completes when the round `last_round` (and so every round before it) has.
class ShmWork final : public Work {
 public:
  ShmWork(std::shared_ptr<RoundQueue> queue, std::uint64_t last_round)
      : queue_(std::move(queue)), last_round_(last_round) {}
  ShmWork(const ShmWork&) = delete;
  ShmWork& operator=(const ShmWork&) = delete;
  ~ShmWork() override {
    try {
      queue_->finish_through(last_round_);
    } catch (const std::exception& error) {
      // The failed wait reported itself to the group (or found a peer's
      // report there), so the next call on this communicator throws.
      log::debug("unfinished all-reduce dropped: ", error.what());
    }
  }
  bool test() override { return queue_->advance_through(last_round_); }
  void wait() override { queue_->finish_through(last_round_); }

 private:
  std::shared_ptr<RoundQueue> queue_;
  std::uint64_t last_round_;
};

// A checked round: completes as its round does; the round fills `mismatch`
// when the ranks' digests differ.
class ShmCheckedWork final : public CheckedWork {
 public:
  ShmCheckedWork(std::shared_ptr<RoundQueue> queue, std::uint64_t round,
                 std::shared_ptr<std::vector<CallHeader>> mismatch)
      : work_(std::move(queue), round), mismatch_(std::move(mismatch)) {}
  bool test() override { return work_.test(); }
  void wait() override { work_.wait(); }
  const std::vector<CallHeader>* mismatch() const override {
    return mismatch_->empty() ? nullptr : mismatch_.get();
  }

 private:
  ShmWork work_;
  std::shared_ptr<std::vector<CallHeader>> mismatch_;
};

// An all-gather: rank r's block is in place once its last round's piece is.
class ShmGatherWork final : public GatherWork {
 public:
  ShmGatherWork(std::shared_ptr<RoundQueue> queue, std::vector<std::uint64_t> last_rounds)
      : work_(queue,
              last_rounds.empty() ? 0 : *std::max_element(last_rounds.begin(), last_rounds.end())),
        queue_(std::move(queue)),
        last_rounds_(std::move(last_rounds)) {}
  bool test() override { return work_.test(); }
  void wait() override { work_.wait(); }
  bool test(int rank) override {
    const std::uint64_t round = last_rounds_.at(static_cast<std::size_t>(rank));
    return round == 0 || queue_->advance_piece(round, rank);
  }
  void wait(int rank) override {
    const std::uint64_t round = last_rounds_.at(static_cast<std::size_t>(rank));
    if (round != 0) queue_->finish_piece(round, rank);
  }

 private:
  ShmWork work_;
  std::shared_ptr<RoundQueue> queue_;
  std::vector<std::uint64_t> last_rounds_;  // by rank; 0: an empty block
};

class ShmCommunicator final : public Communicator {
 public:
  explicit ShmCommunicator(std::shared_ptr<ShmGroup> group)
      : queue_(std::make_shared<RoundQueue>(group)),
        group_(std::move(group)),
        name_("tpfuse-shm-" + group_->segment.group_token()) {}

  int rank() const override { return group_->rank; }
  int size() const override { return group_->size; }
  const std::string& name() const override { return name_; }
  std::string transport() const override { return "shm"; }
  std::chrono::milliseconds timeout() const override { return group_->timeout; }
  std::size_t max_gather_bytes() const override { return shm::kMaxGatherBytes; }

  std::size_t max_reduce_buffer_bytes() const override {
    return group_->segment.ring().slot_bytes();
  }
  int max_reduces_in_flight() const override {
    return static_cast<int>(group_->segment.ring().depth());
  }
  void abort(std::string_view reason) override;

 protected:
  std::unique_ptr<Work> do_all_reduce_start(const void* input, void* output, std::size_t count,
                                            DType dtype) override;
  ReduceBuffer do_acquire_reduce_buffer(std::size_t count, DType dtype) override;
  std::unique_ptr<Work> do_all_reduce_start(ReduceBuffer buffer, void* output) override;
  std::unique_ptr<CheckedWork> do_checked_all_reduce_start(ReduceBuffer buffer, void* output,
                                                           const CallHeader& mine) override;
  std::unique_ptr<Work> do_reduce_scatter_start(const void* input, void* output,
                                                std::span<const std::size_t> counts,
                                                DType dtype) override;
  std::unique_ptr<GatherWork> do_all_gather_start(const void* input, void* output,
                                                  std::span<const std::size_t> counts,
                                                  DType dtype) override;
  std::vector<std::string> do_all_gather(std::string_view mine) override;

 private:
  // Numbers the next collective and refuses to start it on an aborted group.
  std::uint64_t begin_collective(std::string_view operation);
  // Copies into this rank's slot the part of a chunk that peers will read.
  void copy_contribution(std::uint64_t round, const std::byte* chunk, std::size_t count,
                         DType dtype) const;

  std::shared_ptr<RoundQueue> queue_;
  std::shared_ptr<ShmGroup> group_;
  std::string name_;
  // Starts the oldest acquired buffer's round; `mismatch` makes it checked.
  void start_buffer(const ReduceBuffer& buffer, void* output,
                    std::shared_ptr<std::vector<CallHeader>> mismatch);

  // Collective numbers of the buffers acquired and not yet started, oldest first.
  std::deque<std::uint64_t> acquired_indices_;
};

std::uint64_t ShmCommunicator::begin_collective(std::string_view operation) {
  const std::uint64_t index = ++group_->collectives;
  if (auto notice = shm::read_abort(group_->segment)) {
    shm::throw_abort(*notice, group_->rank, shm::describe_context({operation, index, {}}));
  }
  return index;
}

void ShmCommunicator::copy_contribution(std::uint64_t round, const std::byte* chunk,
                                        std::size_t count, DType dtype) const {
  if (group_->size == 1) return;  // no one else reads it
  const std::size_t element = dtype_size(dtype);
  std::byte* slot = group_->segment.ring().slot(group_->rank, round);
  if (shm::choose_algorithm(*group_, count * element) == shm::RoundAlgorithm::one_shot) {
    std::memcpy(slot, chunk, count * element);
    return;
  }
  // Reduce-scatter reads my share from the input itself: skip it.
  const std::size_t begin = shm::share_begin(count, dtype, group_->size, group_->rank);
  const std::size_t end = shm::share_begin(count, dtype, group_->size, group_->rank + 1);
  std::memcpy(slot, chunk, begin * element);
  std::memcpy(slot + end * element, chunk + end * element, (count - end) * element);
}

std::unique_ptr<Work> ShmCommunicator::do_all_reduce_start(const void* input, void* output,
                                                           std::size_t count, DType dtype) {
  const std::size_t element = dtype_size(dtype);
  const std::size_t bytes = count * element;
  queue_->finish_all();
  const std::uint64_t index = begin_collective("all-reduce");
  const std::size_t chunk_elements = group_->segment.ring().slot_bytes() / element;
  const std::size_t chunks = (count + chunk_elements - 1) / chunk_elements;
  std::uint64_t last_round = 0;
  for (std::size_t chunk = 0; chunk < chunks; ++chunk) {
    RoundSpec spec;
    spec.index = index;
    spec.part = chunk + 1;
    spec.parts = chunks;
    spec.round = queue_->acquire({"all-reduce", index, {}, spec.part, spec.parts});
    spec.count = std::min(chunk_elements, count - chunk * chunk_elements);
    spec.dtype = dtype;
    spec.output = static_cast<std::byte*>(output) + chunk * chunk_elements * element;
    spec.mine = static_cast<const std::byte*>(input) + chunk * chunk_elements * element;
    spec.output_store = output_store_for(bytes, input == output);
    copy_contribution(spec.round, spec.mine, spec.count, dtype);
    queue_->start(spec);
    last_round = spec.round;
  }
  return std::make_unique<ShmWork>(queue_, last_round);
}

ReduceBuffer ShmCommunicator::do_acquire_reduce_buffer(std::size_t count, DType dtype) {
  const std::uint64_t index = begin_collective("all-reduce");
  ReduceBuffer buffer;
  buffer.round = queue_->acquire({"all-reduce", index, {}});
  buffer.data = group_->segment.ring().slot(group_->rank, buffer.round);
  buffer.count = count;
  buffer.dtype = dtype;
  acquired_indices_.push_back(index);
  return buffer;
}

void ShmCommunicator::start_buffer(const ReduceBuffer& buffer, void* output,
                                   std::shared_ptr<std::vector<CallHeader>> mismatch) {
  require(!acquired_indices_.empty() && buffer.round != 0 &&
              buffer.data == group_->segment.ring().slot(group_->rank, buffer.round),
          "all_reduce_start: the buffer was not acquired from this communicator");
  RoundSpec spec;
  spec.index = acquired_indices_.front();
  spec.round = buffer.round;
  spec.count = buffer.count;
  spec.dtype = buffer.dtype;
  spec.output = static_cast<std::byte*>(output);
  spec.output_store = output_store_for(buffer.count * dtype_size(buffer.dtype), false);
  spec.mismatch = std::move(mismatch);
  queue_->start(spec);
  acquired_indices_.pop_front();
}

std::unique_ptr<Work> ShmCommunicator::do_all_reduce_start(ReduceBuffer buffer, void* output) {
  start_buffer(buffer, output, nullptr);
  return std::make_unique<ShmWork>(queue_, buffer.round);
}

std::unique_ptr<CheckedWork> ShmCommunicator::do_checked_all_reduce_start(ReduceBuffer buffer,
                                                                          void* output,
                                                                          const CallHeader& mine) {
  static_assert(sizeof(CallHeader) == shm::kRoundHeaderBytes);
  // In the ring before the round is announced: a peer reads them once it
  // sees this rank's contribution (the header's unused payload stays out).
  const shm::Ring& ring = group_->segment.ring();
  std::memcpy(ring.header(group_->rank, buffer.round), &mine,
              offsetof(CallHeader, payload) +
                  std::min<std::size_t>(mine.length, CallHeader::kPayloadBytes));
  ring.flags(group_->rank, buffer.round).digest.store(mine.digest, std::memory_order_relaxed);
  auto mismatch = std::make_shared<std::vector<CallHeader>>();
  start_buffer(buffer, output, mismatch);
  return std::make_unique<ShmCheckedWork>(queue_, buffer.round, std::move(mismatch));
}

std::vector<std::string> ShmCommunicator::do_all_gather(std::string_view mine) {
  queue_->finish_all();
  const std::uint64_t index = begin_collective("all-gather");
  const shm::Channel& channel = group_->segment.gather();
  const std::uint64_t current = ++group_->gather_sequence;
  const int me = group_->rank;

  // The slot of `current` was last used kSlotsPerRank rounds ago.
  PeerWait wait(*group_);
  wait.start({"all-gather", index, "to finish reading the round before the previous"});
  wait.wait([&](int r) {
    return channel.flags(r).consumed.load(std::memory_order_acquire) +
               shm::Channel::kSlotsPerRank >=
           current;
  });
  std::byte* slot = channel.slot(me, current);
  const std::uint64_t length = mine.size();
  std::memcpy(slot, &length, sizeof length);
  if (!mine.empty()) std::memcpy(slot + shm::kCacheLine, mine.data(), mine.size());
  channel.flags(me).published.store(current, std::memory_order_release);
  shm::ring_doorbell(group_->segment.doorbell());

  wait.start({"all-gather", index, "to contribute"});
  wait.wait(
      [&](int r) { return channel.flags(r).published.load(std::memory_order_acquire) >= current; });
  std::vector<std::string> gathered(static_cast<std::size_t>(group_->size));
  for (int r = 0; r < group_->size; ++r) {
    const std::byte* their_slot = channel.slot(r, current);
    std::uint64_t their_length = 0;
    std::memcpy(&their_length, their_slot, sizeof their_length);
    if (their_length > shm::kMaxGatherBytes) {
      throw InternalError(cat("all-gather #", index, ": rank ", r, " wrote a length of ",
                              their_length, " bytes into its slot"));
    }
    gathered[r].assign(reinterpret_cast<const char*>(their_slot + shm::kCacheLine),
                       static_cast<std::size_t>(their_length));
  }
  channel.flags(me).consumed.store(current, std::memory_order_release);
  shm::ring_doorbell(group_->segment.doorbell());
  return gathered;
}

std::unique_ptr<Work> ShmCommunicator::do_reduce_scatter_start(const void* input, void* output,
                                                               std::span<const std::size_t> counts,
                                                               DType dtype) {
  queue_->finish_all();
  const std::uint64_t index = begin_collective("reduce-scatter");
  const std::size_t element = dtype_size(dtype);
  std::size_t total = 0, shard_begin = 0;
  for (std::size_t r = 0; r < counts.size(); ++r) {
    if (static_cast<int>(r) == group_->rank) shard_begin = total;
    total += counts[r];
  }
  const std::size_t shard_end = shard_begin + counts[static_cast<std::size_t>(group_->rank)];
  const std::size_t chunk_elements = group_->segment.ring().slot_bytes() / element;
  const std::size_t chunks = (total + chunk_elements - 1) / chunk_elements;
  std::uint64_t last_round = 0;
  for (std::size_t chunk = 0; chunk < chunks; ++chunk) {
    RoundSpec spec;
    spec.kind = shm::RoundKind::reduce_scatter;
    spec.index = index;
    spec.part = chunk + 1;
    spec.parts = chunks;
    spec.round = queue_->acquire({"reduce-scatter", index, {}, spec.part, spec.parts});
    const std::size_t first = chunk * chunk_elements;
    spec.count = std::min(chunk_elements, total - first);
    spec.dtype = dtype;
    spec.mine = static_cast<const std::byte*>(input) + first * element;
    // My shard's part of this chunk, which only I read (from the input).
    const std::size_t from = std::clamp(shard_begin, first, first + spec.count);
    spec.shard_begin = from - first;
    spec.shard_end = std::clamp(shard_end, first, first + spec.count) - first;
    if (spec.shard_end > spec.shard_begin) {
      spec.output = static_cast<std::byte*>(output) + (from - shard_begin) * element;
    }
    if (group_->size > 1) {
      std::byte* slot = group_->segment.ring().slot(group_->rank, spec.round);
      std::memcpy(slot, spec.mine, spec.shard_begin * element);
      std::memcpy(slot + spec.shard_end * element, spec.mine + spec.shard_end * element,
                  (spec.count - spec.shard_end) * element);
    }
    queue_->start(spec);
    last_round = spec.round;
  }
  return std::make_unique<ShmWork>(queue_, last_round);
}

std::unique_ptr<GatherWork> ShmCommunicator::do_all_gather_start(
    const void* input, void* output, std::span<const std::size_t> counts, DType dtype) {
  queue_->finish_all();
  const std::uint64_t index = begin_collective("all-gather");
  const std::size_t element = dtype_size(dtype);
  const auto p = counts.size();
  const auto me = static_cast<std::size_t>(group_->rank);
  const std::size_t slot_bytes = group_->segment.ring().slot_bytes();
  std::vector<std::size_t> offsets(p + 1, 0);
  std::size_t most = 0;
  for (std::size_t r = 0; r < p; ++r) {
    offsets[r + 1] = offsets[r] + counts[r] * element;
    most = std::max(most, counts[r] * element);
  }
  // Round i carries bytes [i * slot, (i + 1) * slot) of every rank's block.
  const std::size_t rounds = (most + slot_bytes - 1) / slot_bytes;
  std::vector<std::uint64_t> last_rounds(p, 0);
  auto* out = static_cast<std::byte*>(output);
  const auto* in = static_cast<const std::byte*>(input);
  for (std::size_t i = 0; i < rounds; ++i) {
    RoundSpec spec;
    spec.kind = shm::RoundKind::all_gather;
    spec.index = index;
    spec.part = i + 1;
    spec.parts = rounds;
    spec.round = queue_->acquire({"all-gather", index, {}, spec.part, spec.parts});
    spec.pieces.resize(p);
    spec.targets.resize(p);
    const std::size_t at = i * slot_bytes;
    for (std::size_t r = 0; r < p; ++r) {
      const std::size_t bytes = offsets[r + 1] - offsets[r];
      spec.pieces[r] = std::min(slot_bytes, bytes - std::min(at, bytes));
      spec.targets[r] = out + offsets[r] + std::min(at, bytes);
      if (spec.pieces[r] > 0) last_rounds[r] = spec.round;
    }
    spec.mine = in + std::min(at, offsets[me + 1] - offsets[me]);
    test_hooks::fault_point(test_hooks::FaultPoint::gather);
    if (group_->size > 1 && spec.pieces[me] > 0) {
      std::memcpy(group_->segment.ring().slot(group_->rank, spec.round), spec.mine,
                  spec.pieces[me]);
    }
    queue_->start(spec);
  }
  return std::make_unique<ShmGatherWork>(queue_, std::move(last_rounds));
}

void ShmCommunicator::abort(std::string_view reason) {
  shm::publish_abort(group_->segment, group_->rank, shm::AbortKind::aborted, {group_->rank},
                     reason);
}

shm::AlgorithmChoice algorithm_choice(const ShmOptions& options) {
  switch (options.algorithm) {
    case ShmAlgorithm::one_shot:
      return shm::AlgorithmChoice::one_shot;
    case ShmAlgorithm::reduce_scatter:
      return shm::AlgorithmChoice::reduce_scatter;
    case ShmAlgorithm::automatic:
      break;
  }
  return shm::AlgorithmChoice::automatic;
}

// Before the segment exists, or before a rank has attached it, its pid is not
// in the segment; so every rank first puts its pid in the store, and setup's
// waits check those pids too: a rank killed during setup is then reported as
// lost at once, not as late at the deadline (minutes, by default).
constexpr std::chrono::milliseconds kSetupLivenessInterval{25};

std::string pid_key(int rank) { return cat("shm-pid-", rank); }

// A rank whose setup fails records why before its process ends, so that its
// peers report that it failed, and why, rather than that it died.
std::string failure_key(int rank) { return cat("shm-failed-", rank); }

// `rank`, when its pid is in the store and that process is gone: "rank 0
// (pid 12) died", or "rank 0 (pid 12) failed (its error)" if it said why.
std::optional<std::string> lost_peer(Store& store, int rank) {
  const auto text = store.try_get(pid_key(rank));
  if (!text) return std::nullopt;
  const long pid = std::strtol(text->c_str(), nullptr, 10);
  if (pid <= 0 || !shm::process_is_gone(static_cast<pid_t>(pid))) return std::nullopt;
  if (const auto failure = store.try_get(failure_key(rank))) {
    return cat("rank ", rank, " (pid ", pid, ") failed (", *failure, ")");
  }
  return cat("rank ", rank, " (pid ", pid, ") died");
}

// Rendezvous is not latency-critical: poll gently, 100 us growing to 10 ms.
std::string wait_for_segment_name(Store& store, std::chrono::milliseconds timeout) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point deadline = Clock::now() + timeout;
  Clock::time_point next_liveness_check = Clock::now();
  std::chrono::microseconds pause{100};
  for (;;) {
    if (auto name = store.try_get(shm::kSegmentKey)) return *std::move(name);
    const Clock::time_point now = Clock::now();
    if (now >= next_liveness_check || now >= deadline) {
      if (const auto lost = lost_peer(store, 0)) {
        // Rank 0 may have published the name since the look above, then
        // failed (a rank that never attached) and exited: the name is there
        // now, and the segment's absence leads to rank 0's verdict.
        if (auto name = store.try_get(shm::kSegmentKey)) return *std::move(name);
        throw PeerLostError(cat("shm setup: ", *lost, " before publishing the segment's name"), {0});
      }
      next_liveness_check = now + kSetupLivenessInterval;
    }
    if (now >= deadline) {
      throw TimeoutError(cat("shm setup: timed out after ", timeout.count(),
                             " ms waiting for rank 0 to publish the segment's name"),
                         {0});
    }
    test_hooks::fault_point(test_hooks::FaultPoint::wait);
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds{10000});
  }
}

// When setup fails on rank 0 it unlinks the segment, and a rank that reads
// the name only then finds nothing to map; so rank 0 first records why in the
// store: the error's kind, the ranks it names, its message.
constexpr const char* kSetupVerdictKey = "shm-setup-verdict";

void record_setup_verdict(Store& store, const CommError& error) {
  const char kind = dynamic_cast<const PeerLostError*>(&error) != nullptr  ? 'L'
                    : dynamic_cast<const TimeoutError*>(&error) != nullptr ? 'T'
                                                                           : 'A';
  std::string ranks;
  for (int r : error.ranks()) ranks += cat(ranks.empty() ? "" : ",", r);
  store.set(kSetupVerdictKey, cat(kind, ' ', ranks, ' ', error.what()));
}

// A rank that found the segment gone: rank 0's verdict, once it is in the
// store, as the error rank 0 met; rank 0 lost, if it died instead.
[[noreturn]] void throw_setup_verdict(Store& store, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (const auto verdict = store.try_get(kSetupVerdictKey)) {
      // "<kind> <rank>,<rank>,... <message>"
      const std::size_t message_at = verdict->find(' ', 2);
      std::vector<int> ranks;
      std::istringstream list(verdict->substr(2, message_at - 2));
      for (std::string rank; std::getline(list, rank, ',');) ranks.push_back(std::stoi(rank));
      const std::string message = cat(verdict->substr(message_at + 1),
                                      " (rank 0's verdict; it removed the segment)");
      if ((*verdict)[0] == 'L') throw PeerLostError(message, ranks);
      if ((*verdict)[0] == 'T') throw TimeoutError(message, ranks);
      throw AbortedError(message, ranks);
    }
    if (const auto lost = lost_peer(store, 0)) {
      throw PeerLostError(cat("shm setup: ", *lost, " during setup"), {0});
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      throw TimeoutError(cat("shm setup: the segment was removed and rank 0 said nothing why within ",
                             timeout.count(), " ms"),
                         {0});
    }
    std::this_thread::sleep_for(std::chrono::milliseconds{1});
  }
}

// Rank 0 creates the segment and publishes its name; the others map it.
// The name is in the store (reserved) before the segment exists: a rank 0
// killed between creating and publishing it would otherwise leave a segment
// that no one can name, in /dev/shm until the host reboots.
shm::Segment open_segment(Store& store, int rank, int size, const ShmOptions& options) {
  if (rank == 0) {
    const std::string reserved = shm::Segment::random_name();
    store.set(shm::kReservedSegmentKey, reserved);
    shm::Segment segment =
        shm::Segment::create(reserved, size, options.slot_bytes, algorithm_choice(options));
    test_hooks::fault_point(test_hooks::FaultPoint::setup);
    store.set(shm::kSegmentKey, segment.name());
    return segment;
  }
  if (auto segment = shm::Segment::attach(wait_for_segment_name(store, options.timeout), size)) {
    return *std::move(segment);
  }
  throw_setup_verdict(store, options.timeout);
}

// Rank 0's check of the ranks that have not attached: those whose process is
// gone abort the group (the others wait for rank 0, which then releases them
// with the error) and fail setup.
void check_unattached_alive(Store& store, const ShmGroup& group) {
  std::vector<int> lost;
  std::string detail;
  for (int r = 1; r < group.size; ++r) {
    if (group.segment.record(r).attached.load(std::memory_order_acquire) != 0) continue;
    if (const auto peer = lost_peer(store, r)) {
      lost.push_back(r);
      detail += cat(detail.empty() ? "" : ", ", *peer);
    }
  }
  if (lost.empty()) return;
  detail += " before attaching";
  shm::publish_abort(group.segment, group.rank, shm::AbortKind::peer_lost, lost, detail);
  throw PeerLostError(cat("shm setup: ", detail), lost);
}

// Every rank records itself; rank 0 waits for all, unlinks the name, and
// releases the others. So setup ends on every rank with nothing in /dev/shm.
void join_group(Store& store, ShmGroup& group) {
  group.segment.attach_rank(group.rank);
  test_hooks::fault_point(test_hooks::FaultPoint::setup);
  shm::SegmentState& state = group.segment.state();
  PeerWait wait(group);
  if (group.rank == 0) {
    using Clock = std::chrono::steady_clock;
    wait.start({"shm setup", 0, "to attach"});
    state.setup_deadline_ns.store(
        std::chrono::duration_cast<std::chrono::nanoseconds>(
            (Clock::now() + group.timeout).time_since_epoch())
            .count(),
        std::memory_order_release);
    shm::Backoff backoff(group);
    Clock::time_point next_liveness_check = Clock::now();
    try {
      while (true) {
        backoff.arm();
        if (wait.poll([&](int r) {
              return group.segment.record(r).attached.load(std::memory_order_acquire) != 0;
            })) {
          break;
        }
        if (Clock::now() >= next_liveness_check) {
          check_unattached_alive(store, group);
          next_liveness_check = Clock::now() + kSetupLivenessInterval;
        }
        backoff.pause();
      }
    } catch (const CommError& error) {
      record_setup_verdict(store, error);
      throw;
    }
    group.segment.unlink();
    state.ready.store(1, std::memory_order_release);
    shm::ring_doorbell(group.segment.doorbell());
    return;
  }
  // Only rank 0 knows which ranks are missing. A rank that started waiting
  // for it before rank 0 started waiting for them would reach its deadline
  // first and blame rank 0: so wait until a little after rank 0's deadline,
  // by which time rank 0 has reported the missing ranks (or, frozen itself,
  // is rightly blamed).
  const int root[] = {0};
  wait.start({"shm setup", 0, "to finish setup"}, root);
  const auto slack =
      std::min<std::chrono::milliseconds>(group.timeout / 4, std::chrono::seconds{1});
  shm::Backoff backoff(group);
  while (true) {
    backoff.arm();
    if (const std::int64_t ns = state.setup_deadline_ns.load(std::memory_order_acquire); ns != 0) {
      wait.extend_deadline(std::chrono::steady_clock::time_point(std::chrono::nanoseconds(ns)) +
                           slack);
    }
    if (wait.poll([&](int) { return state.ready.load(std::memory_order_acquire) != 0; })) return;
    backoff.pause();
  }
}

int env_int(const char* name) {
  const auto text = detail::read_env(name);
  require(text.has_value(), name,
          " is not set; create_shm_communicator_from_env needs TPFUSE_RANK, TPFUSE_WORLD_SIZE and "
          "TPFUSE_STORE_DIR (launch_local sets them)");
  const std::int64_t value = detail::parse_env_int(name, *text);
  require(value >= 0 && value <= std::numeric_limits<int>::max(), name,
          ": expected a non-negative int, got ", value);
  return static_cast<int>(value);
}

}  // namespace

std::chrono::milliseconds ShmOptions::default_timeout() {
  const std::int64_t ms = kTimeoutMs.get();
  require(ms > 0, kTimeoutMs.name(), ": expected a positive number of milliseconds, got ", ms);
  return std::chrono::milliseconds{ms};
}

std::size_t ShmOptions::default_slot_bytes() {
  const std::int64_t bytes = kSlotBytes.get();
  require(bytes > 0, kSlotBytes.name(), ": expected a positive number of bytes, got ", bytes);
  return static_cast<std::size_t>(bytes);
}

ShmAlgorithm ShmOptions::default_algorithm() {
  const std::string& name = kAlgorithm.get();
  if (name == "auto") return ShmAlgorithm::automatic;
  if (name == "one_shot") return ShmAlgorithm::one_shot;
  if (name == "reduce_scatter") return ShmAlgorithm::reduce_scatter;
  throw InvalidArgument(
      cat(kAlgorithm.name(), ": expected auto, one_shot or reduce_scatter, got \"", name, "\""));
}

std::string ShmOptions::default_secret() {
  return detail::read_env("TPFUSE_SECRET").value_or(std::string());
}

std::shared_ptr<Communicator> create_shm_communicator(Store& store, int rank, int size,
                                                      const ShmOptions& options) {
  require(size >= 1 && size <= shm::kMaxRanks, "shm: world size must be in [1, ", shm::kMaxRanks,
          "], got ", size);
  require(rank >= 0 && rank < size, "shm: rank must be in [0, ", size, "), got ", rank);
  require(options.timeout.count() > 0, "shm: timeout must be positive, got ",
          options.timeout.count(), " ms");
  require(options.slot_bytes >= shm::kCacheLine && options.slot_bytes % shm::kCacheLine == 0 &&
              options.slot_bytes <= kMaxSlotBytes,
          "shm: slot_bytes must be a multiple of 64 in [64, ", kMaxSlotBytes, "], got ",
          options.slot_bytes);
  std::optional<JobSecret> secret;
  if (!options.secret.empty()) {
    secret = JobSecret::parse(options.secret, "shm: secret (ShmOptions::secret or TPFUSE_SECRET)");
  }
  log::set_rank(rank);

  // Nothing is written before the check: a refused process leaves no key.
  PrefixStore job_store(
      check_job_secret(store, secret ? &*secret : nullptr, rank, options.timeout, "shm setup"),
      store);
  job_store.set(pid_key(rank), std::to_string(::getpid()));
  std::shared_ptr<ShmGroup> group;
  try {
    group = std::make_shared<ShmGroup>(open_segment(job_store, rank, size, options), rank,
                                       options.timeout);
    join_group(job_store, *group);
  } catch (const std::exception& error) {
    try {
      job_store.set(failure_key(rank), error.what());
    } catch (const std::exception&) {
      // The store failed too: peers will report this rank as died.
    }
    throw;
  }
  auto comm = std::make_shared<ShmCommunicator>(group);
  log::info("shm communicator ", comm->name(), " ready: ", size, " ranks, segment of ",
            group->segment.total_bytes(), " B, ", shm::kRingDepth, " slots of ",
            group->segment.header().slot_bytes, " B per rank, sum kernel ", shm::sum_kernel_name());
  return comm;
}

std::shared_ptr<Communicator> create_shm_communicator_from_env(const ShmOptions& options) {
  const int rank = env_int("TPFUSE_RANK");
  const int size = env_int("TPFUSE_WORLD_SIZE");
  const auto dir = detail::read_env("TPFUSE_STORE_DIR");
  require(dir.has_value(),
          "TPFUSE_STORE_DIR is not set; create_shm_communicator_from_env needs "
          "TPFUSE_RANK, TPFUSE_WORLD_SIZE and TPFUSE_STORE_DIR (launch_local sets them)");
  FileStore store(*dir);
  return create_shm_communicator(store, rank, size, options);
}

MemoryTraffic shm_all_reduce_traffic(int size, std::size_t bytes, const ShmOptions& options) {
  require(size >= 1, "shm_all_reduce_traffic: size must be at least 1, got ", size);
  require(options.slot_bytes > 0, "shm_all_reduce_traffic: slot_bytes must be positive");
  const auto p = static_cast<std::uint64_t>(size);
  const std::size_t one_shot_max = shm::max_one_shot_bytes(size, algorithm_choice(options));
  MemoryTraffic traffic;
  for (std::size_t done = 0; done < bytes;) {
    const std::uint64_t c = std::min(options.slot_bytes, bytes - done);
    done += c;
    if (size == 1) {
      traffic.read += c;
      traffic.written += c;
    } else if (c <= one_shot_max) {
      traffic.read += (p + 1) * c;
      traffic.written += 2 * c;
    } else {
      const std::uint64_t others = c - c / p;
      traffic.read += others + c + others;
      traffic.written += 2 * c;
    }
  }
  return traffic;
}

}  // namespace tpfuse::comm
