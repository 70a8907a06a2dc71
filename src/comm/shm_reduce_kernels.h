// The arithmetic of the shm all-reduces: summing p ranks' contributions
// element by element, in fp32, in rank order 0..p-1, rounded once to the
// buffer's dtype. Every algorithm and every tiling goes through this one
// function, which is what makes their results bitwise identical.
#pragma once

#include <cstddef>
#include <span>

#include "tpfuse/core/dtype.h"

namespace tpfuse::comm::shm {

// out[i] = round(sources[0][i] + sources[1][i] + ... + sources[p-1][i]) for
// i < count, the sum in fp32 left to right; also written to `second_out`
// unless it is null. `dtype` is f16, bf16 or f32; no pointer need be aligned.
// An out may be one of the sources (each block is read before it is written).
void sum_in_rank_order(DType dtype, std::span<const std::byte* const> sources, std::size_t count,
                       std::byte* out, std::byte* second_out = nullptr);

// The same with plain C++ conversions, whatever the CPU: the reference the
// vector kernels are tested against.
void sum_in_rank_order_portable(DType dtype, std::span<const std::byte* const> sources,
                                std::size_t count, std::byte* out, std::byte* second_out = nullptr);

// Which kernel sum_in_rank_order runs on this CPU: "avx512" or "portable".
const char* sum_kernel_name();

}  // namespace tpfuse::comm::shm
