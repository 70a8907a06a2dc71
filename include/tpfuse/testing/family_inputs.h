// Deterministic random inputs for the rest of the family (ops/family.h),
// built on make_rank_inputs (inputs.h): any rank can rebuild any other
// rank's inputs from (spec, rank), so each can compute the golden result of
// the whole group (golden_family.h) on its own.
#pragma once

#include <cstdint>
#include <optional>

#include "tpfuse/core/tensor.h"
#include "tpfuse/testing/golden_family.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse::testing {

// all_gather_base_mm and mm_reduce_scatter_base.
struct SequenceParallelSpec {
  bool quant = false;                 // x1 and x2 int8, bias i32, x2_scale (and x1_scale)
  DType dtype = DType::f16;           // plain: x1's dtype; quant: ignored
  DType x2_scale_dtype = DType::f32;  // quant: f32, or i64 packed by trans_quant_param
  bool x2_scale_2d = false;           // quant: x2_scale [1, n] instead of [n]
  bool x1_scale = true;               // quant: the per-token x1_scale [m, 1]
  std::optional<DType> output_dtype;  // passed as options.output_dtype
  std::int64_t m = 16, n = 16, k = 32;
  bool uneven_n = false;  // rank r gets n + r (all-gather's column shards)
  bool uneven_k = false;  // rank r gets k + r (reduce-scatter's K-slices)
  bool x2_transposed = false;
  bool bias = false;
  std::int64_t comm_turn = 0;
  std::uint64_t seed = 1;

  std::int64_t n_for_rank(int rank) const { return uneven_n ? n + rank : n; }
  std::int64_t k_for_rank(int rank) const { return uneven_k ? k + rank : k; }
};

// Owns one rank's tensors; both argument sets view them (with the same
// shared options; gather_index, gather_output and reduce_op at defaults).
// Floats as make_rank_inputs builds them; x1_scale in [0.01, 0.05],
// x2_scale in [0.5e-3, 1.5e-3].
struct SequenceParallelInputs {
  RankInputs product;
  Tensor x1_scale, x2_scale;
  AllGatherMmArgs all_gather;
  MmReduceScatterArgs reduce_scatter;
};

SequenceParallelInputs make_sequence_parallel_inputs(const SequenceParallelSpec& spec, int rank);

// mm_all_reduce_add_rms_norm: the product's arguments from `product` (every
// mode; x3 must be off), residual [b, s, n] ([1, m, n] for a 2-D x1) and
// gamma [n] in the output dtype, uniform in [-1, 1] and the same on every
// rank.
struct AddRmsNormSpec {
  CaseSpec product;
  double epsilon = 1e-6;
};

struct AddRmsNormInputs {
  RankInputs product;
  Tensor residual, gamma;
  AddRmsNormArgs args;
};

AddRmsNormInputs make_add_rms_norm_inputs(const AddRmsNormSpec& spec, int rank);

}  // namespace tpfuse::testing
