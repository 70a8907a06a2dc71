// Validation of mm_all_reduce_base's arguments: every rule of the contract in
// one place. Each violation throws InvalidArgument with a message that names
// the argument, what was expected and what was given, e.g.
//   "bias: expected shape [64] (n), got [65] f16"
// Validation touches no tensor data and allocates nothing beyond the message.
#pragma once

#include "tpfuse/core/tensor.h"
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

}  // namespace tpfuse
