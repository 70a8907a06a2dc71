// tpfuse._tpfuse_c10d: communicators for torch.distributed process groups
// that span hosts, and what a communicator is made of.
//
//   create_group_communicator(name, world, host_keys, rail, timeout_ms)
//       collective over `world`; registers and returns the hcom name
//   create_mpi_communicator()      collective over MPI's world (a job started by mpirun)
//   host_layout(host_keys, rank)   (hosts, host, place, rails), as the library lays them out
//   this_host_key()                this process's host
//   comm_info(hcom)                what carries a registered communicator's data
//
// The engine between hosts is the process groups' own (gloo): the library's
// message transport (tpfuse/comm/messages.h) over c10d's asynchronous send
// and recv. A gloo send or recv completes only inside Work::wait, so each
// message is waited for on a thread of its own (Waiters); test() asks that
// thread, and a collective's wait sleeps until one of them completes a message.
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <vector>

#include "torch_convert.h"
#include "tpfuse/comm/hierarchical.h"
#include "tpfuse/comm/messages.h"
#include "tpfuse/comm/mpi.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"

namespace py = pybind11;

namespace tpfuse::torch_binding {

namespace {

using ProcessGroup = c10::intrusive_ptr<c10d::ProcessGroup>;

// The threads that wait on the messages' work, kept between messages: a
// thread made per message cost its start and end on every send and recv.
// Each waiting message holds a thread of its own (a receive waited for
// must not hold up a send queued behind it), so a message finds an idle
// thread or makes one; a thread idle for a second ends. A thread lets go of
// the work before it reports it done: the transfer's owner may release the
// process group right after (a rank failing, then exiting), and gloo's work
// must not be destroyed after its group. Never destroyed: its threads may
// outlive static destruction.
class Waiters {
 public:
  static Waiters& instance() {
    static Waiters* waiters = new Waiters;
    return *waiters;
  }

  std::uint64_t completions() {
    const std::lock_guard lock(mutex_);
    return completions_;
  }
  void await_completion(std::uint64_t seen, std::chrono::microseconds limit) {
    std::unique_lock lock(mutex_);
    completed_.wait_for(lock, limit, [&] { return completions_ != seen; });
  }

  std::future<void> wait_for(c10::intrusive_ptr<c10d::Work> work) {
    Job job{std::move(work), {}};
    std::future<void> done = job.done.get_future();
    const std::lock_guard lock(mutex_);
    jobs_.push_back(std::move(job));
    if (jobs_.size() > idle_) {
      std::thread([this] { serve(); }).detach();
    } else {
      wake_.notify_one();
    }
    return done;
  }

 private:
  struct Job {
    c10::intrusive_ptr<c10d::Work> work;
    std::promise<void> done;
  };

  void serve() {
    std::unique_lock lock(mutex_);
    for (;;) {
      ++idle_;
      const bool found =
          wake_.wait_for(lock, std::chrono::seconds(1), [this] { return !jobs_.empty(); });
      --idle_;
      if (!found) return;
      Job job = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      std::exception_ptr failure;
      try {
        job.work->wait();
      } catch (...) {
        failure = std::current_exception();
      }
      job.work.reset();
      if (failure) {
        job.done.set_exception(failure);
      } else {
        job.done.set_value();
      }
      lock.lock();
      ++completions_;
      completed_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable completed_;
  std::deque<Job> jobs_;
  std::uint64_t completions_ = 0;  // jobs done, any engine's
  std::size_t idle_ = 0;
};

class ProcessGroupTransfer final : public comm::MessageEngine::Transfer {
 public:
  ProcessGroupTransfer(c10::intrusive_ptr<c10d::Work> work, at::Tensor tensor)
      : work_(std::move(work)), tensor_(std::move(tensor)) {
    waited_ = Waiters::instance().wait_for(work_);
  }
  ~ProcessGroupTransfer() override {
    if (!done_) cancel();
  }
  bool test() override {
    if (done_) return true;
    if (waited_.wait_for(std::chrono::seconds(0)) != std::future_status::ready) return false;
    done_ = true;
    waited_.get();  // rethrows the engine's failure
    return true;
  }
  void cancel() override {
    if (done_) return;
    done_ = true;
    try {
      work_->abort();
    } catch (const std::exception& error) {
      log::debug("process group message not cancelled: ", error.what());
    }
    try {
      waited_.get();
    } catch (const std::exception&) {  // cancelled: its failure is expected
    }
  }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
  at::Tensor tensor_;  // the bytes, while the engine may read or write them
  std::future<void> waited_;
  bool done_ = false;
};

class ProcessGroupEngine final : public comm::MessageEngine {
 public:
  explicit ProcessGroupEngine(ProcessGroup group) : group_(std::move(group)) {}
  int rank() const override { return group_->getRank(); }
  int size() const override { return group_->getSize(); }
  std::unique_ptr<Transfer> send(int peer, int tag, const std::byte* data,
                                 std::size_t bytes) override {
    std::vector<at::Tensor> tensors{wrap(const_cast<std::byte*>(data), bytes)};
    return std::make_unique<ProcessGroupTransfer>(group_->send(tensors, peer, tag), tensors[0]);
  }
  std::unique_ptr<Transfer> receive(int peer, int tag, std::byte* data,
                                    std::size_t bytes) override {
    std::vector<at::Tensor> tensors{wrap(data, bytes)};
    return std::make_unique<ProcessGroupTransfer>(group_->recv(tensors, peer, tag), tensors[0]);
  }
  std::optional<std::uint64_t> completions() override { return Waiters::instance().completions(); }
  void await_completion(std::uint64_t seen, std::chrono::microseconds limit) override {
    Waiters::instance().await_completion(seen, limit);
  }

 private:
  static at::Tensor wrap(std::byte* data, std::size_t bytes) {
    return at::from_blob(data, {static_cast<std::int64_t>(bytes)}, at::kByte);
  }
  ProcessGroup group_;
};

// `job_ranks`: the group's ranks' in the whole group, which errors name.
std::shared_ptr<comm::Communicator> over(const ProcessGroup& group, const std::string& name,
                                         std::chrono::milliseconds timeout, int ranks_on_host,
                                         int hosts, std::vector<int> job_ranks = {}) {
  comm::MessageOptions options;
  options.name = name;
  options.transport = group->getBackendName();
  options.timeout = timeout;
  options.ranks_on_host = ranks_on_host;
  options.hosts = hosts;
  options.job_ranks = std::move(job_ranks);
  return comm::create_message_communicator(std::make_shared<ProcessGroupEngine>(group), options);
}

std::string create_group_communicator(const std::string& name, const ProcessGroup& world,
                                      const std::vector<std::string>& host_keys,
                                      const std::optional<ProcessGroup>& rail,
                                      std::int64_t timeout_ms) {
  return translate_errors([&] {
    require(timeout_ms > 0, "timeout_ms: expected a positive number of milliseconds, got ",
            timeout_ms);
    require(static_cast<int>(host_keys.size()) == world->getSize(), "host_keys: expected ",
            world->getSize(), " (one per rank), got ", host_keys.size());
    const std::chrono::milliseconds timeout(timeout_ms);
    const comm::HostLayout layout = comm::host_layout(host_keys, world->getRank());
    const int hosts = static_cast<int>(layout.hosts.size());
    const int on_host = static_cast<int>(layout.hosts[layout.host].size());
    std::shared_ptr<comm::Communicator> communicator;
    if (!layout.hierarchical()) {
      communicator = over(world, name, timeout, on_host, hosts);
    } else {
      comm::HierarchicalParts parts;
      parts.engine = world->getBackendName();
      parts.world = over(world, name, timeout, on_host, hosts);
      if (rail) {
        for (const std::vector<int>& members : layout.rails) {
          if (std::find(members.begin(), members.end(), world->getRank()) != members.end()) {
            parts.rail = over(*rail, name + "-rail", timeout, 1, hosts, members);
          }
        }
      }
      parts.layout = layout;
      communicator = comm::create_hierarchical_communicator(std::move(parts));
    }
    log::info("communicator ", name, " ready: ", communicator->size(), " ranks on ",
              communicator->hosts(), " hosts, ", communicator->ranks_on_host(),
              " on this host, transport ", communicator->transport());
    return comm::register_communicator(std::move(communicator));
  });
}

std::string create_mpi_communicator() {
  return translate_errors(
      [] { return comm::register_communicator(comm::create_mpi_communicator()); });
}

py::tuple host_layout(const std::vector<std::string>& host_keys, int rank) {
  return translate_errors([&] {
    require(rank >= 0 && rank < static_cast<int>(host_keys.size()), "rank: expected 0 <= rank < ",
            host_keys.size(), ", got ", rank);
    const comm::HostLayout layout = comm::host_layout(host_keys, rank);
    return py::make_tuple(layout.hosts, layout.host, layout.place, layout.rails);
  });
}

py::dict comm_info(const std::string& hcom) {
  return translate_errors([&] {
    const auto communicator = comm::find_communicator(hcom);
    py::dict info;
    info["name"] = communicator->name();
    info["rank"] = communicator->rank();
    info["size"] = communicator->size();
    info["hosts"] = communicator->hosts();
    info["ranks_on_host"] = communicator->ranks_on_host();
    info["transport"] = communicator->transport();
    info["timeout_ms"] = communicator->timeout().count();
    return info;
  });
}

}  // namespace

}  // namespace tpfuse::torch_binding

PYBIND11_MODULE(_tpfuse_c10d, m) {
  using namespace tpfuse::torch_binding;
  m.def("create_group_communicator", &create_group_communicator, py::arg("name"), py::arg("world"),
        py::arg("host_keys"), py::arg("rail"), py::arg("timeout_ms"),
        py::call_guard<py::gil_scoped_release>());
  m.def("create_mpi_communicator", &create_mpi_communicator,
        py::call_guard<py::gil_scoped_release>());
  m.def("mpi_supported", &tpfuse::comm::mpi_supported);
  m.def("launched_by_mpi", &tpfuse::comm::launched_by_mpi);
  m.def("host_layout", &host_layout, py::arg("host_keys"), py::arg("rank"));
  m.def("this_host_key", &tpfuse::comm::this_host_key);
  m.def("default_timeout_ms", [] { return tpfuse::comm::ShmOptions::default_timeout().count(); });
  m.def("comm_info", &comm_info, py::arg("hcom"));
}
