#include "tpfuse/ops/packed_weight.h"

#include <algorithm>

#include "tpfuse/core/error.h"
#include "tpfuse/gemm/tile_gemm.h"
#include "tpfuse/ops/gemm_operands.h"
#include "tpfuse/ops/validate.h"

namespace tpfuse {

namespace {

bool same_view(const TensorView& a, const TensorView& b) {
  if (a.data() != b.data() || a.dtype() != b.dtype() || a.ndim() != b.ndim()) return false;
  for (int d = 0; d < a.ndim(); ++d) {
    if (a.size(d) != b.size(d) || a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

void check_same(const char* name, const std::optional<TensorView>& packed,
                const std::optional<TensorView>& given) {
  if (!packed && !given) return;
  if (packed && given && same_view(*packed, *given)) return;
  throw InvalidArgument(cat(name, ": expected the tensor x2 was packed with (",
                            packed ? packed->describe() : "none", "), got ",
                            given ? given->describe() : "none"));
}

}  // namespace

PackedWeight::PackedWeight(DType x1_dtype, const TensorView& x2, const MmAllReduceOptions& weight)
    : x1_dtype_(x1_dtype), x2_(x2) {
  weight_.antiquant_scale = weight.antiquant_scale;
  weight_.antiquant_offset = weight.antiquant_offset;
  weight_.antiquant_group_size = weight.antiquant_group_size;
  weight_.dequant_scale = weight.dequant_scale;
  // Validated as a call of one row would be: the rules on x2 and its scales.
  const std::int64_t k = x2.ndim() == 2 ? x2.size(0) : 1;
  const Tensor one_row(x1_dtype, {1, std::max<std::int64_t>(k, 1)});
  const CallShape shape = validate_call(one_row, x2, weight_);
  packing_ = gemm::pack_x2(make_gemm_operands(shape, one_row, x2, weight_));
}

std::size_t PackedWeight::packed_bytes() const { return packing_ ? packing_->bytes() : 0; }

void PackedWeight::check_call(const TensorView& x1, const MmAllReduceOptions& options,
                              const char* dequant_name) const {
  if (x1.dtype() != x1_dtype_) {
    throw InvalidArgument(cat("x1: expected dtype ", dtype_name(x1_dtype_), " (x2 was packed for it), got ",
                              x1.describe()));
  }
  check_same("antiquant_scale", weight_.antiquant_scale, options.antiquant_scale);
  check_same("antiquant_offset", weight_.antiquant_offset, options.antiquant_offset);
  check_same(dequant_name, weight_.dequant_scale, options.dequant_scale);
  if (options.antiquant_group_size != weight_.antiquant_group_size) {
    throw InvalidArgument(cat("antiquant_group_size: expected ", weight_.antiquant_group_size,
                              " (x2 was packed with it), got ", options.antiquant_group_size));
  }
}

}  // namespace tpfuse
