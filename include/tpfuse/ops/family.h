// The rest of the family (docs/SEMANTICS-FAMILY.md has the full contract):
//
//   all_gather_base_mm          gather_out = concat over ranks of x1 (rows, in
//                               rank order); output = gather_out @ x2 + bias
//   mm_reduce_scatter_base      rows [r*m/p, (r+1)*m/p) of
//                               sum over ranks of (x1 @ x2 + bias)
//   mm_all_reduce_add_rms_norm  y = mm_all_reduce_base(x1, x2, ...) + residual;
//                               norm_out = y / sqrt(mean(y^2) + epsilon) * gamma
//
// Every rank of `hcom` calls them collectively, in the same order, as
// mm_all_reduce_base (whose thread rules hold here too). A rule broken on any
// rank fails the call on every rank, before any data moves.
//
// Quant paths of the first two (x1 and x2 int8): x1_scale [m, 1] f32 per
// token (optional), x2_scale [n] or [1, n], f32 or i64 (trans_quant_param);
// output = (x1_scale * x2_scale) * (x1 @ x2 + bias), int32 product and bias,
// f32 scales. Output dtype: f16 with an i64 x2_scale; with an f32 one
// output_dtype picks f16 or bf16 (default bf16).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "tpfuse/core/tensor.h"
#include "tpfuse/ops/mm_all_reduce_base.h"

namespace tpfuse {

// The arguments all_gather_base_mm and mm_reduce_scatter_base share.
struct SequenceParallelOptions {
  std::optional<TensorView> bias;      // [n]: x1's dtype, or i32 on the quant path
  std::optional<TensorView> x1_scale;  // quant path: [m, 1] f32
  std::optional<TensorView> x2_scale;  // quant path: [n] or [1, n], f32 or i64
  // 0: tpfuse picks the tiles; N > 0: N tiles along the rows of the product.
  std::int64_t comm_turn = 0;
  // Quant path with an f32 x2_scale: f16 or bf16 (unset: bf16). Elsewhere
  // unset, or the dtype the call has anyway.
  std::optional<DType> output_dtype;
  std::string comm_mode;  // "", "ai_cpu" or "aiv": no effect on the result
};

struct AllGatherMmOptions : SequenceParallelOptions {
  std::int64_t gather_index = 0;  // must be 0
  bool gather_output = true;      // false: gather_out is empty ([0])
};

struct MmReduceScatterOptions : SequenceParallelOptions {
  std::string reduce_op = "sum";
};

struct AllGatherMmResult {
  Tensor output;      // [p*m, n]
  Tensor gather_out;  // [p*m, k], x1's dtype; [0] without gather_output
};

// x1 [m, k] (this rank's rows), x2 [k, n] (its columns; row-major or a
// transposed view of a row-major [n, k]). world_size must be the group's size.
AllGatherMmResult all_gather_base_mm(const TensorView& x1, const TensorView& x2,
                                     std::string_view hcom, std::int64_t world_size,
                                     const AllGatherMmOptions& options = {});

// Writes into `output` [p*m, n] and, with gather_output, `gather_out`
// [p*m, k] (required then, and must be absent without it). Both contiguous,
// disjoint from every input and from each other.
void all_gather_base_mm_out(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                            std::int64_t world_size, const AllGatherMmOptions& options,
                            const TensorView& output,
                            const std::optional<TensorView>& gather_out);

// x1 [m, k] (this rank's K-slice), x2 [k, n]; m a multiple of world_size.
// Returns this rank's [m / p, n] rows of the reduced product.
Tensor mm_reduce_scatter_base(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                              std::int64_t world_size, const MmReduceScatterOptions& options = {});

void mm_reduce_scatter_base_out(const TensorView& x1, const TensorView& x2,
                                std::string_view hcom, std::int64_t world_size,
                                const MmReduceScatterOptions& options, const TensorView& output);

// mm_all_reduce_base's arguments (no x3) and the norm's epsilon, in (0, 1).
struct MmAllReduceAddRmsNormOptions {
  std::string reduce_op = "sum";
  double epsilon = 1e-6;
  std::optional<TensorView> bias;
  std::optional<TensorView> antiquant_scale;
  std::optional<TensorView> antiquant_offset;
  std::optional<TensorView> dequant_scale;
  std::int64_t antiquant_group_size = 0;
  std::int64_t comm_turn = 0;
};

struct AddRmsNormResult {
  Tensor y;         // residual's shape and dtype
  Tensor norm_out;  // residual's shape and dtype
};

// x1 [b*s, k] or [b, s, k]; residual [b, s, n]; gamma [n].
AddRmsNormResult mm_all_reduce_add_rms_norm(const TensorView& x1, const TensorView& x2,
                                            const TensorView& residual, const TensorView& gamma,
                                            std::string_view hcom,
                                            const MmAllReduceAddRmsNormOptions& options = {});

// The in-place form: y is written into `residual` (which must then be
// disjoint from every other input); returns norm_out.
Tensor mm_all_reduce_add_rms_norm_(const TensorView& x1, const TensorView& x2,
                                   const TensorView& residual, const TensorView& gamma,
                                   std::string_view hcom,
                                   const MmAllReduceAddRmsNormOptions& options = {});

// Writes y and norm_out (residual's shape and dtype, contiguous). y may be
// `residual` itself (the in-place form); otherwise every output is disjoint
// from every input and from the other output.
void mm_all_reduce_add_rms_norm_out(const TensorView& x1, const TensorView& x2,
                                    const TensorView& residual, const TensorView& gamma,
                                    std::string_view hcom,
                                    const MmAllReduceAddRmsNormOptions& options,
                                    const TensorView& y, const TensorView& norm_out);

}  // namespace tpfuse
