// The one-shot all-reduce: its chunk state machine and the fixed-order sum.
#include "comm/shm_all_reduce.h"

#include <algorithm>
#include <cstring>

#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"

namespace tpfuse::comm::shm {

namespace {

struct F32Codec {
  using Stored = float;
  static float load(float value) { return value; }
  static float store(float value) { return value; }
};

struct F16Codec {
  using Stored = Half;
  static float load(Half value) { return f16_to_f32(value); }
  static Half store(float value) { return f32_to_f16(value); }
};

struct BF16Codec {
  using Stored = BFloat16;
  static float load(BFloat16 value) { return bf16_to_f32(value); }
  static BFloat16 store(float value) { return f32_to_bf16(value); }
};

// Works through the chunk in blocks that fit in L1 with their fp32
// accumulators. Each element still sees acc = x_0; acc += x_1; ... in rank
// order, so blocking (and the vectorising of the inner loops) cannot change a bit.
template <class Codec>
void sum_in_rank_order(const Channel& channel, int world_size, std::size_t count,
                       std::byte* output) {
  using Stored = typename Codec::Stored;
  constexpr std::size_t kBlock = 512;
  float sums[kBlock];
  for (std::size_t begin = 0; begin < count; begin += kBlock) {
    const std::size_t n = std::min(kBlock, count - begin);
    const auto* first = reinterpret_cast<const Stored*>(channel.slot(0)) + begin;
    for (std::size_t i = 0; i < n; ++i) sums[i] = Codec::load(first[i]);
    for (int r = 1; r < world_size; ++r) {
      const auto* next = reinterpret_cast<const Stored*>(channel.slot(r)) + begin;
      for (std::size_t i = 0; i < n; ++i) sums[i] += Codec::load(next[i]);
    }
    // The caller's buffer need not be aligned for Stored: copy bytes out.
    for (std::size_t i = 0; i < n; ++i) {
      const Stored rounded = Codec::store(sums[i]);
      std::memcpy(output + (begin + i) * sizeof(Stored), &rounded, sizeof(Stored));
    }
  }
}

}  // namespace

void sum_slots_in_rank_order(const Channel& channel, int world_size, std::size_t count, DType dtype,
                             std::byte* output) {
  switch (dtype) {
    case DType::f32:
      return sum_in_rank_order<F32Codec>(channel, world_size, count, output);
    case DType::f16:
      return sum_in_rank_order<F16Codec>(channel, world_size, count, output);
    case DType::bf16:
      return sum_in_rank_order<BF16Codec>(channel, world_size, count, output);
    case DType::i8:
    case DType::i32:
    case DType::i64:
      break;
  }
  throw InternalError(cat("all-reduce: no sum for dtype ", dtype_name(dtype)));
}

OneShotAllReduce::OneShotAllReduce(std::shared_ptr<ShmGroup> group, std::uint64_t index,
                                   const void* input, void* output, std::size_t count, DType dtype)
    : group_(std::move(group)),
      index_(index),
      input_(static_cast<const std::byte*>(input)),
      output_(static_cast<std::byte*>(output)),
      dtype_(dtype),
      count_(count),
      chunk_elements_(group_->segment.data().slot_bytes() / dtype_size(dtype)),
      chunks_((count + chunk_elements_ - 1) / chunk_elements_),
      first_sequence_(group_->data_sequence + 1),
      wait_(*group_) {
  group_->data_sequence += chunks_;
  if (chunks_ > 0) start_step(Step::fill_slot);
}

void OneShotAllReduce::start_step(Step step) {
  step_ = step;
  const std::string_view what =
      step == Step::fill_slot ? "to finish reading the previous round" : "to contribute";
  wait_.start({"all-reduce", index_, what, chunk_ + 1, chunks_});
}

bool OneShotAllReduce::try_fill_slot() {
  const Channel& channel = group_->segment.data();
  const std::uint64_t previous = sequence() - 1;
  const bool slot_free = wait_.poll(
      [&](int r) { return channel.flags(r).consumed.load(std::memory_order_acquire) >= previous; });
  if (!slot_free) return false;
  const std::size_t element = dtype_size(dtype_);
  const std::size_t begin = chunk_ * chunk_elements_;
  const std::size_t n = std::min(chunk_elements_, count_ - begin);
  std::memcpy(channel.slot(group_->rank), input_ + begin * element, n * element);
  channel.flags(group_->rank).published.store(sequence(), std::memory_order_release);
  start_step(Step::sum_slots);
  return true;
}

bool OneShotAllReduce::try_sum_slots() {
  const Channel& channel = group_->segment.data();
  const std::uint64_t current = sequence();
  const bool all_published = wait_.poll(
      [&](int r) { return channel.flags(r).published.load(std::memory_order_acquire) >= current; });
  if (!all_published) return false;
  const std::size_t element = dtype_size(dtype_);
  const std::size_t begin = chunk_ * chunk_elements_;
  const std::size_t n = std::min(chunk_elements_, count_ - begin);
  sum_slots_in_rank_order(channel, group_->size, n, dtype_, output_ + begin * element);
  channel.flags(group_->rank).consumed.store(current, std::memory_order_release);
  ++chunk_;
  if (!done()) start_step(Step::fill_slot);
  return true;
}

bool OneShotAllReduce::advance() {
  while (!done()) {
    const bool moved = step_ == Step::fill_slot ? try_fill_slot() : try_sum_slots();
    if (!moved) return false;
    ++progress_;
  }
  return true;
}

void OneShotAllReduce::finish() {
  Backoff backoff;
  std::uint64_t seen = progress_;
  while (!advance()) {
    if (progress_ != seen) {
      backoff = Backoff{};
      seen = progress_;
    }
    backoff.pause();
  }
}

}  // namespace tpfuse::comm::shm
