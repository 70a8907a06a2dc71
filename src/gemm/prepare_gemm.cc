// Engine selection: the one place that decides which engine computes a call,
// from the CPU's features and the call's shape only (never from a timing
// taken at run time), so that a machine and a call always get the same
// engine, and the same bits. Each rule carries the measurement behind it
// (tpfuse bench gemm, one thread, ratios from one run); `tpfuse bench gemm`
// prints the rule each measurement took.
//
//   bf16 x1, AVX512-BF16    the pair engine (vdpbf16ps, pair_gemm.cc)
//   int8 full quant         oneDNN's s8 matmul where the CPU has VNNI
//   anything else           the fp32 micro-kernels (float_gemm.cc)
// with the exceptions written at each rule below. (The reference engine
// computes nothing here: it is the tests' yardstick.) The micro-kernels come
// from the table of the level asked for.
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>

#include "gemm/engines.h"
#include "gemm/float_gemm.h"
#include "gemm/microkernel.h"
#include "gemm/onednn_gemm.h"
#include "gemm/pair_gemm.h"
#include "tpfuse/core/config.h"
#include "tpfuse/core/error.h"

namespace tpfuse::gemm {

namespace {

const EnvSetting<std::int64_t> kNumThreads{
    "TPFUSE_NUM_THREADS", 0,
    "GEMM threads per rank (default: the rank's cores divided among the ranks of this host "
    "that share them)"};

constexpr std::int64_t kInPlaceInt8Rows = 4;

// Bumped in a child after fork(): a forked rank is usually pinned anew.
std::atomic<std::uint64_t> g_forks{0};

// The cores this thread may run on. Read again at most every 100 ms and
// after a fork, not on every call: sched_getaffinity is a system call, which
// took 3 of a small call's 5 us of CPU in a VM. A new affinity shows within
// that time.
int cores_available() {
  static const bool watching_forks = [] {
    return pthread_atfork(nullptr, nullptr,
                          [] { g_forks.fetch_add(1, std::memory_order_relaxed); }) == 0;
  }();
  constexpr std::int64_t kRecheckNs = 100'000'000;
  thread_local int cores = 0;
  thread_local std::int64_t checked_ns = 0;
  thread_local std::uint64_t forks_seen = 0;
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
  const std::int64_t now_ns = now.tv_sec * 1'000'000'000LL + now.tv_nsec;
  const std::uint64_t forks = g_forks.load(std::memory_order_relaxed);
  if (cores == 0 || !watching_forks || forks != forks_seen || now_ns - checked_ns >= kRecheckNs) {
    forks_seen = forks;
    cpu_set_t set;
    CPU_ZERO(&set);
    cores = sched_getaffinity(0, sizeof(set), &set) == 0 ? std::max(1, CPU_COUNT(&set)) : 1;
    checked_ns = now_ns;
  }
  return cores;
}

// Cores in a cpuset list such as "0-3,8,10-11" (0 when it does not parse).
int cores_in_list(const std::string& list) {
  int count = 0;
  std::istringstream ranges(list);
  for (std::string range; std::getline(ranges, range, ',');) {
    int first = 0, last = 0;
    char dash = 0;
    std::istringstream in(range);
    if (!(in >> first)) return 0;
    last = first;
    if (in >> dash && !(dash == '-' && in >> last)) return 0;
    if (last < first) return 0;
    count += last - first + 1;
  }
  return count;
}

// The cores of this host the job may use: its cgroup's cpuset (what a
// container is given) where the system shows one, else the cores online.
int host_cores() {
  static const int cores = [] {
    std::ifstream file("/sys/fs/cgroup/cpuset.cpus.effective");
    std::string list;
    if (file >> list && cores_in_list(list) > 0) return cores_in_list(list);
    return static_cast<int>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
  }();
  return cores;
}

}  // namespace

int share_of_cores(int mine, int host, int ranks_on_host) {
  mine = std::max(1, mine);
  ranks_on_host = std::max(1, ranks_on_host);
  host = std::max(host, mine);
  const std::int64_t sharing = std::clamp<std::int64_t>(
      (static_cast<std::int64_t>(ranks_on_host) * mine + host - 1) / host, 1, ranks_on_host);
  return std::max(1, mine / static_cast<int>(sharing));
}

int default_gemm_threads(int ranks_on_host) {
  const std::int64_t forced = kNumThreads.get();
  require(forced >= 0, "TPFUSE_NUM_THREADS must be >= 0, got ", forced);
  if (forced > 0) return static_cast<int>(std::min<std::int64_t>(forced, 1024));
  return share_of_cores(cores_available(), host_cores(), ranks_on_host);
}

EngineChoice choose_engine(const GemmOperands& operands, IsaLevel level) {
  const GemmProblem& s = operands.shape;
  const bool dl = level >= IsaLevel::avx512_dl;
  switch (s.mode) {
    case Mode::full_quant:
      // VNNI's int8 kernel does four times the work per instruction of the
      // fp32 micro-kernels, and wins back oneDNN's copy of x2 from a few
      // rows on (n = k = 4096: 33 against 28 GFLOP/s at 4 rows, 39 against
      // 52 at 8).
      if (dl && cpu_features().avx512_vnni && (s.m > kInPlaceInt8Rows || !float_gemm_reads_x2_in_place(operands))) {
        return {Engine::onednn, "int8 with AVX512-VNNI: oneDNN's s8 kernel"};
      }
      return {Engine::float_kernels, dl && cpu_features().avx512_vnni
                                         ? "int8, few rows: the fp32 micro-kernels read x2 in place"
                                         : "int8 without AVX512-VNNI: exact integer sums in the fp32 micro-kernels"};
    case Mode::plain:
    case Mode::weight_quant:
      if (s.in_dtype != DType::bf16) {
        return {Engine::float_kernels, "f16: no dot-product instruction here (no AVX512-FP16)"};
      }
      // oneDNN's bf16 matmul runs on AMX tiles, where the CPU has them (not
      // measured here: no machine of this project exposes AMX).
      if (s.mode == Mode::plain && dl && cpu_features().amx_bf16 && !float_gemm_reads_x2_in_place(operands)) {
        return {Engine::onednn, "bf16 with AMX: oneDNN's AMX kernel"};
      }
      if (pair_kernels_for(level) == nullptr) {
        return {Engine::float_kernels, "bf16 without AVX512-BF16: the fp32 micro-kernels"};
      }
      // Weight-only int8 too, whatever the rows: a packed weight keeps its
      // int8 pairs (pair_gemm.cc), 2.1-2.4x faster than bf16 at one row,
      // where the fp32 dot kernel was 0.93x; unpacked and transposed, one
      // row reads it in place at about the dot kernel's speed (n = 5632, k =
      // 1024, from DRAM: 593 against 568 us per channel, 654 against 746 us
      // per group with offsets).
      // AMD Zen 5 (vdpbf16ps at twice the fp32 FMA's rate): 2048^3 at 0.96x
      // oneDNN's bf16 kernel and 2.2x the fp32 micro-kernels; decode (n = k
      // = 4096) 1.25x (1 row) to 1.35x (16 rows) the fp32 micro-kernels,
      // 1.3-2.0x oneDNN. Intel's AVX512-BF16 (Cooper Lake, Sapphire Rapids)
      // issues vdpbf16ps at half the FMA's rate, the same flops for half the
      // bytes of B (not measured: no such machine here).
      return {Engine::pairs, "bf16 with AVX512-BF16: tpfuse's pair kernels (vdpbf16ps)"};
  }
  throw InternalError("choose_engine: unknown mode");
}

std::unique_ptr<PreparedGemm> prepare_gemm_for_isa(const GemmOperands& operands, IsaLevel level) {
  const int threads = operands.threads > 0 ? operands.threads : default_gemm_threads(1);
  const KernelTable& kernels = kernels_for(level);
  switch (choose_engine(operands, level).engine) {
    case Engine::pairs:
      return prepare_pair_gemm(operands, *pair_kernels_for(level), threads);
    case Engine::onednn:
      return prepare_onednn_gemm(operands, kernels, threads);
    case Engine::float_kernels:
      break;
  }
  return prepare_float_gemm(operands, kernels, threads);
}

std::unique_ptr<PreparedGemm> prepare_gemm(const GemmOperands& operands) {
  return prepare_gemm_for_isa(operands, active_isa());
}

std::shared_ptr<const PackedX2> pack_x2_for_isa(const GemmOperands& operands, IsaLevel level) {
  // The engine a call with many rows gets packs x2 in its constructor;
  // prepared for such a call (x1 is not read before compute_rows), it hands
  // over what it packed.
  GemmOperands many_rows = operands;
  many_rows.shape.m = std::int64_t{1} << 30;
  many_rows.packed = nullptr;
  return prepare_gemm_for_isa(many_rows, level)->packing();
}

std::shared_ptr<const PackedX2> pack_x2(const GemmOperands& operands) {
  return pack_x2_for_isa(operands, active_isa());
}

}  // namespace tpfuse::gemm
