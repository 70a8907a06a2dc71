// Backing a decoded call's views with memory (fuzz_call.h): each present
// argument gets memory of exactly its extent when it is small enough, filled
// with values in the ranges of the contract's typical inputs; an output
// holds a sentinel, or lies inside an earlier argument.
#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>

#include "fuzz_call.h"
#include "tpfuse/core/half.h"
#include "tpfuse/ops/quant_param.h"

namespace tpfuse::fuzz {

namespace {

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
    case Arg::x2_scale:
      return {0.5e-3, 1.5e-3};
    case Arg::x1_scale:
    case Arg::gamma:
      return {0.5, 2};
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
  if (is_output(arg) || size == 0) {
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
      case DType::i64:  // a packed scale
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

bool MaterializedCall::all_backed() const {
  for (int a = 0; a < kArgCount; ++a) {
    if (views[a] && !backed[a]) return false;
  }
  return true;
}

TensorView MaterializedCall::view(Arg arg) const {
  return views[static_cast<int>(arg)].value_or(TensorView());
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
    if (can_alias(static_cast<Arg>(a)) && arg.alias_of >= 0) {
      // Inside an earlier argument's memory; backed only where it stays
      // inside it (an accepted call may write there).
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
      call.bytes[a] = static_cast<std::int64_t>(extent->bytes);
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

  auto sequence_parallel = [&](SequenceParallelOptions& o) {
    o.bias = options.bias;
    o.x1_scale = call.views[static_cast<int>(Arg::x1_scale)];
    o.x2_scale = call.views[static_cast<int>(Arg::x2_scale)];
    o.comm_turn = spec.comm_turn;
    o.output_dtype = spec.output_dtype;
    o.comm_mode = spec.comm_mode;
  };
  sequence_parallel(call.all_gather);
  call.all_gather.gather_index = spec.gather_index;
  call.all_gather.gather_output = spec.gather_output;
  sequence_parallel(call.reduce_scatter);
  call.reduce_scatter.reduce_op = spec.reduce_op;

  MmAllReduceAddRmsNormOptions& norm = call.add_rms_norm;
  norm.reduce_op = spec.reduce_op;
  norm.epsilon = spec.epsilon;
  norm.bias = options.bias;
  norm.antiquant_scale = options.antiquant_scale;
  norm.antiquant_offset = options.antiquant_offset;
  norm.dequant_scale = options.dequant_scale;
  norm.antiquant_group_size = spec.group_size;
  norm.comm_turn = spec.comm_turn;
  return call;
}

}  // namespace tpfuse::fuzz
