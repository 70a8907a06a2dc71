// TensorView: a non-owning description of memory (dtype, shape, strides in
// elements, pointer), the way the operator receives its arguments. Tensor: an
// owning, contiguous, 64-byte-aligned buffer that hands out views.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>

#include "tpfuse/core/dtype.h"

namespace tpfuse {

inline constexpr int kMaxDims = 4;

class TensorView {
 public:
  TensorView() = default;
  // A contiguous row-major view.
  TensorView(void* data, DType dtype, std::span<const std::int64_t> shape);
  TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape)
      : TensorView(data, dtype, std::span<const std::int64_t>(shape.begin(), shape.size())) {}
  // A strided view; strides count elements.
  TensorView(void* data, DType dtype, std::span<const std::int64_t> shape,
             std::span<const std::int64_t> strides);

  DType dtype() const { return dtype_; }
  int ndim() const { return ndim_; }
  std::int64_t size(int dim) const { return shape_[dim]; }
  std::int64_t stride(int dim) const { return strides_[dim]; }
  std::span<const std::int64_t> shape() const { return {shape_.data(), static_cast<size_t>(ndim_)}; }
  std::span<const std::int64_t> strides() const {
    return {strides_.data(), static_cast<size_t>(ndim_)};
  }
  void* data() const { return data_; }
  template <class T>
  T* data_as() const {
    return static_cast<T*>(data_);
  }

  // Product of the dims (1 for a 0-d view). Assumes it fits: validation checks that.
  std::int64_t numel() const;
  // True when the strides are those of a row-major layout (size-1 dims may have any stride).
  bool is_contiguous() const;
  // The 2-D view with dims and strides swapped (a transposed matrix).
  TensorView transposed() const;
  // "[128, 512] f16" (and the strides when not contiguous).
  std::string describe() const;

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::f32;
  int ndim_ = 0;
  std::array<std::int64_t, kMaxDims> shape_{};
  std::array<std::int64_t, kMaxDims> strides_{};
};

// An owning contiguous tensor, zero-initialised.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::span<const std::int64_t> shape);
  Tensor(DType dtype, std::initializer_list<std::int64_t> shape)
      : Tensor(dtype, std::span<const std::int64_t>(shape.begin(), shape.size())) {}

  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }  // NOLINT: views are the currency
  DType dtype() const { return view_.dtype(); }
  int ndim() const { return view_.ndim(); }
  std::int64_t size(int dim) const { return view_.size(dim); }
  std::span<const std::int64_t> shape() const { return view_.shape(); }
  std::int64_t numel() const { return view_.numel(); }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype()); }
  void* data() const { return view_.data(); }
  template <class T>
  T* data_as() const {
    return view_.data_as<T>();
  }

 private:
  struct FreeAligned {
    void operator()(void* p) const;
  };
  std::unique_ptr<void, FreeAligned> storage_;
  TensorView view_;
};

}  // namespace tpfuse
