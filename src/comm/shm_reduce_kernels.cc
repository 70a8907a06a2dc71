// The rank-order sum: a portable version and an AVX-512 one, chosen once.
//
// Both work through the data in blocks of fp32 accumulators that stay in L1:
// acc = x_0, then acc += x_r for r = 1..p-1, then one rounding. Blocking and
// vector width change only which elements are in flight together, never the
// order of one element's additions, so the two give the same bits (the tests
// hold them to it). The vector kernel rounds to bf16 with integer arithmetic
// rather than VCVTNEPS2BF16, which flushes subnormals.
#include "comm/shm_reduce_kernels.h"

#include <algorithm>
#include <cstring>

#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define TPFUSE_SHM_HAVE_AVX512_KERNEL 1
#endif

namespace tpfuse::comm::shm {

namespace {

constexpr std::size_t kBlock = 512;

struct F32Codec {
  using Stored = float;
  static float load(float value) { return value; }
  static float store(float value) { return value; }
};

struct F16Codec {
  using Stored = Half;
  static float load(Half value) { return f16_to_f32(value); }
  static Half store(float value) { return f32_to_f16(value); }
};

struct BF16Codec {
  using Stored = BFloat16;
  static float load(BFloat16 value) { return bf16_to_f32(value); }
  static BFloat16 store(float value) { return f32_to_bf16(value); }
};

// Element loads and stores go through memcpy: no buffer need be aligned.
template <class Codec>
void sum_portable(std::span<const std::byte* const> sources, std::size_t count, std::byte* out,
                  std::byte* second_out) {
  using Stored = typename Codec::Stored;
  constexpr std::size_t kSize = sizeof(Stored);
  float sums[kBlock];
  for (std::size_t begin = 0; begin < count; begin += kBlock) {
    const std::size_t n = std::min(kBlock, count - begin);
    for (std::size_t r = 0; r < sources.size(); ++r) {
      const std::byte* in = sources[r] + begin * kSize;
      for (std::size_t i = 0; i < n; ++i) {
        Stored value;
        std::memcpy(&value, in + i * kSize, kSize);
        sums[i] = r == 0 ? Codec::load(value) : sums[i] + Codec::load(value);
      }
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

#if defined(TPFUSE_SHM_HAVE_AVX512_KERNEL)

// GCC 12 warns about the deliberately undefined vectors inside its own
// AVX-512 intrinsics (_mm512_undefined_*) once they are inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define TPFUSE_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c")))

TPFUSE_AVX512_TARGET __m512 load16(DType dtype, const std::byte* at, __mmask16 mask) {
  switch (dtype) {
    case DType::f16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, at));
    case DType::bf16:
      return _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, at)), 16));
    default:
      return _mm512_maskz_loadu_ps(mask, at);
  }
}

// Round to nearest even, keeping NaNs NaN and quiet, as f32_to_bf16 does.
TPFUSE_AVX512_TARGET __m256i round_to_bf16(__m512 sum) {
  const __m512i bits = _mm512_castps_si512(sum);
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f800000));
  const __m512i lowest_kept = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lowest_kept)), 16);
  const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet_nan));
}

TPFUSE_AVX512_TARGET void store16(DType dtype, std::byte* at, __m512 sum, __mmask16 mask) {
  switch (dtype) {
    case DType::f16:
      _mm256_mask_storeu_epi16(at, mask, _mm512_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return;
    case DType::bf16:
      _mm256_mask_storeu_epi16(at, mask, round_to_bf16(sum));
      return;
    default:
      _mm512_mask_storeu_ps(at, mask, sum);
      return;
  }
}

TPFUSE_AVX512_TARGET void sum_avx512(DType dtype, std::span<const std::byte* const> sources,
                                     std::size_t count, std::byte* out, std::byte* second_out) {
  const std::size_t size = dtype_size(dtype);
  alignas(64) float sums[kBlock];
  for (std::size_t begin = 0; begin < count; begin += kBlock) {
    const std::size_t n = std::min(kBlock, count - begin);
    for (std::size_t r = 0; r < sources.size(); ++r) {
      const std::byte* in = sources[r] + begin * size;
      for (std::size_t i = 0; i < n; i += 16) {
        const auto mask = static_cast<__mmask16>(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1);
        const __m512 value = load16(dtype, in + i * size, mask);
        _mm512_store_ps(sums + i, r == 0 ? value : _mm512_add_ps(_mm512_load_ps(sums + i), value));
      }
    }
    for (std::byte* target : {out, second_out}) {
      if (target == nullptr) continue;
      for (std::size_t i = 0; i < n; i += 16) {
        const auto mask = static_cast<__mmask16>(n - i >= 16 ? 0xffff : (1u << (n - i)) - 1);
        store16(dtype, target + (begin + i) * size, _mm512_load_ps(sums + i), mask);
      }
    }
  }
}

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

#pragma GCC diagnostic pop

#endif

void require_float(DType dtype) {
  if (!is_floating(dtype)) throw InternalError(cat("all-reduce: no sum for dtype ", dtype_name(dtype)));
}

}  // namespace

void sum_in_rank_order_portable(DType dtype, std::span<const std::byte* const> sources,
                                std::size_t count, std::byte* out, std::byte* second_out) {
  require_float(dtype);
  switch (dtype) {
    case DType::f16:
      return sum_portable<F16Codec>(sources, count, out, second_out);
    case DType::bf16:
      return sum_portable<BF16Codec>(sources, count, out, second_out);
    default:
      return sum_portable<F32Codec>(sources, count, out, second_out);
  }
}

void sum_in_rank_order(DType dtype, std::span<const std::byte* const> sources, std::size_t count,
                       std::byte* out, std::byte* second_out) {
  require_float(dtype);
#if defined(TPFUSE_SHM_HAVE_AVX512_KERNEL)
  if (cpu_has_avx512()) return sum_avx512(dtype, sources, count, out, second_out);
#endif
  sum_in_rank_order_portable(dtype, sources, count, out, second_out);
}

const char* sum_kernel_name() {
#if defined(TPFUSE_SHM_HAVE_AVX512_KERNEL)
  if (cpu_has_avx512()) return "avx512";
#endif
  return "portable";
}

}  // namespace tpfuse::comm::shm
