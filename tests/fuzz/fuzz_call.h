// One operator call decoded from fuzz bytes: which operator (mm_all_reduce_base
// or one of the family of docs/SEMANTICS-FAMILY.md, in its allocating, _out or
// in-place form), every tensor argument's dtype, shape, strides and pointer,
// the scalar options, and memory behind the views that are small enough to
// back. Each byte picks one choice, and a zero byte (also what a short input
// reads past its end) picks what the contract asks for, so the empty input is
// a valid call and every mutation departs from the contract in one place.
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
#include "tpfuse/ops/family.h"
#include "tpfuse/ops/mm_all_reduce_base.h"

namespace tpfuse::fuzz {

// The operator called. The in-place form of mm_all_reduce_add_rms_norm is
// an operator of its own here; the others' _out forms are chosen by the
// presence of their outputs (call_form).
enum class Op : int {
  mm_all_reduce_base,
  all_gather_base_mm,
  mm_reduce_scatter_base,
  mm_all_reduce_add_rms_norm,
  mm_all_reduce_add_rms_norm_in_place
};
const char* op_name(Op op);

// The tensor arguments of every operator, in the order the decoder reads
// them: mm_all_reduce_base's (`out` is its output), then the family's.
// `output` is the output of all_gather_base_mm and mm_reduce_scatter_base.
enum class Arg : int {
  x1,
  x2,
  bias,
  antiquant_scale,
  antiquant_offset,
  x3,
  dequant_scale,
  out,
  x1_scale,
  x2_scale,
  residual,
  gamma,
  output,
  gather_out,
  y,
  norm_out
};
inline constexpr int kArgCount = 16;
const char* arg_name(Arg arg);
bool is_output(Arg arg);
// The outputs, and residual (written by the in-place form): the arguments
// that may be placed inside another one.
bool can_alias(Arg arg);
// Whether `op` has the argument `arg` (any of its forms).
bool takes(Op op, Arg arg);

// How a tensor argument was described: no memory yet.
struct ArgSpec {
  bool present = false;
  DType dtype = DType::f16;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> strides;
  bool null_data = false;
  // can_alias() only: -1, or the argument whose memory this one starts inside.
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
  Op op = Op::mm_all_reduce_base;
  std::array<ArgSpec, kArgCount> args;
  std::string reduce_op = "sum";
  std::int64_t comm_turn = 0;
  std::int64_t group_size = 0;  // antiquant_group_size
  // all_gather_base_mm and mm_reduce_scatter_base:
  std::int64_t world_size = 1;
  std::optional<DType> output_dtype;  // any code, the enum's or not
  std::string comm_mode;
  // all_gather_base_mm:
  std::int64_t gather_index = 0;
  bool gather_output = true;
  // mm_all_reduce_add_rms_norm:
  double epsilon = 1e-6;
  std::uint32_t seed = 0;
  std::optional<Special> special;

  const ArgSpec& arg(Arg a) const { return args[static_cast<int>(a)]; }
  ArgSpec& arg(Arg a) { return args[static_cast<int>(a)]; }
};

// The form of the call: the _out form when one of the operator's outputs is
// given (the others are then passed empty: a view without data, or none).
enum class Form { allocating, out, in_place };
Form call_form(const CallSpec& spec);

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
  std::array<std::int64_t, kArgCount> bytes{};  // of backed memory the argument owns, else 0
  // The options of the call's operator.
  MmAllReduceOptions options;
  AllGatherMmOptions all_gather;
  MmReduceScatterOptions reduce_scatter;
  MmAllReduceAddRmsNormOptions add_rms_norm;
  bool all_backed() const;
  // The argument's view, or an empty one (no data) when absent.
  TensorView view(Arg arg) const;

  std::vector<std::unique_ptr<std::byte[]>> storage;
};

// Builds the views and fills backed memory with values in the ranges of the
// contract's typical inputs (see fill in materialize.cc), then writes the special
// value, if any.
MaterializedCall materialize(const CallSpec& spec);

// The operator, "x1 [4, 32] f16 strides [32, 1]" for every present argument,
// and the options.
std::string describe_call(const CallSpec& spec);

}  // namespace tpfuse::fuzz
