// Which instruction sets tpfuse's kernels may use on this CPU, the GEMM's and
// the all-reduce's alike: detected once (cpuid, and xgetbv for the registers
// the OS saves), optionally capped by TPFUSE_ISA to test lower levels on a
// better machine.
#pragma once

#include <optional>
#include <string_view>

namespace tpfuse {

// Ordered: each level includes everything below it.
enum class IsaLevel : int {
  portable = 0,  // any CPU: Highway's emulated 128-bit vectors
  avx2 = 1,      // AVX2 + FMA + F16C + BMI2
  avx512 = 2,    // AVX-512 F, BW, DQ, VL
  avx512_dl = 3, // AVX-512 with BF16 and/or VNNI: oneDNN's bf16 / int8 engines
};

struct CpuFeatures {
  bool avx2 = false;         // with FMA, F16C, BMI2 and OS support for YMM
  bool avx512 = false;       // F, BW, DQ, VL and OS support for ZMM and masks
  bool avx512_bf16 = false;
  bool avx512_vnni = false;
  bool amx_bf16 = false;     // AMX tiles with BF16, and OS support for their state
};

// What this CPU and OS support (detected once).
const CpuFeatures& cpu_features();

// The best level cpu_features() allows.
IsaLevel detected_isa();

// detected_isa(), lowered to TPFUSE_ISA when that is set (read once). Asking
// for a level the CPU lacks is an InvalidArgument.
IsaLevel active_isa();

std::string_view isa_name(IsaLevel level);
std::optional<IsaLevel> parse_isa(std::string_view name);

}  // namespace tpfuse
