#include "comm/mpi/mpi_notices.h"

#include <sstream>

namespace tpfuse::comm::mpi {

void Failure::raise() const {
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

std::string encode_notice(const Failure& failure, int sender) {
  std::string ranks;
  for (int r : failure.ranks) ranks += cat(ranks.empty() ? "" : ",", r);
  const std::string message = failure.kind == Failure::Kind::aborted
                                  ? failure.message
                                  : cat("rank ", sender, " failed: ", failure.message);
  return cat(static_cast<int>(failure.kind), " ", ranks, "\n", message);
}

Failure decode_notice(const std::string& notice, int sender) {
  Failure failure{Failure::Kind::aborted, cat("aborted by rank ", sender), {sender}};
  const auto newline = notice.find('\n');
  int kind = -1;
  std::istringstream header(notice.substr(0, newline));
  if (newline == std::string::npos || !(header >> kind) || kind < 0 || kind > kStillWaiting) {
    return failure;
  }
  failure.kind = static_cast<Failure::Kind>(kind);
  failure.message = notice.substr(newline + 1);
  failure.ranks.clear();
  std::string ranks;
  header >> ranks;
  std::istringstream list(ranks);
  for (std::string rank; std::getline(list, rank, ',');) {
    std::istringstream number(rank);
    int value = 0;
    if (number >> value) failure.ranks.push_back(value);
  }
  return failure;
}

}  // namespace tpfuse::comm::mpi
