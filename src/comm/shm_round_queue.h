// The rounds of the all-reduce ring that this rank has started and not yet
// completed, oldest first, and the hand-out of ring slots to producers.
//
// A slot is handed out for round s once round s - ring_depth, the slot's last
// use, has been consumed by every rank. Rounds advance strictly in order, on
// every rank alike, so every wait has a peer that can end it: a rank that
// waits keeps advancing its own rounds, and each round needs from the peers
// only rounds they have already started. Calls may come from two threads (a
// producer and a communication helper); a mutex serialises them, and no wait
// holds it while pausing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>

#include "comm/shm_group.h"
#include "comm/shm_rounds.h"

namespace tpfuse::comm::shm {

class RoundQueue {
 public:
  explicit RoundQueue(std::shared_ptr<ShmGroup> group) : group_(std::move(group)) {}

  const std::shared_ptr<ShmGroup>& group() const { return group_; }

  // Reserves the next round and waits, bounded, until this rank's slot for it
  // is free on every rank; returns the round. At most ring_depth rounds may be
  // reserved and not yet started (InvalidArgument beyond).
  std::uint64_t acquire(const WaitLabel& label);

  // Starts round spec.round (the oldest reserved one): the slot holds this
  // rank's contribution.
  std::shared_ptr<Round> start(const RoundSpec& spec);

  // Advances the rounds in flight, in order, without waiting; true once
  // `round` and every round before it are complete.
  bool advance_through(std::uint64_t round);
  // Waits until `round` and every round before it are complete.
  void finish_through(std::uint64_t round);
  void finish_all();
  // The same for the rounds before `round` and, of all-gather round
  // `round`, `rank`'s piece.
  bool advance_piece(std::uint64_t round, int rank);
  void finish_piece(std::uint64_t round, int rank);

 private:
  // Advances until complete(), with mutex_ held, is true; bounded by the
  // rounds' deadlines.
  template <class Complete>
  void finish_when(Complete&& complete);
  bool piece_in_place_locked(std::uint64_t round, int rank) const;
  // Both with mutex_ held. advance_locked() returns how many rounds it completed.
  std::size_t advance_locked();
  bool complete_through_locked(std::uint64_t round) const;

  std::shared_ptr<ShmGroup> group_;
  std::mutex mutex_;
  std::deque<std::shared_ptr<Round>> in_flight_;
  std::uint64_t reserved_ = 0;  // last round handed out
  std::uint64_t started_ = 0;   // last round started
};

}  // namespace tpfuse::comm::shm
