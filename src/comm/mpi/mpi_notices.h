// How an MPI communicator's failure travels: kept by the communicator so that
// every later call throws the same, and sent to the peers as a notice so
// that they fail now, with the same kind and ranks, rather than at their
// deadline.
#pragma once

#include <string>
#include <vector>

#include "tpfuse/core/error.h"

namespace tpfuse::comm::mpi {

// How a communicator failed.
struct Failure {
  enum class Kind { timeout, aborted, lost } kind = Kind::aborted;
  std::string message;
  std::vector<int> ranks;
  [[noreturn]] void raise() const;
};

// The kind of notice a rank sends, three quarters into a long wait, to say
// that it is alive and which ranks it is waiting for.
constexpr int kStillWaiting = 3;

// A failure as it travels to the peers: "KIND RANK,RANK,...\nMESSAGE". The
// peers fail with the same kind and ranks (a rank that timed out waiting for
// rank 2 makes the others fail naming rank 2, not itself).
std::string encode_notice(const Failure& failure, int sender);
// A notice from `sender` read back; one that does not parse is an abort by it.
Failure decode_notice(const std::string& notice, int sender);

}  // namespace tpfuse::comm::mpi
