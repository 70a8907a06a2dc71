// The oneDNN engines. The output is cut into chunks of up to kChunkRows rows
// x kSliceCols columns; each chunk is one single-threaded oneDNN matmul into
// a per-thread fp32 (bf16 mode) or int32 (full quant) buffer that stays in
// cache, which tpfuse's epilogue then finishes into dst. Chunks are spread
// over tpfuse's threads; oneDNN's own OpenMP threading is held to one thread
// around every oneDNN call, since a oneDNN primitive with several threads may
// split k among them, and then a result would depend on the thread count.
//
// bf16: x2 is reordered once per call, slice by slice, into the blocked
// layout oneDNN's brgemm kernel chooses for it, and every chunk runs brgemm
// on that layout.
//
// int8: each chunk's matmul takes x2 as stored (s8 x s8): reordering it in
// every call cost more than it saved (Zen 5, one thread, against a single
// oneDNN matmul: 0.90-0.97x as stored at 16 to 2048 rows of n = k = 4096 or
// 2048^3, 0.29-0.90x reordered). A packed weight holds x2 reordered once;
// calls with it run as u8 x s8, the form VNNI multiplies: x1 + 128 (its
// sign bit flipped), and 128 * (column sum of x2) taken back in the int32
// bias the epilogue adds anyway (with s8 x1 oneDNN wants a compensation it
// keeps in the weights' layout, which it cannot reorder a column slice
// into). 1.03x the single matmul at 2048^3. The bias is int32, added before
// any scale, so per-row scales multiply the same int32 sums either way.
//
// Why the results do not depend on the row range:
//   int8: the int32 sums are exact whatever order oneDNN adds them in (k <=
//     65535 keeps them in range; VNNI's products and sums do not saturate
//     for u8 x s8), and the compensation is exact in wrapping int32.
//   bf16: every chunk runs brgemm on the same layout, whose order of
//     additions per element depends on k and that layout only, not on the
//     chunk's rows (gemm_test checks this; oneDNN's gemm-based kernel, which
//     it picks for plain strided bf16 weights, uses a different order for
//     one-row inputs and is therefore never used).
#include "gemm/onednn_gemm.h"

#include <omp.h>

#include <algorithm>
#include <dnnl.hpp>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "gemm/aligned_buffer.h"
#include "gemm/operand_access.h"
#include "gemm/thread_pool.h"
#include "gemm/work_split.h"
#include "tpfuse/core/error.h"

namespace tpfuse::gemm {

namespace {

using dnnl_dt = dnnl::memory::data_type;

constexpr std::int64_t kChunkRows = 256;
constexpr std::int64_t kSliceCols = 1024;

// Holds OpenMP, and so oneDNN, to one thread in this thread while alive.
class OneOmpThread {
 public:
  OneOmpThread() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~OneOmpThread() { omp_set_num_threads(saved_); }
  OneOmpThread(const OneOmpThread&) = delete;
  OneOmpThread& operator=(const OneOmpThread&) = delete;

 private:
  int saved_;
};

// One CPU engine for the process, and one stream per thread (a stream is
// not to be shared by threads executing at the same time).
const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& thread_stream() {
  thread_local dnnl::stream stream(cpu_engine());
  return stream;
}

// x2 reordered slice by slice into the layout brgemm chose for it; for int8
// also the sum of each of its columns (the compensation for x1's shift).
struct OneDnnSlices final : PackedX2 {
  std::map<std::int64_t, dnnl::memory::desc> descs;  // by slice width
  std::vector<AlignedBuffer<unsigned char>> storage;  // by slice
  std::vector<dnnl::memory> memories;                 // by slice
  AlignedBuffer<std::int32_t> column_sums;
  std::size_t bytes() const override {
    std::size_t total = column_sums.size() * sizeof(std::int32_t);
    for (const auto& buffer : storage) total += buffer.size();
    return total;
  }
};

struct Chunk {
  std::int64_t r0, rows, slice;
};

class OneDnnGemm final : public PreparedGemm {
 public:
  OneDnnGemm(const GemmOperands& operands, const KernelTable& kernels, int threads)
      : ops_(operands),
        kernels_(kernels),
        row_scales_(row_scales(operands)),
        pool_(lease_pool(threads)),
        engine_(cpu_engine()) {
    const GemmProblem& s = ops_.shape;
    full_quant_ = s.mode == Mode::full_quant;
    const auto* given = dynamic_cast<const OneDnnSlices*>(ops_.packed);
    int8_as_stored_ = full_quant_ && given == nullptr;
    in_type_ = !full_quant_ ? dnnl_dt::bf16 : int8_as_stored_ ? dnnl_dt::s8 : dnnl_dt::u8;
    weight_type_ = full_quant_ ? dnnl_dt::s8 : dnnl_dt::bf16;
    sum_type_ = full_quant_ ? dnnl_dt::s32 : dnnl_dt::f32;
    in_elem_ = dtype_size(ops_.x1.dtype());
    slices_ = (s.n + kSliceCols - 1) / kSliceCols;
    if (given != nullptr) {
      slices_x2_ = given;
    } else if (!int8_as_stored_) {
      owned_ = std::make_shared<OneDnnSlices>();
      pack_weights(*owned_);
      if (full_quant_) sum_columns(owned_->column_sums);
      slices_x2_ = owned_.get();
    }
    prepare_epilogue();
  }

  const char* engine() const override { return full_quant_ ? "onednn_s8" : "onednn_bf16"; }
  std::shared_ptr<const PackedX2> packing() const override { return owned_; }

  void compute_rows(std::int64_t m0, std::int64_t m1, void* dst, std::int64_t ld) const override {
    if (m1 <= m0) return;
    std::lock_guard lock(compute_mutex_);
    if (shifted_x1()) shift_rows(m0, m1);
    std::vector<Chunk> chunks;
    for (std::int64_t slice = 0; slice < slices_; ++slice) {
      for (std::int64_t r = m0; r < m1; r += kChunkRows) {
        chunks.push_back({r, std::min(kChunkRows, m1 - r), slice});
      }
    }
    if (threads_for_work(pool_->size(), m1 - m0, ops_.shape.n, ops_.shape.k) == 1) {
      for (const Chunk& chunk : chunks) compute_chunk(chunk, m0, dst, ld);
      return;
    }
    pool_->run(static_cast<int>(chunks.size()), [&](int index, int) {
      compute_chunk(chunks[static_cast<std::size_t>(index)], m0, dst, ld);
    });
  }

 private:
  // Per thread and kept across calls.
  struct Scratch {
    AlignedBuffer<float> sums;  // fp32 or int32, chunk rows x slice columns
    AlignedBuffer<unsigned char> scratchpad;
  };

  struct Matmul {
    dnnl::matmul::primitive_desc pd;
    dnnl::matmul primitive;
  };

  std::int64_t slice_cols(std::int64_t slice) const {
    return std::min(kSliceCols, ops_.shape.n - slice * kSliceCols);
  }

  // x2's columns of one slice, as stored by the caller.
  dnnl::memory::desc x2_slice_desc(std::int64_t cols) const {
    return dnnl::memory::desc({ops_.shape.k, cols}, weight_type_, {ops_.x2.stride(0), ops_.x2.stride(1)});
  }
  void* x2_slice_data(std::int64_t slice) const {
    return static_cast<unsigned char*>(ops_.x2.data()) +
           slice * kSliceCols * ops_.x2.stride(1) * static_cast<std::int64_t>(in_elem_);
  }

  void prepare_epilogue() {
    const GemmProblem& s = ops_.shape;
    if (full_quant_) {
      scales_.resize(static_cast<std::size_t>(s.n));
      const bool per_tensor = s.scale_kind == ScaleKind::per_tensor;
      for (std::int64_t j = 0; j < s.n; ++j) {
        const std::int64_t index = per_tensor ? 0 : j;
        scales_.data()[j] = ops_.scale->dtype() == DType::i64
                                ? unpack_quant_scale(ops_.scale->data_as<const std::int64_t>()[index])
                                : load_as_f32(*ops_.scale, index);
      }
      if (!int8_as_stored_) prepare_compensation();
    } else if (ops_.bias) {
      bias_.resize(static_cast<std::size_t>(s.n));
      for (std::int64_t j = 0; j < s.n; ++j) bias_.data()[j] = load_as_f32(*ops_.bias, j);
    }
  }

  // The sum of each column of an int8 x2.
  void sum_columns(AlignedBuffer<std::int32_t>& out) const {
    const GemmProblem& s = ops_.shape;
    out.resize(static_cast<std::size_t>(s.n));
    const auto* x2 = static_cast<const std::int8_t*>(ops_.x2.data());
    const std::int64_t sk = ops_.x2.stride(0), sn = ops_.x2.stride(1);
    const std::int64_t chunks = std::min<std::int64_t>(s.n, pool_->size() * 4);
    pool_->run(static_cast<int>(chunks), [&](int chunk, int) {
      const std::int64_t j0 = s.n * chunk / chunks, j1 = s.n * (chunk + 1) / chunks;
      // (__restrict: an int8 pointer may alias anything, which would keep
      // the compiler from vectorising the sums.)
      std::int32_t* __restrict sums = out.data() + j0;
      std::fill(sums, sums + (j1 - j0), 0);
      if (sn == 1) {
        for (std::int64_t l = 0; l < s.k; ++l) {
          const std::int8_t* __restrict row = x2 + l * sk + j0;
          for (std::int64_t j = 0; j < j1 - j0; ++j) sums[j] += row[j];
        }
      } else {
        for (std::int64_t j = 0; j < j1 - j0; ++j) {
          const std::int8_t* __restrict column = x2 + (j0 + j) * sn;
          std::int32_t sum = 0;
          for (std::int64_t l = 0; l < s.k; ++l) sum += column[l];
          sums[j] = sum;
        }
      }
    });
  }

  // The int32 bias the epilogue adds for int8: bias - 128 * (column sum of
  // x2), wrapping as the int32 sums do (x1 runs shifted up by 128).
  void prepare_compensation() {
    const GemmProblem& s = ops_.shape;
    compensated_bias_.resize(static_cast<std::size_t>(s.n));
    const std::int32_t* sums = slices_x2_->column_sums.data();
    for (std::int64_t j = 0; j < s.n; ++j) {
      const std::uint32_t bias = ops_.bias ? static_cast<std::uint32_t>(ops_.bias->data_as<const std::int32_t>()[j]) : 0u;
      compensated_bias_.data()[j] = static_cast<std::int32_t>(bias - 128u * static_cast<std::uint32_t>(sums[j]));
    }
  }

  // x1 runs shifted up by 128 (u8 x s8): int8 on a reordered x2.
  bool shifted_x1() const { return full_quant_ && !int8_as_stored_; }

  // Rows [m0, m1) of x1 + 128 as u8 (the sign bit flipped), rows dense.
  void shift_rows(std::int64_t m0, std::int64_t m1) const {
    const std::int64_t k = ops_.shape.k;
    shifted_.resize(static_cast<std::size_t>((m1 - m0) * k));
    const auto* x1 = static_cast<const std::uint8_t*>(ops_.x1.data());
    std::uint8_t* out = shifted_.data();
    const std::int64_t ld = ops_.x1.stride(0);
    const std::int64_t chunks = std::min<std::int64_t>(m1 - m0, pool_->size() * 4);
    pool_->run(static_cast<int>(chunks), [&](int chunk, int) {
      for (std::int64_t r = (m1 - m0) * chunk / chunks; r < (m1 - m0) * (chunk + 1) / chunks; ++r) {
        const std::uint8_t* __restrict row = x1 + (m0 + r) * ld;
        std::uint8_t* __restrict shifted = out + r * k;
        for (std::int64_t l = 0; l < k; ++l) shifted[l] = static_cast<std::uint8_t>(row[l] ^ 0x80u);
      }
    });
  }

  // The matmul of `rows` x1 rows with one slice; weights in `weights` layout.
  Matmul make_matmul(std::int64_t rows, std::int64_t cols, const dnnl::memory::desc& weights) const {
    OneOmpThread one_thread;
    const std::int64_t src_ld = shifted_x1() ? ops_.shape.k : ops_.x1.stride(0);
    const dnnl::memory::desc src({rows, ops_.shape.k}, in_type_, {src_ld, 1});
    const dnnl::memory::desc sums({rows, cols}, sum_type_, {cols, 1});
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, weights, sums), attr, engine_);
    return {pd, dnnl::matmul(pd)};
  }

  // Every slice reordered once into the layout brgemm picks for it.
  void pack_weights(OneDnnSlices& out) const {
    const std::int64_t widths[] = {slice_cols(0), slice_cols(slices_ - 1)};
    for (std::int64_t cols : widths) {
      if (out.descs.count(cols) != 0) continue;
      const dnnl::memory::desc any({ops_.shape.k, cols}, weight_type_, dnnl::memory::format_tag::any);
      const Matmul probe = make_matmul(std::min(ops_.shape.m, kChunkRows), cols, any);
      require_brgemm(probe.pd.impl_info_str());
      out.descs.emplace(cols, probe.pd.weights_desc());
    }
    out.memories.resize(static_cast<std::size_t>(slices_));
    out.storage.resize(static_cast<std::size_t>(slices_));
    pool_->run(static_cast<int>(slices_), [&](int slice, int) {
      OneOmpThread one_thread;
      const std::int64_t cols = slice_cols(slice);
      const dnnl::memory::desc& desc = out.descs.at(cols);
      AlignedBuffer<unsigned char>& storage = out.storage[static_cast<std::size_t>(slice)];
      storage.resize(desc.get_size());
      dnnl::memory source(x2_slice_desc(cols), engine_, x2_slice_data(slice));
      dnnl::memory packed(desc, engine_, storage.data());
      dnnl::reorder(source, packed).execute(thread_stream(), source, packed);
      thread_stream().wait();
      out.memories[static_cast<std::size_t>(slice)] = packed;
    });
  }

  static void require_brgemm(const std::string& impl) {
    if (impl.rfind("brg", 0) != 0) {
      throw InternalError(cat("onednn: expected oneDNN's brgemm matmul, got ", impl));
    }
  }

  const Matmul& matmul_for(std::int64_t rows, std::int64_t cols) const {
    std::lock_guard lock(cache_mutex_);
    const auto key = std::make_pair(rows, cols);
    auto it = matmuls_.find(key);
    if (it == matmuls_.end()) {
      Matmul made = make_matmul(rows, cols, int8_as_stored_ ? x2_slice_desc(cols) : slices_x2_->descs.at(cols));
      if (!int8_as_stored_) require_brgemm(made.pd.impl_info_str());
      it = matmuls_.emplace(key, std::move(made)).first;
    }
    return it->second;
  }

  void compute_chunk(const Chunk& chunk, std::int64_t m0, void* dst, std::int64_t ld) const {
    const GemmProblem& s = ops_.shape;
    const std::int64_t cols = slice_cols(chunk.slice);
    const Matmul& mm = matmul_for(chunk.rows, cols);
    thread_local Scratch slot;
    slot.sums.resize(static_cast<std::size_t>(chunk.rows * cols));
    slot.scratchpad.resize(std::max<std::size_t>(1, mm.pd.scratchpad_desc().get_size()));
    {
      OneOmpThread one_thread;
      auto* x1 = shifted_x1() ? shifted_.data() + (chunk.r0 - m0) * s.k
                             : static_cast<unsigned char*>(ops_.x1.data()) +
                                   chunk.r0 * ops_.x1.stride(0) * static_cast<std::int64_t>(in_elem_);
      dnnl::memory src(mm.pd.src_desc(), engine_, x1);
      dnnl::memory weights = int8_as_stored_
                                 ? dnnl::memory(mm.pd.weights_desc(), engine_, x2_slice_data(chunk.slice))
                                 : slices_x2_->memories[static_cast<std::size_t>(chunk.slice)];
      dnnl::memory sums(mm.pd.dst_desc(), engine_, slot.sums.data());
      dnnl::memory scratchpad(mm.pd.scratchpad_desc(), engine_, slot.scratchpad.data());
      dnnl::stream& stream = thread_stream();
      mm.primitive.execute(stream, {{DNNL_ARG_SRC, src},
                                    {DNNL_ARG_WEIGHTS, weights},
                                    {DNNL_ARG_DST, sums},
                                    {DNNL_ARG_SCRATCHPAD, scratchpad}});
      stream.wait();
    }
    const std::int64_t col0 = chunk.slice * kSliceCols;
    const std::int64_t out_elem = static_cast<std::int64_t>(dtype_size(s.out_dtype));
    TileEpilogue epilogue;
    epilogue.out_dtype = s.out_dtype;
    epilogue.dst = static_cast<unsigned char*>(dst) + ((chunk.r0 - m0) * ld + col0) * out_elem;
    epilogue.dst_ld = ld;
    if (ops_.x3) {
      epilogue.x3 = static_cast<const unsigned char*>(ops_.x3->data()) +
                    (chunk.r0 * ops_.x3->stride(0) + col0) * out_elem;
      epilogue.x3_ld = ops_.x3->stride(0);
    }
    if (full_quant_) {
      epilogue.bias_i32 = int8_as_stored_ ? (ops_.bias ? ops_.bias->data_as<const std::int32_t>() + col0 : nullptr)
                                          : compensated_bias_.data() + col0;
      epilogue.scale = scales_.data() + col0;
      epilogue.row_scale = row_scales_ != nullptr ? row_scales_ + chunk.r0 : nullptr;
      kernels_.finish_i32(chunk.rows, cols, reinterpret_cast<const std::int32_t*>(slot.sums.data()),
                          cols, epilogue);
    } else {
      epilogue.bias = ops_.bias ? bias_.data() + col0 : nullptr;
      kernels_.finish_f32(chunk.rows, cols, slot.sums.data(), cols, epilogue);
    }
  }

  GemmOperands ops_;
  const KernelTable& kernels_;
  const float* row_scales_ = nullptr;  // full quant: per row of x1, or null
  PoolLease pool_;
  dnnl::engine engine_;
  bool full_quant_ = false;
  // int8 with x2 handed to each matmul as stored (s8 x s8, oneDNN's own
  // compensation), where no packed weight is given.
  bool int8_as_stored_ = false;
  dnnl_dt in_type_ = dnnl_dt::bf16;
  dnnl_dt weight_type_ = dnnl_dt::bf16;
  dnnl_dt sum_type_ = dnnl_dt::f32;
  std::size_t in_elem_ = 0;
  std::int64_t slices_ = 0;
  std::shared_ptr<OneDnnSlices> owned_;      // the reordered x2 this call made, if any
  const OneDnnSlices* slices_x2_ = nullptr;  // the one it reads (owned_ or the operands')
  AlignedBuffer<float> bias_, scales_;
  AlignedBuffer<std::int32_t> compensated_bias_;
  mutable AlignedBuffer<std::uint8_t> shifted_;
  mutable std::mutex compute_mutex_, cache_mutex_;
  mutable std::map<std::pair<std::int64_t, std::int64_t>, Matmul> matmuls_;
};

}  // namespace

std::unique_ptr<PreparedGemm> prepare_onednn_gemm(const GemmOperands& operands,
                                                  const KernelTable& kernels, int threads) {
  return std::make_unique<OneDnnGemm>(operands, kernels, threads);
}

}  // namespace tpfuse::gemm
