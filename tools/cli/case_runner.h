// Runs one operator case across local ranks: each rank builds its inputs,
// calls mm_all_reduce_base repeatedly, and rank 0 checks the output against
// the golden model and that every rank got bitwise the same bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "tpfuse/comm/launcher.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse::cli {

struct CaseResult {
  bool ran = false;              // false: a rank failed; see error
  bool identical_across_ranks = false;
  bool checked = false;          // compared against the golden model
  testing::Comparison comparison;
  double seconds_per_call = 0;   // median over the timed calls, on rank 0
  std::string error;
};

CaseResult run_case(const testing::CaseSpec& spec, int ranks, int iterations, bool check);

// The same, as one rank of a group that something else started (mpirun):
// every rank calls it; rank 0 gets the result, the others nothing. A rank
// that fails throws (its peers then fail at their deadline or at once).
std::optional<CaseResult> run_case_on(comm::RankContext& ctx, const testing::CaseSpec& spec,
                                      int iterations, bool check);

// "plain f16", "weight_quant bf16 per_group(G=32) +offset", ...
std::string describe_mode(const testing::CaseSpec& spec);
// "[128, 512] x [512, 64]" (x1 as given on each rank, per-rank k).
std::string describe_shape(const testing::CaseSpec& spec);

// FNV-1a of the bytes: how ranks compare their outputs without sending them.
std::uint64_t fnv1a(const void* data, std::size_t bytes);

// Prints the table header / one row (mode, shape, ranks, max error, tolerance, time).
void print_table_header();
void print_table_row(const testing::CaseSpec& spec, int ranks, const CaseResult& result);

}  // namespace tpfuse::cli
