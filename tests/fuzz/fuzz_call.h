// One operator call decoded from fuzz bytes: every tensor argument's dtype,
// shape, strides and pointer, the scalar options, and memory behind the views
// that are small enough to back. Each byte picks one choice, and a zero byte
// (also what a short input reads past its end) picks what the contract asks
// for, so the empty input is a valid call and every mutation departs from
// the contract in one place.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "tpfuse/core/tensor.h"
#include "tpfuse/ops/mm_all_reduce_base.h"

namespace tpfuse::fuzz {

// The tensor arguments, in the order the decoder reads them.
enum class Arg : int { x1, x2, bias, antiquant_scale, antiquant_offset, x3, dequant_scale, out };
inline constexpr int kArgCount = 8;
const char* arg_name(Arg arg);

// How a tensor argument was described: no memory yet.
struct ArgSpec {
  bool present = false;
  DType dtype = DType::f16;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> strides;
  bool null_data = false;
  // out only: -1, or the argument whose memory `out` starts inside.
  int alias_of = -1;
  std::int64_t alias_offset = 0;  // bytes into that argument's memory
};

// A value written into one element before the call (NaN, inf, ...).
struct Special {
  Arg arg = Arg::x1;
  std::int64_t element = 0;  // reduced modulo the argument's element count
  int kind = 0;
};

struct CallSpec {
  std::array<ArgSpec, kArgCount> args;
  std::string reduce_op = "sum";
  std::int64_t comm_turn = 0;
  std::int64_t group_size = 0;
  std::uint32_t seed = 0;
  std::optional<Special> special;

  const ArgSpec& arg(Arg a) const { return args[static_cast<int>(a)]; }
  ArgSpec& arg(Arg a) { return args[static_cast<int>(a)]; }
};

// Decodes bytes into a call; never fails (missing bytes read as zero).
CallSpec decode_call(std::span<const std::uint8_t> bytes);

// The lowest and highest byte a view can touch, [begin, end), computed
// exactly (no overflow); nullopt for a view with a negative dim or stride or
// an unknown dtype. Zero bytes when any dim is 0.
struct Extent {
  __int128 elements = 0;
  __int128 bytes = 0;  // (largest element offset + 1) * element size
};
std::optional<Extent> extent_of(const ArgSpec& spec);

// The call's tensors: each present argument gets memory of exactly its extent
// (so AddressSanitizer flags any read past what the view describes) when that
// is at most kMaxBackedBytes, and otherwise points into a small dummy buffer
// that nothing may read.
inline constexpr std::int64_t kMaxBackedBytes = 1 << 20;

struct MaterializedCall {
  std::array<std::optional<TensorView>, kArgCount> views;
  std::array<bool, kArgCount> backed{};  // the view's whole extent is real memory
  MmAllReduceOptions options;
  bool all_backed() const;

  std::vector<std::unique_ptr<std::byte[]>> storage;
};

// Builds the views and fills backed memory with values in the ranges of the
// contract's typical inputs (see fill in materialize.cc), then writes the special
// value, if any.
MaterializedCall materialize(const CallSpec& spec);

// "x1 [4, 32] f16 strides [32, 1]" for every present argument, and the options.
std::string describe_call(const CallSpec& spec);

}  // namespace tpfuse::fuzz
