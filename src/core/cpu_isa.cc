// CPU feature detection for tpfuse's kernels. A feature counts only when the
// CPU has it and the OS saves its registers (XCR0), so a kernel never runs
// where its instructions would fault.
#include "core/cpu_isa.h"

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define TPFUSE_X86 1
#endif

#include "tpfuse/core/config.h"
#include "tpfuse/core/error.h"

namespace tpfuse {

namespace {

const EnvSetting<std::string> kIsaSetting{"TPFUSE_ISA", "",
                                          "cap on the instruction set of every kernel (GEMM, "
                                          "all-reduce): portable, avx2, avx512 or avx512_dl"};

#ifdef TPFUSE_X86
struct CpuidRegs {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
};

CpuidRegs cpuid(unsigned leaf, unsigned subleaf) {
  CpuidRegs r;
  if (!__get_cpuid_count(leaf, subleaf, &r.eax, &r.ebx, &r.ecx, &r.edx)) return CpuidRegs{};
  return r;
}

// The register state the OS saves on context switches (XCR0).
std::uint64_t os_saved_state() {
  std::uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<std::uint64_t>(hi) << 32) | lo;
}

bool bit(unsigned reg, int index) { return ((reg >> index) & 1u) != 0; }

CpuFeatures detect() {
  CpuFeatures f;
  const CpuidRegs leaf1 = cpuid(1, 0);
  const bool osxsave = bit(leaf1.ecx, 27);
  if (!osxsave) return f;
  const std::uint64_t xcr0 = os_saved_state();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;            // SSE and AVX state
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;          // + opmask, ZMM0-15 high, ZMM16-31
  const bool os_tiles = (xcr0 & 0x60000) == 0x60000;  // AMX tile config and data
  const bool fma = bit(leaf1.ecx, 12), f16c = bit(leaf1.ecx, 29), avx = bit(leaf1.ecx, 28);
  const CpuidRegs leaf7 = cpuid(7, 0);
  const bool avx2 = bit(leaf7.ebx, 5), bmi2 = bit(leaf7.ebx, 8);
  f.avx2 = os_ymm && avx && avx2 && fma && f16c && bmi2;
  const bool avx512f = bit(leaf7.ebx, 16), avx512dq = bit(leaf7.ebx, 17);
  const bool avx512bw = bit(leaf7.ebx, 30), avx512vl = bit(leaf7.ebx, 31);
  f.avx512 = f.avx2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl;
  f.avx512_vnni = f.avx512 && bit(leaf7.ecx, 11);
  const CpuidRegs leaf7_1 = cpuid(7, 1);
  f.avx512_bf16 = f.avx512 && bit(leaf7_1.eax, 5);
  f.amx_bf16 = f.avx512 && os_tiles && bit(leaf7.edx, 22) && bit(leaf7.edx, 24);
  return f;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

IsaLevel detected_isa() {
  const CpuFeatures& f = cpu_features();
  if (f.avx512 && (f.avx512_bf16 || f.avx512_vnni)) return IsaLevel::avx512_dl;
  if (f.avx512) return IsaLevel::avx512;
  if (f.avx2) return IsaLevel::avx2;
  return IsaLevel::portable;
}

IsaLevel active_isa() {
  static const IsaLevel level = [] {
    const IsaLevel detected = detected_isa();
    const std::string& wanted = kIsaSetting.get();
    if (wanted.empty()) return detected;
    const std::optional<IsaLevel> parsed = parse_isa(wanted);
    require(parsed.has_value(), "TPFUSE_ISA: expected portable, avx2, avx512 or avx512_dl, got \"",
            wanted, "\"");
    require(*parsed <= detected, "TPFUSE_ISA=", wanted, ": this CPU supports at most ",
            isa_name(detected));
    return *parsed;
  }();
  return level;
}

std::string_view isa_name(IsaLevel level) {
  switch (level) {
    case IsaLevel::portable:
      return "portable";
    case IsaLevel::avx2:
      return "avx2";
    case IsaLevel::avx512:
      return "avx512";
    case IsaLevel::avx512_dl:
      return "avx512_dl";
  }
  return "?";
}

std::optional<IsaLevel> parse_isa(std::string_view name) {
  for (IsaLevel level : {IsaLevel::portable, IsaLevel::avx2, IsaLevel::avx512, IsaLevel::avx512_dl}) {
    if (name == isa_name(level)) return level;
  }
  return std::nullopt;
}

}  // namespace tpfuse
