// Decoding fuzz bytes into a call, and backing its views with memory. The
// byte layout (each byte one choice, zero = what the contract asks for):
//   0 mode   1 m   2 k   3 n   4-5 b and s of a 3-D x1   6 flags
//   7 scale layout   8 antiquant_group_size   9 comm_turn   10 reduce_op
//   11 seed of the values   12-15 a special value (NaN, inf, ...)
//   then per argument (x1, x2, bias, antiquant_scale, antiquant_offset, x3,
//   dequant_scale, out): presence, dtype, shape edit (2), strides edit (2),
//   null pointer; and for out, two bytes placing it inside an input.
#include "fuzz_call.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>

#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/ops/quant_param.h"

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

// splitmix64: a tiny, well-mixed generator, so a seed byte gives varied values.
class Random {
 public:
  explicit Random(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform(double lo, double hi) {
    return lo + (hi - lo) * static_cast<double>(next() >> 11) * 0x1p-53;
  }

 private:
  std::uint64_t state_;
};

// Value ranges by role, as testing::make_rank_inputs uses them.
struct Range {
  double lo, hi;
};

Range float_range(Arg arg) {
  switch (arg) {
    case Arg::antiquant_scale:
      return {0.01, 0.05};
    case Arg::antiquant_offset:
      return {-2, 2};
    case Arg::dequant_scale:
      return {0.5e-3, 1.5e-3};
    default:
      return {-1, 1};
  }
}

void store_float(std::byte* data, DType dtype, std::int64_t index, float value) {
  switch (dtype) {
    case DType::f16: {
      const Half h = f32_to_f16(value);
      std::memcpy(data + index * 2, &h, 2);
      return;
    }
    case DType::bf16: {
      const BFloat16 h = f32_to_bf16(value);
      std::memcpy(data + index * 2, &h, 2);
      return;
    }
    case DType::f32:
      std::memcpy(data + index * 4, &value, 4);
      return;
    case DType::i64: {  // a packed dequant scale
      const std::int64_t packed = trans_quant_param(value);
      std::memcpy(data + index * 8, &packed, 8);
      return;
    }
    default:
      return;
  }
}

void fill(std::byte* data, std::int64_t bytes, Arg arg, DType dtype, Random& random) {
  const auto size = static_cast<std::int64_t>(dtype_size(dtype));
  if (arg == Arg::out || size == 0) {
    std::memset(data, 0xA5, static_cast<std::size_t>(bytes));
    return;
  }
  const Range range = float_range(arg);
  for (std::int64_t i = 0; i < bytes / size; ++i) {
    switch (dtype) {
      case DType::i8: {
        const auto v = static_cast<std::int8_t>(random.next());
        std::memcpy(data + i, &v, 1);
        break;
      }
      case DType::i32: {
        const auto v = static_cast<std::int32_t>(random.next() % 2001) - 1000;
        std::memcpy(data + i * 4, &v, 4);
        break;
      }
      case DType::i64:
        store_float(data, dtype, i, static_cast<float>(random.uniform(0.5e-3, 1.5e-3)));
        break;
      default:
        store_float(data, dtype, i, static_cast<float>(random.uniform(range.lo, range.hi)));
    }
  }
}

float special_value(int kind) {
  switch (kind % 6) {
    case 0:
      return std::numeric_limits<float>::quiet_NaN();
    case 1:
      return -std::numeric_limits<float>::quiet_NaN();
    case 2:
      return std::numeric_limits<float>::infinity();
    case 3:
      return -std::numeric_limits<float>::infinity();
    case 4:
      return std::bit_cast<float>(0x7fa00000u);  // signaling NaN
    default:
      return -0.0f;
  }
}

// Memory that views too large to back point into; nothing may read it.
alignas(64) std::byte g_unbacked[64];

}  // namespace

const char* arg_name(Arg arg) {
  static const char* const names[kArgCount] = {
      "x1", "x2", "bias", "antiquant_scale", "antiquant_offset", "x3", "dequant_scale", "out"};
  return names[static_cast<int>(arg)];
}

bool MaterializedCall::all_backed() const {
  for (int a = 0; a < kArgCount; ++a) {
    if (views[a] && !backed[a]) return false;
  }
  return true;
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

std::optional<Extent> extent_of(const ArgSpec& spec) {
  const auto size = static_cast<__int128>(dtype_size(spec.dtype));
  if (size == 0) return std::nullopt;
  Extent extent;
  extent.elements = 1;
  __int128 last = 0;
  // Far beyond int64; dims and strides are below 2^63, so no product of two
  // operands at most kCap overflows.
  constexpr __int128 kCap = static_cast<__int128>(1) << 63;
  for (std::size_t d = 0; d < spec.shape.size(); ++d) {
    if (spec.shape[d] < 0 || spec.strides[d] < 0) return std::nullopt;
    if (spec.shape[d] == 0) return Extent{};
    extent.elements = std::min(extent.elements * spec.shape[d], kCap);
    last = std::min(last + static_cast<__int128>(spec.shape[d] - 1) * spec.strides[d], kCap);
  }
  extent.bytes = (last + 1) * size;
  return extent;
}

MaterializedCall materialize(const CallSpec& spec) {
  MaterializedCall call;
  Random random(spec.seed * 0x100000001b3ull + 1);
  std::array<std::byte*, kArgCount> memory{};
  std::array<__int128, kArgCount> bytes{};
  for (int a = 0; a < kArgCount; ++a) {
    const ArgSpec& arg = spec.args[a];
    if (!arg.present) continue;
    const auto extent = extent_of(arg);
    std::byte* data = g_unbacked;
    if (static_cast<Arg>(a) == Arg::out && arg.alias_of >= 0) {
      // Inside an input's memory; backed only where it stays inside it (an
      // accepted call writes there).
      const int host = arg.alias_of;
      if (memory[host] != nullptr && extent) {
        data = memory[host] + std::min<__int128>(arg.alias_offset, bytes[host]);
        call.backed[a] = arg.alias_offset + extent->bytes <= bytes[host];
      }
    } else if (extent && extent->bytes <= kMaxBackedBytes) {
      const auto size = static_cast<std::size_t>(std::max<__int128>(extent->bytes, 1));
      call.storage.push_back(std::make_unique<std::byte[]>(size));
      data = call.storage.back().get();
      fill(data, static_cast<std::int64_t>(extent->bytes), static_cast<Arg>(a), arg.dtype, random);
      memory[a] = data;
      bytes[a] = extent->bytes;
      call.backed[a] = true;
    }
    if (arg.null_data) {
      data = nullptr;
      call.backed[a] = false;
    }
    call.views[a] = TensorView(data, arg.dtype, arg.shape, arg.strides);
  }

  if (spec.special) {
    const int a = static_cast<int>(spec.special->arg);
    const ArgSpec& arg = spec.args[a];
    const auto size = static_cast<std::int64_t>(dtype_size(arg.dtype));
    const bool writable = memory[a] != nullptr && size > 0 && bytes[a] >= size &&
                          (is_floating(arg.dtype) || arg.dtype == DType::i64);
    if (writable) {
      const std::int64_t element =
          spec.special->element % static_cast<std::int64_t>(bytes[a] / size);
      store_float(memory[a], arg.dtype, element, special_value(spec.special->kind));
    }
  }

  MmAllReduceOptions& options = call.options;
  options.reduce_op = spec.reduce_op;
  options.comm_turn = spec.comm_turn;
  options.antiquant_group_size = spec.group_size;
  options.bias = call.views[static_cast<int>(Arg::bias)];
  options.antiquant_scale = call.views[static_cast<int>(Arg::antiquant_scale)];
  options.antiquant_offset = call.views[static_cast<int>(Arg::antiquant_offset)];
  options.x3 = call.views[static_cast<int>(Arg::x3)];
  options.dequant_scale = call.views[static_cast<int>(Arg::dequant_scale)];
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
