#include "case_runner.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <vector>

#include "tpfuse/comm/launcher.h"
#include "tpfuse/core/error.h"

namespace tpfuse::cli {

namespace {

// What rank 0 sends back to the launcher over a pipe.
struct WireResult {
  std::uint8_t identical = 0;
  std::uint8_t checked = 0;
  testing::Comparison comparison;
  double seconds_per_call = 0;
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

// What one rank's check found, as all_gather carries it.
struct WireCheck {
  std::uint8_t checked = 0;
  testing::Comparison comparison;
};

// The ranks' comparisons as one.
testing::Comparison merge(const std::vector<std::string>& checks, bool& any_checked) {
  testing::Comparison merged;
  any_checked = false;
  for (const std::string& bytes : checks) {
    WireCheck check;
    std::memcpy(&check, bytes.data(), sizeof(check));
    if (check.checked == 0) continue;
    any_checked = true;
    add_comparison(merged, check.comparison);
  }
  return merged;
}

// Runs the case on this rank; on rank 0, returns what it found.
std::optional<WireResult> run_rank(comm::RankContext& ctx, const OpCase& c, int iterations, bool check) {
  const RankCall rank_call = make_rank_call(ctx, c);
  std::vector<double> seconds;
  for (int i = 0; i < iterations; ++i) {
    ctx.comm->barrier();
    const auto start = std::chrono::steady_clock::now();
    rank_call.call();
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }

  std::uint64_t hash = fnv1a(nullptr, 0);
  for (const TensorView& out : rank_call.replicated) {
    const std::uint64_t h = fnv1a(out.data(), static_cast<std::size_t>(out.numel()) * dtype_size(out.dtype()));
    hash = (hash ^ h) * 1099511628211ull;
  }
  const auto hashes = ctx.comm->all_gather(std::string_view(reinterpret_cast<const char*>(&hash), sizeof(hash)));
  WireCheck mine;
  if (check) {
    if (const auto comparison = rank_call.check()) {
      mine.checked = 1;
      mine.comparison = *comparison;
    }
  }
  const auto checks = ctx.comm->all_gather(std::string_view(reinterpret_cast<const char*>(&mine), sizeof(mine)));
  if (ctx.rank != 0) return std::nullopt;

  WireResult result;
  result.identical = std::all_of(hashes.begin(), hashes.end(), [&](const std::string& h) { return h == hashes[0]; });
  bool any_checked = false;
  result.comparison = merge(checks, any_checked);
  result.checked = any_checked ? 1 : 0;
  result.seconds_per_call = seconds.empty() ? 0 : median(seconds);
  return result;
}

CaseResult to_case_result(const WireResult& wire) {
  CaseResult result;
  result.ran = true;
  result.identical_across_ranks = wire.identical != 0;
  result.checked = wire.checked != 0;
  result.comparison = wire.comparison;
  result.seconds_per_call = wire.seconds_per_call;
  return result;
}

}  // namespace

std::uint64_t fnv1a(const void* data, std::size_t bytes) {
  std::uint64_t h = 1469598103934665603ull;
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}

CaseResult run_case(const OpCase& c, int ranks, int iterations, bool check) {
  int fds[2];
  if (pipe(fds) != 0) throw_system_error("pipe", errno);
  comm::LaunchOptions options;
  options.ranks = ranks;
  const auto launch = comm::launch_local(options, [&](comm::RankContext& ctx) {
    close(fds[0]);
    const auto result = run_rank(ctx, c, iterations, check);
    if (!result) return 0;
    const auto wrote = write(fds[1], &*result, sizeof(*result));
    return wrote == static_cast<ssize_t>(sizeof(*result)) ? 0 : 3;
  });
  close(fds[1]);
  WireResult wire;
  const ssize_t got = read(fds[0], &wire, sizeof(wire));
  close(fds[0]);

  if (!launch.ok() || got != static_cast<ssize_t>(sizeof(wire))) {
    CaseResult result;
    result.error = launch.ok() ? "rank 0 reported no result" : launch.describe_failures();
    return result;
  }
  return to_case_result(wire);
}

std::optional<CaseResult> run_case_on(comm::RankContext& ctx, const OpCase& c, int iterations, bool check) {
  const auto wire = run_rank(ctx, c, iterations, check);
  if (!wire) return std::nullopt;
  return to_case_result(*wire);
}

std::string describe_mode(const testing::CaseSpec& spec) {
  std::string text = cat(mode_name(spec.mode), " ", dtype_name(spec.dtype));
  if (spec.mode == Mode::plain) return text;
  text += cat(" ", scale_kind_name(spec.scale_kind));
  if (spec.scale_kind == ScaleKind::per_group) text += cat("(G=", spec.group_size, ")");
  if (spec.offset) text += " +offset";
  return text;
}

std::string describe_shape(const testing::CaseSpec& spec) {
  const std::string x1 = spec.batch > 0 ? cat("[", spec.batch, ", ", spec.m / spec.batch, ", ",
                                              spec.k, "]")
                                        : cat("[", spec.m, ", ", spec.k, "]");
  return cat(x1, " x [", spec.k, ", ", spec.n, "]", spec.x2_transposed ? "^T" : "");
}

void print_table_header() {
  std::printf("%-26s %-42s %-24s %5s %11s %11s %12s %s\n", "operator", "mode", "shape (per rank)", "ranks", "max error",
              "tolerance", "us per call", "result");
}

void print_table_row(const OpCase& c, int ranks, const CaseResult& r) {
  std::string verdict;
  if (!r.ran) {
    verdict = "FAILED: " + r.error;
  } else if (!r.identical_across_ranks) {
    verdict = "FAILED: ranks differ";
  } else if (r.checked && !r.comparison.ok()) {
    verdict = cat("FAILED: ", r.comparison.mismatches, " elements off");
  } else {
    const std::string_view same = replicated_outputs(c.op);
    verdict = cat(r.checked ? "ok" : "unchecked", same.empty() ? "" : cat(", ", same, " on all ranks"));
  }
  std::printf("%-26s %-42s %-24s %5d %11.3g %11.3g %12.1f %s\n", std::string(op_name(c.op)).c_str(),
              cat(describe_mode(c.spec), c.x1_scale ? " +x1_scale" : "").c_str(), describe_shape(c.spec).c_str(), ranks,
              r.comparison.max_abs_error, r.comparison.max_bound, r.seconds_per_call * 1e6, verdict.c_str());
  std::fflush(stdout);
}

}  // namespace tpfuse::cli
