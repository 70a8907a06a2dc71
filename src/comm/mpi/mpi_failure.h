// How an MPI communicator failed, and the notice that carries a failure
// to the peers, so that every rank fails alike.
#pragma once

#include <string>
#include <vector>

#include "tpfuse/core/error.h"

namespace tpfuse::comm::mpi {

// How a communicator failed, kept so that every later call throws the same.
struct Failure {
  enum class Kind { timeout, aborted, lost } kind = Kind::aborted;
  std::string message;
  std::vector<int> ranks;
  [[noreturn]] void raise() const {
    switch (kind) {
      case Kind::timeout:
        throw TimeoutError(message, ranks);
      case Kind::lost:
        throw PeerLostError(message, ranks);
      case Kind::aborted:
        break;
    }
    throw AbortedError(message, ranks);
  }
};

// The kind of notice a rank sends, three quarters into a long wait, to say
// that it is alive and which ranks it is waiting for.
constexpr int kStillWaiting = 3;

// A failure as it travels to the peers: "KIND RANK,RANK,...\nMESSAGE". The
// peers fail with the same kind and ranks (a rank that timed out waiting for
// rank 2 makes the others fail naming rank 2, not itself).
std::string encode_notice(const Failure& failure, int sender);
// The failure a notice from `sender` carries; a notice that cannot be read
// is an abort by its sender.
Failure decode_notice(const std::string& notice, int sender);

}  // namespace tpfuse::comm::mpi
