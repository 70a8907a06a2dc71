// The portable row kernels: add_rms_norm-inl.h compiled for the baseline
// instruction set, for any CPU (Highway's emulated 128-bit vectors, or
// single lanes where the compiler is too old for those).
#include "ops/add_rms_norm-inl.h"

#if defined(__x86_64__)
static_assert(HWY_TARGET == HWY_EMU128 || HWY_TARGET == HWY_SCALAR,
              "add_rms_norm_portable.cc must be compiled for the baseline ISA");
#endif

namespace tpfuse {

const AddRmsNormKernels& add_rms_norm_portable_kernels() {
  static const AddRmsNormKernels kernels = HWY_NAMESPACE::make_add_rms_norm_kernels();
  return kernels;
}

}  // namespace tpfuse
