// The Communicator's entry points (the claim and the argument checks every
// transport shares) and its default hooks: the pipelined all-reduce for
// transports that have no shared buffer to offer (the caller fills private
// memory, which the plain all-reduce then copies as it would any input), the
// checked round as an all_gather of headers then the all-reduce, the
// reduce-scatter as an all-reduce into private memory, and the tensor
// all-gather through the byte all_gather.
#include "tpfuse/comm/communicator.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "comm/collective_math.h"
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

// A reduce-scatter done as an all-reduce into private memory: on completion
// this rank's shard is copied out.
class ShardWork final : public Work {
 public:
  ShardWork(std::shared_ptr<std::byte[]> sums, std::unique_ptr<Work> inner, std::size_t offset,
            std::byte* output, std::size_t bytes)
      : sums_(std::move(sums)),
        inner_(std::move(inner)),
        offset_(offset),
        output_(output),
        bytes_(bytes) {}
  bool test() override {
    if (!copied_ && inner_->test()) copy();
    return copied_;
  }
  void wait() override {
    inner_->wait();
    if (!copied_) copy();
  }

 private:
  void copy() {
    if (bytes_ > 0) std::memcpy(output_, sums_.get() + offset_, bytes_);
    copied_ = true;
  }

  std::shared_ptr<std::byte[]> sums_;  // declared first, destroyed last
  std::unique_ptr<Work> inner_;
  std::size_t offset_;
  std::byte* output_;
  std::size_t bytes_;
  bool copied_ = false;
};

// An fp32 all-reduce into private memory whose sums are rounded to the
// output's dtype on completion.
class RoundingWork final : public Work {
 public:
  RoundingWork(std::unique_ptr<float[]> sums, std::unique_ptr<Work> inner, std::size_t count,
               DType dtype, std::byte* output)
      : sums_(std::move(sums)),
        inner_(std::move(inner)),
        count_(count),
        dtype_(dtype),
        output_(output) {}
  bool test() override {
    if (!done_ && inner_->test()) round();
    return done_;
  }
  void wait() override {
    inner_->wait();
    if (!done_) round();
  }

 private:
  void round() {
    narrow_from_f32(dtype_, sums_.get(), count_, output_);
    done_ = true;
  }

  std::unique_ptr<float[]> sums_;  // declared first, destroyed last
  std::unique_ptr<Work> inner_;
  std::size_t count_;
  DType dtype_;
  std::byte* output_;
  bool done_ = false;
};

// An all-gather that completed before it returned.
class DoneGatherWork final : public GatherWork {
 public:
  bool test() override { return true; }
  void wait() override {}
  bool test(int) override { return true; }
  void wait(int) override {}
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

namespace {

void check_floating(std::string_view operation, DType dtype) {
  require(is_floating(dtype), operation, ": dtype must be f16, bf16 or f32, got ",
          dtype_name(dtype));
}

// Bytes of `count` elements of `dtype`, refused where they overflow.
std::size_t checked_bytes(std::string_view operation, std::size_t count, DType dtype) {
  const std::size_t element = dtype_size(dtype);
  require(count <= std::numeric_limits<std::size_t>::max() / element, operation, ": count ", count,
          " of ", dtype_name(dtype), " overflows the address space");
  return count * element;
}

bool disjoint(const void* a, std::size_t a_bytes, const void* b, std::size_t b_bytes) {
  const auto x = reinterpret_cast<std::uintptr_t>(a), y = reinterpret_cast<std::uintptr_t>(b);
  return a_bytes == 0 || b_bytes == 0 || x + a_bytes <= y || y + b_bytes <= x;
}

// The counts of a reduce-scatter or tensor all-gather: one per rank, their
// sum within the address space. Returns the sum.
std::size_t checked_counts(std::string_view operation, const Communicator& comm,
                           std::span<const std::size_t> counts, DType dtype) {
  require(counts.size() == static_cast<std::size_t>(comm.size()), operation,
          ": counts must have one entry per rank (", comm.size(), "), got ", counts.size());
  std::size_t total = 0;
  for (std::size_t r = 0; r < counts.size(); ++r) {
    require(counts[r] <= std::numeric_limits<std::size_t>::max() - total, operation,
            ": counts overflow at rank ", r);
    total += counts[r];
  }
  checked_bytes(operation, total, dtype);
  return total;
}

}  // namespace

std::unique_ptr<Work> Communicator::all_reduce_start(const void* input, void* output,
                                                     std::size_t count, DType dtype) {
  const ExclusiveUse use(*this, "all_reduce");
  check_floating("all_reduce", dtype);
  require(count == 0 || (input != nullptr && output != nullptr),
          "all_reduce: input and output must not be null when count (", count, ") is positive");
  const std::size_t bytes = checked_bytes("all_reduce", count, dtype);
  // Chunk i of the output is written after chunk i of the input was read, so
  // the same buffer is fine; a partial overlap would overwrite input that
  // later chunks still need.
  require(input == output || disjoint(input, bytes, output, bytes),
          "all_reduce: input and output must be the same buffer or not overlap");
  require(acquired_ == 0,
          "all_reduce: a reduce buffer is acquired and not started; start it first");
  return do_all_reduce_start(input, output, count, dtype);
}

std::unique_ptr<Work> Communicator::all_reduce_rounding_start(const float* input, void* output,
                                                              std::size_t count, DType dtype) {
  const ExclusiveUse use(*this, "all_reduce_rounding");
  check_floating("all_reduce_rounding", dtype);
  require(count == 0 || (input != nullptr && output != nullptr),
          "all_reduce_rounding: input and output must not be null when count (", count,
          ") is positive");
  const std::size_t in_bytes = checked_bytes("all_reduce_rounding", count, DType::f32);
  require(disjoint(input, in_bytes, output, count * dtype_size(dtype)),
          "all_reduce_rounding: input and output must not overlap");
  require(acquired_ == 0,
          "all_reduce_rounding: a reduce buffer is acquired and not started; start it first");
  return do_all_reduce_rounding_start(input, output, count, dtype);
}

std::unique_ptr<Work> Communicator::do_all_reduce_rounding_start(const float* input, void* output,
                                                                 std::size_t count, DType dtype) {
  auto sums = std::make_unique<float[]>(std::max<std::size_t>(count, 1));
  auto inner = do_all_reduce_start(input, sums.get(), count, DType::f32);
  return std::make_unique<RoundingWork>(std::move(sums), std::move(inner), count, dtype,
                                        static_cast<std::byte*>(output));
}

ReduceBuffer Communicator::acquire_reduce_buffer(std::size_t count, DType dtype) {
  const ExclusiveUse use(*this, "acquire_reduce_buffer");
  check_floating("acquire_reduce_buffer", dtype);
  require(count <= max_reduce_buffer_bytes() / dtype_size(dtype), "acquire_reduce_buffer: ", count,
          " elements of ", dtype_name(dtype),
          " exceed max_reduce_buffer_bytes() = ", max_reduce_buffer_bytes());
  require(acquired_ < max_reduces_in_flight(), "acquire_reduce_buffer: ", acquired_,
          " buffers are acquired and not started (max_reduces_in_flight() = ",
          max_reduces_in_flight(), "); start one first");
  ReduceBuffer buffer = do_acquire_reduce_buffer(count, dtype);
  ++acquired_;
  return buffer;
}

namespace {

void check_started_buffer(std::string_view operation, int acquired, const ReduceBuffer& buffer,
                          const void* output) {
  require(acquired > 0 && buffer.data != nullptr, operation,
          ": the buffer was not acquired from this communicator (none is acquired and not "
          "started)");
  require(buffer.count == 0 || output != nullptr, operation,
          ": output must not be null when count (", buffer.count, ") is positive");
}

}  // namespace

std::unique_ptr<Work> Communicator::all_reduce_start(ReduceBuffer buffer, void* output) {
  const ExclusiveUse use(*this, "all_reduce_start");
  check_started_buffer("all_reduce_start", acquired_, buffer, output);
  auto work = do_all_reduce_start(std::move(buffer), output);
  --acquired_;
  return work;
}

std::unique_ptr<CheckedWork> Communicator::checked_all_reduce_start(ReduceBuffer buffer,
                                                                    void* output,
                                                                    const CallHeader& mine) {
  const ExclusiveUse use(*this, "checked_all_reduce_start");
  check_started_buffer("checked_all_reduce_start", acquired_, buffer, output);
  auto work = do_checked_all_reduce_start(std::move(buffer), output, mine);
  --acquired_;
  return work;
}

std::unique_ptr<Work> Communicator::reduce_scatter_start(const void* input, void* output,
                                                         std::span<const std::size_t> counts,
                                                         DType dtype) {
  const ExclusiveUse use(*this, "reduce_scatter");
  check_floating("reduce_scatter", dtype);
  const std::size_t total = checked_counts("reduce_scatter", *this, counts, dtype);
  const std::size_t mine = counts[static_cast<std::size_t>(rank())];
  require(total == 0 || input != nullptr,
          "reduce_scatter: input must not be null when the counts "
          "sum to ",
          total);
  require(mine == 0 || output != nullptr,
          "reduce_scatter: output must not be null when this "
          "rank's count (",
          mine, ") is positive");
  const std::size_t element = dtype_size(dtype);
  require(disjoint(input, total * element, output, mine * element),
          "reduce_scatter: input and output must not overlap");
  require(acquired_ == 0,
          "reduce_scatter: a reduce buffer is acquired and not started; start it first");
  return do_reduce_scatter_start(input, output, counts, dtype);
}

std::unique_ptr<GatherWork> Communicator::all_gather_start(const void* input, void* output,
                                                           std::span<const std::size_t> counts,
                                                           DType dtype) {
  const ExclusiveUse use(*this, "all_gather_start");
  const std::size_t total = checked_counts("all_gather_start", *this, counts, dtype);
  const auto me = static_cast<std::size_t>(rank());
  require(counts[me] == 0 || input != nullptr,
          "all_gather_start: input must not be null when "
          "this rank's count (",
          counts[me], ") is positive");
  require(total == 0 || output != nullptr,
          "all_gather_start: output must not be null when the "
          "counts sum to ",
          total);
  const std::size_t element = dtype_size(dtype);
  std::size_t before = 0;
  for (std::size_t r = 0; r < me; ++r) before += counts[r];
  const auto* place = static_cast<const std::byte*>(output) + before * element;
  require(input == place || disjoint(input, counts[me] * element, output, total * element),
          "all_gather_start: input must be this rank's place in output (in place) or not "
          "overlap output");
  require(acquired_ == 0,
          "all_gather_start: a reduce buffer is acquired and not started; start it first");
  return do_all_gather_start(input, output, counts, dtype);
}

std::vector<std::string> Communicator::all_gather(std::string_view mine) {
  const ExclusiveUse use(*this, "all_gather");
  require(mine.size() <= max_gather_bytes(), "all_gather: contribution of ", mine.size(),
          " bytes exceeds max_gather_bytes() = ", max_gather_bytes());
  return do_all_gather(mine);
}

std::unique_ptr<CheckedWork> Communicator::do_checked_all_reduce_start(ReduceBuffer buffer,
                                                                       void* output,
                                                                       const CallHeader& mine) {
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
  auto inner = do_all_reduce_start(std::move(buffer), output);
  return std::make_unique<DecidedCheckedWork>(
      std::move(inner), same ? std::vector<CallHeader>{} : std::move(headers));
}

ReduceBuffer Communicator::do_acquire_reduce_buffer(std::size_t count, DType dtype) {
  ReduceBuffer buffer;
  buffer.count = count;
  buffer.dtype = dtype;
  buffer.scratch = std::shared_ptr<std::byte[]>(
      static_cast<std::byte*>(::operator new(count* dtype_size(dtype), kBufferAlignment)),
      [](std::byte* memory) { ::operator delete(memory, kBufferAlignment); });
  buffer.data = buffer.scratch.get();
  return buffer;
}

std::unique_ptr<Work> Communicator::do_all_reduce_start(ReduceBuffer buffer, void* output) {
  require(buffer.scratch != nullptr && buffer.data == buffer.scratch.get(),
          "all_reduce_start: the buffer was not acquired from this communicator");
  auto inner = do_all_reduce_start(buffer.data, output, buffer.count, buffer.dtype);
  return std::make_unique<ScratchWork>(std::move(buffer.scratch), std::move(inner));
}

std::size_t Communicator::max_reduce_buffer_bytes() const {
  return std::numeric_limits<std::size_t>::max() / 2;
}

std::unique_ptr<Work> Communicator::do_reduce_scatter_start(const void* input, void* output,
                                                            std::span<const std::size_t> counts,
                                                            DType dtype) {
  const std::size_t element = dtype_size(dtype);
  std::size_t total = 0, before = 0;
  for (std::size_t r = 0; r < counts.size(); ++r) {
    if (static_cast<int>(r) == rank()) before = total;
    total += counts[r];
  }
  auto sums = std::shared_ptr<std::byte[]>(
      static_cast<std::byte*>(
          ::operator new(std::max<std::size_t>(total * element, 1), kBufferAlignment)),
      [](std::byte* memory) { ::operator delete(memory, kBufferAlignment); });
  auto inner = do_all_reduce_start(input, sums.get(), total, dtype);
  return std::make_unique<ShardWork>(std::move(sums), std::move(inner), before * element,
                                     static_cast<std::byte*>(output),
                                     counts[static_cast<std::size_t>(rank())] * element);
}

std::unique_ptr<GatherWork> Communicator::do_all_gather_start(const void* input, void* output,
                                                              std::span<const std::size_t> counts,
                                                              DType dtype) {
  // Each all_gather carries a piece of every rank's block, up to
  // max_gather_bytes() (less the framing) of each, until every block is done.
  const std::size_t element = dtype_size(dtype);
  const std::size_t piece = std::max<std::size_t>(max_gather_bytes(), 1);
  const auto me = static_cast<std::size_t>(rank());
  std::vector<std::size_t> offsets(counts.size() + 1, 0);
  std::size_t most = 0;
  for (std::size_t r = 0; r < counts.size(); ++r) {
    offsets[r + 1] = offsets[r] + counts[r] * element;
    most = std::max(most, counts[r] * element);
  }
  // Copied first: in place, the output's own block is the input.
  const std::vector<std::byte> block(static_cast<const std::byte*>(input),
                                     static_cast<const std::byte*>(input) + counts[me] * element);
  auto* out = static_cast<std::byte*>(output);
  for (std::size_t done = 0; done < most; done += piece) {
    const std::size_t mine = std::min(piece, block.size() - std::min(done, block.size()));
    const auto gathered =
        do_all_gather(std::string_view(reinterpret_cast<const char*>(block.data()) + done, mine));
    for (std::size_t r = 0; r < counts.size(); ++r) {
      const std::size_t bytes = offsets[r + 1] - offsets[r];
      const std::size_t expected = std::min(piece, bytes - std::min(done, bytes));
      if (gathered[r].size() != expected) {
        throw InternalError(cat("all_gather_start: rank ", r, " sent ", gathered[r].size(),
                                " bytes of its block at offset ", done, ", expected ", expected,
                                " (do the ranks' counts differ?)"));
      }
      std::memcpy(out + offsets[r] + done, gathered[r].data(), expected);
    }
  }
  return std::make_unique<DoneGatherWork>();
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
