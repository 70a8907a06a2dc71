// The error hierarchy of tpfuse. Every failure a caller can see is one of these,
// and its message names the argument (or rank) at fault, what was expected and
// what was found.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace tpfuse {

// Concatenates anything streamable into one string; used to build messages.
template <class... Parts>
std::string cat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

// Root of all tpfuse errors.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The caller passed something the contract does not allow.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// Ranks of one collective call passed arguments that must agree but do not.
class DisagreementError : public Error {
 public:
  using Error::Error;
};

// Communication failed. `ranks()` names the ranks at fault when they are known.
class CommError : public Error {
 public:
  CommError(const std::string& what, std::vector<int> ranks = {})
      : Error(what), ranks_(std::move(ranks)) {}
  const std::vector<int>& ranks() const { return ranks_; }

 private:
  std::vector<int> ranks_;
};

// A bounded wait reached its deadline; ranks() are those that did not arrive.
class TimeoutError : public CommError {
 public:
  using CommError::CommError;
};

// A peer process is gone (it exited or was killed); ranks() are the lost ones.
class PeerLostError : public CommError {
 public:
  using CommError::CommError;
};

// The communicator was aborted, by this process or by a peer (ranks()).
class AbortedError : public CommError {
 public:
  using CommError::CommError;
};

// An operating-system call failed (shared memory, files, processes).
class SystemError : public Error {
 public:
  using Error::Error;
};

// A thread called into a communicator that another thread of this process
// was using (see ExclusiveUse in comm/communicator.h).
class ConcurrentCallError : public Error {
 public:
  using Error::Error;
};

// A process that does not hold a job's secret tried to join its rendezvous
// (see JobSecret in comm/store.h).
class AccessDenied : public Error {
 public:
  using Error::Error;
};

// A broken invariant inside tpfuse: a bug, never the caller's fault.
class InternalError : public Error {
 public:
  using Error::Error;
};

// Throws InvalidArgument with the concatenated message unless `ok`.
template <class... Parts>
void require(bool ok, Parts&&... parts) {
  if (!ok) throw InvalidArgument(cat(std::forward<Parts>(parts)...));
}

// Formats a list of ranks as "1, 3, 4".
std::string format_ranks(const std::vector<int>& ranks);

// Throws SystemError naming the failed call and errno's text.
[[noreturn]] void throw_system_error(const std::string& what, int err);

}  // namespace tpfuse
