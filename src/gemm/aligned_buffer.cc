// The block cache behind AlignedBuffer: small blocks go to aligned_alloc;
// blocks of kLargeBlock bytes or more are mapped with huge-page advice, and a
// few freed ones are kept for the next request of a similar size.
#include "gemm/aligned_buffer.h"

#include <pthread.h>
#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

namespace tpfuse::gemm {

namespace {

constexpr std::size_t kLargeBlock = std::size_t{1} << 20;
constexpr std::size_t kHugePage = std::size_t{2} << 20;
constexpr std::size_t kCachedBlocks = 8;

struct Block {
  void* data;
  std::size_t mapped;  // bytes mapped (the request rounded up to huge pages)
};

std::mutex cache_mutex;
std::vector<Block>& cache() {
  static auto* blocks = new std::vector<Block>();
  return *blocks;
}

std::size_t mapped_size(std::size_t bytes) { return (bytes + kHugePage - 1) / kHugePage * kHugePage; }

// fork(): the child must not inherit the cache's mutex locked.
void register_fork_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork([] { cache_mutex.lock(); }, [] { cache_mutex.unlock(); }, [] { cache_mutex.unlock(); });
  });
}

}  // namespace

void* acquire_block(std::size_t bytes) {
  if (bytes < kLargeBlock) {
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  register_fork_handlers();
  const std::size_t mapped = mapped_size(bytes);
  {
    // Reuse the smallest cached block that fits without wasting more than
    // half of it: a call that takes several blocks of different sizes then
    // gets back the same ones on the next call, none of them faulted in anew.
    std::lock_guard lock(cache_mutex);
    std::vector<Block>& blocks = cache();
    std::size_t best = blocks.size();
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      if (blocks[i].mapped >= mapped && blocks[i].mapped / 2 <= mapped &&
          (best == blocks.size() || blocks[i].mapped < blocks[best].mapped)) {
        best = i;
      }
    }
    if (best < blocks.size()) {
      void* p = blocks[best].data;
      blocks.erase(blocks.begin() + static_cast<std::ptrdiff_t>(best));
      return p;
    }
  }
  void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  madvise(p, mapped, MADV_HUGEPAGE);
  return p;
}

void release_block(void* block, std::size_t bytes) {
  if (block == nullptr) return;
  if (bytes < kLargeBlock) {
    std::free(block);
    return;
  }
  const std::size_t mapped = mapped_size(bytes);
  std::lock_guard lock(cache_mutex);
  std::vector<Block>& blocks = cache();
  if (blocks.size() == kCachedBlocks) {
    munmap(blocks.front().data, blocks.front().mapped);
    blocks.erase(blocks.begin());
  }
  blocks.push_back({block, mapped});
}

}  // namespace tpfuse::gemm
