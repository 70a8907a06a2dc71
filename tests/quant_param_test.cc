// trans_quant_param against bit patterns worked out by hand from torch_npu's
// rule: (bits(scale) & 0xFFFFE000) | (1 << 46) | ((offset9 & 0x1FF) << 37),
// the offset rounded half to even and clamped to [-256, 255].
#include "tpfuse/ops/quant_param.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "tpfuse/core/error.h"

namespace tpfuse {
namespace {

constexpr std::uint64_t kFlag = std::uint64_t{1} << 46;

float from_bits(std::uint32_t bits) { return std::bit_cast<float>(bits); }

std::uint64_t packed_bits(float scale, std::optional<float> offset = std::nullopt) {
  return static_cast<std::uint64_t>(trans_quant_param(scale, offset));
}

struct ScaleCase {
  const char* what;
  std::uint32_t scale_bits;
  std::uint64_t expected;
};

TEST(TransQuantParam, ScalesPackBitExactly) {
  const ScaleCase cases[] = {
      {"1.0", 0x3f800000u, 0x0000'4000'3f80'0000ull},
      {"0.5", 0x3f000000u, 0x0000'4000'3f00'0000ull},
      {"-2.0: bit 31 set, not sign-extended", 0xc0000000u, 0x0000'4000'c000'0000ull},
      {"low 13 mantissa bits cleared", 0x3fabcdefu, 0x0000'4000'3fab'c000ull},
      {"1 + 2^-23 loses its last bit", 0x3f800001u, 0x0000'4000'3f80'0000ull},
      {"largest subnormal keeps its top 10 bits", 0x007fffffu, 0x0000'4000'007f'e000ull},
      {"small subnormal becomes +0", 0x00001234u, 0x0000'4000'0000'0000ull},
      {"+0", 0x00000000u, 0x0000'4000'0000'0000ull},
      {"-0", 0x80000000u, 0x0000'4000'8000'0000ull},
      {"+inf", 0x7f800000u, 0x0000'4000'7f80'0000ull},
      {"-inf", 0xff800000u, 0x0000'4000'ff80'0000ull},
      {"quiet NaN", 0x7fc00000u, 0x0000'4000'7fc0'0000ull},
      {"NaN with only low payload bits becomes inf", 0x7f800001u, 0x0000'4000'7f80'0000ull},
  };
  for (const ScaleCase& c : cases) {
    EXPECT_EQ(packed_bits(from_bits(c.scale_bits)), c.expected) << c.what;
    EXPECT_GE(trans_quant_param(from_bits(c.scale_bits)), 0) << c.what << ": never negative";
  }
}

struct OffsetCase {
  float offset;
  std::uint64_t int9;  // the expected 9-bit pattern
};

TEST(TransQuantParam, OffsetsRoundHalfToEvenClampAndKeepNineBits) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const OffsetCase cases[] = {
      {0.0f, 0x000},   {-0.0f, 0x000},  {1.0f, 0x001},    {-1.0f, 0x1ff},   {0.49f, 0x000},
      {0.5f, 0x000},   {1.5f, 0x002},   {2.5f, 0x002},    {3.5f, 0x004},    {-2.5f, 0x1fe},
      {-0.5f, 0x000},  {-1.5f, 0x1fe},  {2.51f, 0x003},   {255.0f, 0x0ff},  {254.5f, 0x0fe},
      {255.5f, 0x0ff}, {300.0f, 0x0ff}, {-256.0f, 0x100}, {-256.5f, 0x100}, {-300.0f, 0x100},
      {1e30f, 0x0ff},  {-1e30f, 0x100}, {inf, 0x0ff},     {-inf, 0x100},
  };
  const std::uint64_t scale_part = 0x3f800000u | kFlag;
  for (const OffsetCase& c : cases) {
    EXPECT_EQ(packed_bits(1.0f, c.offset), scale_part | (c.int9 << 37)) << "offset " << c.offset;
  }
}

TEST(TransQuantParam, OffsetLeavesScaleAndFlagIntact) {
  const std::uint64_t packed = packed_bits(from_bits(0xbfabcdefu), -1.0f);
  EXPECT_EQ(packed & 0xffffffffull, 0xbfabc000ull);
  EXPECT_EQ(packed & kFlag, kFlag);
  EXPECT_EQ((packed >> 37) & 0x1ff, 0x1ffu);
  EXPECT_EQ(packed >> 47, 0u);
  EXPECT_EQ((packed >> 32) & 0x1f, 0u);
}

TEST(TransQuantParam, NanOffsetIsRejected) {
  EXPECT_THROW(trans_quant_param(1.0f, std::numeric_limits<float>::quiet_NaN()), InvalidArgument);
}

TEST(TransQuantParam, UnpackReadsTheLowWordAsFp32) {
  for (const float scale : {1.0f, 0.5f, -2.0f, 1e-3f, -3.75e-5f, 6.1e4f}) {
    const float expected = from_bits(std::bit_cast<std::uint32_t>(scale) & 0xffffe000u);
    EXPECT_EQ(unpack_quant_scale(trans_quant_param(scale)), expected) << scale;
    EXPECT_EQ(unpack_quant_scale(trans_quant_param(scale, -7.0f)), expected) << scale;
  }
  // Values with at most 10 stored mantissa bits survive the packing unchanged.
  for (const float scale : {1.0f, 0.5f, -2.0f, 0.75f, 0x1.ffcp-10f}) {
    EXPECT_EQ(unpack_quant_scale(trans_quant_param(scale)), scale) << scale;
  }
  EXPECT_TRUE(std::isnan(unpack_quant_scale(trans_quant_param(from_bits(0x7fc00000u)))));
}

TEST(TransQuantParam, VectorPacksEachScale) {
  const std::vector<float> scales = {1.0f, 0.5f, -2.0f};
  const auto packed = trans_quant_param(scales);
  ASSERT_EQ(packed.size(), 3u);
  for (std::size_t i = 0; i < scales.size(); ++i)
    EXPECT_EQ(packed[i], trans_quant_param(scales[i]));
}

TEST(TransQuantParam, VectorOffsetsElementwiseOrBroadcast) {
  const std::vector<float> scales = {1.0f, 0.5f, -2.0f};
  const std::vector<float> offsets = {1.0f, -1.0f, 2.5f};
  const auto elementwise = trans_quant_param(scales, offsets);
  ASSERT_EQ(elementwise.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(elementwise[i], trans_quant_param(scales[i], offsets[i]));
  }
  const std::vector<float> one_offset = {-3.0f};
  const auto broadcast = trans_quant_param(scales, one_offset);
  ASSERT_EQ(broadcast.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) EXPECT_EQ(broadcast[i], trans_quant_param(scales[i], -3.0f));
}

// As in torch_npu, one scale with n offsets gives n packed values.
TEST(TransQuantParam, VectorOneScaleBroadcastsOverOffsets) {
  const std::vector<float> one_scale = {0.25f};
  const std::vector<float> offsets = {1.0f, 2.0f};
  const auto packed = trans_quant_param(one_scale, offsets);
  ASSERT_EQ(packed.size(), 2u);
  EXPECT_EQ(packed[0], trans_quant_param(0.25f, 1.0f));
  EXPECT_EQ(packed[1], trans_quant_param(0.25f, 2.0f));
}

void expect_invalid(std::span<const float> scales, std::span<const float> offsets,
                    const std::string& prefix, const std::string& fragment) {
  try {
    trans_quant_param(scales, offsets);
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    const std::string message = e.what();
    EXPECT_EQ(message.rfind(prefix, 0), 0u) << message;
    EXPECT_NE(message.find(fragment), std::string::npos) << message;
  }
}

TEST(TransQuantParam, VectorMismatchedLengthsNameOffset) {
  const std::vector<float> three = {1, 2, 3};
  const std::vector<float> two = {1, 2};
  expect_invalid(three, two, "offset:", "got 2");
  expect_invalid(two, three, "offset:", "got 3");
}

TEST(TransQuantParam, VectorNeedsAScale) {
  const std::vector<float> none;
  const std::vector<float> one = {1};
  expect_invalid(none, {}, "scale:", "got none");
  expect_invalid(none, one, "scale:", "got none");
}

}  // namespace
}  // namespace tpfuse
