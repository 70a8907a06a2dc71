// Handing out ring slots and advancing the rounds in flight.
#include "comm/shm_round_queue.h"

#include "tpfuse/core/error.h"

namespace tpfuse::comm::shm {

std::uint64_t RoundQueue::acquire(const WaitLabel& label) {
  const std::size_t depth = group_->segment.ring().depth();
  std::uint64_t round = 0;
  {
    const std::lock_guard lock(mutex_);
    // The slot's last use must have been started, or no one could free it.
    require(reserved_ - started_ < depth, "all-reduce: ", depth,
            " buffers are acquired and not started; start one first");
    round = ++reserved_;
  }
  if (round <= depth) return round;  // the slot's first use
  const std::uint64_t last_use = round - depth;
  const Ring& ring = group_->segment.ring();
  PeerWait wait(*group_);
  wait.start({label.operation, label.index, "to finish reading the slot's last round", label.part,
              label.parts});
  Backoff backoff(*group_);
  TracedWait traced;
  while (true) {
    backoff.arm();
    bool free = false;
    {
      const std::lock_guard lock(mutex_);
      if (advance_locked() > 0) backoff.reset();
      free = complete_through_locked(last_use) && wait.poll([&](int r) {
        return ring.flags(r, last_use).consumed.load(std::memory_order_acquire) >= last_use;
      });
    }
    if (free) return round;
    traced.pausing(wait.label(), wait.pending());
    backoff.pause();
  }
}

std::shared_ptr<Round> RoundQueue::start(const RoundSpec& spec) {
  const std::lock_guard lock(mutex_);
  require(spec.round == started_ + 1 && spec.round <= reserved_, "all-reduce: round ", spec.round,
          " started out of order (next to start: ", started_ + 1, ", last acquired: ", reserved_,
          ")");
  auto op = std::make_shared<Round>(*group_, spec);
  started_ = spec.round;
  in_flight_.push_back(op);
  advance_locked();  // a peer may be waiting for this round only
  return op;
}

bool RoundQueue::advance_through(std::uint64_t round) {
  const std::lock_guard lock(mutex_);
  advance_locked();
  return complete_through_locked(round);
}

std::size_t RoundQueue::advance_locked() {
  std::size_t completed = 0;
  while (!in_flight_.empty() && in_flight_.front()->advance()) {
    in_flight_.pop_front();
    ++completed;
  }
  return completed;
}

bool RoundQueue::complete_through_locked(std::uint64_t round) const {
  return in_flight_.empty() || in_flight_.front()->round() > round;
}

template <class Complete>
void RoundQueue::finish_when(Complete&& complete) {
  Backoff backoff(*group_);
  TracedWait traced;
  while (true) {
    backoff.arm();
    {
      const std::lock_guard lock(mutex_);
      if (advance_locked() > 0) backoff.reset();
      if (complete()) return;
      const Round& oldest = *in_flight_.front();
      traced.pausing(oldest.wait_label(), oldest.waiting_for());
    }
    backoff.pause();
  }
}

void RoundQueue::finish_through(std::uint64_t round) {
  finish_when([&] { return complete_through_locked(round); });
}

bool RoundQueue::piece_in_place_locked(std::uint64_t round, int rank) const {
  if (complete_through_locked(round)) return true;
  // Rounds complete in order: the oldest in flight is `round` or earlier.
  const Round& oldest = *in_flight_.front();
  return oldest.round() == round && oldest.has_piece(rank);
}

bool RoundQueue::advance_piece(std::uint64_t round, int rank) {
  const std::lock_guard lock(mutex_);
  advance_locked();
  return piece_in_place_locked(round, rank);
}

void RoundQueue::finish_piece(std::uint64_t round, int rank) {
  finish_when([&] { return piece_in_place_locked(round, rank); });
}

void RoundQueue::finish_all() {
  std::uint64_t last = 0;
  {
    const std::lock_guard lock(mutex_);
    last = started_;
  }
  finish_through(last);
}

}  // namespace tpfuse::comm::shm
