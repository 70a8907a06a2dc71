#include "gemm/column_tables.h"

#include <algorithm>
#include <utility>

#include "gemm/operand_access.h"

namespace tpfuse::gemm {

namespace {

void zeroed(AlignedBuffer<float>& buffer, std::int64_t count) {
  buffer.resize(static_cast<std::size_t>(count));
  std::fill(buffer.data(), buffer.data() + count, 0.0f);
}

// Elements first, first + stride, ... (count of them) of a scale or offset
// view as fp32, load_as_f32's values without its dtype switch per element:
// a call converts all of a per-group table ([k / G, n]), which one element
// at a time took 60 us of a 340 us decode step (n = 5632, k = 1024, G = 128).
void load_row(const TensorView& view, std::int64_t first, std::int64_t stride, std::int64_t count,
              float* out) {
  switch (view.dtype()) {
    case DType::bf16: {
      const BFloat16* in = view.data_as<const BFloat16>() + first;
      for (std::int64_t j = 0; j < count; ++j) out[j] = bf16_to_f32(in[j * stride]);
      return;
    }
    case DType::f16: {
      const Half* in = view.data_as<const Half>() + first;
      for (std::int64_t j = 0; j < count; ++j) out[j] = f16_to_f32(in[j * stride]);
      return;
    }
    default:
      for (std::int64_t j = 0; j < count; ++j) out[j] = load_as_f32(view, first + j * stride);
  }
}

}  // namespace

ColumnTables::ColumnTables(const GemmOperands& ops, std::int64_t n_padded,
                           std::shared_ptr<const WeightScales> weight)
    : n_padded_(n_padded), weight_(std::move(weight)) {
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
  if (s.mode != Mode::weight_quant || weight_) return;
  auto made = std::make_shared<WeightScales>();
  const std::int64_t groups = (s.k + group_rows_ - 1) / group_rows_;
  zeroed(made->scales, groups * n_padded);
  made->has_offset = ops.offset.has_value();
  if (made->has_offset) zeroed(made->offsets, groups * n_padded);
  const std::int64_t stride = s.scale_kind == ScaleKind::per_tensor ? 0 : 1;
  for (std::int64_t g = 0; g < groups; ++g) {
    const std::int64_t first = scale_index(s, g * group_rows_, 0);
    load_row(*ops.scale, first, stride, s.n, made->scales.data() + g * n_padded);
    if (made->has_offset) {
      load_row(*ops.offset, first, stride, s.n, made->offsets.data() + g * n_padded);
    }
  }
  weight_ = std::move(made);
}

}  // namespace tpfuse::gemm
