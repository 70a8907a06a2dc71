// The add-and-normalise step of mm_all_reduce_add_rms_norm, on whole rows,
// rounded as the contract says (docs/SEMANTICS-FAMILY.md):
//   y        = round(f32(mm) + f32(residual))
//   rstd     = 1 / sqrt(sum(f32(y)^2) / n + epsilon), in fp32
//   norm_out = round(f32(round(f32(y) * rstd)) * f32(gamma))
// The fp32 sum of squares runs in one fixed order, whatever the CPU: 16
// running sums (element j into sum j % 16), then those added pairwise in a
// fixed tree. So every rank and every run gets the same bits, at every
// instruction-set level: the vector kernels (add_rms_norm_kernels.h) give the
// scalar reference's bits, NaNs included (the rule is there).
#pragma once

#include <cstdint>

#include "core/cpu_isa.h"
#include "tpfuse/core/dtype.h"

namespace tpfuse {

struct AddRmsNormRows {
  DType dtype = DType::f16;  // f16 or bf16: mm, residual, gamma, y and norm_out
  std::int64_t n = 0;        // elements per row
  float epsilon = 1e-6f;
  const void* gamma = nullptr;  // [n]
};

// Rows [0, rows) of mm, residual, y and norm_out, each [rows, n] contiguous.
// y may be residual itself (or mm), and norm_out may be mm (each row is read
// whole before it is written); no other overlap.
void add_rms_norm_rows(const AddRmsNormRows& step, std::int64_t rows, const void* mm,
                       const void* residual, void* y, void* norm_out);

// The same with the kernels of `level` (add_rms_norm_rows uses active_isa()'s).
void add_rms_norm_rows_at(IsaLevel level, const AddRmsNormRows& step, std::int64_t rows,
                          const void* mm, const void* residual, void* y, void* norm_out);

// The same in plain scalar code, one element at a time: the reference the
// kernels are tested against.
void add_rms_norm_rows_reference(const AddRmsNormRows& step, std::int64_t rows, const void* mm,
                                 const void* residual, void* y, void* norm_out);

}  // namespace tpfuse
