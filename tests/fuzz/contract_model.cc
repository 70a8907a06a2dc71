// The contract, rule by rule, as docs/SEMANTICS.md states it, and the rules
// every operator shares. Sizes are exact 128-bit integers (capped far above
// int64), so "fits int64" is a plain comparison here where validation needs
// overflow-checked arithmetic.
#include "contract_model.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "contract_rules.h"

namespace tpfuse::fuzz {

namespace contract {

namespace {

constexpr Int kCap = static_cast<Int>(1) << 100;

bool is_row_major(const std::vector<std::int64_t>& shape,
                  const std::vector<std::int64_t>& strides) {
  Int expected = 1;
  for (std::size_t d = shape.size(); d-- > 0;) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected = capped_mul(expected, shape[d]);
  }
  return true;
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

void fault(Verdict& verdict, Arg arg) { verdict.faults.insert(arg_name(arg)); }

// mm_all_reduce_base: the GEMM's rules, the output's size, x3 and out.
Verdict judge_mm_all_reduce(const CallSpec& spec, const MaterializedCall& call) {
  Verdict verdict;
  const GemmFacts gemm = judge_gemm(spec, verdict);
  CallShape& shape = verdict.shape;
  std::vector<std::int64_t> out_dims;
  if (gemm.dims_known) {
    out_dims = shape.batch > 0 ? std::vector<std::int64_t>{shape.batch, shape.seq, shape.n}
                               : std::vector<std::int64_t>{shape.m, shape.n};
  }
  if (gemm.dims_known && gemm.out_dtype) {
    verdict.output_bytes = capped_mul(capped_mul(shape.m, shape.n), element_size(*gemm.out_dtype));
    if (verdict.output_bytes > kInt64Max) fault(verdict, Arg::out);
  }
  const ArgSpec& x3 = spec.arg(Arg::x3);
  if (x3.present) {
    const bool dtype_ok = !gemm.out_dtype || x3.dtype == *gemm.out_dtype;
    const bool shape_ok = !gemm.dims_known || x3.shape == out_dims;
    if (!sane(x3) || !dtype_ok || !shape_ok || !row_major(x3)) fault(verdict, Arg::x3);
  }

  const ArgSpec& out = spec.arg(Arg::out);
  if (call_form(spec) == Form::out && verdict.faults.empty()) {
    bool ok = sane(out) && out.dtype == *gemm.out_dtype && out.shape == out_dims && row_major(out);
    for (int a = 0; ok && a < static_cast<int>(Arg::out); ++a) {
      if (overlap(spec, call, Arg::out, static_cast<Arg>(a))) ok = false;
    }
    if (!ok) fault(verdict, Arg::out);
  }
  if (verdict.accepted()) shape.has_x3 = x3.present;
  return verdict;
}

}  // namespace

Int capped_mul(Int a, Int b) {
  if (a == 0 || b == 0) return 0;
  return a > kCap / b ? kCap : std::min(a * b, kCap);
}

Int element_size(DType dtype) { return static_cast<Int>(dtype_size(dtype)); }

bool sane(const ArgSpec& arg) {
  if (!arg.present || arg.null_data || element_size(arg.dtype) == 0) return false;
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

bool row_major(const ArgSpec& arg) { return is_row_major(arg.shape, arg.strides); }

bool has_shape(const ArgSpec& arg, std::initializer_list<std::int64_t> dims) {
  return std::equal(arg.shape.begin(), arg.shape.end(), dims.begin(), dims.end());
}

bool overlap(const CallSpec& spec, const MaterializedCall& call, Arg a, Arg b) {
  const ArgSpec& first = spec.arg(a);
  const ArgSpec& second = spec.arg(b);
  if (!first.present || !second.present) return false;
  const ByteRange x = byte_range(first, *call.views[static_cast<int>(a)]);
  const ByteRange y = byte_range(second, *call.views[static_cast<int>(b)]);
  return x.begin < y.end && y.begin < x.end;
}

X2Layout judge_x2(const ArgSpec& x2) {
  X2Layout layout;
  layout.ok = sane(x2) && x2.shape.size() == 2 && non_empty(x2);
  if (layout.ok && !row_major(x2)) {
    layout.transposed = is_row_major({x2.shape[1], x2.shape[0]}, {x2.strides[1], x2.strides[0]});
    layout.ok = layout.transposed;
  }
  return layout;
}

GemmFacts judge_gemm(const CallSpec& spec, Verdict& verdict) {
  GemmFacts facts;
  auto fault = [&](Arg arg) { verdict.faults.insert(arg_name(arg)); };
  if (spec.reduce_op != "sum") verdict.faults.insert("reduce_op");
  if (spec.comm_turn < 0) verdict.faults.insert("comm_turn");

  // x1: [m, k] or [b, s, k], row-major, not empty.
  const ArgSpec& x1 = spec.arg(Arg::x1);
  facts.x1_ok =
      sane(x1) && (x1.shape.size() == 2 || x1.shape.size() == 3) && non_empty(x1) && row_major(x1);
  if (!facts.x1_ok) fault(Arg::x1);
  const ArgSpec& x2 = spec.arg(Arg::x2);
  const X2Layout x2_layout = judge_x2(x2);
  if (!x2_layout.ok) fault(Arg::x2);

  // The dtype pair picks the mode.
  std::optional<Mode>& mode = facts.mode;
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
  facts.dims_known = facts.x1_ok && x2_layout.ok && x2.shape[0] == x1.shape.back();
  if (facts.x1_ok && x2_layout.ok && !facts.dims_known) fault(Arg::x2);
  if (facts.dims_known) {
    shape.k = x1.shape.back();
    shape.n = x2.shape[1];
    shape.m = x1.shape[0];
    if (x1.shape.size() == 3) {
      shape.batch = x1.shape[0];
      shape.seq = x1.shape[1];
      shape.m = x1.shape[0] * x1.shape[1];  // fits: x1 is sane
    }
  }
  const std::int64_t group = spec.group_size;
  const ArgSpec& scale = spec.arg(Arg::antiquant_scale);
  const ArgSpec& offset = spec.arg(Arg::antiquant_offset);
  const ArgSpec& dequant = spec.arg(Arg::dequant_scale);
  std::optional<DType>& out_dtype = facts.out_dtype;

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
    const bool group_ok = group == 0 || !facts.x1_ok ||
                          (group % 32 == 0 && group >= 32 && group <= x1.shape.back() - 1);
    if (!group_ok) verdict.faults.insert("antiquant_group_size");
    if (scale.present) {
      if (!sane(scale) || scale.dtype != x1.dtype || !row_major(scale)) fault(Arg::antiquant_scale);
      if (facts.dims_known && group_ok) {  // the layout G asks for
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
    if (facts.x1_ok && x1.shape.back() > 65535) fault(Arg::x1);
    if (!dequant.present) {
      fault(Arg::dequant_scale);
    } else {
      if (dequant.dtype == DType::i64) out_dtype = DType::f16;
      if (dequant.dtype == DType::bf16) out_dtype = DType::bf16;
      if (!sane(dequant) || !out_dtype || !row_major(dequant)) fault(Arg::dequant_scale);
      if (facts.dims_known) {
        const auto kind = channel_scale(dequant, shape.n);
        if (!kind) fault(Arg::dequant_scale);
        shape.scale_kind = kind.value_or(ScaleKind::none);
      }
    }
  }

  const ArgSpec& bias = spec.arg(Arg::bias);
  if (bias.present) {
    const bool dtype_ok = !mode || bias.dtype == (mode == Mode::full_quant ? DType::i32 : x1.dtype);
    const bool shape_ok = !facts.dims_known || has_shape(bias, {shape.n});
    if (!sane(bias) || !dtype_ok || !shape_ok || !row_major(bias)) fault(Arg::bias);
  }

  if (verdict.accepted()) {
    shape.mode = *mode;
    shape.in_dtype = x1.dtype;
    shape.out_dtype = *out_dtype;
    shape.x2_transposed = x2_layout.transposed;
    shape.has_bias = bias.present;
    shape.comm_turn = spec.comm_turn;
  }
  return facts;
}

}  // namespace contract

Verdict judge(const CallSpec& spec, const MaterializedCall& call) {
  switch (spec.op) {
    case Op::mm_all_reduce_base:
      return contract::judge_mm_all_reduce(spec, call);
    case Op::all_gather_base_mm:
    case Op::mm_reduce_scatter_base:
      return contract::judge_sequence_parallel(spec, call);
    case Op::mm_all_reduce_add_rms_norm:
    case Op::mm_all_reduce_add_rms_norm_in_place:
      return contract::judge_add_rms_norm(spec, call);
  }
  return {};
}

}  // namespace tpfuse::fuzz
