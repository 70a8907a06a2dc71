// add_rms_norm_rows: each row's y and running sums from the vector kernels of
// the active level (add_rms_norm_kernels.h), the sums added in the fixed tree
// and rstd taken here, then the row's norm from the kernels. The scalar
// reference does the same one element at a time, with the NaN rule applied
// to every operation; the kernels hand it the rare row whose sum of squares
// (or rstd) is not finite, the only rows where the rule could pick between
// two NaNs that they leave to the hardware.
#include "ops/add_rms_norm.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "ops/add_rms_norm_kernels.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"

namespace tpfuse {

namespace {

constexpr std::size_t kLanes = kAddRmsNormLanes;

template <class T>
float to_f32(T value);
template <>
float to_f32(Half value) {
  return f16_to_f32(value);
}
template <>
float to_f32(BFloat16 value) {
  return bf16_to_f32(value);
}

template <class T>
T from_f32(float value);
template <>
Half from_f32(float value) {
  return f32_to_f16(value);
}
template <>
BFloat16 from_f32(float value) {
  return f32_to_bf16(value);
}

// `result` of an operation on `preferred` and `other`, by the NaN rule of
// add_rms_norm_kernels.h.
float by_rule(float result, float preferred, float other) {
  if (result == result) return result;
  const auto quiet = [](float v) {
    return std::bit_cast<float>(std::bit_cast<std::uint32_t>(v) | kQuietNanBit);
  };
  if (preferred != preferred) return quiet(preferred);
  if (other != other) return quiet(other);
  return std::bit_cast<float>(kDefaultNanBits);
}

// The running sums added pairwise in the fixed tree. This file is compiled
// with -ffp-contract=off: no fused multiply-add changes a bit here or in the
// reference below.
float tree_sum(std::array<float, kLanes>& sums) {
  for (std::size_t width = kLanes / 2; width > 0; width /= 2) {
    for (std::size_t l = 0; l < width; ++l) {
      sums[l] = by_rule(sums[l] + sums[l + width], sums[l], sums[l + width]);
    }
  }
  return sums[0];
}

float rstd_of(float sum_of_squares, std::int64_t n, float epsilon) {
  const float mean = sum_of_squares / static_cast<float>(n);
  return 1.0f / std::sqrt(mean + epsilon);
}

// The row's norm from its y, one element at a time, the rule on every step.
template <class T>
void reference_norm_row(const AddRmsNormRows& step, const T* y, T* norm) {
  const std::int64_t n = step.n;
  const auto* gamma = static_cast<const T*>(step.gamma);
  std::array<float, kLanes> sums{};
  for (std::int64_t j = 0; j < n; ++j) {
    const float v = to_f32(y[j]);
    const auto l = static_cast<std::size_t>(j % static_cast<std::int64_t>(kLanes));
    const float square = v * v;
    sums[l] = by_rule(sums[l] + square, square, sums[l]);
  }
  const float rstd = rstd_of(tree_sum(sums), n, step.epsilon);
  for (std::int64_t j = 0; j < n; ++j) {
    const float value = to_f32(y[j]);
    const float t = to_f32(from_f32<T>(by_rule(value * rstd, value, rstd)));
    const float g = to_f32(gamma[j]);
    norm[j] = from_f32<T>(by_rule(t * g, g, t));
  }
}

template <class T>
void reference_rows(const AddRmsNormRows& step, std::int64_t rows, const void* mm,
                    const void* residual, void* y, void* norm_out) {
  const std::int64_t n = step.n;
  for (std::int64_t i = 0; i < rows; ++i) {
    const auto* mm_row = static_cast<const T*>(mm) + i * n;
    const auto* residual_row = static_cast<const T*>(residual) + i * n;
    auto* y_row = static_cast<T*>(y) + i * n;
    for (std::int64_t j = 0; j < n; ++j) {
      const float a = to_f32(mm_row[j]);
      const float b = to_f32(residual_row[j]);
      y_row[j] = from_f32<T>(by_rule(a + b, b, a));
    }
    reference_norm_row(step, y_row, static_cast<T*>(norm_out) + i * n);
  }
}

template <class T>
void kernel_rows(const AddRmsNormRowKernels& kernels, const AddRmsNormRows& step, std::int64_t rows,
                 const void* mm, const void* residual, void* y, void* norm_out) {
  const std::int64_t n = step.n;
  for (std::int64_t i = 0; i < rows; ++i) {
    const auto* mm_row = static_cast<const T*>(mm) + i * n;
    const auto* residual_row = static_cast<const T*>(residual) + i * n;
    auto* y_row = static_cast<T*>(y) + i * n;
    auto* norm_row = static_cast<T*>(norm_out) + i * n;
    std::array<float, kLanes> sums;
    kernels.add_row(mm_row, residual_row, y_row, n, sums.data());
    const float sum = tree_sum(sums);
    const float rstd = rstd_of(sum, n, step.epsilon);
    if (std::isfinite(sum) && std::isfinite(rstd)) {
      kernels.norm_row(y_row, step.gamma, rstd, norm_row, n);
    } else {
      reference_norm_row(step, y_row, norm_row);
    }
  }
}

const AddRmsNormKernels& kernels_at(IsaLevel level) {
  switch (level) {
    case IsaLevel::avx512_dl:
    case IsaLevel::avx512:
      return add_rms_norm_avx512_kernels();
    case IsaLevel::avx2:
      return add_rms_norm_avx2_kernels();
    case IsaLevel::portable:
      break;
  }
  return add_rms_norm_portable_kernels();
}

void require_half(DType dtype) {
  if (dtype != DType::f16 && dtype != DType::bf16) {
    throw InternalError(cat("add_rms_norm_rows: expected f16 or bf16, got ", dtype_name(dtype)));
  }
}

}  // namespace

void add_rms_norm_rows_at(IsaLevel level, const AddRmsNormRows& step, std::int64_t rows,
                          const void* mm, const void* residual, void* y, void* norm_out) {
  require_half(step.dtype);
  const AddRmsNormKernels& kernels = kernels_at(level);
  if (step.dtype == DType::f16) {
    return kernel_rows<Half>(kernels.rows[0], step, rows, mm, residual, y, norm_out);
  }
  kernel_rows<BFloat16>(kernels.rows[1], step, rows, mm, residual, y, norm_out);
}

void add_rms_norm_rows(const AddRmsNormRows& step, std::int64_t rows, const void* mm,
                       const void* residual, void* y, void* norm_out) {
  add_rms_norm_rows_at(active_isa(), step, rows, mm, residual, y, norm_out);
}

void add_rms_norm_rows_reference(const AddRmsNormRows& step, std::int64_t rows, const void* mm,
                                 const void* residual, void* y, void* norm_out) {
  require_half(step.dtype);
  if (step.dtype == DType::f16) {
    return reference_rows<Half>(step, rows, mm, residual, y, norm_out);
  }
  reference_rows<BFloat16>(step, rows, mm, residual, y, norm_out);
}

}  // namespace tpfuse
