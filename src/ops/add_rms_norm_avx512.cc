// The AVX-512 row kernels: add_rms_norm-inl.h compiled with the AVX-512 flags
// that CMakeLists.txt sets for this file alone.
#include "ops/add_rms_norm-inl.h"

static_assert(HWY_TARGET == HWY_AVX3,
              "add_rms_norm_avx512.cc must be compiled with the AVX-512 flags");

namespace tpfuse {

const AddRmsNormKernels& add_rms_norm_avx512_kernels() {
  static const AddRmsNormKernels kernels = HWY_NAMESPACE::make_add_rms_norm_kernels();
  return kernels;
}

}  // namespace tpfuse
