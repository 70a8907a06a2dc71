// How a thread that polls for its peers paces itself (the MPI transport,
// the hierarchical all-reduce, the process-group transport).
#pragma once

#include <chrono>

namespace tpfuse::comm {

// The pace of one wait's polls. MPI's TCP transport moves data only inside
// MPI calls, so a wait polls rather than sleeping until a peer moves. For
// its first 200 us after it starts or last saw progress it polls without
// pause, catching a peer microseconds away at once; then it sleeps between
// polls for a quarter of the time waited, from 50 us up to 400 us. A long
// wait so notices a peer at most a quarter (and 400 us) late, and costs the
// cores it shares few wake-ups. 4 emulated hosts on 2 cores, whose network
// runs on those cores too, kept them 53-64% busy during an all-reduce alone
// polling every 50 us, 46% sleeping 1 ms; paced, fused calls of 256x4096x1024
// took 41.2-41.5 ms against 43.0-43.5 ms polling every 50 us (interleaved).
class PollPacer {
 public:
  // The sleep before the next poll (zero: poll again at once), given whether
  // the last poll moved anything.
  std::chrono::microseconds next(bool progressed);

 private:
  std::chrono::steady_clock::time_point since_ = std::chrono::steady_clock::now();
};

}  // namespace tpfuse::comm
