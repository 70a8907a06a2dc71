// Levelled logging to stderr. TPFUSE_LOG=warn (default) | info | debug | off.
// Every line carries the process's rank, set once the rank is known:
//   tpfuse[rank 3] info: shm communicator ready (8 ranks, 1048576 B slots)
#pragma once

#include <string>
#include <utility>

#include "tpfuse/core/error.h"

namespace tpfuse::log {

enum class Level { off = 0, warn = 1, info = 2, debug = 3 };

// The level chosen by TPFUSE_LOG, read once.
Level level();
// Records this process's rank for the line prefix (-1: not known yet).
void set_rank(int rank);
int rank();

void write(Level level, const std::string& message);

template <class... Parts>
void warn(Parts&&... parts) {
  if (level() >= Level::warn) write(Level::warn, cat(std::forward<Parts>(parts)...));
}
template <class... Parts>
void info(Parts&&... parts) {
  if (level() >= Level::info) write(Level::info, cat(std::forward<Parts>(parts)...));
}
template <class... Parts>
void debug(Parts&&... parts) {
  if (level() >= Level::debug) write(Level::debug, cat(std::forward<Parts>(parts)...));
}

}  // namespace tpfuse::log
