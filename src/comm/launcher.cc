// The local launcher: forks the ranks, each with a registered shm
// communicator, reaps them without ever hanging on a stuck one, and cleans up
// what a crashed job could leave behind (segments, the store directory).
#include "tpfuse/comm/launcher.h"

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
#include <thread>

#include "comm/shm_segment.h"
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
  return body(context);
}

// The child's whole life. It must never return into the parent's code (gtest,
// main), so it ends with _exit, after flushing what it printed.
[[noreturn]] void run_rank(const std::filesystem::path& store_dir, int rank,
                           const LaunchOptions& options,
                           const std::function<int(RankContext&)>& body) {
  int code = 1;
  try {
    code = run_body(store_dir, rank, options, body);
    if (code < 0 || code > 255) code = 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "tpfuse[rank %d] error: %s\n", rank, error.what());
  } catch (...) {
    std::fprintf(stderr, "tpfuse[rank %d] error: unknown exception\n", rank);
  }
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
// children). Once one ends badly the others get `grace` to end too, since a
// rank stuck in a computation would otherwise hold the launcher forever. So
// do ranks left stopped (SIGSTOP) once every other rank has ended: no peer
// is left to need them, and no one may ever resume them.
void reap_ranks(std::vector<RankExit>& ranks, std::chrono::milliseconds grace) {
  std::vector<bool> ended(ranks.size(), false);
  std::vector<bool> stopped(ranks.size(), false);
  std::size_t remaining = ranks.size();
  std::optional<Clock::time_point> kill_at;
  Clock::time_point abandoned_at = Clock::time_point::max();  // max: some rank is not stopped
  std::chrono::microseconds pause{50};
  while (remaining > 0) {
    bool reaped = false;
    for (std::size_t i = 0; i < ranks.size(); ++i) {
      if (ended[i]) continue;
      int status = 0;
      const pid_t pid = ::waitpid(ranks[i].pid, &status, WNOHANG | WUNTRACED | WCONTINUED);
      if (pid == 0 || (pid < 0 && errno == EINTR)) continue;
      if (pid > 0 && (WIFSTOPPED(status) || WIFCONTINUED(status))) {
        stopped[i] = WIFSTOPPED(status);
        continue;
      }
      if (pid > 0) record_status(ranks[i], status);  // else ECHILD: someone else reaped it
      ended[i] = true;
      --remaining;
      reaped = true;
      if (!ranks[i].ok() && !kill_at) kill_at = Clock::now() + grace;
    }
    if (remaining == 0) return;
    bool only_stopped_left = remaining < ranks.size();
    for (std::size_t i = 0; i < ranks.size(); ++i) {
      if (!ended[i] && !stopped[i]) only_stopped_left = false;
    }
    if (!only_stopped_left) {
      abandoned_at = Clock::time_point::max();
    } else if (abandoned_at == Clock::time_point::max()) {
      abandoned_at = Clock::now() + grace;
    }
    if (kill_at && Clock::now() >= *kill_at) {
      log::warn("launcher: killing ranks still running ", grace.count(), " ms after a rank failed");
      kill_and_reap(ranks, ended);
      return;
    }
    if (Clock::now() >= abandoned_at) {
      log::warn("launcher: killing ranks left stopped ", grace.count(),
                " ms after every other rank ended");
      kill_and_reap(ranks, ended);
      return;
    }
    pause = reaped ? std::chrono::microseconds{50}
                   : std::min(pause * 2, std::chrono::microseconds{5000});
    std::this_thread::sleep_for(pause);
  }
}

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
  flush_output();  // or the children would print the parent's buffered output again
  for (int r = 0; r < options.ranks; ++r) {
    const pid_t pid = ::fork();
    if (pid == 0) run_rank(store_dir, r, job, body);
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
  reap_ranks(result.ranks, grace);
  reclaim_segments(store_dir, result);
  return result;
}

}  // namespace tpfuse::comm
