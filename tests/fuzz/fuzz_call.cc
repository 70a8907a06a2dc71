// Decoding fuzz bytes into a call (materialize.cc backs its views with
// memory). The byte layout (each byte one choice, zero = what the contract
// asks for):
//   0 mode   1 m   2 k   3 n   4-5 b and s of a 3-D x1   6 flags
//   7 scale layout   8 antiquant_group_size   9 comm_turn   10 reduce_op
//   11 seed of the values   12-15 a special value (NaN, inf, ...)
//   then per argument of mm_all_reduce_base (x1, x2, bias, antiquant_scale,
//   antiquant_offset, x3, dequant_scale, out): presence, dtype, shape edit
//   (2), strides edit (2), null pointer; and for out, two bytes placing it
//   inside an input;
//   74 the operator (0: mm_all_reduce_base, so that inputs written for it
//   alone decode as before)   75 world_size   76 gather_index
//   77 gather_output   78 output_dtype   79 comm_mode   80 epsilon
//   then the same bytes per argument of the family (x1_scale, x2_scale,
//   residual, gamma, output, gather_out, y, norm_out), the outputs and
//   residual (which the in-place form writes) with two bytes placing them
//   inside an earlier argument.
#include "fuzz_call.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "tpfuse/core/error.h"

namespace tpfuse::fuzz {

namespace {

constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
constexpr std::int64_t kMin = std::numeric_limits<std::int64_t>::min();

class ByteReader {
 public:
  explicit ByteReader(std::span<const std::uint8_t> bytes) : bytes_(bytes) {}
  std::uint8_t next() { return pos_ < bytes_.size() ? bytes_[pos_++] : 0; }
  std::uint8_t at(std::size_t pos) const { return pos < bytes_.size() ? bytes_[pos] : 0; }

 private:
  std::span<const std::uint8_t> bytes_;
  std::size_t pos_ = 0;
};

// Sizes that sit on the edges validation must get right: zero, negatives,
// the full-quant k limit, and products that overflow int64 at every width.
constexpr std::int64_t kEdgeSizes[] = {0,
                                       -1,
                                       -2,
                                       192,
                                       255,
                                       256,
                                       257,
                                       511,
                                       512,
                                       1000,
                                       4095,
                                       4096,
                                       65535,
                                       65536,
                                       65537,
                                       (std::int64_t{1} << 31) - 1,
                                       std::int64_t{1} << 31,
                                       std::int64_t{1} << 32,
                                       (std::int64_t{1} << 32) + 1,
                                       std::int64_t{1} << 40,
                                       std::int64_t{1} << 48,
                                       std::int64_t{1} << 53,
                                       std::int64_t{1} << 61,
                                       std::int64_t{1} << 62,
                                       (std::int64_t{1} << 62) + 1,
                                       3 * (std::int64_t{1} << 61),
                                       kMax,
                                       kMax - 1,
                                       kMin,
                                       kMin + 1};

// 0: `fallback`; 1..160: itself (small enough to compute); above: an edge size.
std::int64_t size_value(std::uint8_t b, std::int64_t fallback) {
  if (b == 0) return fallback;
  if (b <= 160) return b;
  return kEdgeSizes[(b - 161) % std::size(kEdgeSizes)];
}

std::int64_t wrapping_mul(std::int64_t a, std::int64_t b) {
  return static_cast<std::int64_t>(static_cast<std::uint64_t>(a) * static_cast<std::uint64_t>(b));
}

std::int64_t wrapping_add(std::int64_t a, std::int64_t b) {
  return static_cast<std::int64_t>(static_cast<std::uint64_t>(a) + static_cast<std::uint64_t>(b));
}

std::int64_t ceil_groups(std::int64_t k, std::int64_t group) {
  if (group <= 0 || k <= 0) return 1;
  return static_cast<std::int64_t>((static_cast<__int128>(k) + group - 1) / group);
}

// Row-major strides as TensorView's contiguous constructor computes them
// (wrapping, for shapes whose sizes overflow).
std::vector<std::int64_t> row_major_strides(const std::vector<std::int64_t>& shape) {
  std::vector<std::int64_t> strides(shape.size());
  std::int64_t stride = 1;
  for (std::size_t d = shape.size(); d-- > 0;) {
    strides[d] = stride;
    stride = wrapping_mul(stride, shape[d]);
  }
  return strides;
}

void edit_shape(ArgSpec& spec, std::uint8_t op, std::uint8_t value) {
  if (op == 0) return;
  auto& shape = spec.shape;
  const std::size_t dim = shape.empty() ? 0 : (op >> 4) % shape.size();
  switch (op & 0xF) {
    case 1:
      if (shape.size() < kMaxDims) shape.push_back(size_value(value, 1));
      return;
    case 2:
      if (!shape.empty()) shape.pop_back();
      return;
    case 3:
      if (!shape.empty()) shape.erase(shape.begin());
      return;
    default:
      break;
  }
  if (shape.empty()) return;
  switch (op & 0xF) {
    case 4:
      shape[dim] = wrapping_add(shape[dim], 1);
      return;
    case 5:
      shape[dim] = wrapping_add(shape[dim], -1);
      return;
    case 6:
      shape[dim] = 0;
      return;
    case 7:
      shape[dim] = -1;
      return;
    default:
      shape[dim] = size_value(value, shape[dim]);
  }
}

void edit_strides(ArgSpec& spec, std::uint8_t op, std::uint8_t value) {
  auto& strides = spec.strides;
  if (op == 0 || strides.empty()) return;
  const std::size_t dim = (op >> 3) % strides.size();
  switch (op & 7) {
    case 1:  // the last two dims' strides swapped: a transposed view
      if (strides.size() >= 2) std::swap(strides[strides.size() - 2], strides.back());
      return;
    case 2:
      strides[dim] = size_value(value, strides[dim]);
      return;
    case 3:
      strides[dim] = 0;
      return;
    case 4:
      strides[dim] = -1 - value;
      return;
    case 5:
      strides[dim] = wrapping_mul(strides[dim], 2);
      return;
    case 6:
      strides[dim] = kMax;
      return;
    default:
      strides[dim] = wrapping_add(strides[dim], 1);
  }
}

const char* const kReduceOps[] = {"max", "min",  "prod", "avg",    "",
                                  "SUM", "sum ", " sum", "sumsum", "s"};

std::string reduce_op_value(std::uint8_t b) {
  if (b == 0) return "sum";
  if (b == 1) return std::string("sum\0x", 5);
  if (b == 2) return std::string(300, 'x');
  return kReduceOps[(b - 3) % std::size(kReduceOps)];
}

std::int64_t comm_turn_value(std::uint8_t b, std::int64_t m) {
  const std::int64_t values[] = {
      1, 2, 3, 5, 8, 16, 100, 1 << 20, -1, kMin, kMax, m, wrapping_add(m, 1)};
  return b == 0 ? 0 : values[(b - 1) % std::size(values)];
}

std::int64_t group_value(std::uint8_t b, std::int64_t k, bool per_group) {
  if (b == 0) return per_group ? 32 : 0;
  const std::int64_t below_k = wrapping_add(k, -1);
  const std::int64_t values[] = {32,
                                 64,
                                 96,
                                 128,
                                 16,
                                 48,
                                 0,
                                 -32,
                                 33,
                                 31,
                                 below_k,
                                 k,
                                 wrapping_add(k, 31),
                                 below_k / 32 * 32,
                                 kMax,
                                 kMin,
                                 std::int64_t{1} << 62,
                                 65536};
  return values[(b - 1) % std::size(values)];
}

// Where the operator byte is: after mm_all_reduce_base's bytes.
constexpr std::size_t kOpByte = 74;

Op op_value(std::uint8_t b) {
  return b == 0 ? Op::mm_all_reduce_base : static_cast<Op>(1 + (b - 1) % 4);
}

// 0: the group's size (one rank here).
std::int64_t world_size_value(std::uint8_t b, std::int64_t m) {
  const std::int64_t values[] = {2, 0, -1, 4, 8, 3, m, wrapping_add(m, 1), kMax, kMin};
  return b == 0 ? 1 : values[(b - 1) % std::size(values)];
}

std::int64_t gather_index_value(std::uint8_t b) {
  const std::int64_t values[] = {1, -1, 2, kMax, kMin};
  return b == 0 ? 0 : values[(b - 1) % std::size(values)];
}

// 0: none; else any code, 6 to 9 outside the enum.
std::optional<DType> output_dtype_value(std::uint8_t b) {
  if (b == 0) return std::nullopt;
  return static_cast<DType>((b - 1) % 10);
}

std::string comm_mode_value(std::uint8_t b) {
  const char* const values[] = {"aiv",  "ai_cpu", "AIV",  "ai-cpu", "aicpu", "aiv ",
                                " aiv", "none",   "None", "hccs",   "a"};
  if (b == 0) return "";
  if (b == 1) return std::string("ai_cpu\0", 7);
  if (b == 2) return std::string(300, 'a');
  return values[(b - 3) % std::size(values)];
}

// The edges of (0, 1), in double and once rounded to the fp32 the norm runs in.
double epsilon_value(std::uint8_t b) {
  const double values[] = {std::numeric_limits<double>::quiet_NaN(),
                           -std::numeric_limits<double>::quiet_NaN(),
                           std::numeric_limits<double>::infinity(),
                           -std::numeric_limits<double>::infinity(),
                           0.0,
                           -0.0,
                           1.0,
                           -1.0,
                           -1e-6,
                           0.5,
                           1e-12,
                           std::nextafter(1.0, 0.0),
                           0.99999999,
                           std::numeric_limits<double>::denorm_min(),
                           1e-40,
                           1e-46,
                           std::numeric_limits<float>::min(),
                           std::numeric_limits<double>::max()};
  return b == 0 ? 1e-6 : values[(b - 1) % std::size(values)];
}

}  // namespace

const char* op_name(Op op) {
  static const char* const names[] = {"mm_all_reduce_base", "all_gather_base_mm",
                                      "mm_reduce_scatter_base", "mm_all_reduce_add_rms_norm",
                                      "mm_all_reduce_add_rms_norm_"};
  return names[static_cast<int>(op)];
}

const char* arg_name(Arg arg) {
  static const char* const names[kArgCount] = {"x1",
                                               "x2",
                                               "bias",
                                               "antiquant_scale",
                                               "antiquant_offset",
                                               "x3",
                                               "dequant_scale",
                                               "out",
                                               "x1_scale",
                                               "x2_scale",
                                               "residual",
                                               "gamma",
                                               "output",
                                               "gather_out",
                                               "y",
                                               "norm_out"};
  return names[static_cast<int>(arg)];
}

bool is_output(Arg arg) {
  return arg == Arg::out || arg == Arg::output || arg == Arg::gather_out || arg == Arg::y ||
         arg == Arg::norm_out;
}

bool takes(Op op, Arg arg) {
  switch (op) {
    case Op::mm_all_reduce_base:
      return static_cast<int>(arg) <= static_cast<int>(Arg::out);
    case Op::all_gather_base_mm:
    case Op::mm_reduce_scatter_base:
      return arg == Arg::x1 || arg == Arg::x2 || arg == Arg::bias || arg == Arg::x1_scale ||
             arg == Arg::x2_scale || arg == Arg::output ||
             (arg == Arg::gather_out && op == Op::all_gather_base_mm);
    case Op::mm_all_reduce_add_rms_norm:
    case Op::mm_all_reduce_add_rms_norm_in_place:
      return arg == Arg::x1 || arg == Arg::x2 || arg == Arg::bias || arg == Arg::antiquant_scale ||
             arg == Arg::antiquant_offset || arg == Arg::dequant_scale || arg == Arg::residual ||
             arg == Arg::gamma ||
             ((arg == Arg::y || arg == Arg::norm_out) && op == Op::mm_all_reduce_add_rms_norm);
  }
  return false;
}

bool can_alias(Arg arg) { return is_output(arg) || arg == Arg::residual; }

Form call_form(const CallSpec& spec) {
  if (spec.op == Op::mm_all_reduce_add_rms_norm_in_place) return Form::in_place;
  for (int a = 0; a < kArgCount; ++a) {
    const Arg arg = static_cast<Arg>(a);
    if (is_output(arg) && spec.args[a].present) return Form::out;
  }
  return Form::allocating;
}

namespace {

// One argument's bytes: presence, dtype, the shape and strides edits, a null
// pointer, and for one that may lie inside another (`hosts` > 0), where:
// inside the argument of index (b - 1) % `hosts` when b is not 0.
void decode_arg(ByteReader& in, ArgSpec& spec, bool transposed_x2, int hosts) {
  if (in.next() != 0) spec.present = !spec.present;
  if (const std::uint8_t b = in.next(); b != 0) spec.dtype = static_cast<DType>((b - 1) % 8);
  spec.strides = row_major_strides(spec.shape);
  if (transposed_x2) {
    // A row-major [n, k] viewed as [k, n].
    std::swap(spec.shape[0], spec.shape[1]);
    std::swap(spec.strides[0], spec.strides[1]);
  }
  const std::uint8_t shape_op = in.next(), shape_value = in.next();
  const std::size_t ndim_before = spec.shape.size();
  edit_shape(spec, shape_op, shape_value);
  if (spec.shape.size() != ndim_before) spec.strides = row_major_strides(spec.shape);
  const std::uint8_t stride_op = in.next(), stride_value = in.next();
  edit_strides(spec, stride_op, stride_value);
  spec.null_data = in.next() != 0;
  if (hosts > 0) {
    if (const std::uint8_t b = in.next(); b != 0) spec.alias_of = (b - 1) % hosts;
    spec.alias_offset = in.next();
  }
}

}  // namespace

CallSpec decode_call(std::span<const std::uint8_t> bytes) {
  ByteReader in(bytes);
  CallSpec call;
  call.op = op_value(in.at(kOpByte));
  const bool sequence_parallel =
      call.op == Op::all_gather_base_mm || call.op == Op::mm_reduce_scatter_base;
  // mm_all_reduce_base and add-RMSNorm: plain f16, bf16; weight quant f16,
  // bf16; full quant f16, bf16 out. All-gather and reduce-scatter: plain
  // f16, bf16; the quant path with an i64 or f32 x2_scale, with x1_scale
  // (2, 3) or without (4, 5).
  const int mode = in.next() % 6;
  const bool full_quant = sequence_parallel ? mode >= 2 : mode >= 4;
  const bool weight_quant = !sequence_parallel && (mode == 2 || mode == 3);
  const DType float_dtype = mode % 2 == 0 ? DType::f16 : DType::bf16;
  const DType x1_dtype = full_quant ? DType::i8 : float_dtype;
  const DType out_dtype = float_dtype;

  std::int64_t m = size_value(in.next(), 4);
  const std::int64_t k = size_value(in.next(), 64);
  const std::int64_t n = size_value(in.next(), 16);
  const std::uint8_t batch_byte = in.next();
  const std::uint8_t seq_byte = in.next();
  std::vector<std::int64_t> x1_shape = {m, k};
  std::vector<std::int64_t> out_shape = {m, n};
  std::vector<std::int64_t> residual_shape = {1, m, n};
  if (batch_byte != 0) {
    const std::int64_t b = size_value(batch_byte, 2), s = size_value(seq_byte, 2);
    m = wrapping_mul(b, s);
    x1_shape = {b, s, k};
    out_shape = {b, s, n};
    residual_shape = out_shape;
  }
  const std::uint8_t flags = in.next();
  const bool bias = flags & 1, x3 = flags & 2, offset = flags & 4, transposed = flags & 8;
  const bool out = flags & 16, special = flags & 32;
  const int layout = in.next() % 4;  // per-channel [n], per-tensor [1], [1, n], per-group
  call.group_size = group_value(in.next(), k, weight_quant && layout == 3);
  call.comm_turn = comm_turn_value(in.next(), m);
  call.reduce_op = reduce_op_value(in.next());
  call.seed = in.next();
  // The special value's argument: an input of the operator (outputs hold a
  // sentinel), the byte resolved once the operator's inputs are known.
  std::uint8_t special_arg = 0;
  if (special) {
    Special s;
    special_arg = in.next();
    s.element = in.next();
    s.element |= static_cast<std::int64_t>(in.next()) << 8;
    s.kind = in.next();
    call.special = s;
  } else {
    for (int i = 0; i < 4; ++i) in.next();
  }

  std::vector<std::int64_t> scale_shape = {n};
  if (layout == 1) scale_shape = {1};
  if (layout == 2) scale_shape = {1, n};
  if (layout == 3 && weight_quant) scale_shape = {ceil_groups(k, call.group_size), n};

  auto set = [&](Arg arg, bool present, DType dtype, std::vector<std::int64_t> shape) {
    ArgSpec& spec = call.arg(arg);
    spec.present = present;
    spec.dtype = dtype;
    spec.shape = std::move(shape);
  };
  set(Arg::x1, true, x1_dtype, x1_shape);
  set(Arg::x2, true, full_quant || weight_quant ? DType::i8 : x1_dtype,
      transposed ? std::vector<std::int64_t>{n, k} : std::vector<std::int64_t>{k, n});
  set(Arg::bias, bias, full_quant ? DType::i32 : x1_dtype, {n});
  set(Arg::antiquant_scale, weight_quant, x1_dtype, scale_shape);
  set(Arg::antiquant_offset, weight_quant && offset, x1_dtype, scale_shape);
  set(Arg::x3, x3, out_dtype, out_shape);
  set(Arg::dequant_scale, full_quant, mode == 4 ? DType::i64 : DType::bf16, scale_shape);
  set(Arg::out, out, out_dtype, out_shape);
  for (int a = 0; a <= static_cast<int>(Arg::out); ++a) {
    const bool is_out = static_cast<Arg>(a) == Arg::out;
    decode_arg(in, call.args[a], a == static_cast<int>(Arg::x2) && transposed,
               is_out ? static_cast<int>(Arg::out) : 0);
  }

  in.next();  // the operator, read above
  call.world_size = world_size_value(in.next(), m);
  call.gather_index = gather_index_value(in.next());
  call.gather_output = in.next() % 2 == 0;
  call.output_dtype = output_dtype_value(in.next());
  call.comm_mode = comm_mode_value(in.next());
  call.epsilon = epsilon_value(in.next());

  // The family's quant path: f16 with an i64 x2_scale, else output_dtype
  // when it is f16 or bf16, else bf16.
  const bool packed_scale = mode % 2 == 0;
  DType sequence_out = x1_dtype;
  if (full_quant) {
    const bool picked = call.output_dtype == DType::f16 || call.output_dtype == DType::bf16;
    sequence_out = packed_scale ? DType::f16 : picked ? *call.output_dtype : DType::bf16;
  }
  set(Arg::x1_scale, full_quant && mode < 4, DType::f32, {m, 1});
  set(Arg::x2_scale, full_quant, packed_scale ? DType::i64 : DType::f32, scale_shape);
  set(Arg::residual, true, out_dtype, residual_shape);
  set(Arg::gamma, true, out_dtype, {n});
  set(Arg::output, out, sequence_out, {m, n});
  set(Arg::gather_out, out && call.gather_output, x1_dtype, {m, k});
  set(Arg::y, out, out_dtype, residual_shape);
  set(Arg::norm_out, out, out_dtype, residual_shape);
  for (int a = static_cast<int>(Arg::x1_scale); a < kArgCount; ++a) {
    decode_arg(in, call.args[a], false, can_alias(static_cast<Arg>(a)) ? a : 0);
  }

  std::vector<Arg> inputs;
  for (int a = 0; a < kArgCount; ++a) {
    const Arg arg = static_cast<Arg>(a);
    if (!takes(call.op, arg)) call.args[a].present = false;
    if (takes(call.op, arg) && !is_output(arg)) inputs.push_back(arg);
  }
  if (call.special) call.special->arg = inputs[special_arg % inputs.size()];
  return call;
}

std::string describe_call(const CallSpec& spec) {
  std::string text = cat(op_name(spec.op), "\n");
  auto dims = [](const std::vector<std::int64_t>& values) {
    std::string out = "[";
    for (std::size_t i = 0; i < values.size(); ++i)
      out += (i ? ", " : "") + std::to_string(values[i]);
    return out + "]";
  };
  for (int a = 0; a < kArgCount; ++a) {
    const ArgSpec& arg = spec.args[a];
    if (!arg.present) continue;
    text += cat(arg_name(static_cast<Arg>(a)), " ", dims(arg.shape), " ", dtype_name(arg.dtype),
                "(", static_cast<int>(arg.dtype), ") strides ", dims(arg.strides),
                arg.null_data ? " null" : "");
    if (arg.alias_of >= 0) {
      text += cat(" inside ", arg_name(static_cast<Arg>(arg.alias_of)), " +", arg.alias_offset);
    }
    text += "\n";
  }
  text += cat("reduce_op \"", spec.reduce_op, "\" comm_turn ", spec.comm_turn,
              " antiquant_group_size ", spec.group_size, " seed ", spec.seed);
  if (spec.op != Op::mm_all_reduce_base) {
    const std::string output_dtype =
        spec.output_dtype ? std::to_string(static_cast<int>(*spec.output_dtype)) : "none";
    text += cat("\nworld_size ", spec.world_size, " gather_index ", spec.gather_index,
                " gather_output ", spec.gather_output, " output_dtype ", output_dtype,
                " comm_mode \"", spec.comm_mode, "\" epsilon ", spec.epsilon);
  }
  if (spec.special) {
    text += cat(" special ", spec.special->kind % 6, " in ", arg_name(spec.special->arg), "[",
                spec.special->element, "]");
  }
  return text;
}

}  // namespace tpfuse::fuzz
