// Points inside a call where the fault-injection tests (tests/faults_test.cc,
// tests/faults_family_test.cc) kill, freeze or fail a rank, to prove that its
// peers fail cleanly wherever it stops. Unset in normal use, when a point
// costs one relaxed load and a branch; the points sit where a rank changes
// what it is doing (a GEMM block, a pause in a wait, a round's sum or piece,
// a setup step), never in an inner loop.
#pragma once

#include <atomic>

namespace tpfuse::test_hooks {

enum class FaultPoint {
  setup,       // shm setup: rank 0 created the segment (before publishing its name), or a
               // rank attached it (before the group is ready)
  gemm_block,  // before each block of a tile's GEMM rows
  wait,        // a wait for peers (or for a rendezvous key) found them not there, before it pauses
  reduce,      // a round's contributions are all in, before this rank sums them
  gather,      // a tensor all-gather's round, before this rank publishes its piece
  rank_start,  // a rank launch_local forked, before it watches for its launcher's death
};

// Runs on whichever thread reaches a point (a pipeline's helper thread too).
using FaultHook = void (*)(FaultPoint point);

namespace detail {
extern std::atomic<FaultHook> fault_hook;
}  // namespace detail

// Installs `hook` for this process (and the ranks it forks later); nullptr removes it.
void set_fault_hook(FaultHook hook);

inline void fault_point(FaultPoint point) {
  if (const FaultHook hook = detail::fault_hook.load(std::memory_order_relaxed)) hook(point);
}

}  // namespace tpfuse::test_hooks
