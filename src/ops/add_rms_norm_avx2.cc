// The AVX2 + F16C row kernels: add_rms_norm-inl.h compiled with the AVX2
// flags that CMakeLists.txt sets for this file alone.
#include "ops/add_rms_norm-inl.h"

static_assert(HWY_TARGET == HWY_AVX2, "add_rms_norm_avx2.cc must be compiled with the AVX2 flags");

namespace tpfuse {

const AddRmsNormKernels& add_rms_norm_avx2_kernels() {
  static const AddRmsNormKernels kernels = HWY_NAMESPACE::make_add_rms_norm_kernels();
  return kernels;
}

}  // namespace tpfuse
