// The add-RMSNorm row kernels at every instruction-set level this CPU runs,
// bit for bit against the scalar reference: f16 and bf16, rows whose length
// is not a multiple of the 16 running sums (nor of a vector), NaNs (in either
// input, in both with different payloads, from inf - inf, in gamma), infs,
// sums of squares that overflow, subnormals, zero rows; and in place (y over
// the residual, the norm over mm), as the operator calls them.
#include "ops/add_rms_norm.h"

#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/cpu_isa.h"
#include "tpfuse/core/half.h"

namespace tpfuse {
namespace {

std::vector<IsaLevel> runnable_levels() {
  std::vector<IsaLevel> levels;
  for (IsaLevel level :
       {IsaLevel::portable, IsaLevel::avx2, IsaLevel::avx512, IsaLevel::avx512_dl}) {
    if (level <= detected_isa()) levels.push_back(level);
  }
  return levels;
}

std::uint16_t to_bits(DType dtype, float value) {
  return dtype == DType::f16 ? f32_to_f16(value).bits : f32_to_bf16(value).bits;
}

std::uint16_t nan_bits(DType dtype, std::uint16_t payload, bool negative) {
  const std::uint16_t sign = negative ? 0x8000u : 0u;
  if (dtype == DType::f16) return sign | 0x7c00u | (payload % 0x3ffu + 1u);
  return sign | 0x7f80u | (payload % 0x7fu + 1u);
}

std::uint16_t inf_bits(DType dtype, bool negative) {
  const std::uint16_t sign = negative ? 0x8000u : 0u;
  return sign | (dtype == DType::f16 ? 0x7c00u : 0x7f80u);
}

// How a row's values are drawn, one kind of hard case each.
enum class RowKind { random, nan_in_mm, nan_in_both, inf_minus_inf, inf, huge, tiny, zero };
constexpr RowKind kRowKinds[] = {RowKind::random,        RowKind::nan_in_mm, RowKind::nan_in_both,
                                 RowKind::inf_minus_inf, RowKind::inf,       RowKind::huge,
                                 RowKind::tiny,          RowKind::zero};

struct Inputs {
  std::vector<std::uint16_t> mm, residual, gamma;
};

Inputs make_inputs(DType dtype, std::int64_t n, bool nan_in_gamma, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<std::int64_t> column(0, n - 1);
  std::uniform_int_distribution<int> payload(0, 0xffff);
  const auto rows = static_cast<std::int64_t>(std::size(kRowKinds));
  Inputs in;
  for (std::int64_t i = 0; i < rows * n; ++i) {
    in.mm.push_back(to_bits(dtype, normal(rng)));
    in.residual.push_back(to_bits(dtype, normal(rng)));
  }
  for (std::int64_t j = 0; j < n; ++j) in.gamma.push_back(to_bits(dtype, normal(rng)));
  if (nan_in_gamma) in.gamma[column(rng)] = nan_bits(dtype, payload(rng), true);
  // Large enough that some products overflow f16.
  in.gamma[column(rng)] = to_bits(dtype, 60000.0f);
  for (std::int64_t r = 0; r < rows; ++r) {
    std::uint16_t* mm = in.mm.data() + r * n;
    std::uint16_t* residual = in.residual.data() + r * n;
    const std::int64_t at = column(rng);
    switch (kRowKinds[r]) {
      case RowKind::random:
        break;
      case RowKind::nan_in_mm:
        mm[at] = nan_bits(dtype, payload(rng), false);
        break;
      case RowKind::nan_in_both:
        mm[at] = nan_bits(dtype, payload(rng), false);
        residual[at] = nan_bits(dtype, payload(rng), true);
        residual[column(rng)] = nan_bits(dtype, payload(rng), true);
        break;
      case RowKind::inf_minus_inf:
        mm[at] = inf_bits(dtype, false);
        residual[at] = inf_bits(dtype, true);
        break;
      case RowKind::inf:
        mm[at] = inf_bits(dtype, true);
        break;
      case RowKind::huge:  // a sum of squares past fp32's range (bf16), or y near f16's max
        for (std::int64_t j = 0; j < n; ++j) {
          mm[j] = to_bits(dtype, (dtype == DType::bf16 ? 3e37f : 30000.0f) * normal(rng));
        }
        break;
      case RowKind::tiny:  // subnormal y (f16), tiny sums (bf16)
        for (std::int64_t j = 0; j < n; ++j) {
          mm[j] = to_bits(dtype, (dtype == DType::f16 ? 1e-6f : 1e-30f) * normal(rng));
          residual[j] = 0;
        }
        break;
      case RowKind::zero:
        for (std::int64_t j = 0; j < n; ++j) mm[j] = residual[j] = j % 2 == 0 ? 0u : 0x8000u;
        break;
    }
  }
  return in;
}

std::string first_difference(const std::vector<std::uint16_t>& got,
                             const std::vector<std::uint16_t>& want, std::int64_t n) {
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (got[i] != want[i]) {
      return "row " + std::to_string(static_cast<std::int64_t>(i) / n) + " column " +
             std::to_string(static_cast<std::int64_t>(i) % n) + ": got " + std::to_string(got[i]) +
             ", want " + std::to_string(want[i]);
    }
  }
  return "";
}

TEST(AddRmsNormKernels, EveryLevelGivesTheReferenceBits) {
  std::mt19937 rng(7);
  for (DType dtype : {DType::f16, DType::bf16}) {
    for (std::int64_t n : {1, 5, 8, 15, 16, 17, 31, 32, 33, 100, 257}) {
      for (bool nan_in_gamma : {false, true}) {
        const Inputs in = make_inputs(dtype, n, nan_in_gamma, rng);
        const auto rows = static_cast<std::int64_t>(std::size(kRowKinds));
        const AddRmsNormRows step{dtype, n, 1e-6f, in.gamma.data()};
        std::vector<std::uint16_t> want_y(in.mm.size()), want_norm(in.mm.size());
        add_rms_norm_rows_reference(step, rows, in.mm.data(), in.residual.data(), want_y.data(),
                                    want_norm.data());
        for (IsaLevel level : runnable_levels()) {
          SCOPED_TRACE(std::string(isa_name(level)) + " " + std::string(dtype_name(dtype)) +
                       " n=" + std::to_string(n) + (nan_in_gamma ? " NaN in gamma" : ""));
          std::vector<std::uint16_t> y(in.mm.size()), norm(in.mm.size());
          add_rms_norm_rows_at(level, step, rows, in.mm.data(), in.residual.data(), y.data(),
                               norm.data());
          EXPECT_EQ(first_difference(y, want_y, n), "") << "y";
          EXPECT_EQ(first_difference(norm, want_norm, n), "") << "norm_out";
          // In place, as the operator runs it: the norm over mm, y over the residual.
          std::vector<std::uint16_t> mm_then_norm = in.mm, residual_then_y = in.residual;
          add_rms_norm_rows_at(level, step, rows, mm_then_norm.data(), residual_then_y.data(),
                               residual_then_y.data(), mm_then_norm.data());
          EXPECT_EQ(first_difference(residual_then_y, want_y, n), "") << "y in place";
          EXPECT_EQ(first_difference(mm_then_norm, want_norm, n), "") << "norm_out in place";
        }
      }
    }
  }
}

// Where two NaNs meet, the rule's: the residual's over mm's, gamma's over t's.
TEST(AddRmsNormKernels, TwoNaNsGiveThePreferredOperands) {
  const std::uint16_t mm[] = {0x7d01u, 0};           // f16 signalling NaN, 0
  const std::uint16_t residual[] = {0xfd02u, 0};     // another, negative, 0
  const std::uint16_t gamma[] = {0x3c00u, 0x7c03u};  // 1, a third NaN
  const AddRmsNormRows step{DType::f16, 2, 1e-6f, gamma};
  std::uint16_t y[2] = {}, norm[2] = {};
  add_rms_norm_rows_reference(step, 1, mm, residual, y, norm);
  EXPECT_EQ(y[0], 0xff02u);
  EXPECT_EQ(y[1], 0u);
  EXPECT_EQ(norm[0], 0xff02u);  // t = y's NaN, gamma a number
  EXPECT_EQ(norm[1], 0x7e03u);  // t = rstd's NaN, gamma's preferred
  for (IsaLevel level : runnable_levels()) {
    std::uint16_t level_y[2] = {}, level_norm[2] = {};
    add_rms_norm_rows_at(level, step, 1, mm, residual, level_y, level_norm);
    EXPECT_EQ(level_y[0], y[0]) << isa_name(level);
    EXPECT_EQ(level_norm[0], norm[0]) << isa_name(level);
    EXPECT_EQ(level_norm[1], norm[1]) << isa_name(level);
  }
}

}  // namespace
}  // namespace tpfuse
