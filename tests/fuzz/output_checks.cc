#include "output_checks.h"

#include <bit>
#include <cstdint>
#include <cstring>
#include <exception>
#include <vector>

#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/testing/golden.h"
#include "tpfuse/testing/golden_family.h"

namespace tpfuse::fuzz {

namespace {

template <class T>
T load(const void* data, std::int64_t i) {
  T value;
  std::memcpy(&value, static_cast<const std::byte*>(data) + i * sizeof(T), sizeof(T));
  return value;
}

// An f16, bf16 or f32 element as f32 (exactly).
float load_float(DType dtype, const void* data, std::int64_t i) {
  switch (dtype) {
    case DType::f16:
      return f16_to_f32(load<Half>(data, i));
    case DType::bf16:
      return bf16_to_f32(load<BFloat16>(data, i));
    default:
      return load<float>(data, i);
  }
}

// f32 rounded once to f16 or bf16: the bits.
std::uint16_t round_to(DType dtype, float value) {
  return dtype == DType::f16 ? f32_to_f16(value).bits : f32_to_bf16(value).bits;
}

bool is_nan(DType dtype, std::uint16_t bits) {
  const std::uint16_t exponent = dtype == DType::f16 ? 0x7c00 : 0x7f80;
  return (bits & exponent) == exponent && (bits & ~exponent & 0x7fff) != 0;
}

// `got` (count contiguous f16 or bf16 elements) against `want`, bit for bit
// but for NaN, which matches any NaN.
std::string compare_bits(const char* name, DType dtype, const void* got,
                         const std::vector<std::uint16_t>& want) {
  std::int64_t differ = 0, first = -1;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const auto bits = load<std::uint16_t>(got, static_cast<std::int64_t>(i));
    if (bits == want[i] || (is_nan(dtype, bits) && is_nan(dtype, want[i]))) continue;
    if (differ++ == 0) first = static_cast<std::int64_t>(i);
  }
  if (differ == 0) return "";
  return cat(name, ": ", differ, " of ", want.size(), " elements differ, the first [", first,
             "] 0x", std::hex, load<std::uint16_t>(got, first), " where 0x", want[first],
             " was expected");
}

std::vector<std::uint16_t> bits_of(const TensorView& view) {
  std::vector<std::uint16_t> bits(static_cast<std::size_t>(view.numel()));
  std::memcpy(bits.data(), view.data(), bits.size() * 2);
  return bits;
}

std::string dims_differ(const char* name, const Tensor& result, DType dtype,
                        std::initializer_list<std::int64_t> dims) {
  const auto shape = result.shape();
  if (result.dtype() == dtype && std::equal(shape.begin(), shape.end(), dims.begin(), dims.end())) {
    return "";
  }
  return cat(name, ": returned ", result.view().describe());
}

// `out` ([m, n] of the call) against the fp64 golden model of
// mm_all_reduce_base with these arguments.
std::string golden_mismatch(const TensorView& out, const TensorView& x1, const TensorView& x2,
                            const MmAllReduceOptions& options, const CallShape& shape) {
  const std::int64_t flat[2] = {shape.m, shape.n};
  const testing::RankArgs args[1] = {{x1, x2, options}};
  const testing::GoldenResult golden = testing::golden_mm_all_reduce(args);
  const testing::Comparison cmp =
      testing::compare(TensorView(out.data(), out.dtype(), flat), golden);
  if (cmp.ok()) return "";
  return cat(cmp.mismatches, " output elements differ from the golden model (worst ",
             cmp.worst_ratio, " x the bound, max error ", cmp.max_abs_error, ")");
}

// The quant path on one rank: (x1_scale[i] * x2_scale[j]) * (x1 @ x2 + bias)[i, j],
// the products and the bias summed in int32 (wrapping), the scales multiplied
// in fp32, that times the sum in fp32, rounded once.
std::vector<std::uint16_t> quant_output(const MaterializedCall& call, const CallShape& shape) {
  const TensorView x1 = call.view(Arg::x1), x2 = call.view(Arg::x2);
  const auto& bias = call.views[static_cast<int>(Arg::bias)];
  const auto& x1_scale = call.views[static_cast<int>(Arg::x1_scale)];
  const TensorView x2_scale = call.view(Arg::x2_scale);
  std::vector<std::uint16_t> out(static_cast<std::size_t>(shape.m * shape.n));
  for (std::int64_t i = 0; i < shape.m; ++i) {
    for (std::int64_t j = 0; j < shape.n; ++j) {
      std::uint32_t sum =
          bias ? static_cast<std::uint32_t>(load<std::int32_t>(bias->data(), j)) : 0;
      for (std::int64_t l = 0; l < shape.k; ++l) {
        const std::int32_t a = load<std::int8_t>(x1.data(), i * shape.k + l);
        const std::int32_t b = load<std::int8_t>(x2.data(), l * x2.stride(0) + j * x2.stride(1));
        sum += static_cast<std::uint32_t>(a * b);
      }
      // A packed i64 scale is the f32 in its low 32 bits.
      float scale = x2_scale.dtype() == DType::i64
                        ? std::bit_cast<float>(
                              static_cast<std::uint32_t>(load<std::uint64_t>(x2_scale.data(), j)))
                        : load<float>(x2_scale.data(), j);
      if (x1_scale) scale = load<float>(x1_scale->data(), i) * scale;
      const float value = static_cast<float>(static_cast<std::int32_t>(sum)) * scale;
      out[static_cast<std::size_t>(i * shape.n + j)] = round_to(shape.out_dtype, value);
    }
  }
  return out;
}

// all_gather_base_mm's and mm_reduce_scatter_base's output on one rank:
// x1 @ x2 + bias, as mm_all_reduce_base computes it on one rank.
std::string check_sequence_output(const CallSpec& spec, const MaterializedCall& call,
                                  const CallShape& shape, const TensorView& output,
                                  std::string_view hcom) {
  if (shape.mode != Mode::plain) {
    return compare_bits("output (the quant path's formula)", shape.out_dtype, output.data(),
                        quant_output(call, shape));
  }
  MmAllReduceOptions options;
  options.bias = call.options.bias;
  options.comm_turn = spec.comm_turn;
  const TensorView x1 = call.view(Arg::x1), x2 = call.view(Arg::x2);
  const Tensor reference = mm_all_reduce_base(x1, x2, hcom, options);
  const std::string differs = compare_bits("output (mm_all_reduce_base's)", shape.out_dtype,
                                           output.data(), bits_of(reference.view()));
  if (!differs.empty()) return differs;
  return golden_mismatch(output, x1, x2, options, shape);
}

// y bitwise round(mm_all_reduce_base's output + residual), the contract's
// first rounding; norm_out within the family's golden model's bounds.
std::string check_add_rms_norm(const MaterializedCall& call, const CallShape& shape,
                               const TensorView& y, const TensorView& norm_out,
                               std::span<const std::byte> residual_before, std::string_view hcom) {
  const TensorView x1 = call.view(Arg::x1), x2 = call.view(Arg::x2);
  const Tensor mm = mm_all_reduce_base(x1, x2, hcom, call.options);
  std::vector<std::uint16_t> want(static_cast<std::size_t>(shape.m * shape.n));
  for (std::size_t i = 0; i < want.size(); ++i) {
    const auto at = static_cast<std::int64_t>(i);
    want[i] =
        round_to(shape.out_dtype, load_float(shape.out_dtype, mm.data(), at) +
                                      load_float(shape.out_dtype, residual_before.data(), at));
  }
  const std::string differs = compare_bits("y (round(mm_all_reduce_base's output + residual))",
                                           shape.out_dtype, y.data(), want);
  if (!differs.empty()) return differs;
  // The residual as it was: the in-place form has written y over it.
  const TensorView residual(const_cast<std::byte*>(residual_before.data()), shape.out_dtype,
                            {shape.batch, shape.seq, shape.n});
  const testing::AddRmsNormArgs args[1] = {
      {x1, x2, residual, call.view(Arg::gamma), call.add_rms_norm}};
  const testing::GoldenAddRmsNorm golden = testing::golden_mm_all_reduce_add_rms_norm(args);
  const std::int64_t flat[2] = {shape.m, shape.n};
  const testing::Comparison cmp =
      testing::compare(TensorView(norm_out.data(), norm_out.dtype(), flat), golden.norm_out);
  if (cmp.ok()) return "";
  return cat("norm_out: ", cmp.mismatches, " elements differ from the golden model (worst ",
             cmp.worst_ratio, " x the bound, max error ", cmp.max_abs_error, ")");
}

std::string check(const CallSpec& spec, const MaterializedCall& call, const CallShape& shape,
                  const Results& results, std::span<const std::byte> residual_before,
                  std::string_view hcom) {
  const Form form = call_form(spec);
  const bool allocating = form == Form::allocating;
  switch (spec.op) {
    case Op::mm_all_reduce_base: {
      if (allocating) {
        if (results.out.dtype() != shape.out_dtype || results.out.numel() != shape.m * shape.n) {
          return cat("out: returned ", results.out.view().describe());
        }
      }
      const TensorView out = allocating ? results.out.view() : call.view(Arg::out);
      return golden_mismatch(out, call.view(Arg::x1), call.view(Arg::x2), call.options, shape);
    }
    case Op::all_gather_base_mm:
    case Op::mm_reduce_scatter_base: {
      const bool gathering = spec.op == Op::all_gather_base_mm;
      if (allocating) {
        std::string wrong =
            dims_differ("output", results.output, shape.out_dtype, {shape.m, shape.n});
        if (wrong.empty() && gathering && shape.gather_output) {
          wrong = dims_differ("gather_out", results.gather_out, shape.in_dtype, {shape.m, shape.k});
        } else if (wrong.empty() && gathering) {
          wrong = dims_differ("gather_out", results.gather_out, shape.in_dtype, {0});
        }
        if (!wrong.empty()) return wrong;
      }
      if (gathering && shape.gather_output) {
        const TensorView gathered =
            allocating ? results.gather_out.view() : call.view(Arg::gather_out);
        const auto bytes = static_cast<std::size_t>(shape.m * shape.k) * dtype_size(shape.in_dtype);
        if (std::memcmp(gathered.data(), call.view(Arg::x1).data(), bytes) != 0) {
          return "gather_out: differs from x1 (one rank)";
        }
      }
      const TensorView output = allocating ? results.output.view() : call.view(Arg::output);
      return check_sequence_output(spec, call, shape, output, hcom);
    }
    case Op::mm_all_reduce_add_rms_norm:
    case Op::mm_all_reduce_add_rms_norm_in_place: {
      const std::initializer_list<std::int64_t> dims = {shape.batch, shape.seq, shape.n};
      std::string wrong;
      if (allocating) wrong = dims_differ("y", results.y, shape.out_dtype, dims);
      if (wrong.empty() && form != Form::out) {
        wrong = dims_differ("norm_out", results.norm_out, shape.out_dtype, dims);
      }
      if (!wrong.empty()) return wrong;
      const TensorView y = form == Form::out        ? call.view(Arg::y)
                           : form == Form::in_place ? call.view(Arg::residual)
                                                    : results.y.view();
      const TensorView norm_out =
          form == Form::out ? call.view(Arg::norm_out) : results.norm_out.view();
      return check_add_rms_norm(call, shape, y, norm_out, residual_before, hcom);
    }
  }
  return "unknown operator";
}

}  // namespace

std::string check_outputs(const CallSpec& spec, const MaterializedCall& call,
                          const CallShape& shape, const Results& results,
                          std::span<const std::byte> residual_before, std::string_view hcom) {
  try {
    return check(spec, call, shape, results, residual_before, hcom);
  } catch (const std::exception& e) {
    return cat("the reference call of mm_all_reduce_base failed: ", e.what());
  }
}

}  // namespace tpfuse::fuzz
