// An independent model of the operator's argument contract (docs/SEMANTICS.md and
// the size rules of validate.h), written from the contract rather than from
// validate.cc and computing sizes exactly in 128-bit arithmetic: the fuzzer's
// oracle. For a call it says whether the contract accepts it, which arguments
// are at fault when it does not (validation must name one of them), and what
// validation must report when it does.
#pragma once

#include <set>
#include <string>

#include "fuzz_call.h"
#include "tpfuse/ops/mode.h"

namespace tpfuse::fuzz {

struct Verdict {
  // Every argument that breaks a rule: "x1", "bias", "reduce_op", "out" ...
  // Rules that need a value an earlier fault left undefined (n, when x2 is
  // broken) are not checked, so each name here is at fault on its own.
  std::set<std::string> faults;
  bool accepted() const { return faults.empty(); }
  // The call as validation must describe it; meaningful when accepted.
  CallShape shape;
  // The output's bytes (m * n * size), when its dims are known and fit.
  __int128 output_bytes = 0;
};

// `with_out`: the call is mm_all_reduce_base_out with spec.arg(Arg::out).
Verdict judge(const CallSpec& spec, const MaterializedCall& call, bool with_out);

}  // namespace tpfuse::fuzz
