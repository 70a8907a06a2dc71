// 16-bit floating-point storage types and correctly rounded conversions.
//
// f32 -> f16/bf16 rounds to nearest, ties to even; overflow gives infinity;
// NaN stays NaN (quiet, sign and top payload bits kept); f16 subnormals are
// produced and consumed exactly. f16/bf16 -> f32 is exact.
#pragma once

#include <bit>
#include <cstdint>

namespace tpfuse {

// IEEE 754 binary16, stored as its bit pattern.
struct Half {
  std::uint16_t bits = 0;
};

// bfloat16 (the top half of an f32), stored as its bit pattern.
struct BFloat16 {
  std::uint16_t bits = 0;
};

constexpr float bf16_to_f32(BFloat16 h) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(h.bits) << 16);
}

// A bf16 value as a matrix-multiply operand: a subnormal counts as zero
// (keeping its sign), as AVX512-BF16's dot product (and AMX's) treats it.
constexpr float bf16_operand_to_f32(BFloat16 h) {
  return (h.bits & 0x7f80u) == 0 ? bf16_to_f32(BFloat16{static_cast<std::uint16_t>(h.bits & 0x8000u)})
                                 : bf16_to_f32(h);
}

constexpr BFloat16 f32_to_bf16(float f) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep sign and payload top, force quiet
    return BFloat16{static_cast<std::uint16_t>((u >> 16) | 0x0040u)};
  }
  // Adding 0x7fff plus the lowest kept bit rounds to nearest, ties to even; a
  // carry into the exponent is the correct overflow to the next binade or inf.
  u += 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<std::uint16_t>(u >> 16)};
}

constexpr float f16_to_f32(Half h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  const std::uint32_t exp = (h.bits >> 10) & 0x1fu;
  std::uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1f) {  // inf or NaN
    return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  }
  if (exp != 0) {  // normal: rebias 15 -> 127
    return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
  }
  if (mant == 0) return std::bit_cast<float>(sign);
  // Subnormal: value = mant * 2^-24, normalise into an f32 normal.
  int shift = 0;
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    ++shift;
  }
  mant &= 0x3ffu;
  const std::uint32_t f32_exp = static_cast<std::uint32_t>(113 - shift);
  return std::bit_cast<float>(sign | (f32_exp << 23) | (mant << 13));
}

constexpr Half f32_to_f16(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) {  // NaN: keep the top payload bits, force quiet
    return Half{static_cast<std::uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu))};
  }
  if (abs >= 0x477ff000u) {  // >= 65520 rounds to infinity (and inf itself)
    return Half{static_cast<std::uint16_t>(sign | 0x7c00u)};
  }
  if (abs >= 0x38800000u) {  // normal f16 range: >= 2^-14
    // Rebias and round the 13 dropped mantissa bits, ties to even; a carry
    // into the exponent field is the correct result.
    std::uint32_t r = abs - (112u << 23);
    r += 0x0fffu + ((r >> 13) & 1u);
    return Half{static_cast<std::uint16_t>(sign | (r >> 13))};
  }
  if (abs < 0x33000000u) {  // < 2^-25: rounds to zero (2^-25 itself ties to 0)
    return Half{sign};
  }
  // Subnormal result: value / 2^-24 rounded to an integer, ties to even.
  const std::uint32_t exp = abs >> 23;
  const std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - exp;  // 14..24 for this range
  const std::uint32_t kept = mant >> shift;
  const std::uint32_t rest = mant & ((1u << shift) - 1u);
  const std::uint32_t half = 1u << (shift - 1u);
  const std::uint32_t rounded = kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
  return Half{static_cast<std::uint16_t>(sign | rounded)};
}

}  // namespace tpfuse
