// One test per argument rule of docs/SEMANTICS.md: each builds a valid call,
// breaks one thing, and checks the InvalidArgument names the argument first
// and quotes the value given. Accepted calls check every CallShape field.
#include "tpfuse/ops/validate.h"

#include <gtest/gtest.h>

#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "tpfuse/core/error.h"

namespace tpfuse {
namespace {

using Dims = std::vector<std::int64_t>;

TensorView strided(void* data, DType dtype, const Dims& shape, const Dims& strides) {
  return TensorView(data, dtype, shape, strides);
}

// A call's tensors (zero-filled; validation never reads them) and options.
struct Call {
  std::vector<Tensor> owned;
  TensorView x1, x2;
  MmAllReduceOptions options;

  TensorView make(DType dtype, const Dims& shape) {
    owned.emplace_back(dtype, shape);
    return owned.back().view();
  }
  CallShape validate() const { return validate_call(x1, x2, options); }
};

constexpr std::int64_t kM = 16, kK = 512, kN = 64;

Call plain_call(DType dtype = DType::f16) {
  Call call;
  call.x1 = call.make(dtype, {kM, kK});
  call.x2 = call.make(dtype, {kK, kN});
  return call;
}

Call weight_quant_call(DType dtype = DType::f16) {
  Call call;
  call.x1 = call.make(dtype, {kM, kK});
  call.x2 = call.make(DType::i8, {kK, kN});
  call.options.antiquant_scale = call.make(dtype, {kN});
  return call;
}

Call full_quant_call(DType scale_dtype = DType::i64) {
  Call call;
  call.x1 = call.make(DType::i8, {kM, kK});
  call.x2 = call.make(DType::i8, {kK, kN});
  call.options.dequant_scale = call.make(scale_dtype, {1});
  return call;
}

// Runs `action`, expecting an InvalidArgument whose message starts with
// "<name>:" and contains every fragment.
void expect_invalid(const std::function<void()>& action, const std::string& name,
                    std::initializer_list<std::string> fragments) {
  try {
    action();
    ADD_FAILURE() << "expected InvalidArgument about " << name;
  } catch (const InvalidArgument& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.rfind(name + ":", 0), 0u) << message;
    for (const std::string& fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "missing '" << fragment << "' in: " << message;
    }
  }
}

void expect_call_invalid(const Call& call, const std::string& name,
                         std::initializer_list<std::string> fragments) {
  expect_invalid([&] { call.validate(); }, name, fragments);
}

// ---- scalars ----

TEST(Validate, ReduceOpMustBeSum) {
  Call call = plain_call();
  call.options.reduce_op = "max";
  expect_call_invalid(call, "reduce_op", {"only \"sum\" is supported, got \"max\""});
}

TEST(Validate, CommTurnMustNotBeNegative) {
  Call call = plain_call();
  call.options.comm_turn = -1;
  expect_call_invalid(call, "comm_turn", {">= 0", "got -1"});
  call.options.comm_turn = 3;
  EXPECT_EQ(call.validate().comm_turn, 3);
}

// ---- x1 ----

TEST(Validate, X1MustBe2DOr3D) {
  Call call = plain_call();
  call.x1 = call.make(DType::f16, {kK});
  expect_call_invalid(call, "x1", {"2-D", "3-D", "got [512] f16"});
  call.x1 = call.make(DType::f16, {2, 2, 4, kK});
  expect_call_invalid(call, "x1", {"got [2, 2, 4, 512] f16"});
}

TEST(Validate, X1MustNotBeEmpty) {
  Call call = plain_call();
  call.x1 = call.make(DType::f16, {0, kK});
  expect_call_invalid(call, "x1", {"every dim >= 1", "got [0, 512]"});
  call.x1 = call.make(DType::f16, {2, 0, kK});
  expect_call_invalid(call, "x1", {"every dim >= 1", "got [2, 0, 512]"});
}

TEST(Validate, X1DimsAndStridesMustNotBeNegative) {
  Call call = plain_call();
  void* data = call.x1.data();
  call.x1 = strided(data, DType::f16, {-1, kK}, {kK, 1});
  expect_call_invalid(call, "x1", {"dims >= 0", "[-1, 512]"});
  call.x1 = strided(data, DType::f16, {kM, kK}, {-kK, 1});
  expect_call_invalid(call, "x1", {"strides >= 0", "-512"});
}

TEST(Validate, X1MustBeContiguousRowMajor) {
  Call call = plain_call();
  call.x1 = strided(call.x1.data(), DType::f16, {kM / 2, kK}, {2 * kK, 1});
  expect_call_invalid(call, "x1", {"contiguous", "strides [1024, 1]"});
}

TEST(Validate, X1NeedsDataPointer) {
  Call call = plain_call();
  call.x1 = TensorView(nullptr, DType::f16, {kM, kK});
  expect_call_invalid(call, "x1", {"data pointer", "got null"});
}

// Strides are given explicitly: the contiguous constructor would overflow computing them.
TEST(Validate, X1SizesMustFitInt64) {
  Call call = plain_call();
  void* data = call.x1.data();  // never read: validation only does arithmetic
  const std::int64_t huge = std::int64_t{1} << 40;
  call.x1 = strided(data, DType::f16, {huge, huge}, {huge, 1});
  expect_call_invalid(call, "x1", {"fit int64", "[1099511627776, 1099511627776]"});
  // 2^62 elements fit, their 2^63 bytes do not.
  const std::int64_t big = std::int64_t{1} << 31;
  call.x1 = strided(data, DType::f16, {big, big}, {big, 1});
  expect_call_invalid(call, "x1", {"fit int64"});
  // Few elements, but strides that reach past int64.
  call.x1 = strided(data, DType::f16, {3, 2}, {std::int64_t{1} << 62, 1});
  expect_call_invalid(call, "x1", {"fit int64", "strides [4611686018427387904, 1]"});
}

// A DType cast from an integer outside the enum used to be quoted as "?";
// every argument now names its code.
TEST(Validate, UnknownDtypeIsQuotedByItsCode) {
  Call call = plain_call();
  call.x1 = TensorView(call.x1.data(), static_cast<DType>(7), {kM, kK});
  expect_call_invalid(call, "x1", {"expected dtype f16, bf16, f32, i8, i32 or i64",
                                   "got unknown dtype code 7"});
  call = plain_call();
  call.options.bias = TensorView(call.make(DType::f16, {kN}).data(), static_cast<DType>(6), {kN});
  expect_call_invalid(call, "bias", {"got unknown dtype code 6"});
  call = plain_call();
  const TensorView out(call.make(DType::f16, {kM, kN}).data(), static_cast<DType>(200), {kM, kN});
  expect_invalid([&] { validate_out(call.validate(), out, call.x1, call.x2, call.options); }, "out",
                 {"got unknown dtype code 200"});
  // Quoted as given where the argument is not allowed at all.
  call = plain_call();
  call.options.dequant_scale =
      TensorView(call.make(DType::i64, {1}).data(), static_cast<DType>(6), {1});
  expect_call_invalid(call, "dequant_scale",
                      {"expected none in plain mode", "got [1] unknown dtype code 6"});
}

// ---- x2 ----

TEST(Validate, X2MustBe2D) {
  Call call = plain_call();
  call.x2 = call.make(DType::f16, {kK});
  expect_call_invalid(call, "x2", {"2-D [k, n]", "got [512] f16"});
  call.x2 = call.make(DType::f16, {1, kK, kN});
  expect_call_invalid(call, "x2", {"got [1, 512, 64] f16"});
}

TEST(Validate, X2MustNotBeEmpty) {
  Call call = plain_call();
  call.x2 = call.make(DType::f16, {kK, 0});
  expect_call_invalid(call, "x2", {"every dim >= 1", "got [512, 0]"});
}

TEST(Validate, X2NeedsDataPointerAndNonNegativeStrides) {
  Call call = plain_call();
  void* data = call.x2.data();
  call.x2 = TensorView(nullptr, DType::f16, {kK, kN});
  expect_call_invalid(call, "x2", {"got null"});
  call.x2 = strided(data, DType::f16, {kK, kN}, {kN, -1});
  expect_call_invalid(call, "x2", {"strides >= 0"});
}

TEST(Validate, X2MustBeRowMajorOrATransposedRowMajor) {
  Call call = plain_call();
  call.x2 = strided(call.x2.data(), DType::f16, {kK, kN / 2}, {1, 2 * kK});
  expect_call_invalid(call, "x2", {"row-major [k, n]", "transposed", "strides [1, 1024]"});
  call.x2 = strided(call.x2.data(), DType::f16, {kK / 2, kN}, {2 * kN, 1});
  expect_call_invalid(call, "x2", {"strides [128, 1]"});
}

TEST(Validate, X2TransposedViewIsAccepted) {
  Call call = plain_call();
  call.x2 = call.make(DType::f16, {kN, kK}).transposed();
  const CallShape shape = call.validate();
  EXPECT_TRUE(shape.x2_transposed);
  EXPECT_EQ(shape.k, kK);
  EXPECT_EQ(shape.n, kN);
}

TEST(Validate, X2OfOneColumnCountsAsRowMajor) {
  Call call = plain_call();
  call.x2 = call.make(DType::f16, {1, kK}).transposed();
  const CallShape shape = call.validate();
  EXPECT_FALSE(shape.x2_transposed);
  EXPECT_EQ(shape.n, 1);
}

TEST(Validate, KMustMatchX1LastDim) {
  Call call = plain_call();
  call.x2 = call.make(DType::f16, {256, kN});
  expect_call_invalid(call, "x2", {"k = 512", "got [256, 64] f16"});
}

TEST(Validate, OutputSizeMustFitInt64) {
  Call call = plain_call();
  const std::int64_t huge = std::int64_t{1} << 40;
  call.x1 = TensorView(call.x1.data(), DType::f16, {huge, 1});
  call.x2 = TensorView(call.x2.data(), DType::f16, {1, huge});
  expect_call_invalid(call, "out", {"fit int64", "[1099511627776, 1099511627776]"});
}

// ---- dtype pairs ----

TEST(Validate, PlainDtypesMustMatch) {
  Call call = plain_call();
  call.x2 = call.make(DType::bf16, {kK, kN});
  expect_call_invalid(call, "x2", {"expected dtype f16 (plain mode, same as x1)", "got bf16"});
}

TEST(Validate, FloatX1NeedsSameFloatOrInt8X2) {
  Call call = plain_call(DType::bf16);
  call.x2 = call.make(DType::i32, {kK, kN});
  expect_call_invalid(call, "x2", {"bf16", "i8", "got i32"});
}

TEST(Validate, Int8X1NeedsInt8X2) {
  Call call = full_quant_call();
  call.x2 = call.make(DType::f16, {kK, kN});
  expect_call_invalid(call, "x2", {"expected dtype i8", "x1 is i8", "got f16"});
}

TEST(Validate, X1DtypeMustBeF16Bf16OrInt8) {
  Call call = plain_call();
  call.x1 = call.make(DType::f32, {kM, kK});
  call.x2 = call.make(DType::f32, {kK, kN});
  expect_call_invalid(call, "x1", {"got f32", "x2 is f32"});
}

// ---- bias ----

TEST(Validate, BiasMustHaveShapeN) {
  Call call = plain_call();
  call.options.bias = call.make(DType::f16, {kN + 1});
  expect_call_invalid(call, "bias", {"expected shape [64] (n), got [65] f16"});
  call.options.bias = call.make(DType::f16, {1, kN});
  expect_call_invalid(call, "bias", {"got [1, 64] f16"});
}

TEST(Validate, BiasDtypeFollowsX1) {
  Call call = weight_quant_call(DType::bf16);
  call.options.bias = call.make(DType::f16, {kN});
  expect_call_invalid(call, "bias", {"expected dtype bf16 (same as x1), got f16"});
}

TEST(Validate, BiasIsInt32InFullQuant) {
  Call call = full_quant_call();
  call.options.bias = call.make(DType::f16, {kN});
  expect_call_invalid(call, "bias", {"expected dtype i32", "got f16"});
  call.options.bias = call.make(DType::i32, {kN});
  EXPECT_TRUE(call.validate().has_bias);
}

TEST(Validate, BiasMustBeContiguousAndHaveData) {
  Call call = plain_call();
  void* data = call.make(DType::f16, {2 * kN}).data();
  call.options.bias = strided(data, DType::f16, {kN}, {2});
  expect_call_invalid(call, "bias", {"contiguous", "strides [2]"});
  call.options.bias = TensorView(nullptr, DType::f16, {kN});
  expect_call_invalid(call, "bias", {"got null"});
}

// ---- x3 ----

TEST(Validate, X3MustHaveTheOutputShape) {
  Call call = plain_call();
  call.options.x3 = call.make(DType::f16, {kM, kN + 1});
  expect_call_invalid(call, "x3", {"expected shape [16, 64]", "got [16, 65] f16"});
  call.x1 = call.make(DType::f16, {2, 8, kK});
  call.options.x3 = call.make(DType::f16, {kM, kN});
  expect_call_invalid(call, "x3", {"expected shape [2, 8, 64]", "got [16, 64] f16"});
}

TEST(Validate, X3DtypeFollowsX1) {
  Call call = plain_call();
  call.options.x3 = call.make(DType::bf16, {kM, kN});
  expect_call_invalid(call, "x3", {"expected dtype f16 (same as x1), got bf16"});
}

TEST(Validate, X3DtypeIsTheOutputDtypeInFullQuant) {
  Call call = full_quant_call(DType::bf16);
  call.options.x3 = call.make(DType::f16, {kM, kN});
  expect_call_invalid(call, "x3", {"expected dtype bf16 (the output dtype), got f16"});
  call.options.x3 = call.make(DType::bf16, {kM, kN});
  EXPECT_TRUE(call.validate().has_x3);
}

TEST(Validate, X3MustBeContiguous) {
  Call call = plain_call();
  call.options.x3 = call.make(DType::f16, {kN, kM}).transposed();
  expect_call_invalid(call, "x3", {"contiguous", "[16, 64] f16 strides [1, 16]"});
}

// ---- plain mode ----

TEST(Validate, PlainRejectsEveryScale) {
  Call call = plain_call();
  call.options.antiquant_scale = call.make(DType::f16, {kN});
  expect_call_invalid(call, "antiquant_scale", {"expected none in plain mode", "got [64] f16"});
  call = plain_call();
  call.options.antiquant_offset = call.make(DType::f16, {kN});
  expect_call_invalid(call, "antiquant_offset", {"expected none in plain mode"});
  call = plain_call();
  call.options.dequant_scale = call.make(DType::i64, {1});
  expect_call_invalid(call, "dequant_scale", {"expected none in plain mode", "got [1] i64"});
}

TEST(Validate, PlainRejectsGroupSize) {
  Call call = plain_call();
  call.options.antiquant_group_size = 32;
  expect_call_invalid(call, "antiquant_group_size", {"expected 0 in plain mode", "got 32"});
}

// ---- weight-only quant ----

TEST(Validate, WeightQuantRequiresAntiquantScale) {
  Call call = weight_quant_call();
  call.options.antiquant_scale.reset();
  expect_call_invalid(call, "antiquant_scale", {"required", "got none"});
}

TEST(Validate, AntiquantOffsetNeedsAScale) {
  Call call = weight_quant_call();
  call.options.antiquant_scale.reset();
  call.options.antiquant_offset = call.make(DType::f16, {kN});
  expect_call_invalid(call, "antiquant_offset", {"antiquant_scale", "without a scale"});
}

TEST(Validate, AntiquantScaleDtypeFollowsX1) {
  Call call = weight_quant_call(DType::f16);
  call.options.antiquant_scale = call.make(DType::bf16, {kN});
  expect_call_invalid(call, "antiquant_scale", {"expected dtype f16 (same as x1), got bf16"});
}

TEST(Validate, AntiquantScaleShapeWithoutGroups) {
  Call call = weight_quant_call();
  call.options.antiquant_scale = call.make(DType::f16, {2, kN});
  expect_call_invalid(call, "antiquant_scale",
                      {"[1] (per-tensor), [64] or [1, 64]", "got [2, 64]"});
  call.options.antiquant_scale = call.make(DType::f16, {kN + 1});
  expect_call_invalid(call, "antiquant_scale", {"got [65] f16"});
}

TEST(Validate, AntiquantScaleMustBeContiguousAndHaveData) {
  Call call = weight_quant_call();
  void* data = call.make(DType::f16, {2 * kN}).data();
  call.options.antiquant_scale = strided(data, DType::f16, {kN}, {2});
  expect_call_invalid(call, "antiquant_scale", {"contiguous"});
  call.options.antiquant_scale = TensorView(nullptr, DType::f16, {kN});
  expect_call_invalid(call, "antiquant_scale", {"got null"});
}

TEST(Validate, GroupSizeMustBeAMultipleOf32BelowK) {
  Call call = weight_quant_call();
  call.options.antiquant_scale = call.make(DType::f16, {16, kN});
  for (const std::int64_t bad : {48, 16, -32, 512, 1024}) {
    call.options.antiquant_group_size = bad;
    expect_call_invalid(
        call, "antiquant_group_size",
        {"expected a multiple of 32 in [32, k-1] = [32, 511], got " + std::to_string(bad)});
  }
}

TEST(Validate, GroupedScaleMustBeCeilKOverGByN) {
  Call call = weight_quant_call();
  call.options.antiquant_group_size = 32;
  expect_call_invalid(call, "antiquant_scale",
                      {"expected shape [16, 64]", "antiquant_group_size G = 32", "got [64] f16"});
  call.options.antiquant_scale = call.make(DType::f16, {15, kN});
  expect_call_invalid(call, "antiquant_scale", {"got [15, 64] f16"});
}

TEST(Validate, AntiquantOffsetMustMatchTheScale) {
  Call call = weight_quant_call();
  call.options.antiquant_offset = call.make(DType::f16, {1, kN});
  expect_call_invalid(
      call, "antiquant_offset",
      {"expected [64] f16 (same shape and dtype as antiquant_scale)", "got [1, 64] f16"});
  call.options.antiquant_offset = call.make(DType::bf16, {kN});
  expect_call_invalid(call, "antiquant_offset", {"got [64] bf16"});
  void* data = call.make(DType::f16, {2 * kN}).data();
  call.options.antiquant_offset = strided(data, DType::f16, {kN}, {2});
  expect_call_invalid(call, "antiquant_offset", {"contiguous"});
}

TEST(Validate, WeightQuantRejectsDequantScale) {
  Call call = weight_quant_call();
  call.options.dequant_scale = call.make(DType::i64, {1});
  expect_call_invalid(call, "dequant_scale", {"expected none in weight-only quant mode"});
}

// ---- full quant ----

TEST(Validate, FullQuantRequiresDequantScale) {
  Call call = full_quant_call();
  call.options.dequant_scale.reset();
  expect_call_invalid(call, "dequant_scale", {"required in full quant mode", "got none"});
}

TEST(Validate, DequantScaleDtypeIsInt64OrBf16) {
  Call call = full_quant_call();
  call.options.dequant_scale = call.make(DType::f16, {1});
  expect_call_invalid(call, "dequant_scale", {"i64", "bf16", "got f16"});
  call.options.dequant_scale = call.make(DType::f32, {1});
  expect_call_invalid(call, "dequant_scale", {"got f32"});
}

TEST(Validate, DequantScaleShape) {
  Call call = full_quant_call();
  call.options.dequant_scale = call.make(DType::i64, {2});
  expect_call_invalid(call, "dequant_scale", {"[1] (per-tensor), [64] or [1, 64]", "got [2] i64"});
  call.options.dequant_scale = call.make(DType::i64, {kN, 1});
  expect_call_invalid(call, "dequant_scale", {"got [64, 1] i64"});
  void* data = call.make(DType::i64, {2 * kN}).data();
  call.options.dequant_scale = strided(data, DType::i64, {kN}, {2});
  expect_call_invalid(call, "dequant_scale", {"contiguous"});
}

TEST(Validate, FullQuantRejectsAntiquantArguments) {
  Call call = full_quant_call();
  call.options.antiquant_scale = call.make(DType::f16, {kN});
  expect_call_invalid(call, "antiquant_scale", {"expected none in full quant mode (x1 i8, x2 i8)"});
  call = full_quant_call();
  call.options.antiquant_offset = call.make(DType::f16, {kN});
  expect_call_invalid(call, "antiquant_offset", {"expected none in full quant mode"});
  call = full_quant_call();
  call.options.antiquant_group_size = 32;
  expect_call_invalid(call, "antiquant_group_size", {"expected 0 in full quant mode", "got 32"});
}

TEST(Validate, FullQuantKIsAtMost65535) {
  Call call = full_quant_call();
  call.x1 = call.make(DType::i8, {2, kMaxFullQuantK + 1});
  call.x2 = call.make(DType::i8, {kMaxFullQuantK + 1, 4});
  expect_call_invalid(call, "x1", {"k <= 65535", "got k = 65536"});
  call.x1 = call.make(DType::i8, {2, kMaxFullQuantK});
  call.x2 = call.make(DType::i8, {kMaxFullQuantK, 4});
  EXPECT_EQ(call.validate().k, kMaxFullQuantK);
}

// ---- accepted calls fill CallShape ----

TEST(Validate, PlainCallShape) {
  Call call = plain_call(DType::bf16);
  call.options.bias = call.make(DType::bf16, {kN});
  const CallShape s = call.validate();
  EXPECT_EQ(s.mode, Mode::plain);
  EXPECT_EQ(s.in_dtype, DType::bf16);
  EXPECT_EQ(s.out_dtype, DType::bf16);
  EXPECT_EQ(s.batch, 0);
  EXPECT_EQ(s.seq, 0);
  EXPECT_EQ(s.m, kM);
  EXPECT_EQ(s.k, kK);
  EXPECT_EQ(s.n, kN);
  EXPECT_FALSE(s.x2_transposed);
  EXPECT_TRUE(s.has_bias);
  EXPECT_FALSE(s.has_x3);
  EXPECT_EQ(s.scale_kind, ScaleKind::none);
  EXPECT_FALSE(s.has_offset);
  EXPECT_EQ(s.group_size, 0);
  EXPECT_EQ(s.comm_turn, 0);
}

TEST(Validate, ThreeDimensionalX1) {
  Call call = plain_call();
  call.x1 = call.make(DType::f16, {2, 8, kK});
  call.options.x3 = call.make(DType::f16, {2, 8, kN});
  const CallShape s = call.validate();
  EXPECT_EQ(s.batch, 2);
  EXPECT_EQ(s.seq, 8);
  EXPECT_EQ(s.m, 16);
  EXPECT_TRUE(s.has_x3);
}

TEST(Validate, WeightQuantScaleLayouts) {
  struct Layout {
    Dims scale_shape;
    std::int64_t group_size;
    ScaleKind kind;
  };
  const Layout layouts[] = {
      {{1}, 0, ScaleKind::per_tensor},
      {{kN}, 0, ScaleKind::per_channel},
      {{1, kN}, 0, ScaleKind::per_channel},
      {{16, kN}, 32, ScaleKind::per_group},
      {{2, kN}, 256, ScaleKind::per_group},
      {{2, kN}, 480, ScaleKind::per_group},  // ragged: 480 + 32
  };
  for (const Layout& layout : layouts) {
    for (const bool with_offset : {false, true}) {
      Call call = weight_quant_call(DType::bf16);
      call.options.antiquant_scale = call.make(DType::bf16, layout.scale_shape);
      if (with_offset) call.options.antiquant_offset = call.make(DType::bf16, layout.scale_shape);
      call.options.antiquant_group_size = layout.group_size;
      const CallShape s = call.validate();
      EXPECT_EQ(s.mode, Mode::weight_quant);
      EXPECT_EQ(s.out_dtype, DType::bf16);
      EXPECT_EQ(s.scale_kind, layout.kind) << scale_kind_name(s.scale_kind);
      EXPECT_EQ(s.group_size, layout.group_size);
      EXPECT_EQ(s.has_offset, with_offset);
    }
  }
}

TEST(Validate, RaggedGroupsRoundUp) {
  Call call = weight_quant_call();
  call.x1 = call.make(DType::f16, {kM, 500});
  call.x2 = call.make(DType::i8, {500, kN});
  call.options.antiquant_group_size = 64;
  call.options.antiquant_scale = call.make(DType::f16, {8, kN});  // ceil(500 / 64)
  EXPECT_EQ(call.validate().scale_kind, ScaleKind::per_group);
  call.options.antiquant_scale = call.make(DType::f16, {7, kN});
  expect_call_invalid(call, "antiquant_scale", {"expected shape [8, 64]"});
}

TEST(Validate, FullQuantOutputDtypeFollowsTheScale) {
  struct Layout {
    DType scale_dtype;
    Dims scale_shape;
    ScaleKind kind;
    DType out;
  };
  const Layout layouts[] = {
      {DType::i64, {1}, ScaleKind::per_tensor, DType::f16},
      {DType::i64, {kN}, ScaleKind::per_channel, DType::f16},
      {DType::bf16, {1, kN}, ScaleKind::per_channel, DType::bf16},
      {DType::bf16, {1}, ScaleKind::per_tensor, DType::bf16},
  };
  for (const Layout& layout : layouts) {
    Call call = full_quant_call();
    call.options.dequant_scale = call.make(layout.scale_dtype, layout.scale_shape);
    call.options.bias = call.make(DType::i32, {kN});
    call.options.x3 = call.make(layout.out, {kM, kN});
    call.x2 = call.make(DType::i8, {kN, kK}).transposed();
    const CallShape s = call.validate();
    EXPECT_EQ(s.mode, Mode::full_quant);
    EXPECT_EQ(s.in_dtype, DType::i8);
    EXPECT_EQ(s.out_dtype, layout.out);
    EXPECT_EQ(s.scale_kind, layout.kind);
    EXPECT_TRUE(s.x2_transposed);
    EXPECT_TRUE(s.has_bias);
    EXPECT_TRUE(s.has_x3);
  }
}

// ---- validate_out ----

void expect_out_invalid(const Call& call, const TensorView& out,
                        std::initializer_list<std::string> fragments) {
  const CallShape shape = call.validate();
  expect_invalid([&] { validate_out(shape, out, call.x1, call.x2, call.options); }, "out",
                 fragments);
}

TEST(ValidateOut, AcceptsASeparateOutput) {
  Call call = plain_call();
  const TensorView out = call.make(DType::f16, {kM, kN});
  EXPECT_NO_THROW(validate_out(call.validate(), out, call.x1, call.x2, call.options));
}

TEST(ValidateOut, DtypeMustBeTheOutputDtype) {
  Call call = full_quant_call(DType::bf16);
  expect_out_invalid(call, call.make(DType::f16, {kM, kN}), {"expected dtype bf16", "got f16"});
}

TEST(ValidateOut, ShapeMustBeTheOutputShape) {
  Call call = plain_call();
  call.x1 = call.make(DType::f16, {2, 8, kK});
  expect_out_invalid(call, call.make(DType::f16, {kM, kN}),
                     {"expected shape [2, 8, 64]", "got [16, 64] f16"});
}

TEST(ValidateOut, MustBeContiguousAndHaveData) {
  Call call = plain_call();
  expect_out_invalid(call, call.make(DType::f16, {kN, kM}).transposed(), {"contiguous"});
  expect_out_invalid(call, TensorView(nullptr, DType::f16, {kM, kN}), {"got null"});
}

TEST(ValidateOut, MustNotOverlapAnyInput) {
  // Every input in its own 64 KiB slot of one buffer, so an output starting on
  // an input's last byte overlaps that input and no other.
  constexpr std::int64_t kSlot = 64 * 1024;
  Call call;
  auto* arena = static_cast<std::byte*>(call.make(DType::i8, {8 * kSlot}).data());
  const auto slot = [&](int index) { return arena + index * kSlot; };
  call.x1 = TensorView(slot(0), DType::f16, {kM, kK});
  call.x2 = TensorView(slot(1), DType::i8, {kK, kN});
  call.options.antiquant_scale = TensorView(slot(2), DType::f16, {kN});
  call.options.antiquant_offset = TensorView(slot(3), DType::f16, {kN});
  call.options.bias = TensorView(slot(4), DType::f16, {kN});
  call.options.x3 = TensorView(slot(5), DType::f16, {kM, kN});
  const std::pair<const char*, TensorView> inputs[] = {
      {"x1", call.x1},
      {"x2", call.x2},
      {"antiquant_scale", *call.options.antiquant_scale},
      {"antiquant_offset", *call.options.antiquant_offset},
      {"bias", *call.options.bias},
      {"x3", *call.options.x3},
  };
  for (const auto& [name, input] : inputs) {
    auto* last_byte = static_cast<std::byte*>(input.data()) +
                      input.numel() * static_cast<std::int64_t>(dtype_size(input.dtype())) - 1;
    expect_out_invalid(call, TensorView(last_byte, DType::f16, {kM, kN}),
                       {std::string("overlap with ") + name});
  }
  EXPECT_NO_THROW(validate_out(call.validate(), TensorView(slot(6), DType::f16, {kM, kN}), call.x1,
                               call.x2, call.options));

  Call full = full_quant_call();
  full.options.dequant_scale = TensorView(slot(7), DType::i64, {1});
  expect_out_invalid(full, TensorView(slot(7), DType::f16, {kM, kN}),
                     {"overlap with dequant_scale"});
}

TEST(ValidateOut, MayTouchAnInputsEnd) {
  Call call = plain_call();
  // x1 and out in one buffer, out starting right after x1's last byte.
  auto* buffer = static_cast<std::byte*>(call.make(DType::f16, {kM * (kK + kN)}).data());
  call.x1 = TensorView(buffer, DType::f16, {kM, kK});
  const TensorView out(buffer + kM * kK * 2, DType::f16, {kM, kN});
  EXPECT_NO_THROW(validate_out(call.validate(), out, call.x1, call.x2, call.options));
}

// ---- tensors ----

TEST(Tensors, NegativeDimIsRejectedWithTheShape) {
  expect_invalid([] { Tensor(DType::f16, {4, -2}); }, "tensor", {"negative dim", "[4, -2] f16"});
}

TEST(Tensors, OnlyA2DViewTransposes) {
  Tensor t(DType::bf16, {2, 3, 4});
  expect_invalid([&] { (void)t.view().transposed(); }, "transposed", {"2-D", "[2, 3, 4] bf16"});
  const Tensor matrix(DType::f32, {2, 3});
  const TensorView flipped = matrix.view().transposed();
  EXPECT_EQ(flipped.shape()[0], 3);
  EXPECT_EQ(flipped.shape()[1], 2);
}

}  // namespace
}  // namespace tpfuse
