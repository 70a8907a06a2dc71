// The cross-rank agreement on a call: every rank shares what it was asked to
// do (or that its own validation failed) and all ranks reach the same verdict,
// so a disagreement is an error everywhere and never a hang or a wrong
// answer.
//
// A rank that proposed the same call on the same communicator before, with
// the same facts of its own, may run it before hearing its peers (assuming the
// combination agreed then), if the run is one all-reduce that the transport
// completes even when the ranks' counts differ. Each proposal says whether its
// rank ran ahead, so every rank judges alike: afterwards, whether the run
// counts, or must be done again with the combination agreed now.
#pragma once

#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <vector>

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
  bool operator==(const RankFacts&) const = default;
};

// One rank's part: its validated call, or nullopt with `error` set when its
// own validation failed; its facts; and the combination it assumed when it
// runs the call before hearing its peers.
struct Proposal {
  std::optional<CallShape> shape;
  std::string error;
  RankFacts mine;
  std::optional<RankFacts> assumed;
};

std::string encode_proposal(const Proposal& proposal, std::size_t max_bytes);

// Every rank's proposals judged; the same on every rank.
struct Agreement {
  // Every rank's facts combined: the largest k, the fewest threads, and an
  // own core for the reduce only where every rank has one.
  RankFacts facts;
  // Set when a rank failed validation (that rank gets its InvalidArgument,
  // the others DisagreementError naming it) or when the ranks disagree on m,
  // b, s, n, mode, dtypes or comm_turn (DisagreementError naming the field,
  // the ranks and their values).
  std::exception_ptr failure;
  // Whether some rank ran ahead, and then the all-reduce it entered (the
  // lowest such rank's whole output), which every other rank must enter too.
  bool ran_ahead = false;
  std::size_t ahead_count = 0;
  DType ahead_dtype = DType::f16;
  // No failure, and every rank that ran ahead assumed `facts`: their run is
  // the call's (the others, planning with `facts`, run the same one tile).
  bool ran_ahead_rightly = false;
};

Agreement judge_proposals(const std::vector<std::string>& blobs, int rank,
                          const std::string& local_error);

// The combination agreed when this rank last proposed `shape` with `mine` on
// `comm`, if it did (a bounded memory, per process).
std::optional<RankFacts> remembered_agreement(const comm::Communicator& comm,
                                              const CallShape& shape, const RankFacts& mine);
void remember_agreement(const comm::Communicator& comm, const CallShape& shape,
                        const RankFacts& mine, const RankFacts& agreed);

}  // namespace tpfuse
