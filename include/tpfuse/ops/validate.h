// Validation of mm_all_reduce_base's arguments: every rule of the contract in
// one place. Each violation throws InvalidArgument with a message that names
// the argument, what was expected and what was given, e.g.
//   "bias: expected shape [64] (n), got [65] f16"
// Validation touches no tensor data and allocates nothing beyond the message.
#pragma once

#include "tpfuse/core/tensor.h"
#include "tpfuse/ops/family.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/ops/mode.h"

namespace tpfuse {

// Largest k allowed in full-quant mode (int32 accumulation of int8 products).
inline constexpr std::int64_t kMaxFullQuantK = 65535;

// Checks one rank's arguments; returns what it learned.
CallShape validate_call(const TensorView& x1, const TensorView& x2,
                        const MmAllReduceOptions& options);

// Checks a caller-provided output against the call, including that it does not
// overlap any input.
void validate_out(const CallShape& shape, const TensorView& out, const TensorView& x1,
                  const TensorView& x2, const MmAllReduceOptions& options);

// The family (docs/SEMANTICS-FAMILY.md): the same, per operator. group_size
// is the size of the group the call runs on, which world_size must name.
CallShape validate_all_gather_mm(const TensorView& x1, const TensorView& x2,
                                 std::int64_t world_size, int group_size,
                                 const AllGatherMmOptions& options);
void validate_all_gather_mm_out(const CallShape& shape, const TensorView& output,
                                const std::optional<TensorView>& gather_out, const TensorView& x1,
                                const TensorView& x2, const AllGatherMmOptions& options);
CallShape validate_mm_reduce_scatter(const TensorView& x1, const TensorView& x2,
                                     std::int64_t world_size, int group_size,
                                     const MmReduceScatterOptions& options);
void validate_mm_reduce_scatter_out(const CallShape& shape, const TensorView& output,
                                    const TensorView& x1, const TensorView& x2,
                                    const MmReduceScatterOptions& options);
CallShape validate_add_rms_norm(const TensorView& x1, const TensorView& x2,
                                const TensorView& residual, const TensorView& gamma,
                                const MmAllReduceAddRmsNormOptions& options);
// The in-place form writes y into residual: residual is then an output,
// disjoint from every other input.
void validate_add_rms_norm_in_place(const TensorView& x1, const TensorView& x2,
                                    const TensorView& residual, const TensorView& gamma,
                                    const MmAllReduceAddRmsNormOptions& options);
void validate_add_rms_norm_out(const CallShape& shape, const TensorView& y,
                               const TensorView& norm_out, const TensorView& x1,
                               const TensorView& x2, const TensorView& residual,
                               const TensorView& gamma,
                               const MmAllReduceAddRmsNormOptions& options);

// The GEMM's part of a family call, as mm_all_reduce_base's options: the
// add-RMSNorm operator's own; for all-gather and reduce-scatter their bias,
// and x2_scale as the dequant scale (x1_scale is the GEMM's row scale).
MmAllReduceOptions gemm_options(const MmAllReduceAddRmsNormOptions& options);
MmAllReduceOptions gemm_options(const SequenceParallelOptions& options);

}  // namespace tpfuse
