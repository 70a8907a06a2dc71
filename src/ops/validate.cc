// Every argument rule of docs/SEMANTICS.md, checked in one place, in a fixed order:
// scalars, then each tensor's own sanity (pointer, dims, strides, sizes that
// fit int64), x1/x2 layout, the dtype pair that picks the mode, the mode's
// scale tensors, then bias and x3. Each failure names the argument first,
// then what was expected and what was given. No tensor data is read, and the
// success path allocates nothing: messages are built only when a check fails,
// since every operator call, however small, goes through here.
#include "tpfuse/ops/validate.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <utility>

#include "ops/validate_rules.h"
#include "tpfuse/core/error.h"

namespace tpfuse {

namespace rules {

constexpr std::int64_t kGroupAlignment = 32;

std::string shape_text(std::span<const std::int64_t> dims) {
  std::string out = "[";
  for (std::size_t d = 0; d < dims.size(); ++d) {
    if (d) out += ", ";
    out += std::to_string(dims[d]);
  }
  return out + "]";
}

// dtype_name, or the code of a value outside the enum (which it prints as "?").
std::string dtype_text(DType dtype) {
  if (dtype_size(dtype) == 0) return cat("unknown dtype code ", static_cast<int>(dtype));
  return std::string(dtype_name(dtype));
}

// Shape and dtype, and the strides when given. Unlike TensorView::describe()
// it multiplies nothing, so it can quote views whose sizes overflow int64 (or
// whose dtype is unknown).
std::string raw_text(const TensorView& view, bool with_strides) {
  std::string text = cat(shape_text(view.shape()), " ", dtype_text(view.dtype()));
  if (with_strides) text += " strides " + shape_text(view.strides());
  return text;
}

bool checked_mul(std::int64_t a, std::int64_t b, std::int64_t& product) {
  return !__builtin_mul_overflow(a, b, &product);
}

bool checked_add(std::int64_t a, std::int64_t b, std::int64_t& sum) {
  return !__builtin_add_overflow(a, b, &sum);
}

// The output's dims: [m, n] or [b, s, n].
struct OutDims {
  std::array<std::int64_t, 3> dims{};
  std::size_t ndim = 0;
  std::span<const std::int64_t> span() const { return {dims.data(), ndim}; }
};

OutDims output_dims(const CallShape& shape) {
  if (shape.batch > 0) return {{shape.batch, shape.seq, shape.n}, 3};
  return {{shape.m, shape.n, 0}, 2};
}

bool has_dims(const TensorView& view, std::span<const std::int64_t> dims) {
  const auto shape = view.shape();
  return std::equal(shape.begin(), shape.end(), dims.begin(), dims.end());
}

// What every tensor argument must satisfy, whatever its role: a dtype of the
// enum (a value cast from elsewhere would print as "?" and size as 0), a
// pointer, non-negative dims and strides, and an element count, byte size
// and byte extent that int64 can hold, so that later size arithmetic cannot
// overflow.
void check_view(const char* name, const TensorView& view) {
  if (dtype_size(view.dtype()) == 0) {
    fail(name, ": expected dtype f16, bf16, f32, i8, i32 or i64, got ", dtype_text(view.dtype()));
  }
  if (view.data() == nullptr)
    fail(name, ": expected a data pointer, got null (", raw_text(view), ")");
  for (int d = 0; d < view.ndim(); ++d) {
    if (view.size(d) < 0) fail(name, ": expected dims >= 0, got ", raw_text(view));
    if (view.stride(d) < 0) fail(name, ": expected strides >= 0, got ", raw_text(view));
  }
  std::int64_t elements = 1;
  std::int64_t last_offset = 0;
  bool fits = true;
  for (int d = 0; d < view.ndim() && fits; ++d) {
    std::int64_t step = 0;
    fits = checked_mul(elements, view.size(d), elements) &&
           (view.size(d) == 0 || (checked_mul(view.size(d) - 1, view.stride(d), step) &&
                                  checked_add(last_offset, step, last_offset)));
  }
  const auto element_bytes = static_cast<std::int64_t>(dtype_size(view.dtype()));
  std::int64_t bytes = 0;
  std::int64_t extent = 0;
  fits = fits && checked_mul(elements, element_bytes, bytes) &&
         checked_add(last_offset, 1, extent) && checked_mul(extent, element_bytes, extent);
  if (!fits) {
    fail(name, ": expected an element count and byte size that fit int64, got ", raw_text(view));
  }
}

void check_not_empty(const char* name, const TensorView& view) {
  for (int d = 0; d < view.ndim(); ++d) {
    if (view.size(d) < 1) {
      fail(name, ": expected every dim >= 1 (", name, " cannot be empty), got ", view.describe());
    }
  }
}

void check_contiguous(const char* name, const TensorView& view) {
  if (!view.is_contiguous()) {
    fail(name, ": expected a contiguous row-major tensor, got ", view.describe());
  }
}

void check_x1(const TensorView& x1) {
  check_view("x1", x1);
  if (x1.ndim() != 2 && x1.ndim() != 3) {
    fail("x1: expected 2-D [m, k] or 3-D [b, s, k], got ", x1.describe());
  }
  check_not_empty("x1", x1);
  check_contiguous("x1", x1);
}

// Returns whether x2 is a transposed view of a row-major [n, k]; when both
// layouts describe the same memory (k or n is 1) it counts as row-major.
bool check_x2(const TensorView& x2) {
  check_view("x2", x2);
  if (x2.ndim() != 2) fail("x2: expected 2-D [k, n], got ", x2.describe());
  check_not_empty("x2", x2);
  if (x2.is_contiguous()) return false;
  if (!x2.transposed().is_contiguous()) {
    fail("x2: expected a row-major [k, n] or a transposed view of a row-major [n, k], got ",
         x2.describe());
  }
  return true;
}

Mode mode_of(DType x1, DType x2) {
  if (x1 == DType::f16 || x1 == DType::bf16) {
    if (x2 == x1) return Mode::plain;
    if (x2 == DType::i8) return Mode::weight_quant;
    fail("x2: expected dtype ", dtype_name(x1),
         " (plain mode, same as x1) or i8 (weight-only quant), got ", dtype_name(x2));
  }
  if (x1 == DType::i8) {
    if (x2 != DType::i8) {
      fail("x2: expected dtype i8 (full quant, since x1 is i8), got ", dtype_name(x2));
    }
    return Mode::full_quant;
  }
  fail("x1: expected dtype f16, bf16 (plain or weight-only quant) or i8 (full quant), got ",
       dtype_name(x1), " (x2 is ", dtype_name(x2), ")");
}

// "plain mode (x1 f16, x2 f16)", streamed into messages only when one is built.
struct ModeText {
  Mode mode;
  DType x1, x2;
};

std::ostream& operator<<(std::ostream& out, const ModeText& text) {
  const char* what = text.mode == Mode::plain          ? "plain mode"
                     : text.mode == Mode::weight_quant ? "weight-only quant mode"
                                                       : "full quant mode";
  return out << what << " (x1 " << dtype_name(text.x1) << ", x2 " << dtype_name(text.x2) << ")";
}

void check_absent(const char* name, const std::optional<TensorView>& tensor, const ModeText& mode) {
  if (tensor) fail(name, ": expected none in ", mode, ", got ", raw_text(*tensor, false));
}

void check_no_group_size(std::int64_t group_size, const ModeText& mode) {
  if (group_size != 0) fail("antiquant_group_size: expected 0 in ", mode, ", got ", group_size);
}

// The [1] / [n] / [1, n] layouts shared by antiquant_scale without groups and
// dequant_scale; none when the shape is none of them.
ScaleKind channel_scale_kind(const TensorView& scale, std::int64_t n) {
  if (scale.ndim() == 1 && scale.size(0) == 1) return ScaleKind::per_tensor;
  if (scale.ndim() == 1 && scale.size(0) == n) return ScaleKind::per_channel;
  if (scale.ndim() == 2 && scale.size(0) == 1 && scale.size(1) == n) return ScaleKind::per_channel;
  return ScaleKind::none;
}

void check_group_size(std::int64_t group_size, std::int64_t k) {
  if (group_size % kGroupAlignment != 0 || group_size < kGroupAlignment || group_size > k - 1) {
    fail("antiquant_group_size: expected a multiple of 32 in [32, k-1] = [32, ", k - 1, "], got ",
         group_size, " (0 means no groups)");
  }
}

// antiquant_scale's layout: [1] / [n] / [1, n] without groups, [ceil(k/G), n]
// with antiquant_group_size G.
void check_antiquant_scale_layout(const TensorView& scale, std::int64_t group_size,
                                  CallShape& shape) {
  if (group_size == 0) {
    shape.scale_kind = channel_scale_kind(scale, shape.n);
    if (shape.scale_kind == ScaleKind::none) {
      fail("antiquant_scale: expected shape [1] (per-tensor), [", shape.n, "] or [1, ", shape.n,
           "] (per-channel; a per-group [g, n] scale needs antiquant_group_size), got ",
           scale.describe());
    }
    return;
  }
  check_group_size(group_size, shape.k);
  const std::int64_t groups = (shape.k + group_size - 1) / group_size;
  if (scale.ndim() != 2 || scale.size(0) != groups || scale.size(1) != shape.n) {
    fail("antiquant_scale: expected shape [", groups, ", ", shape.n,
         "] ([ceil(k/G), n] for antiquant_group_size G = ", group_size, "), got ", scale.describe(),
         " (a per-tensor or per-channel scale needs antiquant_group_size 0)");
  }
  shape.scale_kind = ScaleKind::per_group;
  shape.group_size = group_size;
}

// Weight-only quant: antiquant_scale (required), antiquant_offset (optional,
// shaped like the scale), antiquant_group_size; fills the scale facts of `shape`.
void check_weight_quant(const MmAllReduceOptions& options, const ModeText& mode, CallShape& shape) {
  check_absent("dequant_scale", options.dequant_scale, mode);
  if (!options.antiquant_scale && options.antiquant_offset) {
    fail("antiquant_offset: expected only together with antiquant_scale, got ",
         raw_text(*options.antiquant_offset, false), " without a scale");
  }
  if (!options.antiquant_scale) {
    fail("antiquant_scale: expected a tensor of dtype ", dtype_name(shape.in_dtype),
         ", required in ", mode, "; got none");
  }
  const TensorView& scale = *options.antiquant_scale;
  check_view("antiquant_scale", scale);
  if (scale.dtype() != shape.in_dtype) {
    fail("antiquant_scale: expected dtype ", dtype_name(shape.in_dtype), " (same as x1), got ",
         dtype_name(scale.dtype()));
  }
  check_antiquant_scale_layout(scale, options.antiquant_group_size, shape);
  check_contiguous("antiquant_scale", scale);

  if (options.antiquant_offset) {
    const TensorView& offset = *options.antiquant_offset;
    check_view("antiquant_offset", offset);
    if (!has_dims(offset, scale.shape()) || offset.dtype() != scale.dtype()) {
      fail("antiquant_offset: expected ", raw_text(scale, false),
           " (same shape and dtype as antiquant_scale), got ", offset.describe());
    }
    check_contiguous("antiquant_offset", offset);
    shape.has_offset = true;
  }
}

// Full quant: dequant_scale (required) picks the output dtype.
void check_full_quant(const MmAllReduceOptions& options, const ModeText& mode, CallShape& shape) {
  check_absent("antiquant_scale", options.antiquant_scale, mode);
  check_absent("antiquant_offset", options.antiquant_offset, mode);
  check_no_group_size(options.antiquant_group_size, mode);
  if (shape.k > kMaxFullQuantK) {
    fail("x1: expected k <= ", kMaxFullQuantK,
         " in full quant mode (int32 accumulation of int8 products), got k = ", shape.k);
  }
  if (!options.dequant_scale) {
    fail(
        "dequant_scale: expected an i64 tensor (packed by trans_quant_param, f16 output) or a "
        "bf16 one (bf16 output), required in ",
        mode, "; got none");
  }
  const TensorView& scale = *options.dequant_scale;
  check_view("dequant_scale", scale);
  if (scale.dtype() != DType::i64 && scale.dtype() != DType::bf16) {
    fail("dequant_scale: expected dtype i64 (packed, f16 output) or bf16 (bf16 output), got ",
         dtype_name(scale.dtype()));
  }
  shape.out_dtype = scale.dtype() == DType::i64 ? DType::f16 : DType::bf16;
  shape.scale_kind = channel_scale_kind(scale, shape.n);
  if (shape.scale_kind == ScaleKind::none) {
    fail("dequant_scale: expected shape [1] (per-tensor), [", shape.n, "] or [1, ", shape.n,
         "] (per-channel), got ", scale.describe());
  }
  check_contiguous("dequant_scale", scale);
}

void check_plain(const MmAllReduceOptions& options, const ModeText& mode) {
  check_absent("antiquant_scale", options.antiquant_scale, mode);
  check_absent("antiquant_offset", options.antiquant_offset, mode);
  check_absent("dequant_scale", options.dequant_scale, mode);
  check_no_group_size(options.antiquant_group_size, mode);
}

void check_bias(const TensorView& bias, const CallShape& shape) {
  check_view("bias", bias);
  const bool full_quant = shape.mode == Mode::full_quant;
  const DType expected = full_quant ? DType::i32 : shape.in_dtype;
  if (bias.dtype() != expected) {
    fail("bias: expected dtype ", dtype_name(expected),
         full_quant ? " (full quant)" : " (same as x1)", ", got ", dtype_name(bias.dtype()));
  }
  if (bias.ndim() != 1 || bias.size(0) != shape.n) {
    fail("bias: expected shape [", shape.n, "] (n), got ", bias.describe());
  }
  check_contiguous("bias", bias);
}

void check_x3(const TensorView& x3, const CallShape& shape) {
  check_view("x3", x3);
  const bool full_quant = shape.mode == Mode::full_quant;
  const DType expected = full_quant ? shape.out_dtype : shape.in_dtype;
  if (x3.dtype() != expected) {
    fail("x3: expected dtype ", dtype_name(expected),
         full_quant ? " (the output dtype)" : " (same as x1)", ", got ", dtype_name(x3.dtype()));
  }
  const OutDims out = output_dims(shape);
  if (!has_dims(x3, out.span())) {
    fail("x3: expected shape ", shape_text(out.span()), " (the output's shape), got ",
         x3.describe());
  }
  check_contiguous("x3", x3);
}

void check_output_size(const CallShape& shape) {
  std::int64_t elements = 0;
  std::int64_t bytes = 0;
  if (!checked_mul(shape.m, shape.n, elements) ||
      !checked_mul(elements, static_cast<std::int64_t>(dtype_size(shape.out_dtype)), bytes)) {
    fail("out: expected m * n elements and bytes that fit int64, got [m, n] = [", shape.m, ", ",
         shape.n, "]");
  }
}

// The bytes a view can touch: [data, data + (largest element offset + 1) *
// element size). Only for views check_view() accepted.
struct ByteRange {
  std::uintptr_t begin = 0;
  std::uintptr_t end = 0;
};

ByteRange byte_range(const TensorView& view) {
  std::int64_t last = 0;
  for (int d = 0; d < view.ndim(); ++d) last += (view.size(d) - 1) * view.stride(d);
  const auto begin = reinterpret_cast<std::uintptr_t>(view.data());
  const auto bytes = static_cast<std::uintptr_t>(last + 1) * dtype_size(view.dtype());
  return {begin, begin + bytes};
}

std::string range_text(const ByteRange& range) {
  std::ostringstream out;
  out << "[0x" << std::hex << range.begin << ", 0x" << range.end << ")";
  return out.str();
}

void check_disjoint(const char* name, const TensorView& out, std::span<const NamedView> inputs) {
  const ByteRange out_bytes = byte_range(out);
  for (const auto& [input_name, input] : inputs) {
    if (input == nullptr) continue;
    const ByteRange in_bytes = byte_range(*input);
    if (out_bytes.begin < in_bytes.end && in_bytes.begin < out_bytes.end) {
      fail(name, ": expected memory disjoint from every input, got an overlap with ", input_name,
           " (", name, " bytes ", range_text(out_bytes), ", ", input_name, " bytes ",
           range_text(in_bytes), ")");
    }
  }
}

}  // namespace rules

using namespace rules;

CallShape rules::check_gemm_call(const TensorView& x1, const TensorView& x2,
                                 const MmAllReduceOptions& options, OutputSize output_size) {
  if (options.reduce_op != "sum") {
    fail("reduce_op: only \"sum\" is supported, got \"", options.reduce_op, "\"");
  }
  if (options.comm_turn < 0) {
    fail("comm_turn: expected >= 0 (0: automatic tiling, N: N tiles along m), got ",
         options.comm_turn);
  }
  check_x1(x1);
  const bool x2_transposed = check_x2(x2);

  CallShape shape;
  shape.mode = mode_of(x1.dtype(), x2.dtype());
  shape.in_dtype = x1.dtype();
  shape.out_dtype = x1.dtype();
  if (x1.ndim() == 3) {
    shape.batch = x1.size(0);
    shape.seq = x1.size(1);
  }
  shape.m = x1.ndim() == 3 ? x1.size(0) * x1.size(1) : x1.size(0);
  shape.k = x1.size(x1.ndim() - 1);
  if (x2.size(0) != shape.k) {
    fail("x2: expected dim 0 equal to x1's last dim k = ", shape.k, ", got ", x2.describe());
  }
  shape.n = x2.size(1);
  shape.x2_transposed = x2_transposed;
  shape.comm_turn = options.comm_turn;

  const ModeText mode{shape.mode, x1.dtype(), x2.dtype()};
  switch (shape.mode) {
    case Mode::plain:
      check_plain(options, mode);
      break;
    case Mode::weight_quant:
      check_weight_quant(options, mode, shape);
      break;
    case Mode::full_quant:
      check_full_quant(options, mode, shape);
      break;
  }
  if (output_size == OutputSize::checked) check_output_size(shape);
  if (options.bias) check_bias(*options.bias, shape);
  if (options.x3) check_x3(*options.x3, shape);
  shape.has_bias = options.bias.has_value();
  shape.has_x3 = options.x3.has_value();
  return shape;
}

CallShape validate_call(const TensorView& x1, const TensorView& x2,
                        const MmAllReduceOptions& options) {
  return check_gemm_call(x1, x2, options, OutputSize::checked);
}

void validate_out(const CallShape& shape, const TensorView& out, const TensorView& x1,
                  const TensorView& x2, const MmAllReduceOptions& options) {
  check_view("out", out);
  if (out.dtype() != shape.out_dtype) {
    fail("out: expected dtype ", dtype_name(shape.out_dtype), " (the output dtype), got ",
         dtype_name(out.dtype()));
  }
  const OutDims dims = output_dims(shape);
  if (!has_dims(out, dims.span())) {
    fail("out: expected shape ", shape_text(dims.span()), ", got ", out.describe());
  }
  check_contiguous("out", out);

  const NamedView inputs[] = {
      {"x1", &x1},
      {"x2", &x2},
      {"bias", options.bias ? &*options.bias : nullptr},
      {"antiquant_scale", options.antiquant_scale ? &*options.antiquant_scale : nullptr},
      {"antiquant_offset", options.antiquant_offset ? &*options.antiquant_offset : nullptr},
      {"x3", options.x3 ? &*options.x3 : nullptr},
      {"dequant_scale", options.dequant_scale ? &*options.dequant_scale : nullptr},
  };
  check_disjoint("out", out, inputs);
}

}  // namespace tpfuse
