// Worker threads for the GEMM engines. Pools are process-wide and reused: a
// prepared GEMM leases one for its lifetime (lease_pool), so the threads, and
// the per-thread scratch buffers they keep, outlive a single operator call.
// Two GEMMs alive at once (ranks run as threads of one process, say) lease
// different pools. A forked child starts with no workers: it runs a pool
// inherited from its parent on the calling thread and leases fresh pools. Workers sleep between runs: they must not take cycles
// from the communication thread that the operator overlaps with the GEMM.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <sys/types.h>
#include <thread>
#include <vector>

namespace tpfuse::gemm {

class ThreadPool {
 public:
  // threads >= 1 in all: threads - 1 workers plus the caller of run().
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls task(index, slot) for every index in [0, tasks); slot in [0, size())
  // names the thread. Rethrows a task's exception. One run at a time.
  void run(int tasks, const std::function<void(int index, int slot)>& task);

 private:
  void work(int slot);
  void drain(int slot);

  pid_t owner_;  // the process whose threads the workers are
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::uint64_t generation_ = 0;
  bool stopping_ = false;
  int tasks_ = 0;
  int next_task_ = 0;
  int busy_workers_ = 0;
  const std::function<void(int, int)>* task_ = nullptr;
  std::exception_ptr error_;
};

// Multiply-adds a thread must have for waking it to pay (work_split.h's
// threads_for_work; a call with less runs on its caller). Tests set 0, so
// that tiny calls run on every thread they are given.
double min_multiply_adds_per_thread();
void set_min_multiply_adds_per_thread(double multiply_adds);

// A pool of `threads` threads held by one owner; returned to the process-wide
// free list when the lease is destroyed.
using PoolLease = std::unique_ptr<ThreadPool, void (*)(ThreadPool*)>;
PoolLease lease_pool(int threads);

}  // namespace tpfuse::gemm
