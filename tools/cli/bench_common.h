// What the benchmarks share: statistics, pinning a rank to a core, the
// machine facts every table starts with, the timing protocol of tpfuse's
// local ranks, and the oneDNN matmul and conversion the baselines ("what a
// user would write without tpfuse") run. Compiled into the tpfuse CLI and into
// tpfuse_mpi_bench, so that the MPI baseline computes its GEMM exactly as
// `tpfuse bench gemm` measures it.
#pragma once

#include <cstdint>
#include <dnnl.hpp>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "tpfuse/comm/launcher.h"
#include "tpfuse/core/dtype.h"

namespace tpfuse::cli {

// The sizes of one GEMM, [m, k] x [k, n].
struct GemmShape {
  std::int64_t m = 0, n = 0, k = 0;
};

// "MxNxK" with positive sizes; nullopt for anything else.
std::optional<GemmShape> parse_mnk(const std::string& text);

// "4 MiB", "1.5 KiB", "12 B" (one decimal at most); `sign` writes "+" before
// a positive size.
std::string format_bytes(std::int64_t bytes, bool sign = false);

// The median (the mean of the two middle values for an even count); NaN when empty.
double median(std::vector<double> values);

// The cores this process may run on now, in increasing order.
std::vector<int> allowed_cores();

// Sets the affinity of every thread of this process to `cores` (the calling
// thread's alone would leave tpfuse's pooled workers and OpenMP's threads
// where they were created, possibly all on one core).
void pin_process(const std::vector<int>& cores);

// Pins the calling process, rank `rank` of `ranks` on this host, to its part
// of `cores`: a block of cores.size() / ranks cores of its own when there are
// at least as many cores as ranks (one core each when as many), else the one
// core cores[rank % cores.size()]. Returns how many cores it got: the
// operator's default thread count then gives its GEMM that many
// (tpfuse::gemm::share_of_cores), and the baselines use as many.
int pin_rank(int rank, int ranks, const std::vector<int>& cores);

// How the ranks are pinned, for the benchmarks' headers.
std::string pinning_text(int ranks, bool no_pin);

// "Intel(R) Xeon(R) ..., 2 cores online (0,1 allowed), tpfuse ISA avx512_dl, load 1.20 1.05 0.98".
std::string machine_facts();

// The timing protocol every all-reduce and operator figure follows, on
// tpfuse's ranks as in the MPI and gloo baselines: a barrier, a batch of
// `calls` calls, and the slowest rank's time per call (the same value on every
// rank). `cpu_per_call`, when given, receives this rank's calling thread's
// CPU time per call (CLOCK_THREAD_CPUTIME_ID) over the batch.
double timed_batch(comm::Communicator& comm, const std::function<void()>& call, int calls,
                   double* cpu_per_call = nullptr);

// Calls per batch so that a batch lasts at least min_batch_ms, given one
// call's time (at least 1, at most 100000).
int calls_per_batch(double once_seconds, double min_batch_ms);

// What rank 0 of a local job reports to the launching process.
struct RankReport {
  std::vector<double> values;
  std::string text;
};

// Runs `body` on `ranks` local ranks (tpfuse's launcher, shm communicator),
// each first pinned to its core unless no_pin, and returns rank 0's report.
// The report travels through a pipe read after the ranks end, so it must stay
// under 64 KiB. Throws Error naming the ranks that failed.
RankReport run_local_ranks(int ranks, bool no_pin, const std::function<RankReport(comm::RankContext&)>& body);

// Under mpirun: this process as one rank of the job's communicator
// (comm::create_communicator_from_env), registered under its name.
comm::RankContext rank_context_from_env();

// A oneDNN matmul on row-major operands (x2 optionally a transposed [n, k]
// storage), created once and executed many times.
struct OneDnnMatmul {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::unique_ptr<dnnl::matmul> primitive;
  std::unordered_map<int, dnnl::memory> args;
  std::string impl;  // oneDNN's implementation name, e.g. "brg:avx512_core_bf16"

  void execute() {
    primitive->execute(stream, args);
    stream.wait();
  }
};

// Throws dnnl::error when oneDNN has no implementation for the types on this CPU.
std::shared_ptr<OneDnnMatmul> make_onednn_matmul(std::int64_t m, std::int64_t n, std::int64_t k,
                                                 dnnl::memory::data_type in_type,
                                                 dnnl::memory::data_type out_type, const void* x1,
                                                 const void* x2, void* dst, bool x2_transposed);

// The same, or null where oneDNN has no fast matmul for the types on this CPU
// (none at all, or only its scalar reference code, "ref:any", which no user
// would choose over converting to f32): oneDNN 2.x has bf16 matmuls for
// AVX-512 only.
std::shared_ptr<OneDnnMatmul> make_native_onednn_matmul(std::int64_t m, std::int64_t n, std::int64_t k,
                                                        dnnl::memory::data_type in_type,
                                                        dnnl::memory::data_type out_type, const void* x1,
                                                        const void* x2, void* dst, bool x2_transposed);

// dst[i] = src[i] for i < count (src f16, bf16 or f32), with tpfuse's vector
// conversion, split over `threads`.
void convert_to_f32(DType dtype, const void* src, std::int64_t count, float* dst, int threads);

}  // namespace tpfuse::cli
