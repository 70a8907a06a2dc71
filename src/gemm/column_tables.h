// What an engine's epilogue and dequantization read per output column, made
// once per call in fp32 from the call's operands: the bias, the weight-only
// scales and offsets ([group][n_padded], a group being the rows of k one
// scale covers), and the full-quant dequant scale. Columns from n to
// n_padded are zero, so kernels may read whole panels.
#pragma once

#include <cstdint>

#include "gemm/aligned_buffer.h"
#include "tpfuse/gemm/tile_gemm.h"

namespace tpfuse::gemm {

class ColumnTables {
 public:
  ColumnTables(const GemmOperands& operands, std::int64_t n_padded);

  const float* bias() const { return has_bias_ ? bias_.data() : nullptr; }
  // Weight-only quant: the scales (offsets, or null) of the group holding row
  // l of k, from column j on.
  const float* scale_row(std::int64_t l, std::int64_t j) const {
    return scales_.data() + (l / group_rows_) * n_padded_ + j;
  }
  const float* offset_row(std::int64_t l, std::int64_t j) const {
    return has_offset_ ? offsets_.data() + (l / group_rows_) * n_padded_ + j : nullptr;
  }
  std::int64_t group_rows() const { return group_rows_; }
  std::int64_t n_padded() const { return n_padded_; }
  // Full quant: the fp32 dequant scale of each column.
  const float* dequant_scales() const { return dequant_.data(); }

 private:
  std::int64_t n_padded_ = 0;
  std::int64_t group_rows_ = 1;
  bool has_bias_ = false;
  bool has_offset_ = false;
  AlignedBuffer<float> bias_, scales_, offsets_, dequant_;
};

}  // namespace tpfuse::gemm
