// Helpers for tests that run code on several local ranks. Inside a rank,
// gtest assertions cannot report to the parent, so rank code checks with
// expect_rank() (which throws, giving the rank exit code 1 and a message on
// stderr) and the parent asserts that every rank exited 0.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include "tpfuse/comm/launcher.h"
#include "tpfuse/core/error.h"

namespace tpfuse::test {

template <class... Parts>
void expect_rank(bool ok, Parts&&... parts) {
  if (!ok) throw InternalError(cat("check failed: ", std::forward<Parts>(parts)...));
}

inline comm::LaunchResult run_ranks(int ranks, const std::function<int(comm::RankContext&)>& body,
                                    std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  comm::LaunchOptions options;
  options.ranks = ranks;
  options.shm.timeout = timeout;
  return comm::launch_local(options, body);
}

inline std::uint64_t fnv1a(const void* data, std::size_t bytes) {
  std::uint64_t h = 1469598103934665603ull;
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

// True when none of the job's shared-memory segments is left in /dev/shm.
inline bool segments_gone(const comm::LaunchResult& result) {
  for (const auto& name : result.segments) {
    const std::string base = name.rfind('/', 0) == 0 ? name.substr(1) : name;
    if (std::filesystem::exists(std::filesystem::path("/dev/shm") / base)) return false;
  }
  return true;
}

}  // namespace tpfuse::test
