// The worker threads of one prepared GEMM. run() spreads tasks over the
// workers and the calling thread and returns when all are done. Workers
// sleep between runs (they must not take cycles from the communication
// thread that the operator overlaps with the GEMM).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
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
  // names the thread, for per-thread scratch. Rethrows a task's exception.
  // One run at a time per pool.
  void run(int tasks, const std::function<void(int index, int slot)>& task);

 private:
  void work(int slot);
  void drain(int slot);

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

}  // namespace tpfuse::gemm
