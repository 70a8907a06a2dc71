#include "ops/test_hooks.h"

#include <utility>

namespace tpfuse::test_hooks {

namespace {
std::function<void(std::int64_t)>& after_tile_hook() {
  static std::function<void(std::int64_t)> hook;
  return hook;
}
}  // namespace

void set_after_tile_computed(std::function<void(std::int64_t tile)> hook) {
  after_tile_hook() = std::move(hook);
}

void after_tile_computed(std::int64_t tile) {
  if (after_tile_hook()) after_tile_hook()(tile);
}

}  // namespace tpfuse::test_hooks
