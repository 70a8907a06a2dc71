// The fp32 engine: the loops around the micro-kernel (microkernel.h), in the
// BLIS arrangement. Full quant runs here too where no oneDNN int8 kernel
// does: int8 values convert exactly to fp32, and the micro-kernel's integer
// sums keep the int32 result exact.
//
// prepare (once per call) puts x2 where the micro-kernel reads it, in one of
// four layouts:
//   packed_f32     panels of NR columns, [panel][k][NR] fp32, converted and
//                  dequantized once. For large m: the kernel then reads B at
//                  full speed, and the conversion is paid once for m rows.
//   in_place       x2 itself (row-major only), converted or dequantized by
//                  the kernel as it loads it. For small m (decode), where
//                  reading the weight once is the whole cost: no copy, and an
//                  int8 weight reads a quarter of the bytes of fp32 panels.
//                  Only a ragged last panel is copied, padded.
//   dot            x2 itself, transposed ([n, k] storage, the usual layout of
//                  a weight): for small m, the dot micro-kernel reads its
//                  rows in place. Not for full quant (its lane sums could
//                  exceed fp32's exact integers).
//   packed_source  panels of NR columns in x2's own dtype: small m, full
//                  quant, x2 neither row-major nor a transposed row-major.
// The layout depends on the call's m and x2's strides only, never on the rows
// asked for, so a row's result does not depend on them either.
//
// compute_rows splits [m0, m1) x [0, n) among as many threads as its work is
// worth (by column panels, or by rows when there are few panels:
// work_split.h), and each thread runs
//   for each block of nc_panels panels        (B block: shared by row blocks)
//     for each block of mc rows               (A block and fp32 sums: L2)
//       for each kc-step of k                 (B micro-panel kc x NR: L1)
//         pack A (fp32 micro-panels of MR rows)
//         for each panel, for each MR rows: the micro-kernel
// The last kc-step finishes each tile with the epilogue, straight into dst.
#include "gemm/float_gemm.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>

#include "gemm/aligned_buffer.h"
#include "gemm/operand_access.h"
#include "gemm/thread_pool.h"
#include "gemm/work_split.h"
#include "tpfuse/core/error.h"

namespace tpfuse::gemm {

namespace {

enum class BLayout { packed_f32, in_place, packed_source, dot };

// At most this many rows per call: x2 is read by the kernel as stored.
constexpr std::int64_t kSmallM = 64;

// Rows of a row-major x2 packed per step (divides 32, the smallest group).
constexpr std::int64_t kPackRows = 16;

struct Blocking {
  std::int64_t kc = 0;         // k per micro-kernel call
  std::int64_t mc = 0;         // rows per A block (a multiple of MR)
  std::int64_t nc_panels = 0;  // panels per B block
  bool pack_a_whole_k = false; // pack an A block's whole k once, not per kc-step
};

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

BFormat format_of(DType dtype) {
  switch (dtype) {
    case DType::f16:
      return BFormat::f16;
    case DType::bf16:
      return BFormat::bf16;
    case DType::i8:
      return BFormat::i8;
    case DType::f32:
      return BFormat::f32;
    default:
      throw InternalError(cat("float gemm: no B format for ", dtype_name(dtype)));
  }
}

BLayout choose_layout(const GemmOperands& ops) {
  const bool row_major = ops.x2.stride(1) == 1;
  const bool transposed = ops.x2.stride(0) == 1 && !row_major;
  if (ops.shape.m > kSmallM) return BLayout::packed_f32;
  if (row_major) return BLayout::in_place;
  if (transposed && ops.shape.mode != Mode::full_quant) return BLayout::dot;
  return BLayout::packed_source;
}

// All of x2 as fp32 panels, [panel][k][NR] (the packed_f32 layout).
struct FloatPanels final : PackedX2 {
  AlignedBuffer<float> values;
  std::size_t bytes() const override { return values.size() * sizeof(float); }
};

class FloatGemm final : public PreparedGemm {
 public:
  FloatGemm(const GemmOperands& operands, const KernelTable& kernels, int threads)
      : ops_(operands),
        kernels_(kernels),
        row_scales_(row_scales(operands)),
        pool_(lease_pool(threads)) {
    const GemmProblem& s = ops_.shape;
    mr_ = kernels_.mr;
    nr_ = kernels_.nr;
    panels_ = ceil_div(s.n, nr_);
    n_padded_ = panels_ * nr_;
    x2_elem_ = dtype_size(ops_.x2.dtype());
    layout_ = choose_layout(ops_);
    group_rows_ = s.scale_kind == ScaleKind::per_group ? s.group_size : s.k;
    blocking_ = choose_blocking();
    if (s.mode == Mode::full_quant) {
      prepare_full_quant();
    } else {
      prepare_bias();
    }
    if (s.mode == Mode::weight_quant) prepare_dequant();
    pack_b();
  }

  // Named on first use: a call that never asks pays nothing for the text.
  const char* engine() const override {
    std::call_once(engine_named_, [this] {
      engine_name_ =
          cat(isa_name(kernels_.isa), "_", ops_.shape.mode == Mode::weight_quant ? "wq_" : "",
              dtype_name(ops_.shape.in_dtype), "_", layout_name());
    });
    return engine_name_.c_str();
  }
  std::shared_ptr<const PackedX2> packing() const override { return owned_; }

  void compute_rows(std::int64_t m0, std::int64_t m1, void* dst, std::int64_t ld) const override {
    if (m1 <= m0) return;
    std::lock_guard lock(compute_mutex_);
    if (layout_ == BLayout::dot) {
      const std::vector<Task> tasks =
          split_columns(m0, m1, ceil_div(ops_.shape.n, kDotCols), threads_for(m0, m1));
      pool_->run(static_cast<int>(tasks.size()), [&](int index, int) {
        compute_dot_task(tasks[static_cast<std::size_t>(index)], m0, dst, ld);
      });
      return;
    }
    const std::vector<Task> tasks =
        split_work(m0, m1, panels_, mr_, blocking_.mc, threads_for(m0, m1));
    pool_->run(static_cast<int>(tasks.size()), [&](int index, int) {
      compute_task(tasks[static_cast<std::size_t>(index)], m0, dst, ld);
    });
  }

 private:
  struct Scratch {
    AlignedBuffer<float> a;    // packed A block
    AlignedBuffer<float> acc;  // fp32 sums of an A block x B block between kc-steps
  };

  const char* layout_name() const {
    switch (layout_) {
      case BLayout::packed_f32:
        return "packed";
      case BLayout::in_place:
        return "in_place";
      case BLayout::packed_source:
        return "packed_source";
      case BLayout::dot:
        return "dot";
    }
    return "?";
  }

  Blocking choose_blocking() const {
    Blocking b;
    if (layout_ == BLayout::packed_f32) {
      // The B micro-panel (192 x NR fp32: 24 KiB for NR = 32) stays in L1 while
      // mc / MR row panels stream by (14 KiB each at MR = 14: 48 KiB L1 holds
      // both); the A block (mc x 192) and the sums stay in L2.
      b.kc = 192;
      b.mc = mr_ * 12;
      b.nc_panels = std::max<std::int64_t>(1, 1024 / nr_);
    } else if (layout_ == BLayout::in_place) {
      // Short kc-steps across all panels: B is read as kc rows streaming side by
      // side, which the prefetchers follow; A (few rows) is packed once.
      b.kc = 16;
      b.mc = ceil_div(kSmallM, mr_) * mr_;
      b.nc_panels = panels_;
      b.pack_a_whole_k = true;
    } else {
      b.kc = 256;
      b.mc = ceil_div(kSmallM, mr_) * mr_;
      b.nc_panels = std::max<std::int64_t>(1, 1024 / nr_);
    }
    return b;
  }

  // ---- prepare ----

  void prepare_bias() {
    if (!ops_.bias) return;
    bias_.resize(static_cast<std::size_t>(n_padded_));
    std::fill(bias_.data(), bias_.data() + n_padded_, 0.0f);
    for (std::int64_t j = 0; j < ops_.shape.n; ++j) bias_.data()[j] = load_as_f32(*ops_.bias, j);
  }

  // Full quant: the epilogue's fp32 dequant scale per column; and for a
  // kernel reading int8 B itself, "dequant" scales of one.
  void prepare_full_quant() {
    const GemmProblem& s = ops_.shape;
    dequant_scales_.resize(static_cast<std::size_t>(n_padded_));
    for (std::int64_t j = 0; j < s.n; ++j) {
      const std::int64_t index = s.scale_kind == ScaleKind::per_tensor ? 0 : j;
      dequant_scales_.data()[j] = ops_.scale->dtype() == DType::i64
                                      ? unpack_quant_scale(ops_.scale->data_as<const std::int64_t>()[index])
                                      : load_as_f32(*ops_.scale, index);
    }
    scales_.resize(static_cast<std::size_t>(n_padded_));
    std::fill(scales_.data(), scales_.data() + n_padded_, 1.0f);
  }

  // fp32 scales and offsets, [group][n_padded].
  void prepare_dequant() {
    const GemmProblem& s = ops_.shape;
    const std::int64_t groups = ceil_div(s.k, group_rows_);
    const auto count = static_cast<std::size_t>(groups * n_padded_);
    scales_.resize(count);
    std::fill(scales_.data(), scales_.data() + count, 0.0f);
    if (ops_.offset) {
      offsets_.resize(count);
      std::fill(offsets_.data(), offsets_.data() + count, 0.0f);
    }
    for (std::int64_t g = 0; g < groups; ++g) {
      for (std::int64_t j = 0; j < s.n; ++j) {
        const std::int64_t index = scale_index(s, g * group_rows_, j);
        scales_.data()[g * n_padded_ + j] = load_as_f32(*ops_.scale, index);
        if (ops_.offset) offsets_.data()[g * n_padded_ + j] = load_as_f32(*ops_.offset, index);
      }
    }
  }

  const float* scale_row(std::int64_t l, std::int64_t panel) const {
    return scales_.data() + (l / group_rows_) * n_padded_ + panel * nr_;
  }
  const float* offset_row(std::int64_t l, std::int64_t panel) const {
    return ops_.offset ? offsets_.data() + (l / group_rows_) * n_padded_ + panel * nr_ : nullptr;
  }

  const unsigned char* x2_at(std::int64_t l, std::int64_t j) const {
    return static_cast<const unsigned char*>(ops_.x2.data()) +
           (l * ops_.x2.stride(0) + j * ops_.x2.stride(1)) * static_cast<std::int64_t>(x2_elem_);
  }

  void pack_b() {
    const std::int64_t k = ops_.shape.k;
    const auto elem = static_cast<std::int64_t>(x2_elem_);
    if (layout_ == BLayout::packed_f32) {
      if (const auto* given = dynamic_cast<const FloatPanels*>(ops_.packed)) {
        panels_f32_ = given->values.data();
        return;
      }
      owned_ = std::make_shared<FloatPanels>();
      owned_->values.resize(static_cast<std::size_t>(panels_ * k * nr_));
      packed_f32_ = owned_->values.data();
      panels_f32_ = packed_f32_;
      if (ops_.x2.stride(1) == 1) {
        // Row-major x2: read it in row order (contiguous), writing all panels.
        const std::int64_t blocks = ceil_div(k, kPackRows);
        run_chunks(blocks, [&](std::int64_t block) { pack_rows_f32(block * kPackRows); });
      } else {
        // Transposed x2: read it in column order, one panel at a time.
        run_chunks(panels_, [&](std::int64_t p) { pack_panel_f32(p); });
      }
    } else if (layout_ == BLayout::packed_source) {
      packed_source_.resize(static_cast<std::size_t>(panels_ * k * nr_ * elem));
      run_chunks(panels_, [&](std::int64_t p) { pack_panel_source(p, packed_source_.data() + p * k * nr_ * elem); });
    } else if (layout_ == BLayout::in_place && ops_.shape.n % nr_ != 0) {
      packed_source_.resize(static_cast<std::size_t>(k * nr_ * elem));
      pack_panel_source(panels_ - 1, packed_source_.data());
    }
  }

  // Runs body(i) for i in [0, count), in contiguous chunks over the threads.
  template <class Body>
  void run_chunks(std::int64_t count, const Body& body) {
    const int chunks = static_cast<int>(std::min<std::int64_t>(count, pool_->size() * 4));
    pool_->run(chunks, [&](int chunk, int) {
      const std::int64_t end = count * (chunk + 1) / chunks;
      for (std::int64_t i = count * chunk / chunks; i < end; ++i) body(i);
    });
  }

  BSource panel_source(std::int64_t l, std::int64_t p, std::int64_t rows) const {
    BSource src;
    src.data = x2_at(l, p * nr_);
    src.dtype = ops_.x2.dtype();
    src.stride_k = ops_.x2.stride(0);
    src.stride_n = ops_.x2.stride(1);
    src.rows = rows;
    src.cols = static_cast<int>(std::min<std::int64_t>(nr_, ops_.shape.n - p * nr_));
    if (ops_.shape.mode == Mode::weight_quant) {
      src.scale = scale_row(l, p);
      src.offset = offset_row(l, p);
    }
    return src;
  }

  // Rows [l0, l0 + kPackRows) of every panel as fp32 (a dequant group never
  // starts inside such a block: groups are multiples of 32 rows).
  void pack_rows_f32(std::int64_t l0) const {
    const std::int64_t rows = std::min(kPackRows, ops_.shape.k - l0);
    for (std::int64_t p = 0; p < panels_; ++p) {
      kernels_.pack_b_f32(panel_source(l0, p, rows), packed_f32_ + (p * ops_.shape.k + l0) * nr_);
    }
  }

  // Panel p as fp32, dequantized one group at a time.
  void pack_panel_f32(std::int64_t p) const {
    const std::int64_t k = ops_.shape.k;
    const std::int64_t step = ops_.shape.mode == Mode::weight_quant ? group_rows_ : k;
    for (std::int64_t l0 = 0; l0 < k; l0 += step) {
      kernels_.pack_b_f32(panel_source(l0, p, std::min(step, k - l0)),
                          packed_f32_ + (p * k + l0) * nr_);
    }
  }

  // Panel p in x2's dtype, [k][NR], columns past n zero.
  void pack_panel_source(std::int64_t p, unsigned char* out) const {
    const GemmProblem& s = ops_.shape;
    const std::int64_t cols = std::min<std::int64_t>(nr_, s.n - p * nr_);
    const auto elem = static_cast<std::int64_t>(x2_elem_);
    std::memset(out, 0, static_cast<std::size_t>(s.k * nr_ * elem));
    if (ops_.x2.stride(1) == 1) {
      for (std::int64_t l = 0; l < s.k; ++l) {
        std::memcpy(out + l * nr_ * elem, x2_at(l, p * nr_), static_cast<std::size_t>(cols * elem));
      }
    } else if (elem == 2) {
      transpose_columns(static_cast<const std::uint16_t*>(static_cast<const void*>(x2_at(0, p * nr_))), cols,
                        reinterpret_cast<std::uint16_t*>(out));
    } else {
      transpose_columns(static_cast<const std::int8_t*>(static_cast<const void*>(x2_at(0, p * nr_))), cols,
                        reinterpret_cast<std::int8_t*>(out));
    }
  }

  // Column j of a transposed x2 (contiguous along k) into out[l * NR + j].
  template <class T>
  void transpose_columns(const T* first_column, std::int64_t cols, T* out) const {
    const std::int64_t column_stride = ops_.x2.stride(1);
    for (std::int64_t j = 0; j < cols; ++j) {
      const T* column = first_column + j * column_stride;
      for (std::int64_t l = 0; l < ops_.shape.k; ++l) out[l * nr_ + j] = column[l];
    }
  }

  // ---- compute ----

  // The call's threads, the fewest its work is worth (work_split.h).
  std::int64_t threads_for(std::int64_t m0, std::int64_t m1) const {
    return threads_for_work(pool_->size(), m1 - m0, ops_.shape.n, ops_.shape.k);
  }

  // The dot layout: rows [r0, r1) x column blocks [p0, p1) of kDotCols.
  void compute_dot_task(const Task& task, std::int64_t m0, void* dst, std::int64_t ld) const {
    const GemmProblem& s = ops_.shape;
    const std::int64_t rows = task.r1 - task.r0;
    thread_local AlignedBuffer<float> a_rows;
    a_rows.resize(static_cast<std::size_t>(rows * s.k));
    const auto* x1 = static_cast<const unsigned char*>(ops_.x1.data());
    const auto x1_elem = static_cast<std::int64_t>(dtype_size(ops_.x1.dtype()));
    for (std::int64_t r = 0; r < rows; ++r) {
      kernels_.convert_to_f32(ops_.x1.dtype(), x1 + (task.r0 + r) * ops_.x1.stride(0) * x1_elem, s.k,
                              a_rows.data() + r * s.k);
    }
    const bool dequantize = s.mode == Mode::weight_quant;
    const DotKernel* dot = dequantize && ops_.offset ? kernels_.dot_i8_with_offset
                                                     : kernels_.dot[static_cast<int>(format_of(ops_.x2.dtype()))];
    const std::int64_t out_elem = static_cast<std::int64_t>(dtype_size(s.out_dtype));
    const auto* x3 = ops_.x3 ? static_cast<const unsigned char*>(ops_.x3->data()) : nullptr;
    auto* out = static_cast<unsigned char*>(dst);
    for (std::int64_t block = task.p0; block < task.p1; ++block) {
      const std::int64_t j0 = block * kDotCols;
      for (std::int64_t i = task.r0; i < task.r1; i += kMaxDotRows) {
        TileEpilogue epilogue;
        epilogue.bias = ops_.bias ? bias_.data() + j0 : nullptr;
        epilogue.x3 = x3 != nullptr ? x3 + (i * ops_.x3->stride(0) + j0) * out_elem : nullptr;
        epilogue.x3_ld = ops_.x3 ? ops_.x3->stride(0) : 0;
        epilogue.dst = out + ((i - m0) * ld + j0) * out_elem;
        epilogue.dst_ld = ld;
        epilogue.out_dtype = s.out_dtype;
        DotTile tile;
        tile.k = s.k;
        tile.a = a_rows.data() + (i - task.r0) * s.k;
        tile.a_ld = s.k;
        tile.w = x2_at(0, j0);
        tile.w_ld = ops_.x2.stride(1);
        if (dequantize) {
          tile.scale = scales_.data() + j0;
          tile.offset = ops_.offset ? offsets_.data() + j0 : nullptr;
          tile.scale_ld = n_padded_;
          tile.group_rows = group_rows_;
        }
        tile.rows = static_cast<int>(std::min<std::int64_t>(kMaxDotRows, task.r1 - i));
        tile.cols = static_cast<int>(std::min<std::int64_t>(kDotCols, s.n - j0));
        tile.epilogue = &epilogue;
        // The last rows of this block of columns: the next block's follow.
        if (i + kMaxDotRows >= task.r1 && block + 1 < task.p1)
          tile.prefetch = x2_at(0, j0 + kDotCols);
        dot[tile.rows - 1](tile);
      }
    }
  }

  struct BOrigin {
    const void* data;
    std::int64_t ld;
  };

  BOrigin b_origin(std::int64_t p, std::int64_t l) const {
    const std::int64_t k = ops_.shape.k;
    switch (layout_) {
      case BLayout::packed_f32:
        return {panels_f32_ + (p * k + l) * nr_, nr_};
      case BLayout::packed_source:
        return {packed_source_.data() + (p * k + l) * nr_ * static_cast<std::int64_t>(x2_elem_), nr_};
      case BLayout::dot:
        break;
      case BLayout::in_place:
        if (p == panels_ - 1 && ops_.shape.n % nr_ != 0) {
          return {packed_source_.data() + l * nr_ * static_cast<std::int64_t>(x2_elem_), nr_};
        }
        return {x2_at(l, p * nr_), ops_.x2.stride(0)};
    }
    throw InternalError("float gemm: unknown layout");
  }

  // The micro-kernels for this call's B, by row count - 1.
  const MicroKernel* kernels_by_rows() const {
    if (layout_ == BLayout::packed_f32) return kernels_.tile[static_cast<int>(BFormat::f32)];
    if (ops_.shape.mode == Mode::weight_quant && ops_.offset) return kernels_.tile_i8_with_offset;
    return kernels_.tile[static_cast<int>(format_of(ops_.x2.dtype()))];
  }

  // The kc-step starting at l: never across a dequant group when the kernel
  // dequantizes (its scales are fixed for the call), nor across a chunk of
  // packed A.
  std::int64_t step_at(std::int64_t l) const {
    std::int64_t kc = std::min(blocking_.kc, ops_.shape.k - l);
    kc = std::min(kc, kPackedAStride - l % kPackedAStride);
    if (layout_ != BLayout::packed_f32 && ops_.shape.mode == Mode::weight_quant) {
      kc = std::min(kc, (l / group_rows_ + 1) * group_rows_ - l);
    }
    return kc;
  }

  // Packs rows [r0, r1) x columns [l0, l0 + len) of x1 as panels of MR rows,
  // each in chunks of kPackedAStride columns: see a_at().
  void pack_a_block(std::int64_t r0, std::int64_t r1, std::int64_t l0, std::int64_t len,
                    float* out) const {
    const std::size_t elem = dtype_size(ops_.x1.dtype());
    const auto* x1 = static_cast<const unsigned char*>(ops_.x1.data());
    const std::int64_t chunks = ceil_div(len, kPackedAStride);
    for (std::int64_t r = r0; r < r1; r += mr_) {
      for (std::int64_t c = 0; c < chunks; ++c) {
        ASource src;
        src.dtype = ops_.x1.dtype();
        src.ld = ops_.x1.stride(0);
        src.data = x1 + (r * src.ld + l0 + c * kPackedAStride) * static_cast<std::int64_t>(elem);
        src.rows = static_cast<int>(std::min<std::int64_t>(mr_, r1 - r));
        src.kc = std::min(kPackedAStride, len - c * kPackedAStride);
        kernels_.pack_a(src, out + ((r - r0) / mr_ * chunks + c) * mr_ * kPackedAStride);
      }
    }
  }

  // Row panel `panel`, column l (relative to the block's first) of a block
  // packed by pack_a_block with len columns.
  const float* a_at(const float* block, std::int64_t len, std::int64_t panel, std::int64_t l) const {
    const std::int64_t chunks = ceil_div(len, kPackedAStride);
    return block + ((panel * chunks + l / kPackedAStride) * mr_) * kPackedAStride + l % kPackedAStride;
  }

  void compute_task(const Task& task, std::int64_t m0, void* dst, std::int64_t ld) const {
    const GemmProblem& s = ops_.shape;
    const MicroKernel* run_tile = kernels_by_rows();
    const std::int64_t out_elem = static_cast<std::int64_t>(dtype_size(s.out_dtype));
    const std::int64_t a_len_max = blocking_.pack_a_whole_k ? s.k : std::min(s.k, blocking_.kc);
    const std::int64_t block_rows = std::min(blocking_.mc, ceil_div(task.r1 - task.r0, mr_) * mr_);
    // Per thread and kept across calls: no allocation (nor page faults) per call.
    thread_local Scratch scratch;
    scratch.a.resize(static_cast<std::size_t>(block_rows * ceil_div(a_len_max, kPackedAStride) * kPackedAStride));
    const bool sums_between_steps = step_at(0) < s.k;
    if (sums_between_steps) {
      scratch.acc.resize(static_cast<std::size_t>(block_rows * std::min(blocking_.nc_panels, task.p1 - task.p0) * nr_));
    }
    const auto* x3 = ops_.x3 ? static_cast<const unsigned char*>(ops_.x3->data()) : nullptr;
    const std::int64_t x3_ld = ops_.x3 ? ops_.x3->stride(0) : 0;
    auto* out = static_cast<unsigned char*>(dst);

    for (std::int64_t jc = task.p0; jc < task.p1; jc += blocking_.nc_panels) {
      const std::int64_t jend = std::min(task.p1, jc + blocking_.nc_panels);
      const std::int64_t acc_ld = (jend - jc) * nr_;
      for (std::int64_t ic = task.r0; ic < task.r1; ic += blocking_.mc) {
        const std::int64_t iend = std::min(task.r1, ic + blocking_.mc);
        std::int64_t a_start = 0, a_len = 0;
        for (std::int64_t pc = 0; pc < s.k;) {
          const std::int64_t kc = step_at(pc);
          if (!blocking_.pack_a_whole_k) {
            a_start = pc;
            a_len = kc;
            pack_a_block(ic, iend, pc, kc, scratch.a.data());
          } else if (pc == 0) {
            a_len = s.k;
            pack_a_block(ic, iend, 0, s.k, scratch.a.data());
          }
          const bool last = pc + kc == s.k;
          for (std::int64_t p = jc; p < jend; ++p) {
            const BOrigin b = b_origin(p, pc);
            const bool dequantize = s.mode != Mode::plain && layout_ != BLayout::packed_f32;
            for (std::int64_t ir = ic; ir < iend; ir += mr_) {
              MicroTile tile;
              tile.kc = kc;
              tile.a = a_at(scratch.a.data(), a_len, (ir - ic) / mr_, pc - a_start);
              tile.b = b.data;
              tile.b_ld = b.ld;
              if (dequantize) {
                tile.b_scale = scale_row(pc, p);
                tile.b_offset = offset_row(pc, p);
              }
              // k in one step: the epilogue takes the sums, and the buffer
              // of them may not exist (nor may its null address be offset).
              if (sums_between_steps) tile.acc = scratch.acc.data() + (ir - ic) * acc_ld + (p - jc) * nr_;
              tile.acc_ld = acc_ld;
              tile.accumulate = pc > 0;
              tile.integer_sums = s.mode == Mode::full_quant;
              tile.mr = static_cast<int>(std::min<std::int64_t>(mr_, iend - ir));
              tile.nr = static_cast<int>(std::min<std::int64_t>(nr_, s.n - p * nr_));
              TileEpilogue epilogue;
              if (last) {
                if (s.mode == Mode::full_quant) {
                  epilogue.bias_i32 = ops_.bias ? ops_.bias->data_as<const std::int32_t>() + p * nr_ : nullptr;
                  epilogue.scale = dequant_scales_.data() + p * nr_;
                  epilogue.row_scale = row_scales_ != nullptr ? row_scales_ + ir : nullptr;
                } else {
                  epilogue.bias = ops_.bias ? bias_.data() + p * nr_ : nullptr;
                }
                epilogue.x3 = x3 != nullptr ? x3 + (ir * x3_ld + p * nr_) * out_elem : nullptr;
                epilogue.x3_ld = x3_ld;
                epilogue.dst = out + ((ir - m0) * ld + p * nr_) * out_elem;
                epilogue.dst_ld = ld;
                epilogue.out_dtype = s.out_dtype;
                tile.epilogue = &epilogue;
              }
              run_tile[tile.mr - 1](tile);
            }
          }
          pc += kc;
        }
      }
    }
  }

  GemmOperands ops_;
  const KernelTable& kernels_;
  const float* row_scales_ = nullptr;  // full quant: per row of x1, or null
  std::int64_t mr_ = 0, nr_ = 0, panels_ = 0, n_padded_ = 0;
  std::size_t x2_elem_ = 0;
  BLayout layout_ = BLayout::packed_f32;
  Blocking blocking_;
  std::int64_t group_rows_ = 0;
  mutable std::once_flag engine_named_;
  mutable std::string engine_name_;
  AlignedBuffer<float> bias_, scales_, offsets_, dequant_scales_;
  std::shared_ptr<FloatPanels> owned_;  // the fp32 panels this call packed, if any
  float* packed_f32_ = nullptr;         // where pack_b writes them
  const float* panels_f32_ = nullptr;   // the panels the kernels read (owned_ or the operands')
  AlignedBuffer<unsigned char> packed_source_;
  PoolLease pool_;
  mutable std::mutex compute_mutex_;
};

}  // namespace

bool float_gemm_reads_x2_in_place(const GemmOperands& operands) {
  const BLayout layout = choose_layout(operands);
  return layout == BLayout::in_place || layout == BLayout::dot;
}

std::unique_ptr<PreparedGemm> prepare_float_gemm(const GemmOperands& operands,
                                                 const KernelTable& kernels, int threads) {
  return std::make_unique<FloatGemm>(operands, kernels, threads);
}

}  // namespace tpfuse::gemm
