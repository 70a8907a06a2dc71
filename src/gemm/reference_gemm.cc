// The reference engine. prepare converts x2 once per call into a row-major
// [k, n] fp32 matrix (dequantized in weight-only mode) or an int32 matrix (full
// quant); compute_rows then runs, per output row, acc[:] += x1[i, l] * B[l, :]
// for l = 0..k-1. The order of operations depends only on the row, so a row's
// result is the same whatever tile it is computed in.
#include "gemm/reference_gemm.h"

#include <vector>

#include "gemm/operand_access.h"

namespace tpfuse::gemm {

namespace {

class ReferenceGemm final : public PreparedGemm {
 public:
  explicit ReferenceGemm(const GemmOperands& operands)
      : ops_(operands), row_scales_(row_scales(operands)) {
    const GemmProblem& s = ops_.shape;
    if (s.mode == Mode::full_quant) {
      prepare_full_quant();
    } else {
      prepare_float();
    }
  }

  const char* engine() const override { return "reference"; }

  void compute_rows(std::int64_t m0, std::int64_t m1, void* dst, std::int64_t ld) const override {
    if (ops_.shape.mode == Mode::full_quant) {
      compute_full_quant(m0, m1, dst, ld);
    } else {
      compute_float(m0, m1, dst, ld);
    }
  }

 private:
  std::int64_t x2_index(std::int64_t l, std::int64_t j) const {
    return l * ops_.x2.stride(0) + j * ops_.x2.stride(1);
  }

  void prepare_float() {
    const GemmProblem& s = ops_.shape;
    weights_f32_.resize(static_cast<std::size_t>(s.k * s.n));
    for (std::int64_t l = 0; l < s.k; ++l) {
      for (std::int64_t j = 0; j < s.n; ++j) {
        float w;
        if (s.mode == Mode::weight_quant) {
          const std::int64_t si = scale_index(s, l, j);
          const float q = static_cast<float>(ops_.x2.data_as<const std::int8_t>()[x2_index(l, j)]);
          w = dequantize_weight(q, ops_.offset ? load_as_f32(*ops_.offset, si) : 0.0f,
                                load_as_f32(*ops_.scale, si));
        } else {
          w = load_operand_f32(ops_.x2, x2_index(l, j));
        }
        weights_f32_[static_cast<std::size_t>(l * s.n + j)] = w;
      }
    }
    if (ops_.bias) {
      bias_f32_.resize(static_cast<std::size_t>(s.n));
      for (std::int64_t j = 0; j < s.n; ++j) bias_f32_[j] = load_as_f32(*ops_.bias, j);
    }
  }

  void prepare_full_quant() {
    const GemmProblem& s = ops_.shape;
    weights_i32_.resize(static_cast<std::size_t>(s.k * s.n));
    for (std::int64_t l = 0; l < s.k; ++l) {
      for (std::int64_t j = 0; j < s.n; ++j) {
        weights_i32_[static_cast<std::size_t>(l * s.n + j)] =
            ops_.x2.data_as<const std::int8_t>()[x2_index(l, j)];
      }
    }
    bias_i32_.assign(static_cast<std::size_t>(s.n), 0);
    if (ops_.bias) {
      for (std::int64_t j = 0; j < s.n; ++j) bias_i32_[j] = ops_.bias->data_as<const std::int32_t>()[j];
    }
    scales_.resize(static_cast<std::size_t>(s.n));
    const bool per_tensor = s.scale_kind == ScaleKind::per_tensor;
    for (std::int64_t j = 0; j < s.n; ++j) {
      const std::int64_t si = per_tensor ? 0 : j;
      scales_[j] = ops_.scale->dtype() == DType::i64
                       ? unpack_quant_scale(ops_.scale->data_as<const std::int64_t>()[si])
                       : load_as_f32(*ops_.scale, si);
    }
  }

  void compute_float(std::int64_t m0, std::int64_t m1, void* dst, std::int64_t ld) const {
    const GemmProblem& s = ops_.shape;
    std::vector<float> acc(static_cast<std::size_t>(s.n));
    for (std::int64_t i = m0; i < m1; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (std::int64_t l = 0; l < s.k; ++l) {
        const float a = load_operand_f32(ops_.x1, i * s.k + l);
        const float* w = &weights_f32_[static_cast<std::size_t>(l * s.n)];
        for (std::int64_t j = 0; j < s.n; ++j) acc[j] += a * w[j];
      }
      for (std::int64_t j = 0; j < s.n; ++j) {
        float v = acc[j];
        if (ops_.bias) v += bias_f32_[j];
        if (ops_.x3) v += load_as_f32(*ops_.x3, i * s.n + j);
        store_from_f32(dst, s.out_dtype, (i - m0) * ld + j, v);
      }
    }
  }

  void compute_full_quant(std::int64_t m0, std::int64_t m1, void* dst, std::int64_t ld) const {
    const GemmProblem& s = ops_.shape;
    const auto* x1 = ops_.x1.data_as<const std::int8_t>();
    // int32 arithmetic that wraps on overflow, as the device's int32 sum does.
    std::vector<std::uint32_t> acc(static_cast<std::size_t>(s.n));
    for (std::int64_t i = m0; i < m1; ++i) {
      for (std::int64_t j = 0; j < s.n; ++j) acc[j] = static_cast<std::uint32_t>(bias_i32_[j]);
      for (std::int64_t l = 0; l < s.k; ++l) {
        const std::int32_t a = x1[i * s.k + l];
        const std::int32_t* w = &weights_i32_[static_cast<std::size_t>(l * s.n)];
        for (std::int64_t j = 0; j < s.n; ++j) acc[j] += static_cast<std::uint32_t>(a * w[j]);
      }
      for (std::int64_t j = 0; j < s.n; ++j) {
        const float scale = row_scales_ != nullptr ? row_scales_[i] * scales_[j] : scales_[j];
        float v = static_cast<float>(static_cast<std::int32_t>(acc[j])) * scale;
        if (ops_.x3) v += load_as_f32(*ops_.x3, i * s.n + j);
        store_from_f32(dst, s.out_dtype, (i - m0) * ld + j, v);
      }
    }
  }

  GemmOperands ops_;
  std::vector<float> weights_f32_, bias_f32_, scales_;
  std::vector<std::int32_t> weights_i32_, bias_i32_;
  const float* row_scales_ = nullptr;  // full quant: per row of x1, or null
};

}  // namespace

std::unique_ptr<PreparedGemm> prepare_reference_gemm(const GemmOperands& operands) {
  return std::make_unique<ReferenceGemm>(operands);
}

}  // namespace tpfuse::gemm
