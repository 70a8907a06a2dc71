// This rank's view of a shm group: the mapped segment, who we are, the
// deadline of every wait, and the counters that keep every rank's rounds in
// step. The communicator and the Work objects it hands out share it, since a
// Work may outlive the communicator that started it.
#pragma once

#include <chrono>
#include <cstdint>
#include <thread>
#include <utility>

#include "comm/shm_segment.h"

namespace tpfuse::comm::shm {

struct ShmGroup {
  ShmGroup(Segment mapped, int my_rank, std::chrono::milliseconds wait_timeout)
      : segment(std::move(mapped)),
        rank(my_rank),
        size(static_cast<int>(segment.header().world_size)),
        timeout(wait_timeout),
        ranks_share_cores(size > static_cast<int>(std::thread::hardware_concurrency())) {}

  Segment segment;
  int rank;
  int size;
  std::chrono::milliseconds timeout;
  // More ranks than this host has cores: the ranks take turns on them, and a
  // waiting rank should hand its core to a peer (see Backoff).
  bool ranks_share_cores;
  // Every rank issues the same collectives in the same order, so these
  // counters agree across ranks without being exchanged.
  std::uint64_t collectives = 0;      // collectives started, numbering them in messages
  std::uint64_t gather_sequence = 0;  // last round used on the gather channel
};

}  // namespace tpfuse::comm::shm
