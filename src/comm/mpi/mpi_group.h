// What the hierarchical all-reduce needs of the MPI transport: groups over
// some of the world's ranks, every rank's host, and sending one buffer from
// a rank to others (the result, inside a host).
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "tpfuse/comm/mpi.h"

namespace tpfuse::comm::mpi {

// The flat MPI communicator over `members` (world ranks, increasing), on a
// duplicate of MPI_COMM_WORLD of its own. Collective over the whole world:
// every rank calls it; those not among the members get null.
std::shared_ptr<Communicator> create_group(const MpiOptions& options,
                                           const std::vector<int>& members);

// Every rank's host ("hostname:network namespace"), by rank; `comm` is one
// that create_group made.
const std::vector<std::string>& host_keys(const Communicator& comm);

// Sends the `bytes` at `data` from rank `root` to the ranks `to` (ranks of
// `comm`, which create_group made); `root` and each of `to` call it, in the
// same order as their other calls on `comm`.
std::unique_ptr<Work> share_start(Communicator& comm, std::byte* data, std::size_t bytes, int root,
                                  const std::vector<int>& to);

// The hierarchical communicator over `flat` (every rank), when some hosts
// hold several ranks and there are several hosts; else `flat` itself.
// Collective over the world.
std::shared_ptr<Communicator> make_hierarchical(std::shared_ptr<Communicator> flat,
                                                const MpiOptions& options);

}  // namespace tpfuse::comm::mpi
