// The shared-memory transport: ranks that are processes on one host.
//
// Rank 0 creates one POSIX shared-memory segment (mode 0600, a random
// 128-bit name, O_EXCL) and publishes its name in the rendezvous store; the
// others map it. The segment is unlinked as soon as every rank has attached,
// so a crash at any later point leaves nothing in /dev/shm; the name is in
// the store from before the segment exists, so that launch_local can unlink
// what a crash during setup leaves. A rank that died during setup is
// reported as lost at once; one that does not come is named by rank 0 at its
// deadline (the others wait for rank 0's verdict, up to a quarter of the
// deadline, at most a second, after it). Setup is
// collective: it returns on a rank once every rank has attached and the name
// is gone. Several groups may share one store when each uses a PrefixStore.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "tpfuse/comm/communicator.h"
#include "tpfuse/comm/store.h"

namespace tpfuse::comm {

// How the shm transport all-reduces each round (at most a slot) of its ring.
enum class ShmAlgorithm {
  automatic,       // one-shot for small rounds, reduce-scatter + all-gather for large ones
  one_shot,        // every rank reads every rank's contribution
  reduce_scatter,  // reduce-scatter + all-gather
};

struct ShmOptions {
  // Deadline of every wait; default TPFUSE_TIMEOUT_MS (300000).
  std::chrono::milliseconds timeout = default_timeout();
  // Bytes of each of a rank's slots (it has a few, so that several
  // all-reduces can be in flight); larger all-reduces go in chunks. A
  // multiple of 64, at least 64 and at most 1 GiB; rank 0's value counts.
  // Default TPFUSE_SHM_SLOT_BYTES (4 MiB).
  std::size_t slot_bytes = default_slot_bytes();
  // Rank 0's value counts. Default TPFUSE_SHM_ALGORITHM: auto, one_shot or
  // reduce_scatter. Results are the same bytes whichever runs.
  ShmAlgorithm algorithm = default_algorithm();
  // The job's secret, 32 hex digits (see JobSecret in store.h), or empty for
  // none. Default TPFUSE_SECRET, read afresh each time (launch_local sets it
  // in the ranks it forks).
  std::string secret = default_secret();

  static std::chrono::milliseconds default_timeout();
  static std::size_t default_slot_bytes();
  static ShmAlgorithm default_algorithm();
  static std::string default_secret();
};

// Collective over the `size` ranks that share `store`: every rank calls it.
// Also records `rank` as this process's rank for log lines. A store sealed
// with a job secret refuses a process that does not hold it (AccessDenied,
// before any key of the job is read or written); see check_job_secret.
std::shared_ptr<Communicator> create_shm_communicator(Store& store, int rank, int size,
                                                      const ShmOptions& options = {});

// The same, for processes started by something other than launch_local: the
// rank, world size and store directory (a FileStore) come from TPFUSE_RANK,
// TPFUSE_WORLD_SIZE and TPFUSE_STORE_DIR; a missing or malformed one is an
// InvalidArgument naming it. launch_local sets them in every rank, and
// TPFUSE_SECRET. Whoever starts the ranks otherwise creates the directory
// (mode 0700) and sets the same TPFUSE_SECRET in each (`openssl rand -hex
// 16`); rank 0 then seals the store, and a process without the secret that
// comes after is refused. One that comes before is not refused, but cannot
// join either (the job's keys are under the secret's prefix); only a process
// with a secret of its own that claims rank 0 before the real rank 0 could
// seal the store first and so lock the job out. Where that can happen, seal
// the store (seal_store) before starting the ranks.
std::shared_ptr<Communicator> create_shm_communicator_from_env(const ShmOptions& options = {});

// The bytes one rank reads and writes in memory for an all-reduce of `bytes`
// from its input to a separate output, in a group of `size` ranks made with
// `options` (slot size and algorithm): what bounds the all-reduce when memory
// bandwidth does. Per round of c bytes (a slot's worth at most):
//   one rank:       reads c, writes c (the sum is a copy);
//   one-shot:       copy in (c, c), read all p slots and write the output
//                   (p c, c): reads (p + 1) c, writes 2 c;
//   reduce-scatter: copy in all but the own share ((p-1)/p c each way), sum
//                   the own share of p contributions (c) and write it to the
//                   output and the slot (2 c/p), copy the other shares from
//                   their owners (p-1)/p c each way: reads (3 - 2/p) c,
//                   writes 2 c.
struct MemoryTraffic {
  std::uint64_t read = 0;
  std::uint64_t written = 0;
};
MemoryTraffic shm_all_reduce_traffic(int size, std::size_t bytes, const ShmOptions& options = {});

}  // namespace tpfuse::comm
