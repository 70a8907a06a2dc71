#include "gemm/column_tables.h"

#include <algorithm>

#include "gemm/operand_access.h"

namespace tpfuse::gemm {

namespace {

void zeroed(AlignedBuffer<float>& buffer, std::int64_t count) {
  buffer.resize(static_cast<std::size_t>(count));
  std::fill(buffer.data(), buffer.data() + count, 0.0f);
}

}  // namespace

ColumnTables::ColumnTables(const GemmOperands& ops, std::int64_t n_padded) : n_padded_(n_padded) {
  const GemmProblem& s = ops.shape;
  group_rows_ = s.scale_kind == ScaleKind::per_group ? s.group_size : s.k;
  if (s.mode == Mode::full_quant) {
    zeroed(dequant_, n_padded);
    for (std::int64_t j = 0; j < s.n; ++j) {
      const std::int64_t index = s.scale_kind == ScaleKind::per_tensor ? 0 : j;
      dequant_.data()[j] = ops.scale->dtype() == DType::i64
                               ? unpack_quant_scale(ops.scale->data_as<const std::int64_t>()[index])
                               : load_as_f32(*ops.scale, index);
    }
    return;  // its int32 bias is read as it is
  }
  if (ops.bias) {
    has_bias_ = true;
    zeroed(bias_, n_padded);
    for (std::int64_t j = 0; j < s.n; ++j) bias_.data()[j] = load_as_f32(*ops.bias, j);
  }
  if (s.mode != Mode::weight_quant) return;
  const std::int64_t groups = (s.k + group_rows_ - 1) / group_rows_;
  zeroed(scales_, groups * n_padded);
  has_offset_ = ops.offset.has_value();
  if (has_offset_) zeroed(offsets_, groups * n_padded);
  for (std::int64_t g = 0; g < groups; ++g) {
    for (std::int64_t j = 0; j < s.n; ++j) {
      const std::int64_t index = scale_index(s, g * group_rows_, j);
      scales_.data()[g * n_padded + j] = load_as_f32(*ops.scale, index);
      if (has_offset_) offsets_.data()[g * n_padded + j] = load_as_f32(*ops.offset, index);
    }
  }
}

}  // namespace tpfuse::gemm
