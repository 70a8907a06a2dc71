// Engine selection: the one place that decides which engine computes a call.
//
//   f16 plain, weight-only int8      tpfuse's fp32 micro-kernels (float_gemm)
//   bf16 plain                       oneDNN where the CPU has AMX-BF16,
//                                    else the fp32 micro-kernels
//   int8 full quant                  oneDNN where the CPU has AVX512-VNNI,
//                                    else the fp32 micro-kernels, exactly
//   any mode, few rows (decode)      the fp32 micro-kernels where they read
//                                    x2 in place
// (The reference engine computes nothing here: it is the tests' yardstick.)
// The micro-kernels come from the table of the level asked for.
#include <sched.h>

#include <algorithm>

#include "gemm/engines.h"
#include "gemm/float_gemm.h"
#include "gemm/microkernel.h"
#include "gemm/onednn_gemm.h"
#include "tpfuse/core/config.h"
#include "tpfuse/core/error.h"

namespace tpfuse::gemm {

namespace {

const EnvSetting<std::int64_t> kNumThreads{
    "TPFUSE_NUM_THREADS", 0,
    "GEMM threads per rank (default: the cores available divided among the ranks on this host)"};

// Full quant with VNNI: up to this many rows, the micro-kernels reading x2 in
// place beat oneDNN (measured at n = k = 4096: 33 against 28 GFLOP/s at 4
// rows, 39 against 52 at 8).
constexpr std::int64_t kInPlaceInt8Rows = 4;

int cores_available() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return std::max(1, CPU_COUNT(&set));
}

}  // namespace

int default_gemm_threads(int ranks_on_host) {
  const std::int64_t forced = kNumThreads.get();
  require(forced >= 0, "TPFUSE_NUM_THREADS must be >= 0, got ", forced);
  if (forced > 0) return static_cast<int>(std::min<std::int64_t>(forced, 1024));
  return std::max(1, cores_available() / std::max(1, ranks_on_host));
}

std::unique_ptr<PreparedGemm> prepare_gemm_for_isa(const GemmOperands& operands, IsaLevel level) {
  const int threads = operands.threads > 0 ? operands.threads : default_gemm_threads(1);
  const KernelTable& kernels = kernels_for(level);
  // oneDNN reorders (bf16) or copies (int8) x2 on every call: for few rows,
  // reading x2 in place costs less than that copy alone. VNNI's int8 kernel
  // does four times the work per instruction of the fp32 micro-kernels, and
  // wins back its copy from a few rows on.
  const bool read_in_place = float_gemm_reads_x2_in_place(operands) &&
                             (operands.shape.mode != Mode::full_quant || operands.shape.m <= kInPlaceInt8Rows);
  const bool onednn_pays = level >= IsaLevel::avx512_dl && !read_in_place;
  switch (operands.shape.mode) {
    case Mode::full_quant:
      if (onednn_pays && cpu_features().avx512_vnni) return prepare_onednn_gemm(operands, kernels, threads);
      return prepare_float_gemm(operands, kernels, threads);
    case Mode::plain:
      // oneDNN's bf16 matmul pays where it runs on AMX tiles. On AVX512-BF16
      // alone it ran at 0.6x the fp32 micro-kernels fed bf16 (one thread,
      // 2048^3: 74.5 against 124.6 GFLOP/s; 256x4096x2048: 60.7 against 109.4).
      if (operands.shape.in_dtype == DType::bf16 && onednn_pays && cpu_features().amx_bf16) {
        return prepare_onednn_gemm(operands, kernels, threads);
      }
      return prepare_float_gemm(operands, kernels, threads);
    case Mode::weight_quant:
      return prepare_float_gemm(operands, kernels, threads);
  }
  throw InternalError("prepare_gemm: unknown mode");
}

std::unique_ptr<PreparedGemm> prepare_gemm(const GemmOperands& operands) {
  return prepare_gemm_for_isa(operands, active_isa());
}

}  // namespace tpfuse::gemm
