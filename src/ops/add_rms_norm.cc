#include "ops/add_rms_norm.h"

#include <array>
#include <cmath>
#include <cstddef>

#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"

namespace tpfuse {

namespace {

constexpr std::size_t kLanes = 16;

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

// The row's fp32 sum of squares, in the fixed order of the header. Each
// square is rounded to fp32 before it is added: this file is compiled with
// -ffp-contract=off, so no fused multiply-add changes the bits.
template <class T>
float sum_of_squares(const T* y, std::int64_t n) {
  std::array<float, kLanes> sums{};
  const auto lanes = static_cast<std::int64_t>(kLanes);
  std::int64_t j = 0;
  for (; j + lanes <= n; j += lanes) {
    for (std::size_t l = 0; l < kLanes; ++l) {
      const float v = to_f32(y[j + static_cast<std::int64_t>(l)]);
      sums[l] += v * v;
    }
  }
  for (std::size_t l = 0; j < n; ++j, ++l) {
    const float v = to_f32(y[j]);
    sums[l] += v * v;
  }
  for (std::size_t width = kLanes / 2; width > 0; width /= 2) {
    for (std::size_t l = 0; l < width; ++l) sums[l] += sums[l + width];
  }
  return sums[0];
}

template <class T>
void run_rows(const AddRmsNormRows& step, std::int64_t rows, const void* mm, const void* residual,
              void* y, void* norm_out) {
  const std::int64_t n = step.n;
  const auto* gamma = static_cast<const T*>(step.gamma);
  for (std::int64_t i = 0; i < rows; ++i) {
    const auto* mm_row = static_cast<const T*>(mm) + i * n;
    const auto* residual_row = static_cast<const T*>(residual) + i * n;
    auto* y_row = static_cast<T*>(y) + i * n;
    auto* norm_row = static_cast<T*>(norm_out) + i * n;
    for (std::int64_t j = 0; j < n; ++j) {
      y_row[j] = from_f32<T>(to_f32(mm_row[j]) + to_f32(residual_row[j]));
    }
    const float mean = sum_of_squares(y_row, n) / static_cast<float>(n);
    const float rstd = 1.0f / std::sqrt(mean + step.epsilon);
    for (std::int64_t j = 0; j < n; ++j) {
      const T t = from_f32<T>(to_f32(y_row[j]) * rstd);
      norm_row[j] = from_f32<T>(to_f32(t) * to_f32(gamma[j]));
    }
  }
}

}  // namespace

void add_rms_norm_rows(const AddRmsNormRows& step, std::int64_t rows, const void* mm,
                       const void* residual, void* y, void* norm_out) {
  switch (step.dtype) {
    case DType::f16:
      return run_rows<Half>(step, rows, mm, residual, y, norm_out);
    case DType::bf16:
      return run_rows<BFloat16>(step, rows, mm, residual, y, norm_out);
    default:
      throw InternalError(cat("add_rms_norm_rows: expected f16 or bf16, got ", dtype_name(step.dtype)));
  }
}

}  // namespace tpfuse
