#include "tpfuse/ops/gemm_operands.h"

namespace tpfuse {

gemm::GemmOperands make_gemm_operands(const CallShape& shape, const TensorView& x1,
                                      const TensorView& x2, const MmAllReduceOptions& options) {
  gemm::GemmOperands ops;
  ops.shape = shape;
  const std::int64_t x1_shape[2] = {shape.m, shape.k};
  ops.x1 = TensorView(x1.data(), x1.dtype(), x1_shape);
  // x2 as validated: a row-major [k, n] or a transposed row-major [n, k],
  // whose size-1 dims may carry any stride (never stepped over). oneDNN reads
  // such a stride as a layout all the same (a [k, 1] of strides [1, 2] gave
  // garbage), so the engines get the canonical strides of the same memory.
  const std::int64_t x2_shape[2] = {shape.k, shape.n};
  const std::int64_t x2_strides[2] = {shape.x2_transposed ? 1 : shape.n,
                                      shape.x2_transposed ? shape.k : 1};
  ops.x2 = TensorView(x2.data(), x2.dtype(), x2_shape, x2_strides);
  ops.bias = options.bias;
  if (options.x3) {
    const std::int64_t x3_shape[2] = {shape.m, shape.n};
    ops.x3 = TensorView(options.x3->data(), options.x3->dtype(), x3_shape);
  }
  ops.scale = shape.mode == Mode::full_quant ? options.dequant_scale : options.antiquant_scale;
  ops.offset = options.antiquant_offset;
  return ops;
}

}  // namespace tpfuse
