// The agreement carried by a call's first round (ops/agreement.h): a call
// the ranks agreed before runs in that one round; stale facts, a first time
// and a rank's own error are judged from every rank's proposal and run (or
// fail) alike on every rank, leaving the outputs as they were and the
// communicator usable when the ranks disagree. And in steady state a call is
// one collective round.
#include "ops/agreement.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ops/test_hooks.h"
#include "rank_harness.h"
#include "recording_communicator.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/pipeline/plan.h"
#include "tpfuse/testing/golden.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse {
namespace {

using test::expect_rank;
using test::run_ranks;
using testing::CaseSpec;
using Outcome = test_hooks::Agreement;

const char* outcome_name(Outcome outcome) {
  switch (outcome) {
    case Outcome::in_first_round:
      return "agreed in its first round";
    case Outcome::judged:
      return "judged from every rank's proposal";
  }
  return "?";
}

// Rank r calls with specs[r]; the output must match the golden model of every
// rank's inputs and be bitwise the same on every rank. Returns how the
// agreement went here.
Outcome run_and_check(const std::vector<CaseSpec>& specs, comm::RankContext& ctx) {
  std::vector<Outcome> outcomes;
  test_hooks::set_after_agreement([&](Outcome outcome) { outcomes.push_back(outcome); });
  const auto inputs = testing::make_rank_inputs(specs[ctx.rank], ctx.rank);
  const Tensor out =
      mm_all_reduce_base(inputs.args.x1, inputs.args.x2, ctx.comm->name(), inputs.args.options);
  test_hooks::set_after_agreement(nullptr);
  expect_rank(outcomes.size() == 1, "the operator reported ", outcomes.size(), " agreements");

  std::vector<testing::RankInputs> all;
  std::vector<testing::RankArgs> args;
  for (int r = 0; r < ctx.size; ++r) all.push_back(testing::make_rank_inputs(specs[r], r));
  for (const auto& in : all) args.push_back(in.args);
  const auto cmp = testing::compare(out, testing::golden_mm_all_reduce(args));
  expect_rank(cmp.ok(), "rank ", ctx.rank, ": ", cmp.mismatches,
              " elements beyond the bound (worst |err| ", cmp.max_abs_error, ")");
  const std::uint64_t hash = test::fnv1a(out.data(), out.nbytes());
  const auto hashes = ctx.comm->all_gather(
      std::string_view(reinterpret_cast<const char*>(&hash), sizeof(hash)));
  for (int r = 0; r < ctx.size; ++r) expect_rank(hashes[r] == hashes[0], "rank ", r, " differs");
  return outcomes[0];
}

// One spec per rank, rank r's K-slice ks[r].
std::vector<CaseSpec> with_k(const CaseSpec& base, const std::vector<std::int64_t>& ks) {
  std::vector<CaseSpec> specs(ks.size(), base);
  for (std::size_t r = 0; r < ks.size(); ++r) specs[r].k = ks[r];
  return specs;
}

void expect_outcome(Outcome got, Outcome want, int call, int rank) {
  expect_rank(got == want, "call ", call, ", rank ", rank, ": ", outcome_name(got),
              "; expected: ", outcome_name(want));
}

// An output tensor for `spec`'s call, every byte 0xA5, for a failed call to
// leave as it was.
Tensor marked_out(const CaseSpec& spec) {
  Tensor out(spec.dtype, {spec.m, spec.n});
  std::memset(out.data(), 0xA5, out.nbytes());
  return out;
}

bool still_marked(const Tensor& out) {
  const auto* bytes = static_cast<const unsigned char*>(out.data());
  return std::all_of(bytes, bytes + out.nbytes(), [](unsigned char b) { return b == 0xA5; });
}

CaseSpec small_case() {
  CaseSpec spec;
  spec.m = 12;
  spec.n = 24;
  spec.k = 40;
  return spec;
}

// Two ranks that ask for different operators of the family in the same
// call disagree on the operator, by name, before any other field.
TEST(Agreement, RanksCallingDifferentOperatorsDisagreeOnTheOperator) {
  CallShape shape;
  shape.m = 8;
  shape.k = 16;
  shape.n = 4;
  std::vector<comm::CallHeader> headers;
  for (int rank = 0; rank < 2; ++rank) {
    Proposal proposal;
    proposal.shape = shape;
    proposal.shape->op =
        rank == 0 ? pipeline::Operator::mm_all_reduce : pipeline::Operator::mm_reduce_scatter;
    proposal.shape->n = rank == 0 ? 4 : 5;  // a later field differs too
    proposal.mine = {16, 1, false};
    headers.push_back(make_header(proposal, std::nullopt, rank));
  }
  EXPECT_NE(headers[0].digest, headers[1].digest);
  for (int rank = 0; rank < 2; ++rank) {
    const Agreement agreement = judge_headers(headers, rank, "");
    ASSERT_TRUE(agreement.failure);
    try {
      std::rethrow_exception(agreement.failure);
    } catch (const DisagreementError& error) {
      EXPECT_NE(std::string(error.what())
                    .find("ranks disagree on operator: rank 0 has mm_all_reduce, rank 1 has "
                          "mm_reduce_scatter"),
                std::string::npos)
          << error.what();
    }
  }
}

// TPFUSE_CHECK_CACHES: calls whose ranks hold the same measured constants
// pass; once rank 1 alone has forgotten them, the next call that looks them
// up fails on both ranks, naming rank 1 and what it lacks, instead of rank
// 1 measuring (collectively) alone.
TEST(Agreement, CheckedCachesNameARankWhoseEntriesDiffer) {
  const auto result = run_ranks(2, [](comm::RankContext& ctx) {
    ::setenv("TPFUSE_CHECK_CACHES", "1", 1);
    const auto inputs = testing::make_rank_inputs(small_case(), ctx.rank);
    const std::string hcom = ctx.comm->name();
    for (int call = 0; call < 2; ++call) {
      mm_all_reduce_base(inputs.args.x1, inputs.args.x2, hcom, inputs.args.options);
    }
    if (ctx.rank == 1) pipeline::forget_measurements(*ctx.comm);
    try {
      mm_all_reduce_base(inputs.args.x1, inputs.args.x2, hcom, inputs.args.options);
      expect_rank(false, "the call ran with rank 1's constants forgotten");
    } catch (const InternalError& error) {
      const std::string what = error.what();
      expect_rank(what.find("rank 0 holds transport key") != std::string::npos &&
                      what.find("rank 1 lacks transport key") != std::string::npos,
                  "the error does not name the ranks and the entry: ", what);
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

TEST(Agreement, ACallSeenBeforeRunsInItsFirstRoundAndMatchesTheGolden) {
  const auto result = run_ranks(3, [](comm::RankContext& ctx) {
    for (const DType dtype : {DType::f16, DType::bf16}) {
      CaseSpec spec = small_case();
      spec.dtype = dtype;
      spec.bias = true;
      const std::vector<CaseSpec> specs(3, spec);
      expect_outcome(run_and_check(specs, ctx), Outcome::judged, 1, ctx.rank);
      expect_outcome(run_and_check(specs, ctx), Outcome::in_first_round, 2, ctx.rank);
      expect_outcome(run_and_check(specs, ctx), Outcome::in_first_round, 3, ctx.rank);
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// Uneven K-slices that change between calls: a rank's memory of the largest
// K goes stale, and the call is judged and runs with the one agreed now.
TEST(Agreement, StaleFactsAreJudgedAndRunWithTheAgreedOnes) {
  const auto result = run_ranks(2, [](comm::RankContext& ctx) {
    const CaseSpec base = small_case();
    const auto call = [&](int number, const std::vector<std::int64_t>& ks,
                          const std::vector<Outcome>& want) {
      expect_outcome(run_and_check(with_k(base, ks), ctx), want[ctx.rank], number, ctx.rank);
    };
    call(1, {32, 32}, {Outcome::judged, Outcome::judged});
    // Rank 0 plans with a largest K of 32; rank 1 never proposed K=64.
    call(2, {32, 64}, {Outcome::judged, Outcome::judged});
    // Rank 0 now remembers 64 for its proposal, rank 1 remembers 32.
    call(3, {32, 32}, {Outcome::judged, Outcome::judged});
    call(4, {32, 32}, {Outcome::in_first_round, Outcome::in_first_round});
    // Rank 1 proposes what it never did: the round ends in the judging.
    call(5, {32, 16}, {Outcome::judged, Outcome::judged});
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// Both ranks remember their own proposal, and plan with different m: both
// fail naming m in the first round, and the next call works.
TEST(Agreement, RanksThatPlannedApartAndDisagreeAllFail) {
  const auto result = run_ranks(2, [](comm::RankContext& ctx) {
    CaseSpec eight = small_case();
    eight.m = 8;
    CaseSpec sixteen = small_case();
    sixteen.m = 16;
    run_and_check({eight, eight}, ctx);
    run_and_check({sixteen, sixteen}, ctx);
    const CaseSpec& mine = ctx.rank == 0 ? eight : sixteen;
    const auto inputs = testing::make_rank_inputs(mine, ctx.rank);
    const Tensor out = marked_out(mine);
    try {
      mm_all_reduce_base_out(inputs.args.x1, inputs.args.x2, ctx.comm->name(),
                             inputs.args.options, out);
      expect_rank(false, "rank ", ctx.rank, " got no error");
    } catch (const DisagreementError& e) {
      const std::string what = e.what();
      expect_rank(what.find("disagree on m") != std::string::npos &&
                      what.find("rank 1 has 16") != std::string::npos,
                  "unexpected message: ", what);
    }
    expect_rank(still_marked(out), "rank ", ctx.rank, ": the failed call wrote into out");
    expect_outcome(run_and_check({eight, eight}, ctx), Outcome::in_first_round, 4, ctx.rank);
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// The others plan while rank 2 rejects its arguments: rank 2 still takes
// part in their first round, every rank fails with rank 2's message, and the
// next call works.
TEST(Agreement, ARankRejectingItsArgumentsFailsThePlannedRound) {
  const auto result = run_ranks(3, [](comm::RankContext& ctx) {
    const CaseSpec spec = small_case();
    const std::vector<CaseSpec> specs(3, spec);
    run_and_check(specs, ctx);
    const auto inputs = testing::make_rank_inputs(spec, ctx.rank);
    auto options = inputs.args.options;
    if (ctx.rank == 2) options.reduce_op = "max";
    const Tensor out = marked_out(spec);
    try {
      mm_all_reduce_base_out(inputs.args.x1, inputs.args.x2, ctx.comm->name(), options, out);
      expect_rank(false, "rank ", ctx.rank, " got no error");
    } catch (const DisagreementError& e) {
      expect_rank(ctx.rank != 2, "rank 2 should see its own error");
      expect_rank(std::string(e.what()).find("rank 2 rejected") != std::string::npos,
                  "unexpected message: ", e.what());
    } catch (const InvalidArgument& e) {
      expect_rank(ctx.rank == 2, "rank ", ctx.rank, " got the wrong error: ", e.what());
    }
    expect_rank(still_marked(out), "rank ", ctx.rank, ": the failed call wrote into out");
    expect_outcome(run_and_check(specs, ctx), Outcome::in_first_round, 3, ctx.rank);
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// A decode step's small call, made again: after the first time, one round.
TEST(Agreement, ASmallCallMadeAgainIsOneCollectiveRound) {
  const auto result = run_ranks(3, [](comm::RankContext& ctx) {
    auto counted =
        std::make_shared<test::RecordingCommunicator>(ctx.comm, ctx.comm->name() + "-counted");
    const std::string hcom = comm::register_communicator(counted);
    CaseSpec spec = small_case();
    spec.dtype = DType::bf16;
    const auto inputs = testing::make_rank_inputs(spec, ctx.rank);
    std::vector<int> rounds;
    for (int call = 0; call < 4; ++call) {
      const int before = counted->rounds();
      mm_all_reduce_base(inputs.args.x1, inputs.args.x2, hcom, inputs.args.options);
      rounds.push_back(counted->rounds() - before);
    }
    comm::unregister_communicator(hcom);
    for (int call = 1; call < 4; ++call) {
      expect_rank(rounds[static_cast<std::size_t>(call)] == 1, "rank ", ctx.rank, ": call ",
                  call + 1, " took ", rounds[static_cast<std::size_t>(call)], " collective rounds");
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

}  // namespace
}  // namespace tpfuse
