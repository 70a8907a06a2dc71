// The arithmetic of the shm all-reduces: summing p ranks' contributions
// element by element, in fp32, in rank order 0..p-1, rounded once to the
// buffer's dtype. Every algorithm and every tiling goes through this one
// function, which is what makes their results bitwise identical.
#pragma once

#include <cstddef>
#include <span>

#include "core/cpu_isa.h"
#include "tpfuse/core/dtype.h"

namespace tpfuse::comm::shm {

// How a kernel writes its output: through the caches, or around them
// (non-temporal stores, no read-for-ownership), which halves the memory
// traffic of writing an output too large to stay cached for its reader.
enum class OutputStore { cached, streaming };

// out[i] = round(sources[0][i] + sources[1][i] + ... + sources[p-1][i]) for
// i < count, the sum in fp32 left to right; also written to `second_out`
// (always through the caches) unless it is null. `dtype` is f16, bf16 or
// f32; no pointer need be aligned. An out may be one of the sources (each
// element is read before it is written). Streamed stores are complete (fenced)
// when it returns.
void sum_in_rank_order(DType dtype, std::span<const std::byte* const> sources, std::size_t count,
                       std::byte* out, std::byte* second_out = nullptr,
                       OutputStore out_store = OutputStore::cached);

// The same with the kernel of instruction-set level `level`, at most
// detected_isa() (the tests run every kernel the CPU has).
void sum_in_rank_order_at(IsaLevel level, DType dtype, std::span<const std::byte* const> sources,
                          std::size_t count, std::byte* out, std::byte* second_out = nullptr,
                          OutputStore out_store = OutputStore::cached);

// memcpy, with the stores as asked (complete when it returns).
void copy_to_output(std::byte* out, const std::byte* in, std::size_t bytes, OutputStore out_store);

// The same with plain C++ conversions, whatever the CPU: the reference the
// vector kernels are tested against.
void sum_in_rank_order_portable(DType dtype, std::span<const std::byte* const> sources,
                                std::size_t count, std::byte* out, std::byte* second_out = nullptr);

// Which kernel sum_in_rank_order runs: "avx512" where active_isa() (the
// CPU's level, capped by TPFUSE_ISA) has AVX-512, "avx2" where it has
// AVX2, else "portable"; and which one `level` gets.
const char* sum_kernel_name();
const char* sum_kernel_name(IsaLevel level);

}  // namespace tpfuse::comm::shm
