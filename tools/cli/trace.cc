// `tpfuse trace DIR`: the files a job wrote under TPFUSE_TRACE=DIR (one per
// rank, core/trace.h) merged into one Chrome trace-event timeline, a summary
// of where each rank's time went and how much of its communication ran
// while it computed, and a drawing: ranks as rows, each with a lane for what
// it computes (GEMM, and its waits) and one for its communication.
//
// A rank's file may end without its closing bracket (a process killed before
// it finished its trace), or cut in the middle of its last event: the
// events are one per line, and a line that does not parse is dropped and
// counted.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "bench_baselines.h"
#include "commands.h"
#include "tpfuse/core/error.h"
#include "tpfuse/version.h"

namespace tpfuse::cli {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct TraceOptions {
  std::string dir;
  std::string out;
  std::string plot;
  std::string window;  // "FROM:TO" in ms from the trace's start
};

struct Loaded {
  std::vector<json> events;
  std::size_t files = 0;
  std::size_t dropped_lines = 0;
};

// Whole-file JSON first (an array, or an object with traceEvents); else one
// event per line, as tpfuse writes them.
void load_file(const fs::path& path, Loaded& loaded) {
  std::ifstream in(path);
  if (!in) throw CLI::RuntimeError(cat("trace: cannot read ", path.string()), 1);
  std::stringstream text;
  text << in.rdbuf();
  const json whole = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (whole.is_array() || (whole.is_object() && whole.contains("traceEvents"))) {
    const json& events = whole.is_array() ? whole : whole["traceEvents"];
    for (const json& event : events) loaded.events.push_back(event);
    ++loaded.files;
    return;
  }
  text.clear();
  text.seekg(0);
  std::string line;
  while (std::getline(text, line)) {
    while (!line.empty() && (line.back() == ',' || line.back() == ' ' || line.back() == '\r')) line.pop_back();
    if (line.empty() || line == "[" || line == "]") continue;
    json event = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (event.is_object()) {
      loaded.events.push_back(std::move(event));
    } else {
      ++loaded.dropped_lines;
    }
  }
  ++loaded.files;
}

Loaded load_dir(const std::string& dir) {
  if (!fs::is_directory(dir)) {
    throw CLI::ValidationError("DIR", cat("expected the directory a job traced into (TPFUSE_TRACE=DIR), got \"", dir,
                                          "\", which is not a directory"));
  }
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_regular_file() && name.ends_with(".json") && (name.starts_with("rank-") || name.starts_with("pid-"))) {
      files.push_back(entry.path());
    }
  }
  if (files.empty()) {
    throw CLI::RuntimeError(
        cat("trace: ", dir, " holds no trace files (rank-R-pid-P.json); run the job with TPFUSE_TRACE=", dir), 1);
  }
  std::sort(files.begin(), files.end());
  Loaded loaded;
  for (const fs::path& file : files) load_file(file, loaded);
  return loaded;
}

struct Interval {
  double begin, end;  // ms from the trace's start
};

bool is_span(const json& e) { return e.value("ph", "") == "X" && e.contains("ts") && e.contains("dur"); }

// The union of intervals, sorted and merged.
std::vector<Interval> merged(std::vector<Interval> spans) {
  std::sort(spans.begin(), spans.end(), [](const Interval& a, const Interval& b) { return a.begin < b.begin; });
  std::vector<Interval> out;
  for (const Interval& s : spans) {
    if (!out.empty() && s.begin <= out.back().end) {
      out.back().end = std::max(out.back().end, s.end);
    } else {
      out.push_back(s);
    }
  }
  return out;
}

double length(const std::vector<Interval>& spans) {
  double total = 0;
  for (const Interval& s : spans) total += s.end - s.begin;
  return total;
}

// Time covered by both unions.
double overlap(const std::vector<Interval>& a, const std::vector<Interval>& b) {
  double total = 0;
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    total += std::max(0.0, std::min(a[i].end, b[j].end) - std::max(a[i].begin, b[j].begin));
    if (a[i].end < b[j].end) {
      ++i;
    } else {
      ++j;
    }
  }
  return total;
}

// One rank's spans by lane.
struct RankLanes {
  std::vector<Interval> gemm, comm, wait;
  int calls = 0;
};

std::map<int, RankLanes> lanes_of(const std::vector<json>& events, double t0_us, const Interval& window) {
  std::map<int, RankLanes> ranks;
  for (const json& e : events) {
    if (!is_span(e)) continue;
    const double begin = (e["ts"].get<double>() - t0_us) / 1e3;
    const double end = begin + e["dur"].get<double>() / 1e3;
    if (end < window.begin || begin > window.end) continue;
    RankLanes& lanes = ranks[e.value("pid", 0)];
    const std::string category = e.value("cat", "");
    const Interval span{std::max(begin, window.begin), std::min(end, window.end)};
    if (category == "gemm") lanes.gemm.push_back(span);
    if (category == "comm") lanes.comm.push_back(span);
    if (category == "wait") lanes.wait.push_back(span);
    if (category == "op") ++lanes.calls;
  }
  return ranks;
}

Interval parse_window(const std::string& text, double total_ms) {
  if (text.empty()) return {0, total_ms};
  double from = 0, to = 0;
  char colon = 0;
  if (std::sscanf(text.c_str(), "%lf%c%lf", &from, &colon, &to) != 3 || colon != ':' || !(from < to) || from < 0) {
    throw CLI::ValidationError("--window",
                               cat("expected FROM:TO in ms from the trace's start with FROM < TO, got \"", text, "\""));
  }
  return {from, to};
}

void print_summary(const std::map<int, RankLanes>& ranks, const Interval& window, const Loaded& loaded) {
  std::printf("tpfuse trace: %zu files, %zu events", loaded.files, loaded.events.size());
  if (loaded.dropped_lines > 0) std::printf(" (%zu cut lines dropped)", loaded.dropped_lines);
  std::printf(", %.3f ms shown (%.3f to %.3f)\n\n", window.end - window.begin, window.begin, window.end);
  std::printf("  %-6s %7s %11s %11s %11s %11s %8s\n", "rank", "calls", "GEMM ms", "comm ms", "overlap ms", "waits ms",
              "hidden");
  for (const auto& [rank, lanes] : ranks) {
    const auto gemm = merged(lanes.gemm), comm = merged(lanes.comm), wait = merged(lanes.wait);
    const double comm_ms = length(comm), both = overlap(gemm, comm);
    std::printf("  %-6d %7d %11.3f %11.3f %11.3f %11.3f", rank, lanes.calls, length(gemm), comm_ms, both, length(wait));
    if (comm_ms > 0) {
      std::printf(" %7.1f%%\n", 100.0 * both / comm_ms);
    } else {
      std::printf(" %8s\n", "-");
    }
  }
  std::printf("\n  hidden = the part of the rank's communication that ran while it computed a GEMM\n");
}

void write_merged(const std::string& path, std::vector<json> events, double t0_us, const Loaded& loaded) {
  for (json& e : events) {
    if (e.contains("ts") && e["ts"].is_number()) e["ts"] = e["ts"].get<double>() - t0_us;
  }
  json merged_trace = {{"traceEvents", std::move(events)},
                       {"displayTimeUnit", "ms"},
                       {"otherData", {{"tool", cat("tpfuse ", version())}, {"files", loaded.files}}}};
  std::ofstream out(path);
  if (!out) throw CLI::RuntimeError(cat("trace: cannot write ", path), 1);
  out << merged_trace.dump() << "\n";
  std::printf("wrote %s (open it in https://ui.perfetto.dev or chrome://tracing)\n", path.c_str());
}

// One gnuplot data block of boxes: x_center y_center x_low x_high y_low y_high.
std::string boxes(const std::string& name, const std::vector<Interval>& spans, double y_low, double y_high,
                  std::string& data) {
  data += cat(name, " << EOD\n");
  for (const Interval& s : spans) {
    data +=
        cat((s.begin + s.end) / 2, " ", (y_low + y_high) / 2, " ", s.begin, " ", s.end, " ", y_low, " ", y_high, "\n");
  }
  if (spans.empty()) data += "? ? ? ? ? ?\n";
  data += "EOD\n";
  return name;
}

void write_plot(const std::string& path, const std::map<int, RankLanes>& ranks, const Interval& window) {
  const std::string gnuplot = find_program("gnuplot");
  if (gnuplot.empty()) {
    throw CLI::RuntimeError("trace: --plot needs gnuplot (apt-get install gnuplot-nox)", 1);
  }
  std::vector<Interval> all_gemm, all_comm, all_wait;
  std::string data, ytics;
  int row = 0;
  std::string plot;
  // Rows from the top: rank 0 first; in a row, the compute lane above the
  // communication lane.
  const int rows = static_cast<int>(ranks.size());
  int drawn = 0;
  for (const auto& [rank, lanes] : ranks) {
    const double base = rows - 1 - row;
    const std::string suffix = std::to_string(row);
    const std::string gemm = boxes("$gemm" + suffix, lanes.gemm, base + 0.52, base + 0.92, data);
    const std::string wait = boxes("$wait" + suffix, lanes.wait, base + 0.52, base + 0.92, data);
    const std::string comm = boxes("$comm" + suffix, lanes.comm, base + 0.08, base + 0.48, data);
    ytics += cat(ytics.empty() ? "" : ", ", "\"rank ", rank, "\" ", base + 0.5);
    const bool first = drawn == 0;
    plot += cat(first ? "plot " : ", \\\n     ", gemm,
                " using 1:2:3:4:5:6 with boxxyerror fs solid 0.9 lc rgb '#1f77b4' ", first ? "title 'GEMM'" : "notitle",
                ", \\\n     ", wait, " using 1:2:3:4:5:6 with boxxyerror fs solid 0.5 lc rgb '#bbbbbb' ",
                first ? "title 'waiting for peers'" : "notitle", ", \\\n     ", comm,
                " using 1:2:3:4:5:6 with boxxyerror fs solid 0.9 lc rgb '#ff7f0e' ",
                first ? "title 'communication'" : "notitle");
    ++drawn;
    ++row;
  }
  const std::string script =
      cat("set terminal pngcairo size 1600,", std::max(360, 120 + 90 * rows), " noenhanced font 'sans,11'\n",
          "set output '", path, "'\n", "set title 'tpfuse timeline: per rank, what it computes (top lane) and its ",
          "communication (bottom lane)'\n", "set xlabel 'time (ms)'\nset xrange [", window.begin, ":", window.end,
          "]\nset yrange [0:", rows, "]\nset ytics (", ytics, ")\nset grid xtics\n",
          "set key outside bottom center horizontal\nset datafile missing '?'\n", data, plot, "\n");
  std::fflush(stdout);
  FILE* pipe = popen(gnuplot.c_str(), "w");
  if (pipe == nullptr) throw CLI::RuntimeError("trace: cannot start gnuplot", 1);
  std::fputs(script.c_str(), pipe);
  if (pclose(pipe) != 0) throw CLI::RuntimeError("trace: gnuplot failed", 1);
  std::printf("wrote %s (%d ranks)\n", path.c_str(), rows);
}

void run_trace(const TraceOptions& o) {
  const Loaded loaded = load_dir(o.dir);
  double t0_us = INFINITY, t1_us = -INFINITY;
  for (const json& e : loaded.events) {
    if (!is_span(e)) continue;
    t0_us = std::min(t0_us, e["ts"].get<double>());
    t1_us = std::max(t1_us, e["ts"].get<double>() + e["dur"].get<double>());
  }
  if (!std::isfinite(t0_us)) {
    throw CLI::RuntimeError(cat("trace: the files in ", o.dir, " hold no timed events"), 1);
  }
  const Interval window = parse_window(o.window, (t1_us - t0_us) / 1e3);
  const auto ranks = lanes_of(loaded.events, t0_us, window);
  if (ranks.empty()) {
    throw CLI::ValidationError(
        "--window", cat("no event falls in ", o.window, " ms; the trace spans 0:", (t1_us - t0_us) / 1e3, " ms"));
  }
  print_summary(ranks, window, loaded);
  if (!o.out.empty()) write_merged(o.out, loaded.events, t0_us, loaded);
  if (!o.plot.empty()) write_plot(o.plot, ranks, window);
}

}  // namespace

void add_trace_command(CLI::App& app) {
  auto o = std::make_shared<TraceOptions>();
  auto* cmd = app.add_subcommand(
      "trace", "Merge the per-rank timelines a job wrote under TPFUSE_TRACE=DIR, summarise and draw them");
  cmd->add_option("DIR", o->dir, "The directory the job traced into")->required();
  cmd->add_option("--out", o->out, "Write the merged timeline (Chrome trace-event JSON, for Perfetto) to this file");
  cmd->add_option("--plot", o->plot, "Draw the timeline into this PNG (gnuplot): ranks as rows");
  cmd->add_option("--window", o->window, "Only FROM:TO, in ms from the trace's start (summary and plot)");
  cmd->callback([o] { run_trace(*o); });
}

}  // namespace tpfuse::cli
