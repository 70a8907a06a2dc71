// Fault injection on each operator's call: mm_all_reduce_base, the
// all-gather, the reduce-scatter and add-RMSNorm (several tiles, and one tile:
// its one round). Each trial's ranks make a fault-free call, then the same
// call again, during which one rank (the victim) is killed (SIGKILL), frozen
// (SIGSTOP) or throws at one point:
//
//   before_call  before it calls (a throw there ends its process, as it would
//                a program's)
//   agreement    in the call's first round (reduce point 1 of the call)
//   gemm_block   before a block of its GEMM (the second; the first of one tile)
//   after_tile   after tile 1's GEMM (tile 0 of one tile)
//   collective   in a tile's collective: the first tile's reduce (point 2; for
//                one tile, its one round) or the all-gather's first piece
//
// Every other rank must fail with an error that names the victim alone, within
// the deadline plus a margin: PeerLostError for a kill, TimeoutError for a
// freeze, and for a throw inside the call an AbortedError with its reason (a
// rank that fails aborts the communicator; the victim then goes on, alive,
// so only that abort tells its peers). A survivor whose call returned must
// have the fault-free call's bytes, and fail at the next collective; nothing
// is left in /dev/shm. The victim of a throw gets its own error back.
//
// Each operator meets each point once, with the three faults in turn over the
// operators and points, and both progress modes: 20 trials of about 0.1 s (a
// kill or a throw) and 5 of the deadline (a freeze).
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/fault_hooks.h"
#include "family_cases.h"
#include "fault_report.h"
#include "ops/test_hooks.h"
#include "rank_harness.h"
#include "tpfuse/comm/launcher.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"

namespace tpfuse {
namespace {

using namespace std::chrono_literals;
using test::FamilyCase;
using test::FamilyOp;
using test::steady_ns;
using test_hooks::FaultPoint;

constexpr auto kDeadline = 1000ms;
// How late after the deadline a survivor may report, for scheduling on a
// loaded 2-core machine (and the sanitizers' slower code).
constexpr auto kMargin = 1500ms;
constexpr int kMaxRanks = 3;
// ThreadSanitizer holds a process that ends for a second (atexit_sleep_ms),
// as long as the deadline: the peers of a victim whose process ends (a throw
// before the call) may time out on it before they find it gone.
#if defined(__SANITIZE_THREAD__)
constexpr bool kEndingTakesTheDeadline = true;
#else
constexpr bool kEndingTakesTheDeadline = false;
#endif

enum class Point { before_call, agreement, gemm_block, after_tile, collective };
enum class Action { kill, freeze, raise };
constexpr Point kPoints[] = {Point::before_call, Point::agreement, Point::gemm_block,
                             Point::after_tile, Point::collective};

const char* point_name(Point point) {
  switch (point) {
    case Point::before_call:
      return "before_call";
    case Point::agreement:
      return "agreement";
    case Point::gemm_block:
      return "gemm_block";
    case Point::after_tile:
      return "after_tile";
    case Point::collective:
      break;
  }
  return "collective";
}

const char* action_name(Action action) {
  switch (action) {
    case Action::kill:
      return "kill";
    case Action::freeze:
      return "freeze";
    case Action::raise:
      break;
  }
  return "throw";
}

struct OpCase {
  const char* label;
  FamilyCase call;
  int ranks;
};

// Small shapes whose tiles cross the blocks (all-gather) and shards
// (reduce-scatter) they read and write.
const OpCase kOps[] = {
    {"mm_all_reduce_base",
     {.op = FamilyOp::mm_all_reduce_base, .m = 48, .k = 32, .n = 32, .comm_turn = 3, .seed = 11},
     2},
    {"all_gather",
     {.op = FamilyOp::all_gather_base_mm,
      .dtype = DType::f16,
      .m = 16,
      .k = 32,
      .n = 24,
      .bias = true,
      .comm_turn = 4,
      .seed = 12},
     3},
    {"reduce_scatter",
     {.op = FamilyOp::mm_reduce_scatter_base,
      .m = 48,
      .k = 32,
      .n = 24,
      .comm_turn = 4,
      .seed = 13},
     3},
    {"add_rms_norm",
     {.op = FamilyOp::add_rms_norm,
      .m = 48,
      .k = 32,
      .n = 32,
      .batch = 2,
      .comm_turn = 3,
      .seed = 14},
     2},
    {"add_rms_norm_one_tile",
     {.op = FamilyOp::add_rms_norm,
      .dtype = DType::f16,
      .m = 4,
      .k = 32,
      .n = 64,
      .batch = 4,
      .comm_turn = 1,
      .seed = 15},
     3},
};

struct Trial {
  const OpCase* op;
  Point point;
  Action action;
  const char* progress;
  int victim;
};

// Each operator meets every point once. A freeze costs the deadline, so
// there is one for each operator and each point (the diagonal); the other
// trials kill or throw in turn. The progress mode turns too, so that every
// point meets both modes and every fault (but the one-tile call, which runs
// on its caller's thread either way).
std::vector<Trial> all_trials() {
  std::vector<Trial> trials;
  int c = 0;
  for (const OpCase& op : kOps) {
    int p = 0;
    for (Point point : kPoints) {
      const Action action = p == c             ? Action::freeze
                            : (c + p) % 2 == 1 ? Action::raise
                                               : Action::kill;
      const char* progress = (c + (p + 1) / 2) % 2 == 1 ? "helper_thread" : "interleaved";
      trials.push_back({&op, point, action, progress, (c + p) % op.ranks});
      ++p;
    }
    ++c;
  }
  return trials;
}

// Where the victim strikes: the fault point and its pass in the call, or
// (kind none) a place of the test's own.
struct Strike {
  std::optional<FaultPoint> kind;
  std::int64_t hit = 1;
};

Strike strike_for(const Trial& trial) {
  const bool one_tile = trial.op->call.comm_turn == 1;
  switch (trial.point) {
    case Point::agreement:
      return {FaultPoint::reduce, 1};
    case Point::gemm_block:
      return {FaultPoint::gemm_block, one_tile ? 1 : 2};
    case Point::collective:
      if (trial.op->call.op == FamilyOp::all_gather_base_mm) return {FaultPoint::gather, 1};
      return {FaultPoint::reduce, one_tile ? 1 : 2};
    case Point::before_call:
    case Point::after_tile:
      break;
  }
  return {};
}

// ---- what the ranks report, through memory shared with the test process ----

enum class Outcome : int { none = 0, completed, comm_error, other_error };
enum Stage : int { stage_idle, stage_first_call, stage_faulted_call, stage_final };

struct RankReport {
  Outcome outcome;
  int calls_done;
  std::uint64_t hashes[2];  // of each completed call's outputs
  char error_type[24];
  std::uint64_t error_ranks;  // bit r: the error's ranks() holds r
  std::int64_t error_ns;
  char message[640];
};

struct TrialPage {
  std::atomic<std::int64_t> fault_ns;  // when the fault struck; 0: it did not
  std::atomic<pid_t> victim_pid;
  std::atomic<int> finished;  // survivors done reporting
  RankReport ranks[kMaxRanks];
};

// ---- inside a rank (globals: the fault hook is a plain function) ----

struct RankState {
  TrialPage* page = nullptr;
  const Trial* trial = nullptr;
  Strike strike;
  int rank = -1;
  std::atomic<int> stage{stage_idle};
  std::atomic<std::int64_t> hits[8] = {};  // passes through each FaultPoint in the call
  std::atomic<bool> struck{false};
};
RankState g_rank;

bool is_victim() { return g_rank.trial->victim == g_rank.rank; }

// Strikes once: records when, then kills, freezes or throws.
void strike() {
  if (g_rank.struck.exchange(true)) return;
  g_rank.page->fault_ns.store(steady_ns());
  switch (g_rank.trial->action) {
    case Action::kill:
      ::kill(::getpid(), SIGKILL);
      break;
    case Action::freeze:
      ::kill(::getpid(), SIGSTOP);
      break;
    case Action::raise:
      throw std::runtime_error(cat("injected fault at ", point_name(g_rank.trial->point)));
  }
}

void on_fault_point(FaultPoint point) {
  if (g_rank.stage.load() != stage_faulted_call) return;
  const std::int64_t hit = g_rank.hits[static_cast<int>(point)].fetch_add(1) + 1;
  if (is_victim() && g_rank.strike.kind == point && g_rank.strike.hit == hit) strike();
}

void on_tile_computed(std::int64_t tile) {
  const std::int64_t target = g_rank.trial->op->call.comm_turn == 1 ? 0 : 1;
  if (g_rank.stage.load() == stage_faulted_call && g_rank.trial->point == Point::after_tile &&
      tile == target) {
    strike();
  }
}

void report_error(RankReport& report, Outcome outcome, const char* type, const std::string& what,
                  const std::vector<int>& ranks) {
  report.error_ns = steady_ns();
  report.outcome = outcome;
  test::copy_text(report.error_type, sizeof report.error_type, type);
  test::copy_text(report.message, sizeof report.message, what);
  for (int r : ranks) report.error_ranks |= std::uint64_t{1} << r;
}

// The first call, the faulted one (the same inputs), and a barrier that a
// survivor whose call completed fails at.
void run_calls(comm::RankContext& ctx, RankReport& report) {
  const Trial& trial = *g_rank.trial;
  comm::FileStore store(std::getenv("TPFUSE_STORE_DIR"));
  comm::PrefixStore trial_store("trial.", store);
  comm::ShmOptions options;
  options.timeout = kDeadline;
  options.slot_bytes = 4096;
  const auto comm = comm::create_shm_communicator(trial_store, ctx.rank, ctx.size, options);
  const std::string name = comm::register_communicator(comm);
  const FamilyCase& call = trial.op->call;
  const test::FamilyInputs inputs = test::family_inputs(call, ctx.rank);
  for (int c = 0; c < 2; ++c) {
    g_rank.stage = c == 0 ? stage_first_call : stage_faulted_call;
    if (c == 1 && is_victim() && trial.point == Point::before_call) strike();
    const auto bytes = test::bytes_of(test::run_family_case(call, inputs, name, ctx.size));
    report.hashes[c] = test::fnv1a(bytes.data(), bytes.size());
    report.calls_done = c + 1;
  }
  g_rank.stage = stage_final;
  comm->barrier();
  report.outcome = Outcome::completed;
}

int rank_body(comm::RankContext& ctx, TrialPage& page, const Trial& trial) {
  g_rank.page = &page;
  g_rank.trial = &trial;
  g_rank.strike = strike_for(trial);
  g_rank.rank = ctx.rank;
  RankReport& report = page.ranks[ctx.rank];
  // A rank that hangs despite every wait's deadline dies here, which the
  // test reports, instead of holding up the whole suite.
  ::alarm(static_cast<unsigned>(10 * kDeadline / 1s + 10));
  ::setenv("TPFUSE_PIPELINE_PROGRESS", trial.progress, 1);
  if (is_victim()) {
    page.victim_pid = ::getpid();
    test_hooks::set_after_tile_computed(on_tile_computed);
  }
  try {
    run_calls(ctx, report);
  } catch (const CommError& error) {
    report_error(report, Outcome::comm_error, test::comm_error_type(error), error.what(),
                 error.ranks());
  } catch (const std::exception& error) {
    report_error(report, Outcome::other_error, "other", error.what(), {});
    if (is_victim() && trial.point == Point::before_call) throw;
  }
  if (is_victim()) {
    // A victim that threw goes on with other work, its process alive, until
    // the survivors have reported.
    const auto until = std::chrono::steady_clock::now() + kDeadline + kMargin + 1s;
    while (page.finished.load() < ctx.size - 1 && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(5ms);
    }
    return report.outcome == Outcome::other_error ? 0 : 1;
  }
  // The last survivor to report kills a frozen victim, which nothing else would end.
  if (page.finished.fetch_add(1) + 1 == ctx.size - 1 && trial.action == Action::freeze &&
      page.fault_ns.load() != 0) {
    ::kill(page.victim_pid.load(), SIGKILL);
  }
  return report.outcome == Outcome::comm_error ? 0 : 1;
}

// ---- in the test process ----

std::string trial_name(const Trial& trial) {
  return cat(trial.op->label, "_", action_name(trial.action), "_", point_name(trial.point));
}

// What the survivors of `trial` must report.
const char* expected_error(const Trial& trial) {
  switch (trial.action) {
    case Action::freeze:
      return "TimeoutError";
    case Action::kill:
      return "PeerLostError";
    case Action::raise:
      break;
  }
  // Before the call the library never sees the error: the victim's process ends.
  return trial.point == Point::before_call ? "PeerLostError" : "AbortedError";
}

class FamilyFaults : public ::testing::TestWithParam<Trial> {};

TEST_P(FamilyFaults, SurvivorsNameTheVictimWithinTheDeadline) {
  const Trial& trial = GetParam();
  const std::set<std::string> segments_before = test::tpfuse_segments_in_dev_shm();
  TrialPage& page = test::shared_page<TrialPage>();
  comm::LaunchOptions options;
  options.ranks = trial.op->ranks;
  // The launcher's own group is not under test: a deadline that outlasts a
  // loaded machine's stalls.
  options.shm.timeout = 10 * kDeadline;
  options.shm.slot_bytes = 4096;
  options.straggler_grace = kDeadline + kMargin + 2s;
  test_hooks::set_fault_hook(on_fault_point);
  const auto start = std::chrono::steady_clock::now();
  const auto result = comm::launch_local(
      options, [&](comm::RankContext& ctx) { return rank_body(ctx, page, trial); });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  test_hooks::set_fault_hook(nullptr);
  ASSERT_EQ(result.ranks.size(), static_cast<std::size_t>(trial.op->ranks));
  ASSERT_NE(page.fault_ns.load(), 0) << "the fault never struck: " << result.describe_failures();

  const std::string expected = expected_error(trial);
  std::int64_t latest_ns = 0;
  for (int r = 0; r < trial.op->ranks; ++r) {
    SCOPED_TRACE(cat("rank ", r));
    const comm::RankExit& exit = result.ranks[static_cast<std::size_t>(r)];
    const RankReport& report = page.ranks[r];
    EXPECT_GE(report.calls_done, 1) << "the fault-free call failed: " << report.message;
    if (report.calls_done == 2) {
      EXPECT_EQ(report.hashes[1], report.hashes[0]) << "the faulted call returned other bytes";
    }
    if (r == trial.victim) {
      if (trial.action == Action::raise) {
        EXPECT_EQ(exit.ok(), trial.point != Point::before_call) << result.describe_failures();
        EXPECT_NE(std::string(report.message).find("injected fault"), std::string::npos)
            << "the victim got " << report.error_type << ": " << report.message;
      } else {
        EXPECT_EQ(exit.signal, SIGKILL) << result.describe_failures();
      }
      continue;
    }
    EXPECT_TRUE(exit.ok()) << result.describe_failures()
                           << (exit.signal == SIGALRM ? ": it hung" : "");
    EXPECT_EQ(report.outcome, Outcome::comm_error) << "it completed as if nothing happened";
    const bool ending_slowly = kEndingTakesTheDeadline && trial.action == Action::raise &&
                               trial.point == Point::before_call;
    if (!ending_slowly || std::string(report.error_type) != "TimeoutError") {
      EXPECT_EQ(std::string(report.error_type), expected) << report.message;
    }
    EXPECT_EQ(report.error_ranks, std::uint64_t{1} << trial.victim)
        << "its error does not name rank " << trial.victim << " alone: " << report.message;
    EXPECT_TRUE(test::names_rank(report.message, trial.victim)) << report.message;
    if (expected == std::string("AbortedError")) {
      EXPECT_NE(std::string(report.message).find("injected fault"), std::string::npos)
          << "the abort lacks the victim's reason: " << report.message;
    }
    const std::int64_t after = report.error_ns - page.fault_ns.load();
    latest_ns = std::max(latest_ns, after);
    EXPECT_GE(after, 0) << "it failed before the fault: " << report.message;
    EXPECT_LE(after, (kDeadline + kMargin) / 1ns)
        << "it failed " << after / 1000000 << " ms after the fault: " << report.message;
  }
  EXPECT_TRUE(test::segments_gone(result)) << "a segment of the job is still in /dev/shm";
  for (const std::string& name : test::leftover_segments(segments_before)) {
    ADD_FAILURE() << "/dev/shm/" << name << " was left behind";
  }
  std::printf(
      "%s, %d ranks, %s, victim rank %d: survivors failed %.0f ms after the fault; %.2f s\n",
      trial_name(trial).c_str(), trial.op->ranks, trial.progress, trial.victim,
      static_cast<double>(latest_ns) / 1e6, seconds);
}

INSTANTIATE_TEST_SUITE_P(EveryOperatorAndPoint, FamilyFaults, ::testing::ValuesIn(all_trials()),
                         [](const auto& info) { return trial_name(info.param); });

}  // namespace
}  // namespace tpfuse
