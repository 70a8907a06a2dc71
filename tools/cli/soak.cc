// `tpfuse soak`: a long run of fused calls on one communicator, as a
// tensor-parallel job makes for days, with random shapes, modes, options and
// comm_turn values. Every call's output is compared across ranks (a hash,
// all-gathered) and every check_every-th against the golden model (by the
// ranks in turn); what each rank holds (resident memory, descriptors, mapped
// segments) is sampled after a warm-up and at the end. A wrong or differing
// output, a failed rank, or growth beyond the limits fails the soak (exit 1).
//
// The warm-up first makes one call per mode, dtype and x2 layout at the
// largest shape the options allow (as many as --warmup allows), then random
// calls: buffers that grow to
// the largest call seen, thread stacks, oneDNN's kernels and pages of code
// run for the first time reach their high-water mark before the start
// sample, so that what grows after it is what a job would accumulate.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <dnnl.hpp>
#include <exception>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "bench_common.h"
#include "case_runner.h"
#include "commands.h"
#include "tpfuse/comm/launcher.h"
#include "tpfuse/core/error.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/testing/resources.h"

namespace tpfuse::cli {

namespace {

using Clock = std::chrono::steady_clock;

struct SoakOptions {
  std::int64_t calls = 1000;
  int ranks = 2;
  std::uint64_t seed = 1;
  std::int64_t check_every = 10;
  std::int64_t warmup = 1000;
  std::int64_t max_m = 64, max_n = 64, max_k = 128;
  std::int64_t max_rss_growth = std::int64_t{1} << 20;
  int primitive_cache = 16;
  std::string json;
};

// The soak's own stream (splitmix64): a seed gives the same calls on every
// rank and on every machine.
class Draws {
 public:
  explicit Draws(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [lo, hi].
  std::int64_t between(std::int64_t lo, std::int64_t hi) {
    return lo + static_cast<std::int64_t>(next() % static_cast<std::uint64_t>(hi - lo + 1));
  }
  bool percent(int chance) { return between(0, 99) < chance; }

 private:
  std::uint64_t state_;
};

// Per-group scales need 32 <= G <= k - 1 with G a multiple of 32.
constexpr std::int64_t kMinGroupK = 33;

testing::CaseSpec draw_call(Draws& draws, const SoakOptions& o) {
  static constexpr Mode kModes[] = {Mode::plain, Mode::weight_quant, Mode::full_quant};
  testing::CaseSpec s;
  s.mode = kModes[draws.between(0, 2)];
  s.dtype = draws.percent(50) ? DType::f16 : DType::bf16;
  s.m = draws.between(1, o.max_m);
  s.n = draws.between(1, o.max_n);
  s.k = draws.between(1, o.max_k);
  if (draws.percent(50)) {  // 3-D x1: a batch that divides m
    std::vector<std::int64_t> divisors;
    for (std::int64_t d = 1; d <= s.m; ++d) {
      if (s.m % d == 0) divisors.push_back(d);
    }
    s.batch = divisors[static_cast<std::size_t>(
        draws.between(0, static_cast<std::int64_t>(divisors.size()) - 1))];
  }
  s.uneven_k = draws.percent(25);
  s.x2_transposed = draws.percent(50);
  s.bias = draws.percent(50);
  s.x3 = draws.percent(50);
  if (s.mode == Mode::weight_quant) {
    static constexpr ScaleKind kKinds[] = {ScaleKind::per_tensor, ScaleKind::per_channel,
                                           ScaleKind::per_group};
    s.scale_kind = kKinds[draws.between(0, o.max_k >= kMinGroupK ? 2 : 1)];
    if (s.scale_kind == ScaleKind::per_group) {
      if (s.k < kMinGroupK) s.k = draws.between(kMinGroupK, o.max_k);
      s.group_size = 32 * draws.between(1, (s.k - 1) / 32);
    }
    s.offset = draws.percent(50);
  } else if (s.mode == Mode::full_quant) {
    s.scale_kind = draws.percent(50) ? ScaleKind::per_tensor : ScaleKind::per_channel;
  }
  // Above m, comm_turn is capped at m: that rule gets exercised too.
  s.comm_turn = draws.percent(50) ? 0 : draws.between(1, s.m + 2);
  s.seed = draws.next();
  return s;
}

std::vector<testing::CaseSpec> largest_calls(const SoakOptions& o) {
  std::vector<testing::CaseSpec> calls;
  for (Mode mode : {Mode::plain, Mode::weight_quant, Mode::full_quant}) {
    for (DType dtype : {DType::f16, DType::bf16}) {
      for (bool transposed : {false, true}) {
        testing::CaseSpec s;
        s.mode = mode;
        s.dtype = dtype;
        s.m = o.max_m;
        s.n = o.max_n;
        s.k = o.max_k;
        s.uneven_k = true;
        s.x2_transposed = transposed;
        s.bias = s.x3 = true;
        if (mode == Mode::weight_quant) {
          s.scale_kind = o.max_k >= kMinGroupK ? ScaleKind::per_group : ScaleKind::per_channel;
          s.group_size = s.scale_kind == ScaleKind::per_group ? 32 : 0;
          s.offset = true;
        }
        s.comm_turn = transposed ? s.m : 0;  // the most tiles, and the library's own plan
        calls.push_back(s);
      }
    }
  }
  return calls;
}

// What each rank contributes to the all-gather after a call.
struct CallVerdict {
  std::uint64_t hash = 0;
  std::uint8_t checked = 0;
  testing::Comparison comparison;
};

// What a rank hands back to the launching process, in memory shared with it:
// plain values only.
struct RankRecord {
  bool started = false;   // the start sample was taken
  bool finished = false;  // the end sample was taken
  testing::ProcessResources start, end;
  testing::ShmUsage shm_start, shm_end;  // host-wide tpfuse-* entries
  std::int64_t warmup_calls = 0;
  std::int64_t calls_done = 0;  // after the warm-up
  std::int64_t checks = 0;      // golden checks of every rank, as gathered
  double max_abs_error = 0, bound_at_max = 0, worst_ratio = 0;
  double warmup_seconds = 0, seconds = 0;
  char failure[1024] = {};
};

// The ranks' records, in an anonymous shared mapping made before the fork.
class SharedRecords {
 public:
  explicit SharedRecords(int ranks) : count_(static_cast<std::size_t>(ranks)) {
    void* memory =
        ::mmap(nullptr, bytes(), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) throw_system_error("soak: mmap of the rank records", errno);
    records_ = static_cast<RankRecord*>(memory);
    std::uninitialized_default_construct_n(records_, count_);
  }
  SharedRecords(const SharedRecords&) = delete;
  SharedRecords& operator=(const SharedRecords&) = delete;
  ~SharedRecords() { ::munmap(records_, bytes()); }
  RankRecord& operator[](int rank) { return records_[rank]; }

 private:
  std::size_t bytes() const { return count_ * sizeof(RankRecord); }
  std::size_t count_;
  RankRecord* records_ = nullptr;
};

// A bar redrawn in place on a terminal, a plain line every 10 s otherwise.
class Progress {
 public:
  Progress(bool shown, std::int64_t total)
      : shown_(shown), tty_(::isatty(STDERR_FILENO) != 0), total_(total), start_(Clock::now()) {}

  void update(std::int64_t done, bool warming_up) {
    if (!shown_) return;
    const auto now = Clock::now();
    const auto every = tty_ ? std::chrono::milliseconds(200) : std::chrono::milliseconds(10000);
    if (done < total_ && now - last_ < every) return;
    last_ = now;
    const double seconds = std::chrono::duration<double>(now - start_).count();
    const double fraction = static_cast<double>(done) / static_cast<double>(total_);
    const char* phase = warming_up ? "warm-up" : "soak";
    if (tty_) {
      constexpr int kWidth = 30;
      const int filled = static_cast<int>(fraction * kWidth);
      const double eta = done > 0 ? seconds / fraction - seconds : 0;
      std::fprintf(stderr, "\r%-7s [%s%s] %lld/%lld calls %3.0f%%  %.0f s, %.0f s left  ", phase,
                   std::string(static_cast<std::size_t>(filled), '#').c_str(),
                   std::string(static_cast<std::size_t>(kWidth - filled), '.').c_str(),
                   static_cast<long long>(done), static_cast<long long>(total_), fraction * 100,
                   seconds, eta);
      if (done == total_) std::fputc('\n', stderr);
    } else {
      std::fprintf(stderr, "%s: %lld/%lld calls (%.0f%%), %.0f s\n", phase,
                   static_cast<long long>(done), static_cast<long long>(total_), fraction * 100,
                   seconds);
    }
    std::fflush(stderr);
  }

 private:
  bool shown_, tty_;
  std::int64_t total_;
  Clock::time_point start_, last_;
};

// The `tpfuse run` command that makes the same call.
std::string run_command(const testing::CaseSpec& s, int ranks) {
  std::string text = cat("tpfuse run --mode ", mode_name(s.mode), " --dtype ", dtype_name(s.dtype),
                         " --m ", s.m, " --n ", s.n, " --k ", s.k);
  if (s.batch > 0) text += cat(" --batch ", s.batch);
  if (s.mode != Mode::plain) text += cat(" --scale ", scale_kind_name(s.scale_kind));
  if (s.group_size > 0) text += cat(" --group-size ", s.group_size);
  if (s.offset) text += " --offset";
  if (s.bias) text += " --bias";
  if (s.x3) text += " --x3";
  if (s.x2_transposed) text += " --transpose-x2";
  if (s.uneven_k) text += " --uneven-k";
  return text + cat(" --comm-turn ", s.comm_turn, " --seed ", s.seed, " --ranks ", ranks);
}

testing::Comparison check_against_golden(const testing::CaseSpec& spec, int ranks,
                                         const Tensor& out) {
  std::vector<testing::RankInputs> inputs;
  std::vector<testing::RankArgs> args;
  for (int r = 0; r < ranks; ++r) inputs.push_back(testing::make_rank_inputs(spec, r));
  for (const auto& in : inputs) args.push_back(in.args);
  return testing::compare(out, testing::golden_mm_all_reduce(args));
}

void record_failure(RankRecord& record, const std::string& label, const std::string& what,
                    const testing::CaseSpec& spec, int ranks) {
  std::snprintf(record.failure, sizeof(record.failure), "%s: %s; %s, %s; reproduce with: %s",
                label.c_str(), what.c_str(), describe_mode(spec).c_str(),
                describe_shape(spec).c_str(), run_command(spec, ranks).c_str());
}

// One call on this rank: compute, hash, check if it is this rank's turn, and
// gather every rank's verdict. False (on every rank alike) when the call
// gave a wrong or differing output; the failure is in the record.
bool checked_call(comm::RankContext& ctx, const testing::CaseSpec& spec, std::int64_t index,
                  const std::string& label, const SoakOptions& o, RankRecord& record) {
  const testing::RankInputs inputs = testing::make_rank_inputs(spec, ctx.rank);
  const Tensor out =
      mm_all_reduce_base(inputs.args.x1, inputs.args.x2, ctx.comm->name(), inputs.args.options);
  CallVerdict mine;
  mine.hash = fnv1a(out.data(), out.nbytes());
  if (index % o.check_every == 0 && (index / o.check_every) % ctx.size == ctx.rank) {
    mine.checked = 1;
    mine.comparison = check_against_golden(spec, ctx.size, out);
  }
  const auto blobs =
      ctx.comm->all_gather(std::string_view(reinterpret_cast<const char*>(&mine), sizeof(mine)));

  std::string failure;
  for (int r = 0; r < ctx.size; ++r) {
    CallVerdict v;
    std::memcpy(&v, blobs[static_cast<std::size_t>(r)].data(), sizeof(v));
    if (v.hash != mine.hash && failure.empty()) {
      failure = cat("outputs differ across ranks (rank ", ctx.rank, " and rank ", r, ")");
    }
    if (!v.checked) continue;
    const testing::Comparison& c = v.comparison;
    ++record.checks;
    if (c.max_abs_error > record.max_abs_error) {
      record.max_abs_error = c.max_abs_error;
      record.bound_at_max = c.max_bound;
    }
    record.worst_ratio = std::max(record.worst_ratio, c.worst_ratio);
    if (!c.ok()) {
      failure =
          cat(c.mismatches, " elements beyond the golden model's tolerance (max error ",
              c.max_abs_error, ", tolerance there ", c.max_bound, "; checked on rank ", r, ")");
    }
  }
  if (failure.empty()) return true;
  record_failure(record, label, failure, spec, ctx.size);
  return false;
}

// checked_call, with the call that threw (a rank lost, a deadline passed)
// named in the record before the error ends the rank.
bool soak_call(comm::RankContext& ctx, const testing::CaseSpec& spec, std::int64_t index,
               const std::string& label, const SoakOptions& o, RankRecord& record) {
  try {
    return checked_call(ctx, spec, index, label, o, record);
  } catch (const std::exception& error) {
    record_failure(record, label, error.what(), spec, ctx.size);
    throw;
  }
}

int soak_rank(comm::RankContext& ctx, const SoakOptions& o, RankRecord& record) {
  if (o.primitive_cache >= 0) dnnl::set_primitive_cache_capacity(o.primitive_cache);
  std::vector<testing::CaseSpec> warmup = largest_calls(o);
  if (static_cast<std::int64_t>(warmup.size()) > o.warmup)
    warmup.resize(static_cast<std::size_t>(o.warmup));
  // The warm-up draws from its own stream, so that a seed's measured calls
  // do not depend on --warmup.
  Draws warmup_draws(o.seed ^ 0x5EEDF00DCAFEBABEull);
  while (static_cast<std::int64_t>(warmup.size()) < o.warmup)
    warmup.push_back(draw_call(warmup_draws, o));
  record.warmup_calls = static_cast<std::int64_t>(warmup.size());
  Progress progress(ctx.rank == 0, record.warmup_calls + o.calls);

  const auto warmup_start = Clock::now();
  std::int64_t index = 0;
  for (const auto& spec : warmup) {
    if (!soak_call(ctx, spec, index, cat("warm-up call ", index + 1), o, record)) return 0;
    progress.update(++index, true);
  }
  record.warmup_seconds = std::chrono::duration<double>(Clock::now() - warmup_start).count();
  record.shm_start = testing::sample_shm_usage();
  record.start = testing::sample_process_resources();
  record.started = true;

  Draws draws(o.seed);
  const auto start = Clock::now();
  for (std::int64_t call = 0; call < o.calls; ++call) {
    if (!soak_call(ctx, draw_call(draws, o), index, cat("call ", call + 1), o, record)) break;
    record.calls_done = call + 1;
    progress.update(++index, false);
  }
  record.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  record.end = testing::sample_process_resources();
  record.shm_end = testing::sample_shm_usage();
  record.finished = true;
  return 0;
}

// Everything the soak found wrong, one sentence each.
std::vector<std::string> violations(const SoakOptions& o, const comm::LaunchResult& launch,
                                    SharedRecords& records) {
  std::vector<std::string> found;
  if (!launch.ok()) found.push_back(cat("ranks failed (", launch.describe_failures(), ")"));
  // Every rank records a wrong output alike; an error may hit some only.
  for (int r = 0; r < o.ranks; ++r) {
    if (records[r].failure[0] == '\0') continue;
    found.push_back(cat("rank ", r, ": ", records[r].failure));
    if (launch.ok()) break;
  }
  for (int r = 0; r < o.ranks; ++r) {
    const RankRecord& rec = records[r];
    if (!rec.started || !rec.finished) continue;
    const std::int64_t rss = rec.end.rss_bytes - rec.start.rss_bytes;
    if (rss > o.max_rss_growth) {
      found.push_back(cat("rank ", r, "'s resident memory grew by ", format_bytes(rss),
                          " after the warm-up (limit ", format_bytes(o.max_rss_growth), ")"));
    }
    if (rec.end.open_fds > rec.start.open_fds) {
      found.push_back(cat("rank ", r, "'s open descriptors went from ", rec.start.open_fds, " to ",
                          rec.end.open_fds));
    }
    if (rec.end.segment_mappings > rec.start.segment_mappings ||
        rec.end.segment_mapped_bytes > rec.start.segment_mapped_bytes) {
      found.push_back(
          cat("rank ", r, "'s mapped tpfuse segments went from ", rec.start.segment_mappings, " (",
              format_bytes(rec.start.segment_mapped_bytes), ") to ", rec.end.segment_mappings, " (",
              format_bytes(rec.end.segment_mapped_bytes), ")"));
    }
  }
  if (!launch.reclaimed_segments.empty()) {
    found.push_back(cat("the job left ", launch.reclaimed_segments.size(),
                        " segment(s) in /dev/shm (the launcher removed them)"));
  }
  return found;
}

void print_report(const SoakOptions& o, const comm::LaunchResult& launch, SharedRecords& records) {
  const RankRecord& first = records[0];
  std::printf("warm-up: %lld calls in %.1f s\n", static_cast<long long>(first.warmup_calls),
              first.warmup_seconds);
  if (first.finished) {
    std::printf(
        "calls: %lld of %lld in %.1f s (%.2f ms per call)\n",
        static_cast<long long>(first.calls_done), static_cast<long long>(o.calls), first.seconds,
        first.calls_done > 0 ? first.seconds * 1e3 / static_cast<double>(first.calls_done) : 0.0);
  } else {
    std::printf("calls: %lld of %lld, then rank 0 stopped\n",
                static_cast<long long>(first.calls_done), static_cast<long long>(o.calls));
  }
  std::printf(
      "golden checks: %lld (warm-up included), max error %.3g (tolerance there %.3g), "
      "worst error / tolerance %.3g\n",
      static_cast<long long>(first.checks), first.max_abs_error, first.bound_at_max,
      first.worst_ratio);
  std::printf("\n%4s  %-40s  %-11s  %s\n", "rank", "resident memory: after warm-up -> end (growth)",
              "descriptors", "tpfuse segments mapped");
  for (int r = 0; r < o.ranks; ++r) {
    const RankRecord& rec = records[r];
    if (!rec.started || !rec.finished) {
      std::printf("%4d  not sampled (the rank stopped early)\n", r);
      continue;
    }
    const std::string rss =
        cat(format_bytes(rec.start.rss_bytes), " -> ", format_bytes(rec.end.rss_bytes), " (",
            format_bytes(rec.end.rss_bytes - rec.start.rss_bytes, true), ")");
    const std::string fds = cat(rec.start.open_fds, " -> ", rec.end.open_fds);
    std::printf("%4d  %-40s  %-11s  %lld (%s) -> %lld (%s)\n", r, rss.c_str(), fds.c_str(),
                static_cast<long long>(rec.start.segment_mappings),
                format_bytes(rec.start.segment_mapped_bytes).c_str(),
                static_cast<long long>(rec.end.segment_mappings),
                format_bytes(rec.end.segment_mapped_bytes).c_str());
  }
  std::printf(
      "\n/dev/shm tpfuse-* (host-wide, every job's): %lld entries, %s -> %lld entries, %s\n",
      static_cast<long long>(first.shm_start.entries), format_bytes(first.shm_start.bytes).c_str(),
      static_cast<long long>(first.shm_end.entries), format_bytes(first.shm_end.bytes).c_str());
  std::printf("segments the job created: %zu; left in /dev/shm when it ended: %zu\n",
              launch.segments.size(), launch.reclaimed_segments.size());
  std::printf(
      "limits: resident memory growth <= %s per rank; no growth of descriptors or mapped segments; "
      "nothing left in /dev/shm\n",
      format_bytes(o.max_rss_growth).c_str());
}

void write_json(const std::string& path, const SoakOptions& o, const comm::LaunchResult& launch,
                SharedRecords& records, const std::vector<std::string>& found) {
  std::ofstream out(path);
  if (!out) throw CLI::RuntimeError(cat("soak: cannot write ", path), 1);
  const RankRecord& first = records[0];
  out << "{\"calls\": " << o.calls << ", \"calls_done\": " << first.calls_done
      << ", \"ranks\": " << o.ranks << ", \"seed\": " << o.seed << ", \"max_m\": " << o.max_m
      << ", \"max_n\": " << o.max_n << ", \"max_k\": " << o.max_k
      << ", \"check_every\": " << o.check_every << ", \"primitive_cache\": " << o.primitive_cache
      << ", \"warmup_calls\": " << first.warmup_calls
      << ", \"warmup_seconds\": " << first.warmup_seconds << ", \"seconds\": " << first.seconds
      << ", \"golden_checks\": " << first.checks << ", \"max_abs_error\": " << first.max_abs_error
      << ", \"tolerance_at_max_error\": " << first.bound_at_max
      << ", \"worst_error_ratio\": " << first.worst_ratio
      << ", \"max_rss_growth_limit\": " << o.max_rss_growth
      << ", \"shm_entries_start\": " << first.shm_start.entries
      << ", \"shm_bytes_start\": " << first.shm_start.bytes
      << ", \"shm_entries_end\": " << first.shm_end.entries
      << ", \"shm_bytes_end\": " << first.shm_end.bytes
      << ", \"segments_created\": " << launch.segments.size()
      << ", \"segments_left\": " << launch.reclaimed_segments.size() << ",\n \"per_rank\": [\n";
  for (int r = 0; r < o.ranks; ++r) {
    const RankRecord& rec = records[r];
    out << "  {\"rank\": " << r
        << ", \"sampled\": " << (rec.started && rec.finished ? "true" : "false")
        << ", \"rss_start\": " << rec.start.rss_bytes << ", \"rss_end\": " << rec.end.rss_bytes
        << ", \"rss_growth\": " << rec.end.rss_bytes - rec.start.rss_bytes
        << ", \"fds_start\": " << rec.start.open_fds << ", \"fds_end\": " << rec.end.open_fds
        << ", \"segment_mappings_start\": " << rec.start.segment_mappings
        << ", \"segment_mappings_end\": " << rec.end.segment_mappings
        << ", \"segment_bytes_start\": " << rec.start.segment_mapped_bytes
        << ", \"segment_bytes_end\": " << rec.end.segment_mapped_bytes << "}"
        << (r + 1 < o.ranks ? "," : "") << "\n";
  }
  out << " ],\n \"failures\": [";
  for (std::size_t i = 0; i < found.size(); ++i) {
    std::string escaped;
    for (char c : found[i]) {
      if (c == '"' || c == '\\') escaped += '\\';
      escaped += c;
    }
    out << (i ? ", " : "") << "\"" << escaped << "\"";
  }
  out << "],\n \"ok\": " << (found.empty() ? "true" : "false") << "}\n";
}

void run_soak(const SoakOptions& o) {
  std::printf(
      "tpfuse soak: %lld calls on %d ranks, seed %llu; m <= %lld, n <= %lld, k <= %lld; "
      "golden check every %lld%s call\n",
      static_cast<long long>(o.calls), o.ranks, static_cast<unsigned long long>(o.seed),
      static_cast<long long>(o.max_m), static_cast<long long>(o.max_n),
      static_cast<long long>(o.max_k), static_cast<long long>(o.check_every),
      o.check_every == 1 ? "" : "th");
  if (o.primitive_cache >= 0) {
    std::printf("oneDNN primitive cache: %d primitives per rank (--primitive-cache)\n",
                o.primitive_cache);
  }
  SharedRecords records(o.ranks);
  comm::LaunchOptions launch_options;
  launch_options.ranks = o.ranks;
  const comm::LaunchResult launch = comm::launch_local(
      launch_options, [&](comm::RankContext& ctx) { return soak_rank(ctx, o, records[ctx.rank]); });
  print_report(o, launch, records);
  const std::vector<std::string> found = violations(o, launch, records);
  if (!o.json.empty()) write_json(o.json, o, launch, records, found);
  if (found.empty()) {
    std::printf("result: ok\n");
    return;
  }
  std::printf("result: FAILED\n");
  std::fflush(stdout);  // the report first, then main's message on stderr
  std::string message = "soak failed: ";
  for (std::size_t i = 0; i < found.size(); ++i) message += (i ? "; " : "") + found[i];
  throw CLI::RuntimeError(message, 1);
}

}  // namespace

void add_soak_command(CLI::App& app) {
  auto o = std::make_shared<SoakOptions>();
  auto* soak = app.add_subcommand(
      "soak",
      "Run many fused calls with random shapes, modes and comm_turn values; check them "
      "and watch memory, descriptors and shared memory for growth");
  soak->add_option("--calls", o->calls, "Calls after the warm-up")->check(CLI::Range(1, 1 << 30));
  soak->add_option("--ranks", o->ranks, "Local ranks (processes)")->check(CLI::Range(1, 256));
  soak->add_option("--seed", o->seed, "Seed of the calls and their inputs");
  soak->add_option("--check-every", o->check_every,
                   "Compare every this-many-th call with the golden model")
      ->check(CLI::Range(1, 1 << 30));
  soak->add_option(
          "--warmup", o->warmup,
          "Calls before the start sample: the largest of each mode first, then random ones")
      ->check(CLI::Range(0, 1 << 30));
  soak->add_option("--max-m", o->max_m, "Largest m drawn")->check(CLI::Range(1, 1 << 14));
  soak->add_option("--max-n", o->max_n, "Largest n drawn")->check(CLI::Range(1, 1 << 14));
  soak->add_option("--max-k", o->max_k, "Largest k per rank drawn")->check(CLI::Range(1, 1 << 14));
  soak->add_option("--max-rss-growth", o->max_rss_growth,
                   "Bytes a rank's resident memory may grow after the warm-up")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 40));
  // oneDNN keeps up to 1024 primitives (its default), tens of KiB each: a
  // bounded cache, but one that random shapes take thousands of calls to
  // fill, growing resident memory by tens of MiB meanwhile, which would hide
  // a leak. A small one still exercises its reuse and eviction.
  soak->add_option("--primitive-cache", o->primitive_cache,
                   "Capacity of oneDNN's primitive cache in each rank (-1: oneDNN's own setting)")
      ->check(CLI::Range(-1, 1 << 20));
  soak->add_option("--json", o->json, "Write the figures to this file");
  soak->callback([o] { run_soak(*o); });
}

}  // namespace tpfuse::cli
