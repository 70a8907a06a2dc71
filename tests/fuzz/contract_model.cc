// The contract, rule by rule, as docs/SEMANTICS.md states it. Sizes are exact
// 128-bit integers (capped far above int64), so "fits int64" is a plain
// comparison here where validation needs overflow-checked arithmetic.
#include "contract_model.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace tpfuse::fuzz {

namespace {

using Int = __int128;
constexpr Int kInt64Max = std::numeric_limits<std::int64_t>::max();
constexpr Int kCap = static_cast<Int>(1) << 100;

// a * b for a, b >= 0, saturating at kCap.
Int capped_mul(Int a, Int b) {
  if (a == 0 || b == 0) return 0;
  return a > kCap / b ? kCap : std::min(a * b, kCap);
}

Int element_size(DType dtype) { return static_cast<Int>(dtype_size(dtype)); }

// A view any argument may be: a dtype of the enum, a pointer, dims and
// strides >= 0, and an element count, byte size and byte extent that int64
// holds.
bool sane(const ArgSpec& arg) {
  if (arg.null_data || element_size(arg.dtype) == 0) return false;
  Int elements = 1;
  Int last = 0;
  for (std::size_t d = 0; d < arg.shape.size(); ++d) {
    if (arg.shape[d] < 0 || arg.strides[d] < 0) return false;
    elements = capped_mul(elements, arg.shape[d]);
    if (arg.shape[d] > 0)
      last = std::min(last + capped_mul(arg.shape[d] - 1, arg.strides[d]), kCap);
  }
  const Int size = element_size(arg.dtype);
  return elements * size <= kInt64Max && (last + 1) * size <= kInt64Max;
}

bool non_empty(const ArgSpec& arg) {
  return std::all_of(arg.shape.begin(), arg.shape.end(), [](std::int64_t d) { return d >= 1; });
}

// Row-major: each dim's stride is the product of the dims after it, except
// that a dim of size 1 may have any stride (it is never stepped over).
bool row_major(const std::vector<std::int64_t>& shape, const std::vector<std::int64_t>& strides) {
  Int expected = 1;
  for (std::size_t d = shape.size(); d-- > 0;) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected = capped_mul(expected, shape[d]);
  }
  return true;
}

bool row_major(const ArgSpec& arg) { return row_major(arg.shape, arg.strides); }

bool has_shape(const ArgSpec& arg, std::initializer_list<std::int64_t> dims) {
  return std::equal(arg.shape.begin(), arg.shape.end(), dims.begin(), dims.end());
}

bool has_shape(const ArgSpec& arg, const std::vector<std::int64_t>& dims) {
  return arg.shape == dims;
}

// [1] per-tensor, [n] or [1, n] per-channel; nullopt for any other shape.
std::optional<ScaleKind> channel_scale(const ArgSpec& scale, std::int64_t n) {
  if (has_shape(scale, {1})) return ScaleKind::per_tensor;
  if (has_shape(scale, {n}) || has_shape(scale, {1, n})) return ScaleKind::per_channel;
  return std::nullopt;
}

struct ByteRange {
  std::uintptr_t begin = 0, end = 0;
};

ByteRange byte_range(const ArgSpec& arg, const TensorView& view) {
  Int last = 0;
  for (std::size_t d = 0; d < arg.shape.size(); ++d)
    last += static_cast<Int>(arg.shape[d] - 1) * arg.strides[d];
  const auto begin = reinterpret_cast<std::uintptr_t>(view.data());
  return {begin, begin + static_cast<std::uintptr_t>((last + 1) * element_size(arg.dtype))};
}

}  // namespace

Verdict judge(const CallSpec& spec, const MaterializedCall& call, bool with_out) {
  Verdict verdict;
  auto fault = [&](Arg arg) { verdict.faults.insert(arg_name(arg)); };
  if (spec.reduce_op != "sum") verdict.faults.insert("reduce_op");
  if (spec.comm_turn < 0) verdict.faults.insert("comm_turn");

  // x1: [m, k] or [b, s, k], row-major, not empty.
  const ArgSpec& x1 = spec.arg(Arg::x1);
  const bool x1_ok = x1.present && sane(x1) && (x1.shape.size() == 2 || x1.shape.size() == 3) &&
                     non_empty(x1) && row_major(x1);
  if (!x1_ok) fault(Arg::x1);
  // x2: [k, n], row-major or a transposed view of a row-major [n, k].
  const ArgSpec& x2 = spec.arg(Arg::x2);
  bool x2_ok = x2.present && sane(x2) && x2.shape.size() == 2 && non_empty(x2);
  bool x2_transposed = false;
  if (x2_ok && !row_major(x2)) {
    x2_transposed = row_major({x2.shape[1], x2.shape[0]}, {x2.strides[1], x2.strides[0]});
    x2_ok = x2_transposed;
  }
  if (!x2_ok) fault(Arg::x2);

  // The dtype pair picks the mode.
  std::optional<Mode> mode;
  if (x1.present && x2.present) {
    const bool float_x1 = x1.dtype == DType::f16 || x1.dtype == DType::bf16;
    if (float_x1 && x2.dtype == x1.dtype)
      mode = Mode::plain;
    else if (float_x1 && x2.dtype == DType::i8)
      mode = Mode::weight_quant;
    else if (x1.dtype == DType::i8 && x2.dtype == DType::i8)
      mode = Mode::full_quant;
    else
      fault(float_x1 || x1.dtype == DType::i8 ? Arg::x2 : Arg::x1);
  }

  // m, k, n, when x1 and x2 define them.
  CallShape& shape = verdict.shape;
  const bool dims_known = x1_ok && x2_ok && x2.shape[0] == x1.shape.back();
  if (x1_ok && x2_ok && !dims_known) fault(Arg::x2);
  std::vector<std::int64_t> out_dims;
  if (dims_known) {
    shape.k = x1.shape.back();
    shape.n = x2.shape[1];
    shape.m = x1.shape[0];
    if (x1.shape.size() == 3) {
      shape.batch = x1.shape[0];
      shape.seq = x1.shape[1];
      shape.m = x1.shape[0] * x1.shape[1];  // fits: x1 is sane
      out_dims = {shape.batch, shape.seq, shape.n};
    } else {
      out_dims = {shape.m, shape.n};
    }
  }
  const std::int64_t group = spec.group_size;
  const ArgSpec& scale = spec.arg(Arg::antiquant_scale);
  const ArgSpec& offset = spec.arg(Arg::antiquant_offset);
  const ArgSpec& dequant = spec.arg(Arg::dequant_scale);
  std::optional<DType> out_dtype;

  if (mode == Mode::plain) {
    if (scale.present) fault(Arg::antiquant_scale);
    if (offset.present) fault(Arg::antiquant_offset);
    if (dequant.present) fault(Arg::dequant_scale);
    if (group != 0) verdict.faults.insert("antiquant_group_size");
    out_dtype = x1.dtype;
  } else if (mode == Mode::weight_quant) {
    out_dtype = x1.dtype;
    if (dequant.present) fault(Arg::dequant_scale);
    if (!scale.present) fault(Arg::antiquant_scale);
    if (offset.present && !scale.present) fault(Arg::antiquant_offset);
    // G's range needs k; with x1 broken, x1 is the fault.
    const bool group_ok =
        group == 0 || !x1_ok || (group % 32 == 0 && group >= 32 && group <= x1.shape.back() - 1);
    if (!group_ok) verdict.faults.insert("antiquant_group_size");
    if (scale.present) {
      if (!sane(scale) || scale.dtype != x1.dtype || !row_major(scale)) fault(Arg::antiquant_scale);
      if (dims_known && group_ok) {  // the layout G asks for
        if (group == 0) {
          const auto kind = channel_scale(scale, shape.n);
          if (!kind) fault(Arg::antiquant_scale);
          shape.scale_kind = kind.value_or(ScaleKind::none);
        } else {
          const std::int64_t groups = (shape.k + group - 1) / group;
          if (!has_shape(scale, {groups, shape.n})) fault(Arg::antiquant_scale);
          shape.scale_kind = ScaleKind::per_group;
          shape.group_size = group;
        }
      }
    }
    if (offset.present && scale.present &&
        (!sane(offset) || offset.shape != scale.shape || offset.dtype != scale.dtype ||
         !row_major(offset))) {
      fault(Arg::antiquant_offset);
    }
    shape.has_offset = offset.present;
  } else if (mode == Mode::full_quant) {
    if (scale.present) fault(Arg::antiquant_scale);
    if (offset.present) fault(Arg::antiquant_offset);
    if (group != 0) verdict.faults.insert("antiquant_group_size");
    if (x1_ok && x1.shape.back() > 65535) fault(Arg::x1);
    if (!dequant.present) {
      fault(Arg::dequant_scale);
    } else {
      if (dequant.dtype == DType::i64) out_dtype = DType::f16;
      if (dequant.dtype == DType::bf16) out_dtype = DType::bf16;
      if (!sane(dequant) || !out_dtype || !row_major(dequant)) fault(Arg::dequant_scale);
      if (dims_known) {
        const auto kind = channel_scale(dequant, shape.n);
        if (!kind) fault(Arg::dequant_scale);
        shape.scale_kind = kind.value_or(ScaleKind::none);
      }
    }
  }

  if (dims_known && out_dtype) {
    verdict.output_bytes = capped_mul(capped_mul(shape.m, shape.n), element_size(*out_dtype));
    if (verdict.output_bytes > kInt64Max) fault(Arg::out);
  }

  const ArgSpec& bias = spec.arg(Arg::bias);
  if (bias.present) {
    const bool dtype_ok = !mode || bias.dtype == (mode == Mode::full_quant ? DType::i32 : x1.dtype);
    const bool shape_ok = !dims_known || has_shape(bias, {shape.n});
    if (!sane(bias) || !dtype_ok || !shape_ok || !row_major(bias)) fault(Arg::bias);
  }
  const ArgSpec& x3 = spec.arg(Arg::x3);
  if (x3.present) {
    const bool dtype_ok = !out_dtype || x3.dtype == *out_dtype;
    const bool shape_ok = !dims_known || has_shape(x3, out_dims);
    if (!sane(x3) || !dtype_ok || !shape_ok || !row_major(x3)) fault(Arg::x3);
  }

  const ArgSpec& out = spec.arg(Arg::out);
  if (with_out && verdict.faults.empty()) {
    bool ok = sane(out) && out.dtype == *out_dtype && has_shape(out, out_dims) && row_major(out);
    if (ok) {
      const ByteRange mine = byte_range(out, *call.views[static_cast<int>(Arg::out)]);
      for (int a = 0; a < kArgCount - 1; ++a) {
        if (!spec.args[a].present) continue;
        const ByteRange input = byte_range(spec.args[a], *call.views[a]);
        if (mine.begin < input.end && input.begin < mine.end) ok = false;
      }
    }
    if (!ok) fault(Arg::out);
  }

  if (verdict.accepted()) {
    shape.mode = *mode;
    shape.in_dtype = x1.dtype;
    shape.out_dtype = *out_dtype;
    shape.x2_transposed = x2_transposed;
    shape.has_bias = bias.present;
    shape.has_x3 = x3.present;
    shape.comm_turn = spec.comm_turn;
  }
  return verdict;
}

}  // namespace tpfuse::fuzz
