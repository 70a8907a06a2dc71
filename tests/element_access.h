// Element access for the golden model's tests: a value stored into, or read
// from, element `index` of a contiguous view of any dtype the tests build.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>

#include "tpfuse/core/dtype.h"
#include "tpfuse/core/half.h"
#include "tpfuse/core/tensor.h"

namespace tpfuse::testing {

inline void store(const TensorView& view, std::int64_t index, double value) {
  switch (view.dtype()) {
    case DType::f16:
      view.data_as<Half>()[index] = f32_to_f16(static_cast<float>(value));
      return;
    case DType::bf16:
      view.data_as<BFloat16>()[index] = f32_to_bf16(static_cast<float>(value));
      return;
    case DType::f32:
      view.data_as<float>()[index] = static_cast<float>(value);
      return;
    case DType::i8:
      view.data_as<std::int8_t>()[index] = static_cast<std::int8_t>(value);
      return;
    case DType::i32:
      view.data_as<std::int32_t>()[index] = static_cast<std::int32_t>(value);
      return;
    case DType::i64:
      view.data_as<std::int64_t>()[index] = static_cast<std::int64_t>(value);
      return;
  }
}

inline float load_f32(const TensorView& view, std::int64_t index) {
  switch (view.dtype()) {
    case DType::f16:
      return f16_to_f32(view.data_as<const Half>()[index]);
    case DType::bf16:
      return bf16_to_f32(view.data_as<const BFloat16>()[index]);
    case DType::f32:
      return view.data_as<const float>()[index];
    case DType::i8:
      return view.data_as<const std::int8_t>()[index];
    default:
      ADD_FAILURE() << "load_f32: unexpected dtype " << dtype_name(view.dtype());
      return 0;
  }
}

}  // namespace tpfuse::testing
