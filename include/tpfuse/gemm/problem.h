// What one GEMM computes, as the engines see it: the mode and the scale's
// layout, the dtypes and sizes, the epilogue's terms. The operators describe
// their calls with it (ops/mode.h adds what only a call has).
#pragma once

#include <cstdint>
#include <string_view>

#include "tpfuse/core/dtype.h"

namespace tpfuse {

enum class Mode : std::uint8_t {
  plain,         // f16/bf16 x f16/bf16
  weight_quant,  // f16/bf16 x int8, x2 dequantized with antiquant_scale/offset
  full_quant,    // int8 x int8, int32 accumulation, dequant_scale
};

std::string_view mode_name(Mode mode);

// How antiquant_scale (or dequant_scale) is laid out.
enum class ScaleKind : std::uint8_t { none, per_tensor, per_channel, per_group };

std::string_view scale_kind_name(ScaleKind kind);

struct GemmProblem {
  Mode mode = Mode::plain;
  DType in_dtype = DType::f16;  // x1's dtype
  DType out_dtype = DType::f16;
  std::int64_t m = 0, k = 0, n = 0;
  bool x2_transposed = false;  // x2 is a transposed view of a row-major [n, k]
  bool has_bias = false;
  bool has_x3 = false;
  ScaleKind scale_kind = ScaleKind::none;  // antiquant_scale or dequant_scale
  bool has_offset = false;
  std::int64_t group_size = 0;
};

// The fp32 scale a full-quant GEMM reads from a dequant_scale packed by
// trans_quant_param (ops/quant_param.h): its low 32 bits.
float unpack_quant_scale(std::int64_t packed);

}  // namespace tpfuse
