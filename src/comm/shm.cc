// The shared-memory Communicator: setup (rendezvous, attach, unlink), the
// collectives' entry points, all_gather and abort. The segment's layout lives
// in shm_segment, waiting in shm_wait, the all-reduce algorithm in
// shm_all_reduce.
#include "tpfuse/comm/shm.h"

#include <cstdint>
#include <cstring>
#include <limits>

#include "comm/shm_all_reduce.h"
#include "comm/shm_group.h"
#include "comm/shm_segment.h"
#include "comm/shm_wait.h"
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

constexpr std::size_t kMaxSlotBytes = std::size_t{1} << 30;

using shm::OneShotAllReduce;
using shm::PeerWait;
using shm::ShmGroup;

class ShmWork final : public Work {
 public:
  explicit ShmWork(std::shared_ptr<OneShotAllReduce> op) : op_(std::move(op)) {}
  ShmWork(const ShmWork&) = delete;
  ShmWork& operator=(const ShmWork&) = delete;
  ~ShmWork() override {
    if (op_->done()) return;
    try {
      op_->finish();
    } catch (const std::exception& error) {
      // The failed wait reported itself to the group (or found a peer's
      // report there), so the next call on this communicator throws.
      log::debug("unfinished all-reduce dropped: ", error.what());
    }
  }
  bool test() override { return op_->advance(); }
  void wait() override { op_->finish(); }

 private:
  std::shared_ptr<OneShotAllReduce> op_;
};

class ShmCommunicator final : public Communicator {
 public:
  explicit ShmCommunicator(std::shared_ptr<ShmGroup> group)
      : group_(std::move(group)), name_("tpfuse-shm-" + group_->segment.group_token()) {}

  int rank() const override { return group_->rank; }
  int size() const override { return group_->size; }
  const std::string& name() const override { return name_; }
  std::chrono::milliseconds timeout() const override { return group_->timeout; }
  std::size_t max_gather_bytes() const override { return shm::kMaxGatherBytes; }

  std::unique_ptr<Work> all_reduce_start(const void* input, void* output, std::size_t count,
                                         DType dtype) override;
  std::vector<std::string> all_gather(std::string_view mine) override;
  void abort(std::string_view reason) override;

 private:
  // Collectives run one at a time: a new one first completes the last all-reduce.
  void finish_previous();
  // Numbers the next collective and refuses to start it on an aborted group.
  std::uint64_t begin_collective(std::string_view operation);

  std::shared_ptr<ShmGroup> group_;
  std::string name_;
  std::weak_ptr<OneShotAllReduce> previous_;
};

void ShmCommunicator::finish_previous() {
  if (auto previous = previous_.lock()) previous->finish();
  previous_.reset();
}

std::uint64_t ShmCommunicator::begin_collective(std::string_view operation) {
  const std::uint64_t index = ++group_->collectives;
  if (auto notice = shm::read_abort(group_->segment)) {
    shm::throw_abort(*notice, group_->rank, shm::describe_context({operation, index, {}}));
  }
  return index;
}

std::unique_ptr<Work> ShmCommunicator::all_reduce_start(const void* input, void* output,
                                                        std::size_t count, DType dtype) {
  require(is_floating(dtype), "all_reduce: dtype must be f16, bf16 or f32, got ",
          dtype_name(dtype));
  require(count == 0 || (input != nullptr && output != nullptr),
          "all_reduce: input and output must not be null when count (", count, ") is positive");
  const std::size_t element = dtype_size(dtype);
  require(count <= std::numeric_limits<std::size_t>::max() / element, "all_reduce: count ", count,
          " of ", dtype_name(dtype), " overflows the address space");
  // Chunk i of the output is written after chunk i of the input was copied,
  // so the same buffer is fine; a partial overlap would overwrite input that
  // later chunks still need.
  const auto in = reinterpret_cast<std::uintptr_t>(input);
  const auto out = reinterpret_cast<std::uintptr_t>(output);
  const std::size_t bytes = count * element;
  require(in == out || in + bytes <= out || out + bytes <= in,
          "all_reduce: input and output must be the same buffer or not overlap");

  finish_previous();
  const std::uint64_t index = begin_collective("all-reduce");
  auto op = std::make_shared<OneShotAllReduce>(group_, index, input, output, count, dtype);
  previous_ = op;
  op->advance();  // publish our first chunk now, so peers can start summing
  return std::make_unique<ShmWork>(std::move(op));
}

std::vector<std::string> ShmCommunicator::all_gather(std::string_view mine) {
  require(mine.size() <= shm::kMaxGatherBytes, "all_gather: contribution of ", mine.size(),
          " bytes exceeds max_gather_bytes() = ", shm::kMaxGatherBytes);
  finish_previous();
  const std::uint64_t index = begin_collective("all-gather");
  const shm::Channel& channel = group_->segment.gather();
  const std::uint64_t current = ++group_->gather_sequence;
  const int me = group_->rank;

  PeerWait wait(*group_);
  wait.start({"all-gather", index, "to finish reading the previous round"});
  wait.wait([&](int r) {
    return channel.flags(r).consumed.load(std::memory_order_acquire) >= current - 1;
  });
  const std::uint64_t length = mine.size();
  std::memcpy(channel.slot(me), &length, sizeof length);
  if (!mine.empty()) std::memcpy(channel.slot(me) + shm::kCacheLine, mine.data(), mine.size());
  channel.flags(me).published.store(current, std::memory_order_release);

  wait.start({"all-gather", index, "to contribute"});
  wait.wait(
      [&](int r) { return channel.flags(r).published.load(std::memory_order_acquire) >= current; });
  std::vector<std::string> gathered(static_cast<std::size_t>(group_->size));
  for (int r = 0; r < group_->size; ++r) {
    std::uint64_t their_length = 0;
    std::memcpy(&their_length, channel.slot(r), sizeof their_length);
    if (their_length > shm::kMaxGatherBytes) {
      throw InternalError(cat("all-gather #", index, ": rank ", r, " wrote a length of ",
                              their_length, " bytes into its slot"));
    }
    gathered[r].assign(reinterpret_cast<const char*>(channel.slot(r) + shm::kCacheLine),
                       static_cast<std::size_t>(their_length));
  }
  channel.flags(me).consumed.store(current, std::memory_order_release);
  return gathered;
}

void ShmCommunicator::abort(std::string_view reason) {
  shm::publish_abort(group_->segment, group_->rank, shm::AbortKind::aborted, {group_->rank},
                     reason);
}

// Rank 0 creates the segment and publishes its name; the others map it.
shm::Segment open_segment(Store& store, int rank, int size, const ShmOptions& options) {
  if (rank == 0) {
    shm::Segment segment = shm::Segment::create(size, options.slot_bytes);
    store.set(shm::kSegmentKey, segment.name());
    return segment;
  }
  std::string name;
  try {
    name = store.get(shm::kSegmentKey, options.timeout);
  } catch (const TimeoutError& error) {
    throw TimeoutError(cat("shm setup: rank 0 did not publish the segment's name: ", error.what()),
                       {0});
  }
  return shm::Segment::attach(name, size);
}

// Every rank records itself; rank 0 waits for all, unlinks the name, and
// releases the others. So setup ends on every rank with nothing in /dev/shm.
void join_group(ShmGroup& group) {
  group.segment.attach_rank(group.rank);
  shm::SegmentState& state = group.segment.state();
  PeerWait wait(group);
  if (group.rank == 0) {
    wait.start({"shm setup", 0, "to attach"});
    wait.wait([&](int r) {
      return group.segment.record(r).attached.load(std::memory_order_acquire) != 0;
    });
    group.segment.unlink();
    state.ready.store(1, std::memory_order_release);
    return;
  }
  const int root[] = {0};
  wait.start({"shm setup", 0, "to finish setup"}, root);
  wait.wait([&](int) { return state.ready.load(std::memory_order_acquire) != 0; });
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
  log::set_rank(rank);

  auto group =
      std::make_shared<ShmGroup>(open_segment(store, rank, size, options), rank, options.timeout);
  join_group(*group);
  auto comm = std::make_shared<ShmCommunicator>(group);
  log::info("shm communicator ", comm->name(), " ready: ", size, " ranks, segment of ",
            group->segment.total_bytes(), " B, slots of ", group->segment.header().slot_bytes,
            " B");
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

}  // namespace tpfuse::comm
