// Packed weights (tpfuse::PackedWeight, gemm::pack_x2): a call with x2 packed
// once gives the bits of the same call with x2 itself, at every
// instruction-set level this CPU runs, for every mode, layout and number of
// rows (decode and prefill); through the operators too (mm_all_reduce_base,
// mm_all_reduce_add_rms_norm and the sequence-parallel pair); and a packed weight
// used with other scales, or for another x1 dtype, is refused on every rank.
// Also the numerics the packed engines share with every other: bf16
// subnormals and dequantized weights below 2^-126 count as zero.
#include "tpfuse/ops/packed_weight.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "gemm/engines.h"
#include "rank_harness.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/ops/gemm_operands.h"
#include "tpfuse/ops/validate.h"
#include "tpfuse/testing/golden.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse {
namespace {

using testing::CaseSpec;

std::vector<IsaLevel> runnable_levels() {
  std::vector<IsaLevel> levels;
  for (IsaLevel level : {IsaLevel::portable, IsaLevel::avx2, IsaLevel::avx512, IsaLevel::avx512_dl}) {
    if (level <= detected_isa()) levels.push_back(level);
  }
  return levels;
}

std::vector<unsigned char> run_gemm(const gemm::GemmOperands& operands, IsaLevel level) {
  const auto prepared = gemm::prepare_gemm_for_isa(operands, level);
  std::vector<unsigned char> out(static_cast<std::size_t>(operands.shape.m * operands.shape.n) *
                                 dtype_size(operands.shape.out_dtype));
  prepared->compute_rows(0, operands.shape.m, out.data(), operands.shape.n);
  return out;
}

struct PackCase {
  Mode mode;
  DType dtype;
  bool transposed;
  bool offset;
};

class PackedGemm : public ::testing::TestWithParam<PackCase> {};

TEST_P(PackedGemm, GivesTheUnpackedBitsForEveryRowCount) {
  const PackCase& c = GetParam();
  for (std::int64_t m : {1, 2, 3, 6, 16, 65, 200}) {
    CaseSpec spec;
    spec.mode = c.mode;
    spec.dtype = c.dtype;
    spec.m = m;
    spec.k = 97;  // odd: a last pair padded
    spec.n = 150;  // a ragged last panel
    spec.x2_transposed = c.transposed;
    spec.bias = true;
    spec.x3 = true;
    spec.offset = c.offset;
    spec.scale_kind = c.mode == Mode::weight_quant ? ScaleKind::per_group : ScaleKind::per_channel;
    spec.group_size = 32;
    spec.seed = static_cast<std::uint64_t>(m + 7);
    const testing::RankInputs inputs = testing::make_rank_inputs(spec, 0);
    const testing::RankArgs& args = inputs.args;
    const CallShape shape = validate_call(args.x1, args.x2, args.options);
    gemm::GemmOperands operands = make_gemm_operands(shape, args.x1, args.x2, args.options);
    operands.threads = 2;
    for (IsaLevel level : runnable_levels()) {
      SCOPED_TRACE(cat("m=", m, " level ", isa_name(level), " engine ",
                       gemm::prepare_gemm_for_isa(operands, level)->engine()));
      const auto packing = gemm::pack_x2_for_isa(operands, level);
      gemm::GemmOperands packed = operands;
      packed.packed = packing.get();
      EXPECT_TRUE(run_gemm(packed, level) == run_gemm(operands, level));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Modes, PackedGemm,
    ::testing::Values(PackCase{Mode::plain, DType::bf16, false, false}, PackCase{Mode::plain, DType::bf16, true, false},
                      PackCase{Mode::plain, DType::f16, false, false}, PackCase{Mode::plain, DType::f16, true, false},
                      PackCase{Mode::weight_quant, DType::bf16, false, true},
                      PackCase{Mode::weight_quant, DType::bf16, true, false},
                      PackCase{Mode::weight_quant, DType::f16, false, false},
                      PackCase{Mode::weight_quant, DType::f16, true, true},
                      PackCase{Mode::full_quant, DType::f16, false, false},
                      PackCase{Mode::full_quant, DType::bf16, true, false}),
    [](const ::testing::TestParamInfo<PackCase>& info) {
      const PackCase& c = info.param;
      return cat(mode_name(c.mode), "_", dtype_name(c.dtype), c.transposed ? "_t" : "", c.offset ? "_offset" : "");
    });

// ---- through the operator ----

TEST(PackedWeight, OperatorGivesTheUnpackedBits) {
  for (Mode mode : {Mode::plain, Mode::weight_quant, Mode::full_quant}) {
    for (std::int64_t m : {1, 16, 300}) {
      CaseSpec spec;
      spec.mode = mode;
      spec.dtype = DType::bf16;
      spec.m = m;
      spec.k = 256;
      spec.n = 192;
      spec.bias = true;
      spec.x3 = true;
      spec.uneven_k = true;
      spec.x2_transposed = m == 16;
      spec.seed = static_cast<std::uint64_t>(m);
      SCOPED_TRACE(cat(mode_name(mode), " m=", m));
      const auto result = test::run_ranks(2, [&](comm::RankContext& ctx) {
        const testing::RankInputs inputs = testing::make_rank_inputs(spec, ctx.rank);
        const testing::RankArgs& args = inputs.args;
        const PackedWeight packed(args.x1.dtype(), args.x2, args.options);
        for (std::int64_t turn : {0, 3}) {
          MmAllReduceOptions options = args.options;
          options.comm_turn = turn;
          const Tensor plain = mm_all_reduce_base(args.x1, args.x2, ctx.comm->name(), options);
          const Tensor from_packed = mm_all_reduce_base(args.x1, packed, ctx.comm->name(), options);
          test::expect_rank(std::memcmp(plain.data(), from_packed.data(), plain.nbytes()) == 0,
                            "rank ", ctx.rank, " comm_turn ", turn, ": packed and unpacked differ");
        }
        return 0;
      });
      EXPECT_TRUE(result.ok()) << result.describe_failures();
    }
  }
}

// bf16 values of sin(i): a residual or gamma of the given shape.
Tensor bf16_wave(std::initializer_list<std::int64_t> shape, double phase) {
  Tensor t(DType::bf16, shape);
  auto* data = static_cast<BFloat16*>(t.data());
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    data[i] = f32_to_bf16(static_cast<float>(std::sin(0.37 * static_cast<double>(i) + phase)));
  }
  return t;
}

TEST(PackedWeight, AddRmsNormGivesTheUnpackedBits) {
  for (Mode mode : {Mode::plain, Mode::weight_quant}) {
    for (std::int64_t m : {1, 16}) {
      CaseSpec spec;
      spec.mode = mode;
      spec.dtype = DType::bf16;
      spec.m = m;
      spec.k = 256;
      spec.n = 192;
      spec.x2_transposed = true;
      spec.seed = static_cast<std::uint64_t>(m);
      SCOPED_TRACE(cat(mode_name(mode), " m=", m));
      const Tensor residual = bf16_wave({1, m, spec.n}, 0.0);
      const Tensor gamma = bf16_wave({spec.n}, 1.0);
      const auto result = test::run_ranks(2, [&](comm::RankContext& ctx) {
        const testing::RankInputs inputs = testing::make_rank_inputs(spec, ctx.rank);
        const testing::RankArgs& args = inputs.args;
        const PackedWeight packed(args.x1.dtype(), args.x2, args.options);
        MmAllReduceAddRmsNormOptions options;
        options.antiquant_scale = args.options.antiquant_scale;
        options.antiquant_offset = args.options.antiquant_offset;
        options.antiquant_group_size = args.options.antiquant_group_size;
        for (std::int64_t turn : {0, 3}) {
          options.comm_turn = turn;
          const AddRmsNormResult plain = mm_all_reduce_add_rms_norm(
              args.x1, args.x2, residual, gamma, ctx.comm->name(), options);
          const AddRmsNormResult from_packed = mm_all_reduce_add_rms_norm(
              args.x1, packed, residual, gamma, ctx.comm->name(), options);
          test::expect_rank(
              std::memcmp(plain.y.data(), from_packed.y.data(), plain.y.nbytes()) == 0 &&
                  std::memcmp(plain.norm_out.data(), from_packed.norm_out.data(),
                              plain.norm_out.nbytes()) == 0,
              "rank ", ctx.rank, " comm_turn ", turn, ": packed and unpacked differ");
        }
        return 0;
      });
      EXPECT_TRUE(result.ok()) << result.describe_failures();
    }
  }
}

// The sequence-parallel pair: the gathered rows (all_gather_base_mm) or this
// rank's reduce-scattered rows (mm_reduce_scatter_base) by a packed x2 are
// the bits of the same calls with x2; a call with an x2_scale the weight was
// not packed with is refused, naming x2_scale.
TEST(PackedWeight, SequenceParallelPairGivesTheUnpackedBits) {
  for (std::int64_t m : {2, 64}) {
    CaseSpec spec;
    spec.mode = Mode::plain;
    spec.dtype = DType::bf16;
    spec.m = m;
    spec.k = 256;
    spec.n = 192;
    spec.bias = true;
    spec.x2_transposed = m == 2;
    spec.seed = static_cast<std::uint64_t>(m);
    SCOPED_TRACE(cat("m=", m));
    const auto result = test::run_ranks(2, [&](comm::RankContext& ctx) {
      const testing::RankInputs inputs = testing::make_rank_inputs(spec, ctx.rank);
      const testing::RankArgs& args = inputs.args;
      const PackedWeight packed(args.x1.dtype(), args.x2);
      const std::string_view hcom = ctx.comm->name();
      for (std::int64_t turn : {0, 2}) {
        AllGatherMmOptions gather;
        gather.bias = args.options.bias;
        gather.comm_turn = turn;
        const AllGatherMmResult plain = all_gather_base_mm(args.x1, args.x2, hcom, 2, gather);
        const AllGatherMmResult from_packed = all_gather_base_mm(args.x1, packed, hcom, 2, gather);
        test::expect_rank(std::memcmp(plain.output.data(), from_packed.output.data(),
                                      plain.output.nbytes()) == 0 &&
                              std::memcmp(plain.gather_out.data(), from_packed.gather_out.data(),
                                          plain.gather_out.nbytes()) == 0,
                          "rank ", ctx.rank, " comm_turn ", turn, ": all-gather differs");
        MmReduceScatterOptions scatter;
        scatter.bias = args.options.bias;
        scatter.comm_turn = turn;
        const Tensor rows = mm_reduce_scatter_base(args.x1, args.x2, hcom, 2, scatter);
        const Tensor packed_rows = mm_reduce_scatter_base(args.x1, packed, hcom, 2, scatter);
        test::expect_rank(std::memcmp(rows.data(), packed_rows.data(), rows.nbytes()) == 0, "rank ",
                          ctx.rank, " comm_turn ", turn, ": reduce-scatter differs");
      }
      const Tensor scale(DType::f32, {spec.n});
      MmReduceScatterOptions scaled;
      scaled.x2_scale = scale.view();
      try {
        mm_reduce_scatter_base(args.x1, packed, hcom, 2, scaled);
        test::expect_rank(false, "rank ", ctx.rank, ": an x2_scale not packed was accepted");
      } catch (const Error& error) {
        test::expect_rank(std::string(error.what())
                                  .find("x2_scale: expected the tensor x2 was "
                                        "packed with (none)") != std::string::npos,
                          "rank ", ctx.rank, ": ", error.what());
      }
      return 0;
    });
    EXPECT_TRUE(result.ok()) << result.describe_failures();
  }
}

TEST(PackedWeight, OtherScalesOrX1DtypeAreRefusedOnEveryRank) {
  CaseSpec spec;
  spec.mode = Mode::weight_quant;
  spec.dtype = DType::bf16;
  spec.m = 8;
  spec.k = 64;
  spec.n = 32;
  const auto result = test::run_ranks(2, [&](comm::RankContext& ctx) {
    const testing::RankInputs inputs = testing::make_rank_inputs(spec, ctx.rank);
    const testing::RankArgs& args = inputs.args;
    const PackedWeight packed(args.x1.dtype(), args.x2, args.options);
    // Rank 1 passes a copy of the scale: another tensor, not the packed one.
    Tensor copy(args.options.antiquant_scale->dtype(), {spec.n});
    std::memcpy(copy.data(), args.options.antiquant_scale->data(), copy.nbytes());
    MmAllReduceOptions options = args.options;
    if (ctx.rank == 1) options.antiquant_scale = copy.view();
    try {
      mm_all_reduce_base(args.x1, packed, ctx.comm->name(), options);
      test::expect_rank(false, "rank ", ctx.rank, ": a mismatched scale was accepted");
    } catch (const Error& error) {
      const std::string what = error.what();
      test::expect_rank(what.find("antiquant_scale: expected the tensor x2 was packed with") != std::string::npos,
                        "rank ", ctx.rank, ": ", what);
    }
    Tensor f16_x1(DType::f16, {spec.m, spec.k});
    std::memset(f16_x1.data(), 0, f16_x1.nbytes());
    try {
      mm_all_reduce_base(f16_x1, packed, ctx.comm->name(), args.options);
      test::expect_rank(false, "rank ", ctx.rank, ": an f16 x1 was accepted for a bf16 packing");
    } catch (const Error& error) {  // this rank's own InvalidArgument, or its peer's
      test::expect_rank(std::string(error.what()).find("x1: expected dtype bf16") != std::string::npos,
                        error.what());
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// ---- the numerics every engine shares ----

// x1 = [s, 1] with s = 2^-127, a bf16 subnormal, and x2 = [2^127; 3]: an
// engine that kept s would add s * 2^127 = 1 and give 4. Every engine, at
// every level, must give 3.
TEST(OperandNumerics, Bf16SubnormalsCountAsZeroInEveryEngine) {
  for (std::int64_t m : {1, 100}) {
    Tensor x1(DType::bf16, {m, 2}), x2(DType::bf16, {2, 1});
    for (std::int64_t i = 0; i < m; ++i) {
      x1.data_as<BFloat16>()[2 * i] = BFloat16{0x0040};  // 2^-127
      x1.data_as<BFloat16>()[2 * i + 1] = f32_to_bf16(1.0f);
    }
    x2.data_as<BFloat16>()[0] = f32_to_bf16(0x1p127f);
    x2.data_as<BFloat16>()[1] = f32_to_bf16(3.0f);
    const CallShape shape = validate_call(x1, x2, {});
    const gemm::GemmOperands operands = make_gemm_operands(shape, x1, x2, {});
    for (IsaLevel level : runnable_levels()) {
      const std::vector<unsigned char> out = run_gemm(operands, level);
      for (std::int64_t i = 0; i < m; ++i) {
        BFloat16 value;
        std::memcpy(&value, out.data() + 2 * i, 2);
        EXPECT_EQ(bf16_to_f32(value), 3.0f)
            << "m=" << m << " row " << i << " at " << isa_name(level);
      }
    }
  }
}

// A weight dequantized below 2^-126 (1 * 2^-128) counts as zero whatever x1
// multiplies it by: with x1 = 2^127 an engine that kept it would give 0.5.
TEST(OperandNumerics, TinyDequantizedWeightsCountAsZeroInEveryEngine) {
  for (std::int64_t m : {1, 100}) {
    Tensor x1(DType::bf16, {m, 2}), x2(DType::i8, {2, 1}), scale(DType::bf16, {1});
    for (std::int64_t i = 0; i < m; ++i) {
      x1.data_as<BFloat16>()[2 * i] = f32_to_bf16(0x1p127f);
      x1.data_as<BFloat16>()[2 * i + 1] = f32_to_bf16(1.0f);
    }
    x2.data_as<std::int8_t>()[0] = 1;
    x2.data_as<std::int8_t>()[1] = 0;
    scale.data_as<BFloat16>()[0] = BFloat16{0x0020};  // 2^-128
    MmAllReduceOptions options;
    options.antiquant_scale = scale.view();
    const CallShape shape = validate_call(x1, x2, options);
    const gemm::GemmOperands operands = make_gemm_operands(shape, x1, x2, options);
    const testing::RankArgs args[] = {{x1, x2, options}};
    EXPECT_EQ(testing::golden_mm_all_reduce(args).value[0], 0.0) << "the golden model must zero the weight";
    for (IsaLevel level : runnable_levels()) {
      const std::vector<unsigned char> out = run_gemm(operands, level);
      for (std::int64_t i = 0; i < m; ++i) {
        BFloat16 value;
        std::memcpy(&value, out.data() + 2 * i, 2);
        EXPECT_EQ(bf16_to_f32(value), 0.0f)
            << "m=" << m << " row " << i << " at " << isa_name(level);
      }
    }
  }
}

// The same per column and per group, x2 row-major and transposed (the dot
// kernel's layout): k = 64 in two groups of 32, x1 = 2^127 at l = 0 and 1 at
// l = 33. Column 0 has q = 1 at l = 0 under the tiny scale 2^-128 of group 0
// (a kept weight would add 0.5) and q = 3 at l = 33 under scale 1; column 1
// has scale 1 in both groups and q = 3 at l = 33 only. Both give 3: a tiny
// scale in one group or column changes nothing in the others.
TEST(OperandNumerics, TinyDequantizedWeightsCountAsZeroPerGroupAndColumn) {
  constexpr std::int64_t k = 64, n = 2;
  for (bool transposed : {false, true}) {
    for (std::int64_t m : {1, 100}) {
      Tensor x1(DType::bf16, {m, k}), scale(DType::bf16, {2, n});
      Tensor x2 = transposed ? Tensor(DType::i8, {n, k}) : Tensor(DType::i8, {k, n});
      for (std::int64_t i = 0; i < m * k; ++i) x1.data_as<BFloat16>()[i] = f32_to_bf16(0.0f);
      for (std::int64_t i = 0; i < m; ++i) {
        x1.data_as<BFloat16>()[i * k] = f32_to_bf16(0x1p127f);
        x1.data_as<BFloat16>()[i * k + 33] = f32_to_bf16(1.0f);
      }
      const auto q = [&](std::int64_t l, std::int64_t j) -> std::int8_t& {
        return x2.data_as<std::int8_t>()[transposed ? j * k + l : l * n + j];
      };
      for (std::int64_t i = 0; i < k * n; ++i) x2.data_as<std::int8_t>()[i] = 0;
      q(0, 0) = 1;
      q(33, 0) = 3;
      q(33, 1) = 3;
      scale.data_as<BFloat16>()[0] = BFloat16{0x0020};  // group 0, column 0: 2^-128
      scale.data_as<BFloat16>()[1] = f32_to_bf16(1.0f);
      scale.data_as<BFloat16>()[2] = f32_to_bf16(1.0f);
      scale.data_as<BFloat16>()[3] = f32_to_bf16(1.0f);
      MmAllReduceOptions options;
      options.antiquant_scale = scale.view();
      options.antiquant_group_size = 32;
      const TensorView x2_view = transposed ? x2.view().transposed() : x2.view();
      const CallShape shape = validate_call(x1, x2_view, options);
      const gemm::GemmOperands operands = make_gemm_operands(shape, x1, x2_view, options);
      for (IsaLevel level : runnable_levels()) {
        const std::vector<unsigned char> out = run_gemm(operands, level);
        for (std::int64_t i = 0; i < m * n; ++i) {
          BFloat16 value;
          std::memcpy(&value, out.data() + 2 * i, 2);
          EXPECT_EQ(bf16_to_f32(value), 3.0f)
              << (transposed ? "transposed" : "row-major") << " m=" << m << " element " << i
              << " at " << isa_name(level);
        }
      }
    }
  }
}

}  // namespace
}  // namespace tpfuse
