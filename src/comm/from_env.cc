// The transport for a process started by a launcher: MPI under mpirun, shm
// under launch_local (or anything that sets TPFUSE_RANK and friends).
#include <cstdlib>

#include "tpfuse/comm/mpi.h"
#include "tpfuse/core/error.h"

namespace tpfuse::comm {

bool mpi_supported() { return TPFUSE_HAVE_MPI != 0; }

bool launched_by_mpi() { return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr; }

#if !TPFUSE_HAVE_MPI
std::shared_ptr<Communicator> create_mpi_communicator(const MpiOptions&) {
  throw InvalidArgument(
      "create_mpi_communicator: this build of tpfuse has no MPI transport (MPI was not found "
      "when it was configured: apt-get install libopenmpi-dev, then configure again)");
}
#endif

std::shared_ptr<Communicator> create_communicator_from_env() {
  if (launched_by_mpi()) return create_mpi_communicator();
  return create_shm_communicator_from_env();
}

}  // namespace tpfuse::comm
