#include "tpfuse/core/error.h"

#include <cstring>

namespace tpfuse {

std::string format_ranks(const std::vector<int>& ranks) {
  std::string out;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(ranks[i]);
  }
  return out;
}

void throw_system_error(const std::string& what, int err) {
  throw SystemError(cat(what, " failed: ", std::strerror(err), " (errno ", err, ")"));
}

}  // namespace tpfuse
