// Backoff, process liveness and the failure paths of PeerWait.
#include "comm/shm_wait.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "comm/unique_fd.h"
#include "core/fault_hooks.h"
#include "core/trace.h"
#include "tpfuse/core/error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace tpfuse::comm::shm {

namespace {

// With a core per rank, spinning for a few tens of microseconds catches a
// peer that is a moment behind (summing its share, say) without a system
// call; then the wait sleeps on the doorbell, which ends as soon as a peer
// moves. No sched_yield: on a core shared with other work it hands that work
// a whole time slice (waits of 4 ms were measured), while a sleeper that the
// doorbell wakes gets its core back at once.
//
// When ranks outnumber cores, the peer waited for is likely runnable on this
// very core: spinning only delays it, and yields hand it the core at once
// (8 ranks on 2 cores: about 30 us per small all-reduce with a hundred
// yields, 150 to 650 us sleeping after the spin). Sleeps follow as before.
//
// The longest sleep bounds how late a wait notices a dead peer or its deadline.
constexpr std::chrono::microseconds kSpinTime{30};
constexpr std::chrono::microseconds kSpinTimeWhenSharingCores{2};
constexpr int kRelaxesPerSpin = 8;
constexpr unsigned kYieldsToPeers = 128;
constexpr std::chrono::microseconds kFirstSleep{50};
constexpr std::chrono::microseconds kLongestSleep{1000};

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace

void Backoff::pause() {
  test_hooks::fault_point(test_hooks::FaultPoint::wait);
  const auto now = std::chrono::steady_clock::now();
  if (!spinning_since_) spinning_since_ = now;
  if (now - *spinning_since_ < (yield_to_peers_ ? kSpinTimeWhenSharingCores : kSpinTime)) {
    for (int i = 0; i < kRelaxesPerSpin; ++i) cpu_relax();
    return;
  }
  if (yield_to_peers_ && yields_ < kYieldsToPeers) {
    ++yields_;
    ::sched_yield();
    return;
  }
  if (!counted_) {
    count_sleeper(doorbell_);
    counted_ = true;
    return;
  }
  sleep_ = sleep_.count() == 0 ? kFirstSleep : std::min(sleep_ * 2, kLongestSleep);
  sleep_on_doorbell(doorbell_, seen_, sleep_);
}

bool process_is_gone(pid_t pid) {
  if (::kill(pid, 0) == -1 && errno == ESRCH) return true;
  // A killed child stays a zombie until its parent reaps it; kill() still
  // succeeds on it, so look at its state: "pid (comm) S ...".
  const std::string path = cat("/proc/", pid, "/stat");
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return errno == ENOENT;
  char text[512];
  const ssize_t n = ::read(fd.get(), text, sizeof text - 1);
  if (n <= 0) return false;
  text[n] = '\0';
  const char* close_paren = std::strrchr(text, ')');
  if (close_paren == nullptr || close_paren[1] != ' ') return false;
  const char state = close_paren[2];
  return state == 'Z' || state == 'X';
}

namespace {

std::string rank_list(const std::vector<int>& ranks) {
  std::string json = "[";
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    if (i > 0) json += ',';
    json += std::to_string(ranks[i]);
  }
  return json + "]";
}

}  // namespace

void TracedWait::pausing(const WaitLabel& label, const std::vector<int>& pending) {
  if (!trace::enabled()) return;
  if (start_ns_ < 0) {
    start_ns_ = trace::now_ns();
    label_ = label;
    first_ = pending;
  }
  last_ = pending;
}

TracedWait::~TracedWait() {
  if (start_ns_ < 0) return;
  std::string what(label_.operation);
  if (label_.index != 0) what += " #" + std::to_string(label_.index);
  what += ": ";
  what += label_.step;
  trace::Args args;
  args.add("for", what)
      .add_raw("waiting_for", rank_list(first_))
      .add_raw("held_up_by", rank_list(last_));
  trace::complete("wait", "wait", trace::Track::compute, start_ns_, trace::now_ns(), args);
}

std::string describe_context(const WaitLabel& label) {
  if (label.index == 0) return std::string(label.operation);
  return cat(label.operation, " #", label.index);
}

void PeerWait::start(const WaitLabel& label) {
  label_ = label;
  pending_.clear();
  for (int r = 0; r < group_.size; ++r) {
    if (r != group_.rank) pending_.push_back(r);
  }
  deadline_ = Clock::now() + group_.timeout;
  next_liveness_check_ = Clock::now() + kLivenessInterval;
}

void PeerWait::start(const WaitLabel& label, std::span<const int> peers) {
  label_ = label;
  pending_.assign(peers.begin(), peers.end());
  deadline_ = Clock::now() + group_.timeout;
  next_liveness_check_ = Clock::now() + kLivenessInterval;
}

void PeerWait::check_abort() const {
  if (auto notice = read_abort(group_.segment)) {
    throw_abort(*notice, group_.rank, describe_context(label_));
  }
}

std::vector<int> PeerWait::gone_peers() const {
  std::vector<int> gone;
  for (int r : pending_) {
    const auto pid =
        static_cast<pid_t>(group_.segment.record(r).pid.load(std::memory_order_acquire));
    if (pid > 0 && process_is_gone(pid)) gone.push_back(r);  // pid 0: not attached yet
  }
  return gone;
}

void PeerWait::fail_peers_lost(const std::vector<int>& lost) const {
  std::string detail;
  for (int r : lost) {
    detail += cat(detail.empty() ? "" : ", ", "rank ", r, " (pid ",
                  group_.segment.record(r).pid.load(std::memory_order_acquire), ")");
  }
  detail += " died";
  publish_abort(group_.segment, group_.rank, AbortKind::peer_lost, lost, detail);
  throw PeerLostError(cat(describe_context(label_), ": ", detail), lost);
}

void PeerWait::fail_timeout() const {
  std::string detail = cat("timed out after ", group_.timeout.count(), " ms waiting for ",
                           describe_ranks(pending_), " ", label_.step);
  if (label_.parts > 1) detail += cat(" (chunk ", label_.part, " of ", label_.parts, ")");
  publish_abort(group_.segment, group_.rank, AbortKind::timed_out, pending_, detail);
  throw TimeoutError(cat(describe_context(label_), ": ", detail), pending_);
}

}  // namespace tpfuse::comm::shm
