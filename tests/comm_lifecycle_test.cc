// The shm communicator's life cycle: every failure path (a rank that never
// arrives, a killed rank, abort), the segment's privacy and lifetime, the
// registry, the file store, and 8 ranks sharing 2 cores.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <optional>
#include <regex>
#include <thread>
#include <vector>

#include "comm/shm_segment.h"
#include "rank_harness.h"
#include "tpfuse/comm/launcher.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"

namespace tpfuse::comm {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::expect_rank;
using test::run_ranks;

long elapsed_ms(Clock::time_point since) {
  return static_cast<long>(
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - since).count());
}

// TMPDIR pointed at a fresh directory, so a test can see what the launcher
// leaves there; restored and removed afterwards.
class ScopedTmpdir {
 public:
  ScopedTmpdir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "tpfuse-comm-test-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
    if (const char* old = std::getenv("TMPDIR")) saved_ = old;
    ::setenv("TMPDIR", path_.c_str(), 1);
  }
  ~ScopedTmpdir() {
    if (saved_) {
      ::setenv("TMPDIR", saved_->c_str(), 1);
    } else {
      ::unsetenv("TMPDIR");
    }
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::optional<std::string> saved_;
};

bool shm_name_exists(const std::string& name) {
  const int fd = ::shm_open(name.c_str(), O_RDONLY, 0);
  if (fd < 0) return false;
  ::close(fd);
  return true;
}

// ---- failures ------------------------------------------------------------------

TEST(ShmFailures, RankThatNeverArrivesIsNamedAtTheDeadline) {
  const auto result = run_ranks(
      3,
      [](RankContext& ctx) {
        if (ctx.rank == 2) {
          std::this_thread::sleep_for(1500ms);  // alive, but never joins the all-reduce
          return 0;
        }
        float value = 1.0f;
        const auto start = Clock::now();
        try {
          ctx.comm->all_reduce(&value, &value, 1, DType::f32);
          expect_rank(false, "the all-reduce completed without rank 2");
        } catch (const TimeoutError& error) {
          const long ms = elapsed_ms(start);
          std::printf("rank %d: TimeoutError after %ld ms: %s\n", ctx.rank, ms, error.what());
          expect_rank(error.ranks() == std::vector<int>{2},
                      "ranks() should be {2}: ", error.what());
          const std::string what = error.what();
          expect_rank(what.find("rank 2") != std::string::npos &&
                          what.find("timed out after 500 ms") != std::string::npos,
                      "message does not name rank 2 and the deadline: ", what);
          expect_rank(ms >= 400, "gave up after ", ms, " ms, before the 500 ms deadline");
        }
        // The group is aborted now: later calls fail at once instead of waiting again.
        bool later_call_failed = false;
        try {
          ctx.comm->all_gather("x");
        } catch (const CommError&) {
          later_call_failed = true;
        }
        expect_rank(later_call_failed, "a call after the timeout did not fail");
        return 0;
      },
      500ms);
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

TEST(ShmFailures, KilledRankIsReportedAsLostAndNothingIsLeft) {
  const ScopedTmpdir tmpdir;
  const auto result = run_ranks(
      3,
      [](RankContext& ctx) {
        if (ctx.rank == 1) ::raise(SIGKILL);
        std::vector<float> data(100, 1.0f);
        const auto start = Clock::now();
        try {
          ctx.comm->all_reduce(data.data(), data.data(), data.size(), DType::f32);
          expect_rank(false, "the all-reduce completed without rank 1");
        } catch (const PeerLostError& error) {
          std::printf("rank %d: PeerLostError after %ld ms: %s\n", ctx.rank, elapsed_ms(start),
                      error.what());
          expect_rank(error.ranks() == std::vector<int>{1},
                      "ranks() should be {1}: ", error.what());
          expect_rank(std::string(error.what()).find("rank 1") != std::string::npos,
                      "not named: ", error.what());
        }
        return 0;
      },
      5s);
  ASSERT_EQ(result.ranks.size(), 3u);
  EXPECT_EQ(result.ranks[1].signal, SIGKILL);
  EXPECT_TRUE(result.ranks[0].ok() && result.ranks[2].ok()) << result.describe_failures();
  ASSERT_EQ(result.segments.size(), 1u);
  EXPECT_TRUE(test::segments_gone(result));
  EXPECT_TRUE(result.reclaimed_segments.empty()) << "setup should have unlinked the segment itself";
  EXPECT_TRUE(std::filesystem::is_empty(tmpdir.path())) << "the launcher left its store directory";
}

TEST(ShmFailures, AbortFromAnotherThreadWakesEveryRank) {
  const auto result = run_ranks(
      3,
      [](RankContext& ctx) {
        auto expect_aborted_by_0 = [&](const AbortedError& error) {
          const std::string what = error.what();
          expect_rank(error.ranks() == std::vector<int>{0}, "ranks() should be {0}: ", what);
          expect_rank(what.find("rank 0") != std::string::npos &&
                          what.find("stop requested") != std::string::npos,
                      "message lacks the rank or the reason: ", what);
        };
        std::thread aborter;
        if (ctx.rank == 0) {
          aborter = std::thread([&] {
            std::this_thread::sleep_for(100ms);
            ctx.comm->abort("stop requested");
          });
        }
        if (ctx.rank == 1) std::this_thread::sleep_for(300ms);  // arrives after the abort
        float value = 1.0f;
        const auto start = Clock::now();
        try {
          // Rank 1 is late: ranks 0 and 2 are waiting when the abort lands.
          ctx.comm->all_reduce(&value, &value, 1, DType::f32);
          if (ctx.rank != 1) expect_rank(false, "the all-reduce completed despite the abort");
        } catch (const AbortedError& error) {
          std::printf("rank %d: AbortedError after %ld ms: %s\n", ctx.rank, elapsed_ms(start),
                      error.what());
          expect_aborted_by_0(error);
        }
        if (aborter.joinable()) aborter.join();
        return 0;
      },
      20s);
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// ---- the segment ------------------------------------------------------------------

// Ranks as threads of this process, so the test can look at the segment
// between rank 0 creating it and rank 1 attaching.
TEST(ShmSegment, IsPrivateWhileItExistsAndGoneOnceAllAttached) {
  const std::filesystem::path dir = FileStore::make_private_dir();
  FileStore store(dir);
  ShmOptions options;
  options.timeout = 10s;
  std::shared_ptr<Communicator> rank0;
  std::exception_ptr rank0_error;
  std::thread creator([&] {
    try {
      rank0 = create_shm_communicator(store, 0, 2, options);
    } catch (...) {
      rank0_error = std::current_exception();
    }
  });
  const std::string name = store.get(shm::kSegmentKey, 10s);
  EXPECT_TRUE(std::regex_match(name, std::regex("/tpfuse-[0-9a-f]{32}"))) << name;
  const int fd = ::shm_open(name.c_str(), O_RDONLY, 0);
  EXPECT_GE(fd, 0) << "the segment should exist until every rank attached";
  if (fd >= 0) {
    struct stat info {};
    EXPECT_EQ(::fstat(fd, &info), 0);
    EXPECT_EQ(info.st_mode & 0777, 0600u);
    EXPECT_EQ(info.st_uid, ::geteuid());
    EXPECT_GT(info.st_size, 2 * 4096);
    ::close(fd);
  }
  auto rank1 = create_shm_communicator(store, 1, 2, options);
  creator.join();
  ASSERT_FALSE(rank0_error);
  EXPECT_FALSE(shm_name_exists(name)) << "the segment outlived setup";
  EXPECT_EQ(rank0->name(), rank1->name());

  float value0 = 1.0f, value1 = 2.0f;
  std::thread peer([&] { rank0->all_reduce(&value0, &value0, 1, DType::f32); });
  rank1->all_reduce(&value1, &value1, 1, DType::f32);
  peer.join();
  EXPECT_EQ(value0, 3.0f);
  EXPECT_EQ(value1, 3.0f);
  std::filesystem::remove_all(dir);
}

TEST(ShmSegment, FailedSetupUnlinksIt) {
  const std::filesystem::path dir = FileStore::make_private_dir();
  FileStore store(dir);
  ShmOptions options;
  options.timeout = 300ms;
  std::exception_ptr rank0_error;
  std::thread creator([&] {
    try {
      create_shm_communicator(store, 0, 2, options);
    } catch (...) {
      rank0_error = std::current_exception();
    }
  });
  const std::string name = store.get(shm::kSegmentKey, 10s);
  try {
    create_shm_communicator(store, 1, 3, options);
    ADD_FAILURE() << "a rank with another world size attached";
  } catch (const InvalidArgument& error) {
    EXPECT_NE(std::string(error.what()).find("world size 3"), std::string::npos) << error.what();
  }
  creator.join();
  ASSERT_TRUE(rank0_error);
  try {
    std::rethrow_exception(rank0_error);
  } catch (const TimeoutError& error) {
    EXPECT_EQ(error.ranks(), std::vector<int>{1}) << error.what();
  }
  EXPECT_FALSE(shm_name_exists(name)) << "rank 0 left the segment after a failed setup";
  std::filesystem::remove_all(dir);
}

// ---- registry ----------------------------------------------------------------------

class NamedCommunicator final : public Communicator {
 public:
  explicit NamedCommunicator(std::string name) : name_(std::move(name)) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  std::string transport() const override { return "test"; }
  std::chrono::milliseconds timeout() const override { return 1s; }
  std::size_t max_gather_bytes() const override { return 0; }
  void abort(std::string_view) override {}

 protected:
  std::unique_ptr<Work> do_all_reduce_start(const void*, void*, std::size_t, DType) override {
    return nullptr;
  }
  std::vector<std::string> do_all_gather(std::string_view mine) override {
    return {std::string(mine)};
  }

 private:
  std::string name_;
};

TEST(Registry, RegistersFindsAndRejects) {
  auto a = std::make_shared<NamedCommunicator>("registry-test-a");
  auto b = std::make_shared<NamedCommunicator>("registry-test-b");
  EXPECT_EQ(register_communicator(a), "registry-test-a");
  EXPECT_EQ(register_communicator(b), "registry-test-b");
  EXPECT_EQ(find_communicator("registry-test-a"), a);
  EXPECT_EQ(find_communicator("registry-test-b"), b);
  try {
    find_communicator("x");
    ADD_FAILURE() << "found a communicator never registered";
  } catch (const InvalidArgument& error) {
    const std::string what = error.what();
    EXPECT_NE(what.find("hcom: no communicator named \"x\" in this process (known: "),
              std::string::npos)
        << what;
    EXPECT_NE(what.find("registry-test-a, registry-test-b"), std::string::npos) << what;
  }
  try {
    register_communicator(std::make_shared<NamedCommunicator>("registry-test-a"));
    ADD_FAILURE() << "registered a name twice";
  } catch (const InvalidArgument& error) {
    EXPECT_NE(std::string(error.what()).find("already registered"), std::string::npos)
        << error.what();
  }
  EXPECT_EQ(find_communicator("registry-test-a"), a) << "a failed registration replaced the first";
  unregister_communicator("registry-test-a");
  unregister_communicator("registry-test-b");
  unregister_communicator("registry-test-b");  // absent: no-op
  EXPECT_THROW(find_communicator("registry-test-a"), InvalidArgument);
}

// ---- file store --------------------------------------------------------------------

TEST(FileStore, SetGetTimeoutAndPrivacy) {
  const ScopedTmpdir tmpdir;
  const std::filesystem::path dir = FileStore::make_private_dir();
  EXPECT_EQ(dir.parent_path(), tmpdir.path());
  EXPECT_EQ(dir.filename().string().rfind("tpfuse-store-", 0), 0u) << dir;
  struct stat info {};
  ASSERT_EQ(::stat(dir.c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0700u);

  FileStore store(dir);
  const std::string binary("a\0b\nc", 5);
  store.set("segment", binary);
  EXPECT_EQ(store.get("segment", 1s), binary);
  store.set("segment", "second");
  EXPECT_EQ(*store.try_get("segment"), "second");
  EXPECT_FALSE(store.try_get("missing").has_value());
  ASSERT_EQ(::stat((dir / "segment").c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0600u);

  const auto start = Clock::now();
  try {
    store.get("never-set", 100ms);
    ADD_FAILURE() << "get returned a key never set";
  } catch (const TimeoutError& error) {
    EXPECT_NE(std::string(error.what()).find("\"never-set\""), std::string::npos) << error.what();
  }
  EXPECT_GE(Clock::now() - start, 100ms);

  std::thread late_writer([&] {
    std::this_thread::sleep_for(50ms);
    store.set("late", "value");
  });
  EXPECT_EQ(store.get("late", 5s), "value");
  late_writer.join();

  for (const char* bad : {"", "a/b", ".hidden", "../x"}) {
    EXPECT_THROW(store.set(bad, "v"), InvalidArgument) << bad;
    EXPECT_THROW(store.try_get(bad), InvalidArgument) << bad;
  }
  PrefixStore prefixed("group.", store);
  prefixed.set("key", "p");
  EXPECT_EQ(*store.try_get("group.key"), "p");
  EXPECT_EQ(prefixed.get("key", 1s), "p");
  EXPECT_THROW(FileStore(dir / "missing"), InvalidArgument);
  std::filesystem::remove_all(dir);
}

// ---- oversubscription ----------------------------------------------------------------

// 8 ranks on a 2-core machine: the waits must yield and sleep rather than
// spin, or this takes seconds per call. Prints the time; no threshold.
TEST(ShmScaling, EightRanksDoManySmallAllReduces) {
  constexpr int kCalls = 300;
  const auto result = run_ranks(
      8,
      [](RankContext& ctx) {
        std::vector<float> data(256);
        ctx.comm->barrier();
        const auto start = Clock::now();
        for (int call = 0; call < kCalls; ++call) {
          std::fill(data.begin(), data.end(), static_cast<float>(ctx.rank + call));
          ctx.comm->all_reduce(data.data(), data.data(), data.size(), DType::f32);
          // 0 + 1 + ... + 7 + 8 * call
          expect_rank(data[0] == static_cast<float>(28 + 8 * call), "call ", call, ": got ",
                      data[0]);
        }
        if (ctx.rank == 0) {
          const long ms = elapsed_ms(start);
          std::printf(
              "8 ranks x %d all-reduces of 256 f32: %ld ms (%.1f us per call) on %u cores\n",
              kCalls, ms, 1000.0 * static_cast<double>(ms) / kCalls,
              std::thread::hardware_concurrency());
        }
        return 0;
      },
      60s);
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

}  // namespace
}  // namespace tpfuse::comm
