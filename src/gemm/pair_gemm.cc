// The bf16 pair engine: the loops around the pair kernels (pair_kernels.h),
// for bf16 x1 with a bf16 x2 or an int8 x2 dequantized into bf16, on CPUs
// with AVX512-BF16.
//
// Every path multiplies the same packed-pair words in the same order (the
// kernels' contract), so a call gives the same bits whichever it takes:
//   - many rows: all of x2 packed once per call, then blocks of nc panels x
//     mc rows x kc pairs (A block and sums in L2, B micro-panel in L1); an
//     int8 weight packed as int8 pairs, dequantized into L1 once per step
//     for all row tiles, or in registers where the rows are few (the path
//     of a packed weight, tpfuse::PackedWeight, in decode);
//   - few rows (decode), row-major x2: kc-steps of a few pairs across all
//     the task's panels, x2 read as that many rows side by side (streams the
//     prefetchers follow), packed into an L2-sized block, or read in place
//     by the kernel when the rows fit one register tile;
//   - few rows, transposed x2: one panel at a time over all of k, packed, or
//     read in place 16 columns at a time when the rows fit one tile.
// compute_rows shares [m0, m1) x panels among the threads (work_split.h).
#include "gemm/pair_gemm.h"

#include <algorithm>
#include <mutex>
#include <string>

#include "gemm/aligned_buffer.h"
#include "gemm/column_tables.h"
#include "gemm/thread_pool.h"
#include "gemm/work_split.h"
#include "tpfuse/core/error.h"

namespace tpfuse::gemm {

namespace {

// At most this many rows per call: x2 is packed block by block as it is used.
constexpr std::int64_t kSmallM = 64;
constexpr std::int64_t kBMicroPanelBytes = 32768;
constexpr std::int64_t kMcRows = 120;
constexpr std::int64_t kNcColumns = 512;
// Pairs of rows of a row-major x2 packed per step (a dequant group, a
// multiple of 32 rows, never starts inside such a block).
constexpr std::int64_t kPackPairs = 8;
// Pairs per kc-step where few rows stream a row-major x2.
constexpr std::int64_t kStreamPairs = 16;

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// All of x2 as packed pairs, [panel][pair][NR]: bf16 words, or for an int8
// weight its int8 pairs (half the bytes; pack_b_i8), dequantized by the
// kernel. A decode step reads each weight once from memory: packed as bf16
// words, an int8 weight took as long as a bf16 one (n = 5632, k = 1024, one
// thread, 12 weights cycled from DRAM, 8 rows: 379 against 378 us); as int8
// pairs, 594-631 against 743-852 us at 8 rows and 253-265 against 555-599 us
// at 1 row (tools/bench/decode_int8.py).
struct PairPanels final : PackedX2 {
  AlignedBuffer<std::uint32_t> words;
  std::shared_ptr<const WeightScales> scales;  // weight-only quant's, or null
  std::size_t bytes() const override {
    const std::size_t tables = scales ? scales->scales.size() + scales->offsets.size() : 0;
    return words.size() * sizeof(std::uint32_t) + tables * sizeof(float);
  }
};

class PairGemm final : public PreparedGemm {
 public:
  PairGemm(const GemmOperands& operands, const PairKernelTable& kernels, int threads)
      : ops_(operands),
        kernels_(kernels),
        pool_(lease_pool(threads)),
        mr_(kernels.mr),
        nr_(kernels.nr),
        panels_count_(ceil_div(operands.shape.n, kernels.nr)),
        pairs_(ceil_div(operands.shape.k, 2)),
        tables_(operands, ceil_div(operands.shape.n, kernels.nr) * kernels.nr,
                given_scales(operands)),
        kc_pairs_(kBMicroPanelBytes / (4 * kernels.nr)),
        mc_(std::max<std::int64_t>(1, kMcRows / kernels.mr) * kernels.mr),
        nc_panels_(std::max<std::int64_t>(1, kNcColumns / kernels.nr)) {
    const GemmProblem& s = ops_.shape;
    streamed_ = s.m <= kSmallM;
    int8_ = s.mode == Mode::weight_quant;
    if (const auto* given = dynamic_cast<const PairPanels*>(operands.packed)) {
      panels_ = given;
      streamed_ = false;
    } else if (!streamed_) {
      owned_ = std::make_shared<PairPanels>();
      if (int8_) {
        pack_all_i8(owned_->words);
      } else {
        pack_all(owned_->words);
      }
      owned_->scales = tables_.weight_scales();
      panels_ = owned_.get();
    }
  }

  const char* engine() const override {
    if (ops_.shape.mode == Mode::weight_quant) {
      return streamed_ ? "avx512_bf16_wq_pairs_streamed" : "avx512_bf16_wq_pairs";
    }
    return streamed_ ? "avx512_bf16_pairs_streamed" : "avx512_bf16_pairs";
  }
  std::shared_ptr<const PackedX2> packing() const override { return owned_; }

  void compute_rows(std::int64_t m0, std::int64_t m1, void* dst, std::int64_t ld) const override {
    if (m1 <= m0) return;
    std::lock_guard lock(compute_mutex_);
    const std::int64_t threads =
        threads_for_work(pool_->size(), m1 - m0, ops_.shape.n, ops_.shape.k);
    const std::vector<Task> tasks = split_work(m0, m1, panels_count_, mr_, mc_, threads);
    pool_->run(static_cast<int>(tasks.size()), [&](int index, int) {
      compute_task(tasks[static_cast<std::size_t>(index)], m0, dst, ld);
    });
  }

 private:
  struct Scratch {
    AlignedBuffer<std::uint32_t> a;  // packed A block: row panels of [kc][MR]
    AlignedBuffer<std::uint32_t> b;  // streamed B block: panels of [kc][NR]
    AlignedBuffer<float> acc;        // fp32 sums of an A block x B block between kc-steps
  };

  static std::shared_ptr<const WeightScales> given_scales(const GemmOperands& operands) {
    const auto* given = dynamic_cast<const PairPanels*>(operands.packed);
    return given != nullptr ? given->scales : nullptr;
  }

  const unsigned char* x2_at(std::int64_t l, std::int64_t j) const {
    return static_cast<const unsigned char*>(ops_.x2.data()) +
           (l * ops_.x2.stride(0) + j * ops_.x2.stride(1)) * static_cast<std::int64_t>(dtype_size(ops_.x2.dtype()));
  }

  // Pairs [pair0, pair0 + count) of panel p, packed at out; a dequant group
  // (a multiple of 32 rows) never starts inside a pair, but may inside the
  // block, so the block is packed one group's rows at a time.
  void pack_block(std::int64_t p, std::int64_t pair0, std::int64_t count, std::uint32_t* out) const {
    const GemmProblem& s = ops_.shape;
    const std::int64_t end = std::min(s.k, 2 * (pair0 + count));
    for (std::int64_t l = 2 * pair0; l < end;) {
      PairBSource src;
      src.dtype = ops_.x2.dtype();
      src.data = x2_at(l, p * nr_);
      src.stride_k = ops_.x2.stride(0);
      src.stride_n = ops_.x2.stride(1);
      src.cols = static_cast<int>(std::min<std::int64_t>(nr_, s.n - p * nr_));
      std::int64_t rows = end - l;
      if (s.mode == Mode::weight_quant) {
        rows = std::min(rows, (l / tables_.group_rows() + 1) * tables_.group_rows() - l);
        src.scale = tables_.scale_row(l, p * nr_);
        src.offset = tables_.offset_row(l, p * nr_);
      }
      src.rows = rows;
      kernels_.pack_b(src, out + (l / 2 - pair0) * nr_);
      l += rows;
    }
  }

  // Pairs [pair0, pair0 + count) of panel p as int8 pairs at out.
  void pack_block_i8(std::int64_t p, std::int64_t pair0, std::int64_t count,
                     std::int8_t* out) const {
    PairBSource src;
    src.dtype = DType::i8;
    src.data = x2_at(2 * pair0, p * nr_);
    src.stride_k = ops_.x2.stride(0);
    src.stride_n = ops_.x2.stride(1);
    src.cols = static_cast<int>(std::min<std::int64_t>(nr_, ops_.shape.n - p * nr_));
    src.rows = std::min(ops_.shape.k, 2 * (pair0 + count)) - 2 * pair0;
    kernels_.pack_b_i8(src, out);
  }

  // All of x2, for this call. A row-major x2 is read in row order (blocks
  // of kPackPairs pairs of rows across every panel), a transposed one in
  // column order (one panel at a time): either way each cache line of x2 is
  // read once, while it is in cache.
  void pack_all(AlignedBuffer<std::uint32_t>& packed) const {
    packed.resize(static_cast<std::size_t>(panels_count_ * pairs_ * nr_));
    for_each_pack_block([&](std::int64_t panel, std::int64_t pair0, std::int64_t count) {
      pack_block(panel, pair0, count, packed.data() + (panel * pairs_ + pair0) * nr_);
    });
  }

  // pack_all for an int8 weight: its int8 pairs, [panel][pair][NR][2] bytes.
  void pack_all_i8(AlignedBuffer<std::uint32_t>& packed) const {
    const std::int64_t panel_bytes = pairs_ * nr_ * 2;
    packed.resize(static_cast<std::size_t>(panels_count_ * panel_bytes / 4));
    auto* out = reinterpret_cast<std::int8_t*>(packed.data());
    for_each_pack_block([&](std::int64_t panel, std::int64_t pair0, std::int64_t count) {
      pack_block_i8(panel, pair0, count, out + panel * panel_bytes + pair0 * nr_ * 2);
    });
  }

  // pack(panel, pair0, count) over all of x2, shared among the pool's
  // threads, in the order pack_all describes.
  template <class Pack>
  void for_each_pack_block(const Pack& pack) const {
    const bool row_major = ops_.x2.stride(1) == 1;
    const std::int64_t units = row_major ? ceil_div(pairs_, kPackPairs) : panels_count_;
    const std::int64_t chunks = std::min<std::int64_t>(units, pool_->size() * 4);
    pool_->run(static_cast<int>(chunks), [&](int chunk, int) {
      for (std::int64_t u = units * chunk / chunks; u < units * (chunk + 1) / chunks; ++u) {
        if (!row_major) {
          pack(u, 0, pairs_);
          continue;
        }
        const std::int64_t pair0 = u * kPackPairs;
        const std::int64_t count = std::min(kPackPairs, pairs_ - pair0);
        for (std::int64_t p = 0; p < panels_count_; ++p) pack(p, pair0, count);
      }
    });
  }

  // One kc-step over a block: rows [i0, i1) x panels [p0, p1) x pairs
  // [pc, pc + kc), A packed as row panels of [kc][MR] from a, panel p's B at
  // b + (p - p0) * b_stride (b null: the packing's int8 pairs), partial sums
  // at acc (acc_ld floats a row). The last step of k finishes the tiles into
  // dst.
  struct Step {
    std::int64_t i0, i1, p0, p1, pc, kc;
    const std::uint32_t* a;
    const std::uint32_t* b;
    std::int64_t b_stride;
    float* acc;
    std::int64_t acc_ld;
  };

  void run_step(const Step& step, std::int64_t m0, void* dst, std::int64_t ld) const {
    const GemmProblem& s = ops_.shape;
    const std::int64_t out_elem = static_cast<std::int64_t>(dtype_size(s.out_dtype));
    const auto* x3 = ops_.x3 ? static_cast<const unsigned char*>(ops_.x3->data()) : nullptr;
    const std::int64_t x3_ld = ops_.x3 ? ops_.x3->stride(0) : 0;
    auto* out = static_cast<unsigned char*>(dst);
    const bool last = step.pc + step.kc == pairs_;
    if (step.b == nullptr && step.i1 - step.i0 <= kernels_.i8_rows) {
      // Few rows: dequantized in registers, each weight once. More rows
      // dequantize it into L1 once for all row tiles: at 13 to 20 rows that
      // took 703-770 us where two calls of the kernel took 772-915 (n =
      // 5632, k = 1024, from DRAM; bf16 857-948).
      run_i8_rows(step, m0, dst, ld);
      return;
    }
    thread_local AlignedBuffer<std::uint32_t> expanded;
    for (std::int64_t p = step.p0; p < step.p1; ++p) {
      const std::uint32_t* b;
      if (step.b != nullptr) {
        b = step.b + (p - step.p0) * step.b_stride;
      } else {
        // Dequantized once for all the row tiles, then read from L1.
        expanded.resize(static_cast<std::size_t>(step.kc * nr_));
        const PairI8Tile tile = i8_tile(step, p, p + 1);
        kernels_.expand_i8[tile.offset != nullptr ? 1 : 0](tile, expanded.data());
        b = expanded.data();
      }
      for (std::int64_t ir = step.i0; ir < step.i1; ir += mr_) {
        PairTile tile;
        tile.kp = step.kc;
        tile.a = step.a + (ir - step.i0) * step.kc;
        tile.b = b;
        tile.acc = step.acc + (ir - step.i0) * step.acc_ld + (p - step.p0) * nr_;
        tile.acc_ld = step.acc_ld;
        tile.accumulate = step.pc > 0;
        tile.mr = static_cast<int>(std::min(mr_, step.i1 - ir));
        tile.nr = static_cast<int>(std::min(nr_, s.n - p * nr_));
        TileEpilogue epilogue;
        if (last) {
          epilogue.bias = tables_.bias() != nullptr ? tables_.bias() + p * nr_ : nullptr;
          epilogue.x3 = x3 != nullptr ? x3 + (ir * x3_ld + p * nr_) * out_elem : nullptr;
          epilogue.x3_ld = x3_ld;
          epilogue.dst = out + ((ir - m0) * ld + p * nr_) * out_elem;
          epilogue.dst_ld = ld;
          epilogue.out_dtype = s.out_dtype;
          tile.epilogue = &epilogue;
        }
        kernels_.tile[tile.mr - 1](tile);
      }
    }
  }

  // Panels [p0, p1) of a step on the packing's int8 pairs as a PairI8Tile of
  // all its rows.
  PairI8Tile i8_tile(const Step& step, std::int64_t p0, std::int64_t p1) const {
    PairI8Tile tile;
    tile.kp = step.kc;
    tile.b_panel_stride = pairs_ * nr_ * 2;
    tile.b = reinterpret_cast<const std::int8_t*>(panels_->words.data()) +
             p0 * tile.b_panel_stride + step.pc * nr_ * 2;
    tile.panels = static_cast<int>(p1 - p0);
    tile.l0 = 2 * step.pc;
    tile.k = ops_.shape.k;
    tile.scale = tables_.scale_row(0, p0 * nr_);
    tile.offset = tables_.offset_row(0, p0 * nr_);
    tile.scale_ld = tables_.n_padded();
    tile.group_rows = tables_.group_rows();
    tile.mr = static_cast<int>(step.i1 - step.i0);
    tile.nr = static_cast<int>(ops_.shape.n - p0 * nr_);
    return tile;
  }

  // One row tile over int8 panels: all the step's panels in one call, which
  // keeps several panels' sums in flight when the rows are few.
  void run_i8_rows(const Step& step, std::int64_t m0, void* dst, std::int64_t ld) const {
    const GemmProblem& s = ops_.shape;
    const std::int64_t out_elem = static_cast<std::int64_t>(dtype_size(s.out_dtype));
    PairI8Tile tile = i8_tile(step, step.p0, step.p1);
    tile.a = step.a;
    tile.acc = step.acc;
    tile.acc_ld = step.acc_ld;
    tile.accumulate = step.pc > 0;
    TileEpilogue epilogue;
    if (step.pc + step.kc == pairs_) {
      const auto* x3 = ops_.x3 ? static_cast<const unsigned char*>(ops_.x3->data()) : nullptr;
      const std::int64_t x3_ld = ops_.x3 ? ops_.x3->stride(0) : 0;
      epilogue.bias = tables_.bias() != nullptr ? tables_.bias() + step.p0 * nr_ : nullptr;
      epilogue.x3 = x3 != nullptr ? x3 + (step.i0 * x3_ld + step.p0 * nr_) * out_elem : nullptr;
      epilogue.x3_ld = x3_ld;
      epilogue.dst =
          static_cast<unsigned char*>(dst) + ((step.i0 - m0) * ld + step.p0 * nr_) * out_elem;
      epilogue.dst_ld = ld;
      epilogue.out_dtype = s.out_dtype;
      tile.epilogue = &epilogue;
    }
    kernels_.i8_tile[tile.offset != nullptr ? 1 : 0][tile.mr - 1](tile);
  }

  // Rows [i0, i1) x pairs [pc, pc + kc) of x1 as row panels of [kc][MR].
  void pack_a_block(std::int64_t i0, std::int64_t i1, std::int64_t pc, std::int64_t kc, std::uint32_t* out) const {
    const auto* x1 = static_cast<const std::uint16_t*>(ops_.x1.data());
    const std::int64_t ld = ops_.x1.stride(0);
    const std::int64_t k_len = std::min(2 * kc, ops_.shape.k - 2 * pc);
    for (std::int64_t ir = i0; ir < i1; ir += mr_) {
      kernels_.pack_a(x1 + ir * ld + 2 * pc, ld, static_cast<int>(std::min(mr_, i1 - ir)), k_len,
                      out + (ir - i0) * kc);
    }
  }

  void compute_task(const Task& task, std::int64_t m0, void* dst, std::int64_t ld) const {
    thread_local Scratch scratch;
    if (!streamed_) {
      compute_prepacked(task, m0, dst, ld, scratch);
    } else if (ops_.x2.stride(1) == 1) {
      compute_streamed_rows(task, m0, dst, ld, scratch);
    } else {
      compute_streamed_columns(task, m0, dst, ld, scratch);
    }
  }

  // Many rows: B is all packed; blocks of nc panels x mc rows, kc-steps.
  void compute_prepacked(const Task& task, std::int64_t m0, void* dst, std::int64_t ld, Scratch& scratch) const {
    const std::int64_t block_rows = std::min(mc_, ceil_div(task.r1 - task.r0, mr_) * mr_);
    const std::int64_t kc_max = std::min(kc_pairs_, pairs_);
    scratch.a.resize(static_cast<std::size_t>(block_rows * kc_max));
    scratch.acc.resize(static_cast<std::size_t>(block_rows * std::min(nc_panels_, task.p1 - task.p0) * nr_));
    for (std::int64_t jc = task.p0; jc < task.p1; jc += nc_panels_) {
      const std::int64_t jend = std::min(task.p1, jc + nc_panels_);
      for (std::int64_t ic = task.r0; ic < task.r1; ic += mc_) {
        const std::int64_t iend = std::min(task.r1, ic + mc_);
        for (std::int64_t pc = 0; pc < pairs_; pc += kc_pairs_) {
          const std::int64_t kc = std::min(kc_pairs_, pairs_ - pc);
          pack_a_block(ic, iend, pc, kc, scratch.a.data());
          run_step({ic, iend, jc, jend, pc, kc, scratch.a.data(),
                    int8_ ? nullptr : panels_->words.data() + (jc * pairs_ + pc) * nr_,
                    pairs_ * nr_, scratch.acc.data(), (jend - jc) * nr_},
                   m0, dst, ld);
        }
      }
    }
  }

  // Few rows, a row-major x2: kc-steps of kStreamPairs pairs across all the
  // task's panels, so that x2 is read as 2 * kStreamPairs rows side by side
  // (streams the prefetchers follow), packed into an L2-sized block just
  // before it is used.
  void compute_streamed_rows(const Task& task, std::int64_t m0, void* dst, std::int64_t ld, Scratch& scratch) const {
    const std::int64_t rows = ceil_div(task.r1 - task.r0, mr_) * mr_;
    const std::int64_t panels = task.p1 - task.p0;
    if (rows == mr_) {
      compute_rows_in_place(task, m0, dst, ld, scratch);
      return;
    }
    const std::int64_t kc_max = std::min(kStreamPairs, pairs_);
    scratch.a.resize(static_cast<std::size_t>(rows * kc_max));
    scratch.b.resize(static_cast<std::size_t>(panels * kc_max * nr_));
    scratch.acc.resize(static_cast<std::size_t>(rows * panels * nr_));
    for (std::int64_t pc = 0; pc < pairs_; pc += kStreamPairs) {
      const std::int64_t kc = std::min(kStreamPairs, pairs_ - pc);
      pack_a_block(task.r0, task.r1, pc, kc, scratch.a.data());
      for (std::int64_t p = task.p0; p < task.p1; ++p) pack_block(p, pc, kc, scratch.b.data() + (p - task.p0) * kc * nr_);
      run_step({task.r0, task.r1, task.p0, task.p1, pc, kc, scratch.a.data(), scratch.b.data(), kc * nr_,
                scratch.acc.data(), panels * nr_},
               m0, dst, ld);
    }
  }

  // Few rows, a transposed x2 (its columns contiguous along k): one panel at
  // a time, all of k, each column read from start to end; the sums stay in
  // the micro-kernel's registers.
  void compute_streamed_columns(const Task& task, std::int64_t m0, void* dst, std::int64_t ld, Scratch& scratch) const {
    const std::int64_t rows = ceil_div(task.r1 - task.r0, mr_) * mr_;
    if (rows == mr_) {
      compute_columns_in_place(task, m0, dst, ld, scratch);
      return;
    }
    scratch.a.resize(static_cast<std::size_t>(rows * pairs_));
    scratch.b.resize(static_cast<std::size_t>(pairs_ * nr_));
    pack_a_block(task.r0, task.r1, 0, pairs_, scratch.a.data());
    for (std::int64_t p = task.p0; p < task.p1; ++p) {
      pack_block(p, 0, pairs_, scratch.b.data());
      run_step({task.r0, task.r1, p, p + 1, 0, pairs_, scratch.a.data(), scratch.b.data(), 0, nullptr, 0}, m0, dst,
               ld);
    }
  }

  // One row panel of a row-major x2: B read in place, kc-steps across the
  // task's panels as compute_streamed_rows takes them.
  void compute_rows_in_place(const Task& task, std::int64_t m0, void* dst, std::int64_t ld, Scratch& scratch) const {
    const GemmProblem& s = ops_.shape;
    const std::int64_t panels = task.p1 - task.p0;
    const std::int64_t kc_max = std::min(kStreamPairs, pairs_);
    scratch.a.resize(static_cast<std::size_t>(mr_ * kc_max));
    scratch.acc.resize(static_cast<std::size_t>(mr_ * panels * nr_));
    const std::int64_t out_elem = static_cast<std::int64_t>(dtype_size(s.out_dtype));
    const auto* x3 = ops_.x3 ? static_cast<const unsigned char*>(ops_.x3->data()) : nullptr;
    const int source = s.mode != Mode::weight_quant ? 0 : ops_.offset ? 2 : 1;
    const int rows = static_cast<int>(task.r1 - task.r0);
    for (std::int64_t pc = 0; pc < pairs_; pc += kStreamPairs) {
      const std::int64_t kc = std::min(kStreamPairs, pairs_ - pc);
      pack_a_block(task.r0, task.r1, pc, kc, scratch.a.data());
      const bool last = pc + kc == pairs_;
      for (std::int64_t p = task.p0; p < task.p1; ++p) {
        PairRowsTile tile;
        tile.kp = kc;
        tile.a = scratch.a.data();
        tile.b.dtype = ops_.x2.dtype();
        tile.b.data = x2_at(2 * pc, p * nr_);
        tile.b.stride_k = ops_.x2.stride(0);
        tile.b.stride_n = 1;
        tile.b.rows = s.k - 2 * pc;
        tile.b.cols = static_cast<int>(std::min(nr_, s.n - p * nr_));
        if (s.mode == Mode::weight_quant) {
          tile.b.scale = tables_.scale_row(2 * pc, p * nr_);
          tile.b.offset = tables_.offset_row(2 * pc, p * nr_);
        }
        tile.acc = scratch.acc.data() + (p - task.p0) * nr_;
        tile.acc_ld = panels * nr_;
        tile.accumulate = pc > 0;
        TileEpilogue epilogue;
        if (last) {
          epilogue.bias = tables_.bias() != nullptr ? tables_.bias() + p * nr_ : nullptr;
          epilogue.x3 = x3 != nullptr ? x3 + (task.r0 * ops_.x3->stride(0) + p * nr_) * out_elem : nullptr;
          epilogue.x3_ld = ops_.x3 ? ops_.x3->stride(0) : 0;
          epilogue.dst = static_cast<unsigned char*>(dst) + ((task.r0 - m0) * ld + p * nr_) * out_elem;
          epilogue.dst_ld = ld;
          epilogue.out_dtype = s.out_dtype;
          tile.epilogue = &epilogue;
        }
        kernels_.rows[source][rows - 1](tile);
      }
    }
  }

  // One row panel: x2's columns read in place, 16 at a time.
  void compute_columns_in_place(const Task& task, std::int64_t m0, void* dst, std::int64_t ld,
                                Scratch& scratch) const {
    const GemmProblem& s = ops_.shape;
    scratch.a.resize(static_cast<std::size_t>(mr_ * pairs_));
    pack_a_block(task.r0, task.r1, 0, pairs_, scratch.a.data());
    const std::int64_t out_elem = static_cast<std::int64_t>(dtype_size(s.out_dtype));
    const auto* x3 = ops_.x3 ? static_cast<const unsigned char*>(ops_.x3->data()) : nullptr;
    PairColumnsTile tile;
    tile.a = scratch.a.data();
    tile.rows = static_cast<int>(task.r1 - task.r0);
    tile.k = s.k;
    tile.w.dtype = ops_.x2.dtype();
    tile.w.stride_n = ops_.x2.stride(1);
    tile.w.rows = s.k;
    tile.scale_ld = tables_.n_padded();
    tile.group_rows = tables_.group_rows();
    const int source = s.mode != Mode::weight_quant ? 0 : ops_.offset ? 2 : 1;
    for (std::int64_t j0 = task.p0 * nr_; j0 < std::min(s.n, task.p1 * nr_); j0 += 16) {
      tile.w.data = x2_at(0, j0);
      tile.w.cols = static_cast<int>(std::min<std::int64_t>(16, s.n - j0));
      if (s.mode == Mode::weight_quant) {
        tile.w.scale = tables_.scale_row(0, j0);
        tile.w.offset = tables_.offset_row(0, j0);
      }
      TileEpilogue epilogue;
      epilogue.bias = tables_.bias() != nullptr ? tables_.bias() + j0 : nullptr;
      epilogue.x3 = x3 != nullptr ? x3 + (task.r0 * ops_.x3->stride(0) + j0) * out_elem : nullptr;
      epilogue.x3_ld = ops_.x3 ? ops_.x3->stride(0) : 0;
      epilogue.dst = static_cast<unsigned char*>(dst) + ((task.r0 - m0) * ld + j0) * out_elem;
      epilogue.dst_ld = ld;
      epilogue.out_dtype = s.out_dtype;
      tile.epilogue = &epilogue;
      kernels_.columns[source][tile.rows - 1](tile);
    }
  }

  GemmOperands ops_;
  const PairKernelTable& kernels_;
  PoolLease pool_;
  std::int64_t mr_, nr_, panels_count_, pairs_;
  ColumnTables tables_;
  std::int64_t kc_pairs_, mc_, nc_panels_;
  bool streamed_ = false;
  bool int8_ = false;                      // weight-only int8: packed as int8 pairs
  std::shared_ptr<PairPanels> owned_;      // the packing this call made, if any
  const PairPanels* panels_ = nullptr;     // the one it reads (owned_ or the operands')
  mutable std::mutex compute_mutex_;
};

}  // namespace

std::unique_ptr<PreparedGemm> prepare_pair_gemm(const GemmOperands& operands,
                                                const PairKernelTable& kernels, int threads) {
  return std::make_unique<PairGemm>(operands, kernels, threads);
}

}  // namespace tpfuse::gemm
