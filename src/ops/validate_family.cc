// The family's rules (docs/SEMANTICS-FAMILY.md), on top of the shared ones
// (ops/validate_rules.h) and, for the add-RMSNorm operator, of
// mm_all_reduce_base's own: scalars first, then x1 and x2, the dtype pair
// that picks the mode, the mode's scales, bias, and the operator's extras.
#include <cmath>
#include <cstring>
#include <optional>
#include <string>

#include "ops/validate_rules.h"
#include "tpfuse/ops/validate.h"

namespace tpfuse {

using namespace rules;

namespace {

const char* public_name(pipeline::Operator op) {
  return op == pipeline::Operator::all_gather_mm ? "all_gather_base_mm" : "mm_reduce_scatter_base";
}

void check_comm_turn(std::int64_t comm_turn) {
  if (comm_turn < 0) {
    fail("comm_turn: expected >= 0 (0: automatic tiling, N: N tiles), got ", comm_turn);
  }
}

void check_world_size(std::int64_t world_size, int group_size) {
  if (world_size != group_size) {
    fail("world_size: expected the group's size ", group_size, ", got ", world_size);
  }
}

void check_comm_mode(const std::string& comm_mode) {
  if (!comm_mode.empty() && comm_mode != "ai_cpu" && comm_mode != "aiv") {
    fail("comm_mode: expected None, \"ai_cpu\" or \"aiv\", got \"", comm_mode, "\"");
  }
}

void check_output_dtype_plain(const std::optional<DType>& output_dtype, DType x1) {
  if (output_dtype && *output_dtype != x1) {
    fail("output_dtype: expected none or ", dtype_name(x1), " (x1's dtype, plain mode), got ",
         dtype_text(*output_dtype));
  }
}

// The quant path's scales: x2_scale required ([n] or [1, n], f32 or i64),
// x1_scale optional ([m, 1] f32); they pick the output dtype.
void check_quant_scales(const SequenceParallelOptions& options, CallShape& shape) {
  if (options.comm_mode == "ai_cpu") {
    fail(
        "comm_mode: expected None or \"aiv\" with int8 x1 and x2 (the quant path), got "
        "\"ai_cpu\"");
  }
  if (shape.k > kMaxFullQuantK) {
    fail("x1: expected k <= ", kMaxFullQuantK,
         " with int8 x1 and x2 (int32 accumulation of int8 products), got k = ", shape.k);
  }
  if (!options.x2_scale) {
    fail("x2_scale: expected an f32 or i64 tensor of shape [", shape.n, "] or [1, ", shape.n,
         "], required with int8 x1 and x2; got none");
  }
  const TensorView& x2_scale = *options.x2_scale;
  check_view("x2_scale", x2_scale);
  if (x2_scale.dtype() != DType::f32 && x2_scale.dtype() != DType::i64) {
    fail("x2_scale: expected dtype f32 or i64 (packed by trans_quant_param), got ",
         dtype_name(x2_scale.dtype()));
  }
  const ScaleKind kind = channel_scale_kind(x2_scale, shape.n);
  if (kind == ScaleKind::none || (kind == ScaleKind::per_tensor && shape.n != 1)) {
    fail("x2_scale: expected shape [", shape.n, "] or [1, ", shape.n, "], got ",
         x2_scale.describe());
  }
  check_contiguous("x2_scale", x2_scale);
  shape.scale_kind = ScaleKind::per_channel;
  if (options.x1_scale) {
    const TensorView& x1_scale = *options.x1_scale;
    check_view("x1_scale", x1_scale);
    const std::int64_t dims[] = {shape.m, 1};
    if (x1_scale.dtype() != DType::f32 || !has_dims(x1_scale, dims)) {
      fail("x1_scale: expected shape [", shape.m, ", 1] f32 (one scale per row of x1), got ",
           x1_scale.describe());
    }
    check_contiguous("x1_scale", x1_scale);
    shape.has_row_scale = true;
  }
  if (x2_scale.dtype() == DType::i64) {
    if (options.output_dtype && *options.output_dtype != DType::f16) {
      fail("output_dtype: expected none or f16 with an i64 x2_scale, got ",
           dtype_text(*options.output_dtype));
    }
    shape.out_dtype = DType::f16;
    return;
  }
  if (options.output_dtype && *options.output_dtype != DType::f16 &&
      *options.output_dtype != DType::bf16) {
    fail("output_dtype: expected none, f16 or bf16 with an f32 x2_scale, got ",
         dtype_text(*options.output_dtype));
  }
  shape.out_dtype = options.output_dtype.value_or(DType::bf16);
}

// What all_gather_base_mm and mm_reduce_scatter_base share.
CallShape validate_sequence_parallel(pipeline::Operator op, const TensorView& x1,
                                     const TensorView& x2, std::int64_t world_size, int group_size,
                                     const SequenceParallelOptions& options) {
  check_comm_turn(options.comm_turn);
  check_world_size(world_size, group_size);
  check_comm_mode(options.comm_mode);
  check_view("x1", x1);
  if (x1.ndim() != 2)
    fail("x1: expected 2-D [m, k] for ", public_name(op), ", got ", x1.describe());
  check_not_empty("x1", x1);
  check_contiguous("x1", x1);
  CallShape shape;
  shape.op = op;
  shape.x2_transposed = check_x2(x2);
  shape.m = x1.size(0);
  shape.k = x1.size(1);
  if (x2.size(0) != shape.k) {
    fail("x2: expected dim 0 equal to x1's last dim k = ", shape.k, ", got ", x2.describe());
  }
  shape.n = x2.size(1);
  shape.in_dtype = x1.dtype();
  shape.out_dtype = x1.dtype();
  shape.comm_turn = options.comm_turn;
  shape.world_size = world_size;
  const bool float_x1 = x1.dtype() == DType::f16 || x1.dtype() == DType::bf16;
  if (float_x1 && x2.dtype() == x1.dtype()) {
    shape.mode = Mode::plain;
    if (options.x1_scale)
      fail("x1_scale: expected none in plain mode, got ", raw_text(*options.x1_scale, false));
    if (options.x2_scale)
      fail("x2_scale: expected none in plain mode, got ", raw_text(*options.x2_scale, false));
    check_output_dtype_plain(options.output_dtype, x1.dtype());
  } else if (x1.dtype() == DType::i8 && x2.dtype() == DType::i8) {
    shape.mode = Mode::full_quant;
    check_quant_scales(options, shape);
  } else if (float_x1) {
    fail("x2: expected dtype ", dtype_name(x1.dtype()), " (same as x1; ", public_name(op),
         " has no weight-only quant), got ", dtype_name(x2.dtype()));
  } else if (x1.dtype() == DType::i8) {
    fail("x2: expected dtype i8 (the quant path, since x1 is i8), got ", dtype_name(x2.dtype()));
  } else {
    fail("x1: expected dtype f16, bf16 or i8 (the quant path), got ", dtype_name(x1.dtype()));
  }
  std::int64_t elements = 0;
  if (!checked_mul(gemm_rows(shape), shape.n, elements) ||
      !checked_mul(elements, static_cast<std::int64_t>(dtype_size(shape.out_dtype)), elements)) {
    fail("output: expected rows * n elements and bytes that fit int64, got [", gemm_rows(shape),
         ", ", shape.n, "]");
  }
  if (options.bias) check_bias(*options.bias, shape);
  shape.has_bias = options.bias.has_value();
  return shape;
}

void check_output(const char* name, const TensorView& out, DType dtype,
                  std::span<const std::int64_t> dims) {
  check_view(name, out);
  if (out.dtype() != dtype || !has_dims(out, dims)) {
    fail(name, ": expected ", shape_text(dims), " ", dtype_name(dtype), ", got ", out.describe());
  }
  check_contiguous(name, out);
}

NamedView named(const char* name, const std::optional<TensorView>& view) {
  return {name, view ? &*view : nullptr};
}

}  // namespace

CallShape validate_all_gather_mm(const TensorView& x1, const TensorView& x2,
                                 std::int64_t world_size, int group_size,
                                 const AllGatherMmOptions& options) {
  if (options.gather_index != 0) {
    fail("gather_index: expected 0 (x1 is gathered), got ", options.gather_index);
  }
  CallShape shape = validate_sequence_parallel(pipeline::Operator::all_gather_mm, x1, x2,
                                               world_size, group_size, options);
  shape.gather_output = options.gather_output;
  return shape;
}

void validate_all_gather_mm_out(const CallShape& shape, const TensorView& output,
                                const std::optional<TensorView>& gather_out, const TensorView& x1,
                                const TensorView& x2, const AllGatherMmOptions& options) {
  const std::int64_t rows = gemm_rows(shape);
  const std::int64_t output_dims[] = {rows, shape.n};
  check_output("output", output, shape.out_dtype, output_dims);
  // Both outputs are checked before either's memory is compared with the
  // other's: an unchecked view's byte range may not even be computable.
  if (!shape.gather_output && gather_out) {
    fail("gather_out: expected none with gather_output false, got ", raw_text(*gather_out, false));
  }
  if (shape.gather_output && !gather_out) {
    fail("gather_out: expected a [", rows, ", ", shape.k, "] ", dtype_name(shape.in_dtype),
         " tensor with gather_output true, got none");
  }
  const std::int64_t gather_dims[] = {rows, shape.k};
  if (gather_out) check_output("gather_out", *gather_out, shape.in_dtype, gather_dims);
  const NamedView inputs[] = {{"x1", &x1},
                              {"x2", &x2},
                              named("bias", options.bias),
                              named("x1_scale", options.x1_scale),
                              named("x2_scale", options.x2_scale),
                              named("gather_out", gather_out)};
  check_disjoint("output", output, inputs);
  if (gather_out) check_disjoint("gather_out", *gather_out, std::span(inputs).first(5));
}

CallShape validate_mm_reduce_scatter(const TensorView& x1, const TensorView& x2,
                                     std::int64_t world_size, int group_size,
                                     const MmReduceScatterOptions& options) {
  if (options.reduce_op != "sum") {
    fail("reduce_op: only \"sum\" is supported, got \"", options.reduce_op, "\"");
  }
  CallShape shape = validate_sequence_parallel(pipeline::Operator::mm_reduce_scatter, x1, x2,
                                               world_size, group_size, options);
  if (shape.m % world_size != 0) {
    fail("x1: expected m divisible by world_size (m % world_size == 0), got m = ", shape.m,
         ", world_size = ", world_size);
  }
  return shape;
}

void validate_mm_reduce_scatter_out(const CallShape& shape, const TensorView& output,
                                    const TensorView& x1, const TensorView& x2,
                                    const MmReduceScatterOptions& options) {
  const std::int64_t dims[] = {shape.m / shape.world_size, shape.n};
  check_output("output", output, shape.out_dtype, dims);
  const NamedView inputs[] = {{"x1", &x1},
                              {"x2", &x2},
                              named("bias", options.bias),
                              named("x1_scale", options.x1_scale),
                              named("x2_scale", options.x2_scale)};
  check_disjoint("output", output, inputs);
}

MmAllReduceOptions gemm_options(const MmAllReduceAddRmsNormOptions& options) {
  MmAllReduceOptions gemm;
  gemm.reduce_op = options.reduce_op;
  gemm.bias = options.bias;
  gemm.antiquant_scale = options.antiquant_scale;
  gemm.antiquant_offset = options.antiquant_offset;
  gemm.dequant_scale = options.dequant_scale;
  gemm.comm_turn = options.comm_turn;
  gemm.antiquant_group_size = options.antiquant_group_size;
  return gemm;
}

MmAllReduceOptions gemm_options(const SequenceParallelOptions& options) {
  MmAllReduceOptions gemm;
  gemm.bias = options.bias;
  gemm.dequant_scale = options.x2_scale;
  gemm.comm_turn = options.comm_turn;
  return gemm;
}

CallShape validate_add_rms_norm(const TensorView& x1, const TensorView& x2,
                                const TensorView& residual, const TensorView& gamma,
                                const MmAllReduceAddRmsNormOptions& options) {
  if (!(options.epsilon > 0 && options.epsilon < 1)) {
    fail("epsilon: expected a value in (0, 1), got ", options.epsilon);
  }
  // y and norm_out have residual's shape: a residual that passes its checks
  // below has a size that fits, and one that does not is the one at fault.
  CallShape shape = check_gemm_call(x1, x2, gemm_options(options), OutputSize::by_an_argument);
  shape.op = pipeline::Operator::mm_all_reduce_add_rms_norm;
  shape.epsilon = static_cast<float>(options.epsilon);
  const bool full_quant = shape.mode == Mode::full_quant;
  const DType dtype = shape.out_dtype;
  const char* why = full_quant ? " (the output dtype)" : " (same as x1)";
  check_view("residual", residual);
  const bool dims_fit =
      residual.ndim() == 3 && residual.size(2) == shape.n &&
      residual.size(0) * residual.size(1) == shape.m &&
      (shape.batch == 0 || (residual.size(0) == shape.batch && residual.size(1) == shape.seq));
  if (!dims_fit) {
    const std::string expected = shape.batch > 0
                                     ? cat("[", shape.batch, ", ", shape.seq, ", ", shape.n, "]")
                                     : cat("[b, s, ", shape.n, "] with b * s = m = ", shape.m);
    fail("residual: expected shape ", expected, ", got ", residual.describe());
  }
  if (residual.dtype() != dtype) {
    fail("residual: expected dtype ", dtype_name(dtype), why, ", got ",
         dtype_name(residual.dtype()));
  }
  check_contiguous("residual", residual);
  check_view("gamma", gamma);
  if (gamma.ndim() != 1 || gamma.size(0) != shape.n || gamma.dtype() != dtype) {
    fail("gamma: expected [", shape.n, "] ", dtype_name(dtype), why, ", got ", gamma.describe());
  }
  check_contiguous("gamma", gamma);
  shape.batch = residual.size(0);
  shape.seq = residual.size(1);
  return shape;
}

void validate_add_rms_norm_in_place(const TensorView& x1, const TensorView& x2,
                                    const TensorView& residual, const TensorView& gamma,
                                    const MmAllReduceAddRmsNormOptions& options) {
  const NamedView inputs[] = {{"x1", &x1},
                              {"x2", &x2},
                              {"gamma", &gamma},
                              named("bias", options.bias),
                              named("antiquant_scale", options.antiquant_scale),
                              named("antiquant_offset", options.antiquant_offset),
                              named("dequant_scale", options.dequant_scale)};
  check_disjoint("residual", residual, inputs);
}

void validate_add_rms_norm_out(const CallShape& shape, const TensorView& y,
                               const TensorView& norm_out, const TensorView& x1,
                               const TensorView& x2, const TensorView& residual,
                               const TensorView& gamma,
                               const MmAllReduceAddRmsNormOptions& options) {
  const std::int64_t dims[] = {shape.batch, shape.seq, shape.n};
  check_output("y", y, shape.out_dtype, dims);
  check_output("norm_out", norm_out, shape.out_dtype, dims);
  // y may be residual itself: the in-place form.
  const bool in_place = y.data() == residual.data();
  const NamedView inputs[] = {{"x1", &x1},
                              {"x2", &x2},
                              {"gamma", &gamma},
                              named("bias", options.bias),
                              named("antiquant_scale", options.antiquant_scale),
                              named("antiquant_offset", options.antiquant_offset),
                              named("dequant_scale", options.dequant_scale),
                              {"residual", in_place ? nullptr : &residual},
                              {"y", &y}};
  check_disjoint("y", y, std::span(inputs).first(8));
  const NamedView with_residual[] = {{"residual", &residual}};
  check_disjoint("norm_out", norm_out, inputs);
  check_disjoint("norm_out", norm_out, with_residual);
}

}  // namespace tpfuse
