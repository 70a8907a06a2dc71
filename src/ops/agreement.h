// The cross-rank agreement check that runs before any data moves: every rank
// shares what it was asked to do (or that its own validation failed) and all
// ranks reach the same verdict, so a disagreement is an error everywhere and
// never a hang or a wrong answer.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "tpfuse/comm/communicator.h"
#include "tpfuse/ops/mode.h"

namespace tpfuse {

// What may differ between ranks' calls, combined rather than compared: a
// K-slice each, threads from each rank's own settings. The planner needs the
// combination (the slowest rank paces the pipeline), and carrying it here
// spares the call a second exchange.
struct RankFacts {
  std::int64_t k = 0;
  int threads = 1;
  bool reduce_has_own_core = false;
};

// `shape` is this rank's validated call, or nullopt with `local_error` set
// when this rank's own validation failed. Throws on every rank when any rank
// failed validation (the failing rank rethrows its own InvalidArgument, the
// others get DisagreementError naming it) or when the ranks disagree on m, b,
// s, n, mode, dtypes or comm_turn (DisagreementError naming the field, the
// ranks and their values). Returns every rank's `mine` combined: the largest
// k, the fewest threads, and an own core for the reduce only where every rank
// has one.
RankFacts check_agreement(comm::Communicator& comm, const std::optional<CallShape>& shape,
                          const std::string& local_error, const RankFacts& mine);

}  // namespace tpfuse
