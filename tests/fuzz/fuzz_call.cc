// Decoding fuzz bytes into a call (materialize.cc backs its views with
// memory). The byte layout (each byte one choice, zero = what the contract
// asks for):
//   0 mode   1 m   2 k   3 n   4-5 b and s of a 3-D x1   6 flags
//   7 scale layout   8 antiquant_group_size   9 comm_turn   10 reduce_op
//   11 seed of the values   12-15 a special value (NaN, inf, ...)
//   then per argument (x1, x2, bias, antiquant_scale, antiquant_offset, x3,
//   dequant_scale, out): presence, dtype, shape edit (2), strides edit (2),
//   null pointer; and for out, two bytes placing it inside an input.
#include "fuzz_call.h"

#include <algorithm>
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

}  // namespace

const char* arg_name(Arg arg) {
  static const char* const names[kArgCount] = {
      "x1", "x2", "bias", "antiquant_scale", "antiquant_offset", "x3", "dequant_scale", "out"};
  return names[static_cast<int>(arg)];
}

CallSpec decode_call(std::span<const std::uint8_t> bytes) {
  ByteReader in(bytes);
  CallSpec call;
  const int mode =
      in.next() % 6;  // plain f16, bf16; weight quant f16, bf16; full quant f16, bf16 out
  const bool full_quant = mode >= 4;
  const bool weight_quant = mode == 2 || mode == 3;
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
  if (batch_byte != 0) {
    const std::int64_t b = size_value(batch_byte, 2), s = size_value(seq_byte, 2);
    m = wrapping_mul(b, s);
    x1_shape = {b, s, k};
    out_shape = {b, s, n};
  }
  const std::uint8_t flags = in.next();
  const bool bias = flags & 1, x3 = flags & 2, offset = flags & 4, transposed = flags & 8;
  const bool out = flags & 16, special = flags & 32;
  const int layout = in.next() % 4;  // per-channel [n], per-tensor [1], [1, n], per-group
  call.group_size = group_value(in.next(), k, weight_quant && layout == 3);
  call.comm_turn = comm_turn_value(in.next(), m);
  call.reduce_op = reduce_op_value(in.next());
  call.seed = in.next();
  if (special) {
    Special s;
    s.arg = static_cast<Arg>(in.next() % (kArgCount - 1));  // an input: out holds a sentinel
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

  for (int a = 0; a < kArgCount; ++a) {
    ArgSpec& spec = call.args[a];
    if (in.next() != 0) spec.present = !spec.present;
    if (const std::uint8_t b = in.next(); b != 0) spec.dtype = static_cast<DType>((b - 1) % 8);
    spec.strides = row_major_strides(spec.shape);
    if (a == static_cast<int>(Arg::x2) && transposed) {
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
    if (static_cast<Arg>(a) == Arg::out) {
      if (const std::uint8_t b = in.next(); b != 0) spec.alias_of = (b - 1) % (kArgCount - 1);
      spec.alias_offset = in.next();
    }
  }
  return call;
}

std::string describe_call(const CallSpec& spec) {
  std::string text;
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
  if (spec.special) {
    text += cat(" special ", spec.special->kind % 6, " in ", arg_name(spec.special->arg), "[",
                spec.special->element, "]");
  }
  return text;
}

}  // namespace tpfuse::fuzz
