// The local launcher: exit codes and their description, exceptions and output
// of the ranks, stragglers, the environment it gives the ranks, and the
// cleanup of segments and store directories a crashed job leaves.
#include "tpfuse/comm/launcher.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "comm/shm_segment.h"
#include "rank_harness.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/core/error.h"

namespace tpfuse::comm {
namespace {

using namespace std::chrono_literals;
using test::expect_rank;

LaunchOptions options_for(int ranks, std::chrono::milliseconds timeout = 20s) {
  LaunchOptions options;
  options.ranks = ranks;
  options.shm.timeout = timeout;
  options.shm.slot_bytes = 4096;
  return options;
}

// Sends one of this process's file descriptors (which the ranks inherit) to a
// file while it lives, and gives back what was written there.
class CapturedFd {
 public:
  explicit CapturedFd(int fd) : fd_(fd) {
    std::fflush(nullptr);
    std::string pattern =
        (std::filesystem::temp_directory_path() / "tpfuse-capture-XXXXXX").string();
    const int file = ::mkstemp(pattern.data());
    if (file < 0) throw std::runtime_error("mkstemp failed");
    path_ = pattern;
    saved_ = ::dup(fd_);
    ::dup2(file, fd_);
    ::close(file);
  }
  ~CapturedFd() {
    restore();
    std::filesystem::remove(path_);
  }
  std::string text() {
    restore();
    std::ifstream in(path_);
    std::stringstream all;
    all << in.rdbuf();
    return all.str();
  }

 private:
  void restore() {
    if (saved_ < 0) return;
    std::fflush(nullptr);
    ::dup2(saved_, fd_);
    ::close(saved_);
    saved_ = -1;
  }
  int fd_;
  int saved_ = -1;
  std::filesystem::path path_;
};

TEST(Launcher, ReportsEachRanksExitCode) {
  const auto result = launch_local(options_for(3), [](RankContext& ctx) { return ctx.rank; });
  ASSERT_EQ(result.ranks.size(), 3u);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(result.ranks[r].rank, r);
    EXPECT_EQ(result.ranks[r].exit_code, r);
    EXPECT_EQ(result.ranks[r].signal, 0);
    EXPECT_GT(result.ranks[r].pid, 0);
  }
  EXPECT_FALSE(result.ok());
  EXPECT_EQ(result.describe_failures(), "rank 1: exit 1; rank 2: exit 2");

  const auto all_good = launch_local(options_for(2), [](RankContext&) { return 0; });
  EXPECT_TRUE(all_good.ok());
  EXPECT_EQ(all_good.describe_failures(), "");
}

TEST(Launcher, PrintsAnEscapingExceptionAndFlushesOutput) {
  CapturedFd err(STDERR_FILENO);
  CapturedFd out(STDOUT_FILENO);
  const auto result = launch_local(options_for(2), [](RankContext& ctx) -> int {
    std::printf("unterminated output of rank %d", ctx.rank);  // no newline: only a flush shows it
    if (ctx.rank == 1) throw InvalidArgument("boom");
    return 0;
  });
  const std::string err_text = err.text();
  const std::string out_text = out.text();
  ASSERT_EQ(result.ranks.size(), 2u);
  EXPECT_TRUE(result.ranks[0].ok());
  EXPECT_EQ(result.ranks[1].exit_code, 1);
  EXPECT_NE(err_text.find("tpfuse[rank 1] error: boom"), std::string::npos) << err_text;
  EXPECT_NE(out_text.find("unterminated output of rank 0"), std::string::npos) << out_text;
  EXPECT_NE(out_text.find("unterminated output of rank 1"), std::string::npos) << out_text;
}

pid_t g_parent_pid = 0;
std::filesystem::path g_atexit_marker;

void mark_if_run_in_a_child() {
  if (::getpid() != g_parent_pid) std::ofstream(g_atexit_marker) << "ran";
}

TEST(Launcher, RanksDoNotRunTheParentsAtexitHandlers) {
  g_parent_pid = ::getpid();
  g_atexit_marker = std::filesystem::temp_directory_path() / cat("tpfuse-atexit-", ::getpid());
  std::atexit(mark_if_run_in_a_child);
  const auto result = launch_local(options_for(2), [](RankContext&) { return 0; });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
  EXPECT_FALSE(std::filesystem::exists(g_atexit_marker))
      << "a rank ran the parent's atexit handler";
  std::filesystem::remove(g_atexit_marker);
}

TEST(Launcher, KillsStragglersAfterTheGrace) {
  LaunchOptions options = options_for(2);
  options.straggler_grace = 300ms;
  const auto start = std::chrono::steady_clock::now();
  const auto result = launch_local(options, [](RankContext& ctx) {
    if (ctx.rank == 0) return 3;
    std::this_thread::sleep_for(60s);  // stuck, not in a communicator wait
    return 0;
  });
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_EQ(result.ranks.size(), 2u);
  EXPECT_EQ(result.ranks[1].signal, SIGKILL);
  EXPECT_EQ(result.describe_failures(), "rank 0: exit 3; rank 1: killed by signal 9");
  EXPECT_LT(took, 30s) << "the launcher waited for the straggler";
}

// A rank stopped (SIGSTOP) while the others end successfully: no one is left
// to resume it, and the launcher must not wait for it forever; but the ranks
// still running when it stopped are waited for, however long they take.
TEST(Launcher, KillsARankLeftStoppedAfterTheOthersEnded) {
  LaunchOptions options = options_for(2);
  options.straggler_grace = 300ms;
  const auto start = std::chrono::steady_clock::now();
  const auto result = launch_local(options, [](RankContext& ctx) {
    if (ctx.rank == 1) ::raise(SIGSTOP);
    if (ctx.rank == 0) std::this_thread::sleep_for(900ms);  // longer than the grace
    return 0;
  });
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_EQ(result.ranks.size(), 2u);
  EXPECT_TRUE(result.ranks[0].ok()) << result.describe_failures();
  EXPECT_EQ(result.ranks[1].signal, SIGKILL);
  EXPECT_LT(took, 30s) << "the launcher waited for the stopped rank";
}

TEST(Launcher, GivesRanksTheEnvironmentForCreateFromEnv) {
  // A second group, through the environment and another store directory.
  const std::filesystem::path second_store = FileStore::make_private_dir();
  const auto result = launch_local(options_for(3), [&](RankContext& ctx) {
    expect_rank(std::getenv("TPFUSE_RANK") == std::to_string(ctx.rank), "TPFUSE_RANK");
    expect_rank(std::getenv("TPFUSE_WORLD_SIZE") == std::string("3"), "TPFUSE_WORLD_SIZE");
    const std::filesystem::path store_dir = std::getenv("TPFUSE_STORE_DIR");
    expect_rank(std::filesystem::is_directory(store_dir), "TPFUSE_STORE_DIR is not a directory");
    ::setenv("TPFUSE_STORE_DIR", second_store.c_str(), 1);
    ShmOptions options;
    options.timeout = 20s;
    auto second = create_shm_communicator_from_env(options);
    expect_rank(second->rank() == ctx.rank && second->size() == 3, "rank or size from env");
    expect_rank(second->name() != ctx.comm->name(), "two groups share a name");
    float value = 1.0f;
    second->all_reduce(&value, &value, 1, DType::f32);
    expect_rank(value == 3.0f, "expected 3, got ", value);
    return 0;
  });
  std::filesystem::remove_all(second_store);
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

TEST(Launcher, CreateFromEnvNamesAMissingVariable) {
  ASSERT_EQ(std::getenv("TPFUSE_RANK"), nullptr);
  try {
    create_shm_communicator_from_env();
    ADD_FAILURE() << "created a communicator without TPFUSE_RANK";
  } catch (const InvalidArgument& error) {
    EXPECT_NE(std::string(error.what()).find("TPFUSE_RANK"), std::string::npos) << error.what();
  }
}

// Rank 0 starts a second group whose rank 1 never comes, and dies while it
// waits: its segment is still linked, and only the launcher can remove it.
TEST(Launcher, ReclaimsASegmentOfARankThatDiedInSetup) {
  const auto result = launch_local(options_for(2), [](RankContext& ctx) {
    if (ctx.rank != 0) return 0;
    FileStore store(std::getenv("TPFUSE_STORE_DIR"));
    PrefixStore second_group("second.", store);
    std::thread creator([&] {
      ShmOptions options;
      options.timeout = 20s;
      create_shm_communicator(second_group, 0, 2, options);
    });
    // The job's keys are under its secret's prefix.
    const JobSecret secret = JobSecret::parse(std::getenv("TPFUSE_SECRET"), "TPFUSE_SECRET");
    second_group.get(secret.key_prefix() + shm::kSegmentKey, 20s);
    ::raise(SIGKILL);
    creator.join();
    return 0;
  });
  ASSERT_EQ(result.ranks.size(), 2u);
  EXPECT_EQ(result.ranks[0].signal, SIGKILL);
  EXPECT_EQ(result.segments.size(), 2u);
  ASSERT_EQ(result.reclaimed_segments.size(), 1u);
  EXPECT_TRUE(test::segments_gone(result));
}

TEST(Launcher, RejectsAnEmptyJob) {
  EXPECT_THROW(launch_local(options_for(0), [](RankContext&) { return 0; }), InvalidArgument);
}

}  // namespace
}  // namespace tpfuse::comm
