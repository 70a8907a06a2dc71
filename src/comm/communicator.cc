// The Communicator's generic pipelined all-reduce, for transports that have no
// shared buffer to offer: the caller fills private memory, which the plain
// all-reduce then copies as it would any input.
#include "tpfuse/comm/communicator.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
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

// A checked all-reduce decided before it started: an all-reduce that summed,
// or the headers that differed.
class DecidedCheckedWork final : public CheckedWork {
 public:
  DecidedCheckedWork(std::unique_ptr<Work> inner, std::vector<CallHeader> mismatch)
      : inner_(std::move(inner)), mismatch_(std::move(mismatch)) {}
  bool test() override { return inner_->test(); }
  void wait() override { inner_->wait(); }
  const std::vector<CallHeader>* mismatch() const override {
    return mismatch_.empty() ? nullptr : &mismatch_;
  }

 private:
  std::unique_ptr<Work> inner_;
  std::vector<CallHeader> mismatch_;
};

}  // namespace

void CallHeader::set_payload(std::string_view bytes) {
  length = static_cast<std::uint32_t>(std::min(bytes.size(), kPayloadBytes));
  std::memcpy(payload.data(), bytes.data(), length);
}

std::string_view CallHeader::payload_view() const {
  return {reinterpret_cast<const char*>(payload.data()),
          std::min<std::size_t>(length, kPayloadBytes)};
}

std::unique_ptr<CheckedWork> Communicator::checked_all_reduce_start(ReduceBuffer buffer,
                                                                    void* output,
                                                                    const CallHeader& mine) {
  const ExclusiveUse use(*this, "checked_all_reduce_start");
  const std::size_t used =
      offsetof(CallHeader, payload) + std::min<std::size_t>(mine.length, CallHeader::kPayloadBytes);
  const std::vector<std::string> gathered = all_gather(
      std::string_view(reinterpret_cast<const char*>(&mine), std::min(used, max_gather_bytes())));
  std::vector<CallHeader> headers(gathered.size());
  bool same = true;
  for (std::size_t r = 0; r < gathered.size(); ++r) {
    std::memcpy(&headers[r], gathered[r].data(), std::min(gathered[r].size(), sizeof(CallHeader)));
    same = same && headers[r].digest == mine.digest;
  }
  // On a mismatch every rank still starts its buffer, empty: whatever a
  // transport counts per buffer then stays the same on every rank.
  if (!same) buffer.count = 0;
  auto inner = all_reduce_start(std::move(buffer), output);
  return std::make_unique<DecidedCheckedWork>(
      std::move(inner), same ? std::vector<CallHeader>{} : std::move(headers));
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
