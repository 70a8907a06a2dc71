// The AVX2 + FMA + F16C kernels: kernels-inl.h compiled with the AVX2 flags
// that CMakeLists.txt sets for this file alone.
#include "gemm/kernels-inl.h"

static_assert(HWY_TARGET == HWY_AVX2, "kernels_avx2.cc must be compiled with the AVX2 flags");

namespace tpfuse::gemm {

const KernelTable& avx2_kernels() {
  static const KernelTable table = HWY_NAMESPACE::make_kernel_table(IsaLevel::avx2);
  return table;
}

}  // namespace tpfuse::gemm
