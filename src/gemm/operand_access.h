// Element access shared by the engines' packing code: reading any supported
// dtype as fp32, the weight-only dequantization rule, full quant's row scales.
#pragma once

#include <cstdint>

#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/core/tensor.h"
#include "tpfuse/gemm/problem.h"
#include "tpfuse/gemm/tile_gemm.h"

namespace tpfuse::gemm {

// Element `index` (in elements from data()) of a floating-point view, as fp32.
inline float load_as_f32(const TensorView& view, std::int64_t index) {
  switch (view.dtype()) {
    case DType::f16:
      return f16_to_f32(view.data_as<const Half>()[index]);
    case DType::bf16:
      return bf16_to_f32(view.data_as<const BFloat16>()[index]);
    case DType::f32:
      return view.data_as<const float>()[index];
    default:
      throw InternalError(cat("load_as_f32: unexpected dtype ", dtype_name(view.dtype())));
  }
}

// Element `index` of a GEMM operand (x1, or a plain x2) as fp32: bf16
// subnormals count as zero (docs/SEMANTICS.md, numerics).
inline float load_operand_f32(const TensorView& view, std::int64_t index) {
  if (view.dtype() == DType::bf16) return bf16_operand_to_f32(view.data_as<const BFloat16>()[index]);
  return load_as_f32(view, index);
}

// A weight-only int8 weight dequantized in fp32, (q + offset) * scale, two
// roundings; a result below 2^-126 in magnitude counts as zero.
inline float dequantize_weight(float q, float offset, float scale) {
  const float w = (q + offset) * scale;
  return w > -0x1p-126f && w < 0x1p-126f ? 0.0f : w;
}

// Writes an fp32 value rounded to `dtype` (f16, bf16 or f32) at dst[index].
inline void store_from_f32(void* dst, DType dtype, std::int64_t index, float value) {
  switch (dtype) {
    case DType::f16:
      static_cast<Half*>(dst)[index] = f32_to_f16(value);
      return;
    case DType::bf16:
      static_cast<BFloat16*>(dst)[index] = f32_to_bf16(value);
      return;
    case DType::f32:
      static_cast<float*>(dst)[index] = value;
      return;
    default:
      throw InternalError(cat("store_from_f32: unexpected dtype ", dtype_name(dtype)));
  }
}

// Index of the scale (and offset) that applies to weight element (row l, column j).
inline std::int64_t scale_index(const GemmProblem& shape, std::int64_t l, std::int64_t j) {
  switch (shape.scale_kind) {
    case ScaleKind::per_tensor:
      return 0;
    case ScaleKind::per_channel:
      return j;
    case ScaleKind::per_group:
      return (l / shape.group_size) * shape.n + j;
    case ScaleKind::none:
      break;
  }
  throw InternalError("scale_index: no scale in this mode");
}

// Full quant's per-row scales (operands.row_scale), one fp32 value per row
// of x1 from row 0 on; null without them.
inline const float* row_scales(const GemmOperands& operands) {
  if (!operands.row_scale) return nullptr;
  const TensorView& view = *operands.row_scale;
  if (operands.shape.mode != Mode::full_quant || view.dtype() != DType::f32 || view.ndim() != 1 ||
      (view.size(0) > 1 && view.stride(0) != 1)) {
    throw InternalError(cat("row_scale: expected a contiguous [m] f32 view in full quant, got ",
                            view.describe(), " in ", mode_name(operands.shape.mode)));
  }
  return view.data_as<const float>();
}

}  // namespace tpfuse::gemm
