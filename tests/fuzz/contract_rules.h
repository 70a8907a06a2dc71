// The contract model's shared rules (contract_model.cc) and its judges per
// operator: what every tensor argument must be, x2's layouts, and the rules
// of mm_all_reduce_base's GEMM arguments, which mm_all_reduce_add_rms_norm
// takes with the same rules.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <vector>

#include "contract_model.h"

namespace tpfuse::fuzz::contract {

using Int = __int128;
inline constexpr Int kInt64Max = std::numeric_limits<std::int64_t>::max();

// a * b for a, b >= 0, saturating far above int64.
Int capped_mul(Int a, Int b);
Int element_size(DType dtype);

// A view any argument may be: a dtype of the enum, a pointer, dims and
// strides >= 0, and an element count, byte size and byte extent that int64
// holds.
bool sane(const ArgSpec& arg);
bool non_empty(const ArgSpec& arg);
// Row-major (contiguous): each dim's stride is the product of the dims after
// it, except that a dim of size 1 may have any stride.
bool row_major(const ArgSpec& arg);
bool has_shape(const ArgSpec& arg, std::initializer_list<std::int64_t> dims);
// Whether two present arguments' views share a byte (both sane).
bool overlap(const CallSpec& spec, const MaterializedCall& call, Arg a, Arg b);

// x2: [k, n], row-major or a transposed view of a row-major [n, k].
struct X2Layout {
  bool ok = false;
  bool transposed = false;
};
X2Layout judge_x2(const ArgSpec& x2);

// What the GEMM's rules learned, for the rules that need it.
struct GemmFacts {
  bool x1_ok = false;
  bool dims_known = false;  // m, k and n in the verdict's shape
  std::optional<Mode> mode;
  std::optional<DType> out_dtype;
};

// mm_all_reduce_base's rules on reduce_op, comm_turn, x1, x2, the mode's
// scales and antiquant_group_size, and bias: the verdict's faults and shape.
GemmFacts judge_gemm(const CallSpec& spec, Verdict& verdict);

Verdict judge_sequence_parallel(const CallSpec& spec, const MaterializedCall& call);
Verdict judge_add_rms_norm(const CallSpec& spec, const MaterializedCall& call);

}  // namespace tpfuse::fuzz::contract
