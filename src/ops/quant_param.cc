// npu_trans_quant_param's packing, bit for bit. The offset follows the
// TransQuantParamV2 device kernel that torch_npu calls (aclnnTransQuantParamV2):
// round to nearest with ties to even, clamp to the int9 range, keep 9 bits.
#include "tpfuse/ops/quant_param.h"

#include <algorithm>
#include <bit>
#include <cmath>

#include "tpfuse/core/error.h"

namespace tpfuse {

namespace {

constexpr std::uint64_t kScaleMask = 0xFFFFE000u;
constexpr std::uint64_t kFlag = std::uint64_t{1} << 46;
constexpr std::uint64_t kOffsetMask = 0x1FFu;
constexpr int kOffsetShift = 37;
constexpr double kOffsetMin = -256;
constexpr double kOffsetMax = 255;

// Rounds half to even without depending on the floating-point environment.
std::int64_t round_offset_to_int9(float offset) {
  require(!std::isnan(offset), "offset: expected a number, got nan");
  const double clamped = std::clamp(static_cast<double>(offset), kOffsetMin - 1, kOffsetMax + 1);
  double rounded = std::floor(clamped);
  const double fraction = clamped - rounded;
  if (fraction > 0.5 || (fraction == 0.5 && std::fmod(rounded, 2.0) != 0)) rounded += 1;
  return static_cast<std::int64_t>(std::clamp(rounded, kOffsetMin, kOffsetMax));
}

}  // namespace

std::int64_t trans_quant_param(float scale, std::optional<float> offset) {
  std::uint64_t packed = (std::uint64_t{std::bit_cast<std::uint32_t>(scale)} & kScaleMask) | kFlag;
  if (offset) {
    const auto int9 = static_cast<std::uint64_t>(round_offset_to_int9(*offset));
    packed |= (int9 & kOffsetMask) << kOffsetShift;
  }
  return static_cast<std::int64_t>(packed);
}

std::vector<std::int64_t> trans_quant_param(std::span<const float> scales,
                                            std::span<const float> offsets) {
  require(!scales.empty(), "scale: expected at least one value, got none");
  const std::size_t count = std::max(scales.size(), offsets.size());
  require(offsets.empty() || offsets.size() == 1 || offsets.size() == count,
          "offset: expected 1 or ", count, " values (scale has ", scales.size(), "), got ",
          offsets.size());
  require(scales.size() == 1 || scales.size() == count, "offset: expected 1 or ", scales.size(),
          " values (one per scale), got ", offsets.size());
  std::vector<std::int64_t> packed(count);
  for (std::size_t i = 0; i < count; ++i) {
    const float scale = scales[scales.size() == 1 ? 0 : i];
    std::optional<float> offset;
    if (!offsets.empty()) offset = offsets[offsets.size() == 1 ? 0 : i];
    packed[i] = trans_quant_param(scale, offset);
  }
  return packed;
}

}  // namespace tpfuse
