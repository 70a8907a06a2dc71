// The operator: validate -> agree across ranks -> compute tiles along M and
// all-reduce each one. A tile's reduce is started as soon as the tile is
// computed and completed after the next tile is computed, so the two overlap
// as far as the transport allows; the overlap planner refines the tiling.
#include "tpfuse/ops/mm_all_reduce_base.h"

#include <algorithm>
#include <optional>

#include "ops/agreement.h"
#include "ops/test_hooks.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"
#include "tpfuse/gemm/tile_gemm.h"
#include "tpfuse/ops/validate.h"

namespace tpfuse {

namespace {

std::vector<std::int64_t> output_shape(const CallShape& s) {
  if (s.batch > 0) return {s.batch, s.seq, s.n};
  return {s.m, s.n};
}

gemm::GemmOperands make_operands(const CallShape& shape, const TensorView& x1,
                                 const TensorView& x2, const MmAllReduceOptions& options) {
  gemm::GemmOperands ops;
  ops.shape = shape;
  const std::int64_t x1_shape[2] = {shape.m, shape.k};
  ops.x1 = TensorView(x1.data(), x1.dtype(), x1_shape);
  ops.x2 = x2;
  ops.bias = options.bias;
  if (options.x3) {
    const std::int64_t x3_shape[2] = {shape.m, shape.n};
    ops.x3 = TensorView(options.x3->data(), options.x3->dtype(), x3_shape);
  }
  ops.scale = shape.mode == Mode::full_quant ? options.dequant_scale : options.antiquant_scale;
  ops.offset = options.antiquant_offset;
  return ops;
}

// Equal tiles along M: comm_turn > 0 asks for exactly that many (capped at m).
std::int64_t tile_count(const CallShape& shape) {
  if (shape.comm_turn > 0) return std::min(shape.comm_turn, shape.m);
  return 1;
}

void run(const CallShape& shape, const TensorView& x1, const TensorView& x2,
         const MmAllReduceOptions& options, const TensorView& out, comm::Communicator& comm) {
  const auto gemm = gemm::prepare_gemm(make_operands(shape, x1, x2, options));
  const std::int64_t tiles = tile_count(shape);
  const std::size_t elem = dtype_size(shape.out_dtype);
  auto* out_bytes = static_cast<std::byte*>(out.data());
  log::debug("mm_all_reduce_base: m=", shape.m, " k=", shape.k, " n=", shape.n, " mode=",
             mode_name(shape.mode), " tiles=", tiles, " engine=", gemm->engine());

  std::unique_ptr<comm::Work> in_flight;
  for (std::int64_t t = 0; t < tiles; ++t) {
    const std::int64_t m0 = shape.m * t / tiles;
    const std::int64_t m1 = shape.m * (t + 1) / tiles;
    std::byte* rows = out_bytes + static_cast<std::size_t>(m0 * shape.n) * elem;
    gemm->compute_rows(m0, m1, rows, shape.n);
    test_hooks::after_tile_computed(t);
    if (in_flight) in_flight->wait();
    in_flight = comm.all_reduce_start(rows, rows, static_cast<std::size_t>((m1 - m0) * shape.n),
                                      shape.out_dtype);
  }
  in_flight->wait();
}

// Validates locally, then agrees with the peers; returns the validated shape.
CallShape validate_and_agree(const TensorView& x1, const TensorView& x2,
                             const MmAllReduceOptions& options, const TensorView* out,
                             comm::Communicator& comm) {
  std::optional<CallShape> shape;
  std::string error;
  try {
    shape = validate_call(x1, x2, options);
    if (out != nullptr) validate_out(*shape, *out, x1, x2, options);
  } catch (const InvalidArgument& e) {
    shape.reset();
    error = e.what();
  }
  check_agreement(comm, shape, error);
  return *shape;
}

}  // namespace

Tensor mm_all_reduce_base(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                          const MmAllReduceOptions& options) {
  const auto comm = comm::find_communicator(hcom);
  const CallShape shape = validate_and_agree(x1, x2, options, nullptr, *comm);
  Tensor out(shape.out_dtype, output_shape(shape));
  run(shape, x1, x2, options, out, *comm);
  return out;
}

void mm_all_reduce_base_out(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                            const MmAllReduceOptions& options, const TensorView& out) {
  const auto comm = comm::find_communicator(hcom);
  const CallShape shape = validate_and_agree(x1, x2, options, &out, *comm);
  run(shape, x1, x2, options, out, *comm);
}

}  // namespace tpfuse
