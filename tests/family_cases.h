// The four operators on small deterministic inputs, for the tests that run
// them under faults (faults_family_test.cc), under threads (pipeline_test.cc)
// and over another transport (mpi/mpi_transport_test.cc). Any rank rebuilds any
// rank's inputs from (case, rank); a call's outputs come back as tensors.
// Also the exact relations between them that the contract states
// (docs/SEMANTICS-FAMILY.md), for checks that need no golden model.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "ops/add_rms_norm.h"
#include "tpfuse/core/half.h"
#include "tpfuse/core/tensor.h"
#include "tpfuse/ops/family.h"
#include "tpfuse/ops/mm_all_reduce_base.h"

namespace tpfuse::test {

enum class FamilyOp {
  mm_all_reduce_base,
  all_gather_base_mm,
  mm_reduce_scatter_base,
  add_rms_norm
};

inline const char* family_op_name(FamilyOp op) {
  switch (op) {
    case FamilyOp::all_gather_base_mm:
      return "all_gather_base_mm";
    case FamilyOp::mm_reduce_scatter_base:
      return "mm_reduce_scatter_base";
    case FamilyOp::add_rms_norm:
      return "mm_all_reduce_add_rms_norm";
    case FamilyOp::mm_all_reduce_base:
      break;
  }
  return "mm_all_reduce_base";
}

struct FamilyCase {
  FamilyOp op = FamilyOp::mm_all_reduce_base;
  DType dtype = DType::bf16;  // f16 or bf16: every input and output
  std::int64_t m = 16;        // rows of x1 on each rank (all-gather: this rank's block)
  std::int64_t k = 32;        // per rank
  std::int64_t n = 16;        // per rank for the all-gather (its column shard)
  std::int64_t batch = 1;     // add-RMSNorm: residual [batch, m / batch, n]
  bool bias = false;
  std::int64_t comm_turn = 0;
  std::uint64_t seed = 1;
};

// Floats uniform in [-1, 1] rounded to `dtype` (f16 or bf16).
inline Tensor random_tensor(DType dtype, std::initializer_list<std::int64_t> shape,
                            std::uint64_t seed) {
  Tensor t(dtype, shape);
  std::mt19937_64 random(seed);
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  auto* bits = t.data_as<std::uint16_t>();
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    const float v = value(random);
    bits[i] = dtype == DType::f16 ? f32_to_f16(v).bits : f32_to_bf16(v).bits;
  }
  return t;
}

struct FamilyInputs {
  Tensor x1, x2, bias, residual, gamma;
};

// Rank `rank`'s arguments. The residual and gamma are the same on every rank
// (as a model's are), the rest differ.
inline FamilyInputs family_inputs(const FamilyCase& c, int rank) {
  const std::uint64_t seed = c.seed * 1000 + static_cast<std::uint64_t>(rank) * 10;
  FamilyInputs in;
  in.x1 = random_tensor(c.dtype, {c.m, c.k}, seed + 1);
  in.x2 = random_tensor(c.dtype, {c.k, c.n}, seed + 2);
  if (c.bias) in.bias = random_tensor(c.dtype, {c.n}, seed + 3);
  if (c.op == FamilyOp::add_rms_norm) {
    in.residual = random_tensor(c.dtype, {c.batch, c.m / c.batch, c.n}, c.seed * 1000 + 7);
    in.gamma = random_tensor(c.dtype, {c.n}, c.seed * 1000 + 8);
  }
  return in;
}

// Runs the case's operator on `hcom` (collective): mm_all_reduce_base
// returns {out}, the all-gather {output, gather_out}, the reduce-scatter
// {out} and add-RMSNorm {y, norm_out}.
inline std::vector<Tensor> run_family_case(const FamilyCase& c, const FamilyInputs& in,
                                           std::string_view hcom, int world_size) {
  std::optional<TensorView> bias;
  if (c.bias) bias = in.bias.view();
  switch (c.op) {
    case FamilyOp::all_gather_base_mm: {
      AllGatherMmOptions options;
      options.bias = bias;
      options.comm_turn = c.comm_turn;
      AllGatherMmResult result =
          all_gather_base_mm(in.x1.view(), in.x2.view(), hcom, world_size, options);
      std::vector<Tensor> out;
      out.push_back(std::move(result.output));
      out.push_back(std::move(result.gather_out));
      return out;
    }
    case FamilyOp::mm_reduce_scatter_base: {
      MmReduceScatterOptions options;
      options.bias = bias;
      options.comm_turn = c.comm_turn;
      std::vector<Tensor> out;
      out.push_back(mm_reduce_scatter_base(in.x1.view(), in.x2.view(), hcom, world_size, options));
      return out;
    }
    case FamilyOp::add_rms_norm: {
      MmAllReduceAddRmsNormOptions options;
      options.bias = bias;
      options.comm_turn = c.comm_turn;
      AddRmsNormResult result = mm_all_reduce_add_rms_norm(
          in.x1.view(), in.x2.view(), in.residual.view(), in.gamma.view(), hcom, options);
      std::vector<Tensor> out;
      out.push_back(std::move(result.y));
      out.push_back(std::move(result.norm_out));
      return out;
    }
    case FamilyOp::mm_all_reduce_base:
      break;
  }
  MmAllReduceOptions options;
  options.bias = bias;
  options.comm_turn = c.comm_turn;
  std::vector<Tensor> out;
  out.push_back(mm_all_reduce_base(in.x1.view(), in.x2.view(), hcom, options));
  return out;
}

inline std::vector<std::byte> bytes_of(const std::vector<Tensor>& tensors) {
  std::vector<std::byte> bytes;
  for (const Tensor& t : tensors) {
    const auto* data = static_cast<const std::byte*>(t.data());
    bytes.insert(bytes.end(), data, data + t.nbytes());
  }
  return bytes;
}

inline std::vector<std::byte> bytes_of(const Tensor& t) {
  const auto* data = static_cast<const std::byte*>(t.data());
  return {data, data + t.nbytes()};
}

// ---- what the contract pins exactly, from mm_all_reduce_base's output ----

// Rank `rank`'s rows of the reduce-scatter: rows [rank * m / p, (rank + 1) * m / p)
// of mm_all_reduce_base's output `reduced` for the same inputs.
inline std::vector<std::byte> reduce_scatter_rows(const Tensor& reduced, int rank, int ranks) {
  const std::size_t bytes = reduced.nbytes() / static_cast<std::size_t>(ranks);
  const auto* data = static_cast<const std::byte*>(reduced.data());
  return {data + bytes * static_cast<std::size_t>(rank),
          data + bytes * static_cast<std::size_t>(rank + 1)};
}

// add-RMSNorm's {y, norm_out} bytes from mm_all_reduce_base's output `reduced`
// for the same inputs, by the step the operator runs on each tile.
inline std::vector<std::byte> add_rms_norm_of(const FamilyCase& c, const FamilyInputs& in,
                                              const Tensor& reduced) {
  Tensor y(c.dtype, {c.m, c.n}), norm(c.dtype, {c.m, c.n});
  const AddRmsNormRows step{c.dtype, c.n, 1e-6f, in.gamma.data()};
  add_rms_norm_rows(step, c.m, reduced.data(), in.residual.data(), y.data(), norm.data());
  std::vector<std::byte> bytes = bytes_of(y);
  const std::vector<std::byte> second = bytes_of(norm);
  bytes.insert(bytes.end(), second.begin(), second.end());
  return bytes;
}

// The all-gather's gather_out: every rank's x1, in rank order.
inline std::vector<std::byte> gathered_x1(const FamilyCase& c, int ranks) {
  std::vector<std::byte> bytes;
  for (int r = 0; r < ranks; ++r) {
    const std::vector<std::byte> block = bytes_of(family_inputs(c, r).x1);
    bytes.insert(bytes.end(), block.begin(), block.end());
  }
  return bytes;
}

}  // namespace tpfuse::test
