// The row kernels of add_rms_norm_kernels.h, written once with Highway and
// compiled once per instruction set (add_rms_norm_{avx512,avx2,portable}.cc,
// each with its own flags, so HWY_TARGET differs per file). As in
// gemm/kernels-inl.h, everything lives in a namespace per target and uses
// only Highway and plain C++ (no inline functions shared with other files),
// so no code built for one instruction set is linked in place of another's;
// and the files are compiled with -ffp-contract=off, so a square is rounded
// before it is added and a product before it is rounded to 16 bits.
//
// Bit for bit what the scalar reference computes: the 16 running sums are
// kVectors vectors of kLanes lanes, lane l of vector v holding sum
// v * kLanes + l; a row's last partial 16 go through zero-padded buffers,
// whose zeros add +0 to a sum (never -0: it starts at +0 and adds squares).
// Conversions match tpfuse/core/half.h: F16C's exact f16 -> f32 and
// round-to-nearest-even f32 -> f16 where the target has it, half.h's
// scalar code where it does not; f32 -> bf16 with integer vector code.

#include <hwy/highway.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "ops/add_rms_norm_kernels.h"

#if HWY_TARGET == HWY_EMU128 || HWY_TARGET == HWY_SCALAR
#include "tpfuse/core/half.h"
#define TPFUSE_ADD_RMS_NORM_SCALAR_F16 1
#endif

namespace tpfuse::HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;

using FloatTag = hn::ScalableTag<float>;
using FloatVec = hn::Vec<FloatTag>;
using U32Tag = hn::RebindToUnsigned<FloatTag>;
using U16Tag = hn::Rebind<std::uint16_t, FloatTag>;
constexpr int kLanes = static_cast<int>(HWY_LANES(float));
constexpr int kVectors = kAddRmsNormLanes / kLanes;
static_assert(kVectors * kLanes == kAddRmsNormLanes, "16 lanes must be whole vectors");

// Each format rounds an fp32 vector to a Rounded (round: no NaN lanes;
// round_with_nans: NaN lanes already quiet), whose fp32 value and 16-bit
// stores come from it.
//
// bf16: the top half of an f32, rounded to nearest even by adding 0x7fff plus
// the lowest kept bit, and kept unshifted: its value is then one AND, not a
// narrowing and a widening (bf16 at n=4096 took 0.86 ms a 512-row tile with
// them, 0.62 ms without). A quiet NaN is kept as it is (its top half is what
// f32_to_bf16 gives it).
struct BFloat16Format {
  using Rounded = hn::Vec<U32Tag>;

  static FloatVec load(const std::byte* p) {
    const auto bits = hn::LoadU(U16Tag(), reinterpret_cast<const std::uint16_t*>(p));
    return hn::BitCast(FloatTag(), hn::ShiftLeft<16>(hn::PromoteTo(U32Tag(), bits)));
  }
  static Rounded round(FloatVec v) {
    const auto bits = hn::BitCast(U32Tag(), v);
    const auto lowest_kept = hn::And(hn::ShiftRight<16>(bits), hn::Set(U32Tag(), 1u));
    return hn::Add(bits, hn::Add(hn::Set(U32Tag(), 0x7fffu), lowest_kept));
  }
  static Rounded round_with_nans(FloatVec v) {
    return hn::IfThenElse(hn::RebindMask(U32Tag(), hn::IsNaN(v)), hn::BitCast(U32Tag(), v),
                          round(v));
  }
  static FloatVec value(Rounded r) {
    return hn::BitCast(FloatTag(), hn::And(r, hn::Set(U32Tag(), 0xffff0000u)));
  }
  static void store(Rounded r, std::byte* p) {
    const hn::RebindToSigned<FloatTag> i32_tag;
    hn::StoreU(hn::DemoteTo(U16Tag(), hn::BitCast(i32_tag, hn::ShiftRight<16>(r))), U16Tag(),
               reinterpret_cast<std::uint16_t*>(p));
  }
};

#ifdef TPFUSE_ADD_RMS_NORM_SCALAR_F16
struct HalfFormat {
  using Rounded = hn::Vec<U16Tag>;

  static FloatVec value(Rounded bits) {
    std::uint16_t in[kLanes];
    alignas(64) float lanes[kLanes];
    hn::StoreU(bits, U16Tag(), in);
    for (int i = 0; i < kLanes; ++i) lanes[i] = f16_to_f32(Half{in[i]});
    return hn::Load(FloatTag(), lanes);
  }
  static FloatVec load(const std::byte* p) {
    return value(hn::LoadU(U16Tag(), reinterpret_cast<const std::uint16_t*>(p)));
  }
  static Rounded round(FloatVec v) {
    alignas(64) float lanes[kLanes];
    std::uint16_t out[kLanes];
    hn::Store(v, FloatTag(), lanes);
    for (int i = 0; i < kLanes; ++i) out[i] = f32_to_f16(lanes[i]).bits;
    return hn::LoadU(U16Tag(), out);
  }
  static Rounded round_with_nans(FloatVec v) { return round(v); }
  static void store(Rounded bits, std::byte* p) {
    hn::StoreU(bits, U16Tag(), reinterpret_cast<std::uint16_t*>(p));
  }
};
#else
struct HalfFormat {
  using HalfTag = hn::Rebind<hwy::float16_t, FloatTag>;
  using Rounded = hn::Vec<HalfTag>;

  static FloatVec value(Rounded bits) { return hn::PromoteTo(FloatTag(), bits); }
  static FloatVec load(const std::byte* p) {
    return value(hn::LoadU(HalfTag(), reinterpret_cast<const hwy::float16_t*>(p)));
  }
  static Rounded round(FloatVec v) { return hn::DemoteTo(HalfTag(), v); }
  static Rounded round_with_nans(FloatVec v) { return round(v); }
  static void store(Rounded bits, std::byte* p) {
    hn::StoreU(bits, HalfTag(), reinterpret_cast<hwy::float16_t*>(p));
  }
};
#endif

// `result` of an operation on `preferred` and `other`, rounded: its NaN lanes
// by the rule of add_rms_norm_kernels.h.
template <class Format>
typename Format::Rounded round_by_rule(FloatVec result, FloatVec preferred, FloatVec other) {
  const FloatTag d;
  if (hn::AllFalse(d, hn::IsNaN(result))) return Format::round(result);
  const auto quiet = [d](FloatVec v) {
    return hn::BitCast(d, hn::Or(hn::BitCast(U32Tag(), v), hn::Set(U32Tag(), kQuietNanBit)));
  };
  const FloatVec default_nan = hn::BitCast(d, hn::Set(U32Tag(), kDefaultNanBits));
  const FloatVec nan = hn::IfThenElse(hn::IsNaN(preferred), quiet(preferred),
                                      hn::IfThenElse(hn::IsNaN(other), quiet(other), default_nan));
  return Format::round_with_nans(hn::IfThenElse(hn::IsNaN(result), nan, result));
}

constexpr std::size_t kChunkBytes = kAddRmsNormLanes * 2;

// `step` on each whole chunk of 16 elements of the (up to three) inputs and
// the output, then on the last partial one through zero-padded buffers.
template <class Step>
inline void for_each_chunk(const std::byte* a, const std::byte* b, std::byte* out, std::int64_t n,
                           const Step& step) {
  const std::int64_t whole = n / kAddRmsNormLanes * kAddRmsNormLanes;
  for (std::int64_t j = 0; j < whole; j += kAddRmsNormLanes) {
    const auto at = static_cast<std::size_t>(j) * 2;
    step(a + at, b + at, out + at);
  }
  if (whole == n) return;
  const auto at = static_cast<std::size_t>(whole) * 2;
  const auto bytes = static_cast<std::size_t>(n - whole) * 2;
  alignas(64) std::byte a_tail[kChunkBytes] = {};
  alignas(64) std::byte b_tail[kChunkBytes] = {};
  alignas(64) std::byte out_tail[kChunkBytes];
  std::memcpy(a_tail, a + at, bytes);
  std::memcpy(b_tail, b + at, bytes);
  step(a_tail, b_tail, out_tail);
  std::memcpy(out + at, out_tail, bytes);
}

template <class Format>
void add_row(const void* mm, const void* residual, void* y, std::int64_t n,
             float sums[kAddRmsNormLanes]) {
  FloatVec sum[kVectors];
  for (int v = 0; v < kVectors; ++v) sum[v] = hn::Zero(FloatTag());
  for_each_chunk(static_cast<const std::byte*>(mm), static_cast<const std::byte*>(residual),
                 static_cast<std::byte*>(y), n,
                 [&sum](const std::byte* a, const std::byte* b, std::byte* out) {
                   for (int v = 0; v < kVectors; ++v) {
                     const std::size_t at = static_cast<std::size_t>(v) * kLanes * 2;
                     const FloatVec mm_value = Format::load(a + at);
                     const FloatVec residual_value = Format::load(b + at);
                     const auto y_value = round_by_rule<Format>(hn::Add(mm_value, residual_value),
                                                                residual_value, mm_value);
                     Format::store(y_value, out + at);
                     const FloatVec value = Format::value(y_value);
                     sum[v] = hn::Add(sum[v], hn::Mul(value, value));
                   }
                 });
  for (int v = 0; v < kVectors; ++v) hn::StoreU(sum[v], FloatTag(), sums + v * kLanes);
}

template <class Format>
void norm_row(const void* y, const void* gamma, float rstd, void* out, std::int64_t n) {
  const FloatVec scale = hn::Set(FloatTag(), rstd);
  for_each_chunk(static_cast<const std::byte*>(y), static_cast<const std::byte*>(gamma),
                 static_cast<std::byte*>(out), n,
                 [scale](const std::byte* y_chunk, const std::byte* gamma_chunk, std::byte* o) {
                   for (int v = 0; v < kVectors; ++v) {
                     const std::size_t at = static_cast<std::size_t>(v) * kLanes * 2;
                     // No NaN: the caller normalises such rows itself.
                     const FloatVec t =
                         Format::value(Format::round(hn::Mul(Format::load(y_chunk + at), scale)));
                     const FloatVec g = Format::load(gamma_chunk + at);
                     Format::store(round_by_rule<Format>(hn::Mul(t, g), g, t), o + at);
                   }
                 });
}

inline AddRmsNormKernels make_add_rms_norm_kernels() {
  AddRmsNormKernels kernels{};
  kernels.rows[0] = {&add_row<HalfFormat>, &norm_row<HalfFormat>};
  kernels.rows[1] = {&add_row<BFloat16Format>, &norm_row<BFloat16Format>};
  return kernels;
}

}  // namespace tpfuse::HWY_NAMESPACE
