// The Communicator's generic pipelined all-reduce, for transports that have no
// shared buffer to offer: the caller fills private memory, which the plain
// all-reduce then copies as it would any input.
#include "tpfuse/comm/communicator.h"

#include <limits>
#include <new>
#include <string>
#include <utility>

#include "tpfuse/core/error.h"

namespace tpfuse::comm {

namespace {

constexpr std::align_val_t kBufferAlignment{64};

// Keeps the private buffer alive until the all-reduce that reads it is done.
class ScratchWork final : public Work {
 public:
  ScratchWork(std::shared_ptr<std::byte[]> scratch, std::unique_ptr<Work> inner)
      : scratch_(std::move(scratch)), inner_(std::move(inner)) {}
  bool test() override { return inner_->test(); }
  void wait() override { inner_->wait(); }

 private:
  // Declared first, destroyed last: the inner Work may still read it.
  std::shared_ptr<std::byte[]> scratch_;
  std::unique_ptr<Work> inner_;
};

// A gather that was complete when it started.
class GatheredAlready final : public PendingGather {
 public:
  explicit GatheredAlready(std::vector<std::string> gathered) : gathered_(std::move(gathered)) {}
  std::vector<std::string> wait() override { return std::move(gathered_); }

 private:
  std::vector<std::string> gathered_;
};

}  // namespace

std::unique_ptr<PendingGather> Communicator::all_gather_start(std::string_view mine) {
  return std::make_unique<GatheredAlready>(all_gather(mine));
}

ReduceBuffer Communicator::acquire_reduce_buffer(std::size_t count, DType dtype) {
  require(is_floating(dtype), "acquire_reduce_buffer: dtype must be f16, bf16 or f32, got ",
          dtype_name(dtype));
  require(count <= max_reduce_buffer_bytes() / dtype_size(dtype), "acquire_reduce_buffer: ", count,
          " elements of ", dtype_name(dtype),
          " exceed max_reduce_buffer_bytes() = ", max_reduce_buffer_bytes());
  ReduceBuffer buffer;
  buffer.count = count;
  buffer.dtype = dtype;
  buffer.scratch = std::shared_ptr<std::byte[]>(
      static_cast<std::byte*>(::operator new(count* dtype_size(dtype), kBufferAlignment)),
      [](std::byte* memory) { ::operator delete(memory, kBufferAlignment); });
  buffer.data = buffer.scratch.get();
  return buffer;
}

std::unique_ptr<Work> Communicator::all_reduce_start(ReduceBuffer buffer, void* output) {
  require(buffer.scratch != nullptr && buffer.data == buffer.scratch.get(),
          "all_reduce_start: the buffer was not acquired from this communicator");
  auto inner = all_reduce_start(buffer.data, output, buffer.count, buffer.dtype);
  return std::make_unique<ScratchWork>(std::move(buffer.scratch), std::move(inner));
}

std::size_t Communicator::max_reduce_buffer_bytes() const {
  return std::numeric_limits<std::size_t>::max() / 2;
}

ExclusiveUse::ExclusiveUse(Communicator& comm, std::string_view operation) : comm_(comm) {
  const std::thread::id me = std::this_thread::get_id();
  std::thread::id none;
  if (comm.user_.compare_exchange_strong(none, me, std::memory_order_acquire)) {
    claimed_ = true;
    return;
  }
  if (none == me) return;  // nested: this thread holds it already
  const std::string reason =
      cat(operation, " on communicator \"", comm.name(), "\" (rank ", comm.rank(),
          ") overlapped a call of another thread of the same process; calls on one "
          "communicator must not overlap, since every rank must issue them in the same "
          "order (use one communicator per thread)");
  comm.abort(reason);
  throw ConcurrentCallError(cat(reason, "; the communicator is aborted"));
}

ExclusiveUse::~ExclusiveUse() {
  if (claimed_) comm_.user_.store(std::thread::id{}, std::memory_order_release);
}

}  // namespace tpfuse::comm
