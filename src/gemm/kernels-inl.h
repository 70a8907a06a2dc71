// The SIMD kernels of the micro-kernel contract (microkernel.h), written once
// with Highway and compiled once per instruction set: kernels_avx512.cc,
// kernels_avx2.cc and kernels_portable.cc include this file, each built with
// its own flags, so Highway's static target (HWY_TARGET) differs per file.
// Everything here lives in tpfuse::gemm::HWY_NAMESPACE, a namespace per
// target, and uses nothing but Highway and plain C++ (no inline functions
// shared with other files, no std templates), so no code compiled for one
// instruction set can be linked in place of another's.
//
// Conversions match tpfuse/core/half.h bit for bit: f16 -> f32 and f32 -> f16
// use the hardware's exact / round-to-nearest-even instructions (F16C) where
// the target has them and half.h's scalar code otherwise; f32 -> bf16 rounds
// to nearest even with integer vector code (Highway 1.0 truncates).

#include <hwy/cache_control.h>
#include <hwy/highway.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "gemm/microkernel.h"

#if HWY_TARGET == HWY_EMU128 || HWY_TARGET == HWY_SCALAR
#include "tpfuse/core/half.h"
#define TPFUSE_KERNELS_SCALAR_F16 1
#endif

namespace tpfuse::gemm::HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;

using FloatTag = hn::ScalableTag<float>;
using FloatVec = hn::Vec<FloatTag>;
constexpr int kLanes = static_cast<int>(HWY_LANES(float));

// The register tile: kMR rows x kVecsPerRow vectors. Accumulators, the B
// vectors of one step and a broadcast A value must fit the register file
// (AVX-512: 14 x 2 + 2 + 1 = 31 of 32; AVX2: 6 x 2 + 2 + 1 = 15 of 16).
#if HWY_TARGET == HWY_AVX3
constexpr int kMR = 14;
constexpr int kVecsPerRow = 2;
#elif HWY_TARGET == HWY_SCALAR
// One lane per vector (GCC 12 builds Highway's portable target as scalar):
// a 4 x 8 tile leaves the compiler room to use whatever SIMD the baseline has.
constexpr int kMR = 4;
constexpr int kVecsPerRow = 8;
#else
constexpr int kMR = 6;
constexpr int kVecsPerRow = 2;
#endif
constexpr int kNR = kVecsPerRow * kLanes;

// B rows ahead that the micro-kernel prefetches (B read in place has a large
// row stride the hardware prefetchers do not follow).
constexpr int kPrefetchRows = 8;

inline std::int64_t min_i64(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

inline std::size_t elem_size(DType dtype) {
  switch (dtype) {
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::f32:
    case DType::i32:
      return 4;
    case DType::i8:
      return 1;
    case DType::i64:
      return 8;
  }
  return 0;
}

// ---- one vector of kLanes elements, to and from fp32 ----

inline FloatVec load_f16(const void* p) {
#ifdef TPFUSE_KERNELS_SCALAR_F16
  alignas(64) float lanes[kLanes];
  const auto* bits = static_cast<const std::uint16_t*>(p);
  for (int i = 0; i < kLanes; ++i) lanes[i] = f16_to_f32(Half{bits[i]});
  return hn::Load(FloatTag(), lanes);
#else
  const hn::Rebind<hwy::float16_t, FloatTag> half_tag;
  return hn::PromoteTo(FloatTag(), hn::LoadU(half_tag, static_cast<const hwy::float16_t*>(p)));
#endif
}

inline FloatVec load_bf16(const void* p) {
  const hn::Rebind<std::uint16_t, FloatTag> u16_tag;
  const hn::Rebind<std::uint32_t, FloatTag> u32_tag;
  const auto bits = hn::PromoteTo(u32_tag, hn::LoadU(u16_tag, static_cast<const std::uint16_t*>(p)));
  return hn::BitCast(FloatTag(), hn::ShiftLeft<16>(bits));
}

// A bf16 GEMM operand: as load_bf16, but a subnormal counts as zero (keeping
// its sign), as AVX512-BF16's dot product treats it, so that every engine
// multiplies the same values.
inline FloatVec load_bf16_operand(const void* p) {
  const hn::RebindToUnsigned<FloatTag> u32_tag;
  const auto bits = hn::BitCast(u32_tag, load_bf16(p));
  const auto subnormal = hn::Eq(hn::And(bits, hn::Set(u32_tag, 0x7f800000u)), hn::Zero(u32_tag));
  return hn::BitCast(FloatTag(), hn::IfThenElse(subnormal, hn::And(bits, hn::Set(u32_tag, 0x80000000u)), bits));
}

// A dequantized weight below the smallest normal fp32 (2^-126) in magnitude
// counts as zero: it would be zero in either activation dtype (below f16's
// smallest subnormal; flushed by bf16's dot product).
inline FloatVec flush_tiny(FloatVec w) {
  return hn::IfThenZeroElse(hn::Lt(hn::Abs(w), hn::Set(FloatTag(), 0x1p-126f)), w);
}

inline FloatVec load_i8(const void* p) {
  const hn::Rebind<std::int8_t, FloatTag> i8_tag;
  const hn::Rebind<std::int32_t, FloatTag> i32_tag;
  return hn::ConvertTo(FloatTag(),
                       hn::PromoteTo(i32_tag, hn::LoadU(i8_tag, static_cast<const std::int8_t*>(p))));
}

inline FloatVec load_as_f32(DType dtype, const void* p) {
  switch (dtype) {
    case DType::f16:
      return load_f16(p);
    case DType::bf16:
      return load_bf16(p);
    case DType::i8:
      return load_i8(p);
    default:
      return hn::LoadU(FloatTag(), static_cast<const float*>(p));
  }
}

inline void store_f16(FloatVec v, void* p) {
#ifdef TPFUSE_KERNELS_SCALAR_F16
  alignas(64) float lanes[kLanes];
  hn::Store(v, FloatTag(), lanes);
  auto* bits = static_cast<std::uint16_t*>(p);
  for (int i = 0; i < kLanes; ++i) bits[i] = f32_to_f16(lanes[i]).bits;
#else
  const hn::Rebind<hwy::float16_t, FloatTag> half_tag;
  hn::StoreU(hn::DemoteTo(half_tag, v), half_tag, static_cast<hwy::float16_t*>(p));
#endif
}

// Round to nearest even as half.h's f32_to_bf16: add 0x7fff plus the lowest
// kept bit; NaN keeps its sign and top payload and becomes quiet.
inline void store_bf16(FloatVec v, void* p) {
  const hn::RebindToUnsigned<FloatTag> u32_tag;
  const hn::RebindToSigned<FloatTag> i32_tag;
  const hn::Rebind<std::uint16_t, FloatTag> u16_tag;
  const auto bits = hn::BitCast(u32_tag, v);
  const auto magnitude = hn::BitCast(i32_tag, hn::And(bits, hn::Set(u32_tag, 0x7fffffffu)));
  const auto is_nan = hn::RebindMask(u32_tag, hn::Gt(magnitude, hn::Set(i32_tag, 0x7f800000)));
  const auto lowest_kept = hn::And(hn::ShiftRight<16>(bits), hn::Set(u32_tag, 1u));
  const auto rounded = hn::ShiftRight<16>(hn::Add(bits, hn::Add(hn::Set(u32_tag, 0x7fffu), lowest_kept)));
  const auto quiet_nan = hn::Or(hn::ShiftRight<16>(bits), hn::Set(u32_tag, 0x40u));
  const auto result = hn::IfThenElse(is_nan, quiet_nan, rounded);
  hn::StoreU(hn::DemoteTo(u16_tag, hn::BitCast(i32_tag, result)), u16_tag,
             static_cast<std::uint16_t*>(p));
}

inline void store_rounded(DType dtype, FloatVec v, void* p) {
  switch (dtype) {
    case DType::f16:
      store_f16(v, p);
      return;
    case DType::bf16:
      store_bf16(v, p);
      return;
    default:
      hn::StoreU(v, FloatTag(), static_cast<float*>(p));
      return;
  }
}

// One vector of a GEMM operand (x1, or x2 before any dequantization) as fp32.
inline FloatVec load_operand(DType dtype, const void* p) {
  return dtype == DType::bf16 ? load_bf16_operand(p) : load_as_f32(dtype, p);
}

// Converts count elements of a GEMM operand of dtype at src to fp32 at dst
// (load_operand).
inline void convert_row(DType dtype, const void* src, std::int64_t count, float* dst) {
  const std::size_t size = elem_size(dtype);
  const auto* bytes = static_cast<const unsigned char*>(src);
  std::int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    hn::StoreU(load_operand(dtype, bytes + j * size), FloatTag(), dst + j);
  }
  if (j < count) {
    alignas(64) unsigned char tail[kLanes * 4] = {};
    alignas(64) float converted[kLanes];
    __builtin_memcpy(tail, bytes + j * size, static_cast<std::size_t>(count - j) * size);
    hn::Store(load_operand(dtype, tail), FloatTag(), converted);
    for (std::int64_t t = 0; t < count - j; ++t) dst[j + t] = converted[t];
  }
}

// ---- the epilogue ----

// Finishes one vector of sums whose inputs are all kLanes wide: bias, x3,
// one rounding, in the order of tile_gemm.h.
inline void finish_vector(FloatVec sum, const float* bias, const void* x3, DType dtype, void* dst) {
  if (bias != nullptr) sum = hn::Add(sum, hn::LoadU(FloatTag(), bias));
  if (x3 != nullptr) sum = hn::Add(sum, load_as_f32(dtype, x3));
  store_rounded(dtype, sum, dst);
}

// The same for count < kLanes columns, through padded copies.
inline void finish_partial(FloatVec sum, std::int64_t count, const float* bias, const void* x3,
                           DType dtype, void* dst) {
  const std::size_t size = elem_size(dtype);
  alignas(64) float bias_lanes[kLanes] = {};
  alignas(64) unsigned char x3_lanes[kLanes * 4] = {};
  alignas(64) unsigned char dst_lanes[kLanes * 4];
  if (bias != nullptr) __builtin_memcpy(bias_lanes, bias, static_cast<std::size_t>(count) * 4);
  if (x3 != nullptr) __builtin_memcpy(x3_lanes, x3, static_cast<std::size_t>(count) * size);
  finish_vector(sum, bias != nullptr ? bias_lanes : nullptr, x3 != nullptr ? x3_lanes : nullptr,
                dtype, dst_lanes);
  __builtin_memcpy(dst, dst_lanes, static_cast<std::size_t>(count) * size);
}

// Loads count < kLanes values (the rest zero).
template <class T>
inline hn::Vec<hn::Rebind<T, FloatTag>> load_partial(const T* p, std::int64_t count) {
  alignas(64) T lanes[kLanes] = {};
  __builtin_memcpy(lanes, p, static_cast<std::size_t>(count) * sizeof(T));
  return hn::Load(hn::Rebind<T, FloatTag>(), lanes);
}

// Visits a row of cols values as whole vectors, then one partial vector:
// finish(j, count) for columns [j, j + count), count <= kLanes.
template <class Finish>
HWY_INLINE void for_each_vector(std::int64_t cols, const Finish& finish) {
  std::int64_t j = 0;
  for (; j + kLanes <= cols; j += kLanes) finish(j, kLanes);
  if (j < cols) finish(j, cols - j);
}

template <class T>
inline hn::Vec<hn::Rebind<T, FloatTag>> load_lanes(const T* p, std::int64_t count) {
  if (count == kLanes) return hn::LoadU(hn::Rebind<T, FloatTag>(), p);
  return load_partial(p, count);
}

inline void finish_f32(std::int64_t rows, std::int64_t cols, const float* acc, std::int64_t acc_ld,
                       const TileEpilogue& e) {
  const std::size_t size = elem_size(e.out_dtype);
  const auto* x3 = static_cast<const unsigned char*>(e.x3);
  auto* dst = static_cast<unsigned char*>(e.dst);
  for (std::int64_t i = 0; i < rows; ++i) {
    for_each_vector(cols, [&](std::int64_t j, std::int64_t count) {
      const FloatVec sum = load_lanes(acc + i * acc_ld + j, count);
      const float* bias = e.bias != nullptr ? e.bias + j : nullptr;
      const void* x3_at = x3 != nullptr ? x3 + (i * e.x3_ld + j) * size : nullptr;
      void* dst_at = dst + (i * e.dst_ld + j) * size;
      if (count == kLanes) {
        finish_vector(sum, bias, x3_at, e.out_dtype, dst_at);
      } else {
        finish_partial(sum, count, bias, x3_at, e.out_dtype, dst_at);
      }
    });
  }
}

// finish_i32 without (kRowScale false) or with row scales.
template <bool kRowScale>
HWY_INLINE void finish_i32_rows(std::int64_t rows, std::int64_t cols, const std::int32_t* acc,
                                std::int64_t acc_ld, const TileEpilogue& e) {
  const std::size_t size = elem_size(e.out_dtype);
  const auto* x3 = static_cast<const unsigned char*>(e.x3);
  auto* dst = static_cast<unsigned char*>(e.dst);
  for (std::int64_t i = 0; i < rows; ++i) {
    [[maybe_unused]] const float row_scale = kRowScale ? e.row_scale[i] : 1.0f;
    for_each_vector(cols, [&](std::int64_t j, std::int64_t count) {
      auto sum = load_lanes(acc + i * acc_ld + j, count);
      if (e.bias_i32 != nullptr) sum = hn::Add(sum, load_lanes(e.bias_i32 + j, count));
      FloatVec scale = load_lanes(e.scale + j, count);
      if constexpr (kRowScale) scale = hn::Mul(hn::Set(FloatTag(), row_scale), scale);
      const FloatVec scaled = hn::Mul(hn::ConvertTo(FloatTag(), sum), scale);
      const void* x3_at = x3 != nullptr ? x3 + (i * e.x3_ld + j) * size : nullptr;
      void* dst_at = dst + (i * e.dst_ld + j) * size;
      if (count == kLanes) {
        finish_vector(scaled, nullptr, x3_at, e.out_dtype, dst_at);
      } else {
        finish_partial(scaled, count, nullptr, x3_at, e.out_dtype, dst_at);
      }
    });
  }
}

// With row scales, out of line: the path without them compiles as it would alone.
HWY_NOINLINE inline void finish_i32_row_scaled(std::int64_t rows, std::int64_t cols,
                                               const std::int32_t* acc, std::int64_t acc_ld,
                                               const TileEpilogue& e) {
  finish_i32_rows<true>(rows, cols, acc, acc_ld, e);
}

// Full quant: (int32 sum + int32 bias, wrapping) -> fp32, times the scale
// (with row scales: times row_scale[i] * scale[j], that product rounded
// first), then x3 and the rounding as in finish_f32.
inline void finish_i32(std::int64_t rows, std::int64_t cols, const std::int32_t* acc,
                       std::int64_t acc_ld, const TileEpilogue& e) {
  if (e.row_scale != nullptr) {
    finish_i32_row_scaled(rows, cols, acc, acc_ld, e);
    return;
  }
  finish_i32_rows<false>(rows, cols, acc, acc_ld, e);
}

// ---- packing ----

inline void pack_a(const ASource& src, float* out) {
  const std::size_t size = elem_size(src.dtype);
  for (int i = 0; i < src.rows; ++i) {
    convert_row(src.dtype, static_cast<const unsigned char*>(src.data) + i * src.ld * static_cast<std::int64_t>(size),
                src.kc, out + i * kPackedAStride);
  }
}

inline void pack_b_f32(const BSource& src, float* out) {
  const std::size_t size = elem_size(src.dtype);
  const auto* bytes = static_cast<const unsigned char*>(src.data);
  const bool dequantize = src.dtype == DType::i8 && src.scale != nullptr;
  if (src.stride_n == 1) {
    for (std::int64_t l = 0; l < src.rows; ++l) {
      float* row = out + l * kNR;
      convert_row(src.dtype, bytes + l * src.stride_k * static_cast<std::int64_t>(size), src.cols, row);
      for (int j = src.cols; j < kNR; ++j) row[j] = 0.0f;
      if (!dequantize) continue;
      for (int j = 0; j < kNR; j += kLanes) {
        FloatVec w = hn::LoadU(FloatTag(), row + j);
        if (src.offset != nullptr) w = hn::Add(w, hn::LoadU(FloatTag(), src.offset + j));
        hn::StoreU(flush_tiny(hn::Mul(w, hn::LoadU(FloatTag(), src.scale + j))), FloatTag(), row + j);
      }
      for (int j = src.cols; j < kNR; ++j) row[j] = 0.0f;
    }
    return;
  }
  // Transposed: column j is contiguous along k.
  constexpr std::int64_t kChunk = 256;
  alignas(64) float column[kChunk];
  for (int j = 0; j < kNR; ++j) {
    if (j >= src.cols) {
      for (std::int64_t l = 0; l < src.rows; ++l) out[l * kNR + j] = 0.0f;
      continue;
    }
    const auto* col_bytes = bytes + j * src.stride_n * static_cast<std::int64_t>(size);
    for (std::int64_t l0 = 0; l0 < src.rows; l0 += kChunk) {
      const std::int64_t count = min_i64(kChunk, src.rows - l0);
      convert_row(src.dtype, col_bytes + l0 * size, count, column);
      if (dequantize) {
        const float offset = src.offset != nullptr ? src.offset[j] : 0.0f;
        const float scale = src.scale[j];
        for (std::int64_t l = 0; l < count; ++l) {
          const float q = src.offset != nullptr ? column[l] + offset : column[l];
          const float w = q * scale;
          column[l] = w > -0x1p-126f && w < 0x1p-126f ? 0.0f : w;
        }
      }
      for (std::int64_t l = 0; l < count; ++l) out[(l0 + l) * kNR + j] = column[l];
    }
  }
}

// ---- the micro-kernel ----

template <BFormat kFormat>
constexpr std::int64_t b_elem_size() {
  return kFormat == BFormat::f32 ? 4 : (kFormat == BFormat::i8 ? 1 : 2);
}

template <BFormat kFormat, bool kOffset>
HWY_INLINE FloatVec load_b(const unsigned char* p, FloatVec scale, FloatVec offset) {
  if constexpr (kFormat == BFormat::f32) {
    return hn::LoadU(FloatTag(), reinterpret_cast<const float*>(p));
  } else if constexpr (kFormat == BFormat::f16) {
    return load_f16(p);
  } else if constexpr (kFormat == BFormat::bf16) {
    return load_bf16_operand(p);
  } else {
    FloatVec q = load_i8(p);
    if constexpr (kOffset) q = hn::Add(q, offset);
    return flush_tiny(hn::Mul(q, scale));
  }
}

// Integer sums: the step's fp32 sums are exact integers; add them to the
// int32 totals in acc, then store the totals or finish them.
template <int kRows>
HWY_INLINE void finish_integer_sums(const MicroTile& t, const FloatVec (&acc)[kRows][kVecsPerRow]) {
  const hn::RebindToSigned<FloatTag> i32_tag;
  auto* totals = reinterpret_cast<std::int32_t*>(t.acc);
  alignas(64) std::int32_t finished[kRows * kNR];
  std::int32_t* out = t.epilogue == nullptr ? totals : finished;
  const std::int64_t out_ld = t.epilogue == nullptr ? t.acc_ld : kNR;
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecsPerRow; ++v) {
      auto total = hn::ConvertTo(i32_tag, acc[i][v]);
      if (t.accumulate) total = hn::Add(total, hn::LoadU(i32_tag, totals + i * t.acc_ld + v * kLanes));
      hn::StoreU(total, i32_tag, out + i * out_ld + v * kLanes);
    }
  }
  if (t.epilogue != nullptr) finish_i32(kRows, t.nr, finished, kNR, *t.epilogue);
}

// One instance per row count: a tile of kRows < MR rows (the last rows of
// m) costs kRows rows of work, not MR. Every instance adds in the same order.
template <BFormat kFormat, bool kOffset, int kRows>
void micro_kernel(const MicroTile& t) {
  const FloatTag d;
  FloatVec acc[kRows][kVecsPerRow];
  const bool resume = t.accumulate && !t.integer_sums;  // integer sums: each step from zero
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecsPerRow; ++v) {
      acc[i][v] = resume ? hn::LoadU(d, t.acc + i * t.acc_ld + v * kLanes) : hn::Zero(d);
    }
  }
  FloatVec scale[kVecsPerRow], offset[kVecsPerRow];
#pragma GCC unroll 4
  for (int v = 0; v < kVecsPerRow; ++v) {
    scale[v] = hn::Zero(d);
    offset[v] = hn::Zero(d);
    if constexpr (kFormat == BFormat::i8) scale[v] = hn::LoadU(d, t.b_scale + v * kLanes);
    if constexpr (kFormat == BFormat::i8 && kOffset) offset[v] = hn::LoadU(d, t.b_offset + v * kLanes);
  }

  constexpr std::int64_t kElem = b_elem_size<kFormat>();
  const std::int64_t b_step = t.b_ld * kElem;
  const auto* b = static_cast<const unsigned char*>(t.b);
  const float* a = t.a;
  for (std::int64_t l = 0; l < t.kc; ++l) {
    __builtin_prefetch(b + kPrefetchRows * b_step);
    FloatVec b_row[kVecsPerRow];
#pragma GCC unroll 4
    for (int v = 0; v < kVecsPerRow; ++v) {
      b_row[v] = load_b<kFormat, kOffset>(b + v * kLanes * kElem, scale[v], offset[v]);
    }
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const FloatVec a_value = hn::Set(d, a[i * kPackedAStride]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecsPerRow; ++v) acc[i][v] = hn::MulAdd(a_value, b_row[v], acc[i][v]);
    }
    ++a;
    b += b_step;
  }

  if (t.integer_sums) {
    finish_integer_sums<kRows>(t, acc);
    return;
  }
  if (t.epilogue == nullptr) {
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < kVecsPerRow; ++v) hn::StoreU(acc[i][v], d, t.acc + i * t.acc_ld + v * kLanes);
    }
    return;
  }
  alignas(64) float sums[kRows * kNR];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecsPerRow; ++v) hn::Store(acc[i][v], d, sums + i * kNR + v * kLanes);
  }
  finish_f32(kRows, t.nr, sums, kNR, *t.epilogue);
}

template <BFormat kFormat, bool kOffset, std::size_t... kRowsMinusOne>
void set_row_kernels(MicroKernel* by_rows, std::index_sequence<kRowsMinusOne...>) {
  ((by_rows[kRowsMinusOne] = &micro_kernel<kFormat, kOffset, static_cast<int>(kRowsMinusOne) + 1>), ...);
}

// ---- the dot micro-kernel ----

// One column's dequantization for one group of l (i8 only): its scale and
// offset as vectors, loaded once per group rather than per chunk, and
// whether a weight could land below 2^-126 and need flush_tiny. Without an
// offset a weight is q * scale with q an integer: 0 (and so +-0, which adds
// nothing to a sum that starts at +0) or at least 1 in magnitude, so only a
// scale in (0, 2^-126) can make one that small; skipping the flush otherwise
// changes no bit.
struct DotDequant {
  FloatVec scale;
  FloatVec offset;
  bool flush;
};

template <BFormat kFormat, bool kOffset>
HWY_INLINE DotDequant dot_dequant(const DotTile& t, int column, std::int64_t group) {
  DotDequant dequant{hn::Zero(FloatTag()), hn::Zero(FloatTag()), true};
  if constexpr (kFormat == BFormat::i8) {
    const float scale = t.scale[group * t.scale_ld + column];
    dequant.scale = hn::Set(FloatTag(), scale);
    if constexpr (kOffset) {
      dequant.offset = hn::Set(FloatTag(), t.offset[group * t.scale_ld + column]);
    } else {
      const float magnitude = __builtin_fabsf(scale);
      dequant.flush = magnitude > 0.0f && magnitude < 0x1p-126f;
    }
  }
  return dequant;
}

template <BFormat kFormat, bool kOffset, bool kFlush>
HWY_INLINE FloatVec load_w(const unsigned char* p, const DotDequant& dequant) {
  if constexpr (kFormat == BFormat::i8 && !kOffset) {
    const FloatVec w = hn::Mul(load_i8(p), dequant.scale);
    return kFlush ? flush_tiny(w) : w;
  } else {
    return load_b<kFormat, kOffset>(p, dequant.scale, dequant.offset);
  }
}

// One chunk of kLanes values of l: every column's weights times every row.
template <BFormat kFormat, bool kOffset, bool kFlush, int kRows>
HWY_INLINE void dot_chunk(const DotTile& t, const unsigned char* const (&w)[kDotCols],
                          const DotDequant (&dequant)[kDotCols], std::int64_t l,
                          FloatVec (&acc)[kRows][kDotCols]) {
  constexpr std::int64_t kElem = b_elem_size<kFormat>();
  FloatVec w_chunk[kDotCols];
#pragma GCC unroll 4
  for (int c = 0; c < kDotCols; ++c)
    w_chunk[c] = load_w<kFormat, kOffset, kFlush>(w[c] + l * kElem, dequant[c]);
#pragma GCC unroll 4
  for (int i = 0; i < kRows; ++i) {
    const FloatVec a_chunk = hn::LoadU(FloatTag(), t.a + i * t.a_ld + l);
#pragma GCC unroll 4
    for (int c = 0; c < kDotCols; ++c) acc[i][c] = hn::MulAdd(a_chunk, w_chunk[c], acc[i][c]);
  }
}

// The whole chunks of l in [l, end), one group's; returns where they stop.
// Steps of a cache line of each column, each fetching the next tile's line
// at the same place (or, for the last tile, its own again: no branch in the
// loop), then the chunks left, fetching at each line's start.
template <BFormat kFormat, bool kOffset, bool kFlush, int kRows>
HWY_INLINE std::int64_t dot_chunks(const DotTile& t, const unsigned char* const (&w)[kDotCols],
                                   const DotDequant (&dequant)[kDotCols], std::int64_t l,
                                   std::int64_t end, FloatVec (&acc)[kRows][kDotCols]) {
  constexpr std::int64_t kElem = b_elem_size<kFormat>();
  constexpr std::int64_t kStep = 64 / kElem > kLanes ? 64 / kElem : kLanes;
  const auto* next = static_cast<const unsigned char*>(t.prefetch != nullptr ? t.prefetch : t.w);
  for (; l + kStep <= end; l += kStep) {
#pragma GCC unroll 4
    for (int c = 0; c < kDotCols; ++c) hwy::Prefetch(next + (c * t.w_ld + l) * kElem);
#pragma GCC unroll 16
    for (std::int64_t s = 0; s < kStep; s += kLanes)
      dot_chunk<kFormat, kOffset, kFlush, kRows>(t, w, dequant, l + s, acc);
  }
  for (; l + kLanes <= end; l += kLanes) {
    if (t.prefetch != nullptr && (l * kElem) % 64 == 0) {
#pragma GCC unroll 4
      for (int c = 0; c < kDotCols; ++c) hwy::Prefetch(next + (c * t.w_ld + l) * kElem);
    }
    dot_chunk<kFormat, kOffset, kFlush, kRows>(t, w, dequant, l, acc);
  }
  return l;
}

template <BFormat kFormat, bool kOffset, int kRows>
void dot_kernel(const DotTile& t) {
  const FloatTag d;
  constexpr std::int64_t kElem = b_elem_size<kFormat>();
  FloatVec acc[kRows][kDotCols];
  const unsigned char* w[kDotCols];
#pragma GCC unroll 4
  for (int c = 0; c < kDotCols; ++c) {
    // Columns past cols read column 0 again, and are dropped.
    w[c] = static_cast<const unsigned char*>(t.w) + (c < t.cols ? c : 0) * t.w_ld * kElem;
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) acc[i][c] = hn::Zero(d);
  }
  // A group's chunks share its scales; groups are multiples of 32 values of
  // l, so only the last chunk of k may be partial. Where no column of the
  // group needs the flush, no weight does: the loop goes without it.
  const std::int64_t group_rows = kFormat == BFormat::i8 ? t.group_rows : t.k;
  std::int64_t l = 0;
  DotDequant dequant[kDotCols] = {};
  for (std::int64_t group = 0; l < t.k; ++group) {
    bool flush = false;
#pragma GCC unroll 4
    for (int c = 0; c < kDotCols; ++c) {
      dequant[c] = dot_dequant<kFormat, kOffset>(t, c, group);
      flush = flush || dequant[c].flush;
    }
    const std::int64_t group_end = t.k - l < group_rows ? t.k : l + group_rows;
    l = flush ? dot_chunks<kFormat, kOffset, true, kRows>(t, w, dequant, l, group_end, acc)
              : dot_chunks<kFormat, kOffset, false, kRows>(t, w, dequant, l, group_end, acc);
    if (l < group_end) break;  // the last chunk of k, partial
  }
  if (l < t.k) {  // the last chunk, through zero-padded copies
    const std::int64_t count = t.k - l;
    // The padding's weights are zeroed after dequantizing: (0 + offset) *
    // scale is +-inf or NaN for a non-finite scale, and times x1's zero
    // padding a NaN in every sum of the column.
    const auto real = hn::FirstN(d, static_cast<std::size_t>(count));
    FloatVec w_chunk[kDotCols];
#pragma GCC unroll 4
    for (int c = 0; c < kDotCols; ++c) {
      alignas(64) unsigned char padded[kLanes * 4] = {};
      __builtin_memcpy(padded, w[c] + l * kElem, static_cast<std::size_t>(count * kElem));
      w_chunk[c] = hn::IfThenElseZero(real, load_w<kFormat, kOffset, true>(padded, dequant[c]));
    }
#pragma GCC unroll 4
    for (int i = 0; i < kRows; ++i) {
      const FloatVec a_chunk = load_partial(t.a + i * t.a_ld + l, count);
#pragma GCC unroll 4
      for (int c = 0; c < kDotCols; ++c) acc[i][c] = hn::MulAdd(a_chunk, w_chunk[c], acc[i][c]);
    }
  }
  // Rows padded to a whole vector, which finish_f32 may load.
  constexpr int kSumsLd = kLanes > kDotCols ? kLanes : kDotCols;
  alignas(64) float sums[kRows * kSumsLd] = {};
#pragma GCC unroll 4
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int c = 0; c < kDotCols; ++c) sums[i * kSumsLd + c] = hn::GetLane(hn::SumOfLanes(d, acc[i][c]));
  }
  finish_f32(kRows, t.cols, sums, kSumsLd, *t.epilogue);
}

template <BFormat kFormat, bool kOffset, std::size_t... kRowsMinusOne>
void set_dot_kernels(DotKernel* by_rows, std::index_sequence<kRowsMinusOne...>) {
  ((by_rows[kRowsMinusOne] = &dot_kernel<kFormat, kOffset, static_cast<int>(kRowsMinusOne) + 1>), ...);
}

inline KernelTable make_kernel_table(IsaLevel isa) {
  KernelTable table;
  table.isa = isa;
  table.mr = kMR;
  table.nr = kNR;
  static_assert(kMR <= kMaxMR);
  const auto rows = std::make_index_sequence<kMR>();
  set_row_kernels<BFormat::f32, false>(table.tile[static_cast<int>(BFormat::f32)], rows);
  set_row_kernels<BFormat::f16, false>(table.tile[static_cast<int>(BFormat::f16)], rows);
  set_row_kernels<BFormat::bf16, false>(table.tile[static_cast<int>(BFormat::bf16)], rows);
  set_row_kernels<BFormat::i8, false>(table.tile[static_cast<int>(BFormat::i8)], rows);
  set_row_kernels<BFormat::i8, true>(table.tile_i8_with_offset, rows);
  const auto dot_rows = std::make_index_sequence<kMaxDotRows>();  // x2 is never f32
  set_dot_kernels<BFormat::f16, false>(table.dot[static_cast<int>(BFormat::f16)], dot_rows);
  set_dot_kernels<BFormat::bf16, false>(table.dot[static_cast<int>(BFormat::bf16)], dot_rows);
  set_dot_kernels<BFormat::i8, false>(table.dot[static_cast<int>(BFormat::i8)], dot_rows);
  set_dot_kernels<BFormat::i8, true>(table.dot_i8_with_offset, dot_rows);
  table.pack_a = &pack_a;
  table.pack_b_f32 = &pack_b_f32;
  table.convert_to_f32 = &convert_row;
  table.finish_f32 = &finish_f32;
  table.finish_i32 = &finish_i32;
  return table;
}

}  // namespace tpfuse::gemm::HWY_NAMESPACE
