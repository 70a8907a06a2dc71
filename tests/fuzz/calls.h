// A decoded call made: its operator's validation alone, and the operator
// itself in the call's form, on a communicator.
#pragma once

#include <string>
#include <string_view>

#include "fuzz_call.h"
#include "tpfuse/ops/mode.h"

namespace tpfuse::fuzz {

// Validation alone, as the operator runs it on a group of `group_size`: the
// error message, or "" when it accepts (and `shape` is what it learned).
std::string validation_error(const CallSpec& spec, const MaterializedCall& call, int group_size,
                             CallShape& shape);

// What the allocating and in-place forms return.
struct Results {
  Tensor out;  // mm_all_reduce_base's
  Tensor output;
  Tensor gather_out;
  Tensor y;
  Tensor norm_out;
};

// The call's operator, in its form, on the group `hcom`.
void run_operator(const CallSpec& spec, const MaterializedCall& call, std::string_view hcom,
                  Results& results);

}  // namespace tpfuse::fuzz
