// Hooks that let tests interfere with a call at precise points (stall or kill
// a rank between tiles). Unset in normal use; a null check is their only cost.
#pragma once

#include <cstdint>
#include <functional>

namespace tpfuse::test_hooks {

// Called by the operator after a tile's GEMM, before its all-reduce starts.
void set_after_tile_computed(std::function<void(std::int64_t tile)> hook);
void after_tile_computed(std::int64_t tile);

}  // namespace tpfuse::test_hooks
