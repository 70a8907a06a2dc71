// The per-round state machines: the all-reduce's one-shot and reduce-scatter
// + all-gather, the reduce-scatter's and the all-gather's.
#include "comm/shm_rounds.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <limits>

#include "core/fault_hooks.h"
#include "core/trace.h"
#include "tpfuse/core/error.h"

namespace tpfuse::comm::shm {

namespace {

// Rounds up to kOneShotMaxBytesForTwo / (p - 1)^2 go one-shot when the group
// lets the transport choose. Below it, the second synchronisation of
// reduce-scatter costs more than what one-shot's extra traffic costs: every
// rank copies all of its input into its slot, reads all p slots and sums
// the whole round, where reduce-scatter copies, reads and sums a p-th of it.
// Measured (tpfuse bench allreduce, f32, in place, one algorithm forced),
// the two took as long at about 2 MiB for 2 ranks, 128 KiB for 4 and 32 KiB
// for 8 (on 2 cores); at 1 MiB and 2 ranks one-shot took 159-189 us,
// reduce-scatter 226-245.
constexpr std::size_t kOneShotMaxBytesForTwo = std::size_t{1} << 20;

}  // namespace

std::size_t max_one_shot_bytes(int size, AlgorithmChoice choice) {
  if (size == 1) return std::numeric_limits<std::size_t>::max();
  switch (choice) {
    case AlgorithmChoice::one_shot:
      return std::numeric_limits<std::size_t>::max();
    case AlgorithmChoice::reduce_scatter:
      return 0;
    case AlgorithmChoice::automatic:
      break;
  }
  const auto others = static_cast<std::size_t>(size - 1);
  return kOneShotMaxBytesForTwo / (others * others);
}

RoundAlgorithm choose_algorithm(const ShmGroup& group, std::size_t bytes) {
  return bytes <= max_one_shot_bytes(group.size, group.segment.algorithm())
             ? RoundAlgorithm::one_shot
             : RoundAlgorithm::reduce_scatter;
}

std::size_t share_begin(std::size_t count, DType dtype, int world_size, int share) {
  if (share >= world_size) return count;
  const std::size_t per_line = kCacheLine / dtype_size(dtype);
  const std::size_t even =
      count / static_cast<std::size_t>(world_size) * static_cast<std::size_t>(share) +
      count % static_cast<std::size_t>(world_size) * static_cast<std::size_t>(share) /
          static_cast<std::size_t>(world_size);
  return even / per_line * per_line;
}

std::string_view kind_name(RoundKind kind) {
  switch (kind) {
    case RoundKind::reduce_scatter:
      return "reduce-scatter";
    case RoundKind::all_gather:
      return "all-gather";
    case RoundKind::all_reduce:
      break;
  }
  return "all-reduce";
}

Round::Round(const ShmGroup& group, const RoundSpec& spec)
    : group_(group),
      spec_(spec),
      algorithm_(choose_algorithm(group, spec.count * dtype_size(spec.dtype))),
      wait_(group),
      sources_(static_cast<std::size_t>(group.size)) {
  if (trace::enabled()) started_ns_ = trace::now_ns();
  for (int r = 0; r < group_.size; ++r) sources_[static_cast<std::size_t>(r)] = source(r);
  if (spec_.kind == RoundKind::all_gather) {  // my own piece needs no peer
    const auto me = static_cast<std::size_t>(group_.rank);
    if (spec_.targets[me] != spec_.mine && spec_.pieces[me] > 0) {
      std::memcpy(spec_.targets[me], spec_.mine, spec_.pieces[me]);
    }
  }
  group_.segment.ring()
      .flags(group_.rank, spec_.round)
      .contributed.store(spec_.round, std::memory_order_release);
  ring_doorbell(group_.segment.doorbell());
  start_step(Step::await_contributions);
}

const std::byte* Round::source(int rank) const {
  if (rank == group_.rank && spec_.mine != nullptr) return spec_.mine;
  return group_.segment.ring().slot(rank, spec_.round);
}

std::string_view Round::step_name() const {
  return step_ == Step::await_shares ? "to reduce their share" : "to contribute";
}

bool Round::has_piece(int rank) const {
  if (done() || rank == group_.rank) return true;
  const auto& pending = wait_.pending();
  return std::find(pending.begin(), pending.end(), rank) == pending.end();
}

void Round::start_step(Step step) {
  step_ = step;
  if (step == Step::done) return;
  wait_.start({kind_name(spec_.kind), spec_.index, step_name(), spec_.part, spec_.parts});
}

bool Round::advance() {
  switch (step_) {
    case Step::await_contributions:
      if (spec_.kind == RoundKind::reduce_scatter) return try_reduce_shard();
      if (spec_.kind == RoundKind::all_gather) return try_gather_pieces();
      if (algorithm_ == RoundAlgorithm::one_shot) return try_sum_all();
      if (!try_reduce_my_share()) return false;
      if (step_ == Step::done) return true;  // a checked round the headers stopped
      [[fallthrough]];
    case Step::await_shares:
      return try_gather_shares();
    case Step::done:
      return true;
  }
  return false;
}

// A checked round whose ranks' digests differ: every header copied out, and
// the round done without reading a contribution (their counts may differ).
bool Round::headers_differ() {
  if (!spec_.mismatch) return false;
  const Ring& ring = group_.segment.ring();
  const std::uint64_t mine =
      ring.flags(group_.rank, spec_.round).digest.load(std::memory_order_relaxed);
  bool same = true;
  for (int r = 0; r < group_.size; ++r) {
    same = same && ring.flags(r, spec_.round).digest.load(std::memory_order_relaxed) == mine;
  }
  if (same) return false;
  spec_.mismatch->resize(static_cast<std::size_t>(group_.size));
  for (int r = 0; r < group_.size; ++r) {
    std::memcpy(&(*spec_.mismatch)[static_cast<std::size_t>(r)], ring.header(r, spec_.round),
                sizeof(CallHeader));
  }
  finish_round();
  return true;
}

bool Round::all_contributed() {
  const Ring& ring = group_.segment.ring();
  const std::uint64_t round = spec_.round;
  return wait_.poll([&](int r) {
    return ring.flags(r, round).contributed.load(std::memory_order_acquire) >= round;
  });
}

bool Round::try_sum_all() {
  if (!all_contributed()) return false;
  if (headers_differ()) return true;
  test_hooks::fault_point(test_hooks::FaultPoint::reduce);
  sum_in_rank_order(spec_.dtype, sources_, spec_.count, spec_.output, nullptr, spec_.output_store);
  finish_round();
  return true;
}

bool Round::try_reduce_my_share() {
  if (!all_contributed()) return false;
  if (headers_differ()) return true;
  test_hooks::fault_point(test_hooks::FaultPoint::reduce);
  const std::size_t element = dtype_size(spec_.dtype);
  const std::size_t begin = share_begin(spec_.count, spec_.dtype, group_.size, group_.rank);
  const std::size_t end = share_begin(spec_.count, spec_.dtype, group_.size, group_.rank + 1);
  std::vector<const std::byte*> share(sources_.size());
  for (std::size_t r = 0; r < share.size(); ++r) share[r] = sources_[r] + begin * element;
  // My share of my slot is read by no one else: the sum may overwrite it.
  const Ring& ring = group_.segment.ring();
  const std::uint64_t round = spec_.round;
  sum_in_rank_order(spec_.dtype, share, end - begin, spec_.output + begin * element,
                    ring.slot(group_.rank, round) + begin * element, spec_.output_store);
  ring.flags(group_.rank, round).reduced.store(round, std::memory_order_release);
  ring_doorbell(group_.segment.doorbell());
  start_step(Step::await_shares);
  return true;
}

// Copies each peer's share as soon as that peer announces it.
bool Round::try_gather_shares() {
  const Ring& ring = group_.segment.ring();
  const std::uint64_t round = spec_.round;
  const std::size_t element = dtype_size(spec_.dtype);
  const bool all_in = wait_.poll([&](int r) {
    if (ring.flags(r, round).reduced.load(std::memory_order_acquire) < round) return false;
    const std::size_t begin = share_begin(spec_.count, spec_.dtype, group_.size, r);
    const std::size_t end = share_begin(spec_.count, spec_.dtype, group_.size, r + 1);
    copy_to_output(spec_.output + begin * element, ring.slot(r, round) + begin * element,
                   (end - begin) * element, spec_.output_store);
    return true;
  });
  if (!all_in) return false;
  finish_round();
  return true;
}

bool Round::try_reduce_shard() {
  if (!all_contributed()) return false;
  test_hooks::fault_point(test_hooks::FaultPoint::reduce);
  const std::size_t element = dtype_size(spec_.dtype);
  std::vector<const std::byte*> shard(sources_.size());
  for (std::size_t r = 0; r < shard.size(); ++r) {
    shard[r] = sources_[r] + spec_.shard_begin * element;
  }
  if (spec_.shard_end > spec_.shard_begin) {
    sum_in_rank_order(spec_.dtype, shard, spec_.shard_end - spec_.shard_begin, spec_.output,
                      nullptr, spec_.output_store);
  }
  finish_round();
  return true;
}

// Copies each peer's piece as soon as that peer has put it in its slot.
bool Round::try_gather_pieces() {
  const Ring& ring = group_.segment.ring();
  const std::uint64_t round = spec_.round;
  const bool all_in = wait_.poll([&](int r) {
    if (ring.flags(r, round).contributed.load(std::memory_order_acquire) < round) return false;
    const auto peer = static_cast<std::size_t>(r);
    copy_to_output(spec_.targets[peer], ring.slot(r, round), spec_.pieces[peer],
                   spec_.output_store);
    return true;
  });
  if (!all_in) return false;
  finish_round();
  return true;
}

void Round::finish_round() {
  group_.segment.ring()
      .flags(group_.rank, spec_.round)
      .consumed.store(spec_.round, std::memory_order_release);
  ring_doorbell(group_.segment.doorbell());
  start_step(Step::done);
  if (started_ns_ >= 0) trace_round();
}

void Round::trace_round() const {
  trace::Args args;
  args.add("collective", spec_.index).add("round", spec_.round);
  if (spec_.parts > 1) args.add("part", spec_.part).add("parts", spec_.parts);
  if (spec_.kind == RoundKind::all_reduce) {
    args.add("algorithm",
             algorithm_ == RoundAlgorithm::one_shot ? "one-shot" : "reduce-scatter + all-gather");
  }
  if (spec_.kind == RoundKind::all_gather) {
    std::size_t bytes = 0;
    for (std::size_t piece : spec_.pieces) bytes += piece;
    args.add("bytes", bytes);
  } else {
    args.add("bytes", spec_.count * dtype_size(spec_.dtype)).add("dtype", dtype_name(spec_.dtype));
  }
  if (spec_.mismatch)
    args.add("checked", spec_.mismatch->empty() ? "digests matched" : "digests differed");
  trace::complete(spec_.mismatch ? "all-reduce (checked)" : kind_name(spec_.kind), "comm",
                  trace::Track::comm, started_ns_, trace::now_ns(), args);
}

}  // namespace tpfuse::comm::shm
