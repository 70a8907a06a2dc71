// The cross-rank agreement on a call, carried by the call's first collective
// round rather than by a round of its own.
//
// Every rank's first round of a call is a checked all-reduce
// (Communicator::checked_all_reduce_start) whose header holds a digest of
// what the rank is about to run: the fields every rank must pass alike, the
// facts combined across ranks that it plans with, and the plan. A rank can
// fill that in alone where the communicator remembers the combination
// agreed for the same call before (AgreementCache); where the call fits one
// tile, the round also carries the tile's data. When every digest matches,
// that round is the call (one round: a decode step's small calls pay no
// agreement of their own). Otherwise no rank sums anything, and every rank
// gets every rank's header, whose payload is its proposal (its validated
// call or its error, and its own facts): all of them judge the same
// proposals alike, so a rank's error or a disagreement fails the call on
// every rank, never a hang or a wrong answer, and stale or missing facts
// are combined there and then, and the call runs with them.
//
// A rank that has nothing to plan with (the call's first time, an error of
// its own) makes a digest no other rank can match (it names the rank), so
// the round always ends in the judging.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "tpfuse/comm/communicator.h"
#include "tpfuse/ops/mode.h"

namespace tpfuse {

// What may differ between ranks' calls, combined rather than compared: a
// K-slice each (or, gathering, a column shard each), threads from each
// rank's own settings. The planner needs the
// combination (the slowest rank paces the pipeline).
struct RankFacts {
  std::int64_t k = 0;
  std::int64_t n = 0;  // differs between ranks for all_gather_base_mm only
  int threads = 1;
  bool reduce_has_own_core = false;
  bool operator==(const RankFacts&) const = default;
};

// One rank's part: its validated call, or nullopt with `error` set when its
// own validation failed; and its facts.
struct Proposal {
  std::optional<CallShape> shape;
  std::string error;
  RankFacts mine;
};

// The header of the call's first round. `planned`: the combined facts and
// the tiles this rank runs with (an agreement remembered); nullopt where it
// has none, or its validation failed.
struct PlannedRun {
  RankFacts facts;
  std::vector<std::int64_t> tile_rows;
  std::int64_t poll_rows = 0;
};
comm::CallHeader make_header(const Proposal& proposal, const std::optional<PlannedRun>& planned,
                             int rank);

// The proposals in the headers judged; the same on every rank.
struct Agreement {
  // Every rank's facts combined: the largest k and n, the fewest threads, and an
  // own core for the reduce only where every rank has one.
  RankFacts facts;
  // Set when a rank failed validation (that rank gets its InvalidArgument,
  // the others DisagreementError naming it) or when the ranks disagree on the
  // operator, m, b, s, n (k when gathering), mode, dtypes, comm_turn, epsilon or, gathering,
  // whether x1_scale is given (DisagreementError naming the field, the ranks and their values).
  std::exception_ptr failure;
};

// `operation` names the call in the failures ("mm_all_reduce_base").
Agreement judge_headers(const std::vector<comm::CallHeader>& headers, int rank,
                        const std::string& local_error,
                        std::string_view operation = "mm_all_reduce_base");

// The combinations agreed on a communicator (its attachment: the same on
// every rank, since every rank makes the same calls), by the call's agreed
// fields and this rank's own facts.
class AgreementCache {
 public:
  static constexpr std::size_t kFields = 12;  // the agreed fields (agreement.cc)

  std::optional<RankFacts> find(const CallShape& shape, const RankFacts& mine);
  void remember(const CallShape& shape, const RankFacts& mine, const RankFacts& agreed);

 private:
  using Key = std::tuple<std::array<std::int64_t, kFields>, std::int64_t, std::int64_t, int, bool>;
  std::mutex mutex_;
  std::map<Key, RankFacts> agreed_;
};

}  // namespace tpfuse
