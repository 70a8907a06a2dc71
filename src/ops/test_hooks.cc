#include "ops/test_hooks.h"

#include <utility>

namespace tpfuse::test_hooks {

namespace {
std::function<void(std::int64_t)>& after_tile_hook() {
  static std::function<void(std::int64_t)> hook;
  return hook;
}
std::function<void(Agreement)>& after_agreement_hook() {
  static std::function<void(Agreement)> hook;
  return hook;
}
}  // namespace

void set_after_tile_computed(std::function<void(std::int64_t tile)> hook) {
  after_tile_hook() = std::move(hook);
}

void after_tile_computed(std::int64_t tile) {
  if (after_tile_hook()) after_tile_hook()(tile);
}

void set_after_agreement(std::function<void(Agreement outcome)> hook) {
  after_agreement_hook() = std::move(hook);
}

void after_agreement(Agreement outcome) {
  if (after_agreement_hook()) after_agreement_hook()(outcome);
}

}  // namespace tpfuse::test_hooks
