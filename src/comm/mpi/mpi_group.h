// The MPI transport's groups: a flat communicator over some of the world's
// ranks, and the hierarchical communicator (tpfuse/comm/hierarchical.h) made
// of such groups.
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

// The hierarchical communicator over `flat` (every rank), when some hosts
// hold several ranks and there are several hosts; else `flat` itself.
// Collective over the world.
std::shared_ptr<Communicator> make_hierarchical(std::shared_ptr<Communicator> flat,
                                                const MpiOptions& options);

}  // namespace tpfuse::comm::mpi
