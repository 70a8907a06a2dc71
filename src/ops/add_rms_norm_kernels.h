// The vector halves of add_rms_norm_rows (ops/add_rms_norm.h), one table per
// instruction set: add_rms_norm-inl.h compiled once per level in
// add_rms_norm_{avx512,avx2,portable}.cc, each with its own flags. A row is
// two calls: add_row writes y and the 16 running sums of squares, the caller
// (baseline code) adds those in the fixed tree and takes rstd, and
// norm_row writes norm_out.
//
// NaNs follow one rule everywhere, whatever order the compiler gives an
// operation's operands: a NaN result is the preferred operand's NaN made
// quiet if that is a NaN, else the other's, else the default NaN
// (0xffc00000, what x86 produces for inf - inf). Preferred: the residual over
// mm, the new square over the running sum, the lower sum in the tree, y over
// rstd, gamma over t. That is what the scalar implementation compiled to
// (GCC 12, x86), kept so that no result changed. The kernels apply the rule
// to the add of y and the product of norm_out; the running sums are left to
// the hardware, so a row whose sum of squares (or rstd) is not finite is
// normalised again by the scalar reference, which applies it everywhere.
#pragma once

#include <cstdint>

#include "core/cpu_isa.h"

namespace tpfuse {

constexpr int kAddRmsNormLanes = 16;  // running sums of squares: element j into sum j % 16
constexpr std::uint32_t kDefaultNanBits = 0xffc00000u;
constexpr std::uint32_t kQuietNanBit = 0x00400000u;

struct AddRmsNormRowKernels {
  // y[j] = round(f32(mm[j]) + f32(residual[j])) for j < n; sums[l] = the sum,
  // in order of j, of f32(y[j])^2 over j % 16 == l. y may be mm or residual.
  void (*add_row)(const void* mm, const void* residual, void* y, std::int64_t n,
                  float sums[kAddRmsNormLanes]);
  // out[j] = round(f32(round(f32(y[j]) * rstd)) * f32(gamma[j])) for j < n.
  void (*norm_row)(const void* y, const void* gamma, float rstd, void* out, std::int64_t n);
};

// Indexed by dtype: [0] f16, [1] bf16.
struct AddRmsNormKernels {
  AddRmsNormRowKernels rows[2];
};

const AddRmsNormKernels& add_rms_norm_avx512_kernels();
const AddRmsNormKernels& add_rms_norm_avx2_kernels();
const AddRmsNormKernels& add_rms_norm_portable_kernels();

}  // namespace tpfuse
