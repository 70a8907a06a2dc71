// What the transports' all-reduces share: contributions widened to fp32
// (exactly), fp32 sums rounded once to the output's dtype, and the even
// split of a buffer into shares.
#pragma once

#include <cstddef>

#include "tpfuse/core/dtype.h"

namespace tpfuse::comm {

// `count` elements of `dtype` (f16, bf16 or f32) at `in` as fp32, exactly.
void widen_to_f32(DType dtype, const std::byte* in, std::size_t count, float* out);

// fp32 values rounded to `dtype` (f16, bf16 or f32), each once.
void narrow_from_f32(DType dtype, const float* in, std::size_t count, std::byte* out);

// Where share `rank` of `count` elements cut in `size` shares begins:
// floor(count * rank / size), without the product overflowing.
std::size_t share_begin(std::size_t count, int size, int rank);

}  // namespace tpfuse::comm
