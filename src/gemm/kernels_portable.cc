// The portable kernels: kernels-inl.h compiled for the baseline instruction
// set, for any CPU (Highway's portable target: emulated 128-bit vectors, or
// single lanes where the compiler is too old for those). This file
// also picks the table for a level.
#include "gemm/kernels-inl.h"
#include "gemm/pair_kernels.h"

#if defined(__x86_64__)
static_assert(HWY_TARGET == HWY_EMU128 || HWY_TARGET == HWY_SCALAR, "kernels_portable.cc must be compiled for the baseline ISA");
#endif

namespace tpfuse::gemm {

const KernelTable& portable_kernels() {
  static const KernelTable table = HWY_NAMESPACE::make_kernel_table(IsaLevel::portable);
  return table;
}

const KernelTable& kernels_for(IsaLevel level) {
  switch (level) {
    case IsaLevel::avx512_dl:
    case IsaLevel::avx512:
      return avx512_kernels();
    case IsaLevel::avx2:
      return avx2_kernels();
    case IsaLevel::portable:
      break;
  }
  return portable_kernels();
}

const PairKernelTable* pair_kernels_for(IsaLevel level) {
  if (level < IsaLevel::avx512_dl || !cpu_features().avx512_bf16) return nullptr;
  return &avx512_bf16_pair_kernels();
}

}  // namespace tpfuse::gemm
