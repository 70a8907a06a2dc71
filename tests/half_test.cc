// Exhaustive checks of the f16/bf16 <-> f32 conversions in core/half.h:
// every 16-bit pattern, every rounding boundary between adjacent 16-bit
// values, and random f32 patterns against GCC's _Float16 (whose conversions
// are correctly rounded) or an fp64 nearest-even reference.
#include "tpfuse/core/half.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace tpfuse {
namespace {

constexpr std::uint32_t kF16Count = 1u << 16;

std::uint16_t gcc_f16_bits(float value) {
  const auto half = static_cast<_Float16>(value);
  std::uint16_t bits;
  std::memcpy(&bits, &half, sizeof(bits));
  return bits;
}

float gcc_f16_to_f32(std::uint16_t bits) {
  _Float16 half;
  std::memcpy(&half, &bits, sizeof(bits));
  return static_cast<float>(half);
}

bool f16_is_nan(std::uint16_t bits) { return (bits & 0x7fffu) > 0x7c00u; }
bool bf16_is_nan(std::uint16_t bits) { return (bits & 0x7fffu) > 0x7f80u; }
std::uint32_t f32_bits(float value) { return std::bit_cast<std::uint32_t>(value); }
float f32_from_bits(std::uint32_t bits) { return std::bit_cast<float>(bits); }

// The even one of two adjacent 16-bit patterns (the one whose last mantissa bit is 0).
std::uint16_t even_of(std::uint16_t a, std::uint16_t b) { return (a & 1u) == 0 ? a : b; }

// Correctly rounded f32 -> bf16 computed independently: pick the nearer of
// the two bf16 values around x in fp64, ties to the even pattern.
std::uint16_t reference_bf16_bits(float x) {
  const std::uint32_t u = f32_bits(x);
  const auto below = static_cast<std::uint16_t>(u >> 16);  // truncation, toward zero
  if ((u & 0xffffu) == 0) return below;
  const auto above = static_cast<std::uint16_t>(below + 1);  // away from zero (may be inf)
  const double lo = std::fabs(static_cast<double>(f32_from_bits(std::uint32_t{below} << 16)));
  const double hi = (above & 0x7fffu) == 0x7f80u
                        ? 0x1p128  // the value the next pattern would have without overflow
                        : std::fabs(static_cast<double>(f32_from_bits(std::uint32_t{above} << 16)));
  const double ax = std::fabs(static_cast<double>(x));
  if (ax - lo < hi - ax) return below;
  if (ax - lo > hi - ax) return above;
  return even_of(below, above);
}

TEST(Half, F16ToF32IsExactForEveryPattern) {
  for (std::uint32_t bits = 0; bits < kF16Count; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    const float ours = f16_to_f32(Half{h});
    const float gcc = gcc_f16_to_f32(h);
    if (f16_is_nan(h)) {
      ASSERT_TRUE(std::isnan(ours)) << std::hex << bits;
      ASSERT_EQ(std::signbit(ours), std::signbit(gcc)) << std::hex << bits;
      ASSERT_EQ((f32_bits(ours) >> 13) & 0x3ffu, h & 0x3ffu) << "payload kept " << std::hex << bits;
    } else {
      ASSERT_EQ(f32_bits(ours), f32_bits(gcc)) << std::hex << bits;
    }
  }
}

TEST(Half, Bf16ToF32IsTheTopHalfForEveryPattern) {
  for (std::uint32_t bits = 0; bits < kF16Count; ++bits) {
    const float value = bf16_to_f32(BFloat16{static_cast<std::uint16_t>(bits)});
    ASSERT_EQ(f32_bits(value), bits << 16) << std::hex << bits;
  }
}

TEST(Half, F16RoundTripIsIdentityAndNanStaysNan) {
  for (std::uint32_t bits = 0; bits < kF16Count; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    const std::uint16_t back = f32_to_f16(f16_to_f32(Half{h})).bits;
    if (f16_is_nan(h)) {
      ASSERT_TRUE(f16_is_nan(back)) << std::hex << bits;
      ASSERT_EQ(back & 0x8000u, h & 0x8000u) << std::hex << bits;
    } else {
      ASSERT_EQ(back, h) << std::hex << bits;
    }
  }
}

TEST(Half, Bf16RoundTripIsIdentityAndNanStaysNan) {
  for (std::uint32_t bits = 0; bits < kF16Count; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    const std::uint16_t back = f32_to_bf16(bf16_to_f32(BFloat16{h})).bits;
    if (bf16_is_nan(h)) {
      ASSERT_TRUE(bf16_is_nan(back)) << std::hex << bits;
      ASSERT_EQ(back & 0x8000u, h & 0x8000u) << std::hex << bits;
    } else {
      ASSERT_EQ(back, h) << std::hex << bits;
    }
  }
}

// For each pair of adjacent non-negative f16 values (a, b), including
// (65504, the value infinity stands for: 65536): the midpoint rounds to the
// even one, its f32 neighbours to the nearer one; the same with both negative.
TEST(Half, F32ToF16RoundsEveryMidpointAndItsNeighbours) {
  for (std::uint16_t a = 0; a < 0x7c00u; ++a) {
    const auto b = static_cast<std::uint16_t>(a + 1);
    const float upper = b == 0x7c00u ? 65536.0f : f16_to_f32(Half{b});
    const float mid = (f16_to_f32(Half{a}) + upper) / 2;  // exact: 12 significant bits
    for (const std::uint16_t sign : {std::uint16_t{0}, std::uint16_t{0x8000u}}) {
      const float s = sign ? -1.0f : 1.0f;
      ASSERT_EQ(f32_to_f16(s * mid).bits, sign | even_of(a, b))
          << "midpoint after " << std::hex << a;
      ASSERT_EQ(f32_to_f16(s * std::nextafter(mid, 0.0f)).bits, sign | a)
          << "below midpoint after " << std::hex << a;
      ASSERT_EQ(f32_to_f16(s * std::nextafter(mid, 1e30f)).bits, sign | b)
          << "above midpoint after " << std::hex << a;
    }
  }
}

// bf16 midpoints are f32 patterns: (a << 16) | 0x8000, neighbours one f32 ulp away.
TEST(Half, F32ToBf16RoundsEveryMidpointAndItsNeighbours) {
  for (std::uint16_t a = 0; a < 0x7f80u; ++a) {
    const auto b = static_cast<std::uint16_t>(a + 1);
    const std::uint32_t mid = (std::uint32_t{a} << 16) | 0x8000u;
    for (const std::uint32_t sign : {0u, 0x80000000u}) {
      const auto sign16 = static_cast<std::uint16_t>(sign >> 16);
      ASSERT_EQ(f32_to_bf16(f32_from_bits(sign | mid)).bits, sign16 | even_of(a, b))
          << "midpoint after " << std::hex << a;
      ASSERT_EQ(f32_to_bf16(f32_from_bits(sign | (mid - 1))).bits, sign16 | a)
          << "below midpoint after " << std::hex << a;
      ASSERT_EQ(f32_to_bf16(f32_from_bits(sign | (mid + 1))).bits, sign16 | b)
          << "above midpoint after " << std::hex << a;
    }
  }
}

TEST(Half, F32ToF16Overflow) {
  EXPECT_EQ(f32_to_f16(65520.0f).bits, 0x7c00u);
  EXPECT_EQ(f32_to_f16(std::nextafter(65520.0f, 0.0f)).bits, 0x7bffu);  // 65519.996 -> 65504
  EXPECT_EQ(f32_to_f16(65504.0f).bits, 0x7bffu);
  EXPECT_EQ(f32_to_f16(-65520.0f).bits, 0xfc00u);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::max()).bits, 0x7c00u);
  EXPECT_EQ(f32_to_f16(1e30f).bits, 0x7c00u);
}

TEST(Half, F32ToF16Subnormals) {
  const float two_pow_minus_25 = 0x1p-25f;
  EXPECT_EQ(f32_to_f16(two_pow_minus_25).bits, 0x0000u);  // tie with 2^-24: to even (zero)
  EXPECT_EQ(f32_to_f16(std::nextafter(two_pow_minus_25, 1.0f)).bits, 0x0001u);
  EXPECT_EQ(f32_to_f16(-two_pow_minus_25).bits, 0x8000u);
  EXPECT_EQ(f32_to_f16(0x1p-24f).bits, 0x0001u);
  EXPECT_EQ(f32_to_f16(3 * 0x1p-25f).bits, 0x0002u);         // 1.5 * 2^-24: tie to even
  EXPECT_EQ(f32_to_f16(0x1p-14f).bits, 0x0400u);             // smallest normal
  EXPECT_EQ(f32_to_f16(0x1p-14f - 0x1p-25f).bits, 0x0400u);  // tie with 0x3ff: to even
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::denorm_min()).bits, 0x0000u);
  EXPECT_EQ(f16_to_f32(Half{0x0001u}), 0x1p-24f);
  EXPECT_EQ(f16_to_f32(Half{0x03ffu}), 0x1p-14f - 0x1p-24f);
}

TEST(Half, F32ToF16InfinitiesZerosNans) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f32_to_f16(inf).bits, 0x7c00u);
  EXPECT_EQ(f32_to_f16(-inf).bits, 0xfc00u);
  EXPECT_EQ(f32_to_f16(0.0f).bits, 0x0000u);
  EXPECT_EQ(f32_to_f16(-0.0f).bits, 0x8000u);
  EXPECT_TRUE(f16_is_nan(f32_to_f16(std::numeric_limits<float>::quiet_NaN()).bits));
  const std::uint16_t signalling =
      f32_to_f16(f32_from_bits(0x7f800001u)).bits;  // payload below f16's
  EXPECT_TRUE(f16_is_nan(signalling));
  const std::uint16_t negative_nan = f32_to_f16(f32_from_bits(0xffc00000u)).bits;
  EXPECT_TRUE(f16_is_nan(negative_nan));
  EXPECT_EQ(negative_nan & 0x8000u, 0x8000u);
}

TEST(Half, F32ToBf16EdgeCases) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f32_to_bf16(inf).bits, 0x7f80u);
  EXPECT_EQ(f32_to_bf16(-inf).bits, 0xff80u);
  EXPECT_EQ(f32_to_bf16(0.0f).bits, 0x0000u);
  EXPECT_EQ(f32_to_bf16(-0.0f).bits, 0x8000u);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()).bits, 0x7f80u);
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x7f7f8000u)).bits, 0x7f80u);  // tie at the top: to inf
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x7f7f7fffu)).bits, 0x7f7fu);
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x00008000u)).bits, 0x0000u);  // subnormal tie: to even
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x00018000u)).bits, 0x0002u);
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x00008001u)).bits, 0x0001u);
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x80008001u)).bits, 0x8001u);
  EXPECT_TRUE(bf16_is_nan(f32_to_bf16(f32_from_bits(0x7f800001u)).bits));  // not inf
  EXPECT_TRUE(bf16_is_nan(f32_to_bf16(f32_from_bits(0xff800001u)).bits));
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0xffc00000u)).bits & 0x8000u, 0x8000u);
}

// splitmix64: a fixed, well-mixed sequence of f32 patterns.
std::uint64_t next_random(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

TEST(Half, F32ToF16MatchesGccForRandomPatterns) {
  std::uint64_t state = 42;
  for (int i = 0; i < (1 << 24); ++i) {
    const std::uint64_t r = next_random(state);
    // Half of the draws concentrate on f16's exponent range (2^-26 .. 2^17).
    auto bits = static_cast<std::uint32_t>(r);
    if ((r >> 32) & 1) bits = (bits & 0x807fffffu) | (((101u + (r >> 40) % 44u) & 0xffu) << 23);
    const float x = f32_from_bits(bits);
    const std::uint16_t ours = f32_to_f16(x).bits;
    const std::uint16_t gcc = gcc_f16_bits(x);
    if (std::isnan(x)) {
      ASSERT_TRUE(f16_is_nan(ours)) << std::hex << bits;
      ASSERT_EQ(ours & 0x8000u, gcc & 0x8000u) << std::hex << bits;
    } else {
      ASSERT_EQ(ours, gcc) << std::hex << bits;
    }
  }
}

TEST(Half, F32ToBf16MatchesReferenceForRandomPatterns) {
  std::uint64_t state = 7;
  for (int i = 0; i < (1 << 22); ++i) {
    const auto bits = static_cast<std::uint32_t>(next_random(state));
    const float x = f32_from_bits(bits);
    const std::uint16_t ours = f32_to_bf16(x).bits;
    if (std::isnan(x)) {
      ASSERT_TRUE(bf16_is_nan(ours)) << std::hex << bits;
      ASSERT_EQ(ours & 0x8000u, (bits >> 16) & 0x8000u) << std::hex << bits;
    } else {
      ASSERT_EQ(ours, reference_bf16_bits(x)) << std::hex << bits;
    }
  }
}

}  // namespace
}  // namespace tpfuse
