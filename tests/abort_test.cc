// Waking every rank at once: an abort from another thread inside a pipelined
// call, and a rank that finds the segment already removed because setup
// failed on rank 0 (both found by the fault-injection trials, faults_test.cc).
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "core/fault_hooks.h"
#include "fault_report.h"
#include "ops/test_hooks.h"
#include "rank_harness.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse {
namespace {

using namespace std::chrono_literals;
using test::comm_error_type;
using test::copy_text;
using test::names_rank;
using test::shared_page;
using test::steady_ns;
using test_hooks::FaultPoint;
using testing::CaseSpec;

struct AbortPage {
  std::atomic<std::int64_t> abort_ns;
  std::atomic<std::int64_t> stall_end_ns;
  std::int64_t error_ns[3];
  char error_type[3][24];
  char message[3][640];
};

class AbortInsidePipeline : public ::testing::TestWithParam<const char*> {};

// Rank 2 stalls between two tiles of a pipelined call, so ranks 0 and 1 wait
// for it inside the pipeline (in the transport, or in the helper thread);
// a thread of rank 0 aborts the communicator. Ranks 0 and 1 must wake at
// once, far from the 20 s deadline, and rank 2 as soon as it calls into the
// transport again; every rank's error names rank 0 and the reason.
TEST_P(AbortInsidePipeline, WakesEveryRankAtOnce) {
  const char* progress = GetParam();
  AbortPage& page = shared_page<AbortPage>();
  const auto result = test::run_ranks(
      3,
      [&](comm::RankContext& ctx) {
        ::setenv("TPFUSE_PIPELINE_PROGRESS", progress, 1);
        if (ctx.rank == 2) {
          test_hooks::set_after_tile_computed([&](std::int64_t tile) {
            if (tile != 1) return;
            std::this_thread::sleep_for(1500ms);
            page.stall_end_ns = steady_ns();
          });
        }
        std::thread aborter;
        if (ctx.rank == 0) {
          aborter = std::thread([&] {
            std::this_thread::sleep_for(300ms);
            page.abort_ns = steady_ns();
            ctx.comm->abort("stop requested");
          });
        }
        CaseSpec spec;
        spec.m = 64;
        spec.n = 32;
        spec.comm_turn = 4;
        const auto inputs = testing::make_rank_inputs(spec, ctx.rank);
        try {
          mm_all_reduce_base(inputs.args.x1, inputs.args.x2, ctx.comm->name(), inputs.args.options);
          copy_text(page.error_type[ctx.rank], sizeof page.error_type[ctx.rank], "none");
        } catch (const std::exception& error) {
          page.error_ns[ctx.rank] = steady_ns();
          const auto* comm_error = dynamic_cast<const CommError*>(&error);
          copy_text(page.error_type[ctx.rank], sizeof page.error_type[ctx.rank],
                    comm_error != nullptr ? comm_error_type(*comm_error) : "other");
          copy_text(page.message[ctx.rank], sizeof page.message[ctx.rank], error.what());
        }
        if (aborter.joinable()) aborter.join();
        return 0;
      },
      20s);
  ASSERT_TRUE(result.ok()) << result.describe_failures();
  ASSERT_NE(page.abort_ns.load(), 0);
  ASSERT_NE(page.stall_end_ns.load(), 0);
  for (int r = 0; r < 3; ++r) {
    const std::string what = page.message[r];
    EXPECT_EQ(std::string(page.error_type[r]), "AbortedError") << "rank " << r << ": " << what;
    EXPECT_TRUE(names_rank(what, 0) && what.find("stop requested") != std::string::npos)
        << "rank " << r << ": " << what;
    // Ranks 0 and 1 were waiting when the abort came; rank 2 was stalled.
    const std::int64_t woken_at = r == 2 ? page.stall_end_ns.load() : page.abort_ns.load();
    const double ms = static_cast<double>(page.error_ns[r] - woken_at) / 1e6;
    std::printf("%s: rank %d failed %.1f ms after %s\n", progress, r, ms,
                r == 2 ? "its stall ended" : "the abort");
    EXPECT_GE(ms, 0.0) << "rank " << r << " failed before the abort: " << what;
    EXPECT_LT(ms, 500.0) << "rank " << r << " was not woken at once";
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, AbortInsidePipeline,
                         ::testing::Values("interleaved", "helper_thread"),
                         [](const auto& info) { return std::string(info.param); });

// Rank 1 dies while it waits for the segment's name, so rank 0 gives up on
// setup and removes the segment; rank 2 reads the name only after that (its
// wait is held). It used to fail with "shm_open: No such file or directory";
// it must report what rank 0 found, rank 1 lost, as rank 0 does.
struct SetupPage {
  char error_type[3][24];
  char message[3][640];
};

int g_setup_rank = -1;

void kill_rank_1_and_hold_rank_2(FaultPoint point) {
  static bool held = false;
  if (g_setup_rank == 0 && point == FaultPoint::setup) std::this_thread::sleep_for(100ms);
  if (g_setup_rank == 1 && point == FaultPoint::wait) ::raise(SIGKILL);
  if (g_setup_rank == 2 && point == FaultPoint::wait && !held) {
    held = true;
    std::this_thread::sleep_for(1s);
  }
}

TEST(SetupFailure, RankFindingTheSegmentRemovedReportsRankZerosVerdict) {
  SetupPage& page = shared_page<SetupPage>();
  test_hooks::set_fault_hook(kill_rank_1_and_hold_rank_2);
  const auto result = test::run_ranks(3, [&](comm::RankContext& ctx) {
    g_setup_rank = ctx.rank;
    comm::FileStore store(std::getenv("TPFUSE_STORE_DIR"));
    comm::PrefixStore second_group("second.", store);
    comm::ShmOptions options;
    options.timeout = 20s;
    try {
      comm::create_shm_communicator(second_group, ctx.rank, ctx.size, options);
      copy_text(page.error_type[ctx.rank], sizeof page.error_type[ctx.rank], "none");
    } catch (const CommError& error) {
      copy_text(page.error_type[ctx.rank], sizeof page.error_type[ctx.rank],
                comm_error_type(error));
      copy_text(page.message[ctx.rank], sizeof page.message[ctx.rank], error.what());
    }
    return 0;
  });
  test_hooks::set_fault_hook(nullptr);
  ASSERT_EQ(result.ranks.size(), 3u);
  EXPECT_EQ(result.ranks[1].signal, SIGKILL);
  for (int r : {0, 2}) {
    EXPECT_TRUE(result.ranks[static_cast<std::size_t>(r)].ok()) << result.describe_failures();
    EXPECT_EQ(std::string(page.error_type[r]), "PeerLostError") << "rank " << r << ": "
                                                               << page.message[r];
    EXPECT_TRUE(names_rank(page.message[r], 1)) << "rank " << r << ": " << page.message[r];
  }
  EXPECT_TRUE(test::segments_gone(result));
}

}  // namespace
}  // namespace tpfuse
