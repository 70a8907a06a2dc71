// The family's golden model (golden_family.h) against hand-computed cases,
// its bounds against fp32 simulations of the contract's numerics (including
// a product error pushed to the edge of its bound before the norm), and
// that the bounds are tight enough to catch one unit in the last place
// beyond them and a norm over the wrong count.
#include "tpfuse/testing/golden_family.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "element_access.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/ops/quant_param.h"
#include "tpfuse/testing/family_inputs.h"

namespace tpfuse::testing {
namespace {

using Dims = std::vector<std::int64_t>;

// f32 rounded to `out` (f16 or bf16), kept as the float it rounds to.
float round_to(DType out, float value) {
  return out == DType::f16 ? f16_to_f32(f32_to_f16(value)) : bf16_to_f32(f32_to_bf16(value));
}

// Tensors for hand-written cases, kept alive with the views of them.
struct Owner {
  std::vector<Tensor> owned;

  TensorView tensor(DType dtype, const Dims& shape, const std::vector<double>& values) {
    owned.emplace_back(dtype, shape);
    const TensorView view = owned.back().view();
    EXPECT_EQ(view.numel(), static_cast<std::int64_t>(values.size()));
    for (std::size_t i = 0; i < values.size(); ++i) {
      store(view, static_cast<std::int64_t>(i), values[i]);
    }
    return view;
  }
};

void expect_values(const GoldenResult& golden, const std::vector<double>& expected) {
  ASSERT_EQ(golden.value.size(), expected.size());
  ASSERT_EQ(golden.bound.size(), expected.size());
  for (std::size_t e = 0; e < expected.size(); ++e) {
    EXPECT_EQ(golden.value[e], expected[e]) << "element " << e;
    EXPECT_GT(golden.bound[e], 0.0) << "element " << e;
  }
}

template <class Action>
void expect_error_naming(const Action& action, const std::string& fragment) {
  try {
    action();
    ADD_FAILURE() << "expected an error naming " << fragment;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

// ---- hand-computed cases ----

// Rank 0 holds row [1, 2], rank 1 row [3, 4]; each its own weight and n.
TEST(GoldenFamily, AllGatherMultipliesEveryRanksRowsByTheOwnWeight) {
  Owner o;
  std::vector<AllGatherMmArgs> ranks(2);
  ranks[0].x1 = o.tensor(DType::f16, {1, 2}, {1, 2});
  ranks[0].x2 = o.tensor(DType::f16, {2, 1}, {1, 1});
  ranks[0].options.bias = o.tensor(DType::f16, {1}, {0.5});
  ranks[1].x1 = o.tensor(DType::f16, {1, 2}, {3, 4});
  ranks[1].x2 = o.tensor(DType::f16, {2, 2}, {1, 0, 0, 2});
  const GoldenResult mine = golden_all_gather_mm(ranks, 0);
  EXPECT_EQ(mine.shape.m, 2);
  EXPECT_EQ(mine.shape.n, 1);
  expect_values(mine, {3.5, 7.5});
  const GoldenResult other = golden_all_gather_mm(ranks, 1);
  EXPECT_EQ(other.shape.n, 2);
  expect_values(other, {1, 4, 3, 8});
}

// (x1_scale_i * x2_scale_j) * (x1 @ x2 + bias), per token and per channel.
TEST(GoldenFamily, AllGatherQuantScalesPerTokenAndChannel) {
  Owner o;
  std::vector<AllGatherMmArgs> ranks(2);
  for (int r = 0; r < 2; ++r) {
    ranks[r].x1 = o.tensor(DType::i8, {1, 2}, {1.0 + r, -1});
    ranks[r].x2 = o.tensor(DType::i8, {2, 2}, {3, 1, 1, -1});
    ranks[r].options.bias = o.tensor(DType::i32, {2}, {10, 0});
    ranks[r].options.x1_scale = o.tensor(DType::f32, {1, 1}, {r == 0 ? 0.5 : 0.25});
    ranks[r].options.x2_scale = o.tensor(DType::f32, {1, 2}, {1, 4});
  }
  // Rank 0's row: [3 - 1 + 10, 1 + 1] = [12, 2]; rank 1's: [6 - 1 + 10, 2 + 1] = [15, 3].
  GoldenResult golden = golden_all_gather_mm(ranks, 1);
  EXPECT_EQ(golden.shape.out_dtype, DType::bf16);  // f32 scales: bf16 unless asked
  expect_values(golden, {6, 4, 3.75, 3});
  for (auto& args : ranks) args.options.output_dtype = DType::f16;
  EXPECT_EQ(golden_all_gather_mm(ranks, 1).shape.out_dtype, DType::f16);

  for (auto& args : ranks) {
    args.options.output_dtype.reset();
    args.options.x2_scale = o.tensor(DType::i64, {2}, {0, 0});
    args.options.x2_scale->data_as<std::int64_t>()[0] = trans_quant_param(2.0f);
    args.options.x2_scale->data_as<std::int64_t>()[1] = trans_quant_param(-1.0f);
    args.options.x1_scale.reset();
  }
  golden = golden_all_gather_mm(ranks, 0);
  EXPECT_EQ(golden.shape.out_dtype, DType::f16);  // a packed i64 scale gives f16
  expect_values(golden, {24, -2, 30, -3});
}

// Rank r's output is rows [r*m/p, (r+1)*m/p) of the all-reduce's, bound included.
TEST(GoldenFamily, ReduceScatterIsRowsOfTheAllReduce) {
  for (const bool quant : {false, true}) {
    SequenceParallelSpec spec;
    spec.quant = quant;
    spec.x1_scale = false;  // mm_all_reduce_base has no per-token scale
    spec.x2_scale_dtype = DType::i64;
    spec.m = 6;
    spec.n = 5;
    spec.k = 20;
    spec.uneven_k = true;
    spec.bias = true;
    std::vector<SequenceParallelInputs> inputs;
    std::vector<MmReduceScatterArgs> ranks;
    std::vector<RankArgs> products;
    for (int r = 0; r < 3; ++r) inputs.push_back(make_sequence_parallel_inputs(spec, r));
    for (const auto& in : inputs) {
      ranks.push_back(in.reduce_scatter);
      RankArgs product = in.product.args;
      if (quant) product.options.dequant_scale = in.x2_scale.view();
      products.push_back(product);
    }
    const GoldenResult all = golden_mm_all_reduce(products);
    for (int r = 0; r < 3; ++r) {
      const GoldenResult mine = golden_mm_reduce_scatter(ranks, r);
      EXPECT_EQ(mine.shape.m, 2);
      const auto first = all.value.begin() + r * 2 * spec.n;
      EXPECT_EQ(mine.value, std::vector<double>(first, first + 2 * spec.n)) << "rank " << r;
      const auto bound = all.bound.begin() + r * 2 * spec.n;
      EXPECT_EQ(mine.bound, std::vector<double>(bound, bound + 2 * spec.n)) << "rank " << r;
    }
  }
}

TEST(GoldenFamily, ReduceScatterQuantSumsScaledPartials) {
  Owner o;
  std::vector<MmReduceScatterArgs> ranks(2);
  for (int r = 0; r < 2; ++r) {
    ranks[r].x1 = o.tensor(DType::i8, {2, 1}, {1, 2});
    ranks[r].x2 = o.tensor(DType::i8, {1, 1}, {4.0 * (r + 1)});
    ranks[r].options.x1_scale = o.tensor(DType::f32, {2, 1}, {1.0 + r, 0.5 * (r + 1)});
    ranks[r].options.x2_scale = o.tensor(DType::f32, {1}, {0.25});
  }
  // Row 0: rank 0 gives 1 * 0.25 * 4 = 1, rank 1 gives 2 * 0.25 * 8 = 4.
  expect_values(golden_mm_reduce_scatter(ranks, 0), {5});
  // Row 1: rank 0 gives 0.5 * 0.25 * 8 = 1, rank 1 gives 1 * 0.25 * 16 = 4.
  expect_values(golden_mm_reduce_scatter(ranks, 1), {5});
  // Each rank's x1_scale is its own: without one, rank 1's partial is unscaled by it.
  ranks[1].options.x1_scale.reset();
  expect_values(golden_mm_reduce_scatter(ranks, 0), {1 + 0.25 * 8});
}

// mm = [[3, -4]] (x1 [1, 2] 3-D), y = mm + residual, norm = y * rstd * gamma.
TEST(GoldenFamily, AddRmsNormAddsTheResidualOnceAndNormalisesTheRow) {
  Owner o;
  std::vector<AddRmsNormArgs> ranks(2);
  for (int r = 0; r < 2; ++r) {
    ranks[r].x1 = o.tensor(DType::bf16, {1, 1, 2}, {1, 1});
    ranks[r].x2 = o.tensor(DType::bf16, {2, 2}, {1.0 + r, -1, 0, -1});
    ranks[r].residual = o.tensor(DType::bf16, {1, 1, 2}, {1, 0.5});
    ranks[r].gamma = o.tensor(DType::bf16, {2}, {2, -0.5});
    ranks[r].options.epsilon = 0.25;
  }
  const GoldenAddRmsNorm golden = golden_mm_all_reduce_add_rms_norm(ranks);
  expect_values(golden.y, {4, -3.5});
  EXPECT_EQ(golden.y.shape.batch, 1);
  const double rstd = 1 / std::sqrt((16 + 12.25) / 2 + 0.25);
  expect_values(golden.norm_out, {4 * rstd * 2, -3.5 * rstd * -0.5});
  // One rank: the product rounds twice (the partial, the reduce), y once
  // more. rstd's relative error is about a weighted mean of y's, so
  // norm_out's is at most twice y's largest, plus the roundings of t and
  // norm_out (1% for the fp32 terms).
  const std::vector<AddRmsNormArgs> one(ranks.begin(), ranks.begin() + 1);
  const GoldenAddRmsNorm single = golden_mm_all_reduce_add_rms_norm(one);
  const double u = 0x1p-8;
  const double mm[] = {1, -2};
  double y_relative = 0;
  for (std::size_t e = 0; e < 2; ++e) {
    const double y = std::fabs(single.y.value[e]);
    EXPECT_LT(single.y.bound[e], 1.01 * u * (2 * std::fabs(mm[e]) + y)) << "element " << e;
    y_relative = std::max(y_relative, single.y.bound[e] / y);
  }
  for (std::size_t e = 0; e < 2; ++e) {
    EXPECT_LT(single.norm_out.bound[e],
              1.01 * (2 * y_relative + 2 * u) * std::fabs(single.norm_out.value[e]))
        << "element " << e;
  }
}

TEST(GoldenFamily, RejectsWhatItCannotCompute) {
  SequenceParallelSpec spec;
  spec.m = 5;
  std::vector<SequenceParallelInputs> inputs;
  for (int r = 0; r < 2; ++r) inputs.push_back(make_sequence_parallel_inputs(spec, r));
  std::vector<MmReduceScatterArgs> scatter = {inputs[0].reduce_scatter, inputs[1].reduce_scatter};
  expect_error_naming([&] { golden_mm_reduce_scatter(scatter, 0); }, "m % world_size");
  expect_error_naming([&] { golden_mm_reduce_scatter(scatter, 2); }, "rank");
  std::vector<AllGatherMmArgs> gather = {inputs[0].all_gather, inputs[1].all_gather};
  gather[1].x2 = inputs[0].product.x2.view().transposed();  // [n, k]: another k
  EXPECT_THROW(golden_all_gather_mm(gather, 0), InvalidArgument);
  gather[1].x2 = inputs[0].product.x2.view();
  gather[1].options.output_dtype = DType::bf16;  // plain f16: no other dtype
  expect_error_naming([&] { golden_all_gather_mm(gather, 0); }, "output_dtype");

  spec.m = 4;
  spec.quant = true;
  std::vector<SequenceParallelInputs> quant;
  for (int r = 0; r < 2; ++r) quant.push_back(make_sequence_parallel_inputs(spec, r));
  gather = {quant[0].all_gather, quant[1].all_gather};
  gather[0].options.x2_scale.reset();
  expect_error_naming([&] { golden_all_gather_mm(gather, 0); }, "x2_scale");
  gather[0] = quant[0].all_gather;
  gather[1].options.x1_scale.reset();
  EXPECT_THROW(golden_all_gather_mm(gather, 0), DisagreementError);
  gather[1] = quant[1].all_gather;
  gather[1].options.x2_scale = TensorView(quant[1].x2_scale.data(), DType::f32, {spec.n - 1});
  expect_error_naming([&] { golden_all_gather_mm(gather, 0); }, "x2_scale");

  SequenceParallelSpec uneven = spec;
  uneven.uneven_k = true;
  const SequenceParallelInputs k_differs = make_sequence_parallel_inputs(uneven, 1);
  gather = {quant[0].all_gather, k_differs.all_gather};
  EXPECT_THROW(golden_all_gather_mm(gather, 0), DisagreementError);
}

TEST(GoldenFamily, AddRmsNormRejectsWhatItCannotCompute) {
  AddRmsNormSpec spec;
  spec.product.m = 4;
  spec.product.n = 8;
  std::vector<AddRmsNormInputs> inputs;
  for (int r = 0; r < 2; ++r) inputs.push_back(make_add_rms_norm_inputs(spec, r));
  std::vector<AddRmsNormArgs> ranks = {inputs[0].args, inputs[1].args};
  EXPECT_NO_THROW(golden_mm_all_reduce_add_rms_norm(ranks));
  ranks[1].options.epsilon = 1e-5;
  EXPECT_THROW(golden_mm_all_reduce_add_rms_norm(ranks), DisagreementError);
  ranks[1] = inputs[1].args;
  ranks[0].options.epsilon = 1;
  expect_error_naming([&] { golden_mm_all_reduce_add_rms_norm(ranks); }, "epsilon");
  ranks[0] = inputs[0].args;
  ranks[0].residual = TensorView(inputs[0].residual.data(), DType::f16, {4, 8});
  expect_error_naming([&] { golden_mm_all_reduce_add_rms_norm(ranks); }, "residual");
  ranks[0] = inputs[0].args;
  ranks[0].gamma = TensorView(inputs[0].gamma.data(), DType::bf16, {8});
  expect_error_naming([&] { golden_mm_all_reduce_add_rms_norm(ranks); }, "gamma");
  ranks[0] = inputs[0].args;
  Tensor other_gamma(DType::f16, {8});
  ranks[1].gamma = other_gamma.view();
  EXPECT_THROW(golden_mm_all_reduce_add_rms_norm(ranks), DisagreementError);
}

// ---- the bounds against fp32 simulations of the contract ----

// The next value of `dtype` (f16 or bf16) above `value`, a finite value of it.
double next_up(DType dtype, double value) {
  const auto f = static_cast<float>(value);
  std::uint16_t bits = dtype == DType::f16 ? f32_to_f16(f).bits : f32_to_bf16(f).bits;
  if (bits & 0x8000u) {
    bits = bits == 0x8000u ? std::uint16_t{1} : static_cast<std::uint16_t>(bits - 1);
  } else {
    ++bits;
  }
  return dtype == DType::f16 ? f16_to_f32(Half{bits}) : bf16_to_f32(BFloat16{bits});
}

double next_down(DType dtype, double value) { return -next_up(dtype, -value); }

// The value of `dtype` farthest from `value` in `direction` (+1 or -1) that is
// still within `bound` of it.
double edge_within(DType dtype, double value, double bound, int direction) {
  const double limit = value + direction * bound;
  const auto step_out = [&](double x) {
    return direction > 0 ? next_up(dtype, x) : next_down(dtype, x);
  };
  const auto step_in = [&](double x) {
    return direction > 0 ? next_down(dtype, x) : next_up(dtype, x);
  };
  const auto beyond = [&](double x) { return direction * (x - limit) > 0; };
  double edge = round_to(dtype, static_cast<float>(limit));
  while (beyond(edge)) edge = step_in(edge);
  while (!beyond(step_out(edge))) edge = step_out(edge);
  return edge;
}

// Element e at the edge of its bound passes; one unit in the last place
// beyond it, on either side, is the one mismatch.
void expect_tight_at(const Tensor& out, const GoldenResult& golden, std::size_t e) {
  const DType dtype = out.dtype();
  const auto index = static_cast<std::int64_t>(e);
  const double kept = load_f32(out, index);
  for (const int direction : {+1, -1}) {
    const double edge = edge_within(dtype, golden.value[e], golden.bound[e], direction);
    store(out, index, edge);
    EXPECT_TRUE(compare(out, golden).ok()) << "element " << e << " at " << edge;
    const double beyond = direction > 0 ? next_up(dtype, edge) : next_down(dtype, edge);
    store(out, index, beyond);
    EXPECT_EQ(compare(out, golden).mismatches, 1)
        << "element " << e << ": " << beyond << " is beyond " << golden.value[e] << " +- "
        << golden.bound[e];
  }
  store(out, index, kept);
}

// The element of largest magnitude, and the first.
void expect_tight(const Tensor& out, const GoldenResult& golden) {
  std::size_t largest = 0;
  for (std::size_t e = 0; e < golden.value.size(); ++e) {
    if (std::fabs(golden.value[e]) > std::fabs(golden.value[largest])) largest = e;
  }
  expect_tight_at(out, golden, largest);
  expect_tight_at(out, golden, 0);
}

// One row block of a sequence-parallel operator as the contract computes it:
// fp32 (wrapping int32 on the quant path) accumulation along k in the given
// order, the fp32 epilogue, one rounding to `out`.
std::vector<float> simulate_block(const TensorView& x1, const std::optional<TensorView>& x1_scale,
                                  const TensorView& x2, const SequenceParallelOptions& options,
                                  DType out, bool reverse_k) {
  const std::int64_t m = x1.size(0), k = x1.size(1), n = x2.size(1);
  std::vector<float> part(static_cast<std::size_t>(m * n));
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      float value = 0;
      if (x1.dtype() == DType::i8) {
        auto acc = options.bias
                       ? static_cast<std::uint32_t>(options.bias->data_as<const std::int32_t>()[j])
                       : 0u;
        for (std::int64_t l = 0; l < k; ++l) {
          acc += static_cast<std::uint32_t>(
              x1.data_as<const std::int8_t>()[i * k + l] *
              x2.data_as<const std::int8_t>()[l * x2.stride(0) + j * x2.stride(1)]);
        }
        const TensorView& scales = *options.x2_scale;
        const float column = scales.dtype() == DType::i64
                                 ? unpack_quant_scale(scales.data_as<const std::int64_t>()[j])
                                 : scales.data_as<const float>()[j];
        const float scale = x1_scale ? x1_scale->data_as<const float>()[i] * column : column;
        value = scale * static_cast<float>(static_cast<std::int32_t>(acc));
      } else {
        for (std::int64_t step = 0; step < k; ++step) {
          const std::int64_t l = reverse_k ? k - 1 - step : step;
          value += load_f32(x1, i * k + l) * load_f32(x2, l * x2.stride(0) + j * x2.stride(1));
        }
        if (options.bias) value += load_f32(*options.bias, j);
      }
      part[static_cast<std::size_t>(i * n + j)] = round_to(out, value);
    }
  }
  return part;
}

struct SequenceVariant {
  const char* name;
  bool quant;
  DType dtype;        // plain: x1's
  DType scale_dtype;  // quant: x2_scale's
  std::optional<DType> output_dtype;
  bool x1_scale;
};

const SequenceVariant kSequenceVariants[] = {
    {"plain_f16", false, DType::f16, DType::f32, std::nullopt, false},
    {"plain_bf16", false, DType::bf16, DType::f32, std::nullopt, false},
    {"quant_f32_scale_bf16", true, DType::f16, DType::f32, std::nullopt, true},
    {"quant_f32_scale_f16", true, DType::f16, DType::f32, DType::f16, true},
    {"quant_i64_scale", true, DType::f16, DType::i64, std::nullopt, true},
    {"quant_no_x1_scale", true, DType::f16, DType::f32, DType::bf16, false},
};

SequenceParallelSpec variant_spec(const SequenceVariant& v, int world) {
  SequenceParallelSpec spec;
  spec.quant = v.quant;
  spec.dtype = v.dtype;
  spec.x2_scale_dtype = v.scale_dtype;
  spec.output_dtype = v.output_dtype;
  spec.x1_scale = v.x1_scale;
  spec.x2_scale_2d = world == 3;
  spec.x2_transposed = world == 3;
  spec.m = 6;
  spec.n = 10;
  spec.k = 200;
  spec.bias = true;
  spec.seed = 21 + static_cast<std::uint64_t>(world);
  return spec;
}

TEST(GoldenFamilyBound, HoldsForAnFp32AllGatherAndIsTight) {
  for (const SequenceVariant& v : kSequenceVariants) {
    for (const int world : {1, 3}) {
      SequenceParallelSpec spec = variant_spec(v, world);
      spec.uneven_n = true;
      std::vector<SequenceParallelInputs> inputs;
      std::vector<AllGatherMmArgs> ranks;
      for (int r = 0; r < world; ++r) inputs.push_back(make_sequence_parallel_inputs(spec, r));
      for (const auto& in : inputs) ranks.push_back(in.all_gather);
      for (int r = 0; r < world; ++r) {
        const GoldenResult golden = golden_all_gather_mm(ranks, r);
        const std::int64_t n = spec.n_for_rank(r);
        for (const bool reverse_k : {false, true}) {
          Tensor out(golden.shape.out_dtype, {world * spec.m, n});
          for (int q = 0; q < world; ++q) {
            const std::vector<float> block =
                simulate_block(ranks[q].x1, ranks[q].options.x1_scale, ranks[r].x2,
                               ranks[r].options, golden.shape.out_dtype, reverse_k);
            for (std::size_t e = 0; e < block.size(); ++e) {
              store(out, q * spec.m * n + static_cast<std::int64_t>(e), block[e]);
            }
          }
          const Comparison result = compare(out, golden);
          EXPECT_TRUE(result.ok())
              << v.name << " p=" << world << " rank " << r << " worst ratio " << result.worst_ratio;
          if (!reverse_k) expect_tight(out, golden);
        }
      }
    }
  }
}

TEST(GoldenFamilyBound, HoldsForAnFp32ReduceScatterAndIsTight) {
  for (const SequenceVariant& v : kSequenceVariants) {
    for (const int world : {1, 3}) {
      SequenceParallelSpec spec = variant_spec(v, world);
      spec.uneven_k = true;
      std::vector<SequenceParallelInputs> inputs;
      std::vector<MmReduceScatterArgs> ranks;
      for (int r = 0; r < world; ++r) inputs.push_back(make_sequence_parallel_inputs(spec, r));
      for (const auto& in : inputs) ranks.push_back(in.reduce_scatter);
      const DType out_dtype = golden_mm_reduce_scatter(ranks, 0).shape.out_dtype;
      for (const bool reverse_k : {false, true}) {
        std::vector<float> sum;
        for (int r = 0; r < world; ++r) {
          const std::vector<float> part =
              simulate_block(ranks[r].x1, ranks[r].options.x1_scale, ranks[r].x2, ranks[r].options,
                             out_dtype, reverse_k);
          if (r == 0) {
            sum = part;
          } else {
            for (std::size_t e = 0; e < sum.size(); ++e) sum[e] += part[e];
          }
        }
        const std::int64_t rows = spec.m / world;
        for (int r = 0; r < world; ++r) {
          const GoldenResult golden = golden_mm_reduce_scatter(ranks, r);
          Tensor out(out_dtype, {rows, spec.n});
          for (std::int64_t e = 0; e < rows * spec.n; ++e) {
            store(out, e,
                  round_to(out_dtype, sum[static_cast<std::size_t>(r * rows * spec.n + e)]));
          }
          const Comparison result = compare(out, golden);
          EXPECT_TRUE(result.ok())
              << v.name << " p=" << world << " rank " << r << " worst ratio " << result.worst_ratio;
          if (!reverse_k) expect_tight(out, golden);
        }
      }
    }
  }
}

// y and norm_out from an mm_out as the contract computes them; the mean's
// fp32 sum runs in plain order along the row, over `mean_count` elements.
void simulate_norm(const std::vector<double>& mm, const AddRmsNormArgs& args, DType out,
                   std::int64_t mean_count, const Tensor& y, const Tensor& norm_out) {
  const std::int64_t n = args.gamma.size(0);
  const auto rows = static_cast<std::int64_t>(mm.size()) / n;
  const auto epsilon = static_cast<float>(args.options.epsilon);
  for (std::int64_t i = 0; i < rows; ++i) {
    float squares = 0;
    for (std::int64_t j = 0; j < n; ++j) {
      const std::int64_t e = i * n + j;
      const float value = round_to(
          out, static_cast<float>(mm[static_cast<std::size_t>(e)]) + load_f32(args.residual, e));
      store(y, e, value);
      squares += value * value;
    }
    const float rstd = 1.0f / std::sqrt(squares / static_cast<float>(mean_count) + epsilon);
    for (std::int64_t j = 0; j < n; ++j) {
      const float t = round_to(out, load_f32(y, i * n + j) * rstd);
      store(norm_out, i * n + j, round_to(out, t * load_f32(args.gamma, j)));
    }
  }
}

struct NormVariant {
  const char* name;
  Mode mode;
  DType dtype;
  ScaleKind kind;
  std::int64_t group_size;
};

const NormVariant kNormVariants[] = {
    {"plain_f16", Mode::plain, DType::f16, ScaleKind::none, 0},
    {"plain_bf16", Mode::plain, DType::bf16, ScaleKind::none, 0},
    {"wq_bf16_per_channel", Mode::weight_quant, DType::bf16, ScaleKind::per_channel, 0},
    {"wq_f16_per_group", Mode::weight_quant, DType::f16, ScaleKind::per_group, 32},
    {"full_quant_f16", Mode::full_quant, DType::f16, ScaleKind::per_channel, 0},
    {"full_quant_bf16", Mode::full_quant, DType::bf16, ScaleKind::per_tensor, 0},
};

AddRmsNormSpec norm_spec(const NormVariant& v, int world) {
  AddRmsNormSpec spec;
  spec.product.mode = v.mode;
  spec.product.dtype = v.dtype;
  spec.product.scale_kind = v.kind;
  spec.product.group_size = v.group_size;
  spec.product.offset = v.mode == Mode::weight_quant;
  spec.product.m = 6;
  spec.product.n = 16;
  spec.product.k = 100;
  spec.product.batch = world == 3 ? 2 : 0;
  spec.product.uneven_k = true;
  spec.product.bias = true;
  spec.product.seed = 31 + static_cast<std::uint64_t>(world);
  return spec;
}

struct NormCase {
  std::vector<AddRmsNormInputs> inputs;
  std::vector<AddRmsNormArgs> ranks;
  GoldenResult mm;
  GoldenAddRmsNorm golden;
};

NormCase norm_case(const AddRmsNormSpec& spec, int world) {
  NormCase c;
  std::vector<RankArgs> products;
  for (int r = 0; r < world; ++r) c.inputs.push_back(make_add_rms_norm_inputs(spec, r));
  for (const auto& in : c.inputs) {
    c.ranks.push_back(in.args);
    products.push_back(in.product.args);
  }
  c.mm = golden_mm_all_reduce(products);
  c.golden = golden_mm_all_reduce_add_rms_norm(c.ranks);
  return c;
}

// mm_out anywhere within its bound, y and norm_out as the contract computes
// them: within theirs. Pushed to the edge away from zero every |y| grows, and
// with it the row's mean: the largest error rstd can have.
TEST(GoldenFamilyBound, HoldsForAnFp32NormOfAnyProductWithinItsBound) {
  for (const NormVariant& v : kNormVariants) {
    for (const int world : {1, 3}) {
      const NormCase c = norm_case(norm_spec(v, world), world);
      const DType out = c.mm.shape.out_dtype;
      for (const int push : {0, +1, -1}) {
        std::vector<double> mm(c.mm.value.size());
        for (std::size_t e = 0; e < mm.size(); ++e) {
          const double value = c.mm.value[e];
          const int away = value < 0 ? -1 : 1;
          mm[e] = push == 0 ? round_to(out, static_cast<float>(value))
                            : edge_within(out, value, c.mm.bound[e], push * away);
        }
        const auto shape = c.inputs[0].residual.shape();
        const Tensor y(out, shape), norm_out(out, shape);
        simulate_norm(mm, c.ranks[0], out, c.ranks[0].gamma.size(0), y, norm_out);
        const Comparison y_result = compare(y, c.golden.y);
        const Comparison norm_result = compare(norm_out, c.golden.norm_out);
        EXPECT_TRUE(y_result.ok()) << v.name << " p=" << world << " push " << push
                                   << " y worst ratio " << y_result.worst_ratio;
        EXPECT_TRUE(norm_result.ok()) << v.name << " p=" << world << " push " << push
                                      << " norm_out worst ratio " << norm_result.worst_ratio;
        if (push == 0) {
          expect_tight(y, c.golden.y);
          expect_tight(norm_out, c.golden.norm_out);
        }
      }
    }
  }
}

// A mean over n - 1 elements (a 1/32 error in the mean of n = 16) is caught.
TEST(GoldenFamilyBound, CatchesANormOverTheWrongCount) {
  const NormCase c = norm_case(norm_spec(kNormVariants[0], 2), 2);
  const DType out = c.mm.shape.out_dtype;
  std::vector<double> mm(c.mm.value.size());
  for (std::size_t e = 0; e < mm.size(); ++e)
    mm[e] = round_to(out, static_cast<float>(c.mm.value[e]));
  const auto shape = c.inputs[0].residual.shape();
  const Tensor y(out, shape), norm_out(out, shape);
  const std::int64_t n = c.ranks[0].gamma.size(0);
  simulate_norm(mm, c.ranks[0], out, n, y, norm_out);
  ASSERT_TRUE(compare(norm_out, c.golden.norm_out).ok());
  simulate_norm(mm, c.ranks[0], out, n - 1, y, norm_out);
  EXPECT_GT(compare(norm_out, c.golden.norm_out).mismatches, mm.size() / 2);
}

// Rows whose fp32 sum of squares overflows: rstd is 0 and norm_out 0. Row 0
// (2^70 twice, squares 2^141) overflows for sure: zero, bound 0. Row 1
// (2^64, squares exactly 2^128) may, by rounding: any finite value passes.
// Row 2 is in range and keeps its finite bound.
TEST(GoldenFamilyBound, RowsWhoseSquaresOverflowFp32NormToZero) {
  Owner o;
  const double big = std::ldexp(1.0, 70), edge = std::ldexp(1.0, 64);
  AddRmsNormArgs args;
  args.x1 = o.tensor(DType::bf16, {1, 3, 3}, {1, 0, 0, 0, 1, 0, 0, 0, 1});
  args.x2 = o.tensor(DType::bf16, {3, 2}, {big, -big, edge, 0, 1, 2});
  args.residual = o.tensor(DType::bf16, {1, 3, 2}, {0, 0, 0, 0, 0, 0});
  args.gamma = o.tensor(DType::bf16, {2}, {1, -3});
  args.options.epsilon = 1e-6;
  const AddRmsNormArgs ranks[1] = {args};
  const GoldenAddRmsNorm golden = golden_mm_all_reduce_add_rms_norm(ranks);
  for (int j = 0; j < 2; ++j) {
    EXPECT_EQ(golden.norm_out.value[j], 0.0) << "element " << j;
    EXPECT_EQ(golden.norm_out.bound[j], 0.0) << "element " << j;
    EXPECT_EQ(golden.norm_out.bound[2 + j], std::numeric_limits<double>::infinity());
    EXPECT_GT(golden.norm_out.bound[4 + j], 0.0);
    EXPECT_LT(golden.norm_out.bound[4 + j], 0.1 * std::fabs(golden.norm_out.value[4 + j]));
  }
  const std::vector<double> mm(golden.y.value.begin(), golden.y.value.end());
  const Tensor y(DType::bf16, {1, 3, 2}), norm_out(DType::bf16, {1, 3, 2});
  simulate_norm(mm, args, DType::bf16, 2, y, norm_out);
  const Comparison result = compare(norm_out, golden.norm_out);
  EXPECT_TRUE(result.ok()) << "worst ratio " << result.worst_ratio;
  EXPECT_EQ(load_f32(norm_out.view(), 0), 0.0f);
}

}  // namespace
}  // namespace tpfuse::testing
