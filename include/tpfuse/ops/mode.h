// The operator's modes and the facts validation derives from a call, shared
// by the operator, the GEMM engines and the golden model.
#pragma once

#include <cstdint>
#include <string_view>

#include "tpfuse/core/dtype.h"

namespace tpfuse {

enum class Mode : std::uint8_t {
  plain,        // f16/bf16 x f16/bf16
  weight_quant, // f16/bf16 x int8, x2 dequantized with antiquant_scale/offset
  full_quant,   // int8 x int8, int32 accumulation, dequant_scale
};

std::string_view mode_name(Mode mode);

// How antiquant_scale (or dequant_scale) is laid out.
enum class ScaleKind : std::uint8_t { none, per_tensor, per_channel, per_group };

std::string_view scale_kind_name(ScaleKind kind);

// Everything validation learned about one rank's call.
struct CallShape {
  Mode mode = Mode::plain;
  DType in_dtype = DType::f16;   // x1's dtype
  DType out_dtype = DType::f16;
  std::int64_t batch = 0;        // b for a 3-D x1, 0 for 2-D
  std::int64_t seq = 0;          // s for a 3-D x1, 0 for 2-D
  std::int64_t m = 0, k = 0, n = 0;
  bool x2_transposed = false;    // x2 is a transposed view of a row-major [n, k]
  bool has_bias = false;
  bool has_x3 = false;
  ScaleKind scale_kind = ScaleKind::none;  // antiquant_scale or dequant_scale
  bool has_offset = false;
  std::int64_t group_size = 0;
  std::int64_t comm_turn = 0;
};

}  // namespace tpfuse
