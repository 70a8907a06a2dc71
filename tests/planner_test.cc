// The planner as the pure function it is: given a call and constants, the
// schedule it picks, and that the schedule is always well formed.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <string>

#include "tpfuse/core/error.h"
#include "tpfuse/pipeline/plan.h"

namespace tpfuse::pipeline {
namespace {

// A 2-rank f16 layer of M=4096, N=8192 on a machine of round figures:
// 100 GFLOP/s, 10 GB/s for a tile's reduce from the buffer and as much for
// the copy-in, 10 us per round, buffers of 4 MiB, 3 in flight; and a pass
// over an fp32 weight at 20 GB/s in every GEMM call.
PlanRequest ascend_request(std::int64_t k) {
  PlanRequest request;
  request.m = 4096;
  request.n = 8192;
  request.k = k;
  return request;
}

CostConstants round_constants(const PlanRequest& request) {
  CostConstants constants;
  constants.gemm_flops = 100e9;
  constants.gemm_pass_seconds = static_cast<double>(request.n * request.k) * 4 / 20e9;
  constants.reduce_round_seconds = 10e-6;
  constants.reduce_seconds_per_byte = 1.0 / 10e9;
  constants.copy_seconds_per_byte = 1.0 / 10e9;
  constants.buffer_bytes = 4 << 20;
  constants.max_in_flight = 3;
  return constants;
}

// Constants for a reduce bound by a slow link (1 GB/s), across hosts: a
// share of the CPU of `cpu_share`, buffers that hold the whole output.
CostConstants link_constants(const PlanRequest& request, double cpu_share) {
  CostConstants constants = round_constants(request);
  constants.reduce_seconds_per_byte = 1.0 / 1e9;
  constants.reduce_cpu_share = cpu_share;
  constants.buffer_bytes = 64 << 20;
  return constants;
}

// One all-reduce of the whole f16 output under `constants`.
double whole_all_reduce_seconds(const PlanRequest& request, const CostConstants& constants) {
  const double bytes = static_cast<double>(request.m * request.n * 2);
  return constants.reduce_round_seconds + bytes * constants.reduce_seconds_per_byte;
}

std::int64_t total_rows(const TilePlan& plan) {
  return std::accumulate(plan.tile_rows.begin(), plan.tile_rows.end(), std::int64_t{0});
}

void expect_well_formed(const PlanRequest& request, const TilePlan& plan) {
  ASSERT_FALSE(plan.tile_rows.empty());
  EXPECT_EQ(total_rows(plan), request.m);
  for (std::int64_t rows : plan.tile_rows) EXPECT_GE(rows, 1);
  EXPECT_GE(plan.poll_rows, 1);
  EXPECT_GT(plan.predicted_seconds, 0);
  EXPECT_GT(plan.predicted_serial_seconds, 0);
  EXPECT_FALSE(plan.reason.empty());
}

bool fits(const PlanRequest& request, const CostConstants& constants, std::int64_t rows) {
  return rows * request.n * 2 <= constants.buffer_bytes;
}

TEST(Planner, CommTurnForcesThatManyEqualTiles) {
  PlanRequest request;
  request.m = 37;
  request.n = 24;
  request.k = 40;
  for (std::int64_t turn = 1; turn <= 40; ++turn) {
    request.comm_turn = turn;
    const TilePlan plan = make_plan(request, round_constants(request));
    expect_well_formed(request, plan);
    EXPECT_EQ(static_cast<std::int64_t>(plan.tile_rows.size()), std::min<std::int64_t>(turn, 37));
    const auto [shortest, longest] =
        std::minmax_element(plan.tile_rows.begin(), plan.tile_rows.end());
    EXPECT_LE(*longest - *shortest, 1) << "comm_turn " << turn;
    EXPECT_NE(plan.reason.find("comm_turn"), std::string::npos) << plan.reason;
  }
}

// The operator plans a forced schedule with placeholder constants (it
// measures nothing for it): the same tiles, and each in one GEMM call.
TEST(Planner, ForcedTilesAreComputedInOneCallWhateverTheConstants) {
  PlanRequest request;
  request.m = 256;
  request.n = 4096;
  request.k = 640;
  request.comm_turn = 16;
  const TilePlan placeholder = make_plan(request, {.gemm_flops = 1});
  const TilePlan measured = make_plan(request, round_constants(request));
  EXPECT_EQ(placeholder.tile_rows, measured.tile_rows);
  for (const TilePlan& plan : {placeholder, measured}) {
    EXPECT_EQ(plan.poll_rows, *std::max_element(plan.tile_rows.begin(), plan.tile_rows.end()));
  }
}

TEST(Planner, OneTileWhenTheOutputIsTooSmallToSplit) {
  PlanRequest request;
  request.m = 16;
  request.n = 4096;
  request.k = 4096;
  for (bool own_core : {false, true}) {
    request.reduce_has_own_core = own_core;
    const TilePlan plan = make_plan(request, round_constants(request));
    expect_well_formed(request, plan);
    EXPECT_EQ(plan.tile_rows.size(), 1u) << "own core: " << own_core;
    EXPECT_NE(plan.reason.find("cannot pay"), std::string::npos) << plan.reason;
  }
}

// Taking turns with the GEMM, a split only saves the copy into the
// transport: the fewest tiles that fit the buffers where that copy is a
// significant part of the call, else one GEMM call, copied in.
TEST(Planner, SharedCoreSplitsOnlyToSaveASignificantCopy) {
  for (std::int64_t k : {128, 2048}) {
    const PlanRequest request = ascend_request(k);
    const CostConstants constants = round_constants(request);
    const TilePlan plan = make_plan(request, constants);
    expect_well_formed(request, plan);
    if (k == 128) {  // the copy of 64 MiB: 8% of the call
      EXPECT_EQ(plan.tile_rows.size(), 16u) << "64 MiB in 4 MiB buffers";
      for (std::int64_t rows : plan.tile_rows) EXPECT_TRUE(fits(request, constants, rows));
    } else {  // 0.5% of it
      EXPECT_EQ(plan.tile_rows.size(), 1u) << plan.reason;
      EXPECT_NE(plan.reason.find("copied"), std::string::npos) << plan.reason;
    }
  }
  PlanRequest small = ascend_request(128);
  small.m = 200;  // 3.1 MiB: one buffer
  const TilePlan plan = make_plan(small, round_constants(small));
  EXPECT_EQ(plan.tile_rows.size(), 1u) << plan.reason;
}

// Taking turns with the GEMM but spending little CPU on the reduce (MPI
// across hosts: the bytes are on the wire), the reduce overlaps the GEMM as
// on a core of its own: more tiles than fit the buffers alone, and a
// prediction well under serial. As the share grows, the gain shrinks.
TEST(Planner, SharedCoreHidesAReduceThatWaitsOnTheWire) {
  PlanRequest request = ascend_request(128);  // GEMM 86 ms, reduce 67 ms
  // One tile would fit the buffers: only the model splits.
  CostConstants constants = link_constants(request, 0);
  double previous_gain = 1e9;
  for (double share : {0.0, 0.1, 0.5, 1.0}) {
    constants.reduce_cpu_share = share;
    const TilePlan plan = make_plan(request, constants);
    expect_well_formed(request, plan);
    const double gain = plan.predicted_serial_seconds - plan.predicted_seconds;
    EXPECT_LT(gain, previous_gain) << "share " << share;
    previous_gain = gain;
    if (share <= 0.1) {
      EXPECT_GT(plan.tile_rows.size(), 1u) << "share " << share << ": " << plan.reason;
      EXPECT_LT(plan.predicted_seconds, 0.8 * plan.predicted_serial_seconds) << "share " << share;
    }
    if (share == 1.0) EXPECT_EQ(plan.tile_rows.size(), 1u) << plan.reason;
  }
}

// Where the reduces of a call take turns on one link (or one memory) for
// all of their time (reduce_overlap 0), however the output is cut and
// whatever share of a reduce the CPU takes, a call lasts at least its whole
// all-reduce: when communication dominates, no schedule may promise to beat
// it.
TEST(Planner, NoScheduleIsFasterThanItsAllReduce) {
  PlanRequest request = ascend_request(8);  // GEMM 5 ms, reduce 67 ms
  CostConstants constants = link_constants(request, 0);
  const double all_reduce = whole_all_reduce_seconds(request, constants);
  for (double share : {0.0, 0.25, 0.5, 0.75, 1.0}) {
    constants.reduce_cpu_share = share;
    const TilePlan plan = make_plan(request, constants);
    expect_well_formed(request, plan);
    EXPECT_GE(plan.predicted_seconds, all_reduce) << "share " << share << ": " << plan.reason;
    if (share == 0.0) EXPECT_GT(plan.tile_rows.size(), 1u) << plan.reason;
  }
}

// Where a reduce leaves the link idle part of its time (reduce_overlap, as
// across hosts, where it also waits for its peers' steps), reduces in flight
// together share that part: tiles then beat one all-reduce, but never its
// time on the link.
TEST(Planner, ReducesInFlightShareWhatTheyLeaveIdle) {
  PlanRequest request = ascend_request(8);  // GEMM 5 ms, reduce 67 ms
  CostConstants constants = link_constants(request, 0);
  const double all_reduce = whole_all_reduce_seconds(request, constants);
  double previous = 1e9;
  for (double overlap : {0.0, 0.25, 0.5}) {
    constants.reduce_overlap = overlap;
    const TilePlan plan = make_plan(request, constants);
    expect_well_formed(request, plan);
    EXPECT_GE(plan.predicted_seconds, (1.0 - overlap) * all_reduce) << "overlap " << overlap;
    EXPECT_LT(plan.predicted_seconds, previous) << "overlap " << overlap;
    previous = plan.predicted_seconds;
    if (overlap > 0) {
      EXPECT_LT(plan.predicted_seconds, all_reduce) << "overlap " << overlap << ": " << plan.reason;
      EXPECT_GT(plan.tile_rows.size(), 1u) << plan.reason;
    }
  }
}

// Each GEMM call's fixed cost (the weight read again) is charged to every
// tile: the dearer a call, the fewer tiles, down to one when a call costs
// more than the whole reduce that splitting could hide.
TEST(Planner, DearerCallsMeanFewerTiles) {
  PlanRequest request = ascend_request(128);  // GEMM 86 ms, reduce 67 ms
  CostConstants constants = link_constants(request, 0);
  std::size_t previous_tiles = SIZE_MAX;
  for (double call_seconds : {0.0, 1e-3, 5e-3, 0.1}) {
    constants.gemm_call_seconds = call_seconds;
    const TilePlan plan = make_plan(request, constants);
    expect_well_formed(request, plan);
    EXPECT_LE(plan.tile_rows.size(), previous_tiles) << "call " << call_seconds << " s";
    previous_tiles = plan.tile_rows.size();
    if (call_seconds == 0) EXPECT_GT(plan.tile_rows.size(), 4u) << plan.reason;
    if (call_seconds == 0.1) EXPECT_EQ(plan.tile_rows.size(), 1u) << plan.reason;
  }
}

// With a core of its own for the reduce, the GEMM-heavy layer splits into
// tiles that fit the buffers, and the reduce of all but the last tile is
// hidden: the prediction beats the serial one by most of the reduce.
TEST(Planner, OwnCoreHidesTheReduceWhenTheGemmDominates) {
  PlanRequest request = ascend_request(1024);
  request.reduce_has_own_core = true;
  const CostConstants constants = round_constants(request);
  const TilePlan plan = make_plan(request, constants);
  expect_well_formed(request, plan);
  EXPECT_GE(plan.tile_rows.size(), 16u);
  for (std::int64_t rows : plan.tile_rows) EXPECT_TRUE(fits(request, constants, rows));
  // Short tiles, if any, go last: the unhidden last reduce is short.
  EXPECT_LE(plan.tile_rows.back(), plan.tile_rows.front());
  const double gemm = 2.0 * 4096 * 8192 * 1024 / constants.gemm_flops;
  EXPECT_LT(plan.predicted_seconds, plan.predicted_serial_seconds);
  EXPECT_LT(plan.predicted_seconds, gemm * 1.02) << "the reduce should hide under the GEMM";
}

TEST(Planner, OwnCoreStartsWithShortTilesWhenTheReduceDominates) {
  PlanRequest request = ascend_request(64);
  request.reduce_has_own_core = true;
  // Room for any split: the model alone decides.
  const CostConstants constants = link_constants(request, 1);
  const TilePlan plan = make_plan(request, constants);
  expect_well_formed(request, plan);
  ASSERT_GT(plan.tile_rows.size(), 1u);
  EXPECT_LT(plan.tile_rows.front(), plan.tile_rows.back()) << plan.reason;
  EXPECT_NE(plan.reason.find("first"), std::string::npos) << plan.reason;
  EXPECT_LT(plan.predicted_seconds, plan.predicted_serial_seconds);
}

TEST(Planner, ShortTilesGoLastWhenTheGemmDominatesAndBuffersAllowIt) {
  PlanRequest request = ascend_request(4096);
  request.reduce_has_own_core = true;
  CostConstants constants = round_constants(request);
  constants.buffer_bytes = 64 << 20;
  constants.reduce_seconds_per_byte = 1.0 / 2e9;  // a reduce worth hiding, still under the GEMM
  const TilePlan plan = make_plan(request, constants);
  expect_well_formed(request, plan);
  ASSERT_GT(plan.tile_rows.size(), 1u);
  EXPECT_LE(plan.tile_rows.back(), plan.tile_rows.front()) << plan.reason;
}

TEST(Planner, IsAPureFunction) {
  PlanRequest request = ascend_request(256);
  request.reduce_has_own_core = true;
  const TilePlan first = make_plan(request, round_constants(request));
  const TilePlan second = make_plan(request, round_constants(request));
  EXPECT_EQ(first.tile_rows, second.tile_rows);
  EXPECT_EQ(first.poll_rows, second.poll_rows);
  EXPECT_EQ(first.predicted_seconds, second.predicted_seconds);
}

// Boundaries fall on 16-row multiples where m allows; tiny m still gets
// every row into some tile.
TEST(Planner, TilesStartOnRowGranulesAndCoverEveryRow) {
  PlanRequest request = ascend_request(4096);
  request.m = 4000;
  request.reduce_has_own_core = true;
  const TilePlan plan = make_plan(request, round_constants(request));
  expect_well_formed(request, plan);
  std::int64_t start = 0;
  for (std::size_t t = 0; t + 1 < plan.tile_rows.size(); ++t) {
    start += plan.tile_rows[t];
    EXPECT_EQ(start % 16, 0) << "tile " << t + 1 << " starts at row " << start;
  }
  for (std::int64_t m : {1, 2, 3, 17}) {
    request.m = m;
    request.comm_turn = m;
    const TilePlan tiny = make_plan(request, round_constants(request));
    expect_well_formed(request, tiny);
    EXPECT_EQ(static_cast<std::int64_t>(tiny.tile_rows.size()), m);
  }
}

TEST(Planner, RejectsMeaninglessInputs) {
  PlanRequest request = ascend_request(128);
  request.m = 0;
  EXPECT_THROW(make_plan(request, round_constants(request)), InvalidArgument);
  CostConstants constants = round_constants(request);
  constants.gemm_flops = 0;
  EXPECT_THROW(make_plan(ascend_request(128), constants), InvalidArgument);
  constants = round_constants(request);
  constants.gemm_call_seconds = -1e-3;
  EXPECT_THROW(make_plan(ascend_request(128), constants), InvalidArgument);
}

TEST(Planner, DescribesScheduleConstantsAndPrediction) {
  const PlanRequest request = ascend_request(128);
  const CostConstants constants = round_constants(request);
  const TilePlan plan = make_plan(request, constants);
  const std::string text = describe_plan(request, constants, plan);
  for (const char* part : {"m=4096", "16 tile(s)", "256 rows x 16", "100.0 GFLOP/s", "per extra call", "10.00 GB/s",
                           "predicted", "serial", "why"}) {
    EXPECT_NE(text.find(part), std::string::npos) << "missing \"" << part << "\" in:\n" << text;
  }
}

}  // namespace
}  // namespace tpfuse::pipeline
