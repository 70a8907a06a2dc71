// `tpfuse bench allreduce`: tpfuse's shared-memory all-reduce against
// MPI_Allreduce (OpenMPI) and torch.distributed's gloo on this host, from
// 4 KiB to 64 MiB: latency (time per call) and algorithm bandwidth
// (bytes / time), with ratios to MPI's and to the machine's memory bound.
//
// Beside each tpfuse figure, the bound its memory traffic sets: the bytes one
// rank of the shm all-reduce reads and writes (comm::shm_all_reduce_traffic
// derives them per algorithm) at the rate a memcpy of the same size moves
// bytes, measured in the same ranks, taking turns with the all-reduce, every
// rank copying at once (so that they share the memory system as they do in
// the all-reduce).
//
// The three run the same protocol (bench_common.h: barrier, a batch of calls
// sized to --min-batch-ms, slowest rank, median over repetitions, sizes taking
// turns) with ranks pinned (pin_rank). Each is its own process group, so
// they cannot take turns call by call; they take turns round by round
// instead, and each figure is the median over the rounds.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "bench_baselines.h"
#include "bench_common.h"
#include "commands.h"
#include "tpfuse/comm/communicator.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/tensor.h"

namespace tpfuse::cli {

namespace {

struct AllReduceOptions {
  std::vector<std::string> sizes = {"4K", "16K", "64K", "256K", "1M", "4M", "16M", "64M"};
  std::vector<int> ranks = {2};
  std::string dtype = "f32";
  int rounds = 3;
  int reps = 5;
  int warmup = 2;
  double min_batch_ms = 20;
  std::string json;
  BaselineOptions baselines;
};

// "4096", "64K", "64KiB", "16M", "1G" (binary multiples).
std::int64_t parse_bytes(const std::string& text) {
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  const std::string unit = end;
  static const std::map<std::string, std::int64_t> kUnits = {
      {"", 1}, {"B", 1}, {"K", 1 << 10}, {"KiB", 1 << 10}, {"M", 1 << 20}, {"MiB", 1 << 20},
      {"G", 1 << 30}, {"GiB", 1 << 30}};
  const auto unit_it = kUnits.find(unit);
  if (end == text.c_str() || value < 1 || unit_it == kUnits.end()) {
    throw CLI::ValidationError("--sizes", cat("expected a size such as 4096, 64K or 16M, got \"", text, "\""));
  }
  return value * unit_it->second;
}

// Seconds per call at each size on local ranks (tpfuse's shm communicator):
// the all-reduce (in place), and, taking turns with it, a memcpy of the same
// bytes between two buffers of each rank's own, every rank copying at once:
// the copy rate the ranks' memory traffic is bounded by.
struct TpfuseSeconds {
  std::vector<double> all_reduce, copy;
};

TpfuseSeconds measure_tpfuse(int ranks, const std::vector<std::int64_t>& sizes, DType dtype,
                             const AllReduceOptions& o) {
  const std::vector<double> values =
      run_local_ranks(ranks, o.baselines.no_pin, [&](comm::RankContext& ctx) {
        std::vector<Tensor> buffers;               // zeros: summing them in place never overflows
        std::vector<std::function<void()>> calls;  // all-reduce, copy, by size
        for (std::int64_t bytes : sizes) {
          const auto count = static_cast<std::int64_t>(bytes / static_cast<std::int64_t>(dtype_size(dtype)));
          const std::initializer_list<std::int64_t> shape = {std::max<std::int64_t>(count, 1)};
          buffers.emplace_back(dtype, shape);
          void* data = buffers.back().data();
          comm::Communicator* comm = ctx.comm.get();
          calls.push_back(
              [comm, data, count, dtype] { comm->all_reduce(data, data, static_cast<std::size_t>(count), dtype); });
          buffers.emplace_back(dtype, shape);
          buffers.emplace_back(dtype, shape);
          void* to = buffers.back().data();
          const void* from = buffers[buffers.size() - 2].data();
          calls.push_back([to, from, bytes] { std::memcpy(to, from, static_cast<std::size_t>(bytes)); });
        }
        std::vector<int> batch(calls.size());
        for (std::size_t i = 0; i < calls.size(); ++i) {
          double once = 0;
          for (int w = 0; w < std::max(1, o.warmup); ++w) once = timed_batch(*ctx.comm, calls[i], 1);
          batch[i] = calls_per_batch(once, o.min_batch_ms);
        }
        std::vector<std::vector<double>> seconds(calls.size());
        for (int r = 0; r < o.reps; ++r) {
          for (std::size_t i = 0; i < calls.size(); ++i)
            seconds[i].push_back(timed_batch(*ctx.comm, calls[i], batch[i]));
        }
        RankReport report;
        for (const auto& s : seconds) report.values.push_back(median(s));
        return report;
      }).values;
  TpfuseSeconds out;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    out.all_reduce.push_back(values[2 * i]);
    out.copy.push_back(values[2 * i + 1]);
  }
  return out;
}

// The seconds a rank's memory traffic takes at the copy rate measured: the
// bytes the shm all-reduce reads and writes (comm::shm_all_reduce_traffic),
// over the bytes a memcpy of the same size reads and writes per second.
double bound_seconds(int ranks, std::int64_t bytes, double copy_seconds) {
  const comm::MemoryTraffic traffic = comm::shm_all_reduce_traffic(ranks, static_cast<std::size_t>(bytes));
  const double copy_rate = 2.0 * static_cast<double>(bytes) / copy_seconds;
  return static_cast<double>(traffic.read + traffic.written) / copy_rate;
}

// Seconds per size from a baseline's records (NaN where it has none).
std::vector<double> seconds_by_size(const ToolRun& run, const std::vector<std::int64_t>& sizes) {
  std::vector<double> seconds(sizes.size(), std::nan(""));
  for (const JsonRecord& record : run.records) {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      if (record_number(record, "bytes") == static_cast<double>(sizes[i])) seconds[i] = record_number(record, "seconds");
    }
  }
  return seconds;
}

struct Results {
  int ranks = 0;
  std::vector<double> tpfuse, mpi, gloo;  // seconds per call, by size
  std::vector<double> bound;              // tpfuse's memory-traffic bound, seconds
};

void print_cell(double seconds, std::int64_t bytes) {
  if (std::isnan(seconds)) {
    std::printf(" %10s %7s", "-", "-");
  } else {
    std::printf(" %10.1f %7.2f", seconds * 1e6, static_cast<double>(bytes) / seconds * 1e-9);
  }
}

void print_ratio(double num, double den) {
  if (std::isnan(num) || std::isnan(den)) {
    std::printf(" %11s", "-");
  } else {
    std::printf(" %10.2fx", num / den);
  }
}

void print_table(const Results& r, const std::vector<std::int64_t>& sizes, const std::string& dtype) {
  std::printf(
      "\n%d ranks; tpfuse %s, MPI and gloo f32 (the same bytes); us per call and GB/s (bytes / time);\n"
      "  bound: what tpfuse's memory traffic takes at the copy rate measured alongside\n",
      r.ranks, dtype.c_str());
  std::printf("  %9s %10s %7s %9s %6s %10s %7s %10s %7s %11s %11s\n", "size", "tpfuse us", "GB/s", "bound us", "of it",
              "MPI us", "GB/s", "gloo us", "GB/s", "MPI/tpfuse", "gloo/tpfuse");
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    std::printf("  %9s", format_bytes(sizes[i]).c_str());
    print_cell(r.tpfuse[i], sizes[i]);
    std::printf(" %9.1f %6.2f", r.bound[i] * 1e6, r.bound[i] / r.tpfuse[i]);
    print_cell(r.mpi[i], sizes[i]);
    print_cell(r.gloo[i], sizes[i]);
    print_ratio(r.mpi[i], r.tpfuse[i]);
    print_ratio(r.gloo[i], r.tpfuse[i]);
    std::printf("\n");
  }
}

// The fastest of a few memcpy's of `bytes` on this core, from a buffer that
// was just written (as a rank's input is): a floor for any all-reduce of
// `bytes`, since every rank must at least write its whole output once.
double fastest_memcpy_seconds(std::int64_t bytes) {
  std::vector<std::byte> from(static_cast<std::size_t>(bytes), std::byte{1});
  std::vector<std::byte> to(static_cast<std::size_t>(bytes));
  double fastest = INFINITY;
  for (int rep = 0; rep < 20; ++rep) {
    std::fill(from.begin(), from.end(), static_cast<std::byte>(rep));
    const auto start = std::chrono::steady_clock::now();
    std::memcpy(to.data(), from.data(), from.size());
    fastest = std::min(fastest, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return fastest;
}

// A flag in a cache line of its own, written by one thread.
struct alignas(64) RoundFlag {
  std::atomic<std::uint64_t> round{0};
};

// Waits (spinning: the two threads have a core each) until `flag` reaches
// `round`; false when that takes longer than a second or the other thread
// gave up.
bool spin_until(const RoundFlag& flag, std::uint64_t round, const std::atomic<bool>& gave_up) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  for (unsigned spins = 1; flag.round.load(std::memory_order_acquire) < round; ++spins) {
    if (spins % 4096 == 0 && (gave_up.load() || std::chrono::steady_clock::now() > deadline)) return false;
  }
  return true;
}

// The fastest exchange of `bytes` between the cores ranks 0 and 1 are pinned
// to, per round: two threads each copy their `bytes` into a buffer, announce
// it, and add the other's buffer to their own input, buffers alternating
// between rounds: the one-shot all-reduce of 2 ranks with nothing else
// (no ring, no deadlines, no rank order). Every 2-rank all-reduce moves as
// many bytes across the cores, each written on one core after the call
// starts and read on the other. NaN when fewer than 2 cores are allowed.
double fastest_exchange_seconds(std::int64_t bytes) {
  const std::vector<int> cores = allowed_cores();
  if (cores.size() < 2) return std::nan("");
  constexpr int kRounds = 200;
  constexpr int kBatches = 5;
  const auto count = static_cast<std::size_t>(bytes) / sizeof(float);
  std::vector<float> buffers[2][2];  // [round parity][writer]
  for (auto& parity : buffers) {
    for (auto& buffer : parity) buffer.resize(count);
  }
  RoundFlag posted[2], consumed[2];
  std::atomic<bool> gave_up{false};
  double fastest = INFINITY;  // written by the thread of rank 0 only
  const auto exchange = [&](int me) {
    pin_rank(me, 2, cores);
    const int peer = 1 - me;
    std::vector<float> input(count, static_cast<float>(me + 1)), output(count);
    auto batch_start = std::chrono::steady_clock::now();
    for (std::uint64_t round = 1; round <= kRounds * kBatches; ++round) {
      std::vector<float>& mine = buffers[round % 2][me];
      const std::vector<float>& theirs = buffers[round % 2][peer];
      // The buffer is free once the peer has read it, two rounds ago.
      if (!spin_until(consumed[peer], round < 2 ? 0 : round - 2, gave_up)) break;
      std::memcpy(mine.data(), input.data(), count * sizeof(float));
      posted[me].round.store(round, std::memory_order_release);
      if (!spin_until(posted[peer], round, gave_up)) break;
      for (std::size_t i = 0; i < count; ++i) output[i] = input[i] + theirs[i];
      consumed[me].round.store(round, std::memory_order_release);
      if (round % kRounds == 0) {
        const auto now = std::chrono::steady_clock::now();
        if (me == 0) fastest = std::min(fastest, std::chrono::duration<double>(now - batch_start).count() / kRounds);
        batch_start = now;
      }
      if (round == kRounds * kBatches) return;
    }
    gave_up = true;
  };
  std::thread first(exchange, 0), second(exchange, 1);
  first.join();
  second.join();
  return gave_up ? std::nan("") : fastest;
}
// What bounds the times above on this machine: one memcpy of the message on
// one core, and how fast freshly written lines cross between two cores.
void print_floor(std::int64_t bytes) {
  const double copy = fastest_memcpy_seconds(bytes);
  std::printf("    one memcpy of %s on one core takes %.1f us here (%.1f GB/s)\n", format_bytes(bytes).c_str(),
              copy * 1e6, static_cast<double>(bytes) / copy / 1e9);
}

void print_exchange(std::int64_t bytes) {
  const double exchange = fastest_exchange_seconds(bytes);
  if (std::isnan(exchange)) {
    std::printf("    (the exchange between two cores was not measured: it needs 2 allowed cores)\n");
    return;
  }
  std::printf("    the bare one-shot exchange of %s between two cores (each writes it, the other adds it): %.1f us\n",
              format_bytes(bytes).c_str(), exchange * 1e6);
}

// The lowest fraction of the memory-traffic bound reached at 4-64 MiB, for
// each rank count. The bound's copy stays on one core; for 2 ranks, the bare
// exchange of that size between two cores (fastest_exchange_seconds) is
// printed beside it: what moving the bytes across cores takes.
void print_bound_fraction(const std::vector<Results>& results, const std::vector<std::int64_t>& sizes) {
  for (const Results& r : results) {
    double lowest = INFINITY;
    std::size_t at = 0;
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      if (sizes[i] < (4 << 20) || sizes[i] > (64 << 20) || r.bound[i] / r.tpfuse[i] >= lowest) continue;
      lowest = r.bound[i] / r.tpfuse[i];
      at = i;
    }
    const std::string what = cat("fraction of the memory bound, 4-64 MiB, ", r.ranks, " ranks (lowest)");
    if (std::isinf(lowest)) {
      std::printf("  %-54s  not measured in this run\n", what.c_str());
      continue;
    }
    std::printf("  %-54s  %6.2f  at %s\n", what.c_str(), lowest, format_bytes(sizes[at]).c_str());
    if (r.ranks != 2) continue;
    const double exchange = fastest_exchange_seconds(sizes[at]);
    if (std::isnan(exchange)) continue;
    std::printf(
        "    at %s: tpfuse %.1f us, its bound %.1f us; the bare one-shot exchange between two cores %.1f us "
        "(tpfuse %.2fx its time)\n",
        format_bytes(sizes[at]).c_str(), r.tpfuse[at] * 1e6, r.bound[at] * 1e6, exchange * 1e6,
        r.tpfuse[at] / exchange);
  }
}

// Ratios of medians measured in this run, with the machine's own floors.
void print_summary(const std::vector<Results>& results, const std::vector<std::int64_t>& sizes) {
  std::printf("\nSummary (ratios of medians measured in this run):\n");
  print_bound_fraction(results, sizes);
  const auto at = [&](const std::vector<double>& seconds, std::int64_t bytes) {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      if (sizes[i] == bytes) return seconds[i];
    }
    return std::nan("");
  };
  for (const Results& r : results) {
    if (r.ranks != 2) continue;
    const double bandwidth = at(r.mpi, 16 << 20) / at(r.tpfuse, 16 << 20);
    const double latency = at(r.tpfuse, 64 << 10) / at(r.mpi, 64 << 10);
    if (!std::isnan(bandwidth)) {
      std::printf("  %-54s  %6.2fx\n", "bandwidth at 16 MiB, tpfuse / MPI_Allreduce, 2 ranks", bandwidth);
      print_floor(16 << 20);
    }
    if (!std::isnan(latency)) {
      std::printf("  %-54s  %6.3fx\n", "latency at 64 KiB, tpfuse / MPI_Allreduce, 2 ranks", latency);
      print_floor(64 << 10);
      print_exchange(64 << 10);
    }
  }
}

void write_json(const std::string& path, const std::vector<Results>& results, const std::vector<std::int64_t>& sizes,
                const std::string& dtype) {
  nlohmann::ordered_json records = nlohmann::ordered_json::array();
  for (const Results& r : results) {
    for (const auto& [impl, seconds, impl_dtype] :
         {std::tuple{"tpfuse", &r.tpfuse, dtype}, std::tuple{"mpi", &r.mpi, std::string("f32")},
          std::tuple{"gloo", &r.gloo, std::string("f32")}}) {
      for (std::size_t i = 0; i < sizes.size(); ++i) {
        if (std::isnan((*seconds)[i])) continue;
        nlohmann::ordered_json record = {
            {"impl", impl}, {"ranks", r.ranks}, {"bytes", sizes[i]}, {"dtype", impl_dtype}, {"seconds", (*seconds)[i]}};
        if (seconds == &r.tpfuse) {
          record["bound_seconds"] = r.bound[i];
          record["fraction_of_bound"] = r.bound[i] / r.tpfuse[i];
        }
        records.push_back(std::move(record));
      }
    }
  }
  std::ofstream out(path);
  out << records.dump(2) << "\n";
  if (!out) throw CLI::RuntimeError(cat("bench allreduce: cannot write ", path), 1);
}

// Each size's median over the rounds of that round's figure, leaving out the
// rounds that have none (NaN when no round has one).
std::vector<double> median_over_rounds(const std::vector<std::vector<double>>& rounds, std::size_t sizes) {
  std::vector<double> out(sizes, std::nan(""));
  for (std::size_t i = 0; i < sizes; ++i) {
    std::vector<double> figures;
    for (const auto& round : rounds) {
      if (!std::isnan(round[i])) figures.push_back(round[i]);
    }
    if (!figures.empty()) out[i] = median(figures);
  }
  return out;
}

// The three implementations take turns, round after round, so that a load
// that comes and goes over minutes reaches each of them alike.
Results measure_rounds(int ranks, const std::vector<std::int64_t>& sizes, DType dtype, const BaselineTools& tools,
                       const AllReduceOptions& o) {
  std::vector<std::string> args = {"--reps", std::to_string(o.reps), "--warmup", std::to_string(o.warmup),
                                   "--min-batch-ms", cat(o.min_batch_ms), "--sizes"};
  for (std::int64_t bytes : sizes) args.push_back(std::to_string(bytes));
  std::vector<std::string> mpi_args = {"allreduce"};
  mpi_args.insert(mpi_args.end(), args.begin(), args.end());
  std::string mpi_failure = tools.mpi_unavailable, gloo_failure = tools.gloo_unavailable;
  std::vector<std::vector<double>> tpfuse, bound, mpi, gloo;
  for (int round = 0; round < o.rounds; ++round) {
    const TpfuseSeconds measured = measure_tpfuse(ranks, sizes, dtype, o);
    tpfuse.push_back(measured.all_reduce);
    bound.emplace_back();
    for (std::size_t i = 0; i < sizes.size(); ++i)
      bound.back().push_back(bound_seconds(ranks, sizes[i], measured.copy[i]));
    if (mpi_failure.empty()) {
      const ToolRun run = run_mpi_bench(tools, ranks, mpi_args);
      mpi_failure = run.failure;
      if (!run.failure.empty()) std::printf("  MPI_Allreduce failed, skipped: %s\n", run.failure.c_str());
      mpi.push_back(seconds_by_size(run, sizes));
    }
    if (gloo_failure.empty()) {
      const ToolRun run = run_gloo_bench(tools, ranks, args);
      gloo_failure = run.failure;
      if (!run.failure.empty()) std::printf("  gloo failed, skipped: %s\n", run.failure.c_str());
      gloo.push_back(seconds_by_size(run, sizes));
    }
  }
  return {ranks, median_over_rounds(tpfuse, sizes.size()), median_over_rounds(mpi, sizes.size()),
          median_over_rounds(gloo, sizes.size()), median_over_rounds(bound, sizes.size())};
}

void run_bench(const AllReduceOptions& o) {
  std::vector<std::int64_t> sizes;
  for (const std::string& text : o.sizes) sizes.push_back(parse_bytes(text));
  const DType dtype = parse_dtype(o.dtype);
  const BaselineTools tools = find_baseline_tools(o.baselines);
  std::printf("tpfuse bench allreduce\n  machine: %s\n", machine_facts().c_str());
  std::printf(
      "  ranks %s; each figure: barrier, a batch of >= %.0f ms of calls, slowest rank; median of %d "
      "repetitions,\n  then the median over %d rounds in which tpfuse, MPI and gloo take turns\n",
      pinning_text(o.ranks.empty() ? 1 : o.ranks.front(), o.baselines.no_pin).c_str(), o.min_batch_ms, o.reps,
      o.rounds);
  if (!tools.mpi_unavailable.empty()) std::printf("  MPI_Allreduce skipped: %s\n", tools.mpi_unavailable.c_str());
  if (!tools.gloo_unavailable.empty()) std::printf("  gloo skipped: %s\n", tools.gloo_unavailable.c_str());
  std::vector<Results> results;
  for (int ranks : o.ranks) {
    results.push_back(measure_rounds(ranks, sizes, dtype, tools, o));
    print_table(results.back(), sizes, o.dtype);
  }
  print_summary(results, sizes);
  if (!o.json.empty()) {
    write_json(o.json, results, sizes, o.dtype);
    std::printf("\nwrote %s\n", o.json.c_str());
  }
}

}  // namespace

void add_bench_allreduce_command(CLI::App& bench_app) {
  auto o = std::make_shared<AllReduceOptions>();
  auto* cmd = bench_app.add_subcommand(
      "allreduce", "tpfuse's shm all-reduce against MPI_Allreduce and torch.distributed gloo, latency and bandwidth");
  cmd->add_option("--sizes", o->sizes, "Message sizes (4096, 64K, 16M, ...)")->capture_default_str();
  cmd->add_option("--ranks", o->ranks, "Rank counts to run")->check(CLI::Range(1, 256))->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "tpfuse's element type (MPI and gloo always sum f32)")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--rounds", o->rounds, "Rounds in which the implementations take turns (the median is reported)")
      ->check(CLI::Range(1, 1000));
  cmd->add_option("--reps", o->reps, "Repetitions per round (their median is the round's figure)")
      ->check(CLI::Range(1, 10000));
  cmd->add_option("--warmup", o->warmup, "Unmeasured calls per size first")->check(CLI::Range(0, 1000));
  cmd->add_option("--min-batch-ms", o->min_batch_ms, "Calls are repeated to fill at least this long a batch")
      ->check(CLI::Range(0.0, 100000.0));
  cmd->add_option(
      "--json", o->json,
      "Write records {impl, ranks, bytes, dtype, seconds; bound_seconds, fraction_of_bound for tpfuse} to this file");
  add_baseline_options(*cmd, o->baselines);
  cmd->callback([o] { run_bench(*o); });
}

}  // namespace tpfuse::cli
