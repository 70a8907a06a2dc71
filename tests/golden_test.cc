// The golden model against hand-computed cases for every mode, its error
// bound against an fp32 simulation of the contract's numerics, compare(), and
// the deterministic input builder.
#include "tpfuse/testing/golden.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "element_access.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/ops/quant_param.h"
#include "tpfuse/ops/validate.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse::testing {
namespace {

using Dims = std::vector<std::int64_t>;

// Tensors for hand-written cases, kept alive with the arguments that view them.
struct HandCase {
  std::vector<Tensor> owned;
  std::vector<RankArgs> ranks;

  TensorView tensor(DType dtype, const Dims& shape, const std::vector<double>& values) {
    owned.emplace_back(dtype, shape);
    const TensorView view = owned.back().view();
    EXPECT_EQ(view.numel(), static_cast<std::int64_t>(values.size()));
    for (std::size_t i = 0; i < values.size(); ++i)
      store(view, static_cast<std::int64_t>(i), values[i]);
    return view;
  }
};

void expect_values(const GoldenResult& golden, const std::vector<double>& expected) {
  ASSERT_EQ(golden.value.size(), expected.size());
  for (std::size_t e = 0; e < expected.size(); ++e) {
    EXPECT_EQ(golden.value[e], expected[e]) << "element " << e;
    EXPECT_GT(golden.bound[e], 0.0) << "element " << e;
  }
}

// ---- hand-computed cases ----

TEST(Golden, PlainMatmulBiasAndX3) {
  HandCase c;
  RankArgs& a = c.ranks.emplace_back();
  a.x1 = c.tensor(DType::f16, {2, 3}, {1, 2, 3, 4, 5, 6});
  a.x2 = c.tensor(DType::f16, {3, 2}, {1, 0, 0, 1, 1, 1});
  a.options.bias = c.tensor(DType::f16, {2}, {0.5, -1});
  a.options.x3 = c.tensor(DType::f16, {2, 2}, {0.25, 0, 0, -0.25});
  // x1 @ x2 = [[4, 5], [10, 11]]
  expect_values(golden_mm_all_reduce(c.ranks), {4.75, 4, 10.5, 9.75});
}

TEST(Golden, BiasAndX3AreAddedOnEveryRank) {
  HandCase c;
  for (int r = 0; r < 2; ++r) {
    RankArgs& a = c.ranks.emplace_back();
    a.x1 = c.tensor(DType::bf16, {1, 2}, {1.0 + r, 1});
    a.x2 = c.tensor(DType::bf16, {2, 1}, {2, 3});
    a.options.bias = c.tensor(DType::bf16, {1}, {10});
    a.options.x3 = c.tensor(DType::bf16, {1, 1}, {100});
  }
  // rank 0: 2 + 3 + 110, rank 1: 4 + 3 + 110.
  expect_values(golden_mm_all_reduce(c.ranks), {232});
}

TEST(Golden, WeightQuantPerChannelWithOffset) {
  HandCase c;
  RankArgs& a = c.ranks.emplace_back();
  a.x1 = c.tensor(DType::f16, {1, 2}, {1, 2});
  a.x2 = c.tensor(DType::i8, {2, 2}, {1, -2, 3, 4});
  a.options.antiquant_scale = c.tensor(DType::f16, {2}, {0.5, 0.25});
  a.options.antiquant_offset = c.tensor(DType::f16, {2}, {1, -1});
  // w = [[(1+1)*0.5, (-2-1)*0.25], [(3+1)*0.5, (4-1)*0.25]] = [[1, -0.75], [2, 0.75]]
  expect_values(golden_mm_all_reduce(c.ranks), {5, 0.75});
}

TEST(Golden, WeightQuantPerTensor) {
  HandCase c;
  RankArgs& a = c.ranks.emplace_back();
  a.x1 = c.tensor(DType::bf16, {1, 2}, {1, 2});
  a.x2 = c.tensor(DType::i8, {2, 2}, {1, -2, 3, 4});
  a.options.antiquant_scale = c.tensor(DType::bf16, {1}, {2});
  a.options.bias = c.tensor(DType::bf16, {2}, {1, 1});
  expect_values(golden_mm_all_reduce(c.ranks), {15, 13});
}

// k = 40 with G = 32: rows 0..31 form group 0, rows 32..39 the ragged group 1.
TEST(Golden, WeightQuantPerGroupWithRaggedLastGroup) {
  HandCase c;
  RankArgs& a = c.ranks.emplace_back();
  std::vector<double> x1(40);
  for (int l = 0; l < 40; ++l) x1[l] = l < 32 ? 1 : 2;
  a.x1 = c.tensor(DType::f16, {1, 40}, x1);
  a.x2 = c.tensor(DType::i8, {40, 1}, std::vector<double>(40, 1));
  a.options.antiquant_group_size = 32;
  a.options.antiquant_scale = c.tensor(DType::f16, {2, 1}, {0.5, 2});
  a.options.antiquant_offset = c.tensor(DType::f16, {2, 1}, {1, 0.5});
  // group 0: 32 * 1 * (1+1)*0.5 = 32; group 1: 8 * 2 * (1+0.5)*2 = 48
  expect_values(golden_mm_all_reduce(c.ranks), {80});
  EXPECT_EQ(golden_mm_all_reduce(c.ranks).shape.scale_kind, ScaleKind::per_group);
}

TEST(Golden, FullQuantPackedScaleBiasAndX3) {
  HandCase c;
  RankArgs& a = c.ranks.emplace_back();
  a.x1 = c.tensor(DType::i8, {2, 2}, {1, 2, 3, -4});
  a.x2 = c.tensor(DType::i8, {2, 2}, {5, 1, 6, -1});
  a.options.bias = c.tensor(DType::i32, {2}, {10, -10});
  a.options.dequant_scale = c.tensor(DType::i64, {2}, {0, 0});
  a.options.dequant_scale->data_as<std::int64_t>()[0] = trans_quant_param(0.5f, 3.0f);
  a.options.dequant_scale->data_as<std::int64_t>()[1] = trans_quant_param(-0.25f);
  a.options.x3 = c.tensor(DType::f16, {2, 2}, {1, 0, 0, 2});
  // acc + bias = [[17 + 10, -1 - 10], [-9 + 10, 7 - 10]] = [[27, -11], [1, -3]]
  const GoldenResult golden = golden_mm_all_reduce(c.ranks);
  EXPECT_EQ(golden.shape.out_dtype, DType::f16);
  expect_values(golden, {14.5, 2.75, 0.5, 2.75});
}

TEST(Golden, FullQuantBf16Scale) {
  HandCase c;
  RankArgs& a = c.ranks.emplace_back();
  a.x1 = c.tensor(DType::i8, {2, 2}, {1, 2, 3, -4});
  a.x2 = c.tensor(DType::i8, {2, 1}, {5, 6});
  a.options.dequant_scale = c.tensor(DType::bf16, {1}, {0.5});
  a.options.x3 = c.tensor(DType::bf16, {2, 1}, {1, 2});
  const GoldenResult golden = golden_mm_all_reduce(c.ranks);
  EXPECT_EQ(golden.shape.out_dtype, DType::bf16);
  expect_values(golden, {9.5, -2.5});
}

// 127*127 + 127*127 = 32258; with bias 2^31 - 32258 the int32 sum is 2^31,
// which wraps to -2^31 as the device's int32 accumulator does.
TEST(Golden, FullQuantInt32SumWraps) {
  HandCase c;
  RankArgs& a = c.ranks.emplace_back();
  a.x1 = c.tensor(DType::i8, {1, 2}, {127, 127});
  a.x2 = c.tensor(DType::i8, {2, 1}, {127, 127});
  a.options.bias = c.tensor(DType::i32, {1}, {2147483648.0 - 32258});
  a.options.dequant_scale = c.tensor(DType::i64, {1}, {0});
  a.options.dequant_scale->data_as<std::int64_t>()[0] = trans_quant_param(0x1p-20f);
  expect_values(golden_mm_all_reduce(c.ranks), {-2048});
}

TEST(Golden, ThreeDimensionalX1) {
  HandCase c;
  RankArgs& a = c.ranks.emplace_back();
  a.x1 = c.tensor(DType::f16, {2, 1, 3}, {1, 2, 3, 4, 5, 6});
  a.x2 = c.tensor(DType::f16, {3, 2}, {1, 0, 0, 1, 1, 1});
  a.options.x3 = c.tensor(DType::f16, {2, 1, 2}, {1, 1, 1, 1});
  const GoldenResult golden = golden_mm_all_reduce(c.ranks);
  EXPECT_EQ(golden.shape.batch, 2);
  EXPECT_EQ(golden.shape.seq, 1);
  expect_values(golden, {5, 6, 11, 12});
}

TEST(Golden, TransposedX2GivesTheSameResult) {
  CaseSpec spec;
  spec.mode = Mode::weight_quant;
  spec.scale_kind = ScaleKind::per_group;
  spec.group_size = 32;
  spec.k = 80;
  spec.n = 24;
  spec.offset = true;
  RankInputs in = make_rank_inputs(spec, 0);
  Tensor storage(DType::i8, {spec.n, spec.k});
  for (std::int64_t l = 0; l < spec.k; ++l) {
    for (std::int64_t j = 0; j < spec.n; ++j) {
      storage.data_as<std::int8_t>()[j * spec.k + l] = in.x2.data_as<std::int8_t>()[l * spec.n + j];
    }
  }
  RankArgs transposed = in.args;
  transposed.x2 = storage.view().transposed();
  const GoldenResult row_major = golden_mm_all_reduce(std::span(&in.args, 1));
  const GoldenResult from_transposed = golden_mm_all_reduce(std::span(&transposed, 1));
  EXPECT_TRUE(from_transposed.shape.x2_transposed);
  EXPECT_EQ(row_major.value, from_transposed.value);
  EXPECT_EQ(row_major.bound, from_transposed.bound);
}

TEST(Golden, RanksMustAgree) {
  CaseSpec spec;
  std::vector<RankInputs> inputs;
  inputs.push_back(make_rank_inputs(spec, 0));
  spec.n = 8;
  inputs.push_back(make_rank_inputs(spec, 1));
  const std::vector<RankArgs> ranks = {inputs[0].args, inputs[1].args};
  EXPECT_THROW(golden_mm_all_reduce(ranks), DisagreementError);
  EXPECT_THROW(golden_mm_all_reduce(std::span<const RankArgs>()), InvalidArgument);
}

TEST(Golden, ValidatesEachRank) {
  RankInputs in = make_rank_inputs(CaseSpec{}, 0);
  in.args.options.reduce_op = "max";
  EXPECT_THROW(golden_mm_all_reduce(std::span(&in.args, 1)), InvalidArgument);
}

// ---- the bound ----

GoldenResult ones_case(std::int64_t k, int ranks) {
  HandCase c;
  for (int r = 0; r < ranks; ++r) {
    RankArgs& a = c.ranks.emplace_back();
    a.x1 = c.tensor(DType::f16, {1, k}, std::vector<double>(k, 1));
    a.x2 = c.tensor(DType::f16, {k, 1}, std::vector<double>(k, 1));
  }
  return golden_mm_all_reduce(c.ranks);
}

TEST(GoldenBound, IsPositiveAndGrowsWithK) {
  const GoldenResult small = ones_case(32, 1);
  const GoldenResult large = ones_case(4096, 1);
  EXPECT_EQ(small.value[0], 32);
  EXPECT_EQ(large.value[0], 4096);
  EXPECT_GT(small.bound[0], 0);
  EXPECT_GT(large.bound[0] / large.value[0], small.bound[0] / small.value[0]);
  // f16 output: two roundings of 2^-11 dominate; the fp32 terms stay small.
  EXPECT_LT(small.bound[0] / small.value[0], 3 * 0x1p-11);
  EXPECT_GT(ones_case(32, 4).bound[0], ones_case(32, 2).bound[0]);
}

TEST(GoldenBound, ZeroInputsStillAllowTheSmallestSubnormal) {
  HandCase c;
  RankArgs& a = c.ranks.emplace_back();
  a.x1 = c.tensor(DType::f16, {1, 1}, {0});
  a.x2 = c.tensor(DType::f16, {1, 1}, {0});
  const GoldenResult golden = golden_mm_all_reduce(c.ranks);
  EXPECT_EQ(golden.value[0], 0);
  // Two roundings to f16 (the partial, the sum), each up to half 2^-24.
  EXPECT_GE(golden.bound[0], 0x1p-24);
  EXPECT_LT(golden.bound[0], 0x1p-23);
}

// ---- compare ----

// An output holding the golden value rounded once to `dtype`.
Tensor rounded_output(const GoldenResult& golden, DType dtype) {
  Tensor out(dtype, {golden.shape.m, golden.shape.n});
  for (std::size_t e = 0; e < golden.value.size(); ++e) {
    store(out, static_cast<std::int64_t>(e), golden.value[e]);
  }
  return out;
}

GoldenResult random_plain_golden() {
  CaseSpec spec;
  spec.bias = true;
  spec.x3 = true;
  std::vector<RankInputs> inputs;
  std::vector<RankArgs> ranks;
  for (int r = 0; r < 2; ++r) inputs.push_back(make_rank_inputs(spec, r));
  for (const RankInputs& in : inputs) ranks.push_back(in.args);
  return golden_mm_all_reduce(ranks);
}

TEST(Compare, AcceptsTheRoundedGoldenValue) {
  const GoldenResult golden = random_plain_golden();
  const Comparison result = compare(rounded_output(golden, DType::f16), golden);
  EXPECT_TRUE(result.ok());
  EXPECT_LE(result.worst_ratio, 1.0);
  EXPECT_GT(result.max_abs_error, 0.0);
  EXPECT_GT(result.max_bound, 0.0);
  EXPECT_TRUE(compare(rounded_output(golden, DType::f32), golden).ok());
}

TEST(Compare, DetectsOneWrongValue) {
  const GoldenResult golden = random_plain_golden();
  Tensor out = rounded_output(golden, DType::f16);
  const std::int64_t e = 37;
  store(out, e, golden.value[e] * 1.01 + 0.01);
  const Comparison result = compare(out, golden);
  EXPECT_EQ(result.mismatches, 1);
  EXPECT_GT(result.worst_ratio, 1.0);
  EXPECT_FALSE(result.ok());

  Tensor flipped = rounded_output(golden, DType::f16);
  const auto largest =
      std::max_element(golden.value.begin(), golden.value.end(),
                       [](double a, double b) { return std::abs(a) < std::abs(b); });
  store(flipped, largest - golden.value.begin(), -*largest);
  EXPECT_EQ(compare(flipped, golden).mismatches, 1);
}

TEST(Compare, NanMustMatchNan) {
  GoldenResult golden = random_plain_golden();
  Tensor out = rounded_output(golden, DType::f32);
  out.data_as<float>()[3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(compare(out, golden).mismatches, 1);
  golden.value[3] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(compare(out, golden).ok());
  golden.value[4] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(compare(out, golden).mismatches, 1);
}

TEST(Compare, InfinitiesMustMatchExactly) {
  GoldenResult golden = random_plain_golden();
  Tensor out = rounded_output(golden, DType::f32);
  golden.value[5] = std::numeric_limits<double>::infinity();
  EXPECT_EQ(compare(out, golden).mismatches, 1);
  out.data_as<float>()[5] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(compare(out, golden).ok());
  out.data_as<float>()[5] = -std::numeric_limits<float>::infinity();
  EXPECT_EQ(compare(out, golden).mismatches, 1);
}

TEST(Compare, RejectsAnOutputOfTheWrongSize) {
  const GoldenResult golden = random_plain_golden();
  Tensor out(DType::f16, {golden.shape.m, golden.shape.n + 1});
  EXPECT_THROW(compare(out, golden), InvalidArgument);
}

// ---- the bound against an fp32 simulation of the contract ----

// One rank's partial computed as the contract says a device does: fp32 (or
// wrapping int32) accumulation in the given order along k, fp32 epilogue,
// one rounding to the output dtype (kept as the float it rounds to).
std::vector<float> simulate_rank(const RankArgs& a, const CallShape& s, bool reverse_k) {
  std::vector<float> part(static_cast<std::size_t>(s.m * s.n));
  for (std::int64_t i = 0; i < s.m; ++i) {
    for (std::int64_t j = 0; j < s.n; ++j) {
      float value = 0;
      if (s.mode == Mode::full_quant) {
        std::uint32_t acc =
            a.options.bias
                ? static_cast<std::uint32_t>(a.options.bias->data_as<const std::int32_t>()[j])
                : 0u;
        for (std::int64_t l = 0; l < s.k; ++l) {
          const std::int32_t product =
              a.x1.data_as<const std::int8_t>()[i * s.k + l] *
              a.x2.data_as<const std::int8_t>()[l * a.x2.stride(0) + j * a.x2.stride(1)];
          acc += static_cast<std::uint32_t>(product);
        }
        const TensorView& scale = *a.options.dequant_scale;
        const std::int64_t si = s.scale_kind == ScaleKind::per_tensor ? 0 : j;
        const float scale_value = scale.dtype() == DType::i64
                                      ? unpack_quant_scale(scale.data_as<const std::int64_t>()[si])
                                      : load_f32(scale, si);
        value = static_cast<float>(static_cast<std::int32_t>(acc)) * scale_value;
      } else {
        float acc = 0;
        for (std::int64_t step = 0; step < s.k; ++step) {
          const std::int64_t l = reverse_k ? s.k - 1 - step : step;
          const std::int64_t x2_index = l * a.x2.stride(0) + j * a.x2.stride(1);
          float w;
          if (s.mode == Mode::weight_quant) {
            std::int64_t si = 0;
            if (s.scale_kind == ScaleKind::per_channel) si = j;
            if (s.scale_kind == ScaleKind::per_group) si = (l / s.group_size) * s.n + j;
            w = static_cast<float>(a.x2.data_as<const std::int8_t>()[x2_index]);
            if (a.options.antiquant_offset) w += load_f32(*a.options.antiquant_offset, si);
            w *= load_f32(*a.options.antiquant_scale, si);
          } else {
            w = load_f32(a.x2, x2_index);
          }
          acc += load_f32(a.x1, i * s.k + l) * w;
        }
        value = acc;
        if (a.options.bias) value += load_f32(*a.options.bias, j);
      }
      if (a.options.x3) value += load_f32(*a.options.x3, i * s.n + j);
      const float rounded = s.out_dtype == DType::f16 ? f16_to_f32(f32_to_f16(value))
                                                      : bf16_to_f32(f32_to_bf16(value));
      part[static_cast<std::size_t>(i * s.n + j)] = rounded;
    }
  }
  return part;
}

Comparison simulate_and_compare(const CaseSpec& spec, int world, bool reverse_k) {
  std::vector<RankInputs> inputs;
  std::vector<RankArgs> ranks;
  for (int r = 0; r < world; ++r) inputs.push_back(make_rank_inputs(spec, r));
  for (const RankInputs& in : inputs) ranks.push_back(in.args);
  const GoldenResult golden = golden_mm_all_reduce(ranks);
  std::vector<float> sum;
  for (int r = 0; r < world; ++r) {
    const CallShape s = validate_call(ranks[r].x1, ranks[r].x2, ranks[r].options);
    const std::vector<float> part = simulate_rank(ranks[r], s, reverse_k);
    if (r == 0) {
      sum = part;
    } else {
      for (std::size_t e = 0; e < sum.size(); ++e) sum[e] += part[e];
    }
  }
  Tensor out(golden.shape.out_dtype, {golden.shape.m, golden.shape.n});
  for (std::size_t e = 0; e < sum.size(); ++e) store(out, static_cast<std::int64_t>(e), sum[e]);
  return compare(out, golden);
}

TEST(GoldenBound, HoldsForAnFp32ImplementationOfEveryMode) {
  struct Variant {
    Mode mode;
    ScaleKind kind;
    std::int64_t group_size;
    bool offset;
  };
  const Variant variants[] = {
      {Mode::plain, ScaleKind::none, 0, false},
      {Mode::weight_quant, ScaleKind::per_tensor, 0, false},
      {Mode::weight_quant, ScaleKind::per_channel, 0, true},
      {Mode::weight_quant, ScaleKind::per_group, 64, true},
      {Mode::full_quant, ScaleKind::per_tensor, 0, false},
      {Mode::full_quant, ScaleKind::per_channel, 0, false},
  };
  for (const Variant& v : variants) {
    for (const DType dtype : {DType::f16, DType::bf16}) {
      for (const int world : {1, 3}) {
        CaseSpec spec;
        spec.mode = v.mode;
        spec.dtype = dtype;
        spec.scale_kind = v.kind;
        spec.group_size = v.group_size;
        spec.offset = v.offset;
        spec.m = 12;
        spec.n = 20;
        spec.k = 300;
        spec.uneven_k = true;
        spec.batch = world == 3 ? 3 : 0;
        spec.x2_transposed = world == 3;
        spec.bias = true;
        spec.x3 = true;
        spec.seed = 11 + static_cast<std::uint64_t>(world);
        for (const bool reverse_k : {false, true}) {
          const Comparison result = simulate_and_compare(spec, world, reverse_k);
          EXPECT_TRUE(result.ok())
              << mode_name(v.mode) << " " << scale_kind_name(v.kind) << " " << dtype_name(dtype)
              << " p=" << world << " worst ratio " << result.worst_ratio;
        }
      }
    }
  }
}

// ---- inputs ----

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0;
}

TEST(Inputs, AreDeterministicPerRank) {
  CaseSpec spec;
  spec.bias = true;
  const RankInputs first = make_rank_inputs(spec, 1);
  const RankInputs again = make_rank_inputs(spec, 1);
  const RankInputs other = make_rank_inputs(spec, 2);
  EXPECT_TRUE(same_bytes(first.x1, again.x1));
  EXPECT_TRUE(same_bytes(first.x2, again.x2));
  EXPECT_TRUE(same_bytes(first.bias, again.bias));
  EXPECT_FALSE(same_bytes(first.x1, other.x1));
  spec.x3 = true;  // another tensor does not change the others
  EXPECT_TRUE(same_bytes(first.x1, make_rank_inputs(spec, 1).x1));
  spec.seed = 2;
  EXPECT_FALSE(same_bytes(first.x1, make_rank_inputs(spec, 1).x1));
}

TEST(Inputs, EveryModeValidates) {
  for (const Mode mode : {Mode::plain, Mode::weight_quant, Mode::full_quant}) {
    for (const DType dtype : {DType::f16, DType::bf16}) {
      CaseSpec spec;
      spec.mode = mode;
      spec.dtype = dtype;
      spec.batch = 4;
      spec.uneven_k = true;
      spec.x2_transposed = true;
      spec.bias = true;
      spec.x3 = true;
      spec.comm_turn = 2;
      const RankInputs in = make_rank_inputs(spec, 3);
      const CallShape s = validate_call(in.args.x1, in.args.x2, in.args.options);
      EXPECT_EQ(s.mode, mode);
      EXPECT_EQ(s.out_dtype, output_dtype(spec));
      EXPECT_EQ(s.k, spec.k + 3);
      EXPECT_EQ(s.batch, 4);
      EXPECT_EQ(s.seq, spec.m / 4);
      EXPECT_TRUE(s.x2_transposed);
      EXPECT_EQ(in.x2_storage.size(0), spec.n);
      EXPECT_EQ(s.comm_turn, 2);
      EXPECT_TRUE(s.has_bias && s.has_x3);
    }
  }
}

TEST(Inputs, ScaleLayoutsAndDtypes) {
  CaseSpec spec;
  spec.mode = Mode::weight_quant;
  spec.scale_kind = ScaleKind::per_group;
  spec.group_size = 32;
  spec.k = 100;
  spec.offset = true;
  RankInputs in = make_rank_inputs(spec, 0);
  EXPECT_EQ(in.antiquant_scale.size(0), 4);
  EXPECT_EQ(in.antiquant_offset.size(0), 4);
  EXPECT_EQ(validate_call(in.args.x1, in.args.x2, in.args.options).scale_kind,
            ScaleKind::per_group);

  spec = CaseSpec{};
  spec.mode = Mode::full_quant;
  spec.scale_kind = ScaleKind::per_tensor;
  in = make_rank_inputs(spec, 0);
  EXPECT_EQ(in.dequant_scale.dtype(), DType::i64);
  EXPECT_EQ(in.dequant_scale.numel(), 1);
  const float scale = unpack_quant_scale(in.dequant_scale.data_as<std::int64_t>()[0]);
  EXPECT_GT(scale, 0.4e-3f);
  EXPECT_LT(scale, 1.6e-3f);
  spec.dtype = DType::bf16;
  EXPECT_EQ(make_rank_inputs(spec, 0).dequant_scale.dtype(), DType::bf16);
}

TEST(Inputs, RejectsSpecsThatCannotBeBuilt) {
  CaseSpec spec;
  spec.batch = 3;  // m = 16
  try {
    make_rank_inputs(spec, 0);
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(std::string(e.what()).rfind("spec.batch:", 0), 0u) << e.what();
  }
  spec = CaseSpec{};
  spec.mode = Mode::weight_quant;
  spec.scale_kind = ScaleKind::per_group;
  EXPECT_THROW(make_rank_inputs(spec, 0), InvalidArgument);
  spec = CaseSpec{};
  spec.dtype = DType::i8;
  EXPECT_THROW(make_rank_inputs(spec, 0), InvalidArgument);
}

}  // namespace
}  // namespace tpfuse::testing
