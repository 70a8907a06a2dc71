// The tile-GEMM engines against the golden model, at every instruction-set
// level this CPU can run, on shapes that stress the edges (m, n, k in
// {1, 7, 33, 129, 1000}, transposed x2, per-group scales with a ragged last
// group); and the bitwise invariances the operator relies on: a row's result
// does not depend on the row range it was computed in, nor on the threads.
// Full quant with per-row scales, every engine bit for bit against the formula.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "gemm/engines.h"
#include "gemm/float_gemm.h"
#include "gemm/microkernel.h"
#include "gemm/onednn_gemm.h"
#include "gemm/reference_gemm.h"
#include "gemm/thread_pool.h"
#include "gemm/work_split.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/gemm/tile_gemm.h"
#include "tpfuse/ops/validate.h"
#include "tpfuse/testing/golden.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse::gemm {
namespace {

using testing::CaseSpec;

std::vector<IsaLevel> runnable_levels() {
  std::vector<IsaLevel> levels;
  for (IsaLevel level : {IsaLevel::portable, IsaLevel::avx2, IsaLevel::avx512, IsaLevel::avx512_dl}) {
    if (level <= detected_isa()) levels.push_back(level);
  }
  return levels;
}

// Every engine the operands can get: the one chosen at each level this CPU
// runs, and oneDNN's bf16 matmul for plain bf16 wherever the CPU has
// AVX512-BF16 (it is chosen only with AMX, so it is also tested on its own).
std::vector<std::unique_ptr<PreparedGemm>> engines_for(const GemmOperands& operands) {
  std::vector<std::unique_ptr<PreparedGemm>> engines;
  for (IsaLevel level : runnable_levels()) engines.push_back(prepare_gemm_for_isa(operands, level));
  const bool plain_bf16 = operands.shape.mode == Mode::plain && operands.shape.in_dtype == DType::bf16;
  if (plain_bf16 && cpu_features().avx512_bf16) {
    engines.push_back(prepare_onednn_gemm(operands, kernels_for(IsaLevel::avx512_dl),
                                          operands.threads > 0 ? operands.threads : 1));
  }
  return engines;
}

// One rank's inputs and the operands the operator would hand the GEMM.
struct GemmCase {
  explicit GemmCase(const CaseSpec& spec) : inputs(testing::make_rank_inputs(spec, 0)) {
    const testing::RankArgs& args = inputs.args;
    shape = validate_call(args.x1, args.x2, args.options);
    operands.shape = shape;
    const std::int64_t x1_shape[2] = {shape.m, shape.k};
    operands.x1 = TensorView(args.x1.data(), args.x1.dtype(), x1_shape);
    operands.x2 = args.x2;
    operands.bias = args.options.bias;
    if (args.options.x3) {
      const std::int64_t x3_shape[2] = {shape.m, shape.n};
      operands.x3 = TensorView(args.options.x3->data(), args.options.x3->dtype(), x3_shape);
    }
    operands.scale =
        shape.mode == Mode::full_quant ? args.options.dequant_scale : args.options.antiquant_scale;
    operands.offset = args.options.antiquant_offset;
    operands.threads = 1;
  }

  std::size_t out_bytes() const { return static_cast<std::size_t>(shape.m * shape.n) * dtype_size(shape.out_dtype); }

  testing::RankInputs inputs;
  CallShape shape;
  GemmOperands operands;
};

// Computes all rows, in the row ranges [cuts[i], cuts[i+1]), into an m x n
// output (written through a wider buffer with ld = n + 3 whose padding must
// stay untouched).
std::vector<unsigned char> compute(const PreparedGemm& gemm, const CallShape& shape,
                                   const std::vector<std::int64_t>& cuts) {
  const std::size_t elem = dtype_size(shape.out_dtype);
  const std::int64_t ld = shape.n + 3;
  std::vector<unsigned char> wide(static_cast<std::size_t>(shape.m * ld) * elem, 0xA5);
  for (std::size_t i = 0; i + 1 < cuts.size(); ++i) {
    gemm.compute_rows(cuts[i], cuts[i + 1], wide.data() + cuts[i] * ld * elem, ld);
  }
  std::vector<unsigned char> out(static_cast<std::size_t>(shape.m * shape.n) * elem);
  for (std::int64_t i = 0; i < shape.m; ++i) {
    std::memcpy(out.data() + i * shape.n * elem, wide.data() + i * ld * elem, shape.n * elem);
    for (std::size_t b = shape.n * elem; b < ld * elem; ++b) {
      EXPECT_EQ(wide[i * ld * elem + b], 0xA5) << "row " << i << ": padding past n was written";
    }
  }
  return out;
}

std::vector<std::int64_t> whole(std::int64_t m) { return {0, m}; }

// Random cuts, including single rows and ranges that start mid register tile.
std::vector<std::int64_t> random_cuts(std::int64_t m, std::uint32_t seed) {
  std::mt19937 random(seed);
  std::vector<std::int64_t> cuts{0};
  while (cuts.back() < m) {
    const std::int64_t step = 1 + static_cast<std::int64_t>(random() % 23);
    cuts.push_back(std::min(m, cuts.back() + step));
  }
  return cuts;
}

struct NamedCase {
  std::string name;
  CaseSpec spec;
};

void PrintTo(const NamedCase& c, std::ostream* os) { *os << c.name; }

CaseSpec make_spec(Mode mode, DType dtype, std::int64_t m, std::int64_t k, std::int64_t n) {
  CaseSpec spec;
  spec.mode = mode;
  spec.dtype = dtype;
  spec.m = m;
  spec.k = k;
  spec.n = n;
  spec.seed = static_cast<std::uint64_t>(m * 1000003 + k * 1009 + n);
  return spec;
}

std::vector<NamedCase> engine_cases() {
  std::vector<NamedCase> cases;
  struct Dims {
    std::int64_t m, k, n;
  };
  // Small m reads x2 in place (or packed in its own dtype when transposed);
  // larger m packs fp32 panels. Every dim meets 1, 7, 33, 129 and 1000.
  const Dims dims[] = {{1, 1, 1},     {1, 1000, 33}, {7, 33, 129},  {33, 129, 7},
                       {129, 7, 33},  {129, 1000, 129}, {1000, 33, 7}, {7, 129, 1000},
                       {1000, 129, 1}, {1, 33, 1000}};
  for (Mode mode : {Mode::plain, Mode::weight_quant, Mode::full_quant}) {
    for (DType dtype : {DType::f16, DType::bf16}) {
      for (const Dims& d : dims) {
        for (bool transposed : {false, true}) {
          CaseSpec spec = make_spec(mode, dtype, d.m, d.k, d.n);
          spec.x2_transposed = transposed;
          spec.bias = (d.m + d.n) % 2 == 0;
          spec.x3 = d.k % 2 == 1;
          spec.scale_kind = d.n % 2 == 0 ? ScaleKind::per_tensor : ScaleKind::per_channel;
          spec.offset = mode == Mode::weight_quant && d.m % 2 == 1;
          cases.push_back({cat(mode_name(mode), "_", dtype_name(dtype), "_m", d.m, "_k", d.k, "_n",
                               d.n, transposed ? "_t" : ""),
                           spec});
        }
      }
    }
  }
  // A long k (oneDNN blocks k; x2 wider than one oneDNN slice of 512 columns).
  for (Mode mode : {Mode::plain, Mode::full_quant}) {
    CaseSpec spec = make_spec(mode, DType::bf16, 70, 4096, 520);
    spec.bias = true;
    spec.x3 = true;
    cases.push_back({cat(mode_name(mode), "_bf16_m70_k4096_n520"), spec});
  }
  // Per-group weight scales, with a ragged last group, with and without offset.
  for (DType dtype : {DType::f16, DType::bf16}) {
    for (bool transposed : {false, true}) {
      for (std::int64_t m : {7, 129}) {
        CaseSpec spec = make_spec(Mode::weight_quant, dtype, m, 1000, 33);
        spec.scale_kind = ScaleKind::per_group;
        spec.group_size = 96;  // 10 groups of 96, then one of 40
        spec.offset = m == 7;
        spec.bias = true;
        spec.x3 = true;
        spec.x2_transposed = transposed;
        cases.push_back({cat("weight_quant_group_", dtype_name(dtype), "_m", m, transposed ? "_t" : ""), spec});
        spec.k = 129;
        spec.group_size = 32;  // a last group of one row
        spec.n = 40;
        cases.push_back({cat("weight_quant_group32_", dtype_name(dtype), "_m", m, transposed ? "_t" : ""), spec});
      }
    }
  }
  return cases;
}

class EngineTest : public ::testing::TestWithParam<NamedCase> {};

TEST_P(EngineTest, MatchesGoldenAtEveryLevel) {
  GemmCase c(GetParam().spec);
  const testing::RankArgs args[] = {c.inputs.args};
  const testing::GoldenResult golden = testing::golden_mm_all_reduce(args);
  for (const auto& gemm : engines_for(c.operands)) {
    SCOPED_TRACE(cat("engine ", gemm->engine()));
    std::vector<unsigned char> out = compute(*gemm, c.shape, whole(c.shape.m));
    const std::int64_t out_shape[2] = {c.shape.m, c.shape.n};
    const testing::Comparison cmp =
        testing::compare(TensorView(out.data(), c.shape.out_dtype, out_shape), golden);
    EXPECT_TRUE(cmp.ok()) << cmp.mismatches << " elements beyond their bound; worst |error| / bound "
                          << cmp.worst_ratio << ", max |error| " << cmp.max_abs_error;
    if (c.shape.mode == Mode::full_quant) {
      // int32 sums are exact and the epilogue's order is fixed: every engine
      // must give the reference engine's bits.
      const auto reference = prepare_reference_gemm(c.operands);
      EXPECT_TRUE(out == compute(*reference, c.shape, whole(c.shape.m))) << "differs from the reference engine";
    }
  }
}

// Sets the work a thread must have (thread_pool.h) for one test.
class MinWorkPerThread {
 public:
  explicit MinWorkPerThread(double multiply_adds) : saved_(min_multiply_adds_per_thread()) {
    set_min_multiply_adds_per_thread(multiply_adds);
  }
  ~MinWorkPerThread() { set_min_multiply_adds_per_thread(saved_); }

 private:
  double saved_;
};

TEST_P(EngineTest, RowsDoNotDependOnRangeOrThreads) {
  const MinWorkPerThread any_work(0);  // every case on every thread given
  GemmCase c(GetParam().spec);
  const auto engines = engines_for(c.operands);
  std::map<int, std::vector<std::unique_ptr<PreparedGemm>>> parallel_engines;
  for (int threads : {2, 3}) {
    GemmOperands threaded = c.operands;
    threaded.threads = threads;
    parallel_engines[threads] = engines_for(threaded);
  }
  for (std::size_t e = 0; e < engines.size(); ++e) {
    const PreparedGemm& gemm = *engines[e];
    SCOPED_TRACE(cat("engine ", gemm.engine()));
    const std::vector<unsigned char> expected = compute(gemm, c.shape, whole(c.shape.m));
    EXPECT_TRUE(compute(gemm, c.shape, random_cuts(c.shape.m, 7)) == expected) << "random row ranges";
    if (c.shape.m > 1) {
      EXPECT_TRUE(compute(gemm, c.shape, {0, c.shape.m - 1, c.shape.m}) == expected) << "last row alone";
    }
    for (int threads : {2, 3}) {
      const auto& parallel = parallel_engines[threads][e];
      ASSERT_EQ(std::string(parallel->engine()), std::string(gemm.engine()));
      EXPECT_TRUE(compute(*parallel, c.shape, whole(c.shape.m)) == expected) << threads << " threads";
      EXPECT_TRUE(compute(*parallel, c.shape, random_cuts(c.shape.m, 11)) == expected)
          << threads << " threads, random row ranges";
    }
  }
}

// A call too small to pay for waking a worker runs on its caller alone;
// larger ones get a thread per 2^18 multiply-adds, up to those given.
TEST(WorkSplit, SmallCallsStayOnTheCallingThread) {
  EXPECT_EQ(threads_for_work(8, 1, 64, 64), 1);
  EXPECT_EQ(threads_for_work(8, 1, 512, 512), 1);
  EXPECT_EQ(threads_for_work(8, 0, 4096, 4096), 1);
  EXPECT_EQ(threads_for_work(8, 1, 1024, 512), 2);
  EXPECT_EQ(threads_for_work(8, 1, 4096, 1024), 8);
  EXPECT_EQ(threads_for_work(2, 64, 4096, 4096), 2);
  EXPECT_EQ(split_work(0, 1, 4, 6, 72, threads_for_work(8, 1, 64, 64)).size(), 1u);
  const MinWorkPerThread any_work(0);
  EXPECT_EQ(threads_for_work(8, 1, 64, 64), 8);
}

INSTANTIATE_TEST_SUITE_P(Cases, EngineTest, ::testing::ValuesIn(engine_cases()),
                         [](const ::testing::TestParamInfo<NamedCase>& info) { return info.param.name; });

// A packed int8 weight (the binding's cache, tpfuse::PackedWeight) keeps its
// int8 pairs and is dequantized in registers, several panels at a time for a
// row or two and 32 columns a pass from 7 rows, or into L1 for more than 12:
// every level within the bound, any row ranges and threads the same bits. k = 257: a ragged last group of
// one row and a half pair; n = 300: 4 + 1 panels, the last one ragged.
TEST(PackedInt8Weight, DecodeRowsMatchGoldenInAnyRanges) {
  for (bool transposed : {false, true}) {
    for (std::int64_t m : {1, 2, 8, 13}) {
      CaseSpec spec = make_spec(Mode::weight_quant, DType::bf16, m, 257, 300);
      spec.scale_kind = m % 2 == 0 ? ScaleKind::per_group : ScaleKind::per_channel;
      spec.group_size = m % 2 == 0 ? 128 : 0;
      spec.offset = m != 8;
      spec.bias = true;
      spec.x3 = m > 2;
      spec.x2_transposed = transposed;
      GemmCase c(spec);
      const testing::RankArgs args[] = {c.inputs.args};
      const testing::GoldenResult golden = testing::golden_mm_all_reduce(args);
      for (IsaLevel level : runnable_levels()) {
        const auto packing = pack_x2_for_isa(c.operands, level);
        GemmOperands packed = c.operands;
        packed.packed = packing.get();
        const auto gemm = prepare_gemm_for_isa(packed, level);
        SCOPED_TRACE(cat("m=", m, transposed ? " transposed" : "", " at ", isa_name(level), ": ",
                         gemm->engine()));
        std::vector<unsigned char> out = compute(*gemm, c.shape, whole(m));
        const std::int64_t out_shape[2] = {m, c.shape.n};
        const testing::Comparison cmp =
            testing::compare(TensorView(out.data(), c.shape.out_dtype, out_shape), golden);
        EXPECT_TRUE(cmp.ok()) << cmp.mismatches
                              << " elements beyond their bound; worst |error| / bound "
                              << cmp.worst_ratio;
        EXPECT_TRUE(compute(*gemm, c.shape, random_cuts(m, 5)) == out) << "random row ranges";
        packed.threads = 2;
        EXPECT_TRUE(compute(*prepare_gemm_for_isa(packed, level), c.shape, whole(m)) == out)
            << "2 threads";
      }
    }
  }
}

// ---- full quant with a per-row scale ----
//
// scale(i, j) = row_scale[i] * scale[j], one fp32 product, then times the
// int32 sum (int8 products and int32 bias, wrapping) and plus x3, each step
// rounded once in fp32, then once to the output dtype. Checked bit for bit
// against that formula computed here, element by element.

struct RowScaleSpec {
  std::int64_t m = 0, k = 0, n = 0;
  DType scale_dtype = DType::f32;  // f32, or i64 packed as trans_quant_param packs it
  ScaleKind kind = ScaleKind::per_tensor;
  bool bias = false, x3 = false, transposed = false, row_scale = true;
  DType out_dtype = DType::f32;
};

std::string row_scale_name(const RowScaleSpec& s) {
  return cat("m", s.m, "_k", s.k, "_n", s.n, "_", dtype_name(s.scale_dtype), "_",
             scale_kind_name(s.kind), s.bias ? "_bias" : "", s.x3 ? "_x3" : "",
             s.transposed ? "_t" : "", s.row_scale ? "_rows" : "_norows", "_",
             dtype_name(s.out_dtype));
}

void PrintTo(const RowScaleSpec& spec, std::ostream* os) { *os << row_scale_name(spec); }

// The operands of one spec and the data they view, with random values.
struct RowScaleData {
  explicit RowScaleData(const RowScaleSpec& spec) : s(spec) {
    std::mt19937 random(static_cast<std::uint32_t>(spec.m * 7919 + spec.k * 31 + spec.n));
    const auto uniform = [&](float lo, float hi) {
      return std::uniform_real_distribution<float>(lo, hi)(random);
    };
    x1.resize(static_cast<std::size_t>(s.m * s.k));
    x2.resize(static_cast<std::size_t>(s.k * s.n));
    for (auto& v : x1) v = static_cast<std::int8_t>(random());
    for (auto& v : x2) v = static_cast<std::int8_t>(random());
    // Every seventh bias close below the int32 limit, so that sums wrap.
    for (std::int64_t j = 0; j < s.n; ++j) {
      const auto small = static_cast<std::int32_t>(random() % 2000001) - 1000000;
      bias.push_back(j % 7 == 0 ? std::numeric_limits<std::int32_t>::max() - 1000000 + small
                                : small);
    }
    for (std::int64_t j = 0; j < (s.kind == ScaleKind::per_tensor ? 1 : s.n); ++j) {
      col.push_back(uniform(0.5e-3f, 1.5e-3f));
      packed.push_back(static_cast<std::int64_t>(std::bit_cast<std::uint32_t>(col.back())));
    }
    for (std::int64_t i = 0; i < s.m; ++i) row.push_back(uniform(0.25f, 4.0f));
    x3.resize(static_cast<std::size_t>(s.m * s.n));
    for (float& v : x3) v = round_to(s.out_dtype, uniform(-8.0f, 8.0f));
    x3_bytes.resize(x3.size() * dtype_size(s.out_dtype));
    for (std::size_t e = 0; e < x3.size(); ++e) store(x3_bytes.data(), e, x3[e]);

    operands.shape.mode = Mode::full_quant;
    operands.shape.in_dtype = DType::i8;
    operands.shape.out_dtype = s.out_dtype;
    operands.shape.m = s.m;
    operands.shape.k = s.k;
    operands.shape.n = s.n;
    operands.shape.x2_transposed = s.transposed;
    operands.shape.has_bias = s.bias;
    operands.shape.has_x3 = s.x3;
    operands.shape.scale_kind = s.kind;
    operands.x1 = TensorView(x1.data(), DType::i8, {s.m, s.k});
    if (s.transposed) {
      // x2[l][j] stored at j * k + l: the transposed view of an [n, k] weight.
      std::vector<std::int8_t> stored(x2.size());
      for (std::int64_t l = 0; l < s.k; ++l) {
        for (std::int64_t j = 0; j < s.n; ++j) stored[j * s.k + l] = x2[l * s.n + j];
      }
      x2_stored = std::move(stored);
      operands.x2 = TensorView(x2_stored.data(), DType::i8, {s.n, s.k}).transposed();
    } else {
      operands.x2 = TensorView(x2.data(), DType::i8, {s.k, s.n});
    }
    if (s.bias) operands.bias = TensorView(bias.data(), DType::i32, {s.n});
    if (s.x3) operands.x3 = TensorView(x3_bytes.data(), s.out_dtype, {s.m, s.n});
    const std::int64_t scale_count = static_cast<std::int64_t>(col.size());
    operands.scale = s.scale_dtype == DType::i64
                         ? TensorView(packed.data(), DType::i64, {scale_count})
                         : TensorView(col.data(), DType::f32, {1, scale_count});
    if (s.row_scale) operands.row_scale = TensorView(row.data(), DType::f32, {s.m});
    operands.threads = 1;
  }

  static float round_to(DType dtype, float v) {
    if (dtype == DType::f16) return f16_to_f32(f32_to_f16(v));
    if (dtype == DType::bf16) return bf16_to_f32(f32_to_bf16(v));
    return v;
  }

  void store(unsigned char* out, std::size_t index, float v) const {
    if (s.out_dtype == DType::f16) {
      const std::uint16_t bits = f32_to_f16(v).bits;
      std::memcpy(out + index * 2, &bits, 2);
    } else if (s.out_dtype == DType::bf16) {
      const std::uint16_t bits = f32_to_bf16(v).bits;
      std::memcpy(out + index * 2, &bits, 2);
    } else {
      std::memcpy(out + index * 4, &v, 4);
    }
  }

  // The formula, element by element, in the output's bytes.
  std::vector<unsigned char> expected() const {
    std::vector<unsigned char> out(static_cast<std::size_t>(s.m * s.n) * dtype_size(s.out_dtype));
    for (std::int64_t i = 0; i < s.m; ++i) {
      for (std::int64_t j = 0; j < s.n; ++j) {
        std::uint32_t sum = s.bias ? static_cast<std::uint32_t>(bias[j]) : 0u;
        for (std::int64_t l = 0; l < s.k; ++l) {
          sum += static_cast<std::uint32_t>(std::int32_t{x1[i * s.k + l]} *
                                            std::int32_t{x2[l * s.n + j]});
        }
        const float col_scale = col[s.kind == ScaleKind::per_tensor ? 0 : j];
        const float scale = s.row_scale ? row[i] * col_scale : col_scale;
        float v = static_cast<float>(static_cast<std::int32_t>(sum)) * scale;
        if (s.x3) v += x3[i * s.n + j];
        store(out.data(), static_cast<std::size_t>(i * s.n + j), v);
      }
    }
    return out;
  }

  RowScaleSpec s;
  std::vector<std::int8_t> x1, x2, x2_stored;
  std::vector<std::int32_t> bias;
  std::vector<float> col, row, x3;
  std::vector<std::int64_t> packed;
  std::vector<unsigned char> x3_bytes;
  GemmOperands operands;
};

// Every engine that runs full quant, at every level this CPU runs, whether
// chosen for these operands or not: the chosen one, the fp32 micro-kernels,
// and oneDNN's s8 matmul (with x2 as stored, and packed: x1 shifted to u8).
struct FullQuantEngines {
  std::vector<std::shared_ptr<const PackedX2>> packings;  // outlive the engines reading them
  std::vector<std::unique_ptr<PreparedGemm>> gemms;
};

FullQuantEngines full_quant_engines(const GemmOperands& operands) {
  FullQuantEngines engines;
  for (IsaLevel level : runnable_levels()) {
    engines.gemms.push_back(prepare_gemm_for_isa(operands, level));
    engines.gemms.push_back(prepare_float_gemm(operands, kernels_for(level), operands.threads));
  }
  if (detected_isa() >= IsaLevel::avx512_dl && cpu_features().avx512_vnni) {
    const KernelTable& kernels = kernels_for(IsaLevel::avx512_dl);
    engines.gemms.push_back(prepare_onednn_gemm(operands, kernels, operands.threads));
    // The packing of the engine for many rows: oneDNN's reordered x2.
    engines.packings.push_back(pack_x2_for_isa(operands, IsaLevel::avx512_dl));
    GemmOperands packed = operands;
    packed.packed = engines.packings.back().get();
    engines.gemms.push_back(prepare_onednn_gemm(packed, kernels, operands.threads));
  }
  return engines;
}

std::vector<RowScaleSpec> row_scale_specs() {
  struct Dims {
    std::int64_t m, k, n;
  };
  // n never a multiple of 8; m = 100 packs fp32 panels, m = 300 spans two
  // of oneDNN's chunks of rows, n = 1030 two of its column slices; k = 300
  // takes several kc-steps of integer sums.
  const Dims dims[] = {{1, 300, 37}, {3, 64, 70},    {17, 300, 37},
                       {64, 5, 70},  {100, 300, 37}, {300, 64, 1030}};
  std::vector<RowScaleSpec> specs;
  int index = 0;
  for (const Dims& d : dims) {
    for (DType scale_dtype : {DType::f32, DType::i64}) {
      for (ScaleKind kind : {ScaleKind::per_tensor, ScaleKind::per_channel}) {
        for (bool bias : {false, true}) {
          ++index;
          RowScaleSpec spec{
              .m = d.m, .k = d.k, .n = d.n, .scale_dtype = scale_dtype, .kind = kind, .bias = bias};
          spec.x3 = index % 3 != 0;
          spec.transposed = index % 2 == 0;
          spec.row_scale = index % 4 != 1;
          // The operators' output dtypes (f16 for an i64 scale, f16 or bf16
          // for an f32 one), and f32, where a wrong order of the products shows.
          if (index % 5 != 0) {
            spec.out_dtype = scale_dtype == DType::i64 || index % 2 == 1 ? DType::f16 : DType::bf16;
          }
          specs.push_back(spec);
        }
      }
    }
  }
  return specs;
}

class RowScaleTest : public ::testing::TestWithParam<RowScaleSpec> {};

TEST_P(RowScaleTest, EveryEngineComputesTheFormula) {
  RowScaleData data(GetParam());
  const CallShape shape{data.operands.shape};
  const std::vector<unsigned char> expected = data.expected();
  const auto reference = prepare_reference_gemm(data.operands);
  EXPECT_TRUE(compute(*reference, shape, whole(shape.m)) == expected) << "reference engine";
  for (int threads : {1, 3}) {
    GemmOperands operands = data.operands;
    operands.threads = threads;
    for (const auto& gemm : full_quant_engines(operands).gemms) {
      SCOPED_TRACE(cat("engine ", gemm->engine(), ", ", threads, " threads"));
      EXPECT_TRUE(compute(*gemm, shape, whole(shape.m)) == expected) << "all rows at once";
      EXPECT_TRUE(compute(*gemm, shape, random_cuts(shape.m, 5)) == expected)
          << "random row ranges";
      if (shape.m > 2) {
        EXPECT_TRUE(compute(*gemm, shape, {0, 1, shape.m / 2, shape.m}) == expected)
            << "uneven halves";
      }
    }
  }
}

// Row scales of one multiply nothing: the bits of a call without them.
TEST_P(RowScaleTest, RowScalesOfOneChangeNothing) {
  RowScaleData data(GetParam());
  const CallShape shape{data.operands.shape};
  GemmOperands without = data.operands;
  without.row_scale.reset();
  GemmOperands ones = data.operands;
  std::vector<float> one(static_cast<std::size_t>(shape.m), 1.0f);
  ones.row_scale = TensorView(one.data(), DType::f32, {shape.m});
  const FullQuantEngines plain = full_quant_engines(without);
  const FullQuantEngines scaled = full_quant_engines(ones);
  ASSERT_EQ(plain.gemms.size(), scaled.gemms.size());
  for (std::size_t e = 0; e < plain.gemms.size(); ++e) {
    SCOPED_TRACE(cat("engine ", plain.gemms[e]->engine()));
    EXPECT_TRUE(compute(*plain.gemms[e], shape, whole(shape.m)) ==
                compute(*scaled.gemms[e], shape, random_cuts(shape.m, 3)));
  }
  EXPECT_TRUE(compute(*prepare_reference_gemm(without), shape, whole(shape.m)) ==
              compute(*prepare_reference_gemm(ones), shape, whole(shape.m)));
}

INSTANTIATE_TEST_SUITE_P(Cases, RowScaleTest, ::testing::ValuesIn(row_scale_specs()),
                         [](const ::testing::TestParamInfo<RowScaleSpec>& info) {
                           return row_scale_name(info.param);
                         });

TEST(RowScale, RejectedOutsideFullQuantOrNotF32) {
  RowScaleData data({.m = 3, .k = 8, .n = 5});
  std::vector<std::int64_t> wide(3, 1);
  GemmOperands wrong = data.operands;
  wrong.row_scale = TensorView(wide.data(), DType::i64, {3});
  EXPECT_THROW(prepare_reference_gemm(wrong), InternalError);
  EXPECT_THROW(prepare_gemm(wrong), InternalError);
  wrong = data.operands;
  wrong.shape.mode = Mode::plain;
  EXPECT_THROW(prepare_reference_gemm(wrong), InternalError);
}

// ---- the kernels' conversions match tpfuse/core/half.h bit for bit ----

std::vector<float> special_and_random_floats() {
  std::vector<float> values = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f,
                               0x1p-14f, 0x1p-24f, 0x1p-25f, 0x1.8p-25f, 0x1p-26f, 0x1p-126f,
                               0x1p-149f, 1.0f + 0x1p-11f, 1.0f + 0x1p-8f, 1.0f + 0x3p-9f,
                               std::numeric_limits<float>::infinity(),
                               -std::numeric_limits<float>::infinity(),
                               std::numeric_limits<float>::max()};
  for (std::uint32_t bits : {0x7fc00000u, 0xffc00001u, 0x7f800001u, 0x7fbfffffu, 0x3f808000u,
                             0x3f818000u, 0x3f80ffffu, 0x7f7fffffu, 0x00008000u}) {
    values.push_back(std::bit_cast<float>(bits));
  }
  std::mt19937 random(3);
  for (int i = 0; i < 20000; ++i) values.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(random())));
  for (int i = 0; i < 20000; ++i) {
    values.push_back(std::ldexp(static_cast<float>(random()) / 4294967296.0f - 0.5f,
                                static_cast<int>(random() % 48) - 30));
  }
  return values;
}

TEST(KernelConversions, RoundingMatchesHalfH) {
  const std::vector<float> values = special_and_random_floats();
  const auto count = static_cast<std::int64_t>(values.size());
  for (IsaLevel level : runnable_levels()) {
    SCOPED_TRACE(isa_name(level));
    const KernelTable& kernels = kernels_for(level);
    std::vector<std::uint16_t> f16(values.size()), bf16(values.size());
    TileEpilogue epilogue;
    epilogue.dst_ld = count;
    epilogue.out_dtype = DType::f16;
    epilogue.dst = f16.data();
    kernels.finish_f32(1, count, values.data(), count, epilogue);
    epilogue.out_dtype = DType::bf16;
    epilogue.dst = bf16.data();
    kernels.finish_f32(1, count, values.data(), count, epilogue);
    for (std::size_t i = 0; i < values.size(); ++i) {
      ASSERT_EQ(f16[i], f32_to_f16(values[i]).bits) << "f16 of bits " << std::hex << std::bit_cast<std::uint32_t>(values[i]);
      ASSERT_EQ(bf16[i], f32_to_bf16(values[i]).bits) << "bf16 of bits " << std::hex << std::bit_cast<std::uint32_t>(values[i]);
    }
  }
}

TEST(KernelConversions, WideningMatchesHalfHAsOperands) {
  std::vector<std::uint16_t> all(65536);
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint16_t>(i);
  for (IsaLevel level : runnable_levels()) {
    SCOPED_TRACE(isa_name(level));
    const KernelTable& kernels = kernels_for(level);
    for (DType dtype : {DType::f16, DType::bf16}) {
      std::vector<float> converted(all.size());
      kernels.convert_to_f32(dtype, all.data(), static_cast<std::int64_t>(all.size()), converted.data());
      for (std::size_t i = 0; i < all.size(); ++i) {
        // As GEMM operands: bf16 subnormals count as zero.
        const float expected =
            dtype == DType::f16 ? f16_to_f32(Half{all[i]}) : bf16_operand_to_f32(BFloat16{all[i]});
        const float got = converted[i];
        if (std::isnan(expected)) {
          // The hardware quiets signalling NaNs; a NaN stays a NaN.
          ASSERT_TRUE(std::isnan(got)) << dtype_name(dtype) << " bits " << std::hex << all[i];
        } else {
          ASSERT_EQ(std::bit_cast<std::uint32_t>(got), std::bit_cast<std::uint32_t>(expected))
              << dtype_name(dtype) << " bits " << std::hex << all[i];
        }
      }
    }
  }
}

TEST(CpuIsa, NamesRoundTrip) {
  for (IsaLevel level : {IsaLevel::portable, IsaLevel::avx2, IsaLevel::avx512, IsaLevel::avx512_dl}) {
    EXPECT_EQ(parse_isa(isa_name(level)), level);
  }
  EXPECT_FALSE(parse_isa("sse9").has_value());
  EXPECT_LE(active_isa(), detected_isa());
}

// Which engine each mode gets, level by level.
TEST(EngineSelection, ByModeAndLevel) {
  CaseSpec spec = make_spec(Mode::plain, DType::f16, 8, 64, 64);
  for (IsaLevel level : runnable_levels()) {
    SCOPED_TRACE(isa_name(level));
    const std::string kernels = std::string(isa_name(kernels_for(level).isa)) + "_";
    const bool dl = level == IsaLevel::avx512_dl;
    const bool pairs = dl && cpu_features().avx512_bf16;
    spec.mode = Mode::plain;
    spec.dtype = DType::f16;
    EXPECT_EQ(prepare_gemm_for_isa(GemmCase(spec).operands, level)->engine(), kernels + "f16_in_place");
    spec.dtype = DType::bf16;
    EXPECT_EQ(prepare_gemm_for_isa(GemmCase(spec).operands, level)->engine(),
              pairs ? "avx512_bf16_pairs_streamed" : kernels + "bf16_in_place");
    spec.mode = Mode::weight_quant;
    EXPECT_EQ(prepare_gemm_for_isa(GemmCase(spec).operands, level)->engine(),
              pairs ? "avx512_bf16_wq_pairs_streamed" : kernels + "wq_bf16_in_place");
    spec.mode = Mode::full_quant;
    EXPECT_EQ(prepare_gemm_for_isa(GemmCase(spec).operands, level)->engine(),
              dl && cpu_features().avx512_vnni ? "onednn_s8" : kernels + "i8_in_place");
    spec.m = 4;
    EXPECT_EQ(prepare_gemm_for_isa(GemmCase(spec).operands, level)->engine(), kernels + "i8_in_place");
    spec.m = 8;
    spec.x2_transposed = true;
    EXPECT_EQ(prepare_gemm_for_isa(GemmCase(spec).operands, level)->engine(),
              dl && cpu_features().avx512_vnni ? "onednn_s8" : kernels + "i8_packed_source");
    spec.mode = Mode::plain;
    spec.dtype = DType::f16;
    EXPECT_EQ(prepare_gemm_for_isa(GemmCase(spec).operands, level)->engine(), kernels + "f16_dot");
    spec.x2_transposed = false;
    spec.m = 100;  // more rows than the in-place layouts serve
    EXPECT_EQ(prepare_gemm_for_isa(GemmCase(spec).operands, level)->engine(), kernels + "f16_packed");
    spec.dtype = DType::bf16;
    EXPECT_EQ(prepare_gemm_for_isa(GemmCase(spec).operands, level)->engine(),
              dl && cpu_features().amx_bf16 ? "onednn_bf16" : pairs ? "avx512_bf16_pairs" : kernels + "bf16_packed");
    spec.mode = Mode::full_quant;
    EXPECT_EQ(prepare_gemm_for_isa(GemmCase(spec).operands, level)->engine(),
              dl && cpu_features().avx512_vnni ? "onednn_s8" : kernels + "i8_packed");
    spec.dtype = DType::f16;
    spec.m = 8;
  }
}

// TPFUSE_ISA is read once per process: each check runs in a fresh one.
TEST(CpuIsaDeathTest, EnvironmentCapsTheLevel) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        setenv("TPFUSE_ISA", "portable", 1);
        const auto gemm = prepare_gemm(GemmCase(make_spec(Mode::plain, DType::f16, 4, 8, 8)).operands);
        std::exit(active_isa() == IsaLevel::portable && std::string(gemm->engine()) == "portable_f16_in_place" ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
  if (detected_isa() >= IsaLevel::avx2) {
    EXPECT_EXIT(
        {
          setenv("TPFUSE_ISA", "avx2", 1);
          std::exit(active_isa() == IsaLevel::avx2 ? 0 : 1);
        },
        ::testing::ExitedWithCode(0), "");
  }
  EXPECT_EXIT(
      {
        setenv("TPFUSE_ISA", "avx1024", 1);
        try {
          active_isa();
        } catch (const InvalidArgument& e) {
          std::exit(std::string(e.what()).find("TPFUSE_ISA") != std::string::npos ? 0 : 2);
        }
        std::exit(1);
      },
      ::testing::ExitedWithCode(0), "");
}

TEST(Threads, DefaultDividesTheCoresAmongRanks) {
  EXPECT_GE(default_gemm_threads(1), 1);
  EXPECT_GE(default_gemm_threads(1000), 1);
  EXPECT_LE(default_gemm_threads(2), default_gemm_threads(1));
}

// A rank's share of its cores, on a 16-core host.
TEST(Threads, ShareDividesARanksCoresAmongTheRanksBoundToThem) {
  EXPECT_EQ(share_of_cores(16, 16, 2), 8);  // unbound: the host divided
  EXPECT_EQ(share_of_cores(16, 16, 4), 4);
  EXPECT_EQ(share_of_cores(8, 16, 2), 8);   // a socket or block each
  EXPECT_EQ(share_of_cores(8, 16, 4), 4);   // two ranks per socket
  EXPECT_EQ(share_of_cores(1, 16, 16), 1);  // one core each
  EXPECT_EQ(share_of_cores(1, 16, 2), 1);
  EXPECT_EQ(share_of_cores(2, 2, 8), 1);  // more ranks than cores
  EXPECT_EQ(share_of_cores(4, 4, 2), 2);  // a container of 4 cores
  EXPECT_EQ(share_of_cores(6, 4, 1), 6);  // a host count below the rank's own
  EXPECT_EQ(share_of_cores(0, 0, 0), 1);
}

}  // namespace
}  // namespace tpfuse::gemm
