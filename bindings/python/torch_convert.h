// What every operator of the binding shares: tpfuse's errors as c10 errors,
// at::Tensor as the TensorView the library reads, and library-allocated
// results as at::Tensor.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

#include "tpfuse/tpfuse.h"

namespace tpfuse::torch_binding {

// Runs `body`, turning tpfuse's errors into the c10 errors torch maps to
// Python exceptions. The empty backtrace keeps the message exactly the
// library's.
template <class Body>
auto translate_errors(Body&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const InvalidArgument& error) {
    throw c10::ValueError(error.what(), "");
  } catch (const Error& error) {
    throw c10::Error(error.what(), "");
  }
}

// tpfuse's dtypes and torch's, both ways.
struct DTypePair {
  DType dtype;
  at::ScalarType scalar_type;
};
inline constexpr DTypePair kDTypes[] = {
    {DType::f16, at::kHalf}, {DType::bf16, at::kBFloat16}, {DType::f32, at::kFloat},
    {DType::i8, at::kChar},  {DType::i32, at::kInt},       {DType::i64, at::kLong},
};

inline DType to_dtype(const char* name, at::ScalarType type) {
  for (const DTypePair& pair : kDTypes) {
    if (pair.scalar_type == type) return pair.dtype;
  }
  throw InvalidArgument(cat(name, ": dtype ", c10::toString(type),
                            " has no tpfuse equivalent (tpfuse takes Half, BFloat16, "
                            "Float, Char, Int or Long)"));
}

inline at::ScalarType to_scalar_type(DType dtype) {
  for (const DTypePair& pair : kDTypes) {
    if (pair.dtype == dtype) return pair.scalar_type;
  }
  throw InternalError(cat("no torch dtype for ", dtype_name(dtype)));
}

// Torch leaves the pointer of an empty tensor null; any non-null address lets
// the library report the emptiness itself, with its own message.
inline void* data_of(const at::Tensor& tensor) {
  static std::byte empty_tensor_anchor;
  void* data = tensor.data_ptr();
  return data == nullptr && tensor.numel() == 0 ? &empty_tensor_anchor : data;
}

inline TensorView to_view(const char* name, const at::Tensor& tensor) {
  require(tensor.dim() <= kMaxDims, name, ": expected at most ", kMaxDims, " dims, got ",
          tensor.dim());
  const DType dtype = to_dtype(name, tensor.scalar_type());
  return TensorView(
      data_of(tensor), dtype,
      std::span<const std::int64_t>(tensor.sizes().data(), tensor.sizes().size()),
      std::span<const std::int64_t>(tensor.strides().data(), tensor.strides().size()));
}

inline std::optional<TensorView> to_view(const char* name,
                                         const c10::optional<at::Tensor>& tensor) {
  if (!tensor.has_value() || !tensor->defined()) return std::nullopt;
  return to_view(name, *tensor);
}

// ---- the layouts the kernels read ----
//
// torch_npu code passes slices, transposes and expanded tensors. The GEMM
// reads x2 in place when it is row-major or a transposed view of a row-major
// [n, k] (how weights are stored); every other tensor the library reads
// row-major, so anything else is copied into that layout first (no copy when
// it has it already).
inline at::Tensor as_read(const at::Tensor& tensor) { return tensor.contiguous(); }

inline c10::optional<at::Tensor> as_read(const c10::optional<at::Tensor>& tensor) {
  if (!tensor.has_value() || !tensor->defined()) return tensor;
  return tensor->contiguous();
}

// A transposed row-major [n, k] is recognised from its strides (size-1 dims
// may have any), without building the transposed view: no op shows up inside
// the operator's profiler event.
inline at::Tensor weight_as_read(const at::Tensor& x2) {
  const bool transposed_row_major = x2.dim() == 2 && (x2.size(0) == 1 || x2.stride(0) == 1) &&
                                    (x2.size(1) == 1 || x2.stride(1) == x2.size(0));
  return transposed_row_major ? x2 : x2.contiguous();
}

// Whether two optional arguments are the same tensor (or both absent).
inline bool same(const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& b) {
  const bool has_a = a.has_value() && a->defined();
  const bool has_b = b.has_value() && b->defined();
  return has_a == has_b && (!has_a || a->is_same(*b));
}

// A weight's own arguments, as the call was given them.
struct WeightArgs {
  const c10::optional<at::Tensor>& antiquant_scale;
  const c10::optional<at::Tensor>& antiquant_offset;
  const c10::optional<at::Tensor>& dequant_scale;
  std::int64_t antiquant_group_size;
};

// The packing the binding keeps for x2 (torch_ops.cc), made on its first
// call; null where the call is not cached: x2 or a scale that the library
// cannot read where it lies (`x2_read` is not x2 itself, or a scale was
// copied), inference tensors, or a cache turned off.
std::shared_ptr<const PackedWeight> cached_packed_weight(const at::Tensor& x1, const at::Tensor& x2,
                                                         const at::Tensor& x2_read,
                                                         const WeightArgs& given,
                                                         const WeightArgs& read);

inline std::string_view group_of(c10::string_view hcom) { return {hcom.data(), hcom.size()}; }

// The library allocates its results (it learns their shapes and dtypes only
// once every rank has validated and agreed); torch adopts those buffers.
inline at::Tensor adopt(Tensor&& result) {
  const std::vector<std::int64_t> sizes(result.shape().begin(), result.shape().end());
  const auto options = at::TensorOptions().dtype(to_scalar_type(result.dtype())).device(at::kCPU);
  if (result.numel() == 0) return at::empty(sizes, options);
  auto owner = std::make_unique<Tensor>(std::move(result));
  void* data = owner->data();
  return at::from_blob(
      data, sizes, [owner = owner.release()](void*) { delete owner; }, options);
}

inline bool requires_grad(const c10::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined() && tensor->requires_grad();
}
inline bool requires_grad(const at::Tensor& tensor) {
  return tensor.defined() && tensor.requires_grad();
}

// Whether autograd would record a call on these inputs (all of a call's
// tensors): grad mode on and one of them requiring grad. A call it would not record skips
// the autograd Function, whose bookkeeping was most of a small call's time.
template <class... Inputs>
bool records_gradients(const Inputs&... inputs) {
  return at::GradMode::is_enabled() && (requires_grad(inputs) || ...);
}

}  // namespace tpfuse::torch_binding
