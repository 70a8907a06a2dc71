// The hierarchical all-reduce, for jobs whose hosts hold several ranks each:
// the ranks of a host sum their contributions over the shm transport, one
// rank per host (its lowest, the leader) all-reduces the host sums over MPI,
// and each leader sends the result to the other ranks of its host. Only the
// leaders' sums cross the network, once per host instead of once per rank.
//
// Numerics: contributions are widened to fp32 (exactly), summed in fp32 in
// rank order inside each host, the host sums summed in fp32 in the order of
// their leaders' ranks, and the total rounded once to the dtype by the
// leader. The order is fixed by the layout, so every rank gets the same
// bytes; it is not the flat rank-order sum (((x0 + x1) + x2) + x3 becomes
// (x0 + x1) + (x2 + x3) with two ranks on each of two hosts), which
// TPFUSE_MPI_HIERARCHICAL=off restores.
//
// "Same host" is the same hostname and network namespace, and a shm group
// that the host's ranks can set up together through a directory in /tmp.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>

#include "comm/mpi/mpi_group.h"
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

struct Layout {
  std::vector<int> host;     // world ranks on this rank's host, increasing
  std::vector<int> leaders;  // the lowest rank of every host, increasing
};

Layout layout_of(const std::vector<std::string>& keys, int rank) {
  Layout layout;
  std::map<std::string, int> leader_of;
  for (int r = 0; r < static_cast<int>(keys.size()); ++r) {
    if (leader_of.emplace(keys[r], r).second) layout.leaders.push_back(r);
    if (keys[r] == keys[rank]) layout.host.push_back(r);
  }
  return layout;
}

// One all-reduce: the host's sum (shm), the leaders' sum (MPI), the result
// shared in the host (MPI). Each step's wait is bounded by its transport.
class HierarchicalWork final : public Work {
 public:
  struct Steps {
    std::shared_ptr<Communicator> flat;
    std::shared_ptr<Communicator> local;
    std::shared_ptr<Communicator> leaders;  // null where this rank is not its host's leader
    std::shared_ptr<const Layout> layout;
  };
  HierarchicalWork(Steps steps, const void* input, void* output, std::size_t count, DType dtype)
      : steps_(steps),
        output_(static_cast<std::byte*>(output)),
        count_(count),
        dtype_(dtype),
        sums_(std::make_unique<float[]>(count)) {
    widen(dtype, static_cast<const std::byte*>(input), count, sums_.get());
    current_ = steps_.local->all_reduce_start(sums_.get(), sums_.get(), count, DType::f32);
  }
  ~HierarchicalWork() override {
    try {
      wait();
    } catch (const std::exception& error) {
      log::debug("unfinished all-reduce dropped: ", error.what());
    }
  }
  bool test() override {
    while (step_ != Step::done && current_->test()) next();
    return step_ == Step::done;
  }
  void wait() override {
    while (step_ != Step::done) {
      current_->wait();
      next();
    }
  }

 private:
  enum class Step { host_sum, leaders_sum, sharing, done };

  void next() {
    switch (step_) {
      case Step::host_sum:
        if (steps_.leaders != nullptr) {
          step_ = Step::leaders_sum;
          current_ =
              steps_.leaders->all_reduce_start(sums_.get(), sums_.get(), count_, DType::f32);
          return;
        }
        break;  // not the leader: receive its result
      case Step::leaders_sum:
        narrow(dtype_, sums_.get(), count_, output_);  // the one rounding
        break;
      case Step::sharing:
      case Step::done:
        step_ = Step::done;
        current_.reset();
        sums_.reset();
        return;
    }
    step_ = Step::sharing;
    current_ = share_start(*steps_.flat, output_, count_ * dtype_size(dtype_),
                           steps_.layout->host.front(), steps_.layout->host);
  }

  Steps steps_;
  std::byte* output_;
  std::size_t count_;
  DType dtype_;
  std::unique_ptr<float[]> sums_;
  std::unique_ptr<Work> current_;
  Step step_ = Step::host_sum;
};

class HierarchicalCommunicator final : public Communicator {
 public:
  HierarchicalCommunicator(std::shared_ptr<Communicator> flat, std::shared_ptr<Communicator> local,
                           std::shared_ptr<Communicator> leaders, Layout layout)
      : flat_(std::move(flat)),
        local_(std::move(local)),
        leaders_(std::move(leaders)),
        layout_(std::make_shared<const Layout>(std::move(layout))) {}

  int rank() const override { return flat_->rank(); }
  int size() const override { return flat_->size(); }
  const std::string& name() const override { return flat_->name(); }
  std::chrono::milliseconds timeout() const override { return flat_->timeout(); }
  int ranks_on_host() const override { return static_cast<int>(layout_->host.size()); }
  bool progresses_only_when_called() const override { return true; }
  std::size_t max_gather_bytes() const override { return flat_->max_gather_bytes(); }
  std::vector<std::string> all_gather(std::string_view mine) override {
    finish();
    return flat_->all_gather(mine);
  }
  void abort(std::string_view reason) override {
    flat_->abort(reason);
    local_->abort(reason);
    if (leaders_) leaders_->abort(reason);
  }

  std::unique_ptr<Work> all_reduce_start(const void* input, void* output, std::size_t count,
                                         DType dtype) override {
    require(is_floating(dtype), "all_reduce: dtype must be f16, bf16 or f32, got ",
            dtype_name(dtype));
    require(count == 0 || (input != nullptr && output != nullptr),
            "all_reduce: input and output must not be null when count (", count,
            ") is positive");
    finish();
    auto work = std::make_unique<HierarchicalWork>(
        HierarchicalWork::Steps{flat_, local_, leaders_, layout_}, input, output, count, dtype);
    *last_ = work.get();
    return std::make_unique<Tracked>(std::move(work), last_);
  }

 private:
  // Lets the communicator finish the all-reduce in flight before the next
  // collective, and forget it once its Work is gone.
  class Tracked final : public Work {
   public:
    Tracked(std::unique_ptr<Work> work, std::shared_ptr<Work*> last)
        : work_(std::move(work)), last_(std::move(last)) {}
    ~Tracked() override {
      if (*last_ == work_.get()) *last_ = nullptr;
    }
    bool test() override { return work_->test(); }
    void wait() override { work_->wait(); }

   private:
    std::unique_ptr<Work> work_;
    std::shared_ptr<Work*> last_;
  };

  void finish() {
    if (*last_ != nullptr) (*last_)->wait();
  }

  std::shared_ptr<Communicator> flat_;
  std::shared_ptr<Communicator> local_;
  std::shared_ptr<Communicator> leaders_;
  std::shared_ptr<const Layout> layout_;
  // The all-reduce in flight, shared with its Work (which may outlive this).
  std::shared_ptr<Work*> last_ = std::make_shared<Work*>(nullptr);
};

}  // namespace

std::shared_ptr<Communicator> make_hierarchical(std::shared_ptr<Communicator> flat,
                                                const MpiOptions& options) {
  const std::string& mode = kHierarchical.get();
  require(mode == "auto" || mode == "off", kHierarchical.name(), ": expected auto or off, got \"",
          mode, "\"");
  const Layout layout = layout_of(host_keys(*flat), flat->rank());
  const bool shared_hosts = static_cast<int>(layout.leaders.size()) < flat->size();
  // Every rank sees the same keys, so every rank takes the same branch.
  if (mode == "off" || layout.leaders.size() < 2 || !shared_hosts) return flat;

  // The host's shm group meets in a directory named after the job and the
  // host's leader; the leader removes it once every rank has joined.
  const int leader = layout.host.front();
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / cat(flat->name(), "-host", leader);
  std::filesystem::create_directories(dir);
  std::shared_ptr<Communicator> local;
  {
    FileStore store(dir);
    const auto place = std::find(layout.host.begin(), layout.host.end(), flat->rank());
    local = create_shm_communicator(store, static_cast<int>(place - layout.host.begin()),
                                    static_cast<int>(layout.host.size()),
                                    ShmOptions{.timeout = options.timeout});
  }
  log::set_rank(flat->rank());  // the shm group recorded its own rank
  flat->barrier();
  if (flat->rank() == leader) std::filesystem::remove_all(dir);
  auto leaders = create_group(options, layout.leaders);
  return std::make_shared<HierarchicalCommunicator>(std::move(flat), std::move(local),
                                                    std::move(leaders), layout);
}

}  // namespace tpfuse::comm::mpi
