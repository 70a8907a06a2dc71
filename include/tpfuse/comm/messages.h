// A transport over an engine's point-to-point messages: a torch process
// group's (gloo, driven through c10d's asynchronous send and recv), or any
// engine that can send a buffer to one peer and receive one from it.
//
// All-reduce: as the MPI transport's. Every rank owns a share of the
// elements (an even split); each rank sends every other rank that rank's
// share of its contribution, sums the p contributions to its own share in
// fp32 in rank order 0..p-1 with the shm transport's kernel, rounds once,
// and sends the result to every other rank. So the result is the bytes the
// shm transport gives, on every rank. Each collective's messages carry a
// tag of their own, so no engine need keep messages in order.
//
// A wait gives up once nothing of its collective has arrived for timeout()
// and throws TimeoutError naming the ranks whose messages did not arrive; a message the engine failed (its peer is
// gone) gives PeerLostError naming that peer; abort() sends every peer a
// notice, and each of them throws AbortedError at its next wait.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tpfuse/comm/communicator.h"

namespace tpfuse::comm {

class MessageEngine {
 public:
  // One message in flight.
  class Transfer {
   public:
    virtual ~Transfer() = default;
    // True once complete; throws (any std::exception) where the engine failed it.
    virtual bool test() = 0;
    // Gives up a transfer that has not completed (a receive no peer will match).
    virtual void cancel() = 0;
  };

  virtual ~MessageEngine() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Sends `bytes` bytes at `data` to `peer` under `tag` (>= 0); `data` stays
  // valid until the transfer completes.
  virtual std::unique_ptr<Transfer> send(int peer, int tag, const std::byte* data,
                                         std::size_t bytes) = 0;
  // Receives the message `peer` sends under `tag`, exactly `bytes` bytes, into `data`.
  virtual std::unique_ptr<Transfer> receive(int peer, int tag, std::byte* data,
                                            std::size_t bytes) = 0;

  // An engine that can tell when its transfers complete (the process
  // groups' complete on threads of their own) counts the completions of all
  // its transfers, and await_completion() sleeps until the count differs
  // from `seen` or `limit` has passed: a wait for a collective then wakes as
  // its message completes, not at its next poll. By default an engine cannot
  // tell (MPI moves messages only inside its calls) and is polled:
  // completions() is empty and await_completion() is not called.
  virtual std::optional<std::uint64_t> completions() { return std::nullopt; }
  virtual void await_completion(std::uint64_t /*seen*/, std::chrono::microseconds /*limit*/) {}
};

struct MessageOptions {
  std::string name;       // the group's name (hcom), the same on every rank
  std::string transport;  // what transport() says, e.g. "gloo"
  std::chrono::milliseconds timeout{300000};
  int ranks_on_host = 1;
  int hosts = 1;
  // The rank the errors name for each of the engine's ranks: a group's
  // ranks in a larger job (a hierarchical communicator's rail); empty: the
  // engine's own.
  std::vector<int> job_ranks;
};

// Not collective: the engine's ranks are the communicator's.
std::shared_ptr<Communicator> create_message_communicator(std::shared_ptr<MessageEngine> engine,
                                                          const MessageOptions& options);

}  // namespace tpfuse::comm
