// The rest of the family as torch operators (docs/SEMANTICS-FAMILY.md has the
// contract; include/tpfuse/ops/family.h the C++ API they call):
//
//   all_gather_base_mm(...)           -> (output, gather_out)   CPU + Autograd
//   mm_reduce_scatter_base(...)       -> output                 CPU + Autograd
//   mm_all_reduce_add_rms_norm(...)   -> (y, norm_out)
//   mm_all_reduce_add_rms_norm_(...)  -> (residual, norm_out)   y written into residual
//
// The two sequence-parallel operators differentiate in plain mode, each
// backward using the other operator; their quant paths and the add-RMSNorm
// operator have no backward and refuse a tensor that requires grad.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstddef>
#include <initializer_list>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "torch_convert.h"
#include "tpfuse/tpfuse.h"

namespace tpfuse::torch_binding {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The arguments all_gather_base_mm and mm_reduce_scatter_base share, in the
// layouts the library reads (its views point into these tensors).
struct SequenceParallelArgs {
  c10::optional<at::Tensor> bias, x1_scale, x2_scale;
  std::int64_t comm_turn;
  c10::optional<at::ScalarType> output_dtype;
  c10::optional<c10::string_view> comm_mode;

  void fill(SequenceParallelOptions& options) const {
    options.bias = to_view("bias", bias);
    options.x1_scale = to_view("x1_scale", x1_scale);
    options.x2_scale = to_view("x2_scale", x2_scale);
    options.comm_turn = comm_turn;
    if (output_dtype.has_value()) options.output_dtype = to_dtype("output_dtype", *output_dtype);
    if (comm_mode.has_value())
      options.comm_mode = std::string(comm_mode->data(), comm_mode->size());
  }
};

// The packing the binding keeps for a plain-mode call's x2 (the quant
// path's scales vary per call), else null: x2 as given is used.
std::shared_ptr<const PackedWeight> plain_packing(const at::Tensor& x1, const at::Tensor& x2,
                                                  const at::Tensor& x2_read,
                                                  const SequenceParallelArgs& args) {
  static const c10::optional<at::Tensor> none;
  if (args.x1_scale.has_value() || args.x2_scale.has_value()) return nullptr;
  const WeightArgs plain{none, none, none, 0};
  return cached_packed_weight(x1, x2, x2_read, plain, plain);
}

std::tuple<at::Tensor, at::Tensor> all_gather_base_mm_cpu(
    const at::Tensor& x1, const at::Tensor& x2, c10::string_view hcom, std::int64_t world_size,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& x1_scale,
    const c10::optional<at::Tensor>& x2_scale, std::int64_t gather_index, bool gather_output,
    std::int64_t comm_turn, c10::optional<at::ScalarType> output_dtype,
    c10::optional<c10::string_view> comm_mode) {
  return translate_errors([&] {
    const at::Tensor x1_read = as_read(x1);
    const at::Tensor x2_read = weight_as_read(x2);
    const SequenceParallelArgs read{as_read(bias), as_read(x1_scale), as_read(x2_scale),
                                    comm_turn,     output_dtype,      comm_mode};
    AllGatherMmOptions options;
    read.fill(options);
    options.gather_index = gather_index;
    options.gather_output = gather_output;
    const auto packed = plain_packing(x1, x2, x2_read, read);
    const TensorView x1_view = to_view("x1", x1_read);
    AllGatherMmResult result =
        packed ? all_gather_base_mm(x1_view, *packed, group_of(hcom), world_size, options)
               : all_gather_base_mm(x1_view, to_view("x2", x2_read), group_of(hcom), world_size,
                                    options);
    return std::make_tuple(adopt(std::move(result.output)), adopt(std::move(result.gather_out)));
  });
}

at::Tensor mm_reduce_scatter_base_cpu(
    const at::Tensor& x1, const at::Tensor& x2, c10::string_view hcom, std::int64_t world_size,
    c10::string_view reduce_op, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& x1_scale, const c10::optional<at::Tensor>& x2_scale,
    std::int64_t comm_turn, c10::optional<at::ScalarType> output_dtype,
    c10::optional<c10::string_view> comm_mode) {
  return translate_errors([&] {
    const at::Tensor x1_read = as_read(x1);
    const at::Tensor x2_read = weight_as_read(x2);
    const SequenceParallelArgs read{as_read(bias), as_read(x1_scale), as_read(x2_scale),
                                    comm_turn,     output_dtype,      comm_mode};
    MmReduceScatterOptions options;
    read.fill(options);
    options.reduce_op = std::string(reduce_op.data(), reduce_op.size());
    const auto packed = plain_packing(x1, x2, x2_read, read);
    const TensorView x1_view = to_view("x1", x1_read);
    return adopt(packed
                     ? mm_reduce_scatter_base(x1_view, *packed, group_of(hcom), world_size, options)
                     : mm_reduce_scatter_base(x1_view, to_view("x2", x2_read), group_of(hcom),
                                              world_size, options));
  });
}

// Every rank's rows of `block` ([rows, cols], the same shape on every rank),
// in rank order: the all-gather a forward without gather_out did, again.
at::Tensor gather_rows(const at::Tensor& block, const std::string& hcom, std::int64_t world_size) {
  return translate_errors([&] {
    const at::Tensor dense = block.contiguous();
    at::Tensor gathered = at::empty({world_size * dense.size(0), dense.size(1)}, dense.options());
    const std::vector<std::size_t> counts(static_cast<std::size_t>(world_size),
                                          static_cast<std::size_t>(dense.numel()));
    comm::find_communicator(hcom)
        ->all_gather_start(dense.data_ptr(), gathered.data_ptr(), counts,
                           to_dtype("grad", dense.scalar_type()))
        ->wait();
    return gathered;
  });
}

// a^T @ b in fp32 (torch 1.13 has no f16 matmul on CPU), rounded once to `type`.
at::Tensor transposed_product(const at::Tensor& a, const at::Tensor& b, at::ScalarType type) {
  return a.to(at::kFloat).t().mm(b.to(at::kFloat)).to(type);
}

at::Tensor row_sum(const at::Tensor& rows, at::ScalarType type) {
  return rows.to(at::kFloat).sum(0).to(type);
}

void save_common(AutogradContext* ctx, c10::string_view hcom, std::int64_t world_size,
                 const at::Tensor& x1, const at::Tensor& x2,
                 const c10::optional<at::Tensor>& bias) {
  ctx->saved_data["hcom"] = std::string(group_of(hcom));
  ctx->saved_data["world_size"] = world_size;
  ctx->saved_data["x1_grad"] = x1.requires_grad();
  ctx->saved_data["x2_grad"] = x2.requires_grad();
  ctx->saved_data["bias_grad"] = requires_grad(bias);
}

// Sequence parallelism's column-parallel linear. Rank r's output is
// gather(x1) @ x2_r + bias_r, so
//   grad x1_r   = rows r of sum over q of grad_q @ x2_q^T: mm_reduce_scatter_base;
//   grad x2_r   = gather(x1)^T @ grad_r (local; gathered again when the
//                 forward kept no gather_out);
//   grad bias_r = grad_r summed over rows.
// gather_out has no gradient. The backward's collectives follow the
// gradients this rank needs, so every rank must need the same ones (ranks of
// one model do): ranks that differ issue different collectives.
class AllGatherBaseMmFunction : public torch::autograd::Function<AllGatherBaseMmFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x1, const at::Tensor& x2,
                               c10::string_view hcom, std::int64_t world_size,
                               const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& x1_scale,
                               const c10::optional<at::Tensor>& x2_scale, std::int64_t gather_index,
                               bool gather_output, std::int64_t comm_turn,
                               c10::optional<at::ScalarType> output_dtype,
                               c10::optional<c10::string_view> comm_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, gather_out] =
        all_gather_base_mm_cpu(x1, x2, hcom, world_size, bias, x1_scale, x2_scale, gather_index,
                               gather_output, comm_turn, output_dtype, comm_mode);
    ctx->mark_non_differentiable({gather_out});
    save_common(ctx, hcom, world_size, x1, x2, bias);
    ctx->saved_data["gather_output"] = gather_output;
    ctx->save_for_backward({gather_output ? gather_out : x1, x2});
    return {output, gather_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& rows = saved[0];  // gather_out, or x1 to gather again
    const at::Tensor& x2 = saved[1];
    const at::Tensor& grad = grads[0];
    const std::string hcom = ctx->saved_data["hcom"].toStringRef();
    const std::int64_t world_size = ctx->saved_data["world_size"].toInt();

    at::Tensor grad_x1, grad_x2, grad_bias;
    if (ctx->saved_data["x1_grad"].toBool()) {
      grad_x1 =
          mm_reduce_scatter_base_cpu(grad, x2.t(), hcom, world_size, "sum", c10::nullopt,
                                     c10::nullopt, c10::nullopt, 0, c10::nullopt, c10::nullopt);
    }
    if (ctx->saved_data["x2_grad"].toBool()) {
      const at::Tensor gathered =
          ctx->saved_data["gather_output"].toBool() ? rows : gather_rows(rows, hcom, world_size);
      grad_x2 = transposed_product(gathered, grad, x2.scalar_type());
    }
    if (ctx->saved_data["bias_grad"].toBool()) grad_bias = row_sum(grad, grad.scalar_type());
    // One entry per forward argument: x1, x2, hcom, world_size, bias, x1_scale,
    // x2_scale, gather_index, gather_output, comm_turn, output_dtype, comm_mode.
    return {grad_x1, grad_x2, {}, {}, grad_bias, {}, {}, {}, {}, {}, {}, {}};
  }
};

// Sequence parallelism's row-parallel linear. Rank q's inputs enter every
// rank's rows through sum over q of (x1_q @ x2_q + bias_q), so with the
// gathered gradient G = gather(grad_r) ([m, n]):
//   grad x1_q   = G @ x2_q^T: all_gather_base_mm's output, G its gather_out;
//   grad x2_q   = x1_q^T @ G;   grad bias_q = G summed over rows.
// As above, every rank must need the same gradients.
class MmReduceScatterBaseFunction : public torch::autograd::Function<MmReduceScatterBaseFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x1, const at::Tensor& x2,
                            c10::string_view hcom, std::int64_t world_size,
                            c10::string_view reduce_op, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& x1_scale,
                            const c10::optional<at::Tensor>& x2_scale, std::int64_t comm_turn,
                            c10::optional<at::ScalarType> output_dtype,
                            c10::optional<c10::string_view> comm_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = mm_reduce_scatter_base_cpu(x1, x2, hcom, world_size, reduce_op, bias, x1_scale,
                                                x2_scale, comm_turn, output_dtype, comm_mode);
    save_common(ctx, hcom, world_size, x1, x2, bias);
    ctx->save_for_backward({x1, x2});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x1 = saved[0];
    const at::Tensor& x2 = saved[1];
    const at::Tensor& grad = grads[0];
    const std::string hcom = ctx->saved_data["hcom"].toStringRef();
    const std::int64_t world_size = ctx->saved_data["world_size"].toInt();

    at::Tensor grad_x1, gathered, grad_x2, grad_bias;
    if (ctx->saved_data["x1_grad"].toBool()) {
      std::tie(grad_x1, gathered) =
          all_gather_base_mm_cpu(grad, x2.t(), hcom, world_size, c10::nullopt, c10::nullopt,
                                 c10::nullopt, 0, true, 0, c10::nullopt, c10::nullopt);
    } else {
      gathered = gather_rows(grad, hcom, world_size);
    }
    if (ctx->saved_data["x2_grad"].toBool()) {
      grad_x2 = transposed_product(x1, gathered, x2.scalar_type());
    }
    if (ctx->saved_data["bias_grad"].toBool()) grad_bias = row_sum(gathered, grad.scalar_type());
    // One entry per forward argument: x1, x2, hcom, world_size, reduce_op, bias,
    // x1_scale, x2_scale, comm_turn, output_dtype, comm_mode.
    return {grad_x1, grad_x2, {}, {}, {}, grad_bias, {}, {}, {}, {}, {}};
  }
};

struct NamedInput {
  const char* name;
  at::Tensor tensor;
};

// Where there is no backward, a tensor that requires grad is an error, not a
// result that silently has no gradient.
void refuse_gradients(const char* op, const char* what, std::initializer_list<NamedInput> inputs) {
  if (!at::GradMode::is_enabled()) return;
  for (const NamedInput& input : inputs) {
    if (input.tensor.defined() && input.tensor.requires_grad()) {
      throw c10::Error(cat(op, ": ", what, " has no backward, and ", input.name,
                           " requires grad (detach it, or call the operator under "
                           "torch.no_grad())"),
                       "");
    }
  }
}

at::Tensor or_undefined(const c10::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? *tensor : at::Tensor();
}

bool quant_path(const at::Tensor& x1, const at::Tensor& x2) {
  return x1.scalar_type() == at::kChar && x2.scalar_type() == at::kChar;
}

constexpr const char* kQuantPath = "the quant path (x1 and x2 int8)";

std::tuple<at::Tensor, at::Tensor> all_gather_base_mm_autograd(
    const at::Tensor& x1, const at::Tensor& x2, c10::string_view hcom, std::int64_t world_size,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& x1_scale,
    const c10::optional<at::Tensor>& x2_scale, std::int64_t gather_index, bool gather_output,
    std::int64_t comm_turn, c10::optional<at::ScalarType> output_dtype,
    c10::optional<c10::string_view> comm_mode) {
  if (!records_gradients(x1, x2, bias, x1_scale, x2_scale)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return all_gather_base_mm_cpu(x1, x2, hcom, world_size, bias, x1_scale, x2_scale, gather_index,
                                  gather_output, comm_turn, output_dtype, comm_mode);
  }
  if (quant_path(x1, x2)) {
    refuse_gradients("all_gather_base_mm", kQuantPath,
                     {{"bias", or_undefined(bias)},
                      {"x1_scale", or_undefined(x1_scale)},
                      {"x2_scale", or_undefined(x2_scale)}});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return all_gather_base_mm_cpu(x1, x2, hcom, world_size, bias, x1_scale, x2_scale, gather_index,
                                  gather_output, comm_turn, output_dtype, comm_mode);
  }
  const variable_list outputs = AllGatherBaseMmFunction::apply(
      x1, x2, hcom, world_size, bias, x1_scale, x2_scale, gather_index, gather_output, comm_turn,
      output_dtype, comm_mode);
  return {outputs[0], outputs[1]};
}

at::Tensor mm_reduce_scatter_base_autograd(
    const at::Tensor& x1, const at::Tensor& x2, c10::string_view hcom, std::int64_t world_size,
    c10::string_view reduce_op, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& x1_scale, const c10::optional<at::Tensor>& x2_scale,
    std::int64_t comm_turn, c10::optional<at::ScalarType> output_dtype,
    c10::optional<c10::string_view> comm_mode) {
  if (!records_gradients(x1, x2, bias, x1_scale, x2_scale)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return mm_reduce_scatter_base_cpu(x1, x2, hcom, world_size, reduce_op, bias, x1_scale, x2_scale,
                                      comm_turn, output_dtype, comm_mode);
  }
  if (quant_path(x1, x2)) {
    refuse_gradients("mm_reduce_scatter_base", kQuantPath,
                     {{"bias", or_undefined(bias)},
                      {"x1_scale", or_undefined(x1_scale)},
                      {"x2_scale", or_undefined(x2_scale)}});
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return mm_reduce_scatter_base_cpu(x1, x2, hcom, world_size, reduce_op, bias, x1_scale, x2_scale,
                                      comm_turn, output_dtype, comm_mode);
  }
  return MmReduceScatterBaseFunction::apply(x1, x2, hcom, world_size, reduce_op, bias, x1_scale,
                                            x2_scale, comm_turn, output_dtype, comm_mode);
}

// mm_all_reduce_add_rms_norm's optional arguments, as given or (as_read) in
// the layouts the library reads.
struct AddRmsNormArgs {
  c10::string_view reduce_op;
  double epsilon;
  c10::optional<at::Tensor> bias, antiquant_scale, antiquant_offset, dequant_scale;
  std::int64_t antiquant_group_size, comm_turn;

  AddRmsNormArgs as_read() const {
    return {reduce_op,
            epsilon,
            torch_binding::as_read(bias),
            torch_binding::as_read(antiquant_scale),
            torch_binding::as_read(antiquant_offset),
            torch_binding::as_read(dequant_scale),
            antiquant_group_size,
            comm_turn};
  }

  WeightArgs weight_args() const {
    return {antiquant_scale, antiquant_offset, dequant_scale, antiquant_group_size};
  }

  MmAllReduceAddRmsNormOptions to_tpfuse() const {
    MmAllReduceAddRmsNormOptions options;
    options.reduce_op = std::string(reduce_op.data(), reduce_op.size());
    options.epsilon = epsilon;
    options.bias = to_view("bias", bias);
    options.antiquant_scale = to_view("antiquant_scale", antiquant_scale);
    options.antiquant_offset = to_view("antiquant_offset", antiquant_offset);
    options.dequant_scale = to_view("dequant_scale", dequant_scale);
    options.antiquant_group_size = antiquant_group_size;
    options.comm_turn = comm_turn;
    return options;
  }
};

// Calls `op` (either form of the operator) with the arguments in the layouts
// the library reads: op(x1, weight, residual, gamma, group, options), the
// weight packed where the binding keeps it packed, else x2 itself.
template <class Op>
auto with_read_arguments(const at::Tensor& x1, const at::Tensor& x2,
                         const at::Tensor& residual_read, const at::Tensor& gamma,
                         c10::string_view hcom, const AddRmsNormArgs& given, Op&& op) {
  const at::Tensor x1_read = as_read(x1);
  const at::Tensor x2_read = weight_as_read(x2);
  const at::Tensor gamma_read = as_read(gamma);
  const AddRmsNormArgs read = given.as_read();
  const auto packed =
      cached_packed_weight(x1, x2, x2_read, given.weight_args(), read.weight_args());
  const TensorView x1_view = to_view("x1", x1_read);
  const TensorView residual_view = to_view("residual", residual_read);
  const TensorView gamma_view = to_view("gamma", gamma_read);
  const MmAllReduceAddRmsNormOptions options = read.to_tpfuse();
  if (packed) return op(x1_view, *packed, residual_view, gamma_view, group_of(hcom), options);
  return op(x1_view, to_view("x2", x2_read), residual_view, gamma_view, group_of(hcom), options);
}

std::tuple<at::Tensor, at::Tensor> mm_all_reduce_add_rms_norm_cpu(
    const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& residual, const at::Tensor& gamma,
    c10::string_view hcom, c10::string_view reduce_op, double epsilon,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& antiquant_scale,
    const c10::optional<at::Tensor>& antiquant_offset,
    const c10::optional<at::Tensor>& dequant_scale, std::int64_t antiquant_group_size,
    std::int64_t comm_turn) {
  return translate_errors([&] {
    const AddRmsNormArgs given{reduce_op,
                               epsilon,
                               bias,
                               antiquant_scale,
                               antiquant_offset,
                               dequant_scale,
                               antiquant_group_size,
                               comm_turn};
    AddRmsNormResult result = with_read_arguments(
        x1, x2, as_read(residual), gamma, hcom, given,
        [](const auto&... args) { return mm_all_reduce_add_rms_norm(args...); });
    return std::make_tuple(adopt(std::move(result.y)), adopt(std::move(result.norm_out)));
  });
}

// y goes into `residual` itself where the library can write it there
// (row-major), else into a row-major copy that is then copied back.
std::tuple<at::Tensor, at::Tensor> mm_all_reduce_add_rms_norm_inplace_cpu(
    const at::Tensor& x1, const at::Tensor& x2, at::Tensor& residual, const at::Tensor& gamma,
    c10::string_view hcom, c10::string_view reduce_op, double epsilon,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& antiquant_scale,
    const c10::optional<at::Tensor>& antiquant_offset,
    const c10::optional<at::Tensor>& dequant_scale, std::int64_t antiquant_group_size,
    std::int64_t comm_turn) {
  return translate_errors([&] {
    const AddRmsNormArgs given{reduce_op,
                               epsilon,
                               bias,
                               antiquant_scale,
                               antiquant_offset,
                               dequant_scale,
                               antiquant_group_size,
                               comm_turn};
    const at::Tensor residual_read = as_read(residual);
    at::Tensor norm_out = adopt(with_read_arguments(
        x1, x2, residual_read, gamma, hcom, given,
        [](const auto&... args) { return mm_all_reduce_add_rms_norm_(args...); }));
    if (!residual_read.is_same(residual)) residual.copy_(residual_read);
    return std::tuple<at::Tensor, at::Tensor>(residual, norm_out);
  });
}

constexpr const char* kNoBackward = "the operator";

std::tuple<at::Tensor, at::Tensor> mm_all_reduce_add_rms_norm_autograd(
    const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& residual, const at::Tensor& gamma,
    c10::string_view hcom, c10::string_view reduce_op, double epsilon,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& antiquant_scale,
    const c10::optional<at::Tensor>& antiquant_offset,
    const c10::optional<at::Tensor>& dequant_scale, std::int64_t antiquant_group_size,
    std::int64_t comm_turn) {
  refuse_gradients("mm_all_reduce_add_rms_norm", kNoBackward,
                   {{"x1", x1},
                    {"x2", x2},
                    {"residual", residual},
                    {"gamma", gamma},
                    {"bias", or_undefined(bias)},
                    {"antiquant_scale", or_undefined(antiquant_scale)},
                    {"antiquant_offset", or_undefined(antiquant_offset)},
                    {"dequant_scale", or_undefined(dequant_scale)}});
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return mm_all_reduce_add_rms_norm_cpu(x1, x2, residual, gamma, hcom, reduce_op, epsilon, bias,
                                        antiquant_scale, antiquant_offset, dequant_scale,
                                        antiquant_group_size, comm_turn);
}

// As above; and residual changed in place, so its version moves on (autograd
// then refuses a backward that saved its old values).
std::tuple<at::Tensor, at::Tensor> mm_all_reduce_add_rms_norm_inplace_autograd(
    const at::Tensor& x1, const at::Tensor& x2, at::Tensor& residual, const at::Tensor& gamma,
    c10::string_view hcom, c10::string_view reduce_op, double epsilon,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& antiquant_scale,
    const c10::optional<at::Tensor>& antiquant_offset,
    const c10::optional<at::Tensor>& dequant_scale, std::int64_t antiquant_group_size,
    std::int64_t comm_turn) {
  refuse_gradients("mm_all_reduce_add_rms_norm_", kNoBackward,
                   {{"x1", x1},
                    {"x2", x2},
                    {"residual", residual},
                    {"gamma", gamma},
                    {"bias", or_undefined(bias)},
                    {"antiquant_scale", or_undefined(antiquant_scale)},
                    {"antiquant_offset", or_undefined(antiquant_offset)},
                    {"dequant_scale", or_undefined(dequant_scale)}});
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return mm_all_reduce_add_rms_norm_inplace_cpu(x1, x2, residual, gamma, hcom, reduce_op, epsilon,
                                                  bias, antiquant_scale, antiquant_offset,
                                                  dequant_scale, antiquant_group_size, comm_turn);
  }();
  torch::autograd::impl::bump_version(residual);
  return result;
}

}  // namespace

}  // namespace tpfuse::torch_binding

TORCH_LIBRARY_FRAGMENT(tpfuse, m) {
  m.def(
      "all_gather_base_mm(Tensor x1, Tensor x2, str hcom, int world_size, *, Tensor? bias=None, "
      "Tensor? x1_scale=None, Tensor? x2_scale=None, int gather_index=0, "
      "bool gather_output=True, int comm_turn=0, ScalarType? output_dtype=None, "
      "str? comm_mode=None) -> (Tensor, Tensor)");
  m.def(
      "mm_reduce_scatter_base(Tensor x1, Tensor x2, str hcom, int world_size, *, "
      "str reduce_op='sum', Tensor? bias=None, Tensor? x1_scale=None, Tensor? x2_scale=None, "
      "int comm_turn=0, ScalarType? output_dtype=None, str? comm_mode=None) -> Tensor");
  m.def(
      "mm_all_reduce_add_rms_norm(Tensor x1, Tensor x2, Tensor residual, Tensor gamma, "
      "str hcom, *, str reduce_op='sum', float epsilon=1e-06, Tensor? bias=None, "
      "Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, "
      "Tensor? dequant_scale=None, int antiquant_group_size=0, int comm_turn=0) "
      "-> (Tensor, Tensor)");
  m.def(
      "mm_all_reduce_add_rms_norm_(Tensor x1, Tensor x2, Tensor(a!) residual, Tensor gamma, "
      "str hcom, *, str reduce_op='sum', float epsilon=1e-06, Tensor? bias=None, "
      "Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, "
      "Tensor? dequant_scale=None, int antiquant_group_size=0, int comm_turn=0) "
      "-> (Tensor(a!), Tensor)");
}

TORCH_LIBRARY_IMPL(tpfuse, CPU, m) {
  using namespace tpfuse::torch_binding;
  m.impl("all_gather_base_mm", &all_gather_base_mm_cpu);
  m.impl("mm_reduce_scatter_base", &mm_reduce_scatter_base_cpu);
  m.impl("mm_all_reduce_add_rms_norm", &mm_all_reduce_add_rms_norm_cpu);
  m.impl("mm_all_reduce_add_rms_norm_", &mm_all_reduce_add_rms_norm_inplace_cpu);
}

TORCH_LIBRARY_IMPL(tpfuse, Autograd, m) {
  using namespace tpfuse::torch_binding;
  m.impl("all_gather_base_mm", &all_gather_base_mm_autograd);
  m.impl("mm_reduce_scatter_base", &mm_reduce_scatter_base_autograd);
  m.impl("mm_all_reduce_add_rms_norm", &mm_all_reduce_add_rms_norm_autograd);
  m.impl("mm_all_reduce_add_rms_norm_", &mm_all_reduce_add_rms_norm_inplace_autograd);
}
