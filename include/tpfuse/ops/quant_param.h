// The packed int64 dequant scale of torch_npu's npu_trans_quant_param:
//   (bits(scale_f32) & 0xFFFFE000) | (1 << 46) | ((offset9 & 0x1FF) << 37)
// Bits 0..31 hold the fp32 scale with its 13 lowest mantissa bits cleared
// (zero-extended: a negative scale does not set bits 32..63), bit 46 is a
// flag, bits 37..45 an optional 9-bit two's-complement offset (used only for
// quantized outputs). The offset is rounded to the nearest integer, ties to
// even, then clamped to [-256, 255], as torch_npu's TransQuantParamV2 kernel
// does (Cast with CAST_RINT, then Maxs/Mins).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "tpfuse/gemm/problem.h"  // unpack_quant_scale, its inverse

namespace tpfuse {

// Packs one scale (and optional offset) bit-exactly as torch_npu does. A NaN
// offset is an InvalidArgument (torch_npu leaves it undefined); +-inf clamps.
std::int64_t trans_quant_param(float scale, std::optional<float> offset = std::nullopt);

// Packs a vector: the result has max(scales, offsets) entries, and each of
// `scales` and `offsets` (when given) has that length or 1 (broadcast), as in
// torch_npu; any other length is an InvalidArgument naming `offset`. At
// least one scale is required.
std::vector<std::int64_t> trans_quant_param(std::span<const float> scales,
                                            std::span<const float> offsets = {});

}  // namespace tpfuse
