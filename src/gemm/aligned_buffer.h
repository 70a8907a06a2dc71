// A 64-byte-aligned, uninitialised heap buffer for packed operands and
// per-thread scratch: vector loads of packed panels want cache-line
// alignment, and std::vector would zero-fill megabytes for nothing.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace tpfuse::gemm {

template <class T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(std::size_t count) { resize(count); }

  // Grows to at least count elements; the contents are not kept.
  void resize(std::size_t count) {
    if (count <= count_) return;
    const std::size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    data_.reset(static_cast<T*>(p));
    count_ = count;
  }
  T* data() const { return data_.get(); }
  std::size_t size() const { return count_; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  std::size_t count_ = 0;
};

}  // namespace tpfuse::gemm
