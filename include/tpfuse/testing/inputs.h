// Deterministic random inputs for the operator: one place that builds every
// mode's arguments, used by the tests, the CLI's demo/run, and benchmarks.
// Any rank can rebuild any other rank's inputs from (spec, rank), so each rank
// can compute the golden result for the whole group on its own.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "tpfuse/core/tensor.h"
#include "tpfuse/ops/mode.h"
#include "tpfuse/testing/golden.h"

namespace tpfuse::testing {

struct CaseSpec {
  Mode mode = Mode::plain;
  DType dtype = DType::f16;       // x1's dtype for plain/weight quant; the output's for full quant
  std::int64_t batch = 0;         // > 0: x1 is 3-D [batch, m / batch, k]
  std::int64_t m = 16, n = 16;
  std::int64_t k = 32;            // per rank (see k_for_rank)
  bool uneven_k = false;          // rank r gets k + r (uneven sharding)
  bool x2_transposed = false;
  bool bias = false;
  bool x3 = false;
  ScaleKind scale_kind = ScaleKind::per_channel;  // ignored in plain mode
  bool offset = false;            // weight quant: antiquant_offset
  std::int64_t group_size = 0;    // weight quant per-group
  std::int64_t comm_turn = 0;
  std::uint64_t seed = 1;

  std::int64_t k_for_rank(int rank) const { return uneven_k ? k + rank : k; }
};

// Owns one rank's tensors; args() views them.
struct RankInputs {
  Tensor x1, x2, x2_storage, bias, antiquant_scale, antiquant_offset, x3, dequant_scale;
  RankArgs args;
};

RankInputs make_rank_inputs(const CaseSpec& spec, int rank);

// Output dtype for a spec.
DType output_dtype(const CaseSpec& spec);

}  // namespace tpfuse::testing
