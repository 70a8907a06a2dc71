// The hierarchical all-reduce, for jobs whose hosts hold several ranks each.
// With L ranks on every host (the fewest any host has), the output is cut
// into L slices and the j-th rank of every host looks after slice j:
//   1. host sum: the ranks of a host sum their contributions, widened to
//      fp32, over the shm transport (every rank of the host gets the sum);
//   2. rails: the j-th ranks of all hosts (rail j) all-reduce slice j of
//      their host sums over MPI, in fp32, and round the total once to the
//      dtype; so the L rails share the network and the CPU work between
//      them instead of one leader per host doing it all, and the results
//      cross the network in the output's dtype, half the bytes of fp32;
//   3. gather: the ranks of a host exchange their slices over MPI.
// Only host sums cross the network, once per host instead of once per rank.
//
// Numerics: contributions are widened to fp32 (exactly), summed in fp32 in
// rank order inside each host, the host sums summed in fp32 in the order of
// the rail's ranks (the hosts' order for the usual layouts, where a host's
// ranks are consecutive), and the total rounded once to the dtype. The order
// is fixed by the layout, so every rank gets the same bytes; it is not the
// flat rank-order sum (((x0 + x1) + x2) + x3 becomes (x0 + x1) + (x2 + x3)
// with two ranks on each of two hosts), which TPFUSE_MPI_HIERARCHICAL=off
// restores.
//
// "Same host" is the same hostname and network namespace, and a shm group
// that the host's ranks can set up together through a directory in /tmp.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "comm/mpi/mpi_group.h"
#include "comm/mpi/mpi_requests.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/core/config.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/core/log.h"

namespace tpfuse::comm::mpi {

namespace {

const EnvSetting<std::string> kHierarchical{
    "TPFUSE_MPI_HIERARCHICAL", "auto",
    "auto: reduce inside each host over shm, then between hosts over MPI, when hosts hold "
    "several ranks; off: one flat MPI all-reduce over every rank"};

void widen(DType dtype, const std::byte* in, std::size_t count, float* out) {
  if (dtype == DType::f32) {
    std::memcpy(out, in, count * 4);
    return;
  }
  for (std::size_t i = 0; i < count; ++i) {
    std::uint16_t bits = 0;
    std::memcpy(&bits, in + i * 2, 2);
    out[i] = dtype == DType::f16 ? f16_to_f32(Half{bits}) : bf16_to_f32(BFloat16{bits});
  }
}

struct Layout {
  std::vector<int> host;  // world ranks on this rank's host, increasing
  int place = 0;          // this rank's index in `host`
  int hosts = 0;
  // Rail j: the j-th rank of every host, increasing; as many rails as the
  // fewest ranks any host has.
  std::vector<std::vector<int>> rails;
};

Layout layout_of(const std::vector<std::string>& keys, int rank) {
  std::map<std::string, std::vector<int>> by_host;
  for (int r = 0; r < static_cast<int>(keys.size()); ++r) by_host[keys[r]].push_back(r);
  Layout layout;
  layout.host = by_host[keys[rank]];
  layout.place = static_cast<int>(std::find(layout.host.begin(), layout.host.end(), rank) -
                                  layout.host.begin());
  layout.hosts = static_cast<int>(by_host.size());
  std::size_t rails = layout.host.size();
  for (const auto& [key, ranks] : by_host) rails = std::min(rails, ranks.size());
  layout.rails.resize(rails);
  for (std::size_t j = 0; j < rails; ++j) {
    for (const auto& [key, ranks] : by_host) layout.rails[j].push_back(ranks[j]);
    std::sort(layout.rails[j].begin(), layout.rails[j].end());
  }
  return layout;
}

// The all-reduces in flight and their steps: the host sum (shm), this
// rank's rail (MPI), the gather of the slices in the host (MPI). Each
// sub-communicator takes its collectives one at a time and in the same order
// on every rank, so an all-reduce starts a step only once the one before it
// has finished that step; steps of different all-reduces overlap (one's
// rail with the next one's host sum). Waiting polls: the thread that starts
// all-reduces never blocks on the network while a helper thread waits.
class Pipeline {
 public:
  struct Parts {
    std::shared_ptr<Communicator> flat;
    std::shared_ptr<Communicator> local;
    std::shared_ptr<Communicator> rail;  // null where this rank's place in its host has no rail
    std::shared_ptr<const Layout> layout;
  };
  enum class Step { host_sum, rail, gather, done };
  struct Op {
    std::byte* output = nullptr;
    std::size_t count = 0;
    DType dtype = DType::f32;
    std::unique_ptr<float[]> sums;  // the contribution widened, then the host sum
    Step step = Step::host_sum;
    std::unique_ptr<Work> current;  // the step's collective, once started
  };

  explicit Pipeline(Parts parts) : parts_(std::move(parts)) {}

  std::shared_ptr<Op> start(const void* input, void* output, std::size_t count, DType dtype) {
    auto op = std::make_shared<Op>();
    op->output = static_cast<std::byte*>(output);
    op->count = count;
    op->dtype = dtype;
    op->sums = std::make_unique<float[]>(count);
    widen(dtype, static_cast<const std::byte*>(input), count, op->sums.get());
    const std::lock_guard lock(mutex_);
    rethrow_failure_locked();
    if (ops_.empty()) last_progress_ = Clock::now();
    ops_.push_back(op);
    advance_locked();
    return op;
  }

  bool test(const Op& op) {
    const std::lock_guard lock(mutex_);
    advance_locked();
    return op.step == Step::done;
  }

  // Polls until `op` is done. Where nothing has moved for a while, waits on
  // the oldest collective in flight instead, and its transport fails naming
  // the ranks it waits for: after a quarter of the timeout for a rail, whose
  // peers are on other hosts (so a cut link shows within 1.25 timeouts); after
  // 1.25 timeouts for a step inside the host, whose peers are most likely
  // busy on their own rails and, if one fails, abort the host's groups with
  // its reason first (see fail_locked). That wait holds the lock: the next
  // all-reduce cannot start meanwhile, which costs overlap only when a step
  // is that slow.
  void wait(const Op& op) {
    mpi::PollPacer pacer;
    for (;;) {
      bool progressed = false;
      {
        const std::lock_guard lock(mutex_);
        const auto progress_before = last_progress_;
        advance_locked();
        progressed = last_progress_ != progress_before;
        if (op.step == Step::done) return;
        const Op* stuck = oldest_started_locked();
        const auto patience = stuck != nullptr && stuck->step == Step::rail
                                  ? parts_.flat->timeout() / 4
                                  : parts_.flat->timeout() * 5 / 4;
        if (stuck != nullptr && Clock::now() - last_progress_ > patience) {
          try {
            stuck->current->wait();
          } catch (const std::exception& error) {
            fail_locked(error);
          }
          last_progress_ = Clock::now();
        }
      }
      std::this_thread::sleep_for(pacer.next(progressed));
    }
  }

  // A collective outside the pipeline failed: as for a step (fail_locked).
  [[noreturn]] void fail(const std::exception& error) {
    const std::lock_guard lock(mutex_);
    fail_locked(error);
  }

  std::size_t in_flight() {
    const std::lock_guard lock(mutex_);
    return ops_.size();
  }
  std::shared_ptr<Op> oldest() {
    const std::lock_guard lock(mutex_);
    return ops_.empty() ? nullptr : ops_.front();
  }

 private:
  using Clock = std::chrono::steady_clock;

  void advance_locked() {
    rethrow_failure_locked();
    try {
      const Op* previous = nullptr;
      for (const std::shared_ptr<Op>& op : ops_) {
        while (op->step != Step::done) {
          if (op->current == nullptr) {
            if (previous != nullptr && previous->step <= op->step) break;
            start_step(*op);
            last_progress_ = Clock::now();
          }
          if (!op->current->test()) break;
          finish_step(*op);
          last_progress_ = Clock::now();
        }
        previous = op.get();
      }
    } catch (const std::exception& error) {
      fail_locked(error);
    }
    while (!ops_.empty() && ops_.front()->step == Step::done) ops_.pop_front();
  }

  void start_step(Op& op) {
    const std::size_t element = dtype_size(op.dtype);
    const int rails = static_cast<int>(parts_.layout->rails.size());
    const std::vector<int>& host = parts_.layout->host;
    switch (op.step) {
      case Step::host_sum:
        op.current = parts_.local->all_reduce_start(op.sums.get(), op.sums.get(), op.count, DType::f32);
        return;
      case Step::rail: {
        const int place = parts_.layout->place;
        const std::size_t begin = share_begin(op.count, rails, place);
        const std::size_t end = share_begin(op.count, rails, place + 1);
        op.current = all_reduce_rounding_start(*parts_.rail, op.sums.get() + begin,
                                               op.output + begin * element, end - begin, op.dtype);
        return;
      }
      case Step::gather: {
        std::vector<std::size_t> offsets(host.size() + 1);
        for (std::size_t i = 0; i <= host.size(); ++i) {
          offsets[i] = share_begin(op.count, rails, std::min(static_cast<int>(i), rails)) * element;
        }
        op.current = gather_slices_start(*parts_.flat, op.output, offsets, host);
        return;
      }
      case Step::done:
        return;
    }
  }

  void finish_step(Op& op) {
    op.current.reset();
    switch (op.step) {
      case Step::host_sum:
        op.step = parts_.rail != nullptr ? Step::rail : Step::gather;
        return;
      case Step::rail:
        op.step = Step::gather;
        return;
      case Step::gather:
      case Step::done:
        op.step = Step::done;
        op.sums.reset();
        return;
    }
  }

  const Op* oldest_started_locked() const {
    for (const std::shared_ptr<Op>& op : ops_) {
      if (op->current != nullptr) return op.get();
    }
    return nullptr;
  }

  // Keeps the failure for every later call, and aborts the other groups with
  // its reason: the ranks of this host waiting on this one (say for its
  // slice, while its rail to a cut host timed out) fail at once, naming the
  // unreachable ranks rather than this one. The host's group first: its
  // abort is a store to shared memory, where the others post messages to
  // ranks that may be cut off, and the host's ranks' deadlines are the
  // nearest.
  [[noreturn]] void fail_locked(const std::exception& error) {
    failure_ = std::current_exception();
    parts_.local->abort(error.what());
    if (parts_.rail) parts_.rail->abort(error.what());
    parts_.flat->abort(error.what());
    std::rethrow_exception(failure_);
  }

  void rethrow_failure_locked() const {
    if (failure_) std::rethrow_exception(failure_);
  }

  Parts parts_;
  std::mutex mutex_;
  std::deque<std::shared_ptr<Op>> ops_;  // in flight, oldest first
  Clock::time_point last_progress_ = Clock::now();
  std::exception_ptr failure_;  // once a step failed, every call fails alike
};

class HierarchicalWork final : public Work {
 public:
  HierarchicalWork(std::shared_ptr<Pipeline> pipeline, std::shared_ptr<Pipeline::Op> op,
                   std::shared_ptr<std::byte[]> scratch = nullptr)
      : pipeline_(std::move(pipeline)), op_(std::move(op)), scratch_(std::move(scratch)) {}
  ~HierarchicalWork() override {
    try {
      wait();
    } catch (const std::exception& error) {
      log::debug("unfinished all-reduce dropped: ", error.what());
    }
  }
  bool test() override { return pipeline_->test(*op_); }
  void wait() override { pipeline_->wait(*op_); }

 private:
  std::shared_ptr<Pipeline> pipeline_;
  std::shared_ptr<Pipeline::Op> op_;
  std::shared_ptr<std::byte[]> scratch_;  // the acquired buffer, kept to the end
};

class HierarchicalCommunicator final : public Communicator {
 public:
  explicit HierarchicalCommunicator(Pipeline::Parts parts)
      : parts_(parts), pipeline_(std::make_shared<Pipeline>(std::move(parts))) {}

  int rank() const override { return parts_.flat->rank(); }
  int size() const override { return parts_.flat->size(); }
  const std::string& name() const override { return parts_.flat->name(); }
  std::chrono::milliseconds timeout() const override { return parts_.flat->timeout(); }
  int ranks_on_host() const override { return static_cast<int>(parts_.layout->host.size()); }
  bool progresses_only_when_called() const override { return true; }
  std::size_t max_gather_bytes() const override { return parts_.flat->max_gather_bytes(); }
  int max_reduces_in_flight() const override { return kMaxInFlight; }
  void abort(std::string_view reason) override {
    parts_.local->abort(reason);
    if (parts_.rail) parts_.rail->abort(reason);
    parts_.flat->abort(reason);
  }

 protected:
  // The gathers go over the flat group (bytes copied: no order to keep);
  // the reduce-scatter is the Communicator's default, this all-reduce into
  // private memory, so that its sums are this all-reduce's, bitwise.
  std::vector<std::string> do_all_gather(std::string_view mine) override {
    finish(0);
    try {
      return parts_.flat->all_gather(mine);
    } catch (const std::exception& error) {
      pipeline_->fail(error);
    }
  }
  std::unique_ptr<GatherWork> do_all_gather_start(const void* input, void* output,
                                                  std::span<const std::size_t> counts,
                                                  DType dtype) override {
    finish(0);
    try {
      return parts_.flat->all_gather_start(input, output, counts, dtype);
    } catch (const std::exception& error) {
      pipeline_->fail(error);
    }
  }
  std::unique_ptr<Work> do_all_reduce_start(const void* input, void* output, std::size_t count,
                                            DType dtype) override {
    finish(0);
    return std::make_unique<HierarchicalWork>(pipeline_,
                                              pipeline_->start(input, output, count, dtype));
  }
  ReduceBuffer do_acquire_reduce_buffer(std::size_t count, DType dtype) override {
    finish(kMaxInFlight - 1);
    return Communicator::do_acquire_reduce_buffer(count, dtype);
  }
  std::unique_ptr<Work> do_all_reduce_start(ReduceBuffer buffer, void* output) override {
    require(buffer.scratch != nullptr && buffer.data == buffer.scratch.get(),
            "all_reduce_start: the buffer was not acquired from this communicator");
    auto op = pipeline_->start(buffer.data, output, buffer.count, buffer.dtype);
    return std::make_unique<HierarchicalWork>(pipeline_, std::move(op), std::move(buffer.scratch));
  }

 private:
  static constexpr int kMaxInFlight = 3;

  // Waits until at most `left` all-reduces are in flight, oldest first.
  void finish(std::size_t left) {
    while (pipeline_->in_flight() > left) {
      if (auto oldest = pipeline_->oldest()) pipeline_->wait(*oldest);
    }
  }

  Pipeline::Parts parts_;
  std::shared_ptr<Pipeline> pipeline_;
};

}  // namespace

std::shared_ptr<Communicator> make_hierarchical(std::shared_ptr<Communicator> flat,
                                                const MpiOptions& options) {
  const std::string& mode = kHierarchical.get();
  require(mode == "auto" || mode == "off", kHierarchical.name(), ": expected auto or off, got \"",
          mode, "\"");
  const Layout layout = layout_of(host_keys(*flat), flat->rank());
  const bool shared_hosts = layout.hosts < flat->size();
  // Every rank sees the same keys, so every rank takes the same branch.
  if (mode == "off" || layout.hosts < 2 || !shared_hosts) return flat;

  // The host's shm group meets in a directory named after the job and the
  // host's lowest rank, which removes it once every rank has joined. Its waits
  // last a quarter longer than those across hosts: a peer of this host that
  // waits on a cut host then fails first and aborts this group with its
  // reason, so every rank here names the unreachable ranks, not that peer.
  const int first = layout.host.front();
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / cat(flat->name(), "-host", first);
  std::filesystem::create_directories(dir);
  std::shared_ptr<Communicator> local;
  {
    FileStore store(dir);
    local = create_shm_communicator(store, layout.place,
                                    static_cast<int>(layout.host.size()),
                                    ShmOptions{.timeout = options.timeout * 5 / 4});
  }
  log::set_rank(flat->rank());  // the shm group recorded its own rank
  flat->barrier();
  if (flat->rank() == first) std::filesystem::remove_all(dir);
  // Every rank takes part in making every rail (collective over the world).
  std::shared_ptr<Communicator> rail;
  for (const std::vector<int>& members : layout.rails) {
    if (auto group = create_group(options, members)) rail = std::move(group);
  }
  return std::make_shared<HierarchicalCommunicator>(Pipeline::Parts{
      std::move(flat), std::move(local), std::move(rail),
      std::make_shared<const Layout>(layout)});
}

void narrow(DType dtype, const float* in, std::size_t count, std::byte* out) {
  if (dtype == DType::f32) {
    std::memcpy(out, in, count * 4);
    return;
  }
  for (std::size_t i = 0; i < count; ++i) {
    const std::uint16_t bits =
        dtype == DType::f16 ? f32_to_f16(in[i]).bits : f32_to_bf16(in[i]).bits;
    std::memcpy(out + i * 2, &bits, 2);
  }
}

}  // namespace tpfuse::comm::mpi
