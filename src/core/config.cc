#include "tpfuse/core/config.h"

#include <cerrno>
#include <cstdlib>

#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"

namespace tpfuse::detail {

std::optional<std::string> read_env(const char* name) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return std::nullopt;
  return std::string(text);
}

std::int64_t parse_env_int(const char* name, const std::string& text) {
  errno = 0;
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (errno != 0 || end == text.c_str() || *end != '\0') {
    throw InvalidArgument(cat(name, ": expected an integer, got \"", text, "\""));
  }
  return value;
}

void log_setting(const char* name, const std::string& value, const char* help) {
  log::info(name, "=", value, " (", help, ")");
}

}  // namespace tpfuse::detail
