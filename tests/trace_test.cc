// The timeline (core/trace.h): what each rank writes for the operator's calls,
// their tiles, their reduces and their waits, checked against what the calls
// did; and nothing at all when tracing is off.
#include "core/trace.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "rank_harness.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::expect_rank;

constexpr int kRanks = 2;
constexpr std::int64_t kTiledM = 48;
constexpr int kTiles = 3;

testing::CaseSpec one_tile_case() {
  testing::CaseSpec spec;
  spec.dtype = DType::bf16;
  spec.m = 4;
  spec.n = 16;
  spec.k = 32;
  return spec;
}

testing::CaseSpec tiled_case() {
  testing::CaseSpec spec = one_tile_case();
  spec.m = kTiledM;
  spec.comm_turn = kTiles;
  return spec;
}

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / (name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  return dir;
}

// Each rank: the one-tile call twice, the tiled call twice; rank 1 comes
// late to the last call, so that rank 0 waits for it.
int traced_calls(comm::RankContext& ctx, const fs::path& dir) {
  trace::start(dir.string());
  for (const testing::CaseSpec& spec :
       {one_tile_case(), one_tile_case(), tiled_case(), tiled_case()}) {
    const auto inputs = testing::make_rank_inputs(spec, ctx.rank);
    mm_all_reduce_base(inputs.args.x1, inputs.args.x2, ctx.comm->name(), inputs.args.options);
  }
  const auto late = testing::make_rank_inputs(tiled_case(), ctx.rank);
  if (ctx.rank == 1) std::this_thread::sleep_for(std::chrono::milliseconds{30});
  mm_all_reduce_base(late.args.x1, late.args.x2, ctx.comm->name(), late.args.options);
  trace::stop();
  return 0;
}

// The events of every rank's file, by rank; each file must be a whole JSON array.
std::map<int, std::vector<json>> read_ranks(const fs::path& dir) {
  std::map<int, std::vector<json>> ranks;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    EXPECT_TRUE(name.starts_with("rank-") && name.ends_with(".json")) << name;
    const int rank = std::stoi(name.substr(5));
    std::ifstream in(entry.path());
    const json events = json::parse(in, nullptr, /*allow_exceptions=*/false);
    EXPECT_TRUE(events.is_array()) << name << " is not a JSON array";
    if (!events.is_array()) continue;
    for (const json& e : events) {
      if (e.value("ph", "") == "X") {
        EXPECT_EQ(e.value("pid", -1), rank) << name << ": " << e.dump();
        ranks[rank].push_back(e);
      }
    }
  }
  return ranks;
}

std::vector<json> of_category(const std::vector<json>& events, const std::string& category) {
  std::vector<json> out;
  std::copy_if(events.begin(), events.end(), std::back_inserter(out),
               [&](const json& e) { return e.value("cat", "") == category; });
  return out;
}

bool within(const json& inner, const json& outer) {
  const double begin = inner["ts"].get<double>(), end = begin + inner["dur"].get<double>();
  const double outer_begin = outer["ts"].get<double>(),
               outer_end = outer_begin + outer["dur"].get<double>();
  return begin >= outer_begin && end <= outer_end;
}

TEST(Trace, EveryRankWritesItsCallsTilesReducesAndWaits) {
  const fs::path dir = fresh_dir("tpfuse-trace-test");
  const auto result =
      test::run_ranks(kRanks, [&](comm::RankContext& ctx) { return traced_calls(ctx, dir); });
  ASSERT_TRUE(result.ok()) << result.describe_failures();
  const auto ranks = read_ranks(dir);
  ASSERT_EQ(ranks.size(), static_cast<std::size_t>(kRanks))
      << "expected one file per rank in " << dir;

  for (const auto& [rank, events] : ranks) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    const auto calls = of_category(events, "op");
    ASSERT_EQ(calls.size(), 5u);
    const std::vector<std::int64_t> ms = {4, 4, kTiledM, kTiledM, kTiledM};
    for (std::size_t c = 0; c < calls.size(); ++c) {
      const json& args = calls[c]["args"];
      EXPECT_EQ(args["m"], ms[c]);
      EXPECT_EQ(args["n"], 16);
      EXPECT_EQ(args["mode"], "plain");
      EXPECT_EQ(args["x1"], "bf16");
      const auto rows = args["tile_rows"].get<std::vector<std::int64_t>>();
      EXPECT_EQ(rows.size(), ms[c] == kTiledM ? static_cast<std::size_t>(kTiles) : 1u);
      EXPECT_EQ(std::accumulate(rows.begin(), rows.end(), std::int64_t{0}), ms[c]);
    }
    // The first call of each shape is judged; the one-tile call made again
    // runs in its one round.
    EXPECT_EQ(calls[0]["args"]["agreement"], "judged from every rank's proposal");
    EXPECT_EQ(calls[1]["args"]["agreement"], "in the call's one round");
    EXPECT_EQ(calls[2]["args"]["agreement"], "judged from every rank's proposal");
    EXPECT_EQ(calls[3]["args"]["agreement"], "in the call's first round");

    // The tiled calls: GEMM spans inside the call covering its rows, and
    // reduces whose bytes add up to the output's.
    const json& tiled = calls[3];
    std::vector<std::pair<std::int64_t, std::int64_t>> row_spans;
    for (const json& g : of_category(events, "gemm")) {
      if (within(g, tiled)) row_spans.emplace_back(g["args"]["row_begin"], g["args"]["row_end"]);
    }
    std::sort(row_spans.begin(), row_spans.end());
    ASSERT_FALSE(row_spans.empty());
    EXPECT_EQ(row_spans.front().first, 0);
    EXPECT_EQ(row_spans.back().second, kTiledM);
    for (std::size_t i = 1; i < row_spans.size(); ++i)
      EXPECT_EQ(row_spans[i].first, row_spans[i - 1].second);
    std::int64_t reduced = 0;
    for (const json& r : of_category(events, "comm")) {
      EXPECT_EQ(r["tid"], static_cast<int>(trace::Track::comm));
      EXPECT_TRUE(r["args"].contains("algorithm")) << r.dump();
      const double begin = r["ts"].get<double>();
      if (begin >= tiled["ts"].get<double>() &&
          begin <= tiled["ts"].get<double>() + tiled["dur"].get<double>()) {
        reduced += r["args"]["bytes"].get<std::int64_t>();
      }
    }
    EXPECT_EQ(reduced, kTiledM * 16 * 2) << "bytes reduced in the tiled call";
    EXPECT_FALSE(of_category(events, "agreement").empty());
  }
  // Rank 1 came 30 ms late to the last call: rank 0 waited that long for it.
  const json last = of_category(ranks.at(0), "op").back();
  bool waited = false;
  for (const json& w : of_category(ranks.at(0), "wait")) {
    const auto held_up_by = w["args"]["held_up_by"].get<std::vector<int>>();
    waited = waited || (within(w, last) && w["dur"].get<double>() >= 10'000 &&
                        std::find(held_up_by.begin(), held_up_by.end(), 1) != held_up_by.end());
  }
  EXPECT_TRUE(waited) << "no wait of rank 0 on rank 1 of 10 ms or more in the last call";
  fs::remove_all(dir);
}

TEST(Trace, OffWritesNothing) {
  ::unsetenv("TPFUSE_TRACE");
  const fs::path dir = fresh_dir("tpfuse-trace-off-test");
  fs::create_directories(dir);
  const auto result = test::run_ranks(kRanks, [&](comm::RankContext& ctx) {
    const auto inputs = testing::make_rank_inputs(tiled_case(), ctx.rank);
    mm_all_reduce_base(inputs.args.x1, inputs.args.x2, ctx.comm->name(), inputs.args.options);
    expect_rank(!trace::enabled(), "tracing is on without TPFUSE_TRACE");
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
  EXPECT_TRUE(fs::is_empty(dir));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace tpfuse
