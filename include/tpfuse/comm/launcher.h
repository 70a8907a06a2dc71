// The local launcher: one process forks N ranks on this host, each with a
// shared-memory communicator already registered, and collects their exit
// status. The CLI and the tests use it; no mpirun is needed on one host.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tpfuse/comm/communicator.h"
#include "tpfuse/comm/shm.h"

namespace tpfuse::comm {

struct RankContext {
  int rank = 0;
  int size = 1;
  std::shared_ptr<Communicator> comm;  // registered under comm->name()
};

struct RankExit {
  int rank = 0;
  pid_t pid = 0;
  int exit_code = -1;  // valid when signal == 0
  int signal = 0;      // the signal that ended the rank, or 0
  std::string error;   // the message of the exception that ended it, if one did
  bool ok() const { return signal == 0 && exit_code == 0; }
};

struct LaunchResult {
  std::vector<RankExit> ranks;
  // Names of the shared-memory segments the job created (for leak checks).
  std::vector<std::string> segments;
  // Those of `segments` that still existed when every rank had ended, and
  // that the launcher unlinked itself (a rank 0 that died before every rank
  // attached leaves one). Empty when the job cleaned up after itself.
  std::vector<std::string> reclaimed_segments;
  bool ok() const;
  // "rank 1: exit 1 (its error); rank 2: killed by signal 9" for the ranks
  // that failed.
  std::string describe_failures() const;
};

struct LaunchOptions {
  int ranks = 1;
  // shm.secret is not used: launch_local creates the job's store, so it
  // generates the job's secret, seals the store with it and hands it to the
  // ranks (in ShmOptions and TPFUSE_SECRET).
  ShmOptions shm;
  // The parent kills ranks still running this long after the first rank
  // ended abnormally; default: shm.timeout plus 10 s. Stragglers end sooner:
  // once every other rank has ended and the failed ranks' errors name the
  // ranks left (or those are stopped), the parent kills them at once.
  std::chrono::milliseconds straggler_grace{0};
};

// Runs `body` in `options.ranks` forked processes. A rank's exit code is the
// body's return value (one outside 0..255 becomes 1); an exception escaping
// the body is printed (with its rank) and gives exit code 1. A rank ends with
// _exit: it runs neither the parent's atexit handlers nor static destructors.
// An exception escaping the body also aborts the rank's communicator, so that
// its peers' waits fail at once with its reason. No rank outlives the parent:
// if the parent dies (any signal, kill -9 included), each rank removes the
// job's segments and store and exits within a fraction of a second.
// The parent returns when every rank has ended. Fork from a single-threaded
// parent: a child starts with only the forking thread.
LaunchResult launch_local(const LaunchOptions& options,
                          const std::function<int(RankContext&)>& body);

}  // namespace tpfuse::comm
