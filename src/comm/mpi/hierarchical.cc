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
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>

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

struct Layout {
  std::vector<int> host;  // world ranks on this rank's host, increasing
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

// Slice j of `count` elements cut in `slices`: [begin(j), begin(j + 1)).
std::size_t slice_begin(std::size_t count, std::size_t slices, std::size_t j) {
  return count / slices * j + count % slices * j / slices;
}

// One all-reduce: the host sum (shm), this rank's rail (MPI), the gather of
// the slices in the host (MPI). Each step's wait is bounded by its transport.
// Both the thread that starts the next all-reduce (which first completes
// this one) and a helper thread may wait on it: a mutex keeps them in turn.
class HierarchicalWork final : public Work {
 public:
  struct Steps {
    std::shared_ptr<Communicator> flat;
    std::shared_ptr<Communicator> local;
    std::shared_ptr<Communicator> rail;  // null where this rank's place in its host has no rail
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
    const std::lock_guard lock(mutex_);
    while (step_ != Step::done && current_->test()) next();
    return step_ == Step::done;
  }
  void wait() override {
    const std::lock_guard lock(mutex_);
    while (step_ != Step::done) {
      current_->wait();
      next();
    }
  }

 private:
  enum class Step { host_sum, rail, gather, done };

  void next() {
    const std::size_t element = dtype_size(dtype_);
    const std::vector<int>& host = steps_.layout->host;
    const std::size_t rails = steps_.layout->rails.size();
    if (step_ == Step::host_sum && steps_.rail != nullptr) {
      const auto place = static_cast<std::size_t>(local_place());
      const std::size_t begin = slice_begin(count_, rails, place);
      const std::size_t end = slice_begin(count_, rails, place + 1);
      step_ = Step::rail;
      current_ = all_reduce_rounding_start(*steps_.rail, sums_.get() + begin,
                                           output_ + begin * element, end - begin, dtype_);
    } else if (step_ == Step::host_sum || step_ == Step::rail) {
      std::vector<std::size_t> offsets(host.size() + 1);
      for (std::size_t i = 0; i <= host.size(); ++i) {
        offsets[i] = slice_begin(count_, rails, std::min(i, rails)) * element;
      }
      step_ = Step::gather;
      current_ = gather_slices_start(*steps_.flat, output_, offsets, host);
    } else {
      step_ = Step::done;
      current_.reset();
      sums_.reset();
    }
  }

  // This rank's place among its host's ranks.
  int local_place() const {
    const std::vector<int>& host = steps_.layout->host;
    return static_cast<int>(std::find(host.begin(), host.end(), steps_.flat->rank()) - host.begin());
  }

  Steps steps_;
  std::byte* output_;
  std::size_t count_;
  DType dtype_;
  std::unique_ptr<float[]> sums_;
  std::unique_ptr<Work> current_;
  Step step_ = Step::host_sum;
  std::mutex mutex_;
};

class HierarchicalCommunicator final : public Communicator {
 public:
  HierarchicalCommunicator(std::shared_ptr<Communicator> flat, std::shared_ptr<Communicator> local,
                           std::shared_ptr<Communicator> rail, Layout layout)
      : flat_(std::move(flat)),
        local_(std::move(local)),
        rail_(std::move(rail)),
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
    if (rail_) rail_->abort(reason);
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
        HierarchicalWork::Steps{flat_, local_, rail_, layout_}, input, output, count, dtype);
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
  std::shared_ptr<Communicator> rail_;
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
  const bool shared_hosts = layout.hosts < flat->size();
  // Every rank sees the same keys, so every rank takes the same branch.
  if (mode == "off" || layout.hosts < 2 || !shared_hosts) return flat;

  // The host's shm group meets in a directory named after the job and the
  // host's lowest rank, which removes it once every rank has joined.
  const int first = layout.host.front();
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / cat(flat->name(), "-host", first);
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
  if (flat->rank() == first) std::filesystem::remove_all(dir);
  // Every rank takes part in making every rail (collective over the world).
  std::shared_ptr<Communicator> rail;
  for (const std::vector<int>& members : layout.rails) {
    if (auto group = create_group(options, members)) rail = std::move(group);
  }
  return std::make_shared<HierarchicalCommunicator>(std::move(flat), std::move(local),
                                                    std::move(rail), layout);
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
