// Samples of what a process holds, from /proc/self and a directory listing.
// Each sample reads a few small files; nothing is cached, so consecutive
// samples see every change.
#include "tpfuse/testing/resources.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <fstream>
#include <sstream>
#include <string>

#include "tpfuse/core/error.h"

namespace tpfuse::testing {

namespace {

std::string read_proc_file(const char* path) {
  std::ifstream in(path);
  if (!in) throw_system_error(cat("resources: open(", path, ")"), errno);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Closes a directory stream on every path out.
class Directory {
 public:
  explicit Directory(DIR* dir) : dir_(dir) {}
  Directory(const Directory&) = delete;
  Directory& operator=(const Directory&) = delete;
  ~Directory() {
    if (dir_ != nullptr) ::closedir(dir_);
  }
  DIR* get() const { return dir_; }

 private:
  DIR* dir_;
};

// Calls body(line) for each line of `text` until it returns true.
template <class Body>
void for_each_line(std::string_view text, Body&& body) {
  std::size_t at = 0;
  while (at < text.size()) {
    const std::size_t end = std::min(text.find('\n', at), text.size());
    if (body(text.substr(at, end - at))) return;
    at = end + 1;
  }
}

std::string_view skip_spaces(std::string_view text) {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
  return text;
}

// Splits off the next whitespace-separated field of `text`.
std::string_view next_field(std::string_view& text) {
  text = skip_spaces(text);
  const std::size_t end = text.find_first_of(" \t");
  const std::string_view field = text.substr(0, end);
  text = end == std::string_view::npos ? std::string_view() : text.substr(end);
  return field;
}

[[noreturn]] void malformed_maps_line(std::string_view line) {
  throw Error(
      cat("resources: expected a maps line (start-end perms offset dev inode [path]), got \"", line,
          "\""));
}

std::uint64_t parse_address(std::string_view digits, std::string_view line) {
  std::uint64_t value = 0;
  const auto [end, error] =
      std::from_chars(digits.data(), digits.data() + digits.size(), value, 16);
  if (digits.empty() || error != std::errc() || end != digits.data() + digits.size()) {
    malformed_maps_line(line);
  }
  return value;
}

std::int64_t count_open_fds() {
  Directory dir(::opendir("/proc/self/fd"));
  if (dir.get() == nullptr) throw_system_error("resources: opendir(/proc/self/fd)", errno);
  const std::string own = std::to_string(::dirfd(dir.get()));
  std::int64_t count = 0;
  while (const dirent* entry = ::readdir(dir.get())) {
    const std::string_view name = entry->d_name;
    if (name == "." || name == ".." || name == own) continue;
    ++count;
  }
  return count;
}

}  // namespace

std::int64_t parse_vm_rss(std::string_view status) {
  constexpr std::string_view kKey = "VmRSS:";
  std::int64_t bytes = -1;
  for_each_line(status, [&](std::string_view line) {
    if (!line.starts_with(kKey)) return false;
    line.remove_prefix(kKey.size());
    const std::string_view number = next_field(line);
    const std::string_view unit = next_field(line);
    std::int64_t kib = 0;
    const auto [stop, error] = std::from_chars(number.data(), number.data() + number.size(), kib);
    if (number.empty() || error != std::errc() || stop != number.data() + number.size() ||
        unit != "kB") {
      throw Error(cat("resources: expected \"VmRSS: <n> kB\" in the status, got \"VmRSS: ", number,
                      " ", unit, "\""));
    }
    bytes = kib * 1024;
    return true;
  });
  if (bytes < 0) throw Error("resources: no VmRSS line in the status");
  return bytes;
}

MappingCount count_mappings(std::string_view maps, std::string_view path_prefix) {
  MappingCount count;
  for_each_line(maps, [&](std::string_view line) {
    if (skip_spaces(line).empty()) return false;
    std::string_view rest = line;
    const std::string_view range = next_field(rest);
    const std::size_t dash = range.find('-');
    if (dash == std::string_view::npos) malformed_maps_line(line);
    const std::uint64_t start = parse_address(range.substr(0, dash), line);
    const std::uint64_t stop = parse_address(range.substr(dash + 1), line);
    if (stop < start) malformed_maps_line(line);
    for (int field = 0; field < 4; ++field) {  // perms, offset, device, inode
      if (next_field(rest).empty()) malformed_maps_line(line);
    }
    // The path is the rest of the line and may hold spaces.
    if (skip_spaces(rest).starts_with(path_prefix)) {
      ++count.mappings;
      count.bytes += static_cast<std::int64_t>(stop - start);
    }
    return false;
  });
  return count;
}

ProcessResources sample_process_resources() {
  ProcessResources sample;
  sample.rss_bytes = parse_vm_rss(read_proc_file("/proc/self/status"));
  sample.open_fds = count_open_fds();
  const MappingCount segments =
      count_mappings(read_proc_file("/proc/self/maps"), kSegmentPathPrefix);
  sample.segment_mappings = segments.mappings;
  sample.segment_mapped_bytes = segments.bytes;
  return sample;
}

ShmUsage sample_shm_usage(const std::filesystem::path& dir, std::string_view prefix) {
  ShmUsage usage;
  Directory listing(::opendir(dir.c_str()));
  if (listing.get() == nullptr) {
    if (errno == ENOENT) return usage;
    throw_system_error(cat("resources: opendir(", dir.string(), ")"), errno);
  }
  while (const dirent* entry = ::readdir(listing.get())) {
    if (!std::string_view(entry->d_name).starts_with(prefix)) continue;
    struct stat info {};
    if (::fstatat(::dirfd(listing.get()), entry->d_name, &info, AT_SYMLINK_NOFOLLOW) != 0) {
      if (errno == ENOENT) continue;  // removed since the listing: another job's setup ended
      throw_system_error(cat("resources: stat(", (dir / entry->d_name).string(), ")"), errno);
    }
    if (!S_ISREG(info.st_mode)) continue;
    ++usage.entries;
    usage.bytes += static_cast<std::int64_t>(info.st_blocks) * 512;
  }
  return usage;
}

}  // namespace tpfuse::testing
