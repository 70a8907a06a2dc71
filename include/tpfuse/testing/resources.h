// What a process holds of the host, read from /proc and /dev/shm, for leak
// checks over long runs (`tpfuse soak`): resident memory, open descriptors,
// the tpfuse shared-memory segments it maps, and tpfuse's entries in
// /dev/shm. Linux only, like the shm transport.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string_view>

namespace tpfuse::testing {

// The path a tpfuse segment has in this process's memory map ("/dev/shm/"
// plus its name, followed by " (deleted)" once unlinked).
inline constexpr std::string_view kSegmentPathPrefix = "/dev/shm/tpfuse-";

// Plain integers only, so that a rank can hand a sample to the process that
// launched it through shared memory.
struct ProcessResources {
  std::int64_t rss_bytes = 0;             // VmRSS
  std::int64_t open_fds = 0;              // descriptors open, not counting the one reading them
  std::int64_t segment_mappings = 0;      // mappings of tpfuse segments
  std::int64_t segment_mapped_bytes = 0;  // their total length
};

// Files of a directory whose names start with a prefix.
struct ShmUsage {
  std::int64_t entries = 0;
  std::int64_t bytes = 0;  // allocated (st_blocks * 512): what the files take of tmpfs
};

// This process now. Throws SystemError when /proc cannot be read.
ProcessResources sample_process_resources();

// The regular files of `dir` whose names start with `prefix` (host-wide:
// every job's, not only this process's). A missing directory counts as
// empty; any other failure to read it throws SystemError.
ShmUsage sample_shm_usage(const std::filesystem::path& dir = "/dev/shm",
                          std::string_view prefix = "tpfuse-");

// The VmRSS line of a /proc/<pid>/status text, in bytes. Throws Error when
// the line is missing or malformed.
std::int64_t parse_vm_rss(std::string_view status);

struct MappingCount {
  std::int64_t mappings = 0;
  std::int64_t bytes = 0;
};

// The mappings of a /proc/<pid>/maps text whose path starts with
// `path_prefix`. Throws Error on a line that is not a maps line.
MappingCount count_mappings(std::string_view maps, std::string_view path_prefix);

}  // namespace tpfuse::testing
