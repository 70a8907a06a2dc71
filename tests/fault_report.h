// What the fault tests share: a page of memory that forked ranks write their
// outcome to and the test process reads once they have ended, how an error is
// described there, and what a job left in /dev/shm.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <new>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>

#include "tpfuse/core/error.h"

namespace tpfuse::test {

inline std::int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A fresh `Page` in memory that ranks forked later share with this process.
template <class Page>
Page& shared_page() {
  static void* const memory = [] {
    void* mapped =
        ::mmap(nullptr, sizeof(Page), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mapped == MAP_FAILED) throw std::runtime_error("mmap of a shared page failed");
    return mapped;
  }();
  return *new (memory) Page{};
}

inline void copy_text(char* dst, std::size_t size, const std::string& text) {
  const std::size_t n = std::min(text.size(), size - 1);
  std::memcpy(dst, text.data(), n);
  dst[n] = '\0';
}

inline const char* comm_error_type(const CommError& error) {
  if (dynamic_cast<const PeerLostError*>(&error) != nullptr) return "PeerLostError";
  if (dynamic_cast<const TimeoutError*>(&error) != nullptr) return "TimeoutError";
  if (dynamic_cast<const AbortedError*>(&error) != nullptr) return "AbortedError";
  return "CommError";
}

// Whether `what` names "rank <rank>" (and not, say, rank 12 for rank 1).
inline bool names_rank(const std::string& what, int rank) {
  const std::string needle = cat("rank ", rank);
  for (auto at = what.find(needle); at != std::string::npos; at = what.find(needle, at + 1)) {
    const std::size_t end = at + needle.size();
    if (end == what.size() || !std::isdigit(static_cast<unsigned char>(what[end]))) return true;
  }
  return false;
}

inline std::set<std::string> tpfuse_segments_in_dev_shm() {
  std::set<std::string> names;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", error)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("tpfuse-", 0) == 0) names.insert(name);
  }
  return names;
}

// The tpfuse segments in /dev/shm that were not in `before` and stay there
// (tests running in parallel create segments that live for their setup);
// unlinks them, so that a failure does not leave them behind either.
inline std::set<std::string> leftover_segments(const std::set<std::string>& before,
                                               std::set<std::string> suspects = {}) {
  for (const std::string& name : tpfuse_segments_in_dev_shm()) {
    if (!before.contains(name)) suspects.insert(name);
  }
  for (int i = 0; i < 50 && !suspects.empty(); ++i) {
    std::erase_if(suspects, [](const std::string& name) {
      return !std::filesystem::exists("/dev/shm/" + name);
    });
    if (!suspects.empty()) std::this_thread::sleep_for(std::chrono::milliseconds{100});
  }
  for (const std::string& name : suspects) ::shm_unlink(("/" + name).c_str());
  return suspects;
}

}  // namespace tpfuse::test
