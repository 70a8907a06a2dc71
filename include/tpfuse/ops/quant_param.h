// The packed int64 dequant scale of torch_npu's npu_trans_quant_param:
//   (bits(scale_f32) & 0xFFFFE000) | (1 << 46) | (offset9 << 37)
// Bits 0..31 hold the fp32 scale with its 13 lowest mantissa bits cleared,
// bit 46 is a flag, bits 37..45 an optional 9-bit offset (used only for
// quantized outputs).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace tpfuse {

// Packs one scale (and optional offset) bit-exactly as torch_npu does.
std::int64_t trans_quant_param(float scale, std::optional<float> offset = std::nullopt);

// Packs a vector of scales; `offsets`, when given, has the same length or 1
// (broadcast), else InvalidArgument.
std::vector<std::int64_t> trans_quant_param(std::span<const float> scales,
                                            std::span<const float> offsets = {});

// The fp32 scale the operator reads from a packed value (its low 32 bits).
float unpack_quant_scale(std::int64_t packed);

}  // namespace tpfuse
