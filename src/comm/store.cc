// The file-based rendezvous store: one file per key in a private directory.
// A writer fills a hidden temporary file and renames it over the key, so a
// reader sees either no file or the whole value, never a partial one.
#include "tpfuse/comm/store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <thread>

#include "comm/unique_fd.h"
#include "tpfuse/core/error.h"

namespace tpfuse::comm {

namespace {

// Temporary files start with '.', which no key may, so they never shadow one.
void validate_key(const std::string& key) {
  const bool ok = !key.empty() && key.front() != '.' && key.find('/') == std::string::npos &&
                  key.find('\0') == std::string::npos;
  require(ok, "store: invalid key \"", key,
          "\" (expected a non-empty name without '/' that does not start with '.')");
}

void write_all(int fd, const std::string& value, const std::filesystem::path& path) {
  std::size_t written = 0;
  while (written < value.size()) {
    const ssize_t n = ::write(fd, value.data() + written, value.size() - written);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_system_error(cat("store: write(", path.string(), ")"), errno);
    }
    written += static_cast<std::size_t>(n);
  }
}

std::string read_all(int fd, const std::filesystem::path& path) {
  std::string value;
  char buffer[4096];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_system_error(cat("store: read(", path.string(), ")"), errno);
    }
    if (n == 0) return value;
    value.append(buffer, static_cast<std::size_t>(n));
  }
}

std::filesystem::path temporary_path(const std::filesystem::path& dir, const std::string& key) {
  static std::atomic<std::uint64_t> counter{0};
  return dir / cat(".tmp-", key, "-", ::getpid(), "-", counter.fetch_add(1));
}

}  // namespace

FileStore::FileStore(std::filesystem::path dir) : dir_(std::move(dir)) {
  std::error_code error;
  require(std::filesystem::is_directory(dir_, error), "FileStore: \"", dir_.string(),
          "\" is not a directory");
}

void FileStore::set(const std::string& key, const std::string& value) {
  validate_key(key);
  const std::filesystem::path temporary = temporary_path(dir_, key);
  {
    UniqueFd fd(::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (!fd.valid()) throw_system_error(cat("store: open(", temporary.string(), ")"), errno);
    try {
      write_all(fd.get(), value, temporary);
    } catch (...) {
      ::unlink(temporary.c_str());
      throw;
    }
  }
  const std::filesystem::path target = dir_ / key;
  if (::rename(temporary.c_str(), target.c_str()) != 0) {
    const int err = errno;
    ::unlink(temporary.c_str());
    throw_system_error(cat("store: rename(", temporary.string(), ", ", target.string(), ")"), err);
  }
}

std::optional<std::string> FileStore::try_get(const std::string& key) {
  validate_key(key);
  const std::filesystem::path path = dir_ / key;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno == ENOENT) return std::nullopt;
    throw_system_error(cat("store: open(", path.string(), ")"), errno);
  }
  return read_all(fd.get(), path);
}

std::string FileStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point deadline = Clock::now() + timeout;
  // Rendezvous is not latency-critical: poll gently, 100 us growing to 10 ms.
  std::chrono::microseconds pause{100};
  for (;;) {
    if (auto value = try_get(key)) return *std::move(value);
    if (Clock::now() >= deadline) {
      throw TimeoutError(cat("store: timed out after ", timeout.count(), " ms waiting for key \"",
                             key, "\" in ", dir_.string()));
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds{10000});
  }
}

std::filesystem::path FileStore::make_private_dir() {
  const char* tmpdir = std::getenv("TMPDIR");
  const std::filesystem::path base = (tmpdir != nullptr && *tmpdir != '\0') ? tmpdir : "/tmp";
  std::string pattern = (base / "tpfuse-store-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) {
    throw_system_error(cat("store: mkdtemp(", pattern, ")"), errno);
  }
  // mkdtemp already uses 0700; state it explicitly rather than rely on that.
  if (::chmod(pattern.c_str(), 0700) != 0) {
    const int err = errno;
    ::rmdir(pattern.c_str());
    throw_system_error(cat("store: chmod(", pattern, ")"), err);
  }
  return pattern;
}

PrefixStore::PrefixStore(std::string prefix, Store& base)
    : prefix_(std::move(prefix)), base_(base) {}

void PrefixStore::set(const std::string& key, const std::string& value) {
  validate_key(key);
  base_.set(prefix_ + key, value);
}

std::string PrefixStore::get(const std::string& key, std::chrono::milliseconds timeout) {
  validate_key(key);
  return base_.get(prefix_ + key, timeout);
}

std::optional<std::string> PrefixStore::try_get(const std::string& key) {
  validate_key(key);
  return base_.try_get(prefix_ + key);
}

}  // namespace tpfuse::comm
