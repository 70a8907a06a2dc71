// A timeline of every call, for Perfetto and chrome://tracing.
//
// TPFUSE_TRACE=DIR makes each process write its events as Chrome trace-event
// JSON (the array format) to DIR/rank-R-pid-P.json, R being the process's
// rank in its job (log::rank(): its first communicator's, or its world rank
// under MPI). An event's pid is that rank, so that a process is one row
// whatever groups it calls in (ranks that are threads of one process, as in
// some tests, share a row), and its tid a track: what the rank's thread
// computes, and what its communication does. `tpfuse trace DIR` merges the
// files of a job into one timeline and draws it.
//
// Off, a span costs one load of a flag that never changes. On, an event is a
// few hundred nanoseconds (two clock reads and an append under a lock),
// written out in blocks of 64 KiB and when the process ends: at exit, or
// before a rank of tpfuse's launcher _exits. A process killed before that
// leaves its last block unwritten, and the array open, which Perfetto and
// chrome://tracing read all the same.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>

namespace tpfuse::trace {

namespace detail {
extern std::atomic<bool> g_enabled;
void initialise();
}  // namespace detail

// Whether TPFUSE_TRACE named a directory (read once, at the first call).
inline bool enabled() {
  static const bool read = (detail::initialise(), true);
  (void)read;
  return detail::g_enabled.load(std::memory_order_relaxed);
}

// The rows of a rank in the timeline.
enum class Track { compute = 0, comm = 1 };

// Nanoseconds on the steady clock, which every process on a host shares.
std::int64_t now_ns();

// One event's arguments, as the members of a JSON object.
class Args {
 public:
  Args& add(std::string_view key, std::int64_t value);
  Args& add(std::string_view key, double value);
  Args& add(std::string_view key, std::string_view value);
  Args& add(std::string_view key, const char* value) { return add(key, std::string_view(value)); }
  Args& add(std::string_view key, int value) { return add(key, static_cast<std::int64_t>(value)); }
  Args& add(std::string_view key, std::size_t value) {
    return add(key, static_cast<std::int64_t>(value));
  }
  // `json` is a JSON value already (an array, say).
  Args& add_raw(std::string_view key, std::string_view json);
  const std::string& json() const { return text_; }

 private:
  void key(std::string_view name);
  std::string text_;
};

// Records a complete event (Chrome's "X") of this process on `track`.
void complete(std::string_view name, std::string_view category, Track track, std::int64_t start_ns,
              std::int64_t end_ns, const Args& args = {});

// Writes what is buffered and closes the file's array; events after it are
// dropped. Called at exit, and by the launcher's ranks before they _exit.
void finish();

// Tracing turned on and off by a program rather than by TPFUSE_TRACE (the
// benchmarks measure its cost this way): start() begins a new file in `dir`
// (InvalidArgument when tracing is on already, SystemError when `dir` cannot
// be made); stop() finishes it and turns tracing off.
void start(const std::string& dir);
void stop();
// Events recorded by this process so far (metadata excluded).
std::uint64_t events_recorded();

// A span of the calling thread: an event from construction to destruction,
// recorded only when tracing is on (check active() before building args).
class Span {
 public:
  Span(const char* name, const char* category, Track track = Track::compute)
      : name_(name), category_(category), track_(track) {
    if (enabled()) start_ns_ = now_ns();
  }
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;
  ~Span() {
    if (start_ns_ >= 0) complete(name_, category_, track_, start_ns_, now_ns(), args_);
  }
  bool active() const { return start_ns_ >= 0; }
  Args& args() { return args_; }

 private:
  const char* name_;
  const char* category_;
  Track track_;
  std::int64_t start_ns_ = -1;
  Args args_;
};

}  // namespace tpfuse::trace
