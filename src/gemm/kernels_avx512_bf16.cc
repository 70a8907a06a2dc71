// The bf16 pair kernels (pair_kernels.h), written with AVX512-BF16 intrinsics
// and compiled with those flags for this file alone (CMakeLists.txt). The
// register tile is MR = 6 rows by NR = 64 columns: 24 accumulators, four B
// vectors and one broadcast A pair per step of k, ten loads for 24 dot
// products (a 14 x 32 tile needs 16 for 28, and ran 1-3% slower at 2048^3 on
// Zen 5). Besides the packed-B tile kernel: B read in place from a row-major
// x2 (rows interleaved in registers) or from a transposed one (16 x 16
// transposes in registers), for few rows; or from int8 pairs (a packed int8
// weight, half the bytes) dequantized in registers. All build the words
// pack_b stores and add them in the same order, so every path gives the
// same bits.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "gemm/pair_kernels.h"

#ifndef __AVX512BF16__
#error "kernels_avx512_bf16.cc must be compiled with -mavx512bf16"
#endif

// GCC 12's conversion and shift intrinsics start from an undefined vector,
// which its -Wmaybe-uninitialized (or, inlined deep enough,
// -Wuninitialized) reports in every caller.
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace tpfuse::gemm {

namespace {

constexpr int kLanes = 16;
constexpr int kMR = 6;
constexpr int kVecs = 4;
constexpr int kNR = kVecs * kLanes;
constexpr int kI8Rows = 2 * kMR;
// Pairs ahead of the int8 kernel's loads that it prefetches.
constexpr int kPrefetchPairs = 32;

inline __m512bh as_pairs(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// What a transposed x2 holds: bf16, or int8 to dequantize (with or without
// offsets).
enum class Format { bf16, i8, i8_offset };

// The epilogue of microkernel.h on 16 columns of a tile row, from registers,
// for a bf16 output (the pair engine's): bias, then x3, then one rounding to
// nearest even, bit for bit as finish_f32 does it (vcvtneps2bf16 would flush
// a subnormal result to zero).
inline void finish_bf16(__m512 sum, const TileEpilogue& e, int row, int column) {
  if (e.bias != nullptr) sum = _mm512_add_ps(sum, _mm512_loadu_ps(e.bias + column));
  if (e.x3 != nullptr) {
    const auto* x3 = static_cast<const std::uint16_t*>(e.x3) + row * e.x3_ld + column;
    const __m512i widened = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x3)));
    sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(widened, 16)));
  }
  const __m512i bits = _mm512_castps_si512(sum);
  const __m512i lowest_kept = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lowest_kept, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_epi32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                              _mm512_set1_epi32(0x7f800000), _MM_CMPINT_NLE);
  const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  const __m512i result = _mm512_mask_mov_epi32(rounded, nan, quiet_nan);
  auto* dst = static_cast<std::uint16_t*>(e.dst) + row * e.dst_ld + column;
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(result));
}

// A tile's sums (kCols vectors of columns a row): stored to acc (more steps
// of k follow), or finished by the epilogue into the output (nr columns of it).
template <int kRows, int kCols = kVecs>
inline void finish_tile(const __m512 (&acc)[kRows][kCols], float* sums_out, std::int64_t acc_ld,
                        const TileEpilogue* epilogue, int nr) {
  if (epilogue == nullptr) {
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < kCols; ++v)
        _mm512_storeu_ps(sums_out + i * acc_ld + v * kLanes, acc[i][v]);
    }
    return;
  }
  const TileEpilogue& e = *epilogue;
  if (nr == kCols * kLanes && e.out_dtype == DType::bf16) {
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < kCols; ++v) finish_bf16(acc[i][v], e, i, v * kLanes);
    }
    return;
  }
  alignas(64) float sums[kRows * kCols * kLanes];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kCols; ++v) _mm512_store_ps(sums + (i * kCols + v) * kLanes, acc[i][v]);
  }
  avx512_kernels().finish_f32(kRows, nr, sums, kCols * kLanes, e);
}

template <int kRows>
void pair_tile(const PairTile& t) {
  __m512 acc[kRows][kVecs];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      acc[i][v] = t.accumulate ? _mm512_loadu_ps(t.acc + i * t.acc_ld + v * kLanes) : _mm512_setzero_ps();
    }
  }
  const std::uint32_t* a = t.a;
  const std::uint32_t* b = t.b;
  for (std::int64_t p = 0; p < t.kp; ++p) {
    __m512bh b_pairs[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) b_pairs[v] = as_pairs(_mm512_load_si512(b + v * kLanes));
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const __m512bh pair = as_pairs(_mm512_set1_epi32(static_cast<int>(a[i])));
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], pair, b_pairs[v]);
    }
    a += kMR;
    b += kNR;
  }
  finish_tile<kRows>(acc, t.acc, t.acc_ld, t.epilogue, t.nr);
}

template <std::size_t... kRowsMinusOne>
void set_tiles(PairKernel* by_rows, std::index_sequence<kRowsMinusOne...>) {
  ((by_rows[kRowsMinusOne] = &pair_tile<static_cast<int>(kRowsMinusOne) + 1>), ...);
}

void pack_a(const void* x1, std::int64_t ld, int rows, std::int64_t k, std::uint32_t* out) {
  const auto* x = static_cast<const std::uint16_t*>(x1);
  const std::int64_t whole = k / 2;
  for (int i = 0; i < rows; ++i) {
    const std::uint16_t* row = x + i * ld;
    for (std::int64_t p = 0; p < whole; ++p) {
      std::uint32_t pair;
      std::memcpy(&pair, row + 2 * p, sizeof pair);
      out[p * kMR + i] = pair;
    }
    if (k % 2 != 0) out[whole * kMR + i] = row[k - 1];
  }
}

// Columns 0-15 (then 16-31) of two rows of 32 bf16 as pairs: the even k's
// value in the low half of each word, the odd k's in the high half. (No
// vector constant at namespace scope: its initialiser would run, with
// AVX-512 instructions, on every CPU that loads the library.)
inline __m512i interleave_low(__m512i even, __m512i odd) {
  const __m512i index = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  return _mm512_permutex2var_epi16(even, index, odd);
}

inline __m512i interleave_high(__m512i even, __m512i odd) {
  const __m512i index = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24,
                                         55, 23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  return _mm512_permutex2var_epi16(even, index, odd);
}

inline void store_pairs(__m512i even, __m512i odd, std::uint32_t* out) {
  _mm512_store_si512(out, interleave_low(even, odd));
  _mm512_store_si512(out + kLanes, interleave_high(even, odd));
}

// Row l of a row-major block as 32 bf16 (zero past cols).
inline __m512i load_bf16_row(const PairBSource& src, std::int64_t l, __mmask32 cols) {
  return _mm512_maskz_loadu_epi16(cols, static_cast<const std::uint16_t*>(src.data) + l * src.stride_k);
}

// Row l of a row-major int8 block, dequantized and rounded to 32 bf16.
inline __m512i load_i8_row(const PairBSource& src, std::int64_t l, __mmask32 cols) {
  const __m256i q = _mm256_maskz_loadu_epi8(cols, static_cast<const std::int8_t*>(src.data) + l * src.stride_k);
  __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
  __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
  if (src.offset != nullptr) {
    low = _mm512_add_ps(low, _mm512_loadu_ps(src.offset));
    high = _mm512_add_ps(high, _mm512_loadu_ps(src.offset + kLanes));
  }
  low = _mm512_mul_ps(low, _mm512_loadu_ps(src.scale));
  high = _mm512_mul_ps(high, _mm512_loadu_ps(src.scale + kLanes));
  // Columns past cols are zero, whatever the scale (an infinite one would
  // make them NaN).
  const __m512i pairs = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));
  return _mm512_maskz_mov_epi16(cols, pairs);
}

// NR columns as groups of 32 (a mask of those that exist, a source shifted
// to the group's first column).
void pack_b_rows(const PairBSource& src, std::uint32_t* out) {
  const bool int8 = src.dtype == DType::i8;
  for (int group = 0; group < kNR; group += 32) {
    PairBSource part = src;
    part.data = static_cast<const unsigned char*>(src.data) + group * (int8 ? 1 : 2);
    if (int8) {
      part.scale = src.scale + group;
      part.offset = src.offset != nullptr ? src.offset + group : nullptr;
    }
    const int left = src.cols - group;
    const __mmask32 cols = left >= 32 ? ~__mmask32{0} : left <= 0 ? 0 : (__mmask32{1} << left) - 1;
    for (std::int64_t l = 0; l < src.rows; l += 2) {
      const __m512i even = int8 ? load_i8_row(part, l, cols) : load_bf16_row(part, l, cols);
      __m512i odd = _mm512_setzero_si512();
      if (l + 1 < src.rows) odd = int8 ? load_i8_row(part, l + 1, cols) : load_bf16_row(part, l + 1, cols);
      store_pairs(even, odd, out + (l / 2) * kNR + group);
    }
  }
}

// The tile kernel with B read from a row-major x2 in place: each pair of
// rows interleaved into pair vectors in registers (the words pack_b_rows
// would store), so the sums are the same bits.
template <int kRows, Format kFormat>
void pair_rows_tile(const PairRowsTile& t) {
  __m512 acc[kRows][kVecs];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) {
      acc[i][v] = t.accumulate ? _mm512_loadu_ps(t.acc + i * t.acc_ld + v * kLanes) : _mm512_setzero_ps();
    }
  }
  __mmask32 cols[kNR / 32];
  PairBSource part[kNR / 32];
#pragma GCC unroll 4
  for (int g = 0; g < kNR / 32; ++g) {
    const int left = t.b.cols - 32 * g;
    cols[g] = left >= 32 ? ~__mmask32{0} : left <= 0 ? 0 : (__mmask32{1} << left) - 1;
    part[g] = t.b;
    part[g].data = static_cast<const unsigned char*>(t.b.data) + 32 * g * (kFormat == Format::bf16 ? 2 : 1);
    if constexpr (kFormat != Format::bf16) {
      part[g].scale = t.b.scale + 32 * g;
      if constexpr (kFormat == Format::i8_offset) part[g].offset = t.b.offset + 32 * g;
    }
  }
  const std::uint32_t* a = t.a;
  for (std::int64_t p = 0; p < t.kp; ++p) {
    __m512bh b_pairs[kVecs];
#pragma GCC unroll 4
    for (int g = 0; g < kNR / 32; ++g) {
      const std::int64_t l = 2 * p;
      const __m512i even = kFormat == Format::bf16 ? load_bf16_row(part[g], l, cols[g]) : load_i8_row(part[g], l, cols[g]);
      __m512i odd = _mm512_setzero_si512();
      if (l + 1 < t.b.rows) {
        odd = kFormat == Format::bf16 ? load_bf16_row(part[g], l + 1, cols[g]) : load_i8_row(part[g], l + 1, cols[g]);
      }
      b_pairs[2 * g] = as_pairs(interleave_low(even, odd));
      b_pairs[2 * g + 1] = as_pairs(interleave_high(even, odd));
    }
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const __m512bh pair = as_pairs(_mm512_set1_epi32(static_cast<int>(a[i])));
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], pair, b_pairs[v]);
    }
    a += kMR;
  }
  finish_tile<kRows>(acc, t.acc, t.acc_ld, t.epilogue, t.b.cols);
}

template <Format kFormat, std::size_t... kRowsMinusOne>
void set_rows(PairRowsKernel* by_rows, std::index_sequence<kRowsMinusOne...>) {
  ((by_rows[kRowsMinusOne] = &pair_rows_tile<static_cast<int>(kRowsMinusOne) + 1, kFormat>), ...);
}

// 16 pairs of column j of a transposed block (its values contiguous along k)
// from row l, `count` <= 32 values of k (the rest zero), as one vector.
inline __m512i column_pairs(const PairBSource& src, int j, std::int64_t l, std::int64_t count) {
  const __mmask32 real = count >= 32 ? ~__mmask32{0} : (__mmask32{1} << count) - 1;
  if (src.dtype != DType::i8) {
    return _mm512_maskz_loadu_epi16(real, static_cast<const std::uint16_t*>(src.data) + j * src.stride_n + l);
  }
  const __m256i q = _mm256_maskz_loadu_epi8(real, static_cast<const std::int8_t*>(src.data) + j * src.stride_n + l);
  __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
  __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
  if (src.offset != nullptr) {
    low = _mm512_add_ps(low, _mm512_set1_ps(src.offset[j]));
    high = _mm512_add_ps(high, _mm512_set1_ps(src.offset[j]));
  }
  low = _mm512_mul_ps(low, _mm512_set1_ps(src.scale[j]));
  high = _mm512_mul_ps(high, _mm512_set1_ps(src.scale[j]));
  // Values past the block are zero, whatever the scale and offset.
  return _mm512_maskz_mov_epi16(real, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low)));
}

// Transposes 16 x 16 words: v[r] word c becomes v[c] word r.
inline void transpose_16x16(__m512i (&v)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Each 128-bit lane q of v[4g + r] now holds words (4g .. 4g + 3) x (4q + r'):
  // gather the lanes so that v[c] holds column word c of all 16 rows.
  for (int i = 0; i < 8; ++i) {
    const int a = (i / 4) * 8 + i % 4;
    t[a] = _mm512_shuffle_i32x4(v[a], v[a + 4], 0x88);
    t[a + 4] = _mm512_shuffle_i32x4(v[a], v[a + 4], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    const int r = (i / 4) * 4 + i % 4;
    v[r] = _mm512_shuffle_i32x4(t[r], t[r + 8], 0x88);
    v[r + 8] = _mm512_shuffle_i32x4(t[r], t[r + 8], 0xdd);
  }
}

// A transposed block: 16 columns x 16 pairs at a time, each column's pairs
// loaded as one vector and the 16 vectors transposed into 16 pair rows.
void pack_b_columns(const PairBSource& src, std::uint32_t* out) {
  const std::int64_t pairs = (src.rows + 1) / 2;
  for (int group = 0; group < kNR; group += 16) {
    for (std::int64_t p0 = 0; p0 < pairs; p0 += 16) {
      __m512i v[16];
      for (int j = 0; j < 16; ++j) {
        v[j] = group + j < src.cols ? column_pairs(src, group + j, 2 * p0, src.rows - 2 * p0) : _mm512_setzero_si512();
      }
      transpose_16x16(v);
      const std::int64_t count = pairs - p0 < 16 ? pairs - p0 : 16;
      for (std::int64_t t = 0; t < count; ++t) _mm512_store_si512(out + (p0 + t) * kNR + group, v[t]);
    }
  }
}

// 16 pairs of a whole block of column j (32 values of k from l), for the
// loop's common case: no masks, no branches on the format.
template <Format kFormat>
inline __m512i full_column_pairs(const PairBSource& src, int j, std::int64_t l) {
  if constexpr (kFormat == Format::bf16) {
    return _mm512_loadu_si512(static_cast<const std::uint16_t*>(src.data) + j * src.stride_n + l);
  } else {
    const auto* q = static_cast<const std::int8_t*>(src.data) + j * src.stride_n + l;
    __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
    __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
    if constexpr (kFormat == Format::i8_offset) {
      const __m512 offset = _mm512_set1_ps(src.offset[j]);
      low = _mm512_add_ps(low, offset);
      high = _mm512_add_ps(high, offset);
    }
    const __m512 scale = _mm512_set1_ps(src.scale[j]);
    return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_mul_ps(high, scale), _mm512_mul_ps(low, scale)));
  }
}

template <int kRows, Format kFormat>
void pair_columns_tile(const PairColumnsTile& t) {
  __m512 acc[kRows];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
  const std::int64_t pairs = (t.k + 1) / 2;
  PairBSource w = t.w;
  for (std::int64_t p0 = 0; p0 < pairs; p0 += 16) {
    if constexpr (kFormat != Format::bf16) {
      const std::int64_t group = 2 * p0 / t.group_rows;
      w.scale = t.w.scale + group * t.scale_ld;
      if constexpr (kFormat == Format::i8_offset) w.offset = t.w.offset + group * t.scale_ld;
    }
    __m512i v[16];
    if (w.cols == 16 && 2 * p0 + 32 <= t.k) {
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) v[j] = full_column_pairs<kFormat>(w, j, 2 * p0);
    } else {
      for (int j = 0; j < 16; ++j) {
        v[j] = j < w.cols ? column_pairs(w, j, 2 * p0, t.k - 2 * p0) : _mm512_setzero_si512();
      }
    }
    transpose_16x16(v);
    const int count = pairs - p0 < 16 ? static_cast<int>(pairs - p0) : 16;
    const std::uint32_t* a = t.a + p0 * kMR;
    for (int step = 0; step < count; ++step) {
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i) {
        acc[i] = _mm512_dpbf16_ps(acc[i], as_pairs(_mm512_set1_epi32(static_cast<int>(a[i]))), as_pairs(v[step]));
      }
      a += kMR;
    }
  }
  const TileEpilogue& e = *t.epilogue;
  if (w.cols == 16 && e.out_dtype == DType::bf16) {
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) finish_bf16(acc[i], e, i, 0);
    return;
  }
  alignas(64) float sums[kRows * kLanes];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) _mm512_store_ps(sums + i * kLanes, acc[i]);
  avx512_kernels().finish_f32(kRows, w.cols, sums, kLanes, e);
}

template <Format kFormat, std::size_t... kRowsMinusOne>
void set_columns(PairColumnsKernel* by_rows, std::index_sequence<kRowsMinusOne...>) {
  ((by_rows[kRowsMinusOne] = &pair_columns_tile<static_cast<int>(kRowsMinusOne) + 1, kFormat>), ...);
}

// A group's scales (offsets) of NR columns as the packed int8 pairs line up
// with them: dup[2v] holds columns 16v .. 16v+7, dup[2v + 1] columns 16v+8 ..
// 16v+15, each twice (its even and odd value of k).
inline void duplicate_columns(const float* row, __m512 (&dup)[2 * kVecs]) {
  const __m512i low = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i high = _mm512_add_epi32(low, _mm512_set1_epi32(8));
#pragma GCC unroll 4
  for (int v = 0; v < kVecs; ++v) {
    const __m512 values = _mm512_loadu_ps(row + v * kLanes);
    dup[2 * v] = _mm512_permutexvar_ps(low, values);
    dup[2 * v + 1] = _mm512_permutexvar_ps(high, values);
  }
}

// 16 columns of one packed int8 pair, dequantized and rounded to bf16 pairs
// by load_i8_row's instructions, element for element.
template <bool kOffset>
inline __m512bh dequantize_pairs(const std::int8_t* q, const __m512 (&scale)[2 * kVecs],
                                 const __m512 (&offset)[2 * kVecs], int v) {
  __m512 low = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  __m512 high = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
  if constexpr (kOffset) {
    low = _mm512_add_ps(low, offset[2 * v]);
    high = _mm512_add_ps(high, offset[2 * v + 1]);
  }
  return _mm512_cvtne2ps_pbh(_mm512_mul_ps(high, scale[2 * v + 1]),
                             _mm512_mul_ps(low, scale[2 * v]));
}

// The 16 columns of one packed int8 pair of a panel as bf16 pairs; the half
// pair that ends an odd k keeps only its even value (pack_b stores zero for
// the missing one, not its dequantized zero).
template <bool kOffset>
inline __m512bh panel_pairs(const std::int8_t* q, const __m512 (&scale)[2 * kVecs],
                            const __m512 (&offset)[2 * kVecs], int v, bool half) {
  const __m512bh pairs = dequantize_pairs<kOffset>(q + 2 * v * kLanes, scale, offset, v);
  if (!half) return pairs;
  return as_pairs(_mm512_maskz_mov_epi16(0x55555555u, reinterpret_cast<__m512i>(pairs)));
}

// Columns [first, first + kPanels * kCols * 16) of a PairI8Tile: kRows x
// kPanels x kCols accumulators, so that few rows still keep enough dot
// products in flight (one row of one panel is 4 dependent chains: n = 5632,
// k = 1024 from DRAM took 465 us against bf16's 422 in one run; four panels
// at a time, 301 against 547 in another), and up to 12 rows dequantize each
// weight once (2 vectors a pass). Each sum's order is the pair kernel's.
template <int kRows, int kPanels, int kCols, bool kOffset>
void i8_tile_part(const PairI8Tile& t, std::int64_t first) {
  constexpr int kAcc = kPanels * kCols;
  constexpr int kPanelCols = kCols * kLanes;
  // The part's vectors: panel first / kNR + q, vector (first % kNR) / 16 + u.
  const std::int64_t panel = first / kNR;
  const int v0 = static_cast<int>(first % kNR) / kLanes;
  __m512 acc[kRows][kAcc];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kAcc; ++c) {
      const std::int64_t column = (c / kCols) * kNR + first + (c % kCols) * kLanes;
      acc[i][c] =
          t.accumulate ? _mm512_loadu_ps(t.acc + i * t.acc_ld + column) : _mm512_setzero_ps();
    }
  }
  const std::uint32_t* a = t.a;
  const std::int8_t* b = t.b + panel * t.b_panel_stride;
  const std::int64_t end = t.l0 + 2 * t.kp;
  for (std::int64_t l = t.l0; l < end;) {
    const std::int64_t group = l / t.group_rows;
    const std::int64_t stop = std::min(end, (group + 1) * t.group_rows);
    __m512 scale[kPanels][2 * kVecs], offset[kPanels][2 * kVecs];
#pragma GCC unroll 4
    for (int q = 0; q < kPanels; ++q) {
      duplicate_columns(t.scale + group * t.scale_ld + (panel + q) * kNR, scale[q]);
      if constexpr (kOffset)
        duplicate_columns(t.offset + group * t.scale_ld + (panel + q) * kNR, offset[q]);
    }
    for (; l < stop; l += 2) {
      const bool half = l + 1 == t.k;
      __m512bh b_pairs[kAcc];
#pragma GCC unroll 4
      for (int q = 0; q < kPanels; ++q) {
        // The packed weight comes from DRAM, and a pass over half a panel
        // reads every other cache line, which the prefetchers missed: 8 rows
        // waited on these loads half their time. The first pass fetches
        // both lines of a pair (its step of kp pairs fits L1 for the next).
        if (v0 == 0) {
          const char* ahead =
              reinterpret_cast<const char*>(b + q * t.b_panel_stride) + kPrefetchPairs * 2 * kNR;
          _mm_prefetch(ahead, _MM_HINT_T0);
          _mm_prefetch(ahead + 64, _MM_HINT_T0);
        }
#pragma GCC unroll 4
        for (int u = 0; u < kCols; ++u) {
          b_pairs[q * kCols + u] =
              panel_pairs<kOffset>(b + q * t.b_panel_stride, scale[q], offset[q], v0 + u, half);
        }
      }
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i) {
        // Rows from MR on are packed A's next row panel, kp pairs on.
        const std::uint32_t word = i < kMR ? a[i] : a[kMR * t.kp + i - kMR];
        const __m512bh pair = as_pairs(_mm512_set1_epi32(static_cast<int>(word)));
#pragma GCC unroll 16
        for (int c = 0; c < kAcc; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], pair, b_pairs[c]);
      }
      a += kMR;
      b += 2 * kNR;
    }
  }
  const std::int64_t out_size =
      t.epilogue != nullptr && t.epilogue->out_dtype == DType::f32 ? 4 : 2;
#pragma GCC unroll 4
  for (int q = 0; q < kPanels; ++q) {
    __m512 part[kRows][kCols];
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 4
      for (int u = 0; u < kCols; ++u) part[i][u] = acc[i][q * kCols + u];
    }
    const std::int64_t column = q * kNR + first;
    TileEpilogue epilogue;
    if (t.epilogue != nullptr) {
      epilogue = *t.epilogue;
      if (epilogue.bias != nullptr) epilogue.bias += column;
      if (epilogue.x3 != nullptr)
        epilogue.x3 = static_cast<const char*>(epilogue.x3) + column * out_size;
      epilogue.dst = static_cast<char*>(epilogue.dst) + column * out_size;
    }
    finish_tile<kRows, kCols>(part, t.acc + column, t.acc_ld,
                              t.epilogue != nullptr ? &epilogue : nullptr,
                              static_cast<int>(std::min<std::int64_t>(kPanelCols, t.nr - column)));
  }
}

// Up to 6 rows: whole panels, several at a time for fewer rows; 7 to 12
// rows: 32 columns a pass.
template <int kRows, bool kOffset>
void pair_i8_tile(const PairI8Tile& t) {
  if constexpr (kRows > kMR) {
    for (std::int64_t first = 0; first < std::min<std::int64_t>(t.nr, t.panels * kNR);
         first += 2 * kLanes) {
      i8_tile_part<kRows, 1, 2, kOffset>(t, first);
    }
  } else {
    constexpr int kWide = kRows == 1 ? 4 : kRows == 2 ? 3 : kRows == 3 ? 2 : 1;
    int panel = 0;
    for (; panel + kWide <= t.panels; panel += kWide)
      i8_tile_part<kRows, kWide, kVecs, kOffset>(t, panel * kNR);
    for (; panel < t.panels; ++panel) i8_tile_part<kRows, 1, kVecs, kOffset>(t, panel * kNR);
  }
}

template <bool kOffset, std::size_t... kRowsMinusOne>
void set_i8_tiles(PairI8Kernel* by_rows, std::index_sequence<kRowsMinusOne...>) {
  ((by_rows[kRowsMinusOne] = &pair_i8_tile<static_cast<int>(kRowsMinusOne) + 1, kOffset>), ...);
}

template <bool kOffset>
void expand_i8(const PairI8Tile& t, std::uint32_t* out) {
  const std::int8_t* b = t.b;
  const std::int64_t end = t.l0 + 2 * t.kp;
  for (std::int64_t l = t.l0; l < end;) {
    const std::int64_t group = l / t.group_rows;
    const std::int64_t stop = std::min(end, (group + 1) * t.group_rows);
    __m512 scale[2 * kVecs], offset[2 * kVecs];
    duplicate_columns(t.scale + group * t.scale_ld, scale);
    if constexpr (kOffset) duplicate_columns(t.offset + group * t.scale_ld, offset);
    for (; l < stop; l += 2) {
      // As in i8_tile_part: 16 rows from DRAM took 940-960 us without it,
      // 730-800 with it.
      const char* ahead = reinterpret_cast<const char*>(b) + kPrefetchPairs * 2 * kNR;
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) {
        _mm512_store_si512(out + v * kLanes, reinterpret_cast<__m512i>(panel_pairs<kOffset>(
                                                 b, scale, offset, v, l + 1 == t.k)));
      }
      b += 2 * kNR;
      out += kNR;
    }
  }
}

// A row-major int8 block: each pair of rows interleaved byte by byte.
void pack_b_i8_rows(const PairBSource& src, std::int8_t* out) {
  const __mmask64 cols = src.cols >= 64 ? ~__mmask64{0} : (__mmask64{1} << src.cols) - 1;
  const auto* q = static_cast<const std::int8_t*>(src.data);
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  static_assert(kNR == 64);
  for (std::int64_t l = 0; l < src.rows; l += 2) {
    const __m512i even = _mm512_maskz_loadu_epi8(cols, q + l * src.stride_k);
    const __m512i odd = l + 1 < src.rows ? _mm512_maskz_loadu_epi8(cols, q + (l + 1) * src.stride_k)
                                         : _mm512_setzero_si512();
    // Within each 128-bit lane: columns 16L .. 16L+7 (low), 16L+8 .. 16L+15 (high).
    const __m512i low = _mm512_unpacklo_epi8(even, odd);
    const __m512i high = _mm512_unpackhi_epi8(even, odd);
    std::int8_t* pair = out + l * kNR;
    _mm512_storeu_si512(pair, _mm512_permutex2var_epi64(low, first, high));
    _mm512_storeu_si512(pair + 64, _mm512_permutex2var_epi64(low, second, high));
  }
}

// A transposed int8 block: 16 columns x 32 pairs at a time, two pairs of a
// column as one 32-bit word, transposed 16 x 16 in registers.
void pack_b_i8_columns(const PairBSource& src, std::int8_t* out) {
  const auto* q = static_cast<const std::int8_t*>(src.data);
  const std::int64_t pairs = (src.rows + 1) / 2;
  for (int group = 0; group < kNR; group += kLanes) {
    for (std::int64_t l = 0; l < src.rows; l += 64) {
      const std::int64_t left = src.rows - l;
      const __mmask64 real = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
      __m512i v[16];
      for (int j = 0; j < 16; ++j) {
        v[j] = group + j < src.cols
                   ? _mm512_maskz_loadu_epi8(real, q + (group + j) * src.stride_n + l)
                   : _mm512_setzero_si512();
      }
      transpose_16x16(v);
      for (int u = 0; u < 16; ++u) {
        const std::int64_t p = l / 2 + 2 * u;
        if (p < pairs) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p * 2 * kNR + 2 * group),
                              _mm512_cvtepi32_epi16(v[u]));
        }
        if (p + 1 < pairs) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (p + 1) * 2 * kNR + 2 * group),
                              _mm512_cvtepi32_epi16(_mm512_srli_epi32(v[u], 16)));
        }
      }
    }
  }
}

void pack_b_i8(const PairBSource& src, std::int8_t* out) {
  if (src.stride_n == 1) {
    pack_b_i8_rows(src, out);
  } else {
    pack_b_i8_columns(src, out);
  }
}

void pack_b(const PairBSource& src, std::uint32_t* out) {
  if (src.stride_n == 1) {
    pack_b_rows(src, out);
  } else {
    pack_b_columns(src, out);
  }
}

PairKernelTable make_table() {
  PairKernelTable table;
  table.mr = kMR;
  table.nr = kNR;
  set_tiles(table.tile, std::make_index_sequence<kMR>());
  set_rows<Format::bf16>(table.rows[0], std::make_index_sequence<kMR>());
  set_rows<Format::i8>(table.rows[1], std::make_index_sequence<kMR>());
  set_rows<Format::i8_offset>(table.rows[2], std::make_index_sequence<kMR>());
  set_columns<Format::bf16>(table.columns[0], std::make_index_sequence<kMR>());
  set_columns<Format::i8>(table.columns[1], std::make_index_sequence<kMR>());
  set_columns<Format::i8_offset>(table.columns[2], std::make_index_sequence<kMR>());
  static_assert(kI8Rows <= kMaxMR && kNR % 32 == 0);
  table.pack_a = &pack_a;
  table.pack_b = &pack_b;
  table.i8_rows = kI8Rows;
  set_i8_tiles<false>(table.i8_tile[0], std::make_index_sequence<kI8Rows>());
  set_i8_tiles<true>(table.i8_tile[1], std::make_index_sequence<kI8Rows>());
  table.pack_b_i8 = &pack_b_i8;
  table.expand_i8[0] = &expand_i8<false>;
  table.expand_i8[1] = &expand_i8<true>;
  table.finish = &avx512_kernels();
  return table;
}

}  // namespace

const PairKernelTable& avx512_bf16_pair_kernels() {
  static const PairKernelTable table = make_table();
  return table;
}

}  // namespace tpfuse::gemm
