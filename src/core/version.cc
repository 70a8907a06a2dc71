#include "tpfuse/version.h"

namespace tpfuse {

const char* version() noexcept { return TPFUSE_VERSION; }

}  // namespace tpfuse
