// The tile-GEMM interface the operator computes through.
//
// prepare_gemm() takes the validated operands of one call and does the
// per-call work once (converting or dequantizing and packing x2, unpacking
// scales). compute_rows() then produces rows [m0, m1) of one rank's partial
//   plain:        x1 @ x2 + bias + x3
//   weight quant: x1 @ ((x2 + offset) * scale) + bias + x3
//   full quant:   scale * (x1 @ x2 + bias) + x3       (int32 product and bias)
// accumulated in fp32 (int32), with the epilogue applied in fp32 in that order
// and rounded once to the output dtype, written to dst with row stride ld
// (elements). With a row scale, full quant's scale of element (i, j) is
// row_scale[i] * scale[j], one fp32 product taken before it multiplies the
// sum. A row's result never depends on the range it was computed in.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>

#include "tpfuse/core/tensor.h"
#include "tpfuse/gemm/problem.h"

namespace tpfuse::gemm {

// x2 prepared once for many calls (tpfuse::PackedWeight): the packing the
// engine for many rows on this CPU makes in every call, kept (pack_x2()). An
// engine given the packing it makes uses it instead, for every call whose
// rows take a path that reads it; the results are the same bits as an
// unpacked call's.
class PackedX2 {
 public:
  virtual ~PackedX2() = default;
  // The memory the packing holds.
  virtual std::size_t bytes() const = 0;
};

struct GemmOperands {
  GemmProblem shape;
  TensorView x1;  // [m, k] (a 3-D x1 viewed as 2-D), row-major
  TensorView x2;  // [k, n], row-major or transposed
  std::optional<TensorView> bias;    // [n]
  std::optional<TensorView> x3;      // [m, n]
  // antiquant_scale, or dequant_scale (full quant: i64 packed by
  // trans_quant_param, bf16 or f32; [1] or [n] / [1, n])
  std::optional<TensorView> scale;
  std::optional<TensorView> offset;  // antiquant_offset
  // Full quant only: [m] f32, one per row of x1 (a per-token activation
  // scale), contiguous; or none.
  std::optional<TensorView> row_scale;
  // Threads this rank's GEMM may use; 0: default_gemm_threads(1). Results do
  // not depend on it.
  int threads = 0;
  // x2 packed before by pack_x2() for these operands, or null.
  const PackedX2* packed = nullptr;
};

// The thread count for one rank: TPFUSE_NUM_THREADS when set, else
// share_of_cores() of the cores this process may run on, the host's (its
// cgroup's cpuset, else the cores online) and the ranks on this host.
int default_gemm_threads(int ranks_on_host);

// A rank's share of its `mine` cores: divided among the ranks of the host
// that share them, assuming the host's ranks are spread evenly over its
// `host` cores. Every rank may run anywhere (mine == host): each gets
// host / ranks. Ranks bound to parts of the host (mpirun --bind-to socket,
// blocks of cores): each gets its part divided among the ranks bound to it,
// ranks * mine / host of them. Bound one per core: 1. At least 1.
int share_of_cores(int mine, int host, int ranks_on_host);

class PreparedGemm {
 public:
  virtual ~PreparedGemm() = default;
  // Concurrent calls on one prepared GEMM are safe but run one after another.
  virtual void compute_rows(std::int64_t m0, std::int64_t m1, void* dst, std::int64_t ld) const = 0;
  // The engine's name, for logs and benchmarks ("reference", "avx512_f16", ...).
  virtual const char* engine() const = 0;
  // The packing of x2 this GEMM made (for pack_x2), or null.
  virtual std::shared_ptr<const PackedX2> packing() const { return nullptr; }
};

// Chooses the engine for the operands on this CPU and prepares it.
std::unique_ptr<PreparedGemm> prepare_gemm(const GemmOperands& operands);

// Packs x2 (with its scales) as the engine for many rows of these operands
// reads it; operands.shape.m and x1's data are not used. Null where that
// engine reads x2 as it is stored.
std::shared_ptr<const PackedX2> pack_x2(const GemmOperands& operands);

}  // namespace tpfuse::gemm
