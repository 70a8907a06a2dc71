// tpfuse_mpi_bench: the MPI baselines of `tpfuse bench`, run under mpirun.
//
//   allreduce: MPI_Allreduce (fp32 sum, in place) over a list of sizes.
//   peer:      what a user writes without tpfuse for the layer of --op:
//     mm_all_reduce               each rank's GEMM of its K-slice with oneDNN,
//                                 MPI_Allreduce of the fp32 output, then one
//                                 rounding to the layer's dtype
//     all_gather_mm               MPI_Allgather of each rank's m / p rows of x1,
//                                 then oneDNN's GEMM of all m rows
//     mm_reduce_scatter           the GEMM, MPI_Reduce_scatter_block of the fp32
//                                 output, then rounding this rank's rows
//     mm_all_reduce_add_rms_norm  as mm_all_reduce, then the residual add and
//                                 RMSNorm in plain loops over each row
//
// MPI has no 16-bit float sum, so the peer reduces fp32 (twice the bytes
// tpfuse moves); that is also the contract's numerics (fp32 sum, one
// rounding). The GEMM is oneDNN's bf16 matmul for bf16, its f16 matmul for
// f16 where this CPU has one, else f16 converted to fp32 (every call, as
// tpfuse converts x2 every call) then oneDNN's f32 matmul.
//
// Every figure follows the protocol tpfuse's side uses: a barrier, `calls`
// calls, the slowest rank's time per call; the median over repetitions,
// variants interleaved repetition by repetition. Rank 0 prints one JSON
// object per line. Ranks pin themselves as tpfuse's do (pin_rank in
// bench_common.h: blocks of cores, or one core each), so mpirun should not
// bind (--bind-to none).
#include <immintrin.h>
#include <mpi.h>
#include <omp.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "bench_common.h"
#include "operators.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"

namespace tpfuse::cli {

namespace {

struct Options {
  std::vector<std::int64_t> sizes;  // allreduce: bytes
  std::string op = "mm_all_reduce";  // peer: the layer
  std::int64_t m = 0, n = 0, k = 0;  // peer: rows of the whole product, k per rank
  double epsilon = 1e-6;             // peer: the RMSNorm's
  std::string dtype = "f16";
  int reps = 5;
  int warmup = 1;
  double min_batch_ms = 0;
  bool no_pin = false;
};

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// Seconds per call on the slowest rank, over a batch of `calls` after a barrier.
double timed_batch(const std::function<void()>& call, int calls) {
  MPI_Barrier(MPI_COMM_WORLD);
  const double start = MPI_Wtime();
  for (int i = 0; i < calls; ++i) call();
  const double mine = (MPI_Wtime() - start) / calls;
  double slowest = 0;
  MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return slowest;
}

struct Variant {
  Variant(std::string variant_name, std::function<void()> variant_call)
      : name(std::move(variant_name)), call(std::move(variant_call)) {}
  std::string name;
  std::function<void()> call;
  int calls = 1;
  std::vector<double> seconds;
};

// Warms up, sizes each variant's batch to min_batch_ms (the same on every
// rank: it comes from the slowest rank's time), then interleaves the variants.
void measure(std::vector<Variant>& variants, const Options& o) {
  for (Variant& v : variants) {
    double once = 0;
    for (int i = 0; i < std::max(1, o.warmup); ++i) once = timed_batch(v.call, 1);
    v.calls = static_cast<int>(std::clamp(std::ceil(o.min_batch_ms * 1e-3 / once), 1.0, 100000.0));
  }
  for (int r = 0; r < o.reps; ++r) {
    for (Variant& v : variants) v.seconds.push_back(timed_batch(v.call, v.calls));
  }
}

void run_allreduce(const Options& o) {
  const std::int64_t largest = *std::max_element(o.sizes.begin(), o.sizes.end());
  std::vector<float> buffer(static_cast<std::size_t>(largest / 4 + 1));
  std::vector<Variant> variants;
  for (std::int64_t bytes : o.sizes) {
    float* data = buffer.data();
    const int count = static_cast<int>(bytes / 4);
    variants.push_back({std::to_string(bytes), [data, count] {
                          MPI_Allreduce(MPI_IN_PLACE, data, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
                        }});
  }
  measure(variants, o);
  if (world_rank() != 0) return;
  for (const Variant& v : variants) {
    std::printf("{\"impl\": \"mpi\", \"ranks\": %d, \"bytes\": %s, \"dtype\": \"f32\", \"seconds\": %.9g, "
                "\"calls\": %d, \"reps\": %d}\n",
                world_size(), v.name.c_str(), median(v.seconds), v.calls, o.reps);
  }
}

// One rank's operands and buffers for the peer.
struct PeerData {
  std::vector<std::uint16_t> x1, x2;   // f16 or bf16 bits
  std::vector<std::uint16_t> gathered;  // all_gather_mm: [m, k], every rank's x1
  std::vector<float> x1_f32, x2_f32;   // f16 converted for oneDNN's f32 matmul
  std::vector<float> sums;             // [m, n] fp32: the GEMM's output, reduced in place
  std::vector<float> shard;            // mm_reduce_scatter: this rank's [m / p, n] rows, fp32
  std::vector<std::uint16_t> out;      // [m, n] (or this rank's rows) in the layer's dtype
  std::vector<std::uint16_t> residual, gamma, y, norm;  // add-RMSNorm: [m, n], [n], [m, n], [m, n]
};

std::vector<std::uint16_t> random_halves(std::int64_t count, std::uint64_t seed, bool bf16) {
  std::vector<std::uint16_t> v(static_cast<std::size_t>(count));
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& x : v) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    const float value = static_cast<float>(static_cast<double>(state >> 11) * 0x1p-52 - 1.0);
    x = bf16 ? f32_to_bf16(value).bits : f32_to_f16(value).bits;
  }
  return v;
}

// The GEMM [rows, k] x [k, n] of `x1` and data.x2 a user would pick on this
// CPU; the returned call runs it (with any conversion it needs) into
// data.sums, or, given `native_out` and a native matmul, straight into
// native_out in the layer's dtype (and sets *rounded).
std::function<void()> make_peer_gemm(const Options& o, std::int64_t rows, std::vector<std::uint16_t>& x1,
                                     PeerData& data, int threads, std::string& description, void* native_out = nullptr,
                                     bool* rounded = nullptr) {
  using dt = dnnl::memory::data_type;
  const bool bf16 = o.dtype == "bf16";
  const dt layer = bf16 ? dt::bf16 : dt::f16;
  if (auto mm =
          make_native_onednn_matmul(rows, o.n, o.k, layer, native_out != nullptr ? layer : dt::f32, x1.data(),
                                    data.x2.data(), native_out != nullptr ? native_out : data.sums.data(), false)) {
    description = cat("oneDNN ", o.dtype, " matmul (", mm->impl, ")");
    if (rounded != nullptr) *rounded = native_out != nullptr;
    return [mm] { mm->execute(); };
  }
  // No native matmul for this dtype here: convert to f32.
  data.x1_f32.resize(x1.size());
  data.x2_f32.resize(data.x2.size());
  auto mm = make_onednn_matmul(rows, o.n, o.k, dt::f32, dt::f32, data.x1_f32.data(), data.x2_f32.data(),
                               data.sums.data(), false);
  description = cat(o.dtype, " -> f32, oneDNN f32 matmul (", mm->impl, ")");
  const DType dtype = bf16 ? DType::bf16 : DType::f16;
  PeerData* d = &data;
  std::vector<std::uint16_t>* a = &x1;
  return [mm, d, a, dtype, threads] {
    convert_to_f32(dtype, a->data(), static_cast<std::int64_t>(a->size()), d->x1_f32.data(), threads);
    convert_to_f32(dtype, d->x2.data(), static_cast<std::int64_t>(d->x2.size()), d->x2_f32.data(), threads);
    mm->execute();
  };
}

// f32 -> f16 with the F16C instruction, rounding to nearest even as
// f32_to_f16 does (oneDNN 2.6's f32 -> f16 reorder is scalar reference code,
// a hundred times slower, which no user would put after an all-reduce).
__attribute__((target("avx,f16c"))) void round_to_f16_f16c(const float* src, std::int64_t count, std::uint16_t* dst) {
  const std::int64_t vectorized = count - count % 8;
  for (std::int64_t i = 0; i < vectorized; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (std::int64_t i = vectorized; i < count; ++i) dst[i] = f32_to_f16(src[i]).bits;
}

// Rounds `count` fp32 sums to the layer's dtype, once.
std::function<void()> make_rounding(const Options& o, const float* sums, std::int64_t count, std::uint16_t* out) {
  if (o.dtype == "bf16") {
    return [sums, count, out] {
      for (std::int64_t i = 0; i < count; ++i) out[i] = f32_to_bf16(sums[i]).bits;
    };
  }
  if (__builtin_cpu_supports("f16c")) return [sums, count, out] { round_to_f16_f16c(sums, count, out); };
  return [sums, count, out] {
    for (std::int64_t i = 0; i < count; ++i) out[i] = f32_to_f16(sums[i]).bits;
  };
}

template <bool kBf16>
float widen(std::uint16_t bits) {
  return kBf16 ? bf16_to_f32(BFloat16{bits}) : f16_to_f32(Half{bits});
}

template <bool kBf16>
std::uint16_t narrow(float value) {
  return kBf16 ? f32_to_bf16(value).bits : f32_to_f16(value).bits;
}

// y = x + residual, then norm = y / sqrt(mean(y^2) + epsilon) * gamma, as a
// user writes them without tpfuse: plain loops over each row, rounding as the
// contract does.
template <bool kBf16>
void add_rms_norm(const Options& o, PeerData& d) {
  const std::int64_t n = o.n;
  for (std::int64_t row = 0; row < o.m; ++row) {
    const std::size_t first = static_cast<std::size_t>(row * n);
    float squares = 0;
    for (std::int64_t j = 0; j < n; ++j) {
      const std::size_t i = first + static_cast<std::size_t>(j);
      d.y[i] = narrow<kBf16>(widen<kBf16>(d.out[i]) + widen<kBf16>(d.residual[i]));
      const float y = widen<kBf16>(d.y[i]);
      squares += y * y;
    }
    const float rstd = 1.0f / std::sqrt(squares / static_cast<float>(n) + static_cast<float>(o.epsilon));
    for (std::int64_t j = 0; j < n; ++j) {
      const std::size_t i = first + static_cast<std::size_t>(j);
      const float t = widen<kBf16>(narrow<kBf16>(widen<kBf16>(d.y[i]) * rstd));
      d.norm[i] = narrow<kBf16>(t * widen<kBf16>(d.gamma[static_cast<std::size_t>(j)]));
    }
  }
}

// The peer's three figures: its GEMM, its collective, and the whole layer.
struct PeerCalls {
  std::function<void()> gemm, comm, layer;
  std::string gemm_description, comm_description;
};

PeerCalls make_peer_calls(FusedOp op, const Options& o, PeerData& data, int threads) {
  const bool bf16 = o.dtype == "bf16";
  const std::int64_t p = world_size();
  PeerCalls calls;
  float* sums = data.sums.data();
  const int count = static_cast<int>(o.m * o.n);
  const auto all_reduce = [sums, count] {
    MPI_Allreduce(MPI_IN_PLACE, sums, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  };
  switch (op) {
    case FusedOp::mm_all_reduce: {
      const auto gemm = make_peer_gemm(o, o.m, data.x1, data, threads, calls.gemm_description);
      const auto round = make_rounding(o, sums, o.m * o.n, data.out.data());
      calls = {gemm, all_reduce,
               [gemm, all_reduce, round] {
                 gemm();
                 all_reduce();
                 round();
               },
               calls.gemm_description, cat("MPI_Allreduce fp32 in place, then rounded to ", o.dtype)};
      break;
    }
    case FusedOp::all_gather_mm: {
      data.gathered.resize(static_cast<std::size_t>(o.m * o.k));
      bool rounded = false;
      const auto product =
          make_peer_gemm(o, o.m, data.gathered, data, threads, calls.gemm_description, data.out.data(), &rounded);
      const auto round = make_rounding(o, sums, o.m * o.n, data.out.data());
      const std::function<void()> gemm = rounded ? product : [product, round] {
        product();
        round();
      };
      const int block = static_cast<int>(o.m / p * o.k);
      std::uint16_t* x1 = data.x1.data();
      std::uint16_t* gathered = data.gathered.data();
      const auto gather = [x1, gathered, block] {
        MPI_Allgather(x1, block, MPI_UINT16_T, gathered, block, MPI_UINT16_T, MPI_COMM_WORLD);
      };
      calls = {gemm, gather,
               [gather, gemm] {
                 gather();
                 gemm();
               },
               calls.gemm_description, cat("MPI_Allgather of x1's 16-bit elements", rounded ? "" : "; rounded after")};
      break;
    }
    case FusedOp::mm_reduce_scatter: {
      const auto gemm = make_peer_gemm(o, o.m, data.x1, data, threads, calls.gemm_description);
      data.shard.resize(static_cast<std::size_t>(o.m / p * o.n));
      float* shard = data.shard.data();
      const int rows = static_cast<int>(o.m / p * o.n);
      const auto scatter = [sums, shard, rows] {
        MPI_Reduce_scatter_block(sums, shard, rows, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      };
      const auto round = make_rounding(o, shard, rows, data.out.data());
      calls = {gemm, scatter,
               [gemm, scatter, round] {
                 gemm();
                 scatter();
                 round();
               },
               calls.gemm_description, cat("MPI_Reduce_scatter_block fp32, then rounded to ", o.dtype)};
      break;
    }
    case FusedOp::mm_all_reduce_add_rms_norm: {
      const auto gemm = make_peer_gemm(o, o.m, data.x1, data, threads, calls.gemm_description);
      const auto round = make_rounding(o, sums, o.m * o.n, data.out.data());
      data.residual = random_halves(o.m * o.n, 1000, bf16);
      data.gamma = random_halves(o.n, 1001, bf16);
      data.y.resize(data.out.size());
      data.norm.resize(data.out.size());
      PeerData* d = &data;
      const Options* options = &o;
      const auto norm = [d, options, bf16] {
        bf16 ? add_rms_norm<true>(*options, *d) : add_rms_norm<false>(*options, *d);
      };
      calls = {gemm, all_reduce,
               [gemm, all_reduce, round, norm] {
                 gemm();
                 all_reduce();
                 round();
                 norm();
               },
               calls.gemm_description,
               cat("MPI_Allreduce fp32 in place, rounded to ", o.dtype, ", then an add-and-RMSNorm loop")};
      break;
    }
  }
  return calls;
}

void run_peer(const Options& o, int threads) {
  const int rank = world_rank();
  const bool bf16 = o.dtype == "bf16";
  const FusedOp op = *parse_op(o.op);
  if ((op == FusedOp::all_gather_mm || op == FusedOp::mm_reduce_scatter) && o.m % world_size() != 0) {
    throw Error(cat("--m: ", o.op, " needs a multiple of the ranks (", world_size(), "), got ", o.m));
  }
  const std::int64_t rows = op == FusedOp::all_gather_mm ? o.m / world_size() : o.m;  // of x1 on this rank
  PeerData data;
  data.x1 = random_halves(rows * o.k, 2 * static_cast<std::uint64_t>(rank) + 1, bf16);
  data.x2 = random_halves(o.k * o.n, 2 * static_cast<std::uint64_t>(rank) + 2, bf16);
  data.sums.resize(static_cast<std::size_t>(o.m * o.n));
  data.out.resize(static_cast<std::size_t>(o.m * o.n));
  const PeerCalls calls = make_peer_calls(op, o, data, threads);
  std::vector<Variant> variants = {{"gemm", calls.gemm}, {"comm", calls.comm}, {"peer", calls.layer}};
  measure(variants, o);
  if (rank != 0) return;
  std::printf(
      "{\"impl\": \"mpi\", \"what\": \"peer\", \"op\": \"%s\", \"ranks\": %d, \"m\": %lld, \"n\": %lld, "
      "\"k_per_rank\": %lld, \"dtype\": \"%s\", \"t_gemm\": %.9g, \"t_comm\": %.9g, \"t_peer\": %.9g, "
      "\"reps\": %d, \"gemm\": \"%s\", \"reduce\": \"%s\"}\n",
      o.op.c_str(), world_size(), static_cast<long long>(o.m), static_cast<long long>(o.n), static_cast<long long>(o.k),
      o.dtype.c_str(), median(variants[0].seconds), median(variants[1].seconds), median(variants[2].seconds), o.reps,
      calls.gemm_description.c_str(), calls.comm_description.c_str());
}

// Pins this rank as tpfuse's ranks are pinned and returns the threads its
// GEMM gets: the cores it was pinned to, else the cores divided among the
// ranks.
int place_rank(bool no_pin) {
  const std::vector<int> cores = allowed_cores();
  if (!no_pin) return pin_rank(world_rank(), world_size(), cores);
  return std::max(1, static_cast<int>(cores.size()) / world_size());
}

int run(int argc, char** argv) {
  CLI::App app{"tpfuse_mpi_bench: MPI_Allreduce and oneDNN + MPI_Allreduce baselines (run under mpirun)"};
  app.require_subcommand(1);
  Options o;
  for (CLI::App* cmd :
       {app.add_subcommand("allreduce", "MPI_Allreduce, fp32 sum in place"),
        app.add_subcommand("peer", "oneDNN GEMM and MPI's collective: the layer of --op without tpfuse")}) {
    cmd->add_option("--reps", o.reps, "Repetitions (the median is printed)")->check(CLI::Range(1, 100000));
    cmd->add_option("--warmup", o.warmup, "Unmeasured calls first")->check(CLI::Range(0, 1000));
    cmd->add_option("--min-batch-ms", o.min_batch_ms, "Repeat calls to fill at least this long a batch")
        ->check(CLI::Range(0.0, 100000.0));
    cmd->add_flag("--no-pin", o.no_pin, "Do not pin ranks to cores");
  }
  app.get_subcommand("allreduce")->add_option("--sizes", o.sizes, "Message sizes in bytes")->required()
      ->check(CLI::Range(std::int64_t{4}, std::int64_t{1} << 33));
  CLI::App* peer = app.get_subcommand("peer");
  peer->add_option("--op", o.op,
                   "The layer: mm_all_reduce | all_gather_mm | mm_reduce_scatter | "
                   "mm_all_reduce_add_rms_norm")
      ->check(CLI::IsMember(op_names()));
  peer->add_option("--m", o.m, "Rows of the whole product (all_gather_mm, mm_reduce_scatter: a multiple of the ranks)")
      ->required()
      ->check(CLI::Range(1, 1 << 24));
  peer->add_option("--n", o.n)->required()->check(CLI::Range(1, 1 << 24));
  peer->add_option("--k", o.k, "Columns of x1 per rank")->required()->check(CLI::Range(1, 1 << 24));
  peer->add_option("--epsilon", o.epsilon, "The RMSNorm's epsilon")->check(CLI::Range(1e-12, 0.999));
  peer->add_option("--dtype", o.dtype)->check(CLI::IsMember({"f16", "bf16"}));
  CLI11_PARSE(app, argc, argv);

  const int threads = place_rank(o.no_pin);
  omp_set_num_threads(threads);
  if (app.got_subcommand("allreduce")) {
    run_allreduce(o);
  } else {
    run_peer(o, threads);
  }
  return 0;
}

}  // namespace

}  // namespace tpfuse::cli

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int code = 0;
  try {
    code = tpfuse::cli::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tpfuse_mpi_bench: error: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return code;
}
