// The outputs of an accepted call that ran on one rank, checked against what
// the contract makes them there:
//   mm_all_reduce_base            within the fp64 golden model's bounds
//   all_gather_base_mm            gather_out bitwise x1; output as below
//   mm_reduce_scatter_base        output bitwise mm_all_reduce_base's for
//                                 the same x1, x2 and bias (plain; and
//                                 within the golden model's bounds), or the
//                                 quant path's formula evaluated exactly
//   mm_all_reduce_add_rms_norm(_) y bitwise round(mm_all_reduce_base's
//                                 output + residual); norm_out within the
//                                 family's golden model's bounds
// NaN matches any NaN; infinities match exactly.
#pragma once

#include <cstddef>
#include <span>
#include <string>
#include <string_view>

#include "calls.h"
#include "fuzz_call.h"

namespace tpfuse::fuzz {

// "" when the outputs are right, else what is wrong. `residual_before`:
// residual's bytes before the call (the in-place form writes y over them).
// The reference calls of mm_all_reduce_base run on the group `hcom`.
std::string check_outputs(const CallSpec& spec, const MaterializedCall& call,
                          const CallShape& shape, const Results& results,
                          std::span<const std::byte> residual_before, std::string_view hcom);

}  // namespace tpfuse::fuzz
