#include "core/fault_hooks.h"

namespace tpfuse::test_hooks {

namespace detail {
std::atomic<FaultHook> fault_hook{nullptr};
}  // namespace detail

void set_fault_hook(FaultHook hook) { detail::fault_hook.store(hook, std::memory_order_relaxed); }

}  // namespace tpfuse::test_hooks
