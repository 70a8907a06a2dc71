#include "core/trace.h"

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <set>

#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"

namespace tpfuse::trace {

namespace detail {
std::atomic<bool> g_enabled{false};
}  // namespace detail

namespace {

// Written out in blocks this large: small enough to stay out of the way of
// the GEMM's caches (with 1 MiB, 8 ranks on 2 cores ran 35% slower traced,
// the GEMM itself 18%), large enough that the writes cost nothing per call.
constexpr std::size_t kBlockBytes = std::size_t{64} << 10;

std::atomic<std::uint64_t> g_recorded{0};
std::atomic<std::uint64_t> g_forks{0};  // forks of this process seen (pthread_atfork)

struct State {
  std::mutex mutex;
  std::string dir;
  std::string buffer;  // events not yet written, each preceded by ",\n" but the file's first
  int fd = -1;
  bool any_event = false;
  bool finished = false;
  int file_rank = -1;
  std::set<int> declared;
};

State& state() {
  static auto* instance = new State;  // never destroyed: used until the process ends
  return *instance;
}

void append_escaped(std::string& out, std::string_view text) {
  for (const char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof escaped, "\\u%04x", static_cast<unsigned>(c));
          out += escaped;
        } else {
          out += c;
        }
    }
  }
}

void append_int(std::string& out, std::int64_t value);

void append_event(State& s, std::string_view event) {
  if (s.any_event) s.buffer += ",\n";
  s.any_event = true;
  s.buffer += event;
}

// With the lock held: the buffered events into the file, opened (and the
// array begun) on first use.
void write_buffer(State& s) {
  if (s.buffer.empty()) return;
  if (s.fd < 0) {
    const std::string name = s.file_rank >= 0
                                 ? cat("rank-", s.file_rank, "-pid-", ::getpid(), ".json")
                                 : cat("pid-", ::getpid(), ".json");
    const std::string path = (std::filesystem::path(s.dir) / name).string();
    s.fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (s.fd < 0) {
      log::warn("TPFUSE_TRACE: cannot write ", path, ": ", std::strerror(errno), "; tracing stops");
      detail::g_enabled.store(false, std::memory_order_relaxed);
      s.buffer.clear();
      return;
    }
    s.buffer.insert(0, "[\n");
  }
  std::size_t written = 0;
  while (written < s.buffer.size()) {
    const ssize_t n = ::write(s.fd, s.buffer.data() + written, s.buffer.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    written += static_cast<std::size_t>(n);
  }
  s.buffer.clear();
}

// A fork happens with the lock held, so that the child's copy of the state
// is whole; the child then drops the parent's events and file.
void lock_for_fork() { state().mutex.lock(); }
void unlock_in_parent() { state().mutex.unlock(); }
void forget_parent() {
  State& s = state();
  g_forks.fetch_add(1, std::memory_order_relaxed);
  s.mutex.unlock();
  s.buffer.clear();
  if (s.fd >= 0) ::close(s.fd);
  s.fd = -1;
  s.any_event = false;
  s.finished = false;
  s.file_rank = -1;
  s.declared.clear();
}

}  // namespace

void start(const std::string& dir) {
  State& s = state();
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) throw SystemError(cat("trace: cannot create ", dir, ": ", error.message()));
  const std::lock_guard lock(s.mutex);
  require(!detail::g_enabled.load(std::memory_order_relaxed), "trace: tracing is on already (into ",
          s.dir, ")");
  static const bool hooked = [] {
    std::atexit(finish);
    ::pthread_atfork(lock_for_fork, unlock_in_parent, forget_parent);
    return true;
  }();
  (void)hooked;
  s.dir = dir;
  s.buffer.clear();
  s.fd = -1;
  s.any_event = false;
  s.finished = false;
  s.file_rank = -1;
  s.declared.clear();
  detail::g_enabled.store(true, std::memory_order_relaxed);
}

std::uint64_t events_recorded() { return g_recorded.load(std::memory_order_relaxed); }

void stop() {
  finish();
  detail::g_enabled.store(false, std::memory_order_relaxed);
}

void detail::initialise() {
  const char* dir = std::getenv("TPFUSE_TRACE");
  if (dir == nullptr || *dir == '\0') return;
  try {
    start(dir);
  } catch (const std::exception& e) {
    log::warn("TPFUSE_TRACE: ", e.what(), "; tracing is off");
  }
}

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void Args::key(std::string_view name) {
  text_ += text_.empty() ? "\"" : ",\"";
  append_escaped(text_, name);
  text_ += "\":";
}

Args& Args::add(std::string_view name, std::int64_t value) {
  key(name);
  append_int(text_, value);
  return *this;
}

Args& Args::add(std::string_view name, double value) {
  key(name);
  char number[32];
  std::snprintf(number, sizeof number, "%.6g", value);
  text_ += number;
  return *this;
}

Args& Args::add(std::string_view name, std::string_view value) {
  key(name);
  text_ += '"';
  append_escaped(text_, value);
  text_ += '"';
  return *this;
}

Args& Args::add_raw(std::string_view name, std::string_view json) {
  key(name);
  text_ += json;
  return *this;
}

namespace {

// With the lock held: names the process's row in the timeline the first
// time it records as `rank`.
void declare(State& s, int rank) {
  if (s.file_rank < 0 && rank >= 0) s.file_rank = rank;
  if (!s.declared.insert(rank).second) return;
  const std::string label =
      rank >= 0 ? cat("rank ", rank, " (pid ", ::getpid(), ")") : cat("pid ", ::getpid());
  append_event(s, cat("{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":", rank,
                      ",\"args\":{\"name\":\"", label, "\"}}"));
  append_event(s, cat("{\"name\":\"process_sort_index\",\"ph\":\"M\",\"pid\":", rank,
                      ",\"args\":{\"sort_index\":", rank, "}}"));
  for (const auto& [track, name] :
       {std::pair{Track::compute, "compute"}, {Track::comm, "communication"}}) {
    append_event(s, cat("{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":", rank, ",\"tid\":",
                        static_cast<int>(track), ",\"args\":{\"name\":\"", name, "\"}}"));
  }
}

}  // namespace

namespace {

void append_int(std::string& out, std::int64_t value) {
  char digits[24];
  const auto result = std::to_chars(digits, digits + sizeof digits, value);
  out.append(digits, result.ptr);
}

// Microseconds with three decimals, from nanoseconds (ns >= 0).
void append_us(std::string& out, std::int64_t ns) {
  append_int(out, ns / 1000);
  const auto fraction = static_cast<int>(ns % 1000);
  const char decimals[4] = {'.', static_cast<char>('0' + fraction / 100),
                            static_cast<char>('0' + fraction / 10 % 10),
                            static_cast<char>('0' + fraction % 10)};
  out.append(decimals, 4);
}

// This process's row: its rank once one is known, else minus its pid (a
// pid read once per process, and again after a fork).
int row() {
  const int known = log::rank();
  if (known >= 0) return known;
  static thread_local std::pair<std::uint64_t, int> cached{~std::uint64_t{0}, 0};
  const std::uint64_t forks = g_forks.load(std::memory_order_relaxed);
  if (cached.first != forks) cached = {forks, -static_cast<int>(::getpid())};
  return cached.second;
}

}  // namespace

void complete(std::string_view name, std::string_view category, Track track, std::int64_t start_ns,
              std::int64_t end_ns, const Args& args) {
  if (!enabled()) return;
  const int rank = row();
  State& s = state();
  const std::lock_guard lock(s.mutex);
  if (s.finished) return;
  declare(s, rank);
  // Appended in place: no formatting library, no allocation once the
  // buffer has grown.
  std::string& out = s.buffer;
  if (s.any_event) out += ",\n";
  s.any_event = true;
  out += "{\"name\":\"";
  append_escaped(out, name);
  out += "\",\"cat\":\"";
  append_escaped(out, category);
  out += "\",\"ph\":\"X\",\"ts\":";
  append_us(out, start_ns);
  out += ",\"dur\":";
  append_us(out, std::max<std::int64_t>(0, end_ns - start_ns));
  out += ",\"pid\":";
  append_int(out, rank);
  out += ",\"tid\":";
  append_int(out, static_cast<int>(track));
  out += ",\"args\":{";
  out += args.json();
  out += "}}";
  g_recorded.fetch_add(1, std::memory_order_relaxed);
  if (out.size() >= kBlockBytes) write_buffer(s);
}

void finish() {
  if (!enabled()) return;
  State& s = state();
  const std::lock_guard lock(s.mutex);
  if (s.finished) return;
  write_buffer(s);
  if (s.fd >= 0) {
    const char end[] = "\n]\n";
    [[maybe_unused]] const ssize_t n = ::write(s.fd, end, sizeof end - 1);
    ::close(s.fd);
    s.fd = -1;
  }
  s.finished = true;
}

}  // namespace tpfuse::trace
