// `tpfuse bench fused`: a fused operator (--op, mm_all_reduce_base by
// default) against its own pieces and against what a user would write without
// tpfuse, per shape, dtype and rank count:
//
//   T_gemm    tpfuse's GEMM alone (prepare_gemm + compute_rows over all rows)
//   T_comm    tpfuse's collective alone, in the output's dtype (and, for
//             reference, MPI's and, for an all-reduce, gloo's, in f32)
//   T_serial  tpfuse's GEMM and collective one after the other (and, for
//             add-RMSNorm, its add-and-RMSNorm step)
//   T_peer    oneDNN GEMM and MPI's collective (tpfuse_mpi_bench peer)
//   T_fused   the operator's _out call
//   T_base+norm  add-RMSNorm only: mm_all_reduce_base_out, then the step
//
// and the hidden fraction (T_serial - T_fused) / min(T_gemm, T_comm): the part
// of the shorter stage the overlap hid. Everything but the add-and-RMSNorm
// step (src/ops/add_rms_norm.h) goes through the public API, so the figures
// follow the library as its internals change.
//
// Every figure is the median over repetitions of the slowest rank's time per
// call for a batch of calls after a barrier (the median of per-repetition
// maxima), with ranks pinned to blocks of cores of their own (one core each
// when there are as many ranks as cores; pin_rank) and the GEMMs, tpfuse's
// and the peer's, using the cores of their block. A batch lasts at least
// --min-batch-ms: a single call of a decode shape (about a millisecond) is
// within a scheduler's time slice of noise, and its fused/serial ratio read
// 0.93 to 1.10 between runs when timed call by call. tpfuse's variants
// take turns within each repetition so that a burst of load hits them alike;
// the MPI peer is its own process group and runs right after them.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "bench_baselines.h"
#include "bench_common.h"
#include "bench_family.h"
#include "commands.h"
#include "core/trace.h"
#include "tpfuse/comm/communicator.h"
#include "tpfuse/comm/mpi.h"
#include "tpfuse/core/error.h"

namespace tpfuse::cli {

namespace {

namespace fs = std::filesystem;

struct FusedOptions;
void run_bench(const FusedOptions& o);

struct FusedOptions {
  FusedOp op = FusedOp::mm_all_reduce;
  std::vector<std::string> shapes;
  std::vector<int> ranks;  // empty: each shape's own
  std::vector<std::string> dtypes = {"f16", "bf16"};
  int rounds = 2;
  int reps = 3;
  int warmup = 1;
  double min_batch_ms = 20;
  std::int64_t comm_turn = 0;
  std::string json;
  std::string plot;
  bool trace_overhead = false;
  BaselineOptions baselines;
};

const double kNotMeasured = std::nan("");

struct Spread {
  double median = kNotMeasured, min = kNotMeasured, max = kNotMeasured;
};

struct FusedCase {
  FusedOp op = FusedOp::mm_all_reduce;
  FusedShape shape;
  DType dtype = DType::f16;
  int ranks = 0;
  Spread gemm, comm, serial, fused;  // tpfuse
  Spread base_then_norm;             // add-RMSNorm: mm_all_reduce_base, then add_rms_norm_rows
  std::string engine;                // tpfuse's GEMM engine
  int threads = 0;                   // the GEMM threads of a rank (the peer's alike)
  // The operator's own CPU per call (thread CPU of the fused call minus that
  // of its GEMM then its collective): the median and the largest over ranks.
  double op_cpu = kNotMeasured, op_cpu_max = kNotMeasured;
  // With --trace-overhead: the fused call traced (TPFUSE_TRACE), and the
  // events it records per call.
  Spread traced;
  double events_per_call = kNotMeasured;
  double peer = kNotMeasured, peer_gemm = kNotMeasured, comm_mpi = kNotMeasured, comm_gloo = kNotMeasured;
  std::string peer_detail;

  std::int64_t output_elements() const { return shape.m * shape.n; }
  std::int64_t k_per_rank() const { return cli::k_per_rank(op, shape, ranks); }
  double bound() const { return std::max(gemm.median, comm.median); }
  double hidden_fraction() const {
    return (serial.median - fused.median) / std::min(gemm.median, comm.median);
  }
  std::string label() const { return shape.name.empty() ? cat(shape.m, "x", shape.n, "x", shape.k) : shape.name; }
};

FusedShape parse_shape(FusedOp op, const std::string& text) {
  for (const FusedShape& preset : preset_shapes(op)) {
    if (preset.name == text) return preset;
  }
  if (const auto shape = parse_mnk(text)) return {"", shape->m, shape->n, shape->k, 2};
  std::string names;
  for (const FusedShape& preset : preset_shapes(op)) names += cat(names.empty() ? "" : ", ", preset.name);
  throw CLI::ValidationError("--shape", cat("expected one of ", names, " (", op_name(op),
                                            ") or MxNxK (M rows of the whole product), got \"", text, "\""));
}

Spread spread_of(const std::vector<double>& seconds) {
  return {median(seconds), *std::min_element(seconds.begin(), seconds.end()),
          *std::max_element(seconds.begin(), seconds.end())};
}

// One rank's part of tpfuse's measurements: the variants (bench_family.h,
// each operator's calls and shapes) in turn, each repetition. Rank 0 reports (median, min, max) per variant and the engine.
RankReport measure_tpfuse_rank(comm::RankContext& ctx, const FusedCase& c, const FusedOptions& o) {
  RankVariants rank = make_rank_variants(c.op, ctx, c.shape, c.dtype, o.comm_turn);
  comm::Communicator& comm = *ctx.comm;
  std::vector<std::function<void()>>& variants = rank.calls;
  // The fused call traced: tracing is on for its batches only, into a
  // directory of this rank's, removed at the end.
  const std::size_t kTraced = variants.size();
  const std::string trace_dir = cat(fs::temp_directory_path().string(), "/tpfuse-bench-trace-", ::getpid());
  if (o.trace_overhead) variants.push_back(variants[kFused]);
  const auto timed = [&](std::size_t v, int n, double* cpu_per_call) {
    if (v != kTraced) return timed_batch(comm, variants[v], n, cpu_per_call);
    trace::start(trace_dir);
    const double seconds = timed_batch(comm, variants[v], n, cpu_per_call);
    trace::stop();
    return seconds;
  };

  // Each variant's batch is sized from its last warm-up call, the slowest
  // rank's: the same figure, hence the same batch, on every rank.
  std::vector<int> calls(variants.size(), 1);
  for (int w = 0; w < std::max(1, o.warmup); ++w) {
    for (std::size_t v = 0; v < variants.size(); ++v) {
      calls[v] = calls_per_batch(timed(v, 1, nullptr), o.min_batch_ms);
    }
  }
  std::vector<std::vector<double>> seconds(variants.size()), cpu(variants.size());
  double events_per_call = kNotMeasured;
  // The order rotates from one repetition to the next: with ranks sharing
  // cores, a batch ran up to 1.5x slower right after the all-reduce batch
  // than after another (the seed's 8 ranks on 2 cores), whichever variant it was.
  for (int r = 0; r < o.reps; ++r) {
    for (std::size_t turn = 0; turn < variants.size(); ++turn) {
      const std::size_t v = (turn + static_cast<std::size_t>(r)) % variants.size();
      double cpu_per_call = 0;
      const std::uint64_t events_before = trace::events_recorded();
      seconds[v].push_back(timed(v, calls[v], &cpu_per_call));
      cpu[v].push_back(cpu_per_call);
      if (v == kTraced) events_per_call = static_cast<double>(trace::events_recorded() - events_before) / calls[v];
    }
  }
  RankReport report;
  for (std::size_t v = 0; v < kTraced; ++v) {
    const Spread spread = spread_of(seconds[v]);
    report.values.insert(report.values.end(), {spread.median, spread.min, spread.max});
  }
  // The operator's own CPU time per call on this rank: what the fused call
  // costs its thread beyond its GEMM and its collective run alone, one after
  // the other (serial). Not beyond each run in a batch of its own: a rank
  // that finishes its GEMM first spins in the reduce until the slowest
  // arrives, in the fused call as in serial, but not in the collective's batch.
  // The least over the repetitions: what else runs only adds CPU time (a
  // decode call's varied by 5% from batch to batch in a VM).
  const double op_cpu = *std::min_element(cpu[kFused].begin(), cpu[kFused].end()) -
                        *std::min_element(cpu[kSerial].begin(), cpu[kSerial].end());
  std::vector<double> op_cpus;
  for (const std::string& bytes :
       comm.all_gather(std::string_view(reinterpret_cast<const char*>(&op_cpu), sizeof op_cpu))) {
    op_cpus.push_back(0);
    std::memcpy(&op_cpus.back(), bytes.data(), sizeof(double));
  }
  report.values.push_back(median(op_cpus));
  report.values.push_back(*std::max_element(op_cpus.begin(), op_cpus.end()));
  report.values.push_back(rank.threads);
  if (o.trace_overhead) {
    const Spread traced = spread_of(seconds[kTraced]);
    report.values.insert(report.values.end(), {traced.median, traced.min, traced.max, events_per_call});
    std::error_code ignored;
    fs::remove_all(trace_dir, ignored);
  }
  report.text = rank.engine;
  return report;
}

// Under mpirun (scripts/cluster.sh, `make bench-cluster`) this process is one
// rank of the job's MPI communicator, made once; rank 0's report counts.
comm::RankContext& mpi_rank_context() {
  static comm::RankContext ctx = rank_context_from_env();
  return ctx;
}

void measure_tpfuse(FusedCase& c, const FusedOptions& o) {
  const RankReport report =
      comm::launched_by_mpi()
          ? measure_tpfuse_rank(mpi_rank_context(), c, o)
          : run_local_ranks(c.ranks, o.baselines.no_pin,
                            [&](comm::RankContext& ctx) { return measure_tpfuse_rank(ctx, c, o); });
  // The variants' spreads, in RankVariants order, then the CPU figures,
  // the threads and the traced call's.
  Spread* targets[] = {&c.gemm, &c.comm, &c.serial, &c.fused, &c.base_then_norm};
  const std::size_t variants = c.op == FusedOp::mm_all_reduce_add_rms_norm ? 5 : 4;
  const auto spread_at = [&](std::size_t i) -> Spread {
    return {report.values[i], report.values[i + 1], report.values[i + 2]};
  };
  for (std::size_t v = 0; v < variants; ++v) *targets[v] = spread_at(3 * v);
  const std::size_t rest = 3 * variants;
  c.op_cpu = report.values[rest];
  c.op_cpu_max = report.values[rest + 1];
  c.threads = static_cast<int>(report.values[rest + 2]);
  if (o.trace_overhead) {
    c.traced = spread_at(rest + 3);
    c.events_per_call = report.values[rest + 6];
  }
  c.engine = report.text;
}

// Returns false when the peer failed (and says why).
bool measure_peer(FusedCase& c, const FusedOptions& o, const BaselineTools& tools) {
  const ToolRun run = run_mpi_bench(
      tools, c.ranks,
      {"peer", "--op", std::string(op_name(c.op)), "--m", std::to_string(c.shape.m), "--n", std::to_string(c.shape.n),
       "--k", std::to_string(c.k_per_rank()), "--dtype", std::string(dtype_name(c.dtype)), "--reps",
       std::to_string(o.reps), "--warmup", std::to_string(o.warmup), "--min-batch-ms", cat(o.min_batch_ms)});
  if (!run.failure.empty()) std::printf("  MPI peer failed for %s, skipped: %s\n", c.label().c_str(), run.failure.c_str());
  for (const JsonRecord& record : run.records) {
    if (record_text(record, "what") != "peer") continue;
    c.peer = record_number(record, "t_peer");
    c.peer_gemm = record_number(record, "t_gemm");
    c.comm_mpi = record_number(record, "t_comm");
    c.peer_detail = cat(record_text(record, "gemm"), "; ", record_text(record, "reduce"));
  }
  return run.failure.empty();
}

double median_of_measured(const std::vector<double>& values) {
  std::vector<double> measured;
  for (double v : values) {
    if (!std::isnan(v)) measured.push_back(v);
  }
  return median(measured);
}

// tpfuse and the MPI peer are separate process groups, so they take turns
// round by round, so that a load that comes and goes over minutes reaches
// both alike. A figure is the median over the rounds of each round's median;
// the spread covers every repetition of every round.
void measure_case(FusedCase& c, const FusedOptions& o, const BaselineTools& tools) {
  std::vector<FusedCase> rounds;
  bool peer_runs = tools.mpi_unavailable.empty();
  for (int round = 0; round < o.rounds; ++round) {
    FusedCase figures = c;
    measure_tpfuse(figures, o);
    if (peer_runs) peer_runs = measure_peer(figures, o, tools);
    rounds.push_back(figures);
  }
  std::vector<Spread FusedCase::*> spreads = {&FusedCase::gemm, &FusedCase::comm, &FusedCase::serial,
                                              &FusedCase::fused};
  if (c.op == FusedOp::mm_all_reduce_add_rms_norm) spreads.push_back(&FusedCase::base_then_norm);
  if (o.trace_overhead) spreads.push_back(&FusedCase::traced);
  for (Spread FusedCase::*field : spreads) {
    std::vector<double> medians;
    Spread& combined = c.*field;
    combined.min = std::numeric_limits<double>::infinity();
    combined.max = 0;
    for (const FusedCase& r : rounds) {
      medians.push_back((r.*field).median);
      combined.min = std::min(combined.min, (r.*field).min);
      combined.max = std::max(combined.max, (r.*field).max);
    }
    combined.median = median(medians);
  }
  for (double FusedCase::*field : {&FusedCase::peer, &FusedCase::peer_gemm, &FusedCase::comm_mpi, &FusedCase::op_cpu,
                                   &FusedCase::op_cpu_max, &FusedCase::events_per_call}) {
    std::vector<double> figures;
    for (const FusedCase& r : rounds) figures.push_back(r.*field);
    c.*field = median_of_measured(figures);
  }
  c.engine = rounds.front().engine;
  c.threads = rounds.front().threads;
  c.peer_detail = rounds.front().peer_detail;
}

// gloo all-reduces every case's output (as f32) once per rank count: one
// Python start per rank count instead of one per case.
void measure_gloo(std::vector<FusedCase>& cases, const FusedOptions& o, const BaselineTools& tools) {
  std::map<int, std::set<std::int64_t>> bytes_by_ranks;
  for (const FusedCase& c : cases) bytes_by_ranks[c.ranks].insert(c.output_elements() * 4);
  if (!reduces_whole_output(o.op)) return;
  for (const auto& [ranks, sizes] : bytes_by_ranks) {
    std::vector<std::string> args = {"--reps", std::to_string(o.reps), "--warmup", std::to_string(o.warmup), "--sizes"};
    for (std::int64_t bytes : sizes) args.push_back(std::to_string(bytes));
    const ToolRun run = run_gloo_bench(tools, ranks, args);
    if (!run.failure.empty()) std::printf("  gloo failed for %d ranks, skipped: %s\n", ranks, run.failure.c_str());
    for (FusedCase& c : cases) {
      for (const JsonRecord& record : run.records) {
        if (c.ranks == ranks && record_number(record, "bytes") == static_cast<double>(c.output_elements() * 4)) {
          c.comm_gloo = record_number(record, "seconds");
        }
      }
    }
  }
}

void print_times(const std::vector<FusedCase>& cases, FusedOp op) {
  const bool norm = op == FusedOp::mm_all_reduce_add_rms_norm;
  const char* baselines = op == FusedOp::all_gather_mm       ? "MPI all-gathers x1's 16-bit elements"
                          : op == FusedOp::mm_reduce_scatter ? "MPI reduce-scatters the output as f32"
                                                             : "MPI and gloo all-reduce the output as f32";
  std::printf("\nTime per call, ms (median of the slowest rank; %s)%s\n", baselines,
              norm ? "; T_base+norm = mm_all_reduce_base_out, then add_rms_norm_rows" : "");
  std::printf("  %-13s %5s %5s %5s %-4s %5s %7s %9s %9s %9s %9s %9s %9s %9s%s\n", "case", "M", "N", "K", "mode",
              "ranks", "threads", "T_gemm", "T_comm", "T_serial", "T_fused", "T_peer", "comm MPI", "comm gloo",
              norm ? " T_base+norm" : "");
  for (const FusedCase& c : cases) {
    std::printf("  %-13s %5lld %5lld %5lld %-4s %5d", c.label().c_str(), static_cast<long long>(c.shape.m),
                static_cast<long long>(c.shape.n), static_cast<long long>(c.shape.k),
                std::string(dtype_name(c.dtype)).c_str(), c.ranks);
    std::printf(" %7d", c.threads);
    std::vector<double> times = {c.gemm.median, c.comm.median, c.serial.median, c.fused.median,
                                 c.peer,        c.comm_mpi,    c.comm_gloo};
    if (norm) times.push_back(c.base_then_norm.median);
    for (double t : times) {
      if (std::isnan(t)) {
        std::printf(" %9s", "-");
      } else {
        std::printf(" %9.3f", t * 1e3);
      }
    }
    std::printf("\n");
  }
}

void print_ratio(double value) {
  if (std::isnan(value)) {
    std::printf(" %9s", "-");
  } else {
    std::printf(" %9.3f", value);
  }
}

void print_ratios(const std::vector<FusedCase>& cases, FusedOp op) {
  const bool norm = op == FusedOp::mm_all_reduce_add_rms_norm;
  std::printf(
      "\nRatios (same run): bound = max(T_gemm, T_comm); hidden = (T_serial - T_fused) / "
      "min(T_gemm, T_comm);"
      "\nspread = fused (max - min) / median over the repetitions; op CPU = thread CPU per call of "
      "the fused call"
      "\nminus that of its GEMM then its collective (serial), us (median and largest over "
      "ranks)\n");
  std::printf("  %-13s %-4s %5s %9s %9s %9s %9s %9s %9s %9s %9s%s  %s\n", "case", "mode", "ranks", "serial/", "peer/",
              "fused/", "fused/", "hidden", "spread", "op CPU", "op CPU", norm ? "    fused/" : "", "tpfuse engine");
  std::printf("  %-13s %-4s %5s %9s %9s %9s %9s %9s %9s %9s %9s%s\n", "", "", "", "fused", "fused", "serial", "bound",
              "", "", "median", "max", norm ? " base+norm" : "");
  for (const FusedCase& c : cases) {
    std::printf("  %-13s %-4s %5d", c.label().c_str(), std::string(dtype_name(c.dtype)).c_str(), c.ranks);
    print_ratio(c.serial.median / c.fused.median);
    print_ratio(c.peer / c.fused.median);
    print_ratio(c.fused.median / c.serial.median);
    print_ratio(c.fused.median / c.bound());
    print_ratio(c.hidden_fraction());
    print_ratio((c.fused.max - c.fused.min) / c.fused.median);
    print_ratio(c.op_cpu * 1e6);
    print_ratio(c.op_cpu_max * 1e6);
    if (norm) print_ratio(c.fused.median / c.base_then_norm.median);
    std::printf("  %s\n", c.engine.c_str());
  }
}

// What a span costs with tracing off: the flag's load, in a loop of spans
// that record nothing.
double disabled_span_seconds() {
  constexpr int kSpans = 10'000'000;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kSpans; ++i) {
    trace::Span span("off", "bench");
    if (span.active()) span.args().add("i", i);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / kSpans;
}

void print_tracing(const std::vector<FusedCase>& cases) {
  const double off_span = disabled_span_seconds();
  std::printf(
      "\nTracing (TPFUSE_TRACE), same run: the fused call traced against untraced; off, a span costs %.2f ns "
      "(a loop of 10^7)\n",
      off_span * 1e9);
  std::printf("  %-13s %-4s %5s %12s %12s %14s %14s\n", "case", "mode", "ranks", "traced/", "events", "off: spans x",
              "off: share");
  std::printf("  %-13s %-4s %5s %12s %12s %14s %14s\n", "", "", "", "untraced", "per call", "cost (ns)", "of a call");
  for (const FusedCase& c : cases) {
    const double off_ns = c.events_per_call * off_span * 1e9;
    std::printf("  %-13s %-4s %5d %12.3f %12.1f %14.1f %13.5f%%\n", c.label().c_str(),
                std::string(dtype_name(c.dtype)).c_str(), c.ranks, c.traced.median / c.fused.median, c.events_per_call,
                off_ns, 100.0 * off_ns * 1e-9 / c.fused.median);
  }
}

// A figure, or null where it was not measured.
nlohmann::ordered_json json_number(double value) {
  return std::isnan(value) ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(value);
}

void write_json(const std::string& path, const std::vector<FusedCase>& cases, const FusedOptions& o) {
  nlohmann::ordered_json records = nlohmann::ordered_json::array();
  for (const FusedCase& c : cases) {
    records.push_back({{"op", op_name(c.op)},
                       {"mode", dtype_name(c.dtype)},
                       {"shape", c.label()},
                       {"m", c.shape.m},
                       {"n", c.shape.n},
                       {"k", c.shape.k},
                       {"k_per_rank", c.k_per_rank()},
                       {"ranks", c.ranks},
                       {"threads", c.threads},
                       {"t_gemm", json_number(c.gemm.median)},
                       {"t_comm", json_number(c.comm.median)},
                       {"t_serial", json_number(c.serial.median)},
                       {"t_peer", json_number(c.peer)},
                       {"t_fused", json_number(c.fused.median)},
                       {"hidden_fraction", json_number(c.hidden_fraction())},
                       {"t_base_then_norm", json_number(c.base_then_norm.median)},
                       {"t_fused_min", json_number(c.fused.min)},
                       {"t_fused_max", json_number(c.fused.max)},
                       {"t_serial_min", json_number(c.serial.min)},
                       {"t_serial_max", json_number(c.serial.max)},
                       {"t_comm_mpi", json_number(c.comm_mpi)},
                       {"t_comm_gloo", json_number(c.comm_gloo)},
                       {"t_peer_gemm", json_number(c.peer_gemm)},
                       {"t_fused_traced", json_number(c.traced.median)},
                       {"trace_events_per_call", json_number(c.events_per_call)},
                       {"op_cpu_us", json_number(c.op_cpu * 1e6)},
                       {"op_cpu_us_max_rank", json_number(c.op_cpu_max * 1e6)},
                       {"engine", c.engine},
                       {"peer", c.peer_detail},
                       {"rounds", o.rounds},
                       {"reps", o.reps},
                       {"min_batch_ms", o.min_batch_ms},
                       {"pinned", !o.baselines.no_pin},
                       {"comm_turn", o.comm_turn}});
  }
  std::ofstream out(path);
  out << records.dump(1) << "\n";
  if (!out) throw CLI::RuntimeError(cat("bench fused: cannot write ", path), 1);
}

// gnuplot's data block and plot clauses for one series, in `colour`:
// fused solid, serial dashed, peer dotted (when measured).
std::string plot_series(const std::string& block, const std::string& title, int colour, const OpTexts& texts,
                        const std::vector<const FusedCase*>& points, std::string& data) {
  data += cat(block, " << EOD\n");
  bool has_peer = false;
  for (const FusedCase* c : points) {
    data += cat(c->shape.m, " ", c->fused.median * 1e3, " ", c->serial.median * 1e3, " ",
                std::isnan(c->peer) ? "?" : cat(c->peer * 1e3), "\n");
    has_peer = has_peer || !std::isnan(c->peer);
  }
  data += "EOD\n";
  std::string clauses =
      cat(block, " using 1:2 with linespoints lw 2 pt 7 lc ", colour, " dt 1 title 'fused, ", title, "', ", block,
          " using 1:3 with linespoints lw 2 pt 6 lc ", colour, " dt 2 title 'serial: ", texts.serial, "'");
  if (has_peer) {
    clauses +=
        cat(", ", block, " using 1:4 with linespoints lw 1 pt 4 lc ", colour, " dt 3 title 'peer: ", texts.peer, "'");
  }
  return clauses;
}

// Draws time against M with gnuplot, one colour per (dtype, ranks, N, K)
// series; only the series with several M when there are any.
void write_plot(const std::string& path, const std::vector<FusedCase>& cases, FusedOp op) {
  const std::string gnuplot = find_program("gnuplot");
  if (gnuplot.empty()) {
    std::printf("\nplot skipped: gnuplot not found (apt-get install gnuplot-nox)\n");
    return;
  }
  std::map<std::string, std::vector<const FusedCase*>> series;
  for (const FusedCase& c : cases) {
    series[cat(dtype_name(c.dtype), ", ", c.ranks, " ranks, N=", c.shape.n, " K=", c.shape.k)].push_back(&c);
  }
  const bool any_curve = std::any_of(series.begin(), series.end(), [](const auto& s) { return s.second.size() > 1; });
  std::string data, plot;
  std::int64_t min_m = std::numeric_limits<std::int64_t>::max(), max_m = 0;
  int drawn = 0;
  for (auto& [title, points] : series) {
    if (any_curve && points.size() < 2) continue;
    std::sort(points.begin(), points.end(), [](const FusedCase* a, const FusedCase* b) { return a->shape.m < b->shape.m; });
    min_m = std::min(min_m, points.front()->shape.m);
    max_m = std::max(max_m, points.back()->shape.m);
    plot += cat(plot.empty() ? "plot " : ", \\\n     ",
                plot_series(cat("$series", drawn), title, drawn + 1, op_texts(op), points, data));
    ++drawn;
  }
  const std::string script = cat(
      "set terminal pngcairo size 1400,800 noenhanced font 'sans,11'\nset output '", path, "'\n", "set title \"",
      op_function(op),
      ": time per call against M\\n(median over repetitions of the slowest rank; ranks "
      "pinned to cores of their own)\"\n",
      "set xlabel 'M (rows of the whole product)'\nset ylabel 'time per call (ms)'\n",
      "set logscale xy\nset grid\nset key outside right top vertical box\nset datafile missing '?'\n", "set xrange [",
      static_cast<double>(min_m) / 1.5, ":", static_cast<double>(max_m) * 1.5, "]\n", data, plot, "\n");
  std::fflush(stdout);
  FILE* pipe = popen(gnuplot.c_str(), "w");
  if (pipe == nullptr) throw CLI::RuntimeError("bench fused: cannot start gnuplot", 1);
  std::fputs(script.c_str(), pipe);
  if (pclose(pipe) != 0) throw CLI::RuntimeError("bench fused: gnuplot failed", 1);
  std::printf("\nwrote %s (%d series)\n", path.c_str(), drawn);
}

std::vector<FusedCase> plan_cases(const FusedOptions& o) {
  std::vector<FusedCase> cases;
  const std::vector<std::string> names = o.shapes.empty() ? [&] {
    std::vector<std::string> all;
    for (const FusedShape& preset : preset_shapes(o.op)) all.push_back(preset.name);
    return all;
  }() : o.shapes;
  for (const std::string& name : names) {
    const FusedShape shape = parse_shape(o.op, name);
    for (int ranks : o.ranks.empty() ? std::vector<int>{shape.ranks} : o.ranks) {
      if (const std::string problem = shape_problem(o.op, shape, ranks); !problem.empty()) {
        throw CLI::ValidationError("--ranks", cat(problem, " of ", name, " (", op_name(o.op), ")"));
      }
      for (const std::string& dtype : o.dtypes) {
        FusedCase c;
        c.op = o.op;
        c.shape = shape;
        c.dtype = parse_dtype(dtype);
        c.ranks = ranks;
        cases.push_back(c);
      }
    }
  }
  return cases;
}

// Under mpirun: the job's size is the rank count, ranks pin themselves, only
// rank 0 prints and writes, and the baselines (which start processes of their
// own) are skipped: the cluster script runs the MPI peer under the same
// mpirun itself.
void run_bench_under_mpi(FusedOptions o) {
  comm::RankContext& ctx = mpi_rank_context();
  if (!o.baselines.no_pin) pin_rank(ctx.rank, ctx.size, allowed_cores());
  o.ranks = {ctx.size};
  o.baselines.no_mpi = true;
  o.baselines.no_gloo = true;
  if (ctx.rank != 0) {
    o.json.clear();
    o.plot.clear();
    if (std::freopen("/dev/null", "w", stdout) == nullptr) throw_system_error("freopen", errno);
  }
  run_bench(o);
}

void run_bench(const FusedOptions& o) {
  std::vector<FusedCase> cases = plan_cases(o);
  const BaselineTools tools = find_baseline_tools(o.baselines);
  const OpTexts texts = op_texts(o.op);
  std::printf("tpfuse bench fused --op %s\n  machine: %s\n", std::string(op_name(o.op)).c_str(),
              machine_facts().c_str());
  std::printf(
      "  ranks %s, GEMM threads: the cores of each rank's block; every figure: barrier, calls filling %g ms or one, "
      "slowest "
      "rank's time per call;\n  median of %d repetitions (after %d warm-up), then the median over %d rounds "
      "in which tpfuse and the MPI peer take "
      "turns\n  T_gemm = prepare_gemm + compute_rows (all rows); T_comm = %s; "
      "T_serial = %s; T_fused = %s (comm_turn %lld)\n  T_peer = %s\n",
      pinning_text(cases.empty() ? 1 : cases.front().ranks, o.baselines.no_pin).c_str(), o.min_batch_ms, o.reps,
      o.warmup, o.rounds, texts.comm, texts.serial, texts.fused, static_cast<long long>(o.comm_turn), texts.peer);
  if (!tools.mpi_unavailable.empty()) std::printf("  T_peer and MPI skipped: %s\n", tools.mpi_unavailable.c_str());
  if (!tools.gloo_unavailable.empty()) std::printf("  gloo skipped: %s\n", tools.gloo_unavailable.c_str());
  for (FusedCase& c : cases) {
    std::printf("  measuring %s %s, %d ranks ...\n", c.label().c_str(), std::string(dtype_name(c.dtype)).c_str(), c.ranks);
    measure_case(c, o, tools);
  }
  if (tools.gloo_unavailable.empty()) measure_gloo(cases, o, tools);
  std::set<std::string> peers;
  for (const FusedCase& c : cases) {
    if (!c.peer_detail.empty()) peers.insert(cat(dtype_name(c.dtype), ": ", c.peer_detail));
  }
  for (const std::string& peer : peers) std::printf("  T_peer %s\n", peer.c_str());
  print_times(cases, o.op);
  print_ratios(cases, o.op);
  if (o.trace_overhead) print_tracing(cases);
  if (!o.json.empty()) {
    write_json(o.json, cases, o);
    std::printf("\nwrote %zu records to %s\n", cases.size(), o.json.c_str());
  }
  if (!o.plot.empty()) write_plot(o.plot, cases, o.op);
}

}  // namespace

void add_bench_fused_command(CLI::App& bench_app) {
  auto o = std::make_shared<FusedOptions>();
  auto* cmd = bench_app.add_subcommand(
      "fused",
      "A fused operator (mm_all_reduce_base by default) against its GEMM and collective alone, one after the other, "
      "and oneDNN + MPI");
  auto op = std::make_shared<std::string>("mm_all_reduce");
  cmd->add_option("--op", *op, "mm_all_reduce | all_gather_mm | mm_reduce_scatter | mm_all_reduce_add_rms_norm")
      ->check(CLI::IsMember(op_names()))
      ->capture_default_str();
  std::string presets;
  for (FusedOp each : kFusedOps) {
    presets += cat("\n    ", op_name(each), ":");
    for (const FusedShape& preset : preset_shapes(each)) {
      presets += cat("\n      ", preset.name, ": M=", preset.m, " N=", preset.n, " K=", preset.k, ", ", preset.ranks,
                     " ranks");
    }
  }
  cmd->add_option("--shape", o->shapes,
                  cat("Shapes: a preset of the operator or MxNxK (default: its every preset). M: rows of the whole "
                      "product; K: of the whole layer, split over the ranks, except for all_gather_mm, whose ranks "
                      "each hold all of K and a column shard of N columns",
                      presets));
  cmd->add_option("--ranks", o->ranks, "Rank counts (default: each shape's own)")->check(CLI::Range(1, 256));
  cmd->add_option("--dtype", o->dtypes, "Activation and output dtypes (plain mode)")
      ->check(CLI::IsMember({"f16", "bf16"}))
      ->capture_default_str();
  cmd->add_option("--rounds", o->rounds, "Rounds in which tpfuse and the MPI peer take turns (the median is reported)")
      ->check(CLI::Range(1, 1000));
  cmd->add_option("--reps", o->reps, "Repetitions per round (their median is the round's figure)")
      ->check(CLI::Range(1, 10000));
  cmd->add_option("--warmup", o->warmup, "Unmeasured repetitions at the start of each round")->check(CLI::Range(0, 1000));
  cmd->add_option("--min-batch-ms", o->min_batch_ms, "Calls are repeated to fill at least this long a batch")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 100000.0));
  cmd->add_option("--comm-turn", o->comm_turn, "The fused op's comm_turn (0: tpfuse picks)")->check(CLI::Range(0, 1 << 24));
  cmd->add_option("--json", o->json, "Write one record per shape, dtype and rank count to this file");
  cmd->add_option("--plot", o->plot, "Draw time against M (fused, serial, peer) into this PNG (gnuplot)");
  cmd->add_flag("--trace-overhead", o->trace_overhead,
                "Also time the fused call traced (as under TPFUSE_TRACE) and what a span costs with tracing off");
  add_baseline_options(*cmd, o->baselines);
  cmd->callback([o, op] {
    o->op = *parse_op(*op);
    if (comm::launched_by_mpi()) {
      run_bench_under_mpi(*o);
    } else {
      run_bench(*o);
    }
  });
}

}  // namespace tpfuse::cli
