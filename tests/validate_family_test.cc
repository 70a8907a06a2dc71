// The family's argument rules (docs/SEMANTICS-FAMILY.md) on one rank, where
// the fuzzer (tests/fuzz) found validation going wrong: each test breaks one
// rule and checks the InvalidArgument names the argument at fault first and
// quotes the value given.
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <optional>
#include <string>

#include "rank_harness.h"
#include "tpfuse/core/error.h"
#include "tpfuse/ops/family.h"
#include "tpfuse/ops/validate.h"

namespace tpfuse {
namespace {

using test::expect_rank;
using test::run_ranks;

constexpr std::int64_t kM = 4, kK = 64, kN = 16;
constexpr int kOneRank = 1;

// The message of the InvalidArgument `action` throws, or "" when none.
std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "";
}

// Starts with "<name>:" and contains every fragment.
void expect_names(const std::string& message, const std::string& name,
                  std::initializer_list<std::string> fragments) {
  EXPECT_EQ(message.rfind(name + ":", 0), 0u) << message;
  for (const std::string& fragment : fragments) {
    EXPECT_NE(message.find(fragment), std::string::npos)
        << "missing '" << fragment << "' in: " << message;
  }
}

TEST(ValidateFamily, UnknownOutputDtypeIsQuotedByItsCode) {
  const Tensor x1(DType::f16, {kM, kK}), x2(DType::f16, {kK, kN});
  AllGatherMmOptions options;
  options.output_dtype = static_cast<DType>(9);
  const std::string plain = error_of([&] { validate_all_gather_mm(x1, x2, 1, kOneRank, options); });
  expect_names(plain, "output_dtype", {"got unknown dtype code 9"});

  const Tensor q1(DType::i8, {kM, kK}), q2(DType::i8, {kK, kN});
  const Tensor f32_scale(DType::f32, {kN}), i64_scale(DType::i64, {kN});
  MmReduceScatterOptions quant;
  quant.output_dtype = static_cast<DType>(7);
  quant.x2_scale = f32_scale.view();
  expect_names(error_of([&] { validate_mm_reduce_scatter(q1, q2, 1, kOneRank, quant); }),
               "output_dtype", {"with an f32 x2_scale", "got unknown dtype code 7"});
  quant.x2_scale = i64_scale.view();
  expect_names(error_of([&] { validate_mm_reduce_scatter(q1, q2, 1, kOneRank, quant); }),
               "output_dtype", {"with an i64 x2_scale", "got unknown dtype code 7"});
}

// m * n elements overflow int64: y and norm_out have residual's shape, so
// residual is the argument at fault (the operator has no `out`).
TEST(ValidateFamily, AddRmsNormOutputTooLargeNamesResidual) {
  const Tensor memory(DType::f16, {kK});
  const std::int64_t huge = std::int64_t{1} << 40;
  const TensorView x1(memory.data(), DType::f16, {huge, 1});
  const TensorView x2(memory.data(), DType::f16, {1, huge});
  const TensorView residual(memory.data(), DType::f16, {1, 1, huge});
  const TensorView gamma(memory.data(), DType::f16, {huge});
  expect_names(error_of([&] { validate_add_rms_norm(x1, x2, residual, gamma, {}); }), "residual",
               {"1099511627776", "got [1, 1, 1099511627776] f16"});
}

// gather_out that fails its own checks: validation names it, rather than
// first comparing its memory with output's. Without a pointer its bytes
// would be [0, 2^48), over every address output can have; with sizes whose
// byte range overflows int64, that range cannot even be computed.
TEST(ValidateFamily, AllGatherOutChecksGatherOutBeforeItsMemory) {
  const Tensor x1(DType::f16, {kM, kK}), x2(DType::f16, {kK, kN});
  const Tensor output(DType::f16, {kM, kN}), memory(DType::f16, {kK});
  const AllGatherMmOptions options;
  const CallShape shape = validate_all_gather_mm(x1, x2, 1, kOneRank, options);
  auto error = [&](const TensorView& gather_out) {
    return error_of(
        [&] { validate_all_gather_mm_out(shape, output, gather_out, x1, x2, options); });
  };
  const std::int64_t wide = std::int64_t{1} << 47;
  expect_names(error(TensorView(nullptr, DType::f16, {wide, 1})), "gather_out",
               {"expected a data pointer, got null"});
  const std::int64_t huge = std::int64_t{1} << 62;
  const std::int64_t dims[] = {huge, huge}, strides[] = {huge, 1};
  expect_names(error(TensorView(memory.data(), DType::f16, dims, strides)), "gather_out",
               {"fit int64", "got [4611686018427387904, 4611686018427387904]"});
}

// The in-place form writes y into residual: residual inside x1 fails the
// call, as y inside x1 fails the _out form.
TEST(ValidateFamily, InPlaceResidualMustNotOverlapAnInput) {
  const auto result = run_ranks(1, [](comm::RankContext& ctx) {
    const Tensor x1(DType::f16, {kM, kK}), x2(DType::f16, {kK, kN}), gamma(DType::f16, {kN});
    const TensorView residual(x1.data(), DType::f16, {1, kM, kN});
    const std::string error =
        error_of([&] { mm_all_reduce_add_rms_norm_(x1, x2, residual, gamma, ctx.comm->name()); });
    expect_rank(error.rfind("residual: expected memory disjoint from every input", 0) == 0 &&
                    error.find("overlap with x1") != std::string::npos,
                "got \"", error, "\"");
    const std::string out_form = error_of([&] {
      const Tensor norm_out(DType::f16, {1, kM, kN});
      mm_all_reduce_add_rms_norm_out(x1, x2, residual, gamma, ctx.comm->name(), {}, residual,
                                     norm_out);
    });
    expect_rank(out_form.rfind("y: expected memory disjoint", 0) == 0, "got \"", out_form, "\"");
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

}  // namespace
}  // namespace tpfuse
