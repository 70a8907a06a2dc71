// The family's contracts, rule by rule, as docs/SEMANTICS-FAMILY.md states
// them: all_gather_base_mm and mm_reduce_scatter_base (the sequence-parallel
// pair, with their quant path), and mm_all_reduce_add_rms_norm, which takes
// mm_all_reduce_base's GEMM arguments with their rules (judge_gemm).
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

#include "contract_rules.h"

namespace tpfuse::fuzz::contract {

namespace {

void fault(Verdict& verdict, Arg arg) { verdict.faults.insert(arg_name(arg)); }

// An output of the _out form: given, sane, of `dtype` and `dims`, row-major.
bool output_ok(const ArgSpec& out, DType dtype, const std::vector<std::int64_t>& dims) {
  return sane(out) && out.dtype == dtype && out.shape == dims && row_major(out);
}

// Faults `out` where it shares a byte with one of `inputs`.
void check_disjoint(const CallSpec& spec, const MaterializedCall& call, Verdict& verdict, Arg out,
                    std::initializer_list<Arg> inputs) {
  for (const Arg input : inputs) {
    if (overlap(spec, call, out, input)) fault(verdict, out);
  }
}

// The quant path's output dtype: f16 with an i64 x2_scale (output_dtype none
// or f16); with an f32 one, output_dtype when f16 or bf16, bf16 when none.
std::optional<DType> quant_out_dtype(const CallSpec& spec, Verdict& verdict) {
  const DType scale = spec.arg(Arg::x2_scale).dtype;
  const std::optional<DType> asked = spec.output_dtype;
  if (scale == DType::i64) {
    if (asked && *asked != DType::f16) verdict.faults.insert("output_dtype");
    return DType::f16;
  }
  if (scale != DType::f32) return std::nullopt;
  if (asked && *asked != DType::f16 && *asked != DType::bf16) {
    verdict.faults.insert("output_dtype");
  }
  return asked.value_or(DType::bf16);
}

}  // namespace

Verdict judge_sequence_parallel(const CallSpec& spec, const MaterializedCall& call) {
  Verdict verdict;
  CallShape& shape = verdict.shape;
  const bool gathering = spec.op == Op::all_gather_base_mm;
  if (gathering && spec.gather_index != 0) verdict.faults.insert("gather_index");
  if (!gathering && spec.reduce_op != "sum") verdict.faults.insert("reduce_op");
  if (spec.comm_turn < 0) verdict.faults.insert("comm_turn");
  // world_size is the group's size (so on one rank m % world_size is 0).
  const bool world_ok = spec.world_size == kGroupSize;
  if (!world_ok) verdict.faults.insert("world_size");
  const std::string& comm_mode = spec.comm_mode;
  if (!comm_mode.empty() && comm_mode != "ai_cpu" && comm_mode != "aiv") {
    verdict.faults.insert("comm_mode");
  }

  // x1: [m, k], row-major, not empty; x2 as for mm_all_reduce_base.
  const ArgSpec& x1 = spec.arg(Arg::x1);
  const bool x1_ok = sane(x1) && x1.shape.size() == 2 && non_empty(x1) && row_major(x1);
  if (!x1_ok) fault(verdict, Arg::x1);
  const ArgSpec& x2 = spec.arg(Arg::x2);
  const X2Layout x2_layout = judge_x2(x2);
  if (!x2_layout.ok) fault(verdict, Arg::x2);
  const bool dims_known = x1_ok && x2_layout.ok && x2.shape[0] == x1.shape[1];
  if (x1_ok && x2_layout.ok && !dims_known) fault(verdict, Arg::x2);
  if (dims_known) {
    shape.m = x1.shape[0];
    shape.k = x1.shape[1];
    shape.n = x2.shape[1];
  }

  // Both f16 or both bf16 (plain), or both int8 (the quant path): there is
  // no weight-only path.
  std::optional<Mode> mode;
  const bool float_x1 = x1.dtype == DType::f16 || x1.dtype == DType::bf16;
  if (x1.present && x2.present) {
    if (float_x1 && x2.dtype == x1.dtype) {
      mode = Mode::plain;
    } else if (x1.dtype == DType::i8 && x2.dtype == DType::i8) {
      mode = Mode::full_quant;
    } else {
      fault(verdict, float_x1 || x1.dtype == DType::i8 ? Arg::x2 : Arg::x1);
    }
  }

  const ArgSpec& x1_scale = spec.arg(Arg::x1_scale);
  const ArgSpec& x2_scale = spec.arg(Arg::x2_scale);
  std::optional<DType> out_dtype;
  if (mode == Mode::plain) {
    if (x1_scale.present) fault(verdict, Arg::x1_scale);
    if (x2_scale.present) fault(verdict, Arg::x2_scale);
    if (spec.output_dtype && *spec.output_dtype != x1.dtype) verdict.faults.insert("output_dtype");
    out_dtype = x1.dtype;
  } else if (mode == Mode::full_quant) {
    if (comm_mode == "ai_cpu") verdict.faults.insert("comm_mode");
    if (x1_ok && x1.shape[1] > 65535) fault(verdict, Arg::x1);
    if (!x2_scale.present) {
      fault(verdict, Arg::x2_scale);
    } else {
      out_dtype = quant_out_dtype(spec, verdict);
      const bool dims_ok =
          !dims_known || has_shape(x2_scale, {shape.n}) || has_shape(x2_scale, {1, shape.n});
      if (!sane(x2_scale) || !out_dtype || !dims_ok || !row_major(x2_scale)) {
        fault(verdict, Arg::x2_scale);
      }
    }
    if (x1_scale.present) {
      const bool dims_ok = !x1_ok || has_shape(x1_scale, {x1.shape[0], 1});
      if (!sane(x1_scale) || x1_scale.dtype != DType::f32 || !dims_ok || !row_major(x1_scale)) {
        fault(verdict, Arg::x1_scale);
      }
    }
    shape.scale_kind = ScaleKind::per_channel;
    shape.has_row_scale = x1_scale.present;
  }

  const ArgSpec& bias = spec.arg(Arg::bias);
  if (bias.present) {
    const bool dtype_ok = !mode || bias.dtype == (mode == Mode::full_quant ? DType::i32 : x1.dtype);
    const bool shape_ok = !dims_known || has_shape(bias, {shape.n});
    if (!sane(bias) || !dtype_ok || !shape_ok || !row_major(bias)) fault(verdict, Arg::bias);
  }

  // The output: [p * m, n] gathered, [m / p, n] reduce-scattered; one rank here.
  if (dims_known && out_dtype && world_ok) {
    verdict.output_bytes = capped_mul(capped_mul(shape.m, shape.n), element_size(*out_dtype));
    if (verdict.output_bytes > kInt64Max) fault(verdict, Arg::output);
  }

  if (call_form(spec) == Form::out && verdict.faults.empty()) {
    const ArgSpec& output = spec.arg(Arg::output);
    const bool own_ok = output_ok(output, *out_dtype, {shape.m, shape.n});
    if (!own_ok) fault(verdict, Arg::output);
    const std::initializer_list<Arg> inputs = {Arg::x1, Arg::x2, Arg::bias, Arg::x1_scale,
                                               Arg::x2_scale};
    if (own_ok) check_disjoint(spec, call, verdict, Arg::output, inputs);
    const ArgSpec& gather_out = spec.arg(Arg::gather_out);
    if (gathering && !spec.gather_output && gather_out.present) {
      fault(verdict, Arg::gather_out);
      verdict.faults.insert("gather_output");
    }
    if (gathering && spec.gather_output) {
      const bool gather_ok = output_ok(gather_out, x1.dtype, {shape.m, shape.k});
      if (!gather_ok) fault(verdict, Arg::gather_out);
      if (gather_ok) check_disjoint(spec, call, verdict, Arg::gather_out, inputs);
      if (own_ok && gather_ok && overlap(spec, call, Arg::output, Arg::gather_out)) {
        fault(verdict, Arg::output);
        fault(verdict, Arg::gather_out);
      }
    }
  }

  if (verdict.accepted()) {
    shape.op =
        gathering ? pipeline::Operator::all_gather_mm : pipeline::Operator::mm_reduce_scatter;
    shape.mode = *mode;
    shape.in_dtype = x1.dtype;
    shape.out_dtype = *out_dtype;
    shape.x2_transposed = x2_layout.transposed;
    shape.has_bias = bias.present;
    shape.comm_turn = spec.comm_turn;
    shape.world_size = spec.world_size;
    shape.gather_output = !gathering || spec.gather_output;
  }
  return verdict;
}

Verdict judge_add_rms_norm(const CallSpec& spec, const MaterializedCall& call) {
  Verdict verdict;
  CallShape& shape = verdict.shape;
  if (!(spec.epsilon > 0 && spec.epsilon < 1)) verdict.faults.insert("epsilon");
  const GemmFacts gemm = judge_gemm(spec, verdict);

  // residual [b, s, n] with b * s = m (x1's b and s when it is 3-D), gamma
  // [n]; both of the output dtype (x1's outside full quant).
  const ArgSpec& residual = spec.arg(Arg::residual);
  bool residual_ok = sane(residual) && residual.shape.size() == 3 && row_major(residual);
  if (residual_ok && gemm.dims_known) {
    const std::vector<std::int64_t>& r = residual.shape;
    const bool batch_ok = shape.batch == 0 || (r[0] == shape.batch && r[1] == shape.seq);
    residual_ok = r[2] == shape.n && static_cast<Int>(r[0]) * r[1] == shape.m && batch_ok;
  }
  if (gemm.out_dtype && residual.dtype != *gemm.out_dtype) residual_ok = false;
  if (!residual_ok) fault(verdict, Arg::residual);
  const ArgSpec& gamma = spec.arg(Arg::gamma);
  const bool gamma_ok = sane(gamma) && gamma.shape.size() == 1 && row_major(gamma) &&
                        (!gemm.dims_known || gamma.shape[0] == shape.n) &&
                        (!gemm.out_dtype || gamma.dtype == *gemm.out_dtype);
  if (!gamma_ok) fault(verdict, Arg::gamma);
  if (residual_ok && gemm.dims_known && gemm.out_dtype) {
    verdict.output_bytes = capped_mul(capped_mul(shape.m, shape.n), element_size(*gemm.out_dtype));
  }

  // What the call writes is disjoint from every input; y may be residual
  // itself, and is in the in-place form.
  const std::initializer_list<Arg> inputs = {Arg::x1,
                                             Arg::x2,
                                             Arg::bias,
                                             Arg::antiquant_scale,
                                             Arg::antiquant_offset,
                                             Arg::dequant_scale,
                                             Arg::gamma};
  if (call_form(spec) == Form::in_place && verdict.faults.empty()) {
    check_disjoint(spec, call, verdict, Arg::residual, inputs);
  }
  if (call_form(spec) == Form::out && verdict.faults.empty()) {
    const ArgSpec& y = spec.arg(Arg::y);
    const ArgSpec& norm_out = spec.arg(Arg::norm_out);
    const bool y_ok = output_ok(y, residual.dtype, residual.shape);
    const bool norm_ok = output_ok(norm_out, residual.dtype, residual.shape);
    if (!y_ok) fault(verdict, Arg::y);
    if (!norm_ok) fault(verdict, Arg::norm_out);
    if (y_ok) {
      check_disjoint(spec, call, verdict, Arg::y, inputs);
      const bool in_place = call.views[static_cast<int>(Arg::y)]->data() ==
                            call.views[static_cast<int>(Arg::residual)]->data();
      if (!in_place) check_disjoint(spec, call, verdict, Arg::y, {Arg::residual});
    }
    if (norm_ok) check_disjoint(spec, call, verdict, Arg::norm_out, inputs);
    if (norm_ok) check_disjoint(spec, call, verdict, Arg::norm_out, {Arg::residual});
    if (y_ok && norm_ok && overlap(spec, call, Arg::y, Arg::norm_out)) {
      fault(verdict, Arg::y);
      fault(verdict, Arg::norm_out);
    }
  }

  if (verdict.accepted()) {
    shape.op = pipeline::Operator::mm_all_reduce_add_rms_norm;
    shape.batch = residual.shape[0];
    shape.seq = residual.shape[1];
    shape.epsilon = static_cast<float>(spec.epsilon);
  }
  return verdict;
}

}  // namespace tpfuse::fuzz::contract
