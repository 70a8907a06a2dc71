// Runs one operator case across local ranks: each rank builds its inputs,
// calls the operator repeatedly, checks its outputs against a reference
// (case_ops.cc), and the ranks compare the outputs the contract makes the
// same on every rank without sending them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "operators.h"
#include "tpfuse/comm/launcher.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse::cli {

// One case: the operator and its inputs. spec.m is the rows of x1 on each
// rank (all_gather_mm: the rows each rank contributes; mm_reduce_scatter: the
// rows of the whole product, m / p per rank); spec.k each rank's columns of x1.
struct OpCase {
  FusedOp op = FusedOp::mm_all_reduce;
  testing::CaseSpec spec;
  double epsilon = 1e-6;  // mm_all_reduce_add_rms_norm
  bool uneven_n = false;  // all_gather_mm: rank r holds n + r columns of x2
  bool x1_scale = false;  // the quant path of all_gather_mm and mm_reduce_scatter: a per-token x1_scale
};

struct CaseResult {
  bool ran = false;              // false: a rank failed; see error
  bool identical_across_ranks = false;
  bool checked = false;  // compared against the reference
  testing::Comparison comparison;
  double seconds_per_call = 0;   // median over the timed calls, on rank 0
  std::string error;
};

// One rank's call of a case's operator (make_rank_call, case_ops.cc).
struct RankCall {
  std::function<void()> call;          // one call, writing the outputs in place
  std::vector<TensorView> replicated;  // outputs the contract makes bitwise the same on every rank
  // Collective (every rank calls it once, after the timed calls): this
  // rank's outputs against the reference, or nullopt where this rank checks
  // nothing (another rank checks the replicated outputs).
  std::function<std::optional<testing::Comparison>()> check;
};

RankCall make_rank_call(comm::RankContext& ctx, const OpCase& c);

// Adds comparison `c` of more elements to `into`: every mismatch, and the
// largest error with the bound at that element.
void add_comparison(testing::Comparison& into, const testing::Comparison& c);

// What the verdict says of the replicated outputs: "identical",
// "gather_out identical", ...; empty where each rank has outputs of its own.
std::string_view replicated_outputs(FusedOp op);

CaseResult run_case(const OpCase& c, int ranks, int iterations, bool check);

// The same, as one rank of a group that something else started (mpirun):
// every rank calls it; rank 0 gets the result, the others nothing. A rank
// that fails throws (its peers then fail at their deadline or at once).
std::optional<CaseResult> run_case_on(comm::RankContext& ctx, const OpCase& c, int iterations, bool check);

// "plain f16", "weight_quant bf16 per_group(G=32) +offset", ...
std::string describe_mode(const testing::CaseSpec& spec);
// "[128, 512] x [512, 64]" (x1 as given on each rank, per-rank k).
std::string describe_shape(const testing::CaseSpec& spec);

// FNV-1a of the bytes: how ranks compare their outputs without sending them.
std::uint64_t fnv1a(const void* data, std::size_t bytes);

// Prints the table header / one row (operator, mode, shape, ranks, max error,
// tolerance, time, verdict).
void print_table_header();
void print_table_row(const OpCase& c, int ranks, const CaseResult& result);

}  // namespace tpfuse::cli
