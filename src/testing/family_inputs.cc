// The family's inputs: x1, x2 and bias come from make_rank_inputs (plain
// mode, or full quant for the int8 quant path), the rest from streams of
// their own, so that a spec's scales or residual do not change its x1 or x2.
#include "tpfuse/testing/family_inputs.h"

#include <utility>
#include <vector>

#include "tpfuse/core/error.h"
#include "tpfuse/ops/quant_param.h"

namespace tpfuse::testing {

namespace {

// Streams beyond make_rank_inputs' own (inputs.h).
enum FamilyStream : std::uint64_t {
  kX1Scale = 101,
  kX2Scale,
  kResidual,
  kGamma,
};

}  // namespace

SequenceParallelInputs make_sequence_parallel_inputs(const SequenceParallelSpec& spec, int rank) {
  require(!spec.quant || spec.x2_scale_dtype == DType::f32 || spec.x2_scale_dtype == DType::i64,
          "spec.x2_scale_dtype: expected f32 or i64, got ", dtype_name(spec.x2_scale_dtype));
  CaseSpec product;
  product.mode = spec.quant ? Mode::full_quant : Mode::plain;
  product.dtype = spec.quant ? DType::f16 : spec.dtype;
  product.m = spec.m;
  product.n = spec.n_for_rank(rank);
  product.k = spec.k_for_rank(rank);
  product.x2_transposed = spec.x2_transposed;
  product.bias = spec.bias;
  product.comm_turn = spec.comm_turn;
  product.seed = spec.seed;

  SequenceParallelInputs in;
  in.product = make_rank_inputs(product, rank);
  SequenceParallelOptions options;
  options.bias = in.product.args.options.bias;
  options.comm_turn = spec.comm_turn;
  options.output_dtype = spec.output_dtype;
  if (spec.quant) {
    const std::int64_t n = product.n;
    const std::vector<std::int64_t> shape =
        spec.x2_scale_2d ? std::vector<std::int64_t>{1, n} : std::vector<std::int64_t>{n};
    Tensor scale = uniform_tensor(DType::f32, shape, 0.5e-3, 1.5e-3, spec.seed, rank, kX2Scale);
    if (spec.x2_scale_dtype == DType::f32) {
      in.x2_scale = std::move(scale);
    } else {
      in.x2_scale = Tensor(DType::i64, shape);
      for (std::int64_t j = 0; j < n; ++j) {
        in.x2_scale.data_as<std::int64_t>()[j] = trans_quant_param(scale.data_as<float>()[j]);
      }
    }
    options.x2_scale = in.x2_scale.view();
    if (spec.x1_scale) {
      const std::int64_t shape_x1[] = {spec.m, 1};
      in.x1_scale = uniform_tensor(DType::f32, shape_x1, 0.01, 0.05, spec.seed, rank, kX1Scale);
      options.x1_scale = in.x1_scale.view();
    }
  }
  in.all_gather.x1 = in.reduce_scatter.x1 = in.product.args.x1;
  in.all_gather.x2 = in.reduce_scatter.x2 = in.product.args.x2;
  static_cast<SequenceParallelOptions&>(in.all_gather.options) = options;
  static_cast<SequenceParallelOptions&>(in.reduce_scatter.options) = options;
  return in;
}

AddRmsNormInputs make_add_rms_norm_inputs(const AddRmsNormSpec& spec, int rank) {
  require(!spec.product.x3, "spec.product.x3: expected false (the operator has no x3), got true");
  AddRmsNormInputs in;
  in.product = make_rank_inputs(spec.product, rank);
  const DType out = output_dtype(spec.product);
  const std::int64_t batch = spec.product.batch > 0 ? spec.product.batch : 1;
  const std::int64_t residual_shape[] = {batch, spec.product.m / batch, spec.product.n};
  const std::int64_t gamma_shape[] = {spec.product.n};
  // Rank 0's streams on every rank: the operator needs the same residual and gamma everywhere.
  in.residual = uniform_tensor(out, residual_shape, -1.0, 1.0, spec.product.seed, 0, kResidual);
  in.gamma = uniform_tensor(out, gamma_shape, -1.0, 1.0, spec.product.seed, 0, kGamma);

  const MmAllReduceOptions& product = in.product.args.options;
  AddRmsNormArgs& args = in.args;
  args.x1 = in.product.args.x1;
  args.x2 = in.product.args.x2;
  args.residual = in.residual.view();
  args.gamma = in.gamma.view();
  args.options.epsilon = spec.epsilon;
  args.options.bias = product.bias;
  args.options.antiquant_scale = product.antiquant_scale;
  args.options.antiquant_offset = product.antiquant_offset;
  args.options.dequant_scale = product.dequant_scale;
  args.options.antiquant_group_size = product.antiquant_group_size;
  args.options.comm_turn = product.comm_turn;
  return in;
}

}  // namespace tpfuse::testing
