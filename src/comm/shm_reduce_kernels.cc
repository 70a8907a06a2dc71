// The rank-order sum: a portable version, an AVX2 one and an AVX-512 one,
// chosen by the instruction-set level.
//
// Each element sees acc = x_0, then acc += x_r for r = 1..p-1, then one
// rounding; the portable kernel keeps a block of accumulators in L1, the
// vector ones four vectors in registers. Blocking and vector width change
// only which elements are in flight together, never the order of one
// element's additions, so all give the same bits (the tests hold them to
// it). The vector kernels round to bf16 with integer arithmetic
// rather than VCVTNEPS2BF16, which flushes subnormals.
//
// NaNs: which NaN a sum yields depends on operand order (x86 returns the
// first operand's), and the compiler may swap the operands of an addition,
// differently in each kernel. So a NaN sum is replaced by one chosen by rule,
// the same in every kernel and on every rank: the first NaN among the
// contributions in rank order, made quiet, or the x86 default NaN when the
// contributions are numbers (inf - inf). That is what acc += x_r in rank
// order gives on x86 when the operands stay in order.
#include "comm/shm_reduce_kernels.h"

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/cpu_isa.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define TPFUSE_SHM_HAVE_X86_KERNELS 1
#endif

namespace tpfuse::comm::shm {

namespace {

constexpr std::size_t kBlock = 512;

struct F32Codec {
  static constexpr DType kType = DType::f32;
  using Stored = float;
  static float load(float value) { return value; }
  static float store(float value) { return value; }
};

struct F16Codec {
  static constexpr DType kType = DType::f16;
  using Stored = Half;
  static float load(Half value) { return f16_to_f32(value); }
  static Half store(float value) { return f32_to_f16(value); }
};

struct BF16Codec {
  static constexpr DType kType = DType::bf16;
  using Stored = BFloat16;
  static float load(BFloat16 value) { return bf16_to_f32(value); }
  static BFloat16 store(float value) { return f32_to_bf16(value); }
};

template <DType kType>
using CodecFor = std::conditional_t<kType == DType::f16, F16Codec,
                                    std::conditional_t<kType == DType::bf16, BF16Codec, F32Codec>>;

constexpr std::uint32_t kDefaultNan = 0xffc00000u;
constexpr std::uint32_t kQuietBit = 0x00400000u;

// The NaN that element `index` sums to, by the rule above.
float rank_order_nan(DType dtype, std::span<const std::byte* const> sources, std::size_t index) {
  for (const std::byte* source : sources) {
    float value = 0;
    if (dtype == DType::f32) {
      std::memcpy(&value, source + index * 4, 4);
    } else {
      std::uint16_t bits = 0;
      std::memcpy(&bits, source + index * 2, 2);
      value = dtype == DType::f16 ? f16_to_f32(Half{bits}) : bf16_to_f32(BFloat16{bits});
    }
    if (value != value)
      return std::bit_cast<float>(std::bit_cast<std::uint32_t>(value) | kQuietBit);
  }
  return std::bit_cast<float>(kDefaultNan);
}

// Elements [first, end). Element loads and stores go through memcpy: no
// buffer need be aligned.
template <class Codec>
void sum_portable(std::span<const std::byte* const> sources, std::size_t first, std::size_t end,
                  std::byte* out, std::byte* second_out) {
  using Stored = typename Codec::Stored;
  constexpr std::size_t kSize = sizeof(Stored);
  float sums[kBlock];
  for (std::size_t begin = first; begin < end; begin += kBlock) {
    const std::size_t n = std::min(kBlock, end - begin);
    for (std::size_t r = 0; r < sources.size(); ++r) {
      const std::byte* in = sources[r] + begin * kSize;
      for (std::size_t i = 0; i < n; ++i) {
        Stored value;
        std::memcpy(&value, in + i * kSize, kSize);
        sums[i] = r == 0 ? Codec::load(value) : sums[i] + Codec::load(value);
      }
    }
    for (std::size_t i = 0; i < n; ++i) {
      if (sums[i] != sums[i]) sums[i] = rank_order_nan(Codec::kType, sources, begin + i);
    }
    for (std::byte* target : {out, second_out}) {
      if (target == nullptr) continue;
      for (std::size_t i = 0; i < n; ++i) {
        const Stored rounded = Codec::store(sums[i]);
        std::memcpy(target + (begin + i) * kSize, &rounded, kSize);
      }
    }
  }
}

#if defined(TPFUSE_SHM_HAVE_X86_KERNELS)

// GCC 12 warns about the deliberately undefined vectors inside its own
// AVX-512 intrinsics (_mm512_undefined_*) once they are inlined here.
#pragma GCC diagnostic push
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

#define TPFUSE_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c")))

template <DType kType>
TPFUSE_AVX512_TARGET inline __m512 load16(const std::byte* at, __mmask16 mask) {
  if constexpr (kType == DType::f16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, at));
  } else if constexpr (kType == DType::bf16) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, at)), 16));
  } else {
    return _mm512_maskz_loadu_ps(mask, at);
  }
}

// Round to nearest even, keeping NaNs NaN and quiet, as f32_to_bf16 does.
TPFUSE_AVX512_TARGET inline __m256i round_to_bf16(__m512 sum) {
  const __m512i bits = _mm512_castps_si512(sum);
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f800000));
  const __m512i lowest_kept = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lowest_kept)), 16);
  const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet_nan));
}

template <DType kType>
TPFUSE_AVX512_TARGET inline void store16(std::byte* at, __m512 sum, __mmask16 mask) {
  if constexpr (kType == DType::f16) {
    _mm256_mask_storeu_epi16(at, mask,
                             _mm512_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else if constexpr (kType == DType::bf16) {
    _mm256_mask_storeu_epi16(at, mask, round_to_bf16(sum));
  } else {
    _mm512_mask_storeu_ps(at, mask, sum);
  }
}

// The rare path: NaN lanes get their NaN by the rule, lane by lane.
TPFUSE_AVX512_TARGET __m512 replace_nans(DType dtype, std::span<const std::byte* const> sources,
                                         std::size_t begin, __m512 sums, __mmask16 nan) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sums);
  for (int lane = 0; lane < 16; ++lane) {
    if ((nan >> lane) & 1)
      lanes[lane] = rank_order_nan(dtype, sources, begin + static_cast<std::size_t>(lane));
  }
  return _mm512_load_ps(lanes);
}

// A full vector to an address aligned to its size, around the caches.
template <DType kType>
TPFUSE_AVX512_TARGET inline void stream16(std::byte* at, __m512 sum) {
  if constexpr (kType == DType::f16) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(at),
                        _mm512_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else if constexpr (kType == DType::bf16) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(at), round_to_bf16(sum));
  } else {
    _mm512_stream_ps(reinterpret_cast<float*>(at), sum);
  }
}

// `kVectors` vectors of 16 elements from `begin`, summed over the ranks in
// registers; the last vector may be partial (`tail_mask`). kStream: `out`
// is aligned for stream16 and every vector is full.
template <DType kType, int kVectors, bool kStream = false>
TPFUSE_AVX512_TARGET inline void sum_vectors(std::span<const std::byte* const> sources,
                                             std::size_t begin, __mmask16 tail_mask, std::byte* out,
                                             std::byte* second_out) {
  constexpr std::size_t kSize = dtype_size(kType);
  __m512 sums[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    const __mmask16 mask = v + 1 == kVectors ? tail_mask : __mmask16{0xffff};
    sums[v] = load16<kType>(sources[0] + (begin + 16 * v) * kSize, mask);
  }
  for (std::size_t r = 1; r < sources.size(); ++r) {
    for (int v = 0; v < kVectors; ++v) {
      const __mmask16 mask = v + 1 == kVectors ? tail_mask : __mmask16{0xffff};
      sums[v] = _mm512_add_ps(sums[v], load16<kType>(sources[r] + (begin + 16 * v) * kSize, mask));
    }
  }
  for (int v = 0; v < kVectors; ++v) {
    const __mmask16 mask = v + 1 == kVectors ? tail_mask : __mmask16{0xffff};
    const __mmask16 nan = _mm512_mask_cmp_ps_mask(mask, sums[v], sums[v], _CMP_UNORD_Q);
    if (nan != 0) sums[v] = replace_nans(kType, sources, begin + 16 * v, sums[v], nan);
  }
  for (int v = 0; v < kVectors; ++v) {
    const __mmask16 mask = v + 1 == kVectors ? tail_mask : __mmask16{0xffff};
    if constexpr (kStream) {
      stream16<kType>(out + (begin + 16 * v) * kSize, sums[v]);
    } else {
      store16<kType>(out + (begin + 16 * v) * kSize, sums[v], mask);
    }
    if (second_out != nullptr) store16<kType>(second_out + (begin + 16 * v) * kSize, sums[v], mask);
  }
}

template <DType kType>
TPFUSE_AVX512_TARGET void sum_tail(std::span<const std::byte* const> sources, std::size_t begin,
                                   std::size_t end, std::byte* out, std::byte* second_out) {
  for (; begin < end; begin += 16) {
    const std::size_t left = end - begin;
    const auto mask = static_cast<__mmask16>(left >= 16 ? 0xffff : (1u << left) - 1);
    sum_vectors<kType, 1>(sources, begin, mask, out, second_out);
  }
}

// Four vectors at a time: enough loads in flight to keep the memory busy.
// Streaming starts where `out` is 64-byte aligned; the elements before go
// through the caches.
template <DType kType>
TPFUSE_AVX512_TARGET void sum_avx512(std::span<const std::byte* const> sources, std::size_t count,
                                     std::byte* out, std::byte* second_out, OutputStore out_store) {
  constexpr std::size_t kSize = dtype_size(kType);
  const auto address = reinterpret_cast<std::uintptr_t>(out);
  const bool stream = out_store == OutputStore::streaming && address % kSize == 0;
  std::size_t begin = stream ? std::min(count, (64 - address % 64) % 64 / kSize) : 0;
  sum_tail<kType>(sources, 0, begin, out, second_out);
  for (; begin + 64 <= count; begin += 64) {
    if (stream) {
      sum_vectors<kType, 4, true>(sources, begin, 0xffff, out, second_out);
    } else {
      sum_vectors<kType, 4>(sources, begin, 0xffff, out, second_out);
    }
  }
  sum_tail<kType>(sources, begin, count, out, second_out);
  if (stream) _mm_sfence();
}

TPFUSE_AVX512_TARGET void stream_copy(std::byte* out, const std::byte* in, std::size_t bytes) {
  const std::size_t head = std::min(bytes, (64 - reinterpret_cast<std::uintptr_t>(out) % 64) % 64);
  std::memcpy(out, in, head);
  std::size_t done = head;
  for (; done + 64 <= bytes; done += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(out + done), _mm512_loadu_si512(in + done));
  }
  std::memcpy(out + done, in + done, bytes - done);
  _mm_sfence();
}

#define TPFUSE_AVX2_TARGET __attribute__((target("avx2,f16c")))

template <DType kType>
TPFUSE_AVX2_TARGET inline __m256 load8(const std::byte* at) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
  if constexpr (kType == DType::f16) {
    return _mm256_cvtph_ps(halves);
  } else if constexpr (kType == DType::bf16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
  } else {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(at));
  }
}

// As round_to_bf16 above, eight lanes.
TPFUSE_AVX2_TARGET inline __m128i round8_to_bf16(__m256 sum) {
  const __m256i bits = _mm256_castps_si256(sum);
  const __m256i magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  const __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
  const __m256i high = _mm256_srli_epi32(bits, 16);
  const __m256i lowest_kept = _mm256_and_si256(high, _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lowest_kept)), 16);
  const __m256i quiet_nan = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
  const __m256i chosen = _mm256_blendv_epi8(rounded, quiet_nan, nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(chosen), _mm256_extracti128_si256(chosen, 1));
}

// kStream: around the caches, to an address aligned to the vector's size.
template <DType kType, bool kStream>
TPFUSE_AVX2_TARGET inline void store8(std::byte* at, __m256 sum) {
  if constexpr (kType == DType::f32) {
    if constexpr (kStream) {
      _mm256_stream_ps(reinterpret_cast<float*>(at), sum);
    } else {
      _mm256_storeu_ps(reinterpret_cast<float*>(at), sum);
    }
  } else {
    const __m128i halves = kType == DType::f16
                               ? _mm256_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                               : round8_to_bf16(sum);
    if constexpr (kStream) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(at), halves);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(at), halves);
    }
  }
}

TPFUSE_AVX2_TARGET __m256 replace_nans8(DType dtype, std::span<const std::byte* const> sources,
                                        std::size_t begin, __m256 sums, int nan) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sums);
  for (int lane = 0; lane < 8; ++lane) {
    if ((nan >> lane) & 1)
      lanes[lane] = rank_order_nan(dtype, sources, begin + static_cast<std::size_t>(lane));
  }
  return _mm256_load_ps(lanes);
}

// `kVectors` whole vectors of 8 elements from `begin`, summed over the ranks
// in registers.
template <DType kType, int kVectors, bool kStream = false>
TPFUSE_AVX2_TARGET inline void sum_vectors8(std::span<const std::byte* const> sources,
                                            std::size_t begin, std::byte* out,
                                            std::byte* second_out) {
  constexpr std::size_t kSize = dtype_size(kType);
  __m256 sums[kVectors];
  for (int v = 0; v < kVectors; ++v) sums[v] = load8<kType>(sources[0] + (begin + 8 * v) * kSize);
  for (std::size_t r = 1; r < sources.size(); ++r) {
    for (int v = 0; v < kVectors; ++v)
      sums[v] = _mm256_add_ps(sums[v], load8<kType>(sources[r] + (begin + 8 * v) * kSize));
  }
  for (int v = 0; v < kVectors; ++v) {
    const int nan = _mm256_movemask_ps(_mm256_cmp_ps(sums[v], sums[v], _CMP_UNORD_Q));
    if (nan != 0) sums[v] = replace_nans8(kType, sources, begin + 8 * v, sums[v], nan);
  }
  for (int v = 0; v < kVectors; ++v) {
    store8<kType, kStream>(out + (begin + 8 * v) * kSize, sums[v]);
    if (second_out != nullptr) store8<kType, false>(second_out + (begin + 8 * v) * kSize, sums[v]);
  }
}

// As sum_avx512: four vectors at a time, streaming from where `out` is
// 64-byte aligned; whole vectors after those, then the last elements as the
// portable kernel sums them.
template <DType kType>
TPFUSE_AVX2_TARGET void sum_avx2(std::span<const std::byte* const> sources, std::size_t count,
                                 std::byte* out, std::byte* second_out, OutputStore out_store) {
  constexpr std::size_t kSize = dtype_size(kType);
  const auto address = reinterpret_cast<std::uintptr_t>(out);
  const bool stream = out_store == OutputStore::streaming && address % kSize == 0;
  std::size_t begin = stream ? std::min(count, (64 - address % 64) % 64 / kSize) : 0;
  sum_portable<CodecFor<kType>>(sources, 0, begin, out, second_out);
  for (; begin + 32 <= count; begin += 32) {
    if (stream) {
      sum_vectors8<kType, 4, true>(sources, begin, out, second_out);
    } else {
      sum_vectors8<kType, 4>(sources, begin, out, second_out);
    }
  }
  for (; begin + 8 <= count; begin += 8) sum_vectors8<kType, 1>(sources, begin, out, second_out);
  sum_portable<CodecFor<kType>>(sources, begin, count, out, second_out);
  if (stream) _mm_sfence();
}

TPFUSE_AVX2_TARGET void stream_copy_avx2(std::byte* out, const std::byte* in, std::size_t bytes) {
  const std::size_t head = std::min(bytes, (32 - reinterpret_cast<std::uintptr_t>(out) % 32) % 32);
  std::memcpy(out, in, head);
  std::size_t done = head;
  for (; done + 32 <= bytes; done += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(out + done),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + done)));
  }
  std::memcpy(out + done, in + done, bytes - done);
  _mm_sfence();
}

#pragma GCC diagnostic pop

#endif

void require_float(DType dtype) {
  if (!is_floating(dtype))
    throw InternalError(cat("all-reduce: no sum for dtype ", dtype_name(dtype)));
}

}  // namespace

void sum_in_rank_order_portable(DType dtype, std::span<const std::byte* const> sources,
                                std::size_t count, std::byte* out, std::byte* second_out) {
  require_float(dtype);
  switch (dtype) {
    case DType::f16:
      return sum_portable<F16Codec>(sources, 0, count, out, second_out);
    case DType::bf16:
      return sum_portable<BF16Codec>(sources, 0, count, out, second_out);
    default:
      return sum_portable<F32Codec>(sources, 0, count, out, second_out);
  }
}

void sum_in_rank_order_at(IsaLevel level, DType dtype, std::span<const std::byte* const> sources,
                          std::size_t count, std::byte* out, std::byte* second_out,
                          OutputStore out_store) {
  require_float(dtype);
#if defined(TPFUSE_SHM_HAVE_X86_KERNELS)
  if (level >= IsaLevel::avx512) {
    switch (dtype) {
      case DType::f16:
        return sum_avx512<DType::f16>(sources, count, out, second_out, out_store);
      case DType::bf16:
        return sum_avx512<DType::bf16>(sources, count, out, second_out, out_store);
      default:
        return sum_avx512<DType::f32>(sources, count, out, second_out, out_store);
    }
  }
  if (level >= IsaLevel::avx2) {
    switch (dtype) {
      case DType::f16:
        return sum_avx2<DType::f16>(sources, count, out, second_out, out_store);
      case DType::bf16:
        return sum_avx2<DType::bf16>(sources, count, out, second_out, out_store);
      default:
        return sum_avx2<DType::f32>(sources, count, out, second_out, out_store);
    }
  }
#endif
  sum_in_rank_order_portable(dtype, sources, count, out, second_out);
}

void sum_in_rank_order(DType dtype, std::span<const std::byte* const> sources, std::size_t count,
                       std::byte* out, std::byte* second_out, OutputStore out_store) {
  sum_in_rank_order_at(active_isa(), dtype, sources, count, out, second_out, out_store);
}

void copy_to_output(std::byte* out, const std::byte* in, std::size_t bytes, OutputStore out_store) {
  if (bytes == 0) return;
#if defined(TPFUSE_SHM_HAVE_X86_KERNELS)
  if (out_store == OutputStore::streaming && active_isa() >= IsaLevel::avx512)
    return stream_copy(out, in, bytes);
  if (out_store == OutputStore::streaming && active_isa() >= IsaLevel::avx2)
    return stream_copy_avx2(out, in, bytes);
#endif
  std::memcpy(out, in, bytes);
}

const char* sum_kernel_name(IsaLevel level) {
#if defined(TPFUSE_SHM_HAVE_X86_KERNELS)
  if (level >= IsaLevel::avx512) return "avx512";
  if (level >= IsaLevel::avx2) return "avx2";
#endif
  return "portable";
}

const char* sum_kernel_name() { return sum_kernel_name(active_isa()); }

}  // namespace tpfuse::comm::shm
