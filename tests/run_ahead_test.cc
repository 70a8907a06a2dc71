// A call that a rank proposed before on the same communicator runs ahead of
// the agreement and is checked afterwards (ops/agreement.h): it counts when
// the facts it assumed hold, runs again when they went stale, and fails on
// every rank, leaving the outputs as they were and the communicator usable,
// when the ranks disagree.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
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
using Outcome = test_hooks::Agreement;

const char* outcome_name(Outcome outcome) {
  switch (outcome) {
    case Outcome::before_running:
      return "agreed before running";
    case Outcome::ran_ahead:
      return "ran ahead";
    case Outcome::ran_ahead_then_again:
      return "ran ahead, then again";
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

TEST(RunAhead, ACallSeenBeforeRunsAheadAndMatchesTheGolden) {
  const auto result = run_ranks(3, [](comm::RankContext& ctx) {
    for (const DType dtype : {DType::f16, DType::bf16}) {
      CaseSpec spec = small_case();
      spec.dtype = dtype;
      spec.bias = true;
      const std::vector<CaseSpec> specs(3, spec);
      expect_outcome(run_and_check(specs, ctx), Outcome::before_running, 1, ctx.rank);
      expect_outcome(run_and_check(specs, ctx), Outcome::ran_ahead, 2, ctx.rank);
      expect_outcome(run_and_check(specs, ctx), Outcome::ran_ahead, 3, ctx.rank);
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// Uneven K-slices that change between calls: a rank's memory of the largest
// K goes stale, and the call runs again with the one agreed now.
TEST(RunAhead, StaleFactsRunAgainWithTheAgreedOnes) {
  const auto result = run_ranks(2, [](comm::RankContext& ctx) {
    const CaseSpec base = small_case();
    const auto call = [&](int number, const std::vector<std::int64_t>& ks,
                          const std::vector<Outcome>& want) {
      expect_outcome(run_and_check(with_k(base, ks), ctx), want[ctx.rank], number, ctx.rank);
    };
    call(1, {32, 32}, {Outcome::before_running, Outcome::before_running});
    // Rank 0 assumes the largest K is 32; rank 1 never proposed K=64.
    call(2, {32, 64}, {Outcome::ran_ahead_then_again, Outcome::before_running});
    // Rank 0 now remembers 64 for its proposal, rank 1 remembers 32.
    call(3, {32, 32}, {Outcome::ran_ahead_then_again, Outcome::ran_ahead_then_again});
    call(4, {32, 32}, {Outcome::ran_ahead, Outcome::ran_ahead});
    // Rank 1's new proposal leaves the largest K rank 0 assumed: its run counts.
    call(5, {32, 16}, {Outcome::ran_ahead, Outcome::before_running});
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// Both ranks remember their own proposal, and run ahead with different m:
// both fail naming m, and the next call works.
TEST(RunAhead, RanksThatRanAheadAndDisagreeAllFail) {
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
    expect_outcome(run_and_check({eight, eight}, ctx), Outcome::ran_ahead, 4, ctx.rank);
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// The others run ahead while rank 2 rejects its arguments: rank 2 still
// takes part in their all-reduce, then every rank fails, and the next call
// works.
TEST(RunAhead, ARankRejectingItsArgumentsFailsThoseThatRanAhead) {
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
    expect_outcome(run_and_check(specs, ctx), Outcome::ran_ahead, 3, ctx.rank);
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

}  // namespace
}  // namespace tpfuse
