#include "tpfuse/core/log.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string_view>

namespace tpfuse::log {

namespace {

std::atomic<int> g_rank{-1};

Level read_level() {
  // Read directly, not through EnvSetting: settings log through this module.
  const char* text = std::getenv("TPFUSE_LOG");
  if (text == nullptr) return Level::warn;
  const std::string_view value(text);
  if (value == "off") return Level::off;
  if (value == "warn" || value.empty()) return Level::warn;
  if (value == "info") return Level::info;
  if (value == "debug") return Level::debug;
  std::fprintf(stderr, "tpfuse: TPFUSE_LOG: expected off, warn, info or debug, got \"%s\"; using warn\n",
               text);
  return Level::warn;
}

const char* level_name(Level level) {
  switch (level) {
    case Level::off:
      return "off";
    case Level::warn:
      return "warn";
    case Level::info:
      return "info";
    case Level::debug:
      return "debug";
  }
  return "?";
}

}  // namespace

Level level() {
  static const Level chosen = read_level();
  return chosen;
}

void set_rank(int rank) { g_rank.store(rank, std::memory_order_relaxed); }

int rank() { return g_rank.load(std::memory_order_relaxed); }

void write(Level level, const std::string& message) {
  const int r = rank();
  // One fprintf call per line so that lines of concurrent ranks do not interleave.
  if (r >= 0) {
    std::fprintf(stderr, "tpfuse[rank %d] %s: %s\n", r, level_name(level), message.c_str());
  } else {
    std::fprintf(stderr, "tpfuse[rank ?] %s: %s\n", level_name(level), message.c_str());
  }
}

}  // namespace tpfuse::log
