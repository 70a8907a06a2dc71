// The bf16 pair micro-kernel contract, for CPUs with AVX512-BF16, whose
// vdpbf16ps multiplies pairs of bf16 values and adds both products to one
// fp32 lane. It serves bf16 x1 with a bf16 weight, or with an int8 weight
// dequantized into bf16 (the activation dtype, as Ascend dequantizes).
//
// Operands hold pairs of consecutive k as one 32-bit word (the value at the
// even k in the low half). The micro-kernel computes a tile of mr <= MR rows
// and nr <= NR columns over kp pairs:
//
//   for p = 0 .. kp-1:
//     s(i, j) = s(i, j) + A(i, 2p+1) * B(2p+1, j)     (one fp32 rounding)
//     s(i, j) = s(i, j) + A(i, 2p) * B(2p, j)         (one fp32 rounding)
//
// The products of two bf16 values are exact in fp32, so each step is one
// fused multiply-add; the order is the instruction's (Intel SDM, VDPBF16PS)
// and depends on k alone, never on the tile, rows or thread: a row's sums are
// the same whichever range it was computed in. As the instruction defines,
// bf16 subnormal inputs count as zero and a subnormal sum is flushed to zero;
// MXCSR is neither read nor written. An odd k ends in a pair whose second
// value is zero on both sides.
//
// Packed A: a[p * MR + i] is the pair (A(i, 2p), A(i, 2p+1)) of row i.
// Packed B: b[p * NR + j] is the pair (B(2p, j), B(2p+1, j)) of column j,
// zero for columns >= nr.
#pragma once

#include <cstdint>

#include "gemm/microkernel.h"

namespace tpfuse::gemm {

struct PairTile {
  std::int64_t kp = 0;             // pairs of k in this step
  const std::uint32_t* a = nullptr;
  const std::uint32_t* b = nullptr;
  float* acc = nullptr;            // partial sums: mr rows of NR columns
  std::int64_t acc_ld = 0;
  bool accumulate = false;         // continue from acc, else start from zero
  const TileEpilogue* epilogue = nullptr;  // null: store the sums to acc
  int mr = 0;
  int nr = 0;
};

using PairKernel = void (*)(const PairTile& tile);

// A block of x2 for pack_b: rows l in [0, rows) x columns j in [0, cols),
// element (l, j) at data + l * stride_k + j * stride_n, one stride being 1.
// An int8 block is dequantized per element as fp32 (q + offset[j]) *
// scale[j] (the scales of this block's dequant group; offset may be null),
// then rounded to bf16 (nearest even; an fp32 subnormal becomes zero).
struct PairBSource {
  const void* data = nullptr;
  DType dtype = DType::bf16;       // bf16 or i8
  std::int64_t stride_k = 0;
  std::int64_t stride_n = 0;
  std::int64_t rows = 0;           // even, except at the end of k
  int cols = 0;                    // <= NR
  const float* scale = nullptr;    // i8: [NR] readable
  const float* offset = nullptr;   // i8: [NR] readable, or null
};

// A tile as PairTile, with B read from a row-major x2 in place: b.data is
// row 2 * (first pair) of the tile's columns, b.rows the values of k left
// from there (an odd end is padded with zero), b.cols <= NR; i8 blocks must
// not span two dequant groups. Each pair of rows is interleaved into the
// words pack_b would store, so the sums are the same bits.
struct PairRowsTile {
  std::int64_t kp = 0;
  const std::uint32_t* a = nullptr;
  PairBSource b;
  float* acc = nullptr;
  std::int64_t acc_ld = 0;
  bool accumulate = false;
  const TileEpilogue* epilogue = nullptr;
};

using PairRowsKernel = void (*)(const PairRowsTile& tile);

// A tile of at most MR rows and 16 columns of a transposed x2 (its columns
// contiguous along k), over all of k: x2 is read in place, 16 pairs of 16
// columns at a time transposed in registers into packed-B vectors, so the
// sums are the tile kernel's, word for word and in the same order.
struct PairColumnsTile {
  const std::uint32_t* a = nullptr;  // packed A of all of k: a[p * MR + i]
  int rows = 0;                      // <= MR
  std::int64_t k = 0;
  PairBSource w;                     // the 16 columns (cols <= 16), rows = k;
                                     // i8: the first group's scales
  std::int64_t scale_ld = 0;         // i8: floats from one group's scales to the next's
  std::int64_t group_rows = 0;       // i8: values of k per group (a multiple of 32)
  const TileEpilogue* epilogue = nullptr;
};

using PairColumnsKernel = void (*)(const PairColumnsTile& tile);

// A tile as PairTile with B packed as int8 pairs (pack_b_i8) and dequantized
// in registers into the words pack_b stores (same instructions, same bits),
// so a packed int8 weight holds half the bytes of a bf16 one. The step may
// span dequant groups: the scales (offsets) of the group holding value l of
// k are at scale + (l / group_rows) * scale_ld, from the tile's first column.
struct PairI8Tile {
  std::int64_t kp = 0;
  const std::uint32_t* a = nullptr;  // packed A: row panels of [kp][MR], kp * MR words apart
  // The first panel's first pair of the step: b[p * 2 * NR + 2 * j + (0 or 1)];
  // `panels` adjacent panels of NR columns, b_panel_stride bytes apart.
  const std::int8_t* b = nullptr;
  std::int64_t b_panel_stride = 0;
  int panels = 1;
  std::int64_t l0 = 0;            // the value of k of the step's first pair
  std::int64_t k = 0;             // all values of k: an odd k ends in a half pair
  const float* scale = nullptr;   // [NR] readable per group
  const float* offset = nullptr;  // likewise, or null
  std::int64_t scale_ld = 0;
  std::int64_t group_rows = 0;  // a multiple of 32, or k (one group)
  float* acc = nullptr;         // the first panel's sums; the others' follow in the row
  std::int64_t acc_ld = 0;
  bool accumulate = false;
  const TileEpilogue* epilogue = nullptr;  // the first panel's
  int mr = 0;                              // <= the table's i8_rows
  int nr = 0;                              // columns from the first panel's first to n
};

using PairI8Kernel = void (*)(const PairI8Tile& tile);

struct PairKernelTable {
  int mr = 0;  // MR
  int nr = 0;  // NR
  // tile[mr - 1] computes tiles of exactly mr rows.
  PairKernel tile[kMaxMR] = {};
  // rows[source][rows - 1] and columns[source][rows - 1]: PairRowsTile and
  // PairColumnsTile of exactly `rows` rows, for a bf16 x2 (source 0), int8
  // (1) or int8 with offsets (2).
  PairRowsKernel rows[3][kMaxMR] = {};
  PairColumnsKernel columns[3][kMaxMR] = {};
  // Rows [0, rows) x columns [0, k) of a bf16 x1 (row stride ld) as packed
  // A: out[p * MR + i], rows >= `rows` left as they are.
  void (*pack_a)(const void* x1, std::int64_t ld, int rows, std::int64_t k,
                 std::uint32_t* out) = nullptr;
  // The block as packed B: out[p * NR + j] for p < ceil(rows / 2).
  void (*pack_b)(const PairBSource& src, std::uint32_t* out) = nullptr;
  // i8_tile[offset ? 1 : 0][mr - 1]: PairI8Tile of exactly mr <= i8_rows rows.
  int i8_rows = 0;
  PairI8Kernel i8_tile[2][kMaxMR] = {};
  // expand_i8[offset ? 1 : 0]: a PairI8Tile's one panel (a, acc, epilogue,
  // mr unused) dequantized into the packed-B words pack_b stores: out[p * NR + j].
  void (*expand_i8[2])(const PairI8Tile& tile, std::uint32_t* out) = {};
  // An int8 block (its scales unused) as int8 pairs, not dequantized:
  // out[p * 2 * NR + 2 * j + e] = B(2p + e, j) for p < ceil(rows / 2), zero
  // past rows and cols.
  void (*pack_b_i8)(const PairBSource& src, std::int8_t* out) = nullptr;
  // The epilogue of the fp32 micro-kernels (microkernel.h).
  const KernelTable* finish = nullptr;
};

// The table (kernels_avx512_bf16.cc): call only where the CPU has AVX512-BF16.
const PairKernelTable& avx512_bf16_pair_kernels();

// The table, or null where the CPU (or TPFUSE_ISA) does not allow AVX512-BF16.
const PairKernelTable* pair_kernels_for(IsaLevel level);

}  // namespace tpfuse::gemm
