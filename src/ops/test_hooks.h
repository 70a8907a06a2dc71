// Hooks that let tests interfere with a call at precise points (stall or kill
// a rank between tiles). Unset in normal use; a null check is their only cost.
#pragma once

#include <cstdint>
#include <functional>

namespace tpfuse::test_hooks {

// Called by the operator after a tile's GEMM, before its all-reduce starts.
void set_after_tile_computed(std::function<void(std::int64_t tile)> hook);
void after_tile_computed(std::int64_t tile);

// How a call's agreement went on this rank: in its first round (every rank
// planned alike from facts agreed before), or judged from every rank's
// proposal after that round (a first time, stale facts, an error).
enum class Agreement { in_first_round, judged };

// Called by the operator once its ranks agreed and this rank's run is settled.
void set_after_agreement(std::function<void(Agreement outcome)> hook);
void after_agreement(Agreement outcome);

}  // namespace tpfuse::test_hooks
