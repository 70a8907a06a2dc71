// A Communicator that forwards to a real one and records, in order, every
// collective asked of it, with the payload of the first checked all-reduce's
// header and the largest reduce buffer acquired. The tests count the rounds
// a call enters with it; the fuzzer checks a rejected call against the log:
// one empty checked round (the call's agreement, its header carrying the
// error so that peers fail too instead of waiting), then nothing.
#pragma once

#include <algorithm>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "tpfuse/comm/communicator.h"

namespace tpfuse::test {

enum class CommEvent {
  all_gather,
  acquire_reduce_buffer,
  all_reduce,
  checked_all_reduce,
  reduce_scatter,
  all_gather_tensor,
  abort
};

class RecordingCommunicator final : public comm::Communicator {
 public:
  RecordingCommunicator(std::shared_ptr<comm::Communicator> inner, std::string name)
      : inner_(std::move(inner)), name_(std::move(name)) {}

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  const std::string& name() const override { return name_; }
  std::string transport() const override { return "test"; }
  std::chrono::milliseconds timeout() const override { return inner_->timeout(); }
  std::size_t max_reduce_buffer_bytes() const override { return inner_->max_reduce_buffer_bytes(); }
  int max_reduces_in_flight() const override { return inner_->max_reduces_in_flight(); }
  std::size_t max_gather_bytes() const override { return inner_->max_gather_bytes(); }
  void abort(std::string_view reason) override {
    record(CommEvent::abort);
    inner_->abort(reason);
  }

  // Forgets what was recorded (before each call).
  void clear() {
    const std::lock_guard lock(mutex_);
    events_.clear();
    first_header_.clear();
    header_seen_ = false;
    largest_buffer_ = 0;
  }
  std::vector<CommEvent> events() const {
    const std::lock_guard lock(mutex_);
    return events_;
  }
  // The collective rounds entered: every event but acquiring a buffer and aborting.
  int rounds() const {
    const std::lock_guard lock(mutex_);
    return static_cast<int>(std::count_if(events_.begin(), events_.end(), [](CommEvent e) {
      return e != CommEvent::acquire_reduce_buffer && e != CommEvent::abort;
    }));
  }
  // The payload of the first checked all-reduce's header ("" when none).
  std::string first_header() const {
    const std::lock_guard lock(mutex_);
    return first_header_;
  }
  // The most elements any acquired reduce buffer held.
  std::size_t largest_buffer() const {
    const std::lock_guard lock(mutex_);
    return largest_buffer_;
  }

 protected:
  std::unique_ptr<comm::Work> do_all_reduce_start(const void* input, void* output,
                                                  std::size_t count, DType dtype) override {
    record(CommEvent::all_reduce);
    return inner_->all_reduce_start(input, output, count, dtype);
  }
  comm::ReduceBuffer do_acquire_reduce_buffer(std::size_t count, DType dtype) override {
    {
      const std::lock_guard lock(mutex_);
      events_.push_back(CommEvent::acquire_reduce_buffer);
      largest_buffer_ = std::max(largest_buffer_, count);
    }
    return inner_->acquire_reduce_buffer(count, dtype);
  }
  std::unique_ptr<comm::Work> do_all_reduce_start(comm::ReduceBuffer buffer,
                                                  void* output) override {
    record(CommEvent::all_reduce);
    return inner_->all_reduce_start(std::move(buffer), output);
  }
  std::unique_ptr<comm::CheckedWork> do_checked_all_reduce_start(
      comm::ReduceBuffer buffer, void* output, const comm::CallHeader& mine) override {
    {
      const std::lock_guard lock(mutex_);
      if (!header_seen_) first_header_ = std::string(mine.payload_view());
      header_seen_ = true;
      events_.push_back(CommEvent::checked_all_reduce);
    }
    return inner_->checked_all_reduce_start(std::move(buffer), output, mine);
  }
  std::unique_ptr<comm::Work> do_reduce_scatter_start(const void* input, void* output,
                                                      std::span<const std::size_t> counts,
                                                      DType dtype) override {
    record(CommEvent::reduce_scatter);
    return inner_->reduce_scatter_start(input, output, counts, dtype);
  }
  std::unique_ptr<comm::GatherWork> do_all_gather_start(const void* input, void* output,
                                                        std::span<const std::size_t> counts,
                                                        DType dtype) override {
    record(CommEvent::all_gather_tensor);
    return inner_->all_gather_start(input, output, counts, dtype);
  }
  std::vector<std::string> do_all_gather(std::string_view mine) override {
    record(CommEvent::all_gather);
    return inner_->all_gather(mine);
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
  std::string first_header_;
  bool header_seen_ = false;
  std::size_t largest_buffer_ = 0;
};

}  // namespace tpfuse::test
