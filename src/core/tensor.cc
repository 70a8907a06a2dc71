#include "tpfuse/core/tensor.h"

#include <cstdlib>
#include <cstring>

#include "tpfuse/core/error.h"

namespace tpfuse {

namespace {

// Products of dims wrap instead of overflowing (signed overflow is undefined):
// a view may describe an impossible size, which validation then rejects.
std::int64_t wrapping_mul(std::int64_t a, std::int64_t b) {
  return static_cast<std::int64_t>(static_cast<std::uint64_t>(a) * static_cast<std::uint64_t>(b));
}

void check_rank(std::size_t ndim) {
  require(ndim <= static_cast<std::size_t>(kMaxDims), "tensor: expected at most ", kMaxDims,
          " dims, got ", ndim);
}

}  // namespace

TensorView::TensorView(void* data, DType dtype, std::span<const std::int64_t> shape)
    : data_(data), dtype_(dtype), ndim_(static_cast<int>(shape.size())) {
  check_rank(shape.size());
  std::int64_t stride = 1;
  for (int d = ndim_ - 1; d >= 0; --d) {
    shape_[d] = shape[d];
    strides_[d] = stride;
    stride = wrapping_mul(stride, shape[d]);
  }
}

TensorView::TensorView(void* data, DType dtype, std::span<const std::int64_t> shape,
                       std::span<const std::int64_t> strides)
    : data_(data), dtype_(dtype), ndim_(static_cast<int>(shape.size())) {
  check_rank(shape.size());
  require(strides.size() == shape.size(), "tensor: got ", shape.size(), " dims but ",
          strides.size(), " strides");
  for (int d = 0; d < ndim_; ++d) {
    shape_[d] = shape[d];
    strides_[d] = strides[d];
  }
}

std::int64_t TensorView::numel() const {
  std::int64_t n = 1;
  for (int d = 0; d < ndim_; ++d) n = wrapping_mul(n, shape_[d]);
  return n;
}

bool TensorView::is_contiguous() const {
  std::int64_t expected = 1;
  for (int d = ndim_ - 1; d >= 0; --d) {
    if (shape_[d] != 1 && strides_[d] != expected) return false;
    expected = wrapping_mul(expected, shape_[d]);
  }
  return true;
}

TensorView TensorView::transposed() const {
  if (ndim_ != 2) throw InvalidArgument(cat("transposed: expected a 2-D view, got ", describe()));
  const std::int64_t shape[2] = {shape_[1], shape_[0]};
  const std::int64_t strides[2] = {strides_[1], strides_[0]};
  return TensorView(data_, dtype_, shape, strides);
}

std::string TensorView::describe() const {
  std::string out = "[";
  for (int d = 0; d < ndim_; ++d) {
    if (d) out += ", ";
    out += std::to_string(shape_[d]);
  }
  out += "] ";
  out += dtype_name(dtype_);
  if (!is_contiguous()) {
    out += " strides [";
    for (int d = 0; d < ndim_; ++d) {
      if (d) out += ", ";
      out += std::to_string(strides_[d]);
    }
    out += "]";
  }
  return out;
}

void Tensor::FreeAligned::operator()(void* p) const { std::free(p); }

Tensor::Tensor(DType dtype, std::span<const std::int64_t> shape) {
  TensorView shaped(nullptr, dtype, shape);
  // The message is built only when a dim is negative: require() would
  // format it for every tensor made.
  for (auto dim : shape) {
    if (dim < 0) throw InvalidArgument(cat("tensor: negative dim in ", shaped.describe()));
  }
  const std::size_t bytes = static_cast<std::size_t>(shaped.numel()) * dtype_size(dtype);
  const std::size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (p == nullptr) throw SystemError(cat("tensor: cannot allocate ", bytes, " bytes"));
  std::memset(p, 0, rounded == 0 ? 64 : rounded);
  storage_.reset(p);
  view_ = TensorView(p, dtype, shape);
}

}  // namespace tpfuse
