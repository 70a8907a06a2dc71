// An independent model of the operators' argument contracts (docs/SEMANTICS.md
// and the size rules of validate.h for mm_all_reduce_base,
// docs/SEMANTICS-FAMILY.md for the family), written from the contracts rather
// than from validate.cc and validate_family.cc and computing sizes exactly in
// 128-bit arithmetic: the fuzzer's oracle. For a call it says whether the
// contract accepts it, which arguments are at fault when it does not
// (validation must name one of them), and what validation must report when
// it does.
#pragma once

#include <set>
#include <string>

#include "fuzz_call.h"
#include "tpfuse/ops/mode.h"

namespace tpfuse::fuzz {

// The size of the group the fuzzer's calls run on.
inline constexpr std::int64_t kGroupSize = 1;

struct Verdict {
  // Every argument that breaks a rule: "x1", "bias", "reduce_op", "out" ...
  // Rules that need a value an earlier fault left undefined (n, when x2 is
  // broken) are not checked, so each name here is at fault on its own.
  std::set<std::string> faults;
  bool accepted() const { return faults.empty(); }
  // The call as validation must describe it; meaningful when accepted.
  CallShape shape;
  // The largest output's bytes, when its dims are known and fit.
  __int128 output_bytes = 0;
};

Verdict judge(const CallSpec& spec, const MaterializedCall& call);

}  // namespace tpfuse::fuzz
