// mm_all_reduce_base end to end across local ranks: every mode against the
// golden model, bitwise agreement across ranks, runs and tilings, and the
// failure paths (disagreeing ranks, a rank that stalls or dies mid-call).
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "ops/test_hooks.h"
#include "rank_harness.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/testing/golden.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse {
namespace {

using test::expect_rank;
using test::run_ranks;
using testing::CaseSpec;

// Runs the operator for `spec` on this rank and checks it against the golden
// model computed from every rank's inputs; returns the output.
Tensor run_and_check(const CaseSpec& spec, comm::RankContext& ctx) {
  auto inputs = testing::make_rank_inputs(spec, ctx.rank);
  Tensor out = mm_all_reduce_base(inputs.args.x1, inputs.args.x2, ctx.comm->name(),
                                  inputs.args.options);
  std::vector<testing::RankInputs> all;
  std::vector<testing::RankArgs> args;
  for (int r = 0; r < ctx.size; ++r) all.push_back(testing::make_rank_inputs(spec, r));
  for (const auto& in : all) args.push_back(in.args);
  const auto cmp = testing::compare(out, testing::golden_mm_all_reduce(args));
  expect_rank(cmp.ok(), "rank ", ctx.rank, ": ", cmp.mismatches, " elements beyond the bound (worst |err| ",
              cmp.max_abs_error, ", ratio ", cmp.worst_ratio, ") for m=", spec.m, " k=", spec.k,
              " n=", spec.n, " batch=", spec.batch, " bias=", spec.bias, " x3=", spec.x3,
              " transposed=", spec.x2_transposed);
  // Every rank must hold bitwise the same output.
  const std::uint64_t hash = test::fnv1a(out.data(), out.nbytes());
  const auto hashes = ctx.comm->all_gather(
      std::string_view(reinterpret_cast<const char*>(&hash), sizeof(hash)));
  for (int r = 0; r < ctx.size; ++r) expect_rank(hashes[r] == hashes[0], "rank ", r, " differs");
  return out;
}

struct ModeCase {
  const char* name;
  CaseSpec spec;
};

std::vector<ModeCase> mode_cases() {
  CaseSpec base;
  base.m = 12;
  base.k = 40;
  base.n = 24;
  base.uneven_k = true;
  std::vector<ModeCase> cases;
  auto add = [&](const char* name, auto edit) {
    CaseSpec s = base;
    edit(s);
    cases.push_back({name, s});
  };
  add("plain_f16", [](CaseSpec& s) { s.dtype = DType::f16; });
  add("plain_bf16", [](CaseSpec& s) { s.dtype = DType::bf16; });
  add("wq_f16_per_tensor", [](CaseSpec& s) {
    s.mode = Mode::weight_quant;
    s.scale_kind = ScaleKind::per_tensor;
  });
  add("wq_bf16_per_channel_offset", [](CaseSpec& s) {
    s.mode = Mode::weight_quant;
    s.dtype = DType::bf16;
    s.scale_kind = ScaleKind::per_channel;
    s.offset = true;
  });
  add("wq_f16_per_group_ragged", [](CaseSpec& s) {
    s.mode = Mode::weight_quant;
    s.scale_kind = ScaleKind::per_group;
    s.group_size = 32;  // k = 40 + rank: the last group is short
    s.offset = true;
  });
  add("full_quant_f16_per_channel", [](CaseSpec& s) {
    s.mode = Mode::full_quant;
    s.scale_kind = ScaleKind::per_channel;
  });
  add("full_quant_bf16_per_tensor", [](CaseSpec& s) {
    s.mode = Mode::full_quant;
    s.dtype = DType::bf16;
    s.scale_kind = ScaleKind::per_tensor;
  });
  return cases;
}

class EveryMode : public ::testing::TestWithParam<std::tuple<int, int>> {};

// One launch per (mode, ranks) runs every combination of 2-D/3-D x1, bias and
// x3 on or off, and row-major or transposed x2.
TEST_P(EveryMode, MatchesGoldenOnEveryLayout) {
  const auto [mode_index, ranks] = GetParam();
  const CaseSpec base = mode_cases()[mode_index].spec;
  const auto result = run_ranks(ranks, [&](comm::RankContext& ctx) {
    for (int layout = 0; layout < 16; ++layout) {
      CaseSpec spec = base;
      spec.batch = (layout & 1) ? 3 : 0;
      spec.bias = (layout & 2) != 0;
      spec.x3 = (layout & 4) != 0;
      spec.x2_transposed = (layout & 8) != 0;
      spec.seed = 100 + layout;
      run_and_check(spec, ctx);
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

INSTANTIATE_TEST_SUITE_P(
    Operator, EveryMode,
    ::testing::Combine(::testing::Range(0, static_cast<int>(mode_cases().size())),
                       ::testing::Values(1, 2, 3, 4, 8)),
    [](const auto& info) {
      return std::string(mode_cases()[std::get<0>(info.param)].name) + "_ranks" +
             std::to_string(std::get<1>(info.param));
    });

TEST(Operator, BitwiseSameAcrossCommTurnValuesAndOutForm) {
  const auto result = run_ranks(3, [](comm::RankContext& ctx) {
    CaseSpec spec;
    spec.m = 37;
    spec.k = 64;
    spec.n = 20;
    spec.bias = true;
    spec.x3 = true;
    auto inputs = testing::make_rank_inputs(spec, ctx.rank);
    const Tensor reference =
        mm_all_reduce_base(inputs.args.x1, inputs.args.x2, ctx.comm->name(), inputs.args.options);
    for (std::int64_t turn : {1, 2, 3, 5, 36, 37, 1000}) {
      auto options = inputs.args.options;
      options.comm_turn = turn;
      Tensor out(reference.dtype(), reference.shape());
      mm_all_reduce_base_out(inputs.args.x1, inputs.args.x2, ctx.comm->name(), options, out);
      expect_rank(std::memcmp(out.data(), reference.data(), out.nbytes()) == 0,
                  "comm_turn ", turn, " changed the output");
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// Two separate jobs (fresh processes and segments) produce the same bytes.
TEST(Operator, BitwiseSameAcrossRuns) {
  std::vector<std::uint64_t> hashes;
  for (int run = 0; run < 2; ++run) {
    int fds[2];
    ASSERT_EQ(pipe(fds), 0);
    const auto result = run_ranks(4, [&](comm::RankContext& ctx) {
      CaseSpec spec;
      spec.mode = Mode::weight_quant;
      spec.scale_kind = ScaleKind::per_group;
      spec.group_size = 32;
      spec.m = 9;
      spec.k = 100;
      spec.n = 33;
      const Tensor out = run_and_check(spec, ctx);
      const std::uint64_t hash = test::fnv1a(out.data(), out.nbytes());
      if (ctx.rank == 0 && write(fds[1], &hash, sizeof(hash)) != sizeof(hash)) return 3;
      return 0;
    });
    close(fds[1]);
    std::uint64_t hash = 0;
    ASSERT_EQ(read(fds[0], &hash, sizeof(hash)), static_cast<ssize_t>(sizeof(hash)));
    close(fds[0]);
    ASSERT_TRUE(result.ok()) << result.describe_failures();
    hashes.push_back(hash);
  }
  EXPECT_EQ(hashes[0], hashes[1]);
}

// Detected, not timed out: every rank fails well before the deadline (a
// property that holds under the sanitizers on a loaded machine).
TEST(Operator, DisagreeingRanksAllFailBeforeTheDeadline) {
  const auto result = run_ranks(3, [](comm::RankContext& ctx) {
    CaseSpec spec;
    spec.n = ctx.rank == 1 ? 17 : 16;  // rank 1 passes another n
    auto inputs = testing::make_rank_inputs(spec, ctx.rank);
    const auto start = std::chrono::steady_clock::now();
    try {
      mm_all_reduce_base(inputs.args.x1, inputs.args.x2, ctx.comm->name(), inputs.args.options);
    } catch (const DisagreementError& e) {
      const auto elapsed = std::chrono::steady_clock::now() - start;
      expect_rank(elapsed < ctx.comm->timeout() / 3, "failed after ",
                  std::chrono::duration<double>(elapsed).count(), " s, near the deadline of ",
                  ctx.comm->timeout().count(), " ms: not detected");
      const std::string what = e.what();
      expect_rank(what.find("disagree on n") != std::string::npos &&
                      what.find("rank 1 has 17") != std::string::npos,
                  "unexpected message: ", what);
      return 0;
    }
    expect_rank(false, "rank ", ctx.rank, " got no error");
    return 1;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

TEST(Operator, OneRankRejectingItsArgumentsFailsEveryRank) {
  const auto result = run_ranks(3, [](comm::RankContext& ctx) {
    CaseSpec spec;
    auto inputs = testing::make_rank_inputs(spec, ctx.rank);
    auto options = inputs.args.options;
    if (ctx.rank == 2) options.reduce_op = "max";
    try {
      mm_all_reduce_base(inputs.args.x1, inputs.args.x2, ctx.comm->name(), options);
    } catch (const DisagreementError& e) {
      expect_rank(ctx.rank != 2, "rank 2 should see its own error");
      const std::string what = e.what();
      expect_rank(what.find("rank 2 rejected") != std::string::npos &&
                      what.find("reduce_op") != std::string::npos,
                  "unexpected message: ", what);
      return 0;
    } catch (const InvalidArgument& e) {
      expect_rank(ctx.rank == 2, "rank ", ctx.rank, " got the wrong error: ", e.what());
      expect_rank(std::string(e.what()).find("reduce_op") != std::string::npos, e.what());
      return 0;
    }
    expect_rank(false, "rank ", ctx.rank, " got no error");
    return 1;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

TEST(Operator, UnknownHcomIsAClearError) {
  CaseSpec spec;
  auto inputs = testing::make_rank_inputs(spec, 0);
  try {
    mm_all_reduce_base(inputs.args.x1, inputs.args.x2, "no-such-group", inputs.args.options);
    FAIL() << "expected an error";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("no-such-group"), std::string::npos) << e.what();
  }
}

// A rank that stalls between two tiles holds the others up, and everyone
// still gets the golden result, bitwise the same on every rank.
TEST(Operator, RankStalledMidCallDelaysButNeverCorrupts) {
  const auto result = run_ranks(3, [](comm::RankContext& ctx) {
    if (ctx.rank == 1) {
      test_hooks::set_after_tile_computed([](std::int64_t tile) {
        if (tile == 1) std::this_thread::sleep_for(std::chrono::milliseconds(300));
      });
    }
    CaseSpec spec;
    spec.m = 40;
    spec.k = 48;
    spec.n = 24;
    spec.bias = true;
    spec.comm_turn = 5;
    const auto start = std::chrono::steady_clock::now();
    run_and_check(spec, ctx);
    expect_rank(std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(250),
                "rank ", ctx.rank, " finished before the stalled rank");
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// A rank killed between two tiles: the others fail within the deadline,
// naming it, and the job leaves nothing in /dev/shm.
TEST(Operator, RankKilledMidCallIsNamedByTheOthers) {
  const auto timeout = std::chrono::milliseconds(3000);
  const auto result = run_ranks(
      4,
      [&](comm::RankContext& ctx) {
        CaseSpec spec;
        spec.m = 64;
        spec.comm_turn = 4;
        auto inputs = testing::make_rank_inputs(spec, ctx.rank);
        if (ctx.rank == 2) {
          test_hooks::set_after_tile_computed([](std::int64_t tile) {
            if (tile == 2) raise(SIGKILL);
          });
        }
        const auto start = std::chrono::steady_clock::now();
        try {
          mm_all_reduce_base(inputs.args.x1, inputs.args.x2, ctx.comm->name(), inputs.args.options);
        } catch (const CommError& e) {
          const auto elapsed = std::chrono::steady_clock::now() - start;
          expect_rank(elapsed < timeout + std::chrono::milliseconds(1000), "failed too late");
          const std::string what = e.what();
          expect_rank(what.find("rank 2") != std::string::npos, "message does not name rank 2: ", what);
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

// Found by fuzzing: an x2 of one column may carry any stride on that column
// (validation accepts it as row-major); oneDNN's int8 and bf16 engines read
// that stride as a layout and returned garbage.
TEST(Operator, OneColumnWeightWithAnyColumnStride) {
  const auto result = run_ranks(2, [](comm::RankContext& ctx) {
    for (const auto& [mode, dtype] : {std::pair{Mode::full_quant, DType::bf16},
                                      std::pair{Mode::full_quant, DType::f16},
                                      std::pair{Mode::plain, DType::bf16}}) {
      CaseSpec spec;
      spec.mode = mode;
      spec.dtype = dtype;
      spec.scale_kind = ScaleKind::per_tensor;
      spec.m = 96;
      spec.k = 28;
      spec.n = 1;
      std::vector<testing::RankInputs> all;
      std::vector<testing::RankArgs> args;
      for (int r = 0; r < ctx.size; ++r) {
        all.push_back(testing::make_rank_inputs(spec, r));
        const TensorView& x2 = all.back().args.x2;
        const std::int64_t shape[2] = {spec.k, 1}, strides[2] = {1, 2};
        all.back().args.x2 = TensorView(x2.data(), x2.dtype(), shape, strides);
      }
      for (const auto& in : all) args.push_back(in.args);
      const auto& mine = all[static_cast<std::size_t>(ctx.rank)].args;
      const Tensor out = mm_all_reduce_base(mine.x1, mine.x2, ctx.comm->name(), mine.options);
      const auto cmp = testing::compare(out, testing::golden_mm_all_reduce(args));
      expect_rank(cmp.ok(), mode_name(mode), " ", dtype_name(dtype), ": ", cmp.mismatches,
                  " elements beyond the bound");
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

}  // namespace
}  // namespace tpfuse
