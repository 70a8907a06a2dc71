// A Communicator that forwards to a real one and records, in order, every
// collective the operator asks for, with what the first all_gather carried.
// The fuzzer registers it under its own name and checks a rejected call
// against the log: one all_gather (the agreement step, carrying the error so
// that peers fail too instead of waiting), then nothing.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "tpfuse/comm/communicator.h"

namespace tpfuse::fuzz {

enum class CommEvent { all_gather, acquire_reduce_buffer, all_reduce, abort };

class RecordingCommunicator final : public comm::Communicator {
 public:
  RecordingCommunicator(std::shared_ptr<comm::Communicator> inner, std::string name)
      : inner_(std::move(inner)), name_(std::move(name)) {}

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  const std::string& name() const override { return name_; }
  std::chrono::milliseconds timeout() const override { return inner_->timeout(); }

  std::unique_ptr<comm::Work> all_reduce_start(const void* input, void* output, std::size_t count,
                                               DType dtype) override {
    record(CommEvent::all_reduce);
    return inner_->all_reduce_start(input, output, count, dtype);
  }
  comm::ReduceBuffer acquire_reduce_buffer(std::size_t count, DType dtype) override {
    record(CommEvent::acquire_reduce_buffer);
    return inner_->acquire_reduce_buffer(count, dtype);
  }
  std::unique_ptr<comm::Work> all_reduce_start(comm::ReduceBuffer buffer, void* output) override {
    record(CommEvent::all_reduce);
    return inner_->all_reduce_start(std::move(buffer), output);
  }
  std::size_t max_reduce_buffer_bytes() const override { return inner_->max_reduce_buffer_bytes(); }
  int max_reduces_in_flight() const override { return inner_->max_reduces_in_flight(); }

  std::vector<std::string> all_gather(std::string_view mine) override {
    {
      const std::lock_guard lock(mutex_);
      if (events_.empty()) first_gather_ = std::string(mine);
      events_.push_back(CommEvent::all_gather);
    }
    return inner_->all_gather(mine);
  }
  std::size_t max_gather_bytes() const override { return inner_->max_gather_bytes(); }

  void abort(std::string_view reason) override {
    record(CommEvent::abort);
    inner_->abort(reason);
  }

  // Forgets what was recorded (before each call).
  void clear() {
    const std::lock_guard lock(mutex_);
    events_.clear();
    first_gather_.clear();
  }
  std::vector<CommEvent> events() const {
    const std::lock_guard lock(mutex_);
    return events_;
  }
  // What the first collective sent, when it was an all_gather.
  std::string first_gather() const {
    const std::lock_guard lock(mutex_);
    return first_gather_;
  }

 private:
  void record(CommEvent event) {
    const std::lock_guard lock(mutex_);
    events_.push_back(event);
  }

  std::shared_ptr<comm::Communicator> inner_;
  std::string name_;
  mutable std::mutex mutex_;
  std::vector<CommEvent> events_;
  std::string first_gather_;
};

}  // namespace tpfuse::fuzz
