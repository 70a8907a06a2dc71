// The tile planner: a pure function from a call and the measured constants
// to a tile schedule along M.
//
// It predicts each candidate schedule's time with the cost model and keeps
// the fastest (fewer tiles, and equal ones, unless more or uneven tiles gain
// at least half a percent). Candidates: one tile; n equal tiles for
// every n from the fewest that fit the transport's buffers up to kMaxTiles
// more; and, like Ascend's tiling, schedules of two lengths (long tiles of L
// rows, short ones of L/2), the short ones last (the last reduce, which
// nothing hides, is short: good when the GEMM dominates) or first (the
// reduce starts early: good when communication dominates).
//
// The GEMM's time per compute_rows call is its arithmetic plus a fixed part
// (measured: the weight read again, which a long call only partly overlaps),
// and at least one pass over the prepared weight, so cutting rows into many
// tiles never looks free.
//
// The prediction is a two-stage flow shop: tile i's reduce starts when tile
// i is computed and the link is free of tile i-1's, and tile i's GEMM waits
// for the slot of tile i - max_in_flight to be free. A reduce holds the link
// for all of its time but the part that another reduce in flight can use
// too (reduce_overlap, measured: none for shared memory, some across hosts,
// where a reduce also waits for its peers' steps). Taking turns with the
// GEMM on the same cores, a reduce's CPU share (measured) also delays the
// next tile's GEMM by that share of the reduce: for shared memory, where the
// share is about 1, splitting then only adds overheads and the fewest tiles
// that fit the buffers win; across hosts, where the share is small, the
// network's time hides under the GEMM as on a core of its own.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <deque>

#include "tpfuse/core/error.h"
#include "tpfuse/pipeline/plan.h"

namespace tpfuse::pipeline {

namespace {

// Beyond the fewest tiles that fit the buffers, at most this many more.
constexpr std::int64_t kMaxExtraTiles = 32;
// Tile boundaries fall on multiples of this many rows when m allows, so that
// every tile starts on a full micro-kernel block.
constexpr std::int64_t kRowGranule = 16;
// In a tile, the GEMM polls the transport at most this many times.
constexpr std::int64_t kPollsPerTile = 4;
// A schedule must beat the best so far (candidates come in order of tile
// count) by this fraction of its time to replace it: a gain within the
// model's error is no reason for more tiles or uneven ones.
constexpr double kSignificantGain = 0.005;

struct CostModel {
  const PlanRequest& request;
  const CostConstants& constants;

  std::size_t row_bytes() const {
    return static_cast<std::size_t>(request.n) * dtype_size(request.out_dtype);
  }
  double arithmetic_seconds(double rows) const {
    return 2.0 * rows * static_cast<double>(request.n) * static_cast<double>(request.k) /
           constants.gemm_flops;
  }
  double gemm_call_seconds(double rows) const {
    return std::max(arithmetic_seconds(rows) + constants.gemm_call_seconds,
                    constants.gemm_pass_seconds);
  }
  // A tile computed in ceil(rows / poll_rows) blocks of equal size (one call
  // each when the GEMM's thread polls between them; one call when a helper
  // polls).
  double gemm_seconds(std::int64_t rows, std::int64_t poll_rows) const {
    if (request.reduce_has_own_core || poll_rows >= rows) {
      return gemm_call_seconds(static_cast<double>(rows));
    }
    const auto blocks = static_cast<double>((rows + poll_rows - 1) / poll_rows);
    return blocks * gemm_call_seconds(static_cast<double>(rows) / blocks);
  }
  // Fewest rows per poll block for which the pass and a call's fixed part
  // are at most 1% of the block's arithmetic. The pass overlaps the
  // arithmetic only in part (blocks of 64 rows ran 10% slower than blocks of
  // 256 where the pass took a third of a block's arithmetic, at K=4096,
  // N=8192), and polls inside a tile buy little: a round is reduced at the
  // next tile's start anyway when the ranks keep pace. So a tile is cut only
  // where the weight is cheap to read again.
  std::int64_t rows_to_hide_the_pass() const {
    const double per_row = arithmetic_seconds(1.0);
    return static_cast<std::int64_t>(std::ceil(
        100.0 * (constants.gemm_pass_seconds + constants.gemm_call_seconds) / per_row));
  }
  bool fits_buffer(std::int64_t rows) const {
    return static_cast<double>(rows) * static_cast<double>(row_bytes()) <=
           static_cast<double>(constants.buffer_bytes);
  }
  // The reduce-scatter copies each tile in from the GEMM's rows: it has no
  // buffer the GEMM writes into.
  bool copies_every_tile() const { return request.op == Operator::mm_reduce_scatter; }
  // A tile's all-reduce: from the buffer the GEMM wrote, or (a tile too
  // large for one, or a reduce-scatter's) copied in in chunks.
  double reduce_seconds(std::int64_t rows) const {
    if (copies_every_tile() || !fits_buffer(rows)) return plain_all_reduce_seconds(rows);
    return constants.reduce_round_seconds + static_cast<double>(rows) *
                                                static_cast<double>(row_bytes()) *
                                                constants.reduce_seconds_per_byte;
  }
  double plain_all_reduce_seconds(std::int64_t rows) const {
    const double bytes = static_cast<double>(rows) * static_cast<double>(row_bytes());
    const double chunks =
        std::ceil(bytes / static_cast<double>(std::max<std::int64_t>(1, constants.buffer_bytes)));
    return chunks * constants.reduce_round_seconds +
           bytes * (constants.reduce_seconds_per_byte + constants.copy_seconds_per_byte);
  }
  double predict(const std::vector<std::int64_t>& tiles, std::int64_t poll_rows) const {
    const double cpu_share = request.reduce_has_own_core ? 0.0 : constants.reduce_cpu_share;
    const auto depth = static_cast<std::size_t>(std::max(1, constants.max_in_flight));
    const double overlap = constants.reduce_overlap;
    std::deque<double> reduce_ends;  // of the last `depth` tiles
    double gemm_end = 0, link_end = 0, stolen = 0, end = 0;
    for (std::int64_t rows : tiles) {
      const double slot_free = reduce_ends.size() == depth ? reduce_ends.front() : 0.0;
      gemm_end = std::max(gemm_end, slot_free) + gemm_seconds(rows, poll_rows) + stolen;
      const double reduce = reduce_seconds(rows);
      link_end = std::max(link_end, gemm_end) + (1.0 - overlap) * reduce;
      const double reduce_end = link_end + overlap * reduce;
      end = std::max(end, reduce_end);
      stolen = cpu_share * reduce;
      reduce_ends.push_back(reduce_end);
      if (reduce_ends.size() > depth) reduce_ends.pop_front();
    }
    return end;
  }
};

// Rows per tile for the given relative lengths, boundaries on multiples of
// `granule` where m allows; every tile gets at least one row.
std::vector<std::int64_t> split_rows(std::int64_t m, const std::vector<double>& lengths,
                                     std::int64_t granule = kRowGranule) {
  const auto tiles = static_cast<std::int64_t>(lengths.size());
  if (m < granule * tiles) granule = 1;
  double total = 0;
  for (double length : lengths) total += length;
  std::vector<std::int64_t> rows;
  double cumulative = 0;
  std::int64_t previous = 0;
  for (std::int64_t t = 0; t < tiles; ++t) {
    cumulative += lengths[static_cast<std::size_t>(t)];
    std::int64_t boundary =
        t + 1 == tiles
            ? m
            : static_cast<std::int64_t>(std::llround(static_cast<double>(m) * cumulative / total /
                                                     static_cast<double>(granule))) *
                  granule;
    boundary = std::clamp(boundary, previous + 1, m - (tiles - t - 1));
    rows.push_back(boundary - previous);
    previous = boundary;
  }
  return rows;
}

// Up to kPollsPerTile polls in the longest tile, in blocks of equal size,
// none so short that its pass over the weight would show.
std::int64_t poll_rows_for(const std::vector<std::int64_t>& tiles, const CostModel& model) {
  const std::int64_t longest = *std::max_element(tiles.begin(), tiles.end());
  const std::int64_t blocks = std::clamp<std::int64_t>(
      longest / std::max<std::int64_t>(1, model.rows_to_hide_the_pass()), 1, kPollsPerTile);
  return (longest + blocks - 1) / blocks;
}

struct Candidate {
  std::vector<std::int64_t> tiles;
  std::string reason;
};

// In order of preference on a tie: one tile first (through the copy path
// where the output is larger than a buffer), then more tiles.
std::vector<Candidate> candidates(const PlanRequest& request, const CostModel& model) {
  std::vector<Candidate> list;
  const bool one_tile_fits = model.fits_buffer(request.m);
  list.push_back({{request.m}, one_tile_fits ? "one tile: splitting cannot pay"
                                             : "one tile, copied into the transport in chunks"});
  const double output_bytes =
      static_cast<double>(request.m) * static_cast<double>(model.row_bytes());
  const auto fewest = static_cast<std::int64_t>(std::ceil(
      output_bytes / static_cast<double>(std::max<std::int64_t>(1, model.constants.buffer_bytes))));
  const std::int64_t most = std::min(request.m, std::max<std::int64_t>(2, fewest) + kMaxExtraTiles);
  for (std::int64_t tiles = std::max<std::int64_t>(2, fewest); tiles <= most; ++tiles) {
    list.push_back(
        {split_rows(request.m, std::vector<double>(static_cast<std::size_t>(tiles), 1.0)),
         cat(tiles, " equal tiles")});
    for (std::int64_t short_tiles = 1; short_tiles < tiles; ++short_tiles) {
      std::vector<double> lengths(static_cast<std::size_t>(tiles), 1.0);
      std::fill(lengths.end() - short_tiles, lengths.end(), 0.5);
      list.push_back(
          {split_rows(request.m, lengths),
           cat("two lengths, ", short_tiles, " short tile(s) last (the GEMM dominates)")});
      std::reverse(lengths.begin(), lengths.end());
      list.push_back(
          {split_rows(request.m, lengths),
           cat("two lengths, ", short_tiles, " short tile(s) first (the all-reduce dominates)")});
    }
  }
  return list;
}

}  // namespace

TilePlan make_plan(const PlanRequest& request, const CostConstants& constants) {
  require(request.m >= 1 && request.n >= 1 && request.k >= 1, "plan: m, n and k must be >= 1, got ",
          request.m, ", ", request.n, ", ", request.k);
  require(constants.gemm_flops > 0 && constants.gemm_pass_seconds >= 0 &&
              constants.gemm_call_seconds >= 0,
          "plan: the GEMM rate must be positive and its pass and call times not negative, got ",
          constants.gemm_flops, ", ", constants.gemm_pass_seconds, " and ",
          constants.gemm_call_seconds);
  const CostModel model{request, constants};
  TilePlan plan;
  if (request.op == Operator::all_gather_mm && request.comm_turn == 0) {
    // A tile per rank's block, this rank's own first: its GEMM starts at
    // once, and each block's GEMM runs while the next blocks arrive. The
    // gather is not the GEMM's input until it lands, so nothing is gained
    // by measuring: the blocks are the tiles.
    const auto ranks = static_cast<std::size_t>(std::max(1, request.ranks));
    plan.tile_rows = split_rows(request.m, std::vector<double>(ranks, 1.0), 1);
    plan.reason = cat(ranks, " tiles: one per rank's block of gathered rows, its own first");
  } else if (request.comm_turn > 0) {
    const std::int64_t tiles = std::min(request.comm_turn, request.m);
    plan.tile_rows =
        split_rows(request.m, std::vector<double>(static_cast<std::size_t>(tiles), 1.0), 1);
    plan.reason = cat("comm_turn = ", request.comm_turn, ": ", tiles, " equal tiles");
  } else {
    double best = 0;
    for (Candidate& candidate : candidates(request, model)) {
      const bool zero_copy =
          std::all_of(candidate.tiles.begin(), candidate.tiles.end(),
                      [&](std::int64_t rows) { return model.fits_buffer(rows); });
      if (candidate.tiles.size() > 1 && !zero_copy && !model.copies_every_tile()) continue;
      const double seconds = model.predict(candidate.tiles, poll_rows_for(candidate.tiles, model));
      if (plan.tile_rows.empty() || seconds < best * (1.0 - kSignificantGain)) {
        best = seconds;
        plan.tile_rows = std::move(candidate.tiles);
        plan.reason = std::move(candidate.reason);
      }
    }
  }
  // A forced schedule computes each tile in one call: the operator plans it
  // without measuring anything (the constants are placeholders then), and a
  // tile cut into blocks by them ran each 16-row tile as four calls of 4 rows,
  // each reading the whole weight (256x4096x640 bf16 in 16 tiles: 29 ms
  // against 14 ms in one tile; in 16 one-call tiles, 16 ms).
  const bool one_call_per_tile = request.comm_turn > 0 || request.op == Operator::all_gather_mm;
  plan.poll_rows = one_call_per_tile
                       ? *std::max_element(plan.tile_rows.begin(), plan.tile_rows.end())
                       : poll_rows_for(plan.tile_rows, model);
  plan.predicted_seconds = model.predict(plan.tile_rows, plan.poll_rows);
  plan.predicted_serial_seconds = model.gemm_call_seconds(static_cast<double>(request.m)) +
                                  model.plain_all_reduce_seconds(request.m);
  return plan;
}

namespace {

std::string format_seconds(double seconds) {
  char text[32];
  if (seconds >= 1.0) {
    std::snprintf(text, sizeof text, "%.3f s", seconds);
  } else if (seconds >= 1e-3) {
    std::snprintf(text, sizeof text, "%.3f ms", seconds * 1e3);
  } else {
    std::snprintf(text, sizeof text, "%.1f us", seconds * 1e6);
  }
  return text;
}

std::string format_bytes(double bytes) {
  char text[32];
  if (bytes >= 1 << 20) {
    std::snprintf(text, sizeof text, "%.2f MiB", bytes / (1 << 20));
  } else {
    std::snprintf(text, sizeof text, "%.1f KiB", bytes / 1024);
  }
  return text;
}

// A measured cost per byte as a rate; a cost too small to measure (the
// larger transfer was no slower) is said so, not shown as 0 GB/s.
std::string format_rate(double seconds_per_byte) {
  if (seconds_per_byte <= 0) return "too fast to measure";
  char text[32];
  std::snprintf(text, sizeof text, "%.2f GB/s", 1e-9 / seconds_per_byte);
  return text;
}

// "256 rows x 12, then 128 rows x 4": runs of equal tiles.
std::string describe_tiles(const std::vector<std::int64_t>& tiles) {
  std::string text;
  for (std::size_t t = 0; t < tiles.size();) {
    std::size_t run = 1;
    while (t + run < tiles.size() && tiles[t + run] == tiles[t]) ++run;
    text += cat(text.empty() ? "" : ", then ", tiles[t], " rows x ", run);
    t += run;
  }
  return text;
}

}  // namespace

std::string describe_plan(const PlanRequest& request, const CostConstants& constants,
                          const TilePlan& plan) {
  const CostModel model{request, constants};
  const double gemm = model.gemm_call_seconds(static_cast<double>(request.m));
  const double all_reduce = model.plain_all_reduce_seconds(request.m);
  const double row_bytes = static_cast<double>(model.row_bytes());
  const std::int64_t longest = *std::max_element(plan.tile_rows.begin(), plan.tile_rows.end());
  std::string text;
  text += cat(
      "call      m=", request.m, " n=", request.n, " k=", request.k, " (largest per rank), ",
      mode_name(request.mode), " ", dtype_name(request.in_dtype), " -> ",
      dtype_name(request.out_dtype), ", ", request.threads, " GEMM thread(s) per rank, reduce ",
      request.reduce_has_own_core ? "on a core of its own" : "taking turns with the GEMM", "\n");
  text += cat("schedule  ", plan.tile_rows.size(), " tile(s): ", describe_tiles(plan.tile_rows),
              " (largest ", format_bytes(static_cast<double>(longest) * row_bytes),
              "); the GEMM polls every ", plan.poll_rows, " rows\n");
  text += cat("why       ", plan.reason, "\n");
  char rate[64];
  std::snprintf(rate, sizeof rate, "%.1f GFLOP/s", constants.gemm_flops / 1e9);
  text += cat("measured  GEMM ", rate, ", at least ", format_seconds(constants.gemm_pass_seconds),
              " per call, ", format_seconds(constants.gemm_call_seconds),
              " more per extra call; tile all-reduce ",
              format_seconds(constants.reduce_round_seconds), " + ");
  text += cat(format_rate(constants.reduce_seconds_per_byte), " (",
              static_cast<int>(std::lround(constants.reduce_cpu_share * 100)),
              "% of it on the CPU, ",
              static_cast<int>(std::lround(constants.reduce_overlap * 100)),
              "% shared with another in flight); copy-in ",
              format_rate(constants.copy_seconds_per_byte),
              "; buffers of ", format_bytes(static_cast<double>(constants.buffer_bytes)), ", ",
              constants.max_in_flight, " in flight\n");
  text += cat("predicted fused ", format_seconds(plan.predicted_seconds), ", serial ",
              format_seconds(plan.predicted_serial_seconds), " (GEMM ", format_seconds(gemm),
              " + all-reduce ", format_seconds(all_reduce), ")\n");
  return text;
}

}  // namespace tpfuse::pipeline
