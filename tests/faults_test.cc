// Fault injection. In each of many seeded trials a job of 2 to 4 local ranks
// sets up a communicator and runs a few fused calls, and one rank (the
// victim) is killed (SIGKILL) or frozen (SIGSTOP) at a random point: during
// the rendezvous, inside a GEMM tile, while it waits for peers, inside a
// round's reduce (the library's fault points, core/fault_hooks.h), or when a
// timer fires at a random moment. Every other rank must fail with an error
// that names the victim, within the deadline plus a margin; every call that
// returned must have returned the bytes of a fault-free run of the same
// trial; and afterwards nothing is left in /dev/shm and no rank is running.
//
// TPFUSE_FAULT_TRIALS (default 120; 40 under the sanitizers) and
// TPFUSE_FAULT_SEED (default 1) choose the trials; a failed trial prints the
// two values that replay it alone.
//
// Also here: the regression tests of what the trials found.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <new>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/fault_hooks.h"
#include "fault_report.h"
#include "ops/test_hooks.h"
#include "rank_harness.h"
#include "tpfuse/comm/launcher.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/testing/golden.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse {
namespace {

using namespace std::chrono_literals;
using test::comm_error_type;
using test::copy_text;
using test::leftover_segments;
using test::tpfuse_segments_in_dev_shm;
using test::names_rank;
using test::shared_page;
using test::steady_ns;
using test_hooks::FaultPoint;
using testing::CaseSpec;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr int kDefaultTrials = 40;
#else
constexpr int kDefaultTrials = 120;
#endif
constexpr auto kDeadline = 1000ms;
// How late after the deadline a survivor may report, for scheduling on a
// loaded 2-core machine (and the sanitizers' slower code).
constexpr auto kMargin = 1500ms;
constexpr int kMaxRanks = 4;
constexpr int kMaxCalls = 3;


std::int64_t env_or(const char* name, std::int64_t fallback) {
  const char* text = std::getenv(name);
  return text != nullptr && *text != '\0' ? std::strtoll(text, nullptr, 10) : fallback;
}

// Where a hook-triggered fault strikes: the points met while the trial's
// communicator is set up, then those met during the calls.
enum class Site : int { rendezvous_setup, rendezvous_wait, gemm, wait, reduce, count };
constexpr int kSites = static_cast<int>(Site::count);

const char* phase_name(int site) {
  switch (static_cast<Site>(site)) {
    case Site::rendezvous_setup:
    case Site::rendezvous_wait:
      return "rendezvous";
    case Site::gemm:
      return "gemm";
    case Site::wait:
      return "wait";
    case Site::reduce:
      return "reduce";
    case Site::count:
      break;
  }
  return "start";  // a timer that fired before the first point
}

// ---- what the ranks report, through memory shared with the test process ----

enum class Outcome : int { none = 0, completed, comm_error, other_error };
enum Stage : int { stage_idle, stage_rendezvous, stage_calls, stage_final };

// Written only by its rank; read by the test once every rank has ended.
struct RankReport {
  Outcome outcome;
  int calls_done;
  std::uint64_t hashes[kMaxCalls];  // of each completed call's output
  char error_type[24];
  std::uint64_t error_ranks;  // bit r: the error's ranks() holds r
  std::int64_t error_ns;      // steady clock when the error reached the rank's code
  int error_stage;
  char message[640];
  std::int64_t hits[kSites];  // passes through each site
  std::int64_t sequence_ns;   // start of the sequence to its final check
};

struct TrialPage {
  std::atomic<std::int64_t> fault_ns;  // steady clock when the fault struck; 0: it did not
  std::atomic<int> fault_site;         // the site; for a timer, the last one passed (-1: none)
  std::atomic<pid_t> victim_pid;
  std::atomic<int> finished;  // survivors done reporting
  RankReport ranks[kMaxRanks];
};

struct TrialConfig {
  std::uint64_t seed = 0;
  int ranks = 2;
  int calls = 2;
  CaseSpec spec;  // call c uses spec.seed + c
  const char* progress = "interleaved";
  comm::ShmOptions shm;
  int victim = -1;  // no fault when negative
  int signal = SIGKILL;
  bool timed = false;  // a timer fires at `delay` instead of a site's hit-th pass
  Site site = Site::gemm;
  std::int64_t hit = 1;
  std::chrono::microseconds delay{0};
};

// ---- inside a rank (globals: the fault hook is a plain function) ----

struct RankState {
  TrialPage* page = nullptr;
  const TrialConfig* config = nullptr;
  int rank = -1;
  std::atomic<int> stage{stage_idle};
  std::atomic<std::int64_t> hits[kSites] = {};
  std::atomic<int> last_site{-1};
  std::atomic<int> fault{0};  // 0 armed, 1 struck, 2 disarmed
};
RankState g_rank;

bool is_victim() { return g_rank.config->victim == g_rank.rank; }

// Strikes once: records when and where, then signals this whole process.
void strike(int site) {
  int armed = 0;
  if (!g_rank.fault.compare_exchange_strong(armed, 1)) return;
  g_rank.page->fault_site.store(site);
  g_rank.page->fault_ns.store(steady_ns());
  ::kill(::getpid(), g_rank.config->signal);
}

void on_fault_point(FaultPoint point) {
  const int stage = g_rank.stage.load(std::memory_order_relaxed);
  Site site;
  if (stage == stage_rendezvous) {
    site = point == FaultPoint::setup ? Site::rendezvous_setup : Site::rendezvous_wait;
  } else if (stage == stage_calls) {
    // Not met by mm_all_reduce_base; faults_family_test.cc strikes there.
    if (point == FaultPoint::setup || point == FaultPoint::gather) return;
    site = point == FaultPoint::gemm_block ? Site::gemm
           : point == FaultPoint::wait     ? Site::wait
                                           : Site::reduce;
  } else {
    return;  // the launcher's own setup, or the final check: not a trial's fault point
  }
  const int index = static_cast<int>(site);
  g_rank.last_site.store(index, std::memory_order_relaxed);
  const std::int64_t hit = g_rank.hits[index].fetch_add(1) + 1;
  const TrialConfig& config = *g_rank.config;
  if (is_victim() && !config.timed && config.site == site && config.hit == hit) strike(index);
}

// The victim's timer for a fault at a random moment; disarmed before the
// final check, which must not complete on the survivors.
class FaultTimer {
 public:
  explicit FaultTimer(std::chrono::microseconds delay)
      : thread_([this, at = std::chrono::steady_clock::now() + delay] {
          std::unique_lock lock(mutex_);
          if (wake_.wait_until(lock, at, [&] { return disarmed_; })) return;
          strike(g_rank.last_site.load());
        }) {}
  ~FaultTimer() { disarm(); }
  void disarm() {
    {
      const std::lock_guard lock(mutex_);
      disarmed_ = true;
    }
    wake_.notify_one();
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::mutex mutex_;
  std::condition_variable wake_;
  bool disarmed_ = false;
  std::thread thread_;
};

void report_error(RankReport& report, Outcome outcome, const char* type, const std::string& what,
                  const std::vector<int>& ranks) {
  report.error_ns = steady_ns();
  report.outcome = outcome;
  report.error_stage = g_rank.stage.load();
  copy_text(report.error_type, sizeof report.error_type, type);
  copy_text(report.message, sizeof report.message, what);
  for (int r : ranks) {
    if (r >= 0 && r < 64) report.error_ranks |= std::uint64_t{1} << r;
  }
}


// Checks a fault-free run's output against the golden model.
void check_golden(const CaseSpec& spec, int size, const Tensor& out) {
  std::vector<testing::RankInputs> all;
  std::vector<testing::RankArgs> args;
  for (int r = 0; r < size; ++r) all.push_back(testing::make_rank_inputs(spec, r));
  for (const auto& in : all) args.push_back(in.args);
  const auto cmp = testing::compare(out, testing::golden_mm_all_reduce(args));
  test::expect_rank(cmp.ok(), cmp.mismatches, " elements beyond the golden bound (worst |err| ",
                    cmp.max_abs_error, ")");
}

// The trial's sequence on one rank up to its final check: rendezvous, then
// the calls. Returns the trial's communicator.
std::shared_ptr<comm::Communicator> run_sequence(comm::RankContext& ctx, RankReport& report) {
  const TrialConfig& config = *g_rank.config;
  const bool reference = config.victim < 0;
  const auto start = std::chrono::steady_clock::now();
  g_rank.stage = stage_rendezvous;
  comm::FileStore store(std::getenv("TPFUSE_STORE_DIR"));
  comm::PrefixStore trial_store("trial.", store);
  const auto comm = comm::create_shm_communicator(trial_store, ctx.rank, ctx.size, config.shm);
  const std::string name = comm::register_communicator(comm);
  g_rank.stage = stage_calls;
  for (int c = 0; c < config.calls; ++c) {
    CaseSpec spec = config.spec;
    spec.seed = config.spec.seed + static_cast<std::uint64_t>(c);
    const auto inputs = testing::make_rank_inputs(spec, ctx.rank);
    const Tensor out =
        mm_all_reduce_base(inputs.args.x1, inputs.args.x2, name, inputs.args.options);
    report.hashes[c] = test::fnv1a(out.data(), out.nbytes());
    report.calls_done = c + 1;
    if (reference) check_golden(spec, ctx.size, out);
  }
  report.sequence_ns = (std::chrono::steady_clock::now() - start) / 1ns;
  return comm;
}

int rank_body(comm::RankContext& ctx, TrialPage& page, const TrialConfig& config) {
  g_rank.page = &page;
  g_rank.config = &config;
  g_rank.rank = ctx.rank;
  RankReport& report = page.ranks[ctx.rank];
  // A rank that hangs despite every wait's deadline dies here, which the
  // test reports, instead of holding up the whole suite.
  ::alarm(static_cast<unsigned>(10 * kDeadline / 1s + 10));
  ::setenv("TPFUSE_PIPELINE_PROGRESS", config.progress, 1);
  std::optional<FaultTimer> timer;
  if (is_victim()) {
    page.victim_pid = ::getpid();
    if (config.timed) timer.emplace(config.delay);
  }
  try {
    const auto comm = run_sequence(ctx, report);
    if (timer) timer->disarm();
    if (is_victim() && g_rank.fault.exchange(2) == 1) {
      // The timer struck just now: its signal is on its way; never reach the final check.
      for (;;) ::pause();
    }
    // Every rank got through: the victim never does when its fault struck.
    g_rank.stage = stage_final;
    comm->barrier();
    report.outcome = Outcome::completed;
  } catch (const CommError& error) {
    report_error(report, Outcome::comm_error, comm_error_type(error), error.what(), error.ranks());
  } catch (const std::exception& error) {
    report_error(report, Outcome::other_error, "other", error.what(), {});
  }
  for (int s = 0; s < kSites; ++s) report.hits[s] = g_rank.hits[s].load();
  // The last survivor to report kills a frozen victim, which nothing else would end.
  if (page.finished.fetch_add(1) + 1 == config.ranks - 1 && page.fault_ns.load() != 0 &&
      config.signal == SIGSTOP && page.victim_pid.load() > 0) {
    ::kill(page.victim_pid.load(), SIGKILL);
  }
  // Anything else fails the rank, so that the launcher ends the job (a frozen
  // victim too) after its grace, whatever went wrong.
  const bool expected = report.outcome == Outcome::completed ||
                        (report.outcome == Outcome::comm_error && page.fault_ns.load() != 0);
  return expected ? 0 : 1;
}

// ---- in the test process ----


using Reports = std::array<RankReport, kMaxRanks>;

comm::LaunchResult run_trial(const TrialConfig& config, TrialPage& page) {
  page.fault_site = -1;
  comm::LaunchOptions options;
  options.ranks = config.ranks;
  // The launcher's own group is not under test (the trial sets up its own):
  // a deadline that outlasts a loaded machine's stalls.
  options.shm.timeout = 10 * kDeadline;
  options.shm.slot_bytes = 4096;
  options.straggler_grace = kDeadline + kMargin + 2s;
  test_hooks::set_fault_hook(on_fault_point);
  auto result = comm::launch_local(
      options, [&](comm::RankContext& ctx) { return rank_body(ctx, page, config); });
  test_hooks::set_fault_hook(nullptr);
  return result;
}

TrialConfig draw_job(std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<std::uint64_t>(n)); };
  TrialConfig config;
  config.seed = seed;
  config.ranks = 2 + pick(3);
  config.calls = 2 + pick(2);
  CaseSpec& spec = config.spec;
  switch (pick(4)) {
    case 0:
      spec.dtype = DType::f16;
      break;
    case 1:
      spec.dtype = DType::bf16;
      break;
    case 2:
      spec.mode = Mode::weight_quant;
      spec.scale_kind = ScaleKind::per_channel;
      break;
    default:
      spec.mode = Mode::full_quant;
      spec.scale_kind = ScaleKind::per_channel;
      break;
  }
  const std::int64_t ms[] = {8, 24, 40, 64};
  const std::int64_t ns[] = {16, 32, 48};
  const std::int64_t turns[] = {0, 2, 3, 4, 6};
  spec.m = ms[pick(4)];
  spec.n = ns[pick(3)];
  spec.k = 32 * (1 + pick(2));
  spec.uneven_k = pick(2) == 1;
  spec.bias = pick(2) == 1;
  spec.comm_turn = turns[pick(5)];
  spec.seed = seed * 8 + 1;
  config.progress = pick(2) == 1 ? "helper_thread" : "interleaved";
  config.shm.timeout = kDeadline;
  config.shm.slot_bytes = pick(2) == 1 ? 4096 : 65536;
  const comm::ShmAlgorithm algorithms[] = {comm::ShmAlgorithm::automatic,
                                           comm::ShmAlgorithm::one_shot,
                                           comm::ShmAlgorithm::reduce_scatter};
  config.shm.algorithm = algorithms[pick(3)];
  return config;
}

// Picks the fault: 40% freezes; a phase, then a rank and pass through one of
// its sites that the fault-free run met; or (one in five) a timer within the
// victim's fault-free sequence.
void draw_fault(TrialConfig& config, const Reports& reference, std::mt19937_64& rng) {
  auto pick = [&](std::int64_t n) {
    return static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(n));
  };
  config.signal = pick(5) < 2 ? SIGSTOP : SIGKILL;
  const std::int64_t phase = pick(5);
  std::vector<std::pair<int, Site>> choices;
  for (int r = 0; r < config.ranks; ++r) {
    for (int s = 0; s < kSites; ++s) {
      const bool in_phase = phase == 0 ? s <= static_cast<int>(Site::rendezvous_wait)
                                       : s == static_cast<int>(Site::gemm) + phase - 1;
      if (in_phase && reference[r].hits[s] > 0) choices.emplace_back(r, static_cast<Site>(s));
    }
  }
  if (phase == 4 || choices.empty()) {
    config.victim = static_cast<int>(pick(config.ranks));
    config.timed = true;
    const std::int64_t span_us =
        std::max<std::int64_t>(1, reference[config.victim].sequence_ns / 1000);
    config.delay = std::chrono::microseconds(pick(span_us));
    return;
  }
  const auto [victim, site] =
      choices[static_cast<std::size_t>(pick(static_cast<std::int64_t>(choices.size())))];
  config.victim = victim;
  config.site = site;
  config.hit = 1 + pick(reference[victim].hits[static_cast<int>(site)]);
}

std::string describe(const TrialConfig& c) {
  const CaseSpec& s = c.spec;
  std::string fault =
      c.victim < 0
          ? "none"
          : cat(c.signal == SIGKILL ? "SIGKILL" : "SIGSTOP", " rank ", c.victim, " ",
                c.timed ? cat("after ", c.delay.count(), " us")
                        : cat("at pass ", c.hit, " of ", phase_name(static_cast<int>(c.site)),
                              c.site == Site::rendezvous_setup ? " (setup)" : ""));
  return cat("seed ", c.seed, ": ", c.ranks, " ranks, ", c.calls, " calls of ", mode_name(s.mode),
             " ", dtype_name(s.dtype), " m=", s.m, " n=", s.n, " k=", s.k,
             s.uneven_k ? "+rank" : "", " comm_turn=", s.comm_turn, ", ", c.progress, ", slots of ",
             c.shm.slot_bytes, " B, algorithm ", static_cast<int>(c.shm.algorithm),
             "; fault: ", fault);
}

// Children of this process still there (running, stopped or unreaped).
std::vector<pid_t> children_of_this_process() {
  std::vector<pid_t> children;
  const std::string me = std::to_string(::getpid());
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", error)) {
    const std::string pid = entry.path().filename().string();
    if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(entry.path() / "stat");
    std::string text;
    std::getline(stat, text);
    const auto close = text.rfind(')');
    if (close == std::string::npos) continue;
    char state = 0;
    long ppid = 0;
    if (std::sscanf(text.c_str() + close + 1, " %c %ld", &state, &ppid) == 2 &&
        std::to_string(ppid) == me) {
      children.push_back(static_cast<pid_t>(std::stol(pid)));
    }
  }
  return children;
}

struct TrialVerdict {
  bool struck = false;
  std::string phase;          // where the fault struck
  std::int64_t worst_ns = 0;  // the latest survivor's report, after the fault
  std::vector<std::string> problems;
};

TrialVerdict judge(const TrialConfig& config, const Reports& reference, const TrialPage& page,
                   const comm::LaunchResult& result) {
  TrialVerdict verdict;
  auto problem = [&](auto&&... parts) { verdict.problems.push_back(cat(parts...)); };
  verdict.struck = page.fault_ns.load() != 0;
  const int site = page.fault_site.load();
  verdict.phase = config.timed ? cat("timer/", phase_name(site)) : phase_name(site);
  // A timer may strike before the victim put its pid in the store, when
  // setup cannot know it died: a TimeoutError then.
  const bool pid_maybe_unknown = config.timed && site < static_cast<int>(Site::gemm);
  if (result.ranks.size() != static_cast<std::size_t>(config.ranks)) {
    problem("the launcher reports ", result.ranks.size(), " ranks");
    return verdict;
  }
  for (int r = 0; r < config.ranks; ++r) {
    const comm::RankExit& exit = result.ranks[static_cast<std::size_t>(r)];
    const RankReport& report = page.ranks[r];
    if (verdict.struck && r == config.victim) {
      if (exit.signal != SIGKILL)
        problem("victim ", r, " ended with ", result.describe_failures(), " instead of SIGKILL");
      continue;
    }
    if (!exit.ok())
      problem("rank ", r, " did not end cleanly (", result.describe_failures(),
              exit.signal == SIGALRM ? ": it hung" : "", ")");
    for (int c = 0; c < report.calls_done; ++c) {
      if (report.hashes[c] != reference[r].hashes[c])
        problem("rank ", r, " returned a wrong result from call ", c);
    }
    if (!verdict.struck) {
      if (report.outcome != Outcome::completed || report.calls_done != config.calls) {
        problem("rank ", r, " did not complete a run whose fault never struck: ", report.error_type,
                " ", report.message);
      }
      continue;
    }
    if (report.outcome != Outcome::comm_error) {
      problem("rank ", r,
              report.outcome == Outcome::completed
                  ? " completed as if nothing happened"
                  : cat(" failed with a non-communication error: ", report.message));
      continue;
    }
    const std::string type = report.error_type;
    const bool type_ok =
        config.signal == SIGSTOP
            ? type == "TimeoutError"
            : type == "PeerLostError" || (pid_maybe_unknown && type == "TimeoutError");
    if (!type_ok) problem("rank ", r, " got ", type, ": ", report.message);
    if (report.error_ranks != std::uint64_t{1} << config.victim ||
        !names_rank(report.message, config.victim)) {
      problem("rank ", r, "'s error does not name rank ", config.victim, " alone (ranks() mask ",
              report.error_ranks, "): ", report.message);
    }
    const std::int64_t after = report.error_ns - page.fault_ns.load();
    verdict.worst_ns = std::max(verdict.worst_ns, after);
    if (after < 0) problem("rank ", r, " failed before the fault: ", report.message);
    if (after > (kDeadline + kMargin) / 1ns)
      problem("rank ", r, " failed ", after / 1000000, " ms after the fault: ", report.message);
  }
  if (!test::segments_gone(result)) problem("a segment of the job is still in /dev/shm");
  return verdict;
}

struct PhaseTally {
  int kills = 0, kills_survived = 0, freezes = 0, freezes_survived = 0;
};

TEST(FaultInjection, SurvivorsFailCleanlyWhereverARankDiesOrFreezes) {
  const int trials = static_cast<int>(env_or("TPFUSE_FAULT_TRIALS", kDefaultTrials));
  const auto base_seed = static_cast<std::uint64_t>(env_or("TPFUSE_FAULT_SEED", 1));
  const std::set<std::string> segments_before = tpfuse_segments_in_dev_shm();
  std::set<std::string> suspects;
  std::map<std::string, PhaseTally> tally;
  int struck = 0, missed = 0, failed = 0;
  std::int64_t worst_kill_ns = 0, worst_freeze_ns = 0, slowest_reference_ns = 0;
  const auto start = std::chrono::steady_clock::now();
  for (std::uint64_t seed = base_seed;
       struck < trials && seed < base_seed + 2 * static_cast<std::uint64_t>(trials); ++seed) {
    TrialConfig config = draw_job(seed);
    TrialPage& reference_page = shared_page<TrialPage>();
    // Fault-free, so its deadline only has to outlast a loaded machine's stalls.
    TrialConfig reference_config = config;
    reference_config.shm.timeout = 10 * kDeadline;
    const auto reference_result = run_trial(reference_config, reference_page);
    Reports reference;
    std::copy_n(reference_page.ranks, kMaxRanks, reference.begin());
    ASSERT_TRUE(reference_result.ok())
        << describe(config)
        << ": the fault-free run failed: " << reference_result.describe_failures()
        << ": rank 0: " << reference[0].error_type << " " << reference[0].message;
    for (int r = 0; r < config.ranks; ++r) {
      ASSERT_EQ(reference[r].outcome, Outcome::completed)
          << describe(config) << ": " << reference[r].message;
    }
    for (int r = 0; r < config.ranks; ++r) {
      slowest_reference_ns = std::max(slowest_reference_ns, reference[r].sequence_ns);
    }
    std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
    draw_fault(config, reference, rng);
    TrialPage& page = shared_page<TrialPage>();
    const auto result = run_trial(config, page);
    TrialVerdict verdict = judge(config, reference, page, result);
    for (pid_t child : children_of_this_process()) {
      verdict.problems.push_back(cat("process ", child, " is still a child of the test"));
      ::kill(child, SIGKILL);
      ::waitpid(child, nullptr, 0);
    }
    for (const std::string& name : tpfuse_segments_in_dev_shm()) {
      if (!segments_before.contains(name)) suspects.insert(name);
    }
    if (!verdict.struck) {
      ++missed;
    } else {
      ++struck;
      PhaseTally& t = tally[verdict.phase];
      const bool ok = verdict.problems.empty();
      if (config.signal == SIGKILL) {
        ++t.kills;
        t.kills_survived += ok;
        worst_kill_ns = std::max(worst_kill_ns, verdict.worst_ns);
      } else {
        ++t.freezes;
        t.freezes_survived += ok;
        worst_freeze_ns = std::max(worst_freeze_ns, verdict.worst_ns);
      }
    }
    if (!verdict.problems.empty()) {
      ++failed;
      std::string text;
      for (const auto& p : verdict.problems) text += "\n  " + p;
      ADD_FAILURE() << describe(config) << " (replay: TPFUSE_FAULT_SEED=" << seed
                    << " TPFUSE_FAULT_TRIALS=1)" << text;
    }
  }
  for (const std::string& name : leftover_segments(segments_before, suspects)) {
    ADD_FAILURE() << "/dev/shm/" << name << " was left behind";
  }

  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "fault injection: %d faults struck (%d runs where the drawn fault never came), %d trials "
      "failed, %.1f s, deadline %lld ms\n",
      struck, missed, failed, seconds, static_cast<long long>(kDeadline.count()));
  std::printf("  %-18s %14s %16s\n", "phase", "kills survived", "freezes survived");
  for (const auto& [phase, t] : tally) {
    std::printf("  %-18s %7d of %-4d %9d of %-4d\n", phase.c_str(), t.kills_survived, t.kills,
                t.freezes_survived, t.freezes);
  }
  std::printf(
      "  latest survivor error after the fault: %.0f ms for a kill, %.0f ms for a freeze; slowest "
      "fault-free sequence %.0f ms\n",
      static_cast<double>(worst_kill_ns) / 1e6, static_cast<double>(worst_freeze_ns) / 1e6,
      static_cast<double>(slowest_reference_ns) / 1e6);
  EXPECT_GE(struck, trials) << "too few drawn faults struck";
}

// What the trials found. Rank 0 killed after creating its segment and before
// publishing the name left the segment in /dev/shm for good, since no one
// knew its name; and rank 1 waited the whole deadline (5 minutes by default)
// to report a TimeoutError. The name is now in the store before the segment
// exists, and the launcher unlinks it; rank 1 finds rank 0's pid gone.
TEST(FaultRegression, RankZeroKilledBeforePublishingItsSegmentLeavesNothing) {
  TrialConfig config = draw_job(7);
  config.ranks = 2;
  config.victim = 0;
  config.signal = SIGKILL;
  config.site = Site::rendezvous_setup;
  config.hit = 1;  // rank 0's first setup point: the segment exists, its name is not published
  const std::set<std::string> segments_before = tpfuse_segments_in_dev_shm();
  TrialPage& page = shared_page<TrialPage>();
  const auto result = run_trial(config, page);
  const TrialVerdict verdict = judge(config, Reports{}, page, result);
  EXPECT_TRUE(verdict.struck);
  for (const auto& problem : verdict.problems) ADD_FAILURE() << problem;
  EXPECT_EQ(std::string(page.ranks[1].error_type), "PeerLostError") << page.ranks[1].message;
  EXPECT_LT(page.ranks[1].error_ns - page.fault_ns.load(), kDeadline / 2 / 1ns)
      << "rank 1 waited for the deadline: " << page.ranks[1].message;
  // The launcher's own group and the trial's; the trial's was still linked.
  EXPECT_EQ(result.segments.size(), 2u);
  EXPECT_EQ(result.reclaimed_segments.size(), 1u);
  EXPECT_TRUE(test::segments_gone(result));
  for (const std::string& name : leftover_segments(segments_before)) {
    ADD_FAILURE() << "/dev/shm/" << name << " was left behind";
  }
}

// Rank 0 is held in setup (before it publishes the segment's name) while
// rank 1, waiting for that name, is killed: rank 0 then waits for rank 1 to
// attach, and must report it lost at once, not time out at the deadline.
void hold_rank_0_and_kill_rank_1(FaultPoint point) {
  if (g_rank.rank == 0 && point == FaultPoint::setup) std::this_thread::sleep_for(200ms);
  if (g_rank.rank == 1 && point == FaultPoint::wait) {
    g_rank.page->fault_ns = steady_ns();
    ::raise(SIGKILL);
  }
}

TEST(FaultRegression, RankKilledBeforeAttachingIsReportedLostAtOnce) {
  TrialPage& page = shared_page<TrialPage>();
  test_hooks::set_fault_hook(hold_rank_0_and_kill_rank_1);
  const auto result = test::run_ranks(2, [&](comm::RankContext& ctx) {
    g_rank.page = &page;
    g_rank.rank = ctx.rank;
    comm::FileStore store(std::getenv("TPFUSE_STORE_DIR"));
    comm::PrefixStore second_group("second.", store);
    comm::ShmOptions options;
    options.timeout = 20s;
    try {
      comm::create_shm_communicator(second_group, ctx.rank, ctx.size, options);
    } catch (const CommError& error) {
      report_error(page.ranks[ctx.rank], Outcome::comm_error, comm_error_type(error), error.what(),
                   error.ranks());
    }
    return 0;
  });
  test_hooks::set_fault_hook(nullptr);
  ASSERT_EQ(result.ranks.size(), 2u);
  EXPECT_EQ(result.ranks[1].signal, SIGKILL);
  EXPECT_TRUE(result.ranks[0].ok()) << result.describe_failures();
  const RankReport& rank0 = page.ranks[0];
  EXPECT_EQ(std::string(rank0.error_type), "PeerLostError") << rank0.message;
  EXPECT_EQ(rank0.error_ranks, 2u) << rank0.message;
  EXPECT_TRUE(names_rank(rank0.message, 1)) << rank0.message;
  EXPECT_LT(rank0.error_ns - page.fault_ns.load(), (1s / 1ns)) << "not at once: " << rank0.message;
  EXPECT_TRUE(test::segments_gone(result));
}

// Rank 2 freezes before attaching, and rank 1 starts waiting for rank 0 to
// finish setup before rank 0 starts waiting for the ranks to attach (rank 0
// is held there). Rank 1's deadline used to come first, and it blamed rank 0
// for the timeout; it now waits for rank 0's verdict, which names rank 2.
void freeze_rank_2_before_attaching(FaultPoint point) {
  static int rank_0_setup_passes = 0;
  if (g_rank.rank == 0 && point == FaultPoint::setup) {
    // First pass: before publishing the name (rank 2 then waits for it);
    // second: attached, before waiting for the others (rank 1 is waiting already).
    std::this_thread::sleep_for(++rank_0_setup_passes == 1 ? 100ms : 300ms);
  }
  if (g_rank.rank == 2 && point == FaultPoint::wait) {
    g_rank.page->victim_pid = ::getpid();
    g_rank.page->fault_ns = steady_ns();
    ::raise(SIGSTOP);
  }
}

TEST(FaultRegression, RankFrozenBeforeAttachingIsNamedNotRankZero) {
  TrialPage& page = shared_page<TrialPage>();
  test_hooks::set_fault_hook(freeze_rank_2_before_attaching);
  const auto result = test::run_ranks(3, [&](comm::RankContext& ctx) {
    g_rank.page = &page;
    g_rank.rank = ctx.rank;
    comm::FileStore store(std::getenv("TPFUSE_STORE_DIR"));
    comm::PrefixStore second_group("second.", store);
    comm::ShmOptions options;
    options.timeout = kDeadline;
    try {
      comm::create_shm_communicator(second_group, ctx.rank, ctx.size, options);
    } catch (const CommError& error) {
      report_error(page.ranks[ctx.rank], Outcome::comm_error, comm_error_type(error), error.what(),
                   error.ranks());
    }
    if (page.finished.fetch_add(1) + 1 == 2 && page.victim_pid.load() > 0) {
      ::kill(page.victim_pid.load(), SIGKILL);
    }
    return 0;
  });
  test_hooks::set_fault_hook(nullptr);
  ASSERT_EQ(result.ranks.size(), 3u);
  EXPECT_EQ(result.ranks[2].signal, SIGKILL);
  for (int r = 0; r < 2; ++r) {
    const RankReport& report = page.ranks[r];
    EXPECT_TRUE(result.ranks[static_cast<std::size_t>(r)].ok()) << result.describe_failures();
    EXPECT_EQ(std::string(report.error_type), "TimeoutError") << report.message;
    EXPECT_EQ(report.error_ranks, 4u) << "rank " << r << " blames others: " << report.message;
    EXPECT_TRUE(names_rank(report.message, 2)) << report.message;
  }
  EXPECT_TRUE(test::segments_gone(result));
}


}  // namespace
}  // namespace tpfuse
