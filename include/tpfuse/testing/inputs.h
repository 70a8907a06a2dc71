// Deterministic random inputs for the operator: one place that builds every
// mode's arguments, used by the tests, the CLI's demo/run, and benchmarks.
// Any rank can rebuild any other rank's inputs from (spec, rank), so each rank
// can compute the golden result for the whole group on its own.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
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

// Owns one rank's tensors; `args` views them. x2 holds a row-major [k, n]
// weight; with spec.x2_transposed, x2 stays empty and x2_storage holds a
// row-major [n, k] whose transposed view is args.x2. Tensors a spec does not
// ask for stay empty and their options stay unset.
struct RankInputs {
  Tensor x1, x2, x2_storage, bias, antiquant_scale, antiquant_offset, x3, dequant_scale;
  RankArgs args;
};

// Builds rank `rank`'s arguments for `spec`: floats uniform in [-1, 1] (x1,
// x2, bias, x3) rounded to their dtype, int8 uniform over [-128, 127],
// weight-quant scales in [0.01, 0.05] and offsets in [-2, 2], full-quant
// bias in [-1000, 1000] and dequant scales in [0.5e-3, 1.5e-3] (packed with
// trans_quant_param for f16 output, bf16 for bf16 output). Throws
// InvalidArgument for a spec that cannot be built (m not divisible by batch,
// per-group without group_size, ...); arguments the operator would reject
// (such as a group size out of range) are built as asked.
RankInputs make_rank_inputs(const CaseSpec& spec, int rank);

// Output dtype for a spec (spec.dtype in every mode).
DType output_dtype(const CaseSpec& spec);

// A tensor of `dtype` (f16, bf16 or f32), uniform in [lo, hi) rounded to the
// dtype, drawn from the stream (seed, rank, stream) as the tensors above are.
// Streams 1 to 7 are make_rank_inputs' own; builders of other inputs use others.
Tensor uniform_tensor(DType dtype, std::span<const std::int64_t> shape, double lo, double hi,
                      std::uint64_t seed, int rank, std::uint64_t stream);

}  // namespace tpfuse::testing
