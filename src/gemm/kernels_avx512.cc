// The AVX-512 kernels (F, BW, DQ, VL): kernels-inl.h compiled with the
// AVX-512 flags that CMakeLists.txt sets for this file alone.
#include "gemm/kernels-inl.h"

static_assert(HWY_TARGET == HWY_AVX3, "kernels_avx512.cc must be compiled with the AVX-512 flags");

namespace tpfuse::gemm {

const KernelTable& avx512_kernels() {
  static const KernelTable table = HWY_NAMESPACE::make_kernel_table(IsaLevel::avx512);
  return table;
}

}  // namespace tpfuse::gemm
