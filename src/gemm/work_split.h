// How the engines share one compute_rows call among their threads: tasks of
// rows [r0, r1) x column panels [p0, p1). Any split gives the same results
// (a row's sums never depend on its tile), so the split is for speed only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gemm/thread_pool.h"

namespace tpfuse::gemm {

struct Task {
  std::int64_t r0, r1, p0, p1;
};

// Of `threads`, the ones worth using for rows x n x k multiply-adds: one per
// min_multiply_adds_per_thread() of them (thread_pool.h), at least one.
inline std::int64_t threads_for_work(std::int64_t threads, std::int64_t rows, std::int64_t n,
                                     std::int64_t k) {
  const double work = static_cast<double>(rows) * static_cast<double>(n) * static_cast<double>(k);
  const double least = min_multiply_adds_per_thread();
  const double worth = least > 0 ? work / least : static_cast<double>(threads);
  return std::clamp<std::int64_t>(static_cast<std::int64_t>(std::min(worth, 1e9)), 1, threads);
}

// Rows [m0, m1) x panels [0, panels) for `threads` threads, given the
// engine's register-tile rows mr and row-block height mc:
// - many rows: one task per row block, taken by whichever thread is free (a
//   core that other work slows down computes fewer blocks instead of holding
//   up the call; each block packs its own rows and reads B as one thread
//   would, so the split costs nothing);
// - many panels, or too few rows to share: the panels, in equal runs;
// - else: the rows, in equal runs of whole register tiles.
inline std::vector<Task> split_work(std::int64_t m0, std::int64_t m1, std::int64_t panels, std::int64_t mr,
                                    std::int64_t mc, std::int64_t threads) {
  const std::int64_t rows = m1 - m0;
  std::vector<Task> tasks;
  if (threads == 1) {
    tasks.push_back({m0, m1, 0, panels});
  } else if (rows >= 2 * mc * threads) {
    for (std::int64_t r = m0; r < m1; r += mc) tasks.push_back({r, std::min(m1, r + mc), 0, panels});
  } else if (panels >= 2 * threads || rows < 2 * mr * threads) {
    const std::int64_t parts = std::min(threads, panels);
    for (std::int64_t t = 0; t < parts; ++t) {
      tasks.push_back({m0, m1, panels * t / parts, panels * (t + 1) / parts});
    }
  } else {
    const std::int64_t row_panels = (rows + mr - 1) / mr;
    const std::int64_t parts = std::min(threads, row_panels);
    for (std::int64_t t = 0; t < parts; ++t) {
      tasks.push_back({m0 + std::min(rows, row_panels * t / parts * mr),
                       m0 + std::min(rows, row_panels * (t + 1) / parts * mr), 0, panels});
    }
  }
  return tasks;
}

// All rows; column blocks [0, blocks) in equal runs.
inline std::vector<Task> split_columns(std::int64_t m0, std::int64_t m1, std::int64_t blocks,
                                       std::int64_t threads) {
  const std::int64_t parts = std::min(threads, blocks);
  std::vector<Task> tasks;
  for (std::int64_t t = 0; t < parts; ++t) tasks.push_back({m0, m1, blocks * t / parts, blocks * (t + 1) / parts});
  return tasks;
}

}  // namespace tpfuse::gemm
