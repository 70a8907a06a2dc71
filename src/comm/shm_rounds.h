// The shm transport's collectives, one round of the ring at a time: each
// rank's contribution already lies in its slot of that round (the producer
// wrote it there), and the result goes to the rank's own output.
//
// The all-reduce has two algorithms:
// - one-shot: once every rank has contributed, each rank reads all p slots
//   and sums them itself. One synchronisation, p reads per element: the
//   cheapest for small rounds, where synchronisation dominates.
// - reduce-scatter + all-gather: the round is cut into p shares; rank j sums
//   share j of every slot, writes it to its output and back into its own slot
//   (only rank j reads share j of slot j, so nothing is overwritten that
//   another rank needs), and announces it; then every rank copies the other
//   shares from their owners' slots. Two synchronisations, about 2 reads and
//   2 writes per element whatever p: the cheaper for large rounds.
// Both sum through sum_in_rank_order, so their results are the same bytes.
// A checked round compares every rank's header first, once every rank has
// contributed, and on a mismatch reads no contribution and sums nothing.
//
// A reduce-scatter round is the first half of the second algorithm with the
// caller's shards: rank j sums its shard of every slot, through the same
// sum_in_rank_order (so the same bytes as the all-reduce), and is done. An
// all-gather round is the second half: each rank's slot holds its piece of
// its block, which every rank copies to its place as soon as it is there.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "comm/shm_group.h"
#include "comm/shm_reduce_kernels.h"
#include "comm/shm_wait.h"
#include "tpfuse/comm/communicator.h"
#include "tpfuse/core/dtype.h"

namespace tpfuse::comm::shm {

enum class RoundAlgorithm { one_shot, reduce_scatter };

enum class RoundKind { all_reduce, reduce_scatter, all_gather };

// The algorithm the group runs for a round of `bytes`: the same on every rank,
// since it depends only on the group's header and the round's size.
RoundAlgorithm choose_algorithm(const ShmGroup& group, std::size_t bytes);

// The largest round a group of `size` ranks made with `choice` runs one-shot:
// every size when it has one rank or was made one-shot, none when made
// reduce-scatter.
std::size_t max_one_shot_bytes(int size, AlgorithmChoice choice);

// Share j of a round of `count` elements: [share_begin(j), share_begin(j + 1)).
// Shares start on cache lines, so that vector loads stay aligned with the slots.
std::size_t share_begin(std::size_t count, DType dtype, int world_size, int share);

struct RoundSpec {
  RoundKind kind = RoundKind::all_reduce;
  std::uint64_t index = 0;  // the collective's number, for messages
  std::uint64_t round = 0;
  std::size_t part = 0;  // which chunk of the collective, counted from 1 (messages)
  std::size_t parts = 0;
  std::size_t count = 0;
  DType dtype = DType::f32;
  std::byte* output = nullptr;
  // Where this rank's own contribution is read from: its slot, or (when the
  // caller's input was not copied into the slot entirely) the input itself.
  const std::byte* mine = nullptr;
  OutputStore output_store = OutputStore::cached;
  // A checked round (its header is in the ring beside the slot): set, it
  // receives every rank's header when the digests differ, and nothing is summed.
  std::shared_ptr<std::vector<CallHeader>> mismatch;
  // A reduce-scatter round: elements [shard_begin, shard_end) of its `count`
  // are this rank's shard, whose sums go to `output`.
  std::size_t shard_begin = 0;
  std::size_t shard_end = 0;
  // An all-gather round: rank r's piece is pieces[r] bytes (in its slot; this
  // rank's own at `mine`), and lands at targets[r].
  std::vector<std::size_t> pieces;
  std::vector<std::byte*> targets;
};

// The operation's name in messages and traces ("all-reduce", ...).
std::string_view kind_name(RoundKind kind);

// One round in flight: a state machine that goes as far as the peers allow.
class Round {
 public:
  // Announces this rank's contribution: the slot must hold it already.
  Round(const ShmGroup& group, const RoundSpec& spec);
  Round(const Round&) = delete;
  Round& operator=(const Round&) = delete;

  // Goes as far as it can without waiting; true once the result is in place.
  // Throws what PeerWait throws (abort, lost peer, deadline).
  bool advance();
  bool done() const { return step_ == Step::done; }
  // An all-gather round: whether `rank`'s piece is in place.
  bool has_piece(int rank) const;
  std::uint64_t round() const { return spec_.round; }
  RoundAlgorithm algorithm() const { return algorithm_; }
  // The peers this round waits for now, and for what ("to contribute").
  const std::vector<int>& waiting_for() const { return wait_.pending(); }
  const WaitLabel& wait_label() const { return wait_.label(); }

 private:
  enum class Step { await_contributions, await_shares, done };

  void start_step(Step step);
  std::string_view step_name() const;
  bool headers_differ();
  // Whether every rank has put its contribution in its slot (polls the peers).
  bool all_contributed();
  bool try_sum_all();
  bool try_reduce_my_share();
  bool try_gather_shares();
  bool try_reduce_shard();
  bool try_gather_pieces();
  void finish_round();
  void trace_round() const;
  const std::byte* source(int rank) const;

  const ShmGroup& group_;
  RoundSpec spec_;
  RoundAlgorithm algorithm_;
  Step step_ = Step::await_contributions;
  PeerWait wait_;
  std::vector<const std::byte*> sources_;
  std::int64_t started_ns_ = -1;  // when traced (core/trace.h)
};

}  // namespace tpfuse::comm::shm
