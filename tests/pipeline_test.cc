// The executor across local ranks: every schedule shape the planner can
// produce gives bitwise the single-tile result, in both progress modes and
// through the transport's buffers or its copy path; a rank that stalls
// between tiles delays the others without corrupting them; a rank that dies
// or fails mid-pipeline makes the others fail within the deadline; and the
// other operators' schedules give, in both modes, the bytes their contract
// pins.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/fault_hooks.h"
#include "family_cases.h"
#include "fault_report.h"
#include "ops/test_hooks.h"
#include "pipeline/executor.h"
#include "rank_harness.h"
#include "tpfuse/ops/gemm_operands.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/ops/validate.h"
#include "tpfuse/pipeline/plan.h"
#include "tpfuse/testing/golden.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse {
namespace {

using namespace std::chrono_literals;
using pipeline::ProgressMode;
using pipeline::TilePlan;
using test::expect_rank;
using testing::CaseSpec;

const char* mode_label(ProgressMode mode) {
  return mode == ProgressMode::interleaved ? "interleaved" : "helper_thread";
}

comm::LaunchResult launch(int ranks, std::size_t slot_bytes,
                          const std::function<int(comm::RankContext&)>& body,
                          std::chrono::milliseconds timeout = 30s) {
  comm::LaunchOptions options;
  options.ranks = ranks;
  options.shm.timeout = timeout;
  options.shm.slot_bytes = slot_bytes;
  return comm::launch_local(options, body);
}

// One rank's prepared GEMM for a spec, and its output.
struct RankGemm {
  RankGemm(const CaseSpec& spec, int rank) : inputs(testing::make_rank_inputs(spec, rank)) {
    const CallShape shape = validate_call(inputs.args.x1, inputs.args.x2, inputs.args.options);
    gemm::GemmOperands operands =
        make_gemm_operands(shape, inputs.args.x1, inputs.args.x2, inputs.args.options);
    operands.threads = 1;
    gemm = gemm::prepare_gemm(operands);
    m = shape.m;
    n = shape.n;
    dtype = shape.out_dtype;
  }

  pipeline::TileJob job(comm::Communicator& comm, std::vector<std::byte>& out,
                        ProgressMode mode) const {
    pipeline::TileJob job;
    job.gemm = gemm.get();
    job.comm = &comm;
    job.n = n;
    job.dtype = dtype;
    job.out = out.data();
    job.progress = mode;
    return job;
  }

  std::vector<std::byte> run(const TilePlan& plan, comm::Communicator& comm, ProgressMode mode,
                             std::function<void(std::int64_t)> hook = {}) const {
    std::vector<std::byte> out(static_cast<std::size_t>(m * n) * dtype_size(dtype));
    pipeline::TileJob tiles = job(comm, out, mode);
    tiles.after_tile_computed = std::move(hook);
    pipeline::execute_plan(plan, tiles);
    return out;
  }

  testing::RankInputs inputs;
  std::unique_ptr<gemm::PreparedGemm> gemm;
  std::int64_t m = 0, n = 0;
  DType dtype = DType::f16;
};

TilePlan plan_of(std::vector<std::int64_t> rows, std::int64_t poll_rows) {
  TilePlan plan;
  plan.tile_rows = std::move(rows);
  plan.poll_rows = poll_rows;
  return plan;
}

// The plans make_plan produces for m under constants that favour each of its
// shapes, checked to be of that shape.
std::vector<std::pair<std::string, TilePlan>> planner_schedules(const pipeline::PlanRequest& base,
                                                                std::int64_t buffer_bytes) {
  pipeline::CostConstants constants;
  constants.gemm_flops = 1e9;
  constants.reduce_round_seconds = 1e-6;
  constants.reduce_seconds_per_byte = 1e-9;
  constants.copy_seconds_per_byte = 1e-9;
  constants.buffer_bytes = buffer_bytes;
  constants.max_in_flight = 3;
  std::vector<std::pair<std::string, TilePlan>> plans;
  pipeline::PlanRequest request = base;
  request.reduce_has_own_core = false;
  plans.emplace_back("planner, shared core", pipeline::make_plan(request, constants));
  request.reduce_has_own_core = true;
  plans.emplace_back("planner, own core, GEMM dominates", pipeline::make_plan(request, constants));
  constants.reduce_seconds_per_byte = 1e-6;
  plans.emplace_back("planner, own core, all-reduce dominates",
                     pipeline::make_plan(request, constants));
  return plans;
}

struct ScheduleCase {
  int ranks;
  ProgressMode mode;
};

class EverySchedule : public ::testing::TestWithParam<ScheduleCase> {};

// Hand-made schedules of every shape plus the planner's own, with buffers
// small enough that the larger tiles take the copy path: all the same bytes.
TEST_P(EverySchedule, GivesTheSingleTileBytes) {
  const auto [ranks, mode] = GetParam();
  constexpr std::size_t kSlotBytes = 512;  // 10 rows of f16 n = 24
  const auto result = launch(ranks, kSlotBytes, [mode = mode](comm::RankContext& ctx) {
    CaseSpec spec;
    spec.m = 37;
    spec.k = 40;
    spec.n = 24;
    spec.uneven_k = true;
    spec.bias = true;
    spec.x3 = true;
    const RankGemm rank(spec, ctx.rank);
    const auto reference = rank.run(plan_of({37}, 37), *ctx.comm, mode);
    std::vector<std::pair<std::string, TilePlan>> schedules = {
        {"equal tiles", plan_of({10, 9, 9, 9}, 3)},
        {"short tiles last", plan_of({10, 10, 10, 5, 2}, 4)},
        {"short tiles first", plan_of({1, 2, 4, 10, 10, 10}, 10)},
        {"one row per tile", plan_of(std::vector<std::int64_t>(37, 1), 1)},
        {"large tiles through the copy path", plan_of({20, 17}, 6)},
        {"mixed", plan_of({1, 15, 9, 12}, 5)},
    };
    pipeline::PlanRequest request;
    request.m = spec.m;
    request.n = spec.n;
    request.k = spec.k + ctx.size - 1;
    for (auto& planned : planner_schedules(request, kSlotBytes)) schedules.push_back(planned);
    for (std::int64_t turn = 1; turn <= spec.m; ++turn) {
      request.comm_turn = turn;
      schedules.emplace_back(cat("comm_turn ", turn),
                             pipeline::make_plan(request, {.gemm_flops = 1}));
    }
    for (const auto& [name, plan] : schedules) {
      const auto out = rank.run(plan, *ctx.comm, mode);
      expect_rank(out == reference, name, " (", plan.tile_rows.size(),
                  " tiles) changed the output");
    }
    const std::uint64_t hash = test::fnv1a(reference.data(), reference.size());
    const auto hashes =
        ctx.comm->all_gather(std::string_view(reinterpret_cast<const char*>(&hash), sizeof hash));
    for (const auto& other : hashes) expect_rank(other == hashes[0], "ranks differ");
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

INSTANTIATE_TEST_SUITE_P(RanksAndModes, EverySchedule,
                         ::testing::Values(ScheduleCase{1, ProgressMode::interleaved},
                                           ScheduleCase{2, ProgressMode::interleaved},
                                           ScheduleCase{3, ProgressMode::interleaved},
                                           ScheduleCase{8, ProgressMode::interleaved},
                                           ScheduleCase{2, ProgressMode::helper_thread},
                                           ScheduleCase{3, ProgressMode::helper_thread},
                                           ScheduleCase{8, ProgressMode::helper_thread}),
                         [](const auto& info) {
                           return cat("p", info.param.ranks, "_", mode_label(info.param.mode));
                         });

// ---- the executor's stages, each alone ----------------------------------

// A collective that completes after a number of test() calls, or at wait().
class CountdownWork final : public comm::Work {
 public:
  CountdownWork(int tests, std::function<void()> on_complete)
      : left_(tests), on_complete_(std::move(on_complete)) {}
  bool test() override {
    if (left_ > 0 && --left_ == 0) on_complete_();
    return left_ == 0;
  }
  void wait() override {
    if (left_ > 0) {
      left_ = 0;
      on_complete_();
    }
  }

 private:
  int left_;
  std::function<void()> on_complete_;
};

// Stages that record what ran, in order (the helper thread's finish
// included: the log is locked).
class RecordingStages final : public pipeline::TileStages {
 public:
  void begin() override { log("begin"); }
  void await_input(const pipeline::Tile& tile) override { log(cat("await ", tile.index)); }
  void produce(const pipeline::Tile& tile, const std::function<void()>& poll) override {
    log(cat("produce ", tile.index, " rows ", tile.m0, "-", tile.m1));
    for (int block = 0; block < 3; ++block) poll();
  }
  std::unique_ptr<comm::Work> communicate(const pipeline::Tile& tile) override {
    log(cat("communicate ", tile.index));
    if (tile.index == 2) return nullptr;  // a tile without a collective
    return std::make_unique<CountdownWork>(static_cast<int>(tile.index % 3) + 1,
                                           [this, t = tile.index] { log(cat("completed ", t)); });
  }
  void finish(const pipeline::Tile& tile) override { log(cat("finish ", tile.index)); }

  std::vector<std::string> events() {
    const std::lock_guard lock(mutex_);
    return events_;
  }

 private:
  void log(std::string event) {
    const std::lock_guard lock(mutex_);
    events_.push_back(std::move(event));
  }
  std::mutex mutex_;
  std::vector<std::string> events_;
};

std::size_t position(const std::vector<std::string>& events, const std::string& event) {
  return static_cast<std::size_t>(std::find(events.begin(), events.end(), event) - events.begin());
}

// Every tile: awaited, produced, then communicated; finished only once its
// collective completed, and in tile order; begin before all of it.
TEST(Executor, RunsEachTilesStagesInOrder) {
  for (ProgressMode mode : {ProgressMode::interleaved, ProgressMode::helper_thread}) {
    const auto result = launch(1, 4096, [mode](comm::RankContext& ctx) {
      RecordingStages stages;
      pipeline::execute(plan_of({4, 3, 5, 2, 6}, 0), stages, *ctx.comm, mode);
      const auto events = stages.events();
      expect_rank(!events.empty() && events[0] == "begin", "begin did not come first");
      std::size_t last_finish = 0;
      for (int t = 0; t < 5; ++t) {
        const std::size_t await = position(events, cat("await ", t));
        const std::size_t communicate = position(events, cat("communicate ", t));
        const std::size_t finish = position(events, cat("finish ", t));
        const auto produce = std::find_if(events.begin(), events.end(), [&](const auto& e) {
          return e.starts_with(cat("produce ", t, " "));
        });
        const std::size_t produced = static_cast<std::size_t>(produce - events.begin());
        expect_rank(await < produced && produced < communicate && communicate < finish &&
                        finish < events.size(),
                    mode_label(mode), ": tile ", t, "'s stages out of order");
        if (t != 2) {
          expect_rank(position(events, cat("completed ", t)) < finish, mode_label(mode), ": tile ",
                      t, " finished before its collective completed");
        }
        expect_rank(finish > last_finish, mode_label(mode), ": tile ", t, " finished out of order");
        last_finish = finish;
      }
      expect_rank(position(events, "produce 1 rows 4-7") < events.size(), "tile 1's rows");
      return 0;
    });
    EXPECT_TRUE(result.ok()) << result.describe_failures();
  }
}

// A stage that throws stops the pipeline, aborts the communicator (the peers
// would fail at once) and rethrows.
TEST(Executor, AFailingStageAbortsTheCommunicator) {
  const auto result = launch(1, 4096, [](comm::RankContext& ctx) {
    class Failing final : public pipeline::TileStages {
     public:
      void produce(const pipeline::Tile& tile, const std::function<void()>&) override {
        if (tile.index == 1) throw std::runtime_error("tile 1 cannot be produced");
      }
    } stages;
    try {
      pipeline::execute(plan_of({2, 2, 2}, 0), stages, *ctx.comm, ProgressMode::interleaved);
      expect_rank(false, "the failure was not rethrown");
    } catch (const std::runtime_error& error) {
      expect_rank(std::string(error.what()) == "tile 1 cannot be produced", error.what());
    }
    try {
      ctx.comm->barrier();
      expect_rank(false, "the communicator was not aborted");
    } catch (const AbortedError& error) {
      expect_rank(std::string(error.what()).find("tile 1 cannot be produced") != std::string::npos,
                  "the abort does not say why: ", error.what());
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// mm_all_reduce_base's stages on one tile alone (rows 11-20 of 37): those
// rows of the one-tile run, and no other row touched.
TEST(Executor, GemmAllReduceStagesRunAloneOnOneTile) {
  const auto result = launch(3, 4096, [](comm::RankContext& ctx) {
    CaseSpec spec;
    spec.m = 37;
    spec.k = 40;
    spec.n = 24;
    spec.bias = true;
    const RankGemm rank(spec, ctx.rank);
    const auto reference = rank.run(plan_of({37}, 37), *ctx.comm, ProgressMode::interleaved);
    std::vector<std::byte> out(reference.size(), std::byte{0x5a});
    const auto stages =
        pipeline::gemm_all_reduce_stages(rank.job(*ctx.comm, out, ProgressMode::interleaved), 4);
    const pipeline::Tile tile{0, 11, 21};
    int polls = 0;
    stages->produce(tile, [&polls] { ++polls; });
    expect_rank(polls == 3, "10 rows in blocks of at most 4 polled ", polls, " times, not 3");
    stages->communicate(tile)->wait();
    const std::size_t row = static_cast<std::size_t>(spec.n) * dtype_size(rank.dtype);
    for (std::size_t i = 0; i < out.size(); ++i) {
      const bool in_tile = i >= 11 * row && i < 21 * row;
      expect_rank(in_tile ? out[i] == reference[i] : out[i] == std::byte{0x5a}, "byte ", i,
                  in_tile ? " differs from the one-tile run" : " outside the tile was written");
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// The planner's schedules have the shapes the tests above rely on.
TEST(PlannerSchedules, CoverOneTileEqualTilesAndTwoLengths) {
  pipeline::PlanRequest request;
  request.m = 37;
  request.n = 24;
  request.k = 42;
  const auto plans = planner_schedules(request, 512);
  ASSERT_EQ(plans.size(), 3u);
  EXPECT_GT(plans[0].second.tile_rows.size(), 1u) << "the output does not fit one 512-byte buffer";
  for (const auto& [name, plan] : plans) {
    std::int64_t rows = 0;
    for (std::int64_t tile : plan.tile_rows) rows += tile;
    EXPECT_EQ(rows, 37) << name;
  }
}

class StalledRank : public ::testing::TestWithParam<std::tuple<int, ProgressMode>> {};

// Rank 1 sleeps after computing tile 1: the others wait for it (bounded by
// a deadline far longer than the stall) and everyone gets the right bytes.
TEST_P(StalledRank, DelaysButNeverCorruptsTheOthers) {
  const auto [ranks, mode] = GetParam();
  const auto result = launch(ranks, 1024, [mode = mode](comm::RankContext& ctx) {
    CaseSpec spec;
    spec.m = 48;
    spec.k = 64;
    spec.n = 32;
    spec.bias = true;
    const RankGemm rank(spec, ctx.rank);
    const TilePlan plan = plan_of({8, 8, 8, 8, 8, 8}, 4);
    const auto reference = rank.run(plan_of({48}, 48), *ctx.comm, mode);
    auto stall = [&](std::int64_t tile) {
      if (ctx.rank == 1 && tile == 1) std::this_thread::sleep_for(300ms);
    };
    const auto start = std::chrono::steady_clock::now();
    const auto out = rank.run(plan, *ctx.comm, mode, stall);
    const auto elapsed = std::chrono::steady_clock::now() - start;
    expect_rank(out == reference, "the stall changed the output");
    expect_rank(elapsed >= 250ms, "rank ", ctx.rank, " finished before the stalled rank");
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

INSTANTIATE_TEST_SUITE_P(RanksAndModes, StalledRank,
                         ::testing::Combine(::testing::Values(2, 4, 8),
                                            ::testing::Values(ProgressMode::interleaved,
                                                              ProgressMode::helper_thread)),
                         [](const auto& info) {
                           return cat("p", std::get<0>(info.param), "_",
                                      mode_label(std::get<1>(info.param)));
                         });

class FailingRank : public ::testing::TestWithParam<ProgressMode> {};

// Rank 2 is killed between tiles: the others fail within the deadline,
// naming it, and the job leaves nothing in /dev/shm.
TEST_P(FailingRank, KilledMidPipelineIsNamedWithinTheDeadline) {
  const ProgressMode mode = GetParam();
  const auto timeout = 3000ms;
  const auto result = launch(
      4, 1024,
      [&](comm::RankContext& ctx) {
        CaseSpec spec;
        spec.m = 64;
        spec.n = 32;
        const RankGemm rank(spec, ctx.rank);
        auto die = [&](std::int64_t tile) {
          if (ctx.rank == 2 && tile == 3) raise(SIGKILL);
        };
        const auto start = std::chrono::steady_clock::now();
        try {
          rank.run(plan_of({8, 8, 8, 8, 8, 8, 8, 8}, 4), *ctx.comm, mode, die);
        } catch (const CommError& e) {
          const auto elapsed = std::chrono::steady_clock::now() - start;
          expect_rank(elapsed < timeout + 1000ms, "failed too late");
          const std::string what = e.what();
          expect_rank(what.find("rank 2") != std::string::npos, "does not name rank 2: ", what);
          return 0;
        }
        expect_rank(false, "rank ", ctx.rank, " got no error");
        return 1;
      },
      timeout);
  ASSERT_EQ(result.ranks.size(), 4u);
  for (const auto& r : result.ranks) {
    if (r.rank == 2) {
      EXPECT_EQ(r.signal, SIGKILL);
    } else {
      EXPECT_TRUE(r.ok()) << result.describe_failures();
    }
  }
  EXPECT_TRUE(test::segments_gone(result));
}

// A GEMM that fails on one rank aborts the group: the others fail at once
// (well before the deadline), and the failing rank gets its own error.
TEST_P(FailingRank, LocalErrorAbortsThePeersAtOnce) {
  const ProgressMode mode = GetParam();
  const auto timeout = 20000ms;
  const auto result = launch(
      3, 1024,
      [&](comm::RankContext& ctx) {
        CaseSpec spec;
        spec.m = 40;
        spec.n = 16;
        const RankGemm rank(spec, ctx.rank);
        auto fail = [&](std::int64_t tile) {
          if (ctx.rank == 1 && tile == 2) throw std::runtime_error("disk on fire");
        };
        const auto start = std::chrono::steady_clock::now();
        try {
          rank.run(plan_of({8, 8, 8, 8, 8}, 8), *ctx.comm, mode, fail);
        } catch (const std::runtime_error& e) {
          const std::string what = e.what();
          expect_rank(std::chrono::steady_clock::now() - start < 5000ms, "failed too late");
          expect_rank(what.find("disk on fire") != std::string::npos, "unexpected error: ", what);
          if (ctx.rank != 1) {
            expect_rank(dynamic_cast<const AbortedError*>(&e) != nullptr, "not an abort: ", what);
            expect_rank(what.find("rank 1") != std::string::npos, "does not name rank 1: ", what);
          }
          return 0;
        }
        expect_rank(false, "rank ", ctx.rank, " got no error");
        return 1;
      },
      timeout);
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// Rank 1 fails inside the call's first round, where the others may complete
// it and go on to the call's tiles, and stays alive a while: they must not
// wait for it there. They used to, until its process ended or the deadline
// came (the round did not abort the group); they now fail at once, with its
// reason, and rank 1 gets its own error.
int g_round_rank = -1;

void fail_rank_1_in_its_first_reduce(test_hooks::FaultPoint point) {
  static bool failed = false;
  if (point == test_hooks::FaultPoint::reduce && g_round_rank == 1 && !failed) {
    failed = true;
    throw std::runtime_error("checksum unit on fire");
  }
}

TEST(FailingRank, ErrorInTheCallsFirstRoundAbortsThePeersAtOnce) {
  const auto timeout = 20000ms;
  test_hooks::set_fault_hook(fail_rank_1_in_its_first_reduce);
  const auto result = launch(
      3, 1024,
      [&](comm::RankContext& ctx) {
        g_round_rank = ctx.rank;
        comm::CallHeader header;
        header.digest = 42;
        float value = 1.0f;
        const auto start = std::chrono::steady_clock::now();
        try {
          expect_rank(!pipeline::checked_round(*ctx.comm, header), "the digests differ");
          ctx.comm->all_reduce(&value, &value, 1, DType::f32);
        } catch (const std::runtime_error& e) {
          const std::string what = e.what();
          expect_rank(std::chrono::steady_clock::now() - start < 5000ms, "failed too late: ", what);
          expect_rank(what.find("checksum unit on fire") != std::string::npos,
                      "unexpected error: ", what);
          if (ctx.rank != 1) {
            expect_rank(dynamic_cast<const AbortedError*>(&e) != nullptr, "not an abort: ", what);
            expect_rank(what.find("rank 1") != std::string::npos, "does not name rank 1: ", what);
          } else {
            std::this_thread::sleep_for(500ms);
          }
          return 0;
        }
        expect_rank(false, "rank ", ctx.rank, " got no error");
        return 1;
      },
      timeout);
  test_hooks::set_fault_hook(nullptr);
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

INSTANTIATE_TEST_SUITE_P(Modes, FailingRank,
                         ::testing::Values(ProgressMode::interleaved, ProgressMode::helper_thread),
                         [](const auto& info) { return std::string(mode_label(info.param)); });

// The operator runs the planner's schedule: comm_turn 0 and every forced
// tile count give the same bytes on every rank.
TEST(OperatorPlan, PlannedAndForcedTilingsAgree) {
  const auto result = launch(2, 256, [](comm::RankContext& ctx) {
    CaseSpec spec;
    spec.m = 33;
    spec.k = 48;
    spec.n = 16;
    spec.dtype = DType::bf16;
    spec.x3 = true;
    auto inputs = testing::make_rank_inputs(spec, ctx.rank);
    const Tensor planned =
        mm_all_reduce_base(inputs.args.x1, inputs.args.x2, ctx.comm->name(), inputs.args.options);
    for (std::int64_t turn = 1; turn <= spec.m + 1; ++turn) {
      auto options = inputs.args.options;
      options.comm_turn = turn;
      const Tensor forced =
          mm_all_reduce_base(inputs.args.x1, inputs.args.x2, ctx.comm->name(), options);
      expect_rank(std::memcmp(forced.data(), planned.data(), planned.nbytes()) == 0, "comm_turn ",
                  turn, " differs from the planned tiling");
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// ---- the family's schedules, in both progress modes ----------------------

// Small calls of the three other operators, of several tiles (across the
// all-gather's blocks and the reduce-scatter's shards) and of one.
const test::FamilyCase kFamily[] = {
    {.op = test::FamilyOp::all_gather_base_mm,
     .dtype = DType::f16,
     .m = 16,
     .k = 32,
     .n = 24,
     .bias = true,
     .comm_turn = 4,
     .seed = 21},
    {.op = test::FamilyOp::mm_reduce_scatter_base,
     .m = 48,
     .k = 32,
     .n = 24,
     .bias = true,
     .comm_turn = 4,
     .seed = 22},
    {.op = test::FamilyOp::add_rms_norm,
     .m = 48,
     .k = 32,
     .n = 32,
     .batch = 2,
     .bias = true,
     .comm_turn = 3,
     .seed = 23},
    {.op = test::FamilyOp::add_rms_norm,
     .dtype = DType::f16,
     .m = 4,
     .k = 32,
     .n = 64,
     .batch = 4,
     .comm_turn = 1,
     .seed = 24},
};
constexpr int kFamilyRanks = 3;
constexpr int kFamilyCases = static_cast<int>(std::size(kFamily));

// Checks one rank's outputs of `c` against what the contract pins exactly:
// the gathered rows, and the reduce-scatter's and add-RMSNorm's outputs
// from mm_all_reduce_base's on the same inputs; the all-gather's product
// against the golden model.
void check_family_outputs(const test::FamilyCase& c, const test::FamilyInputs& in,
                          const std::vector<Tensor>& out, comm::RankContext& ctx) {
  const std::string name = ctx.comm->name();
  if (c.op == test::FamilyOp::all_gather_base_mm) {
    expect_rank(test::bytes_of(out[1]) == test::gathered_x1(c, ctx.size),
                "gather_out is not every rank's x1 in rank order");
    testing::RankArgs args{out[1].view(), in.x2.view(), {}};
    args.options.bias = in.bias.view();
    const auto cmp = testing::compare(out[0], testing::golden_mm_all_reduce({&args, 1}));
    expect_rank(cmp.ok(), "all-gather output: ", cmp.mismatches, " elements beyond the bound");
    return;
  }
  test::FamilyCase base = c;
  base.op = test::FamilyOp::mm_all_reduce_base;
  const Tensor reduced = std::move(test::run_family_case(base, in, name, ctx.size)[0]);
  if (c.op == test::FamilyOp::mm_reduce_scatter_base) {
    expect_rank(test::bytes_of(out) == test::reduce_scatter_rows(reduced, ctx.rank, ctx.size),
                "the reduce-scatter's rows differ from mm_all_reduce_base's");
  } else {
    expect_rank(test::bytes_of(out) == test::add_rms_norm_of(c, in, reduced),
                "add-RMSNorm differs from the step on mm_all_reduce_base's output");
  }
}

struct FamilyHashes {
  std::uint64_t hashes[kFamilyRanks][kFamilyCases];
};

// The tiles' collectives advanced by the GEMM's thread, then by a helper
// thread (which then runs add-RMSNorm's step too): each output is the one
// the contract pins, and both modes give the same bytes. Built under
// ThreadSanitizer too, for the helper thread's sake. A one-tile call runs in
// one round once its ranks have agreed on it.
TEST(FamilyOperators, BothProgressModesGiveThePinnedBytes) {
  std::vector<std::vector<std::uint64_t>> by_mode;
  for (ProgressMode mode : {ProgressMode::interleaved, ProgressMode::helper_thread}) {
    SCOPED_TRACE(mode_label(mode));
    FamilyHashes& page = test::shared_page<FamilyHashes>();
    const auto result = launch(kFamilyRanks, 4096, [&](comm::RankContext& ctx) {
      ::setenv("TPFUSE_PIPELINE_PROGRESS", mode_label(mode), 1);
      std::vector<test_hooks::Agreement> agreements;
      test_hooks::set_after_agreement(
          [&](test_hooks::Agreement outcome) { agreements.push_back(outcome); });
      for (int i = 0; i < kFamilyCases; ++i) {
        const test::FamilyCase& c = kFamily[i];
        const test::FamilyInputs in = test::family_inputs(c, ctx.rank);
        const auto out = test::run_family_case(c, in, ctx.comm->name(), ctx.size);
        check_family_outputs(c, in, out, ctx);
        const auto bytes = test::bytes_of(out);
        page.hashes[ctx.rank][i] = test::fnv1a(bytes.data(), bytes.size());
        if (c.comm_turn == 1) {
          agreements.clear();
          const auto again = test::run_family_case(c, in, ctx.comm->name(), ctx.size);
          expect_rank(test::bytes_of(again) == bytes, "the one-round call gave other bytes");
          expect_rank(agreements == std::vector{test_hooks::Agreement::in_first_round},
                      "the one-tile call did not run in its first round");
        }
      }
      test_hooks::set_after_agreement({});
      return 0;
    });
    ASSERT_TRUE(result.ok()) << result.describe_failures();
    by_mode.emplace_back(&page.hashes[0][0], &page.hashes[0][0] + kFamilyRanks * kFamilyCases);
  }
  EXPECT_EQ(by_mode[0], by_mode[1]) << "the progress modes gave different bytes";
}

}  // namespace
}  // namespace tpfuse
