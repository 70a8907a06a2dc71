// The hierarchical all-reduce (see tpfuse/comm/hierarchical.h) over any
// engine between hosts: the steps of the all-reduces in flight, and the
// communicator that hands out the steps' collectives.
#include "tpfuse/comm/hierarchical.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <exception>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "comm/collective_math.h"
#include "comm/poll_pacer.h"
#include "core/trace.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/core/config.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"

namespace tpfuse::comm {

namespace {

// The engine's groups and the host's: the host's first, whose abort is a
// store to shared memory, where the others post messages to ranks that may
// be cut off, and whose ranks' deadlines are the nearest.
template <class Parts>
void abort_parts(const Parts& parts, std::string_view reason) {
  parts.local->abort(reason);
  parts.slices->abort(reason);
  if (parts.engine.rail) parts.engine.rail->abort(reason);
  parts.engine.world->abort(reason);
}

// The all-reduces in flight and their steps: the host sum (shm), this
// rank's rail (the engine), the gather of the slices in the host (shm, a
// group of its own). Each sub-communicator takes its collectives one at a
// time and in the same order on every rank, so an all-reduce starts a step
// only once the one before it has finished that step; steps of different
// all-reduces overlap (one's rail with the next one's host sum, one's
// gather with the next one's host sum: so the gathers need their own
// group, or ranks could queue the two in different orders). Waiting polls:
// the thread that starts all-reduces never blocks on the network while a
// helper thread waits.
class Pipeline {
 public:
  struct Parts {
    HierarchicalParts engine;              // world and rail: over the engine
    std::shared_ptr<Communicator> local;   // the host's shm group: host sums, byte gathers
    std::shared_ptr<Communicator> slices;  // the host's shm group for the slices' gathers
  };
  enum class Step { host_sum, rail, gather, done };
  struct Op {
    std::byte* output = nullptr;
    std::size_t count = 0;
    DType dtype = DType::f32;
    std::unique_ptr<float[]> sums;  // the contribution widened, then the host sum
    Step step = Step::host_sum;
    std::unique_ptr<Work> current;  // the step's collective, once started
    std::int64_t step_started_ns = 0;  // when it started, where traced
  };

  explicit Pipeline(Parts parts) : parts_(std::move(parts)) {}

  std::shared_ptr<Op> start(const void* input, void* output, std::size_t count, DType dtype) {
    auto op = std::make_shared<Op>();
    op->output = static_cast<std::byte*>(output);
    op->count = count;
    op->dtype = dtype;
    op->sums = std::make_unique<float[]>(count);
    widen_to_f32(dtype, static_cast<const std::byte*>(input), count, op->sums.get());
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
  // 1.5 timeouts for a step inside the host, whose peers are most likely
  // busy on their own rails and, if one fails, abort the host's groups with
  // its reason first (see fail_locked). That wait holds the lock: the next
  // all-reduce cannot start meanwhile, which costs overlap only when a step
  // is that slow.
  void wait(const Op& op) {
    PollPacer pacer;
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
                                  ? parts_.engine.world->timeout() / 4
                                  : parts_.engine.world->timeout() * 3 / 2;
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
    op.step_started_ns = trace::enabled() ? trace::now_ns() : 0;
    const std::size_t element = dtype_size(op.dtype);
    const HostLayout& layout = parts_.engine.layout;
    const int rails = static_cast<int>(layout.rails.size());
    switch (op.step) {
      case Step::host_sum:
        op.current =
            parts_.local->all_reduce_start(op.sums.get(), op.sums.get(), op.count, DType::f32);
        return;
      case Step::rail: {
        const std::size_t begin = share_begin(op.count, rails, layout.place);
        const std::size_t end = share_begin(op.count, rails, layout.place + 1);
        op.current = parts_.engine.rail->all_reduce_rounding_start(
            op.sums.get() + begin, op.output + begin * element, end - begin, op.dtype);
        return;
      }
      case Step::gather: {
        // In place: rank i of the host holds slice i (none past the rails).
        const std::size_t members = layout.hosts[layout.host].size();
        std::vector<std::size_t> counts(members);
        for (std::size_t i = 0; i < members; ++i) {
          const int first = std::min(static_cast<int>(i), rails);
          const int last = std::min(static_cast<int>(i) + 1, rails);
          counts[i] = share_begin(op.count, rails, last) - share_begin(op.count, rails, first);
        }
        const std::size_t mine = share_begin(op.count, rails, std::min(layout.place, rails));
        op.current = parts_.slices->all_gather_start(op.output + mine * element, op.output, counts,
                                                     op.dtype);
        return;
      }
      case Step::done:
        return;
    }
  }

  void finish_step(Op& op) {
    op.current.reset();
    // A step that started before tracing did has no span.
    if (trace::enabled() && op.step_started_ns != 0) {
      static constexpr const char* kNames[] = {"host sum", "rail", "host gather"};
      trace::complete(kNames[static_cast<int>(op.step)], "comm", trace::Track::comm,
                      op.step_started_ns, trace::now_ns(), trace::Args().add("elements", op.count));
    }
    switch (op.step) {
      case Step::host_sum:
        op.step = parts_.engine.rail != nullptr ? Step::rail : Step::gather;
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
    failure_ = with_their_hosts(error);
    try {
      std::rethrow_exception(failure_);
    } catch (const std::exception& widened) {
      abort_parts(parts_, widened.what());
    }
    std::rethrow_exception(failure_);
  }

  // A timeout or a lost peer on another host stands for that host: a cut
  // link or a dead machine takes all its ranks, so the error names them all.
  std::exception_ptr with_their_hosts(const std::exception& error) const {
    const auto* comm_error = dynamic_cast<const CommError*>(&error);
    const bool timeout = dynamic_cast<const TimeoutError*>(&error) != nullptr;
    const bool lost = dynamic_cast<const PeerLostError*>(&error) != nullptr;
    if (comm_error == nullptr || comm_error->ranks().empty() || (!timeout && !lost)) {
      return std::current_exception();
    }
    const HostLayout& layout = parts_.engine.layout;
    std::vector<int> ranks;
    for (const std::vector<int>& host : layout.hosts) {
      const bool named = std::any_of(host.begin(), host.end(), [&](int r) {
        const auto& named_ranks = comm_error->ranks();
        return std::find(named_ranks.begin(), named_ranks.end(), r) != named_ranks.end();
      });
      if (named && &host != &layout.hosts[layout.host])
        ranks.insert(ranks.end(), host.begin(), host.end());
    }
    std::sort(ranks.begin(), ranks.end());
    if (ranks.empty() || ranks == comm_error->ranks()) return std::current_exception();
    const std::string what =
        cat(error.what(), "; the host of rank(s) ", format_ranks(comm_error->ranks()),
            " holds rank(s) ", format_ranks(ranks), ", unreachable with it");
    return timeout ? std::make_exception_ptr(TimeoutError(what, ranks))
                   : std::make_exception_ptr(PeerLostError(what, ranks));
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
      : parts_(parts),
        pipeline_(std::make_shared<Pipeline>(std::move(parts))),
        gathers_along_rails_(fits_rails(parts_, max_gather_bytes())) {}

  int rank() const override { return world().rank(); }
  int size() const override { return world().size(); }
  const std::string& name() const override { return world().name(); }
  std::chrono::milliseconds timeout() const override { return world().timeout(); }
  int ranks_on_host() const override {
    const HostLayout& layout = parts_.engine.layout;
    return static_cast<int>(layout.hosts[layout.host].size());
  }
  int hosts() const override { return static_cast<int>(parts_.engine.layout.hosts.size()); }
  std::string transport() const override { return "shm+" + parts_.engine.engine; }
  bool progresses_only_when_called() const override { return true; }
  std::size_t max_gather_bytes() const override {
    return std::min(world().max_gather_bytes(), parts_.local->max_gather_bytes());
  }
  int max_reduces_in_flight() const override { return kMaxInFlight; }
  void abort(std::string_view reason) override { abort_parts(parts_, reason); }

 protected:
  // The byte gather (a call's agreement) goes through the host's shared
  // memory, then along the rails: each rank sends its host's block to one
  // peer per other host, where the world's would send every contribution to
  // every rank (2 hosts x 2 ranks over gloo: 3 messages each way, 2 across
  // hosts). Where the hosts' ranks differ in number, or a host's block could
  // pass the rail's limit, it goes over the world. The tensor gather goes
  // over the world (bytes copied: no order to keep); the reduce-scatter is
  // the Communicator's default, this all-reduce into private memory, so that
  // its sums are this all-reduce's, bitwise.
  std::vector<std::string> do_all_gather(std::string_view mine) override {
    finish(0);
    try {
      if (!gathers_along_rails_) return world().all_gather(mine);
      return gather_along_rails(mine);
    } catch (const std::exception& error) {
      pipeline_->fail(error);
    }
  }
  std::unique_ptr<GatherWork> do_all_gather_start(const void* input, void* output,
                                                  std::span<const std::size_t> counts,
                                                  DType dtype) override {
    finish(0);
    try {
      return world().all_gather_start(input, output, counts, dtype);
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

  Communicator& world() const { return *parts_.engine.world; }

  // Every host holds the same number of ranks (so each rank has a rail),
  // and a host's block of contributions, each framed by its length, fits
  // what the rail gathers. The same on every rank: the layout's.
  static bool fits_rails(const Pipeline::Parts& parts, std::size_t max_bytes) {
    const HostLayout& layout = parts.engine.layout;
    const std::size_t on_host = layout.hosts.front().size();
    for (const std::vector<int>& host : layout.hosts) {
      if (host.size() != on_host) return false;
    }
    return parts.engine.rail != nullptr &&
           on_host * (max_bytes + sizeof(std::uint64_t)) <= parts.engine.rail->max_gather_bytes();
  }

  std::vector<std::string> gather_along_rails(std::string_view mine) {
    const HostLayout& layout = parts_.engine.layout;
    std::string block;
    for (const std::string& piece : parts_.local->all_gather(mine)) {
      const std::uint64_t length = piece.size();
      block.append(reinterpret_cast<const char*>(&length), sizeof length);
      block += piece;
    }
    const std::vector<int>& rail = layout.rails[static_cast<std::size_t>(layout.place)];
    const std::vector<std::string> blocks = parts_.engine.rail->all_gather(block);
    require(blocks.size() == rail.size(), "all_gather: the rail gave ", blocks.size(),
            " blocks for its ", rail.size(), " ranks");
    std::vector<std::string> gathered(static_cast<std::size_t>(size()));
    for (std::size_t r = 0; r < rail.size(); ++r) {
      const auto host = std::find_if(layout.hosts.begin(), layout.hosts.end(), [&](const auto& h) {
        return std::find(h.begin(), h.end(), rail[r]) != h.end();
      });
      std::string_view rest = blocks[r];
      for (const int rank : *host) {
        std::uint64_t length = 0;
        require(rest.size() >= sizeof length, "all_gather: rank ", rail[r],
                " sent its host's block cut short");
        std::memcpy(&length, rest.data(), sizeof length);
        rest.remove_prefix(sizeof length);
        require(length <= rest.size(), "all_gather: rank ", rail[r],
                " sent its host's block cut short");
        gathered[static_cast<std::size_t>(rank)] = std::string(rest.substr(0, length));
        rest.remove_prefix(length);
      }
    }
    return gathered;
  }

  // Waits until at most `left` all-reduces are in flight, oldest first.
  void finish(std::size_t left) {
    while (pipeline_->in_flight() > left) {
      if (auto oldest = pipeline_->oldest()) pipeline_->wait(*oldest);
    }
  }

  Pipeline::Parts parts_;
  std::shared_ptr<Pipeline> pipeline_;
  bool gathers_along_rails_;
};

// The host's shm group: its lowest rank makes a private directory sealed
// with a fresh job secret and sends both to the host's ranks in an
// all-gather over the world; every rank of the host joins, and once the
// whole world is past the join the lowest rank removes the directory.
std::shared_ptr<Communicator> create_host_group(Communicator& world, const HostLayout& layout) {
  const std::vector<int>& host = layout.hosts[layout.host];
  std::filesystem::path dir;
  std::string offer;
  if (layout.place == 0) {
    dir = FileStore::make_private_dir();
    try {
      FileStore store(dir);
      const JobSecret secret = JobSecret::generate();
      seal_store(store, secret);
      offer = cat(dir.string(), "\n", secret.hex());
    } catch (...) {
      std::filesystem::remove_all(dir);
      throw;
    }
  }
  std::vector<std::string> offers;
  try {
    offers = world.all_gather(offer);
  } catch (...) {
    if (!dir.empty()) std::filesystem::remove_all(dir);
    throw;
  }
  const std::string& mine = offers[static_cast<std::size_t>(host.front())];
  const std::size_t cut = mine.find('\n');
  require(cut != std::string::npos, "hierarchical communicator: rank ", host.front(),
          " sent no rendezvous for its host");
  std::shared_ptr<Communicator> local;
  std::exception_ptr failure;
  try {
    FileStore store(mine.substr(0, cut));
    local = create_shm_communicator(
        store, layout.place, static_cast<int>(host.size()),
        ShmOptions{.timeout = world.timeout() * 3 / 2, .secret = mine.substr(cut + 1)});
  } catch (...) {
    failure = std::current_exception();
  }
  if (failure) {
    world.abort("the host's shared-memory group could not be made");
  } else {
    try {
      world.barrier();
    } catch (...) {
      failure = std::current_exception();
    }
  }
  if (!dir.empty()) std::filesystem::remove_all(dir);
  if (failure) std::rethrow_exception(failure);
  return local;
}

}  // namespace

std::string this_host_key() {
  if (const char* host = std::getenv("TPFUSE_HOST"); host != nullptr && *host != '\0') {
    return cat("TPFUSE_HOST=", host);
  }
  char hostname[256] = {};
  gethostname(hostname, sizeof hostname - 1);
  struct stat info {};
  const std::string ns =
      stat("/proc/self/ns/net", &info) == 0 ? cat(info.st_dev, ":", info.st_ino) : "unknown";
  return cat(hostname, ":", ns);
}

bool HostLayout::hierarchical() const {
  std::size_t ranks = 0;
  for (const std::vector<int>& members : hosts) ranks += members.size();
  return hosts.size() >= 2 && hosts.size() < ranks;
}

HostLayout host_layout(const std::vector<std::string>& keys, int rank) {
  std::map<std::string, std::vector<int>> by_host;
  for (int r = 0; r < static_cast<int>(keys.size()); ++r) by_host[keys[r]].push_back(r);
  HostLayout layout;
  std::size_t rails = keys.size();
  for (const auto& [key, ranks] : by_host) {
    if (key == keys[static_cast<std::size_t>(rank)]) {
      layout.host = static_cast<int>(layout.hosts.size());
      layout.place = static_cast<int>(std::find(ranks.begin(), ranks.end(), rank) - ranks.begin());
    }
    layout.hosts.push_back(ranks);
    rails = std::min(rails, ranks.size());
  }
  layout.rails.resize(rails);
  for (std::size_t j = 0; j < rails; ++j) {
    for (const std::vector<int>& ranks : layout.hosts) layout.rails[j].push_back(ranks[j]);
    std::sort(layout.rails[j].begin(), layout.rails[j].end());
  }
  return layout;
}

std::shared_ptr<Communicator> create_hierarchical_communicator(HierarchicalParts parts) {
  require(parts.world != nullptr, "hierarchical communicator: the world group is required");
  require(parts.layout.hierarchical(),
          "hierarchical communicator: the layout needs several hosts, some with several ranks");
  auto local = create_host_group(*parts.world, parts.layout);
  auto slices = create_host_group(*parts.world, parts.layout);
  log::set_rank(parts.world->rank());  // the shm groups recorded their own rank
  return std::make_shared<HierarchicalCommunicator>(
      Pipeline::Parts{std::move(parts), std::move(local), std::move(slices)});
}

}  // namespace tpfuse::comm
