// A 64-byte-aligned, uninitialised heap buffer for packed operands and
// per-thread scratch: vector loads of packed panels want cache-line
// alignment, and std::vector would zero-fill megabytes for nothing.
//
// Large buffers (packed weights: every operator call prepares its x2 anew)
// come from a small process-wide cache of freed blocks, backed by huge pages
// where the OS offers them: a fresh 16 MiB allocation costs thousands of page
// faults, a few percent of a 2048^3 GEMM.
#pragma once

#include <cstddef>
#include <memory>

namespace tpfuse::gemm {

// Raw blocks behind AlignedBuffer; release_block takes what acquire_block gave.
void* acquire_block(std::size_t bytes);
void release_block(void* block, std::size_t bytes);

template <class T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(std::size_t count) { resize(count); }

  // Grows to at least count elements; the contents are not kept.
  void resize(std::size_t count) {
    if (count <= count_) return;
    const std::size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
    data_ = std::unique_ptr<T, Release>(static_cast<T*>(acquire_block(bytes)), Release{bytes});
    count_ = count;
  }
  T* data() const { return data_.get(); }
  std::size_t size() const { return count_; }

 private:
  struct Release {
    std::size_t bytes = 0;
    void operator()(T* p) const { release_block(p, bytes); }
  };
  std::unique_ptr<T, Release> data_;
  std::size_t count_ = 0;
};

}  // namespace tpfuse::gemm
