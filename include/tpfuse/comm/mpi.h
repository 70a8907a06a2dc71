// The MPI transport: ranks that are processes on several hosts, started by
// mpirun (Open MPI), and the choice of transport for a process started by a
// launcher.
//
// All-reduce: every rank owns a share of the elements (an even split); each
// rank sends every other rank that rank's share of its contribution, sums the
// p contributions to its own share in fp32 in rank order 0..p-1 with the same
// kernel as the shm transport, rounds once, and sends the result to every
// other rank. So the result is the bytes the shm transport gives, on every
// rank. Everything is point-to-point and non-blocking (Isend/Irecv), advanced
// by Work::test() and Work::wait(): MPI's own reductions fix no summation
// order, and its blocking calls have no deadline. Each wait gives up at
// timeout() and throws TimeoutError naming the ranks whose messages did not
// arrive; abort() sends every rank a message, and each of them throws
// AbortedError at its next wait.
//
// Where several hosts hold several ranks each, the communicator is
// hierarchical (TPFUSE_MPI_HIERARCHICAL=auto, the default): each host's
// ranks sum over the shm transport (in fp32, in rank order); with L ranks on
// every host, the j-th ranks of all hosts all-reduce the j-th of L slices of
// the host sums over MPI (in fp32, in the order of their ranks: the hosts'
// order where a host's ranks are consecutive) and round once; the ranks of a
// host then exchange their slices. The bytes are the same on every rank,
// but not the flat order's bytes; =off gives the flat all-reduce. A host is
// a hostname and network namespace.
//
// MPI is initialized on first use (with MPI_THREAD_MULTIPLE requested, as a
// Work may be advanced from a helper thread) and finalized at exit unless a
// failure left messages in flight; a program that initialized MPI itself
// must have asked for MPI_THREAD_SERIALIZED or more, and finalizes it itself.
#pragma once

#include <chrono>
#include <memory>

#include "tpfuse/comm/communicator.h"
#include "tpfuse/comm/shm.h"

namespace tpfuse::comm {

struct MpiOptions {
  // Deadline of every wait; default TPFUSE_TIMEOUT_MS (300000).
  std::chrono::milliseconds timeout = ShmOptions::default_timeout();
};

// Whether this build of tpfuse has the MPI transport.
bool mpi_supported();

// Whether this process was started by mpirun (OMPI_COMM_WORLD_SIZE is set).
bool launched_by_mpi();

// Collective over MPI_COMM_WORLD: every rank of the job calls it. Records the
// world rank as this process's rank for log lines. InvalidArgument if this
// build has no MPI.
std::shared_ptr<Communicator> create_mpi_communicator(const MpiOptions& options = {});

// The communicator for a process started by a launcher: MPI's world when
// started by mpirun, else the shm group of TPFUSE_RANK, TPFUSE_WORLD_SIZE and
// TPFUSE_STORE_DIR (create_shm_communicator_from_env). Not registered.
std::shared_ptr<Communicator> create_communicator_from_env();

}  // namespace tpfuse::comm
