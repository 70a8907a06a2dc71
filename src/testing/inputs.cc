// Deterministic operator inputs. Each tensor draws from its own splitmix64
// stream seeded by (seed, rank, tensor), so turning bias or x3 on does not
// change x1 or x2, and any rank can rebuild any other rank's inputs.
// Magnitudes are chosen so that no mode overflows f16 for the shapes tests
// use: activations in [-1, 1], quant scales around 1e-2 to 1e-3.
#include "tpfuse/testing/inputs.h"

#include <cmath>
#include <vector>

#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/ops/quant_param.h"

namespace tpfuse::testing {

namespace {

// Which tensor a random stream belongs to.
enum class Stream : std::uint64_t {
  x1 = 1,
  x2,
  bias,
  antiquant_scale,
  antiquant_offset,
  x3,
  dequant_scale
};

std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

class Random {
 public:
  Random(std::uint64_t seed, int rank, Stream stream) {
    std::uint64_t mix = seed;
    state_ = splitmix64(mix);
    mix ^= static_cast<std::uint64_t>(rank) * 0xD1B54A32D192ED03ull;
    state_ ^= splitmix64(mix);
    mix ^= static_cast<std::uint64_t>(stream) * 0x8CB92BA72F3D8DD7ull;
    state_ ^= splitmix64(mix);
  }

  // Uniform in [lo, hi).
  double uniform(double lo, double hi) {
    const double unit = static_cast<double>(splitmix64(state_) >> 11) * 0x1p-53;
    return lo + (hi - lo) * unit;
  }

  // Uniform integer in [lo, hi].
  std::int64_t integer(std::int64_t lo, std::int64_t hi) {
    const auto span = static_cast<std::uint64_t>(hi - lo) + 1;
    return lo + static_cast<std::int64_t>(splitmix64(state_) % span);
  }

 private:
  std::uint64_t state_ = 0;
};

void fill_uniform(Tensor& tensor, Random& random, double lo, double hi) {
  const std::int64_t count = tensor.numel();
  for (std::int64_t i = 0; i < count; ++i) {
    const auto value = static_cast<float>(random.uniform(lo, hi));
    switch (tensor.dtype()) {
      case DType::f16:
        tensor.data_as<Half>()[i] = f32_to_f16(value);
        break;
      case DType::bf16:
        tensor.data_as<BFloat16>()[i] = f32_to_bf16(value);
        break;
      case DType::f32:
        tensor.data_as<float>()[i] = value;
        break;
      default:
        throw InternalError(cat("fill_uniform: unexpected dtype ", dtype_name(tensor.dtype())));
    }
  }
}

void fill_integers(Tensor& tensor, Random& random, std::int64_t lo, std::int64_t hi) {
  const std::int64_t count = tensor.numel();
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int64_t value = random.integer(lo, hi);
    switch (tensor.dtype()) {
      case DType::i8:
        tensor.data_as<std::int8_t>()[i] = static_cast<std::int8_t>(value);
        break;
      case DType::i32:
        tensor.data_as<std::int32_t>()[i] = static_cast<std::int32_t>(value);
        break;
      default:
        throw InternalError(cat("fill_integers: unexpected dtype ", dtype_name(tensor.dtype())));
    }
  }
}

void check_spec(const CaseSpec& spec, int rank) {
  require(rank >= 0, "rank: expected >= 0, got ", rank);
  require(spec.m >= 1 && spec.n >= 1 && spec.k_for_rank(rank) >= 1,
          "spec: expected m, n and k >= 1, got m = ", spec.m, ", n = ", spec.n,
          ", k = ", spec.k_for_rank(rank));
  require(spec.batch >= 0 && (spec.batch == 0 || spec.m % spec.batch == 0),
          "spec.batch: expected 0 (2-D x1) or a divisor of m = ", spec.m, ", got ", spec.batch);
  require(spec.dtype == DType::f16 || spec.dtype == DType::bf16,
          "spec.dtype: expected f16 or bf16, got ", dtype_name(spec.dtype));
  if (spec.mode == Mode::plain) return;
  require(spec.scale_kind != ScaleKind::none, "spec.scale_kind: expected a scale layout in ",
          mode_name(spec.mode), " mode, got none");
  if (spec.mode == Mode::full_quant) {
    require(
        spec.scale_kind != ScaleKind::per_group,
        "spec.scale_kind: expected per_tensor or per_channel in full_quant mode, got per_group");
  }
  if (spec.scale_kind == ScaleKind::per_group) {
    require(spec.group_size > 0, "spec.group_size: expected > 0 for a per-group scale, got ",
            spec.group_size);
  }
}

// The scale's shape: [1], [n], or [ceil(k/G), n].
std::vector<std::int64_t> scale_shape(const CaseSpec& spec, std::int64_t k) {
  switch (spec.scale_kind) {
    case ScaleKind::per_tensor:
      return {1};
    case ScaleKind::per_group:
      return {(k + spec.group_size - 1) / spec.group_size, spec.n};
    default:
      return {spec.n};
  }
}

void make_weight_quant_scales(const CaseSpec& spec, int rank, std::int64_t k, RankInputs& in) {
  const auto shape = scale_shape(spec, k);
  in.antiquant_scale = Tensor(spec.dtype, shape);
  Random scale_random(spec.seed, rank, Stream::antiquant_scale);
  fill_uniform(in.antiquant_scale, scale_random, 0.01, 0.05);
  in.args.options.antiquant_scale = in.antiquant_scale.view();
  if (spec.offset) {
    in.antiquant_offset = Tensor(spec.dtype, shape);
    Random offset_random(spec.seed, rank, Stream::antiquant_offset);
    fill_uniform(in.antiquant_offset, offset_random, -2.0, 2.0);
    in.args.options.antiquant_offset = in.antiquant_offset.view();
  }
  in.args.options.antiquant_group_size = spec.group_size;
}

void make_dequant_scale(const CaseSpec& spec, int rank, RankInputs& in) {
  const auto shape = scale_shape(spec, 0);
  Random random(spec.seed, rank, Stream::dequant_scale);
  if (spec.dtype == DType::bf16) {
    in.dequant_scale = Tensor(DType::bf16, shape);
    fill_uniform(in.dequant_scale, random, 0.5e-3, 1.5e-3);
  } else {
    in.dequant_scale = Tensor(DType::i64, shape);
    for (std::int64_t j = 0; j < in.dequant_scale.numel(); ++j) {
      const auto scale = static_cast<float>(random.uniform(0.5e-3, 1.5e-3));
      in.dequant_scale.data_as<std::int64_t>()[j] = trans_quant_param(scale);
    }
  }
  in.args.options.dequant_scale = in.dequant_scale.view();
}

}  // namespace

DType output_dtype(const CaseSpec& spec) { return spec.dtype; }

Tensor uniform_tensor(DType dtype, std::span<const std::int64_t> shape, double lo, double hi,
                      std::uint64_t seed, int rank, std::uint64_t stream) {
  Tensor tensor(dtype, shape);
  Random random(seed, rank, static_cast<Stream>(stream));
  fill_uniform(tensor, random, lo, hi);
  return tensor;
}

RankInputs make_rank_inputs(const CaseSpec& spec, int rank) {
  check_spec(spec, rank);
  const std::int64_t k = spec.k_for_rank(rank);
  const DType x1_dtype = spec.mode == Mode::full_quant ? DType::i8 : spec.dtype;
  const DType x2_dtype = spec.mode == Mode::plain ? spec.dtype : DType::i8;
  const DType out_dtype = output_dtype(spec);

  RankInputs in;
  auto& options = in.args.options;
  options.comm_turn = spec.comm_turn;

  in.x1 = spec.batch > 0 ? Tensor(x1_dtype, {spec.batch, spec.m / spec.batch, k})
                         : Tensor(x1_dtype, {spec.m, k});
  Random x1_random(spec.seed, rank, Stream::x1);
  if (x1_dtype == DType::i8) {
    fill_integers(in.x1, x1_random, -128, 127);
  } else {
    fill_uniform(in.x1, x1_random, -1.0, 1.0);
  }
  in.args.x1 = in.x1.view();

  Tensor& x2 = spec.x2_transposed ? in.x2_storage : in.x2;
  x2 = spec.x2_transposed ? Tensor(x2_dtype, {spec.n, k}) : Tensor(x2_dtype, {k, spec.n});
  Random x2_random(spec.seed, rank, Stream::x2);
  if (x2_dtype == DType::i8) {
    fill_integers(x2, x2_random, -128, 127);
  } else {
    fill_uniform(x2, x2_random, -1.0, 1.0);
  }
  in.args.x2 = spec.x2_transposed ? x2.view().transposed() : x2.view();

  if (spec.mode == Mode::weight_quant) make_weight_quant_scales(spec, rank, k, in);
  if (spec.mode == Mode::full_quant) make_dequant_scale(spec, rank, in);

  if (spec.bias) {
    Random random(spec.seed, rank, Stream::bias);
    if (spec.mode == Mode::full_quant) {
      in.bias = Tensor(DType::i32, {spec.n});
      fill_integers(in.bias, random, -1000, 1000);
    } else {
      in.bias = Tensor(spec.dtype, {spec.n});
      fill_uniform(in.bias, random, -1.0, 1.0);
    }
    options.bias = in.bias.view();
  }
  if (spec.x3) {
    Random random(spec.seed, rank, Stream::x3);
    in.x3 = spec.batch > 0 ? Tensor(out_dtype, {spec.batch, spec.m / spec.batch, spec.n})
                           : Tensor(out_dtype, {spec.m, spec.n});
    fill_uniform(in.x3, random, -1.0, 1.0);
    options.x3 = in.x3.view();
  }
  return in;
}

}  // namespace tpfuse::testing
