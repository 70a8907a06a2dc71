#include "bench_common.h"

#include <dirent.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <string_view>

#include "core/cpu_isa.h"
#include "gemm/microkernel.h"
#include "tpfuse/comm/mpi.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/core/dtype.h"
#include "tpfuse/core/error.h"

namespace tpfuse::cli {

std::optional<GemmShape> parse_mnk(const std::string& text) {
  long long m = 0, n = 0, k = 0;
  char x1 = 0, x2 = 0, rest = 0;
  if (std::sscanf(text.c_str(), "%lld%c%lld%c%lld%c", &m, &x1, &n, &x2, &k, &rest) != 5 || x1 != 'x' || x2 != 'x' ||
      m < 1 || n < 1 || k < 1) {
    return std::nullopt;
  }
  return GemmShape{m, n, k};
}

std::string format_bytes(std::int64_t bytes, bool sign) {
  const char* prefix = sign ? (bytes < 0 ? "-" : "+") : (bytes < 0 ? "-" : "");
  const double size = static_cast<double>(bytes < 0 ? -bytes : bytes);
  if (size < 1024) return cat(prefix, bytes < 0 ? -bytes : bytes, " B");
  if (size < 1024.0 * 1024) return cat(prefix, std::round(size / 1024 * 10) / 10, " KiB");
  return cat(prefix, std::round(size / (1024.0 * 1024) * 10) / 10, " MiB");
}

double median(std::vector<double> values) {
  if (values.empty()) return std::nan("");
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

std::vector<int> allowed_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cores;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return {0};
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) cores.push_back(c);
  }
  return cores;
}

void pin_process(const std::vector<int>& cores) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int core : cores) CPU_SET(core, &set);
  DIR* tasks = opendir("/proc/self/task");
  if (tasks == nullptr) {
    if (sched_setaffinity(0, sizeof(set), &set) != 0) throw_system_error("sched_setaffinity", errno);
    return;
  }
  while (const dirent* entry = readdir(tasks)) {
    if (entry->d_name[0] == '.') continue;
    sched_setaffinity(static_cast<pid_t>(std::atoi(entry->d_name)), sizeof(set), &set);
  }
  closedir(tasks);
}

int pin_rank(int rank, int ranks, const std::vector<int>& cores) {
  const std::size_t count = cores.size();
  const auto r = static_cast<std::size_t>(rank);
  const std::size_t block = static_cast<std::size_t>(ranks) <= count ? count / static_cast<std::size_t>(ranks) : 1;
  const std::size_t first = block > 1 || static_cast<std::size_t>(ranks) <= count ? r * block : r % count;
  pin_process(std::vector<int>(cores.begin() + static_cast<std::ptrdiff_t>(first),
                               cores.begin() + static_cast<std::ptrdiff_t>(first + block)));
  return static_cast<int>(block);
}

std::string pinning_text(int ranks, bool no_pin) {
  if (no_pin) return "not pinned";
  const auto cores = static_cast<int>(allowed_cores().size());
  if (ranks > cores) return cat("pinned one per core (rank % ", cores, " cores)");
  if (ranks * 2 > cores) return "pinned one per core";
  return cat("pinned to blocks of ", cores / ranks, " cores");
}

namespace {

std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  }
  return "unknown CPU";
}

std::string load_average() {
  std::ifstream loadavg("/proc/loadavg");
  std::string one, five, fifteen;
  loadavg >> one >> five >> fifteen;
  return cat(one, " ", five, " ", fifteen);
}

}  // namespace

std::string machine_facts() {
  std::string allowed;
  for (int core : allowed_cores()) allowed += cat(allowed.empty() ? "" : ",", core);
  return cat(cpu_model(), ", ", sysconf(_SC_NPROCESSORS_ONLN), " cores online (", allowed, " allowed), tpfuse ISA ",
             isa_name(active_isa()), ", load average ", load_average());
}

namespace {

double thread_cpu_seconds() {
  timespec now{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return static_cast<double>(now.tv_sec) + 1e-9 * static_cast<double>(now.tv_nsec);
}

}  // namespace

double timed_batch(comm::Communicator& comm, const std::function<void()>& call, int calls, double* cpu_per_call) {
  comm.barrier();
  const double cpu_start = thread_cpu_seconds();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i) call();
  const double mine = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / calls;
  if (cpu_per_call != nullptr) *cpu_per_call = (thread_cpu_seconds() - cpu_start) / calls;
  const auto everyone = comm.all_gather(std::string_view(reinterpret_cast<const char*>(&mine), sizeof(mine)));
  double slowest = 0;
  for (const std::string& bytes : everyone) {
    double theirs = 0;
    std::memcpy(&theirs, bytes.data(), sizeof(theirs));
    slowest = std::max(slowest, theirs);
  }
  return slowest;
}

int calls_per_batch(double once_seconds, double min_batch_ms) {
  return static_cast<int>(std::clamp(std::ceil(min_batch_ms * 1e-3 / std::max(once_seconds, 1e-9)), 1.0, 100000.0));
}

comm::RankContext rank_context_from_env() {
  comm::RankContext ctx;
  ctx.comm = comm::create_communicator_from_env();
  ctx.rank = ctx.comm->rank();
  ctx.size = ctx.comm->size();
  comm::register_communicator(ctx.comm);
  return ctx;
}

RankReport run_local_ranks(int ranks, bool no_pin, const std::function<RankReport(comm::RankContext&)>& body) {
  int fds[2];
  if (pipe(fds) != 0) throw_system_error("pipe", errno);
  const std::vector<int> cores = allowed_cores();
  comm::LaunchOptions options;
  options.ranks = ranks;
  std::fflush(stdout);
  const auto launch = comm::launch_local(options, [&](comm::RankContext& ctx) {
    close(fds[0]);
    if (!no_pin) pin_rank(ctx.rank, ranks, cores);
    const RankReport report = body(ctx);
    if (ctx.rank != 0) return 0;
    const std::uint64_t sizes[2] = {report.values.size(), report.text.size()};
    std::string wire(reinterpret_cast<const char*>(sizes), sizeof(sizes));
    wire.append(reinterpret_cast<const char*>(report.values.data()), report.values.size() * sizeof(double));
    wire += report.text;
    return write(fds[1], wire.data(), wire.size()) == static_cast<ssize_t>(wire.size()) ? 0 : 3;
  });
  close(fds[1]);
  std::string wire;
  char buffer[4096];
  for (ssize_t got; (got = read(fds[0], buffer, sizeof(buffer))) > 0;) wire.append(buffer, static_cast<std::size_t>(got));
  close(fds[0]);
  if (!launch.ok()) throw Error(cat("the ranks failed: ", launch.describe_failures()));
  std::uint64_t sizes[2] = {0, 0};
  if (wire.size() < sizeof(sizes)) throw Error("rank 0 reported no result");
  std::memcpy(sizes, wire.data(), sizeof(sizes));
  if (wire.size() != sizeof(sizes) + sizes[0] * sizeof(double) + sizes[1]) throw Error("rank 0's report is truncated");
  RankReport report;
  report.values.resize(sizes[0]);
  std::memcpy(report.values.data(), wire.data() + sizeof(sizes), sizes[0] * sizeof(double));
  report.text = wire.substr(sizeof(sizes) + sizes[0] * sizeof(double));
  return report;
}

std::shared_ptr<OneDnnMatmul> make_onednn_matmul(std::int64_t m, std::int64_t n, std::int64_t k,
                                                 dnnl::memory::data_type in_type,
                                                 dnnl::memory::data_type out_type, const void* x1,
                                                 const void* x2, void* dst, bool x2_transposed) {
  using dnnl::memory;
  auto mm = std::make_shared<OneDnnMatmul>();
  const memory::desc src({m, k}, in_type, {k, 1});
  const memory::desc weights = x2_transposed ? memory::desc({k, n}, in_type, {1, k})
                                             : memory::desc({k, n}, in_type, {n, 1});
  const memory::desc out({m, n}, out_type, {n, 1});
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, weights, out), mm->engine);
  mm->impl = pd.impl_info_str();
  mm->primitive = std::make_unique<dnnl::matmul>(pd);
  mm->args = {{DNNL_ARG_SRC, memory(src, mm->engine, const_cast<void*>(x1))},
              {DNNL_ARG_WEIGHTS, memory(weights, mm->engine, const_cast<void*>(x2))},
              {DNNL_ARG_DST, memory(out, mm->engine, dst)}};
  return mm;
}

std::shared_ptr<OneDnnMatmul> make_native_onednn_matmul(std::int64_t m, std::int64_t n, std::int64_t k,
                                                        dnnl::memory::data_type in_type,
                                                        dnnl::memory::data_type out_type, const void* x1,
                                                        const void* x2, void* dst, bool x2_transposed) {
  try {
    auto mm = make_onednn_matmul(m, n, k, in_type, out_type, x1, x2, dst, x2_transposed);
    return mm->impl.rfind("ref", 0) == 0 ? nullptr : mm;
  } catch (const dnnl::error&) {
    return nullptr;
  }
}

void convert_to_f32(DType dtype, const void* src, std::int64_t count, float* dst, int threads) {
  const gemm::KernelTable& kernels = gemm::kernels_for(active_isa());
  constexpr std::int64_t kChunk = 1 << 16;
  const std::int64_t chunks = (count + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::int64_t begin = c * kChunk;
    const auto* from = static_cast<const unsigned char*>(src) + static_cast<std::size_t>(begin) * dtype_size(dtype);
    kernels.convert_to_f32(dtype, from, std::min(kChunk, count - begin), dst + begin);
  }
}

}  // namespace tpfuse::cli
