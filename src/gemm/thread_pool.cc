// The pool's one rule: every task index runs exactly once, on some thread;
// which thread never changes a result (tasks write disjoint outputs).
#include "gemm/thread_pool.h"

namespace tpfuse::gemm {

ThreadPool::ThreadPool(int threads) {
  for (int slot = 1; slot < threads; ++slot) workers_.emplace_back([this, slot] { work(slot); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::run(int tasks, const std::function<void(int index, int slot)>& task) {
  if (tasks <= 0) return;
  if (workers_.empty() || tasks == 1) {
    for (int index = 0; index < tasks; ++index) task(index, 0);
    return;
  }
  {
    std::lock_guard lock(mutex_);
    task_ = &task;
    tasks_ = tasks;
    next_task_ = 0;
    error_ = nullptr;
    busy_workers_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  drain(0);
  std::unique_lock lock(mutex_);
  done_.wait(lock, [this] { return busy_workers_ == 0; });
  task_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

// Takes tasks until none are left.
void ThreadPool::drain(int slot) {
  for (;;) {
    int index;
    {
      std::lock_guard lock(mutex_);
      if (next_task_ >= tasks_) return;
      index = next_task_++;
    }
    try {
      (*task_)(index, slot);
    } catch (...) {
      std::lock_guard lock(mutex_);
      if (!error_) error_ = std::current_exception();
      next_task_ = tasks_;
    }
  }
}

void ThreadPool::work(int slot) {
  std::uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
      if (stopping_) return;
      seen = generation_;
    }
    drain(slot);
    {
      std::lock_guard lock(mutex_);
      --busy_workers_;
    }
    done_.notify_one();
  }
}

}  // namespace tpfuse::gemm
