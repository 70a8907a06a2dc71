// Bounded waiting for peers in the shm transport. Every wait spins briefly,
// then sleeps on the group's doorbell in growing steps (a peer's next step
// wakes it at once), so that 8 ranks on 2 cores still make progress; it
// watches the group's abort word on every poll and the peers' processes
// every few tens of milliseconds, and gives up at the group's deadline with
// an error that names the ranks that did not arrive.
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "comm/shm_group.h"

namespace tpfuse::comm::shm {

// The escalating pause between two polls of one wait. Before its first
// sleep a pause only counts the waiter among the doorbell's sleepers, so that
// the condition is checked once more, counted, before any sleep; the waiter
// stays counted until reset() or the end of the wait.
class Backoff {
 public:
  explicit Backoff(const ShmGroup& group)
      : doorbell_(group.segment.doorbell()), yield_to_peers_(group.ranks_share_cores) {}
  Backoff(const Backoff&) = delete;
  Backoff& operator=(const Backoff&) = delete;
  ~Backoff() { stop_sleeping(); }
  // Call before checking the condition waited for: a peer that rings after
  // this cuts the next sleep short.
  void arm() { seen_ = doorbell_.rings.load(std::memory_order_seq_cst); }
  void pause();
  // Starts over with short pauses (after progress).
  void reset() {
    yields_ = 0;
    spinning_since_.reset();
    sleep_ = std::chrono::microseconds{0};
    stop_sleeping();
  }

 private:
  void stop_sleeping() {
    if (!counted_) return;
    uncount_sleeper(doorbell_);
    counted_ = false;
  }

  Doorbell& doorbell_;
  bool yield_to_peers_;
  bool counted_ = false;
  std::uint32_t seen_ = 0;
  unsigned yields_ = 0;
  std::optional<std::chrono::steady_clock::time_point> spinning_since_;
  std::chrono::microseconds sleep_{0};
};

// True when `pid` has exited, or is a zombie that no one has reaped yet.
bool process_is_gone(pid_t pid);

// What a wait is for, to name it in errors: "all-reduce #12: timed out after
// 500 ms waiting for ranks 2, 5 to contribute (chunk 2 of 3)".
struct WaitLabel {
  std::string_view operation;  // "all-reduce", "all-gather", "shm setup"
  std::uint64_t index = 0;     // the collective's number; 0 when not a collective
  std::string_view step;       // what the peers have yet to do: "to contribute"
  std::size_t part = 0;        // which chunk, counted from 1; 0 when not chunked
  std::size_t parts = 0;
};

// "all-reduce #12", or just the operation when it has no number.
std::string describe_context(const WaitLabel& label);

// A wait as the timeline shows it (core/trace.h): from its first pause to
// its end, what it was for, the peers it waited for then, and those it was
// still waiting for at its last pause (the ones that held it up). Nothing
// when tracing is off, or when the wait never paused.
class TracedWait {
 public:
  TracedWait() = default;
  TracedWait(const TracedWait&) = delete;
  TracedWait& operator=(const TracedWait&) = delete;
  ~TracedWait();
  // Before a pause: what is awaited now.
  void pausing(const WaitLabel& label, const std::vector<int>& pending);

 private:
  std::int64_t start_ns_ = -1;
  WaitLabel label_;  // its views name literals, which outlive the wait
  std::vector<int> first_, last_;
};

// One wait for a set of peers, polled until each has arrived. Reusable: start()
// begins the next wait.
class PeerWait {
 public:
  explicit PeerWait(const ShmGroup& group) : group_(group) {}

  // Waits for every rank but this one.
  void start(const WaitLabel& label);
  void start(const WaitLabel& label, std::span<const int> peers);
  // Moves the deadline of the wait in progress to `deadline` if that is later.
  void extend_deadline(std::chrono::steady_clock::time_point deadline) {
    deadline_ = std::max(deadline_, deadline);
  }
  // The peers that have not arrived, as of the last poll.
  const std::vector<int>& pending() const { return pending_; }
  const WaitLabel& label() const { return label_; }

  // Drops the peers for which arrived(rank) holds; true once none is left.
  // Otherwise throws AbortedError (or the error a peer reported) once the
  // group is aborted, PeerLostError once a pending peer's process is gone,
  // TimeoutError at the deadline; an error found here is reported to the group.
  template <class Arrived>
  bool poll(Arrived&& arrived) {
    std::erase_if(pending_, [&](int rank) { return arrived(rank); });
    if (pending_.empty()) return true;
    check_abort();
    const Clock::time_point now = Clock::now();
    if (now >= next_liveness_check_ || now >= deadline_) {
      std::vector<int> gone = gone_peers();
      // A peer may do its part and exit, done, between the check above and
      // this one: it is lost only if it still has not arrived once gone.
      std::erase_if(gone, [&](int rank) { return arrived(rank); });
      if (!gone.empty()) fail_peers_lost(gone);
      next_liveness_check_ = now + kLivenessInterval;
    }
    if (now >= deadline_) {
      std::erase_if(pending_, [&](int rank) { return arrived(rank); });
      if (pending_.empty()) return true;
      fail_timeout();
    }
    return false;
  }

  template <class Arrived>
  void wait(Arrived&& arrived) {
    Backoff backoff(group_);
    TracedWait traced;
    while (true) {
      backoff.arm();
      if (poll(arrived)) return;
      traced.pausing(label_, pending_);
      backoff.pause();
    }
  }

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr std::chrono::milliseconds kLivenessInterval{25};

  void check_abort() const;
  // The pending peers whose processes are gone.
  std::vector<int> gone_peers() const;
  [[noreturn]] void fail_peers_lost(const std::vector<int>& lost) const;
  [[noreturn]] void fail_timeout() const;

  const ShmGroup& group_;
  WaitLabel label_;
  std::vector<int> pending_;
  Clock::time_point deadline_;
  Clock::time_point next_liveness_check_;
};

}  // namespace tpfuse::comm::shm
