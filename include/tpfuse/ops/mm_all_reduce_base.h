// mm_all_reduce_base: the fused "matrix multiply + all-reduce" of a
// row-parallel linear layer (docs/SEMANTICS.md has the full contract).
//
// Every rank of the group named `hcom` calls it collectively, in the same
// order, with its K-slice of the activations (x1) and of the weight (x2). The
// output, identical on every rank, is the sum over ranks of
//   plain:             x1 @ x2 + bias + x3
//   weight-only quant: x1 @ ((x2 + antiquant_offset) * antiquant_scale) + bias + x3
//   full quant:        dequant_scale * (x1 @ x2 + bias) + x3
// (bias and x3 are added on every rank, before the reduce).
//
// Threads: calls on one `hcom` must not overlap. Every rank must issue them
// in the same order, and two threads of a process have none, so a mutex that
// serialised them would not deadlock but would let each rank pair the calls
// in its own order, mixing one call's data into another's result. A call that
// finds another thread's call in progress on the same communicator is refused
// instead: it throws ConcurrentCallError and aborts the communicator, so the
// call in progress fails with AbortedError on every rank rather than complete
// wrongly. Threads that call at the same time use a communicator each; those
// calls run concurrently and independently.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "tpfuse/core/tensor.h"

namespace tpfuse {

struct MmAllReduceOptions {
  std::string reduce_op = "sum";
  std::optional<TensorView> bias;
  std::optional<TensorView> antiquant_scale;
  std::optional<TensorView> antiquant_offset;
  std::optional<TensorView> x3;
  std::optional<TensorView> dequant_scale;
  // 0: tpfuse picks the tiling along M; N > 0: exactly N tiles (capped at m).
  std::int64_t comm_turn = 0;
  std::int64_t antiquant_group_size = 0;
};

// Returns a new tensor holding the reduced output ([m, n] or [b, s, n]).
Tensor mm_all_reduce_base(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                          const MmAllReduceOptions& options = {});

// Writes the reduced output into `out`, which must have the output's dtype and
// shape, be contiguous, and not overlap any input.
void mm_all_reduce_base_out(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                            const MmAllReduceOptions& options, const TensorView& out);

}  // namespace tpfuse
