// The local launcher: forks the ranks, each with a registered shm
// communicator, reaps them without ever hanging on a stuck one, and cleans up
// what a crashed job could leave behind (segments, the store directory). No
// rank outlives it: each watches for its death (see LauncherLifeline).
#include "tpfuse/comm/launcher.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <optional>
#include <sstream>
#include <thread>

#include "comm/shm_segment.h"
#include "core/fault_hooks.h"
#include "core/trace.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"

namespace tpfuse::comm {

namespace {

using Clock = std::chrono::steady_clock;

// Removes the job's store directory on every path out of launch_local.
class StoreDirRemover {
 public:
  explicit StoreDirRemover(std::filesystem::path dir) : dir_(std::move(dir)) {}
  StoreDirRemover(const StoreDirRemover&) = delete;
  StoreDirRemover& operator=(const StoreDirRemover&) = delete;
  ~StoreDirRemover() {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

 private:
  std::filesystem::path dir_;
};

class Registration {
 public:
  explicit Registration(const std::shared_ptr<Communicator>& comm)
      : name_(register_communicator(comm)) {}
  Registration(const Registration&) = delete;
  Registration& operator=(const Registration&) = delete;
  ~Registration() { unregister_communicator(name_); }

 private:
  std::string name_;
};

void flush_output() {
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
}

// No rank outlives its launcher, whatever ends the launcher (kill -9, the OOM
// killer, a container stop). Before forking, the launcher opens a pipe and
// keeps its write end; each rank closes its copy and watches the read end
// from a thread of its own. When the launcher dies the kernel closes its end
// and poll() reports the hang-up at once, even to a rank that only starts
// watching afterwards: the pipe existed before the rank did, so there is no
// moment in which the launcher's death can go unseen. getppid() is the
// backstop for a write end some other fork of the launcher's process still
// holds. A rank that finds its launcher gone removes the job's segments and
// store (no one else will) and ends at once.
class LauncherLifeline {
 public:
  LauncherLifeline() : launcher_pid_(::getpid()) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw_system_error("launch_local: pipe2()", errno);
    read_fd_ = fds[0];
    write_fd_ = fds[1];
  }
  LauncherLifeline(const LauncherLifeline&) = delete;
  LauncherLifeline& operator=(const LauncherLifeline&) = delete;
  ~LauncherLifeline() {
    close_fd(read_fd_);
    close_fd(write_fd_);
  }

  // In the launcher, once every rank is forked.
  void ranks_forked() { close_fd(read_fd_); }

  // In a rank, first thing: from here on its launcher's death ends it.
  void watch_from_rank(const std::filesystem::path& store_dir, int rank) {
    test_hooks::fault_point(test_hooks::FaultPoint::rank_start);
    close_fd(write_fd_);
    std::thread([fd = read_fd_, launcher = launcher_pid_, store_dir, rank] {
      constexpr int kBackstopMs = 200;
      for (;;) {
        pollfd watched{fd, POLLIN, 0};
        const int ready = ::poll(&watched, 1, kBackstopMs);
        if (ready > 0 || (ready < 0 && errno != EINTR) || ::getppid() != launcher) break;
      }
      std::fprintf(stderr, "tpfuse[rank %d] error: the launcher (pid %ld) is gone; ending\n", rank,
                   static_cast<long>(launcher));
      remove_job_files(store_dir);
      shm::unlink_created_segments_and_end(kLauncherGoneExitCode);
    }).detach();
  }

 private:
  static constexpr int kLauncherGoneExitCode = 129;

  static void close_fd(int& fd) {
    if (fd >= 0) ::close(fd);
    fd = -1;
  }

  static void remove_job_files(const std::filesystem::path& store_dir) noexcept;

  pid_t launcher_pid_;
  int read_fd_ = -1;
  int write_fd_ = -1;
};

// Where a rank that failed leaves, for the launcher, the ranks its error
// blames (a CommError's ranks(); none for an error of its own) and its message:
// "<rank>,<rank>,... <message>".
std::string failure_key(int rank) { return cat("launcher-failed-", rank); }

void record_failure(const std::filesystem::path& store_dir, int rank, const std::exception& error) {
  std::string blamed;
  if (const auto* comm_error = dynamic_cast<const CommError*>(&error)) {
    for (int r : comm_error->ranks()) blamed += cat(blamed.empty() ? "" : ",", r);
  }
  try {
    FileStore(store_dir).set(failure_key(rank), cat(blamed, ' ', error.what()));
  } catch (const std::exception&) {
    // The store is gone or full: the launcher then knows only the exit code.
  }
}

int run_body(const std::filesystem::path& store_dir, int rank, const LaunchOptions& options,
             const std::function<int(RankContext&)>& body) {
  ::setenv("TPFUSE_RANK", std::to_string(rank).c_str(), 1);
  ::setenv("TPFUSE_WORLD_SIZE", std::to_string(options.ranks).c_str(), 1);
  ::setenv("TPFUSE_STORE_DIR", store_dir.c_str(), 1);
  ::setenv("TPFUSE_SECRET", options.shm.secret.c_str(), 1);
  FileStore store(store_dir);
  RankContext context{rank, options.ranks,
                      create_shm_communicator(store, rank, options.ranks, options.shm)};
  const Registration registration(context.comm);
  try {
    return body(context);
  } catch (const std::exception& error) {
    // Peers waiting for this rank learn at once that it failed, and why,
    // rather than that its process is gone.
    context.comm->abort(cat("rank ", rank, " failed: ", error.what()));
    throw;
  }
}

// The child's whole life. It must never return into the parent's code (gtest,
// main), so it ends with _exit, after flushing what it printed and traced.
[[noreturn]] void run_rank(const std::filesystem::path& store_dir, int rank,
                           const LaunchOptions& options,
                           const std::function<int(RankContext&)>& body) {
  int code = 1;
  try {
    code = run_body(store_dir, rank, options, body);
    if (code < 0 || code > 255) code = 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "tpfuse[rank %d] error: %s\n", rank, error.what());
    record_failure(store_dir, rank, error);
  } catch (...) {
    std::fprintf(stderr, "tpfuse[rank %d] error: unknown exception\n", rank);
  }
  trace::finish();
  flush_output();
  ::_exit(code);
}

void record_status(RankExit& exit, int status) {
  if (WIFSIGNALED(status)) {
    exit.signal = WTERMSIG(status);
  } else if (WIFEXITED(status)) {
    exit.exit_code = WEXITSTATUS(status);
  }
}

void kill_and_reap(std::vector<RankExit>& ranks, std::vector<bool>& ended) {
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    if (!ended[i]) ::kill(ranks[i].pid, SIGKILL);
  }
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    if (ended[i]) continue;
    int status = 0;
    while (::waitpid(ranks[i].pid, &status, 0) < 0 && errno == EINTR) {
    }
    record_status(ranks[i], status);
    ended[i] = true;
  }
}

// Polls the ranks (waitpid on our own pids only: the caller may have other
// children) until each has ended, ending those that cannot end by themselves
// once the job has failed:
// - the stragglers, at once: once every rank that has not ended is stopped
//   (SIGSTOP: it cannot end unless someone resumes it, and the job has failed
//   already), or is one that the failed ranks' errors blame (a rank frozen or
//   stuck while its peers timed out waiting for it; kLastWords after that);
// - every rank, `grace` after the first failure: a rank stuck in a
//   computation would otherwise hold the launcher forever.
// Ranks left stopped after the others all succeeded get `grace` too: no peer
// is left to need them, and no one may ever resume them.
class Reaper {
 public:
  // How long blamed ranks that still run may take to end by themselves: one
  // that a peer blamed only for being late (it was waiting, in turn, for the
  // rank that froze) has heard of the failure and is reporting its own error.
  static constexpr std::chrono::milliseconds kLastWords{250};

  Reaper(std::vector<RankExit>& ranks, std::filesystem::path store_dir,
         std::chrono::milliseconds grace)
      : ranks_(ranks),
        store_dir_(std::move(store_dir)),
        grace_(grace),
        ended_(ranks.size(), false),
        stopped_(ranks.size(), false),
        blamed_(ranks.size(), false),
        remaining_(ranks.size()) {}

  void run() {
    std::chrono::microseconds pause{50};
    while (remaining_ > 0) {
      const bool reaped = poll_once();
      if (remaining_ == 0) return;
      if (const char* why = reason_to_end_the_rest()) {
        log::warn("launcher: killing the ranks still running: ", why);
        kill_and_reap(ranks_, ended_);
        return;
      }
      pause = reaped ? std::chrono::microseconds{50}
                     : std::min(pause * 2, std::chrono::microseconds{5000});
      std::this_thread::sleep_for(pause);
    }
  }

 private:
  bool poll_once() {
    bool reaped = false;
    for (std::size_t i = 0; i < ranks_.size(); ++i) {
      if (ended_[i]) continue;
      int status = 0;
      const pid_t pid = ::waitpid(ranks_[i].pid, &status, WNOHANG | WUNTRACED | WCONTINUED);
      if (pid == 0 || (pid < 0 && errno == EINTR)) continue;
      if (pid > 0 && (WIFSTOPPED(status) || WIFCONTINUED(status))) {
        stopped_[i] = WIFSTOPPED(status);
        continue;
      }
      if (pid > 0) record_status(ranks_[i], status);  // else ECHILD: someone else reaped it
      ended_[i] = true;
      --remaining_;
      reaped = true;
      if (!ranks_[i].ok()) note_failure(ranks_[i]);
    }
    return reaped;
  }

  void note_failure(RankExit& rank) {
    if (!kill_at_) kill_at_ = Clock::now() + grace_;
    const auto record = FileStore(store_dir_).try_get(failure_key(rank.rank));
    if (!record) return;  // killed, or its error was no exception
    const std::size_t space = record->find(' ');
    rank.error = record->substr(space + 1);
    std::istringstream list(record->substr(0, space));
    for (std::string text; std::getline(list, text, ',');) {
      const long blamed = std::strtol(text.c_str(), nullptr, 10);
      if (blamed >= 0 && blamed < static_cast<long>(ranks_.size())) blamed_[blamed] = true;
    }
  }

  const char* reason_to_end_the_rest() {
    bool all_blamed = true;
    bool all_stopped = true;
    for (std::size_t i = 0; i < ranks_.size(); ++i) {
      if (ended_[i]) continue;
      all_blamed = all_blamed && blamed_[i];
      all_stopped = all_stopped && stopped_[i];
    }
    if (kill_at_ && all_stopped) return "they are stopped, and a rank has failed";
    if (kill_at_ && all_blamed) {
      if (!last_words_until_) last_words_until_ = Clock::now() + std::min(kLastWords, grace_);
      if (Clock::now() >= *last_words_until_) {
        return "every other rank has ended, and their errors name these";
      }
    } else {
      last_words_until_.reset();
    }
    if (kill_at_ && Clock::now() >= *kill_at_) return "the straggler grace after a failure is over";
    if (!all_stopped || remaining_ == ranks_.size()) {
      abandoned_at_ = Clock::time_point::max();
    } else if (abandoned_at_ == Clock::time_point::max()) {
      abandoned_at_ = Clock::now() + grace_;
    }
    if (Clock::now() >= abandoned_at_) return "they stayed stopped after every other rank ended";
    return nullptr;
  }

  std::vector<RankExit>& ranks_;
  const std::filesystem::path store_dir_;
  const std::chrono::milliseconds grace_;
  std::vector<bool> ended_;
  std::vector<bool> stopped_;
  std::vector<bool> blamed_;  // named by a failed rank's error
  std::size_t remaining_;
  std::optional<Clock::time_point> kill_at_;                 // set by the first failure
  std::optional<Clock::time_point> last_words_until_;        // for blamed ranks still running
  Clock::time_point abandoned_at_ = Clock::time_point::max();  // max: some rank is not stopped
};

// Segment names are in the store under keys ending in kSegmentKey (groups on
// a PrefixStore add a prefix in front); a group's name is there twice, once
// reserved and once published, and counts once.
std::vector<std::string> segment_names(const std::filesystem::path& store_dir) {
  std::vector<std::string> names;
  FileStore store(store_dir);
  const std::string suffix = shm::kSegmentKey;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(store_dir, error)) {
    const std::string key = entry.path().filename().string();
    if (key.front() == '.' || !key.ends_with(suffix)) continue;
    auto name = store.try_get(key);
    if (name && std::find(names.begin(), names.end(), *name) == names.end()) {
      names.push_back(*std::move(name));
    }
  }
  return names;
}

// Every rank of the job does this at once: what another removed first is
// simply gone (and a store directory already removed has nothing to name).
void LauncherLifeline::remove_job_files(const std::filesystem::path& store_dir) noexcept {
  try {
    for (const std::string& name : segment_names(store_dir)) ::shm_unlink(name.c_str());
  } catch (const std::exception&) {
  }
  std::error_code ignored;
  std::filesystem::remove_all(store_dir, ignored);
}

// Unlinks the job's segments that still exist; a name the job unlinked
// itself is gone already.
void reclaim_segments(const std::filesystem::path& store_dir, LaunchResult& result) {
  result.segments = segment_names(store_dir);
  for (const std::string& name : result.segments) {
    if (::shm_unlink(name.c_str()) == 0) result.reclaimed_segments.push_back(name);
  }
  if (!result.reclaimed_segments.empty()) {
    log::warn("launcher: unlinked ", result.reclaimed_segments.size(),
              " shared-memory segment(s) the job left behind");
  }
}

}  // namespace

bool LaunchResult::ok() const {
  if (ranks.empty()) return false;
  for (const RankExit& rank : ranks) {
    if (!rank.ok()) return false;
  }
  return true;
}

std::string LaunchResult::describe_failures() const {
  std::string text;
  for (const RankExit& rank : ranks) {
    if (rank.ok()) continue;
    if (!text.empty()) text += "; ";
    text += rank.signal != 0 ? cat("rank ", rank.rank, ": killed by signal ", rank.signal)
                             : cat("rank ", rank.rank, ": exit ", rank.exit_code);
    if (!rank.error.empty()) text += cat(" (", rank.error, ")");
  }
  return text;
}

LaunchResult launch_local(const LaunchOptions& options,
                          const std::function<int(RankContext&)>& body) {
  require(options.ranks >= 1 && options.ranks <= shm::kMaxRanks,
          "launch_local: ranks must be in [1, ", shm::kMaxRanks, "], got ", options.ranks);
  const std::chrono::milliseconds grace = options.straggler_grace.count() > 0
                                              ? options.straggler_grace
                                              : options.shm.timeout + std::chrono::seconds{10};
  const std::filesystem::path store_dir = FileStore::make_private_dir();
  const StoreDirRemover remover(store_dir);
  LaunchOptions job = options;
  const JobSecret secret = JobSecret::generate();
  job.shm.secret = secret.hex();
  {
    FileStore store(store_dir);
    seal_store(store, secret);
  }

  LaunchResult result;
  result.ranks.resize(static_cast<std::size_t>(options.ranks));
  LauncherLifeline lifeline;
  flush_output();  // or the children would print the parent's buffered output again
  for (int r = 0; r < options.ranks; ++r) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      lifeline.watch_from_rank(store_dir, r);
      run_rank(store_dir, r, job, body);
    }
    if (pid < 0) {
      const int err = errno;
      result.ranks.resize(static_cast<std::size_t>(r));
      std::vector<bool> ended(result.ranks.size(), false);
      kill_and_reap(result.ranks, ended);
      reclaim_segments(store_dir, result);
      throw_system_error(cat("launch_local: fork() for rank ", r), err);
    }
    result.ranks[r].rank = r;
    result.ranks[r].pid = pid;
  }
  lifeline.ranks_forked();
  Reaper(result.ranks, store_dir, grace).run();
  reclaim_segments(store_dir, result);
  return result;
}

}  // namespace tpfuse::comm
