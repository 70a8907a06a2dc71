// The shm transport's all-reduce: one-shot over the data channel. Each round
// moves one chunk of at most a slot: every rank copies its chunk into its
// slot, and once all have, every rank reads all p slots and sums them itself.
// That costs p reads per element, which is cheap for the small p of one host
// and needs a single synchronisation per chunk; a reduce-scatter + all-gather
// can replace it for large p without changing the segment.
#pragma once

#include <cstddef>
#include <memory>

#include "comm/shm_group.h"
#include "comm/shm_wait.h"
#include "tpfuse/core/dtype.h"

namespace tpfuse::comm::shm {

// Sums `count` elements of `dtype` at the same offset of every slot of
// `channel` into `output`: in fp32, in rank order 0..p-1, rounded once.
void sum_slots_in_rank_order(const Channel& channel, int world_size, std::size_t count, DType dtype,
                             std::byte* output);

// One all-reduce in flight: a state machine that advances chunk by chunk as
// far as the peers allow.
class OneShotAllReduce {
 public:
  // Reserves the rounds it will use on the data channel, so the next
  // collective's rounds follow on every rank alike.
  OneShotAllReduce(std::shared_ptr<ShmGroup> group, std::uint64_t index, const void* input,
                   void* output, std::size_t count, DType dtype);

  // Goes as far as it can without waiting; true once the result is in place.
  bool advance();
  // Advances until done, waiting as needed (bounded by the group's timeout).
  void finish();
  bool done() const { return chunk_ == chunks_; }

 private:
  enum class Step { fill_slot, sum_slots };

  bool try_fill_slot();
  bool try_sum_slots();
  void start_step(Step step);
  std::uint64_t sequence() const { return first_sequence_ + chunk_; }

  std::shared_ptr<ShmGroup> group_;
  std::uint64_t index_;
  const std::byte* input_;
  std::byte* output_;
  DType dtype_;
  std::size_t count_;
  std::size_t chunk_elements_;
  std::size_t chunks_;
  std::size_t chunk_ = 0;
  std::uint64_t first_sequence_;
  Step step_ = Step::fill_slot;
  PeerWait wait_;
  std::uint64_t progress_ = 0;  // steps completed; lets finish() restart its backoff
};

}  // namespace tpfuse::comm::shm
