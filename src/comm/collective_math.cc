#include "comm/collective_math.h"

#include <cstdint>
#include <cstring>

#include "tpfuse/core/half.h"

namespace tpfuse::comm {

void widen_to_f32(DType dtype, const std::byte* in, std::size_t count, float* out) {
  if (dtype == DType::f32) {
    if (count > 0) std::memcpy(out, in, count * 4);
    return;
  }
  for (std::size_t i = 0; i < count; ++i) {
    std::uint16_t bits = 0;
    std::memcpy(&bits, in + i * 2, 2);
    out[i] = dtype == DType::f16 ? f16_to_f32(Half{bits}) : bf16_to_f32(BFloat16{bits});
  }
}

void narrow_from_f32(DType dtype, const float* in, std::size_t count, std::byte* out) {
  if (dtype == DType::f32) {
    if (count > 0) std::memcpy(out, in, count * 4);
    return;
  }
  for (std::size_t i = 0; i < count; ++i) {
    const std::uint16_t bits =
        dtype == DType::f16 ? f32_to_f16(in[i]).bits : f32_to_bf16(in[i]).bits;
    std::memcpy(out + i * 2, &bits, 2);
  }
}

std::size_t share_begin(std::size_t count, int size, int rank) {
  const auto p = static_cast<std::size_t>(size), r = static_cast<std::size_t>(rank);
  return count / p * r + count % p * r / p;
}

}  // namespace tpfuse::comm
