// NaN and infinity inputs, every mode, through the whole operator on two
// ranks (GEMM engines, epilogue, rounding and the shared-memory reduce): each
// output element must be what IEEE arithmetic gives for the contract's
// formula (docs/SEMANTICS.md). Each case puts non-finite values in one place and
// states the pattern the formula implies:
//   NaN in row i of x1 (any rank)          -> row i of out is NaN
//   NaN in x2, bias, a per-channel scale,
//   its offset or a dequant scale at col j -> column j is NaN
//   +-inf in x1 row i, x2 row l            -> inf * w: +-inf, or NaN where w = 0
//   +-inf in bias column j                 -> column j is +-inf
//   x3 +inf on one rank, -inf on the other -> NaN (the reduce adds them)
//   a finite sum beyond the output dtype   -> inf (rounding overflows)
// and every other element stays finite and within the golden model's bound.
// The golden model (fp64, which follows the same IEEE rules) then fixes the
// exact class of elements the pattern leaves open ("non-finite").
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "rank_harness.h"
#include "tpfuse/core/half.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/ops/quant_param.h"
#include "tpfuse/testing/golden.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse {
namespace {

using test::expect_rank;
using testing::CaseSpec;
using testing::RankInputs;

constexpr int kRanks = 2;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

enum class Class { finite, nan, pos_inf, neg_inf, non_finite };

const char* class_name(Class c) {
  switch (c) {
    case Class::finite:
      return "finite";
    case Class::nan:
      return "NaN";
    case Class::pos_inf:
      return "+inf";
    case Class::neg_inf:
      return "-inf";
    case Class::non_finite:
      return "non-finite";
  }
  return "?";
}

Class classify(double v) {
  if (std::isnan(v)) return Class::nan;
  if (std::isinf(v)) return v > 0 ? Class::pos_inf : Class::neg_inf;
  return Class::finite;
}

bool matches(Class want, Class got) {
  return want == got || (want == Class::non_finite && got != Class::finite);
}

// Element (i, j) of a 1-D or 2-D view, as fp32 (int8 weights too).
double load(const TensorView& view, std::int64_t i, std::int64_t j) {
  const std::int64_t index = view.ndim() == 1 ? j : i * view.stride(0) + j * view.stride(1);
  switch (view.dtype()) {
    case DType::f16:
      return f16_to_f32(view.data_as<const Half>()[index]);
    case DType::bf16:
      return bf16_to_f32(view.data_as<const BFloat16>()[index]);
    case DType::i8:
      return view.data_as<const std::int8_t>()[index];
    default:
      throw InternalError(cat("load: unexpected dtype ", dtype_name(view.dtype())));
  }
}

// Writes `value` at element (i, j) of a 1-D or 2-D view: rounded to f16 or
// bf16, or packed as trans_quant_param does for an i64 dequant scale.
void store(const TensorView& view, std::int64_t i, std::int64_t j, float value) {
  const std::int64_t index = view.ndim() == 1 ? j : i * view.stride(0) + j * view.stride(1);
  switch (view.dtype()) {
    case DType::f16:
      view.data_as<Half>()[index] = f32_to_f16(value);
      return;
    case DType::bf16:
      view.data_as<BFloat16>()[index] = f32_to_bf16(value);
      return;
    case DType::i64:
      view.data_as<std::int64_t>()[index] = trans_quant_param(value);
      return;
    default:
      throw InternalError(cat("store: unexpected dtype ", dtype_name(view.dtype())));
  }
}

float largest_finite(DType dtype) { return dtype == DType::f16 ? 65504.0f : 3.3895314e38f; }

// One case: what to write into each rank's inputs, and the pattern of the
// output's classes it implies. `inputs` holds every rank's inputs, already
// edited, so that a pattern can read the weights it multiplies.
struct Case {
  std::string name;
  std::function<void(RankInputs& in, int rank)> edit;
  std::function<Class(std::int64_t i, std::int64_t j, const std::vector<RankInputs>& inputs)>
      pattern;
  bool golden = true;  // false where a finite value overflows (the bound assumes none does)
};

// The class of inf * w for a finite weight w.
Class inf_times(double w, bool negative) {
  if (w == 0) return Class::nan;
  return (w > 0) != negative ? Class::pos_inf : Class::neg_inf;
}

constexpr std::int64_t kRowNaN = 1, kRowInf = 2, kCol = 3, kColInf = 4, kK = 5;

// Cases every mode has: x1 (not in full quant: int8), bias (not in full
// quant: int32), x3.
std::vector<Case> common_cases(const CaseSpec& spec) {
  using Maybe = std::optional<Class>;
  auto finite_except = [](auto special) {
    return [special](std::int64_t i, std::int64_t j, const std::vector<RankInputs>& inputs) {
      return special(i, j, inputs).value_or(Class::finite);
    };
  };
  std::vector<Case> cases;
  if (spec.mode != Mode::full_quant) {
    cases.push_back({"x1 NaN",
                     [](RankInputs& in, int rank) {
                       if (rank == 0) store(in.args.x1, kRowNaN, kK, kNaN);
                     },
                     finite_except([](std::int64_t i, std::int64_t, const auto&) -> Maybe {
                       if (i == kRowNaN) return Class::nan;
                       return std::nullopt;
                     })});
    // Row kRowInf is -inf * w + finite terms, w the weight of row kK (in
    // weight quant dequantized: (x2 + offset) * scale, whose sign and zeros
    // fp32 computes exactly).
    const std::int64_t scale_row = spec.group_size > 0 ? kK / spec.group_size : 0;
    cases.push_back(
        {"x1 -inf",
         [](RankInputs& in, int rank) {
           if (rank == 1) store(in.args.x1, kRowInf, kK, -kInf);
         },
         finite_except([scale_row](std::int64_t i, std::int64_t j, const auto& inputs) -> Maybe {
           if (i != kRowInf) return std::nullopt;
           const MmAllReduceOptions& options = inputs[1].args.options;
           double w = load(inputs[1].args.x2, kK, j);
           if (options.antiquant_offset) w += load(*options.antiquant_offset, scale_row, j);
           if (options.antiquant_scale) w *= load(*options.antiquant_scale, scale_row, j);
           return inf_times(w, true);
         })});
    cases.push_back({"bias NaN and +inf",
                     [](RankInputs& in, int rank) {
                       if (rank == 1) store(*in.args.options.bias, 0, kCol, kNaN);
                       if (rank == 0) store(*in.args.options.bias, 0, kColInf, kInf);
                     },
                     finite_except([](std::int64_t, std::int64_t j, const auto&) -> Maybe {
                       if (j == kCol) return Class::nan;
                       if (j == kColInf) return Class::pos_inf;
                       return std::nullopt;
                     })});
  }
  cases.push_back({"x3 NaN, +inf - inf, -inf - inf",
                   [](RankInputs& in, int rank) {
                     store(*in.args.options.x3, 0, kCol, rank == 0 ? kNaN : 0.5f);
                     store(*in.args.options.x3, 1, kCol, rank == 0 ? kInf : -kInf);
                     store(*in.args.options.x3, 2, kCol, -kInf);
                   },
                   finite_except([](std::int64_t i, std::int64_t j, const auto&) -> Maybe {
                     if (j != kCol || i > 2) return std::nullopt;
                     return i == 2 ? Class::neg_inf : Class::nan;
                   })});
  const float largest = largest_finite(testing::output_dtype(spec));
  cases.push_back(
      {"finite sum beyond the output dtype",
       [largest](RankInputs& in, int) { store(*in.args.options.x3, 1, kColInf, largest); },
       finite_except([](std::int64_t i, std::int64_t j, const auto&) -> Maybe {
         if (i == 1 && j == kColInf) return Class::pos_inf;
         return std::nullopt;
       }),
       false});
  return cases;
}

// Cases of one mode's own tensors: x2 (plain), the antiquant scale and
// offset (weight quant), the dequant scale (full quant), each at column
// kCol (per-channel, or group 0 of a per-group scale).
std::vector<Case> mode_cases(Mode mode) {
  auto column = [](Class c) {
    return [c](std::int64_t, std::int64_t j, const std::vector<RankInputs>&) {
      return j == kCol ? c : Class::finite;
    };
  };
  std::vector<Case> cases;
  switch (mode) {
    case Mode::plain:
      cases.push_back({"x2 NaN",
                       [](RankInputs& in, int rank) {
                         if (rank == 1) store(in.args.x2, kK, kCol, kNaN);
                       },
                       column(Class::nan)});
      break;
    case Mode::weight_quant:
      cases.push_back({"antiquant_scale NaN",
                       [](RankInputs& in, int rank) {
                         if (rank == 0) store(*in.args.options.antiquant_scale, 0, kCol, kNaN);
                       },
                       column(Class::nan)});
      // (x2 + offset) * inf is +-inf (NaN where x2 + offset = 0); summed over
      // k with x1's mixed signs: non-finite, the golden model says which.
      cases.push_back({"antiquant_scale +inf",
                       [](RankInputs& in, int rank) {
                         if (rank == 1) store(*in.args.options.antiquant_scale, 0, kCol, kInf);
                       },
                       column(Class::non_finite)});
      // Every term of column kCol on rank 1 is positive times +inf, so the
      // column is +inf: no NaN may come from the zeros that pad a kernel's
      // last chunk of k (dequantized, 0 + offset times inf).
      cases.push_back({"antiquant_scale +inf, every term positive",
                       [](RankInputs& in, int rank) {
                         if (rank != 1) return;
                         const TensorView& x1 = in.args.x1;
                         for (std::int64_t i = 0; i < x1.shape()[0]; ++i) {
                           for (std::int64_t l = 0; l < x1.shape()[1]; ++l) {
                             store(x1, i, l, static_cast<float>(std::fabs(load(x1, i, l)) + 1));
                           }
                         }
                         store(*in.args.options.antiquant_offset, 0, kCol, 200);
                         store(*in.args.options.antiquant_scale, 0, kCol, kInf);
                       },
                       column(Class::pos_inf)});
      cases.push_back({"antiquant_offset NaN",
                       [](RankInputs& in, int rank) {
                         if (rank == 1) store(*in.args.options.antiquant_offset, 0, kCol, kNaN);
                       },
                       column(Class::nan)});
      break;
    case Mode::full_quant:
      cases.push_back({"dequant_scale NaN",
                       [](RankInputs& in, int rank) {
                         if (rank == 0) store(*in.args.options.dequant_scale, 0, kCol, kNaN);
                       },
                       column(Class::nan)});
      // inf * (x1 @ x2 + bias): +-inf by the integer's sign, NaN where it is 0.
      cases.push_back({"dequant_scale -inf",
                       [](RankInputs& in, int rank) {
                         if (rank == 1) store(*in.args.options.dequant_scale, 0, kCol, -kInf);
                       },
                       column(Class::non_finite)});
      break;
  }
  return cases;
}

struct ModeParam {
  const char* name;
  Mode mode;
  DType dtype;
  ScaleKind scale;
  std::int64_t group_size;
};

const ModeParam kModes[] = {
    {"plain_f16", Mode::plain, DType::f16, ScaleKind::none, 0},
    {"plain_bf16", Mode::plain, DType::bf16, ScaleKind::none, 0},
    {"wq_f16_per_channel", Mode::weight_quant, DType::f16, ScaleKind::per_channel, 0},
    {"wq_bf16_per_group", Mode::weight_quant, DType::bf16, ScaleKind::per_group, 32},
    {"full_quant_f16", Mode::full_quant, DType::f16, ScaleKind::per_channel, 0},
    {"full_quant_bf16", Mode::full_quant, DType::bf16, ScaleKind::per_channel, 0},
};

// Runs every case of `spec` on this rank; checks the pattern and the golden model.
void run_cases(const CaseSpec& spec, comm::RankContext& ctx) {
  std::vector<Case> cases = common_cases(spec);
  for (Case& c : mode_cases(spec.mode)) cases.push_back(std::move(c));
  for (const Case& c : cases) {
    std::vector<RankInputs> inputs;
    std::vector<testing::RankArgs> args;
    for (int r = 0; r < ctx.size; ++r) {
      inputs.push_back(testing::make_rank_inputs(spec, r));
      c.edit(inputs.back(), r);
    }
    for (const RankInputs& in : inputs) args.push_back(in.args);
    const RankInputs& mine = inputs[static_cast<std::size_t>(ctx.rank)];
    const Tensor out =
        mm_all_reduce_base(mine.args.x1, mine.args.x2, ctx.comm->name(), mine.args.options);
    const std::string where = cat(c.name, ", m=", spec.m, " k=", spec.k,
                                  spec.x2_transposed ? " x2 transposed" : "");
    for (std::int64_t i = 0; i < spec.m; ++i) {
      for (std::int64_t j = 0; j < spec.n; ++j) {
        const Class want = c.pattern(i, j, inputs);
        const Class got = classify(load(out, i, j));
        expect_rank(matches(want, got), where, ": out[", i, ", ", j, "] is ", class_name(got),
                    ", the contract gives ", class_name(want));
      }
    }
    if (c.golden) {
      const auto cmp = testing::compare(out, testing::golden_mm_all_reduce(args));
      expect_rank(cmp.ok(), where, ": ", cmp.mismatches, " elements differ from the golden model");
    }
  }
}

class NonFinite : public ::testing::TestWithParam<int> {};

// Few rows (the micro-kernels reading x2 in place, or its transposed rows)
// and many (packed x2, or oneDNN where the CPU has the instructions); K-slices
// of whole vectors and not (70: a kernel's last chunk of k is padded at every
// vector width, 4, 8 and 16 lanes).
TEST_P(NonFinite, PropagatesAsIeeeArithmeticSays) {
  const ModeParam& mode = kModes[GetParam()];
  const auto result = test::run_ranks(kRanks, [&](comm::RankContext& ctx) {
    for (const auto [m, k] : {std::pair{6, 64}, {80, 64}, {6, 70}, {80, 70}}) {
      for (const bool transposed : {false, true}) {
        CaseSpec spec;
        spec.mode = mode.mode;
        spec.dtype = mode.dtype;
        spec.scale_kind = mode.scale;
        spec.group_size = mode.group_size;
        spec.offset = mode.mode == Mode::weight_quant;
        spec.m = m;
        spec.k = k;
        spec.n = 40;
        spec.bias = true;
        spec.x3 = true;
        spec.x2_transposed = transposed;
        run_cases(spec, ctx);
      }
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

INSTANTIATE_TEST_SUITE_P(EveryMode, NonFinite,
                         ::testing::Range(0, static_cast<int>(std::size(kModes))),
                         [](const auto& info) { return std::string(kModes[info.param].name); });

// The packed dequant scale keeps the fp32 pattern with its 13 lowest mantissa
// bits cleared (docs/SEMANTICS.md): infinities and NaNs with a high payload bit
// (every quiet NaN) survive, a NaN whose payload lies only in those bits
// becomes an infinity of its sign, as torch_npu packs it.
TEST(NonFiniteQuantScale, PackingKeepsTheClassOfTheTopBits) {
  EXPECT_TRUE(std::isnan(unpack_quant_scale(trans_quant_param(kNaN))));
  EXPECT_TRUE(std::isnan(unpack_quant_scale(trans_quant_param(-kNaN))));
  EXPECT_EQ(unpack_quant_scale(trans_quant_param(kInf)), kInf);
  EXPECT_EQ(unpack_quant_scale(trans_quant_param(-kInf)), -kInf);
  EXPECT_EQ(unpack_quant_scale(trans_quant_param(std::bit_cast<float>(0x7f800001u))), kInf);
  EXPECT_EQ(unpack_quant_scale(trans_quant_param(std::bit_cast<float>(0xff801fffu))), -kInf);
  EXPECT_TRUE(std::isnan(unpack_quant_scale(trans_quant_param(std::bit_cast<float>(0x7f802000u)))));
}

}  // namespace
}  // namespace tpfuse
