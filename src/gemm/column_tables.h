// What an engine's epilogue and dequantization read per output column, made
// once per call in fp32 from the call's operands: the bias, the weight-only
// scales and offsets ([group][n_padded], a group being the rows of k one
// scale covers; or those a packing kept), and the full-quant dequant scale.
// Columns from n to n_padded are zero, so kernels may read whole panels.
#pragma once

#include <cstdint>
#include <memory>

#include "gemm/aligned_buffer.h"
#include "tpfuse/gemm/tile_gemm.h"

namespace tpfuse::gemm {

// A weight's weight-only scales and offsets as ColumnTables holds them. They
// are the weight's, as its packing is: a packing keeps them, so that calls
// do not convert them again (a per-group table of [8, 5632] took 760 us a
// call in fresh pages, faulted in one by one).
struct WeightScales {
  AlignedBuffer<float> scales, offsets;
  bool has_offset = false;
};

class ColumnTables {
 public:
  // `weight`: the weight's scales made before for these operands, or null.
  ColumnTables(const GemmOperands& operands, std::int64_t n_padded,
               std::shared_ptr<const WeightScales> weight = nullptr);

  const float* bias() const { return has_bias_ ? bias_.data() : nullptr; }
  // Weight-only quant: the scales (offsets, or null) of the group holding row
  // l of k, from column j on.
  const float* scale_row(std::int64_t l, std::int64_t j) const {
    return weight_->scales.data() + (l / group_rows_) * n_padded_ + j;
  }
  const float* offset_row(std::int64_t l, std::int64_t j) const {
    return weight_->has_offset ? weight_->offsets.data() + (l / group_rows_) * n_padded_ + j
                               : nullptr;
  }
  std::int64_t group_rows() const { return group_rows_; }
  std::int64_t n_padded() const { return n_padded_; }
  // Full quant: the fp32 dequant scale of each column.
  const float* dequant_scales() const { return dequant_.data(); }
  // Weight-only quant: the scales and offsets, to keep with a packing.
  const std::shared_ptr<const WeightScales>& weight_scales() const { return weight_; }

 private:
  std::int64_t n_padded_ = 0;
  std::int64_t group_rows_ = 1;
  bool has_bias_ = false;
  AlignedBuffer<float> bias_, dequant_;
  std::shared_ptr<const WeightScales> weight_;
};

}  // namespace tpfuse::gemm
