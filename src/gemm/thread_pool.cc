// The pool's one rule: every task index runs exactly once, on some thread;
// which thread never changes a result (tasks write disjoint outputs).
#include "gemm/thread_pool.h"

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <map>

namespace tpfuse::gemm {

ThreadPool::ThreadPool(int threads) : owner_(getpid()) {
  for (int slot = 1; slot < threads; ++slot) workers_.emplace_back([this, slot] { work(slot); });
}

ThreadPool::~ThreadPool() {
  if (getpid() != owner_) {  // a forked child: the workers are not ours to join
    for (std::thread& worker : workers_) worker.detach();
    return;
  }
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::run(int tasks, const std::function<void(int index, int slot)>& task) {
  if (tasks <= 0) return;
  if (workers_.empty() || tasks == 1 || getpid() != owner_) {
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

namespace {

// Idle pools by size. Pools are never destroyed: the threads of a pool that
// was used once are likely to be used again (every operator call prepares a
// GEMM), and a sleeping thread costs nothing.
std::mutex free_pools_mutex;
std::multimap<int, ThreadPool*>& free_pools() {
  static auto* pools = new std::multimap<int, ThreadPool*>();
  return *pools;
}

void return_pool(ThreadPool* pool) {
  std::lock_guard lock(free_pools_mutex);
  free_pools().emplace(pool->size(), pool);
}

// fork(): the child must not inherit a locked registry nor pools whose
// workers exist only in the parent (they are dropped, not destroyed).
void register_fork_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork([] { free_pools_mutex.lock(); }, [] { free_pools_mutex.unlock(); },
                   [] {
                     free_pools().clear();
                     free_pools_mutex.unlock();
                   });
  });
}

// A worker's wake-up took 13 us (AVX2 EPYC, 2 threads), about what one
// thread spends on 2^18 multiply-adds in a decode's kernels: 1 x 512 x 512
// ran in 28 us on one thread and 38 on two; 1 x 1024 x 512 in 57 and 45.
std::atomic<double> least_work_per_thread{1 << 18};

}  // namespace

double min_multiply_adds_per_thread() {
  return least_work_per_thread.load(std::memory_order_relaxed);
}

void set_min_multiply_adds_per_thread(double multiply_adds) {
  least_work_per_thread.store(multiply_adds, std::memory_order_relaxed);
}

PoolLease lease_pool(int threads) {
  register_fork_handlers();
  {
    std::lock_guard lock(free_pools_mutex);
    auto it = free_pools().find(threads);
    if (it != free_pools().end()) {
      ThreadPool* pool = it->second;
      free_pools().erase(it);
      return PoolLease(pool, &return_pool);
    }
  }
  return PoolLease(new ThreadPool(threads), &return_pool);
}

}  // namespace tpfuse::gemm
