// The requests of one step of an MPI collective, each with the peer it is
// for, so that a wait that times out can name the ranks it did not hear
// from, and MPI error codes turned into tpfuse errors.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstddef>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "tpfuse/core/error.h"

namespace tpfuse::comm::mpi {

// A request that completed with an error (a peer's connection failed).
class RequestError : public CommError {
 public:
  RequestError(const std::string& what, int peer) : CommError(what, {peer}), peer_(peer) {}
  int peer() const { return peer_; }

 private:
  int peer_;
};

// Initialises MPI, once per process, unless the application did: at
// MPI_THREAD_MULTIPLE where it can, and refuses less than SERIALIZED (a
// helper thread may advance collectives). MPI initialised here is finalized
// at exit, unless skip_finalize_at_exit() was called.
void init_mpi();
// For a failure that left messages which never complete: MPI_Finalize would
// wait for them (or for peers that are gone) forever.
void skip_finalize_at_exit();

// Throws CommError with MPI's text for `code` unless it is MPI_SUCCESS.
void check_mpi(int code, std::string_view call);

// Polls a collective's request until it completes or `timeout` passes
// (TimeoutError: a collective cannot say which rank is missing).
void wait_collective(MPI_Request& request, std::chrono::milliseconds timeout,
                     std::string_view what);

class Requests {
 public:
  Requests() = default;
  Requests(const Requests&) = delete;
  Requests& operator=(const Requests&) = delete;
  // Requests still pending (after a failure) are released to MPI.
  ~Requests();

  void irecv(std::byte* data, std::size_t bytes, int peer, int tag, MPI_Comm comm);
  void isend(const std::byte* data, std::size_t bytes, int peer, int tag, MPI_Comm comm);
  // The same as messages of at most 32 KiB each, in order (MPI matches
  // the messages of one peer and tag in the order they were sent), for bulk
  // data. A piece goes by Open MPI's eager protocol, which sends it without
  // waiting for the receiver. A larger message first asks the receiver, and
  // over TCP the answer queues behind the bulk data the receiver is sending
  // on the same connection: when ranks start apart, the two directions then
  // take turns. Both sides must cut the same byte count.
  void irecv_pieces(std::byte* data, std::size_t bytes, int peer, int tag, MPI_Comm comm);
  void isend_pieces(const std::byte* data, std::size_t bytes, int peer, int tag, MPI_Comm comm);
  // Tests the pending requests in order and forgets those that completed,
  // up to the first that has not; true when none is left. A request that
  // failed throws RequestError naming its peer.
  bool test_all();
  // Cancels the pending receives (their buffers may then be freed).
  void cancel_receives();
  // The peers of the pending receives, or of the pending sends when no
  // receive is pending; sorted.
  std::vector<int> pending_peers() const;
  // Whether a receive from `peer` is pending.
  bool receiving_from(int peer) const;
  // Bytes the completed receive from `peer` brought.
  std::size_t received_bytes(int peer) const;

 private:
  struct Pending {
    MPI_Request request = MPI_REQUEST_NULL;
    int peer = 0;
    bool receive = false;
  };
  std::vector<Pending> pending_;
  std::map<int, std::size_t> received_;
};

}  // namespace tpfuse::comm::mpi
