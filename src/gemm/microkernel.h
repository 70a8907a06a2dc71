// The micro-kernel contract, frozen, and the kernel table of one instruction
// set. The engines' loops (float_gemm.cc, onednn_gemm.cc) are generic; only
// the functions in a KernelTable touch vector registers, and each table lives
// in a file compiled for its instruction set (kernels_*.cc).
//
// The micro-kernel computes one register tile of mr <= MR rows and nr <= NR
// columns over kc steps of k (one kernel per mr, see KernelTable::tile):
//
//   s(i, j) = (accumulate ? acc[i * acc_ld + j] : 0)
//   for l = 0 .. kc-1:  s(i, j) = fma(a[i * kPackedAStride + l], B(l, j), s(i, j))
//
// one fp32 fused multiply-add per step, l ascending, one sum per element. So
// a row's sums never depend on which tile, row block or thread computed them,
// nor on how k was cut into kc blocks (partial sums pass through acc in fp32,
// exactly). Then either the sums go back to acc (more k blocks follow), or
// the epilogue finishes the tile: bias, then x3, then one rounding to the
// output dtype, written to dst.
//
// Integer sums (full quant without a oneDNN int8 kernel): A and B hold int8
// values, so with kc <= 1024 every partial sum is an integer below 2^24 in
// magnitude, exact in fp32. Each kc-step then starts from zero, and its sums
// are added to acc as int32 (wrapping) instead; the epilogue is the full
// quant one on the int32 totals: fp32(total) * scale[j], or with row scales
// fp32(total) * (row_scale[i] * scale[j]). The int32 result is exact, as a
// library's int8 kernel's is.
//
// B(l, j) is read at b + l * b_ld + j for j < NR (all NR columns must be
// readable; columns >= nr are computed and dropped). Its format is the
// kernel's: f32 and f16 convert exactly, bf16 too but for subnormals, which
// count as zero (as in every engine: docs/SEMANTICS.md, numerics); i8 is
// dequantized in fp32 as (q + b_offset[j]) * b_scale[j] (b_offset may be
// null: no offset), the same two roundings the packing code does, and a
// result below 2^-126 in magnitude counts as zero; so a dequantized weight
// has the same bits whether it was packed or read in place.
#pragma once

#include <cstdint>

#include "core/cpu_isa.h"
#include "tpfuse/core/dtype.h"

namespace tpfuse::gemm {

// How B's elements are stored where the micro-kernel reads them.
enum class BFormat : std::uint8_t { f32 = 0, f16 = 1, bf16 = 2, i8 = 3 };
inline constexpr int kBFormatCount = 4;

// The largest MR of any kernel table.
inline constexpr int kMaxMR = 16;

// Packed A holds each row's fp32 values at this fixed stride, so that the
// micro-kernel addresses all its rows from one pointer (a kc-step never
// spans more than this many columns).
inline constexpr std::int64_t kPackedAStride = 256;

// How one output tile is finished. Pointers are at the tile's first row and
// column; rows are *_ld elements apart. x3 and dst have dtype out_dtype.
struct TileEpilogue {
  const float* bias = nullptr;             // float modes: fp32 bias, or null
  const std::int32_t* bias_i32 = nullptr;  // full quant: int32 bias, or null
  const float* scale = nullptr;            // full quant: fp32 dequant scale per column
  // full quant: per-row scale of the tile's first row on, or null
  const float* row_scale = nullptr;
  const void* x3 = nullptr;                // or null
  std::int64_t x3_ld = 0;
  void* dst = nullptr;
  std::int64_t dst_ld = 0;
  DType out_dtype = DType::f16;            // f16, bf16 or f32
};

struct MicroTile {
  std::int64_t kc = 0;
  const float* a = nullptr;         // packed A: a[i * kPackedAStride + l], kc <= kPackedAStride
  const void* b = nullptr;          // B(0, 0) of this tile
  std::int64_t b_ld = 0;            // elements between B(l, j) and B(l + 1, j)
  const float* b_scale = nullptr;   // i8 only: [NR] dequant scales
  const float* b_offset = nullptr;  // i8 only: [NR] offsets, or null
  float* acc = nullptr;             // partial sums: mr rows of NR columns, fp32
  std::int64_t acc_ld = 0;          //   (int32 when integer_sums)
  bool accumulate = false;          // continue from acc, else start from zero
  bool integer_sums = false;        // see above; then kc <= 1024
  const TileEpilogue* epilogue = nullptr;  // null: store the sums to acc
  int mr = 0;
  int nr = 0;
};

using MicroKernel = void (*)(const MicroTile& tile);

// The dot micro-kernel, for few rows of x1 with a transposed x2 (B's columns
// contiguous along k, as a [n, k] weight stores them; the micro-kernel above
// would need x2 copied into panels first). It computes rows [0, rows) x
// columns [0, cols) over all of k in one call:
//
//   s(i, j) = sum over l of a[i * a_ld + l] * W(j, l),    W(j, l) = B(l, j)
//
// as one fp32 partial sum per vector lane (chunks of kLanes values of l,
// ascending, one FMA each; a last partial chunk padded with zeros), then the
// lanes added up by the target's fixed reduction, then the epilogue. The
// order depends on k alone, so a row's results do not depend on the tile or
// thread that computed them. i8 weights are dequantized as in MicroTile, with
// the scale (offset) of column j and group g at scale[g * scale_ld + j]; a
// chunk never spans two groups (groups are multiples of 32 values of l).
struct DotTile {
  std::int64_t k = 0;
  const float* a = nullptr;         // fp32 rows of x1
  std::int64_t a_ld = 0;
  const void* w = nullptr;          // W(j, l) at w + j * w_ld + l, in the kernel's format
  std::int64_t w_ld = 0;
  const float* scale = nullptr;     // i8 only
  const float* offset = nullptr;    // i8 only, or null
  std::int64_t scale_ld = 0;
  std::int64_t group_rows = 0;      // values of l per dequant group
  int rows = 0;                     // <= kMaxDotRows (one kernel per row count)
  int cols = 0;                     // <= kDotCols
  const TileEpilogue* epilogue = nullptr;
  // The next tile's W(0, 0), or null: its kDotCols rows of w_ld apart are
  // fetched into the caches as this tile's are read, so that short rows (a
  // decode's weights) stream from memory without stalling on each tile.
  const void* prefetch = nullptr;
};

using DotKernel = void (*)(const DotTile& tile);
inline constexpr int kMaxDotRows = 4;
inline constexpr int kDotCols = 4;

// A block of x1 for pack_a: rows [0, rows) x columns [0, kc), kc <= kPackedAStride.
struct ASource {
  const void* data = nullptr;  // element (0, 0)
  DType dtype = DType::f16;    // f16, bf16, f32 or i8
  std::int64_t ld = 0;         // elements between rows
  int rows = 0;                // <= MR
  std::int64_t kc = 0;
};

// A block of x2 for pack_b_f32: rows l in [0, rows) x columns j in [0, cols),
// element (l, j) at data + l * stride_k + j * stride_n; one of the strides is 1.
struct BSource {
  const void* data = nullptr;
  DType dtype = DType::f16;        // f16, bf16, f32 or i8
  std::int64_t stride_k = 0;
  std::int64_t stride_n = 0;
  std::int64_t rows = 0;
  int cols = 0;                    // <= NR
  const float* scale = nullptr;    // i8: dequant scales for these rows, [NR] readable; null: none
  const float* offset = nullptr;   // i8: offsets likewise, or null
};

struct KernelTable {
  IsaLevel isa = IsaLevel::portable;
  int mr = 0;  // MR: register tile rows
  int nr = 0;  // NR: register tile columns (a multiple of the vector length)
  // tile[format][mr - 1] computes tiles of exactly mr rows (1 <= mr <= MR);
  // [i8] reads no offset, tile_i8_with_offset does.
  MicroKernel tile[kBFormatCount][kMaxMR] = {};
  MicroKernel tile_i8_with_offset[kMaxMR] = {};
  // dot[format][rows - 1] for f16, bf16 and i8; dot_i8_with_offset reads offsets.
  DotKernel dot[kBFormatCount][kMaxDotRows] = {};
  DotKernel dot_i8_with_offset[kMaxDotRows] = {};
  // out[i * kPackedAStride + l] = x1(i, l) as fp32.
  void (*pack_a)(const ASource& src, float* out) = nullptr;
  // out[l * NR + j] = B(l, j) as fp32 (as the micro-kernel reads it:
  // dequantized, bf16 subnormals zero), zero for columns >= src.cols.
  void (*pack_b_f32)(const BSource& src, float* out) = nullptr;
  // dst[i] = src[i] as fp32 for i < count (f16, bf16, f32 or i8): a GEMM
  // operand, converted exactly but for bf16 subnormals, which become zero.
  void (*convert_to_f32)(DType dtype, const void* src, std::int64_t count, float* dst) = nullptr;
  // The epilogue on sums held in memory (an fp32 or int32 matrix, e.g. a
  // library's output): rows x cols, acc_ld elements between rows.
  void (*finish_f32)(std::int64_t rows, std::int64_t cols, const float* acc, std::int64_t acc_ld,
                     const TileEpilogue& epilogue) = nullptr;
  void (*finish_i32)(std::int64_t rows, std::int64_t cols, const std::int32_t* acc,
                     std::int64_t acc_ld, const TileEpilogue& epilogue) = nullptr;
};

// One table per kernel file; kernels_for() picks the one for a level (the
// avx512 table serves avx512_dl too).
const KernelTable& portable_kernels();
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();
const KernelTable& kernels_for(IsaLevel level);

}  // namespace tpfuse::gemm
