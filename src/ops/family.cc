// The family's operators (tpfuse/ops/family.h): their rules, GEMMs, outputs
// and schedules, on the path every call takes (ops/call.h). all_gather_base_mm
// gathers then multiplies, mm_reduce_scatter_base multiplies then
// reduce-scatters, and mm_all_reduce_add_rms_norm is mm_all_reduce_base's
// schedule whose tiles, once reduced, are added to the residual and
// normalised while later tiles are computed.
#include "tpfuse/ops/family.h"

#include <vector>

#include "ops/add_rms_norm.h"
#include "ops/call.h"
#include "ops/test_hooks.h"
#include "tpfuse/ops/gemm_operands.h"
#include "tpfuse/ops/packed_weight.h"
#include "tpfuse/ops/validate.h"

namespace tpfuse {

namespace {

// The GEMM of all-gather and reduce-scatter: x1 (or the gathered rows) by
// x2 (or its packing), the bias, and on the quant path x2_scale per column
// and x1_scale per row (gathered along with x1 when x1 is).
gemm::GemmOperands sequence_parallel_operands(const CallShape& shape, const TensorView& x1,
                                              const TensorView& x2, const PackedWeight* packed,
                                              const SequenceParallelOptions& options,
                                              const float* row_scale) {
  CallShape gemm_shape = shape;
  gemm_shape.m = gemm_rows(shape);
  gemm::GemmOperands operands = make_gemm_operands(gemm_shape, x1, x2, gemm_options(options));
  operands.packed = packed != nullptr ? packed->packing() : nullptr;
  if (row_scale != nullptr) {
    const std::int64_t dims[] = {gemm_shape.m};
    operands.row_scale = TensorView(const_cast<float*>(row_scale), DType::f32, dims);
  }
  return operands;
}

class AllGatherMmCall final : public OperatorCall {
 public:
  AllGatherMmCall(const TensorView& x1, const TensorView& x2, const PackedWeight* packed,
                  std::int64_t world_size, const AllGatherMmOptions& options,
                  const TensorView* output, const std::optional<TensorView>* gather_out)
      : x1_(x1),
        x2_(x2),
        packed_(packed),
        world_size_(world_size),
        options_(options),
        output_(output),
        gather_out_(gather_out) {}

  const char* name() const override { return "all_gather_base_mm"; }

  CallShape validate(int group_size) const override {
    if (packed_ != nullptr) packed_->check_call(x1_, gemm_options(options_), "x2_scale");
    CallShape shape = validate_all_gather_mm(x1_, x2_, world_size_, group_size, options_);
    if (output_ != nullptr) {
      validate_all_gather_mm_out(shape, *output_, *gather_out_, x1_, x2_, options_);
    }
    return shape;
  }

  void make_outputs(const CallShape& shape, const comm::Communicator& comm) override {
    const std::int64_t rows = gemm_rows(shape);
    CallScratch& scratch = comm.attachment<CallScratch>();
    if (output_ == nullptr) {
      result_.output = Tensor(shape.out_dtype, {rows, shape.n});
      output_ = &result_.output.view();
      if (shape.gather_output) {
        result_.gather_out = Tensor(shape.in_dtype, {rows, shape.k});
      } else {
        result_.gather_out = Tensor(shape.in_dtype, {0});
      }
    }
    // The gathered rows: into gather_out when the caller keeps it.
    if (shape.gather_output) {
      gathered_ = gather_out_ != nullptr ? **gather_out_ : result_.gather_out.view();
    } else {
      const std::int64_t dims[] = {rows, shape.k};
      gathered_ = TensorView(
          scratch.get(0, static_cast<std::size_t>(rows * shape.k) * dtype_size(shape.in_dtype)),
          shape.in_dtype, dims);
    }
    if (shape.has_row_scale) {
      gathered_scale_ = static_cast<float*>(scratch.get(1, static_cast<std::size_t>(rows) * 4));
    }
  }

  gemm::GemmOperands operands(const CallShape& shape) const override {
    return sequence_parallel_operands(shape, gathered_, x2_, packed_, options_,
                                      shape.has_row_scale ? gathered_scale_ : nullptr);
  }

  std::unique_ptr<pipeline::TileStages> stages(const CallShape& shape,
                                               const gemm::PreparedGemm& gemm,
                                               comm::Communicator& comm, const RunSetup& setup,
                                               const pipeline::TilePlan& plan) override {
    (void)setup, (void)plan;
    pipeline::GatherJob job;
    job.gemm = &gemm;
    job.comm = &comm;
    job.x1 = x1_.data();
    job.rows = shape.m;
    job.k = shape.k;
    job.x1_dtype = shape.in_dtype;
    job.gathered = gathered_.data();
    if (shape.has_row_scale) {
      job.x1_scale = options_.x1_scale->data_as<const float>();
      job.gathered_scale = gathered_scale_;
    }
    job.n = shape.n;
    job.out_dtype = shape.out_dtype;
    job.out = output_->data();
    job.after_tile_computed = test_hooks::after_tile_computed;
    return pipeline::all_gather_gemm_stages(job);
  }

  AllGatherMmResult result() { return std::move(result_); }

 private:
  const TensorView& x1_;
  const TensorView& x2_;
  const PackedWeight* packed_;
  std::int64_t world_size_;
  const AllGatherMmOptions& options_;
  const TensorView* output_;
  const std::optional<TensorView>* gather_out_;
  AllGatherMmResult result_;
  TensorView gathered_;
  float* gathered_scale_ = nullptr;
};

class MmReduceScatterCall final : public OperatorCall {
 public:
  MmReduceScatterCall(const TensorView& x1, const TensorView& x2, const PackedWeight* packed,
                      std::int64_t world_size, const MmReduceScatterOptions& options,
                      const TensorView* output)
      : x1_(x1),
        x2_(x2),
        packed_(packed),
        world_size_(world_size),
        options_(options),
        output_(output) {}

  const char* name() const override { return "mm_reduce_scatter_base"; }

  CallShape validate(int group_size) const override {
    if (packed_ != nullptr) packed_->check_call(x1_, gemm_options(options_), "x2_scale");
    CallShape shape = validate_mm_reduce_scatter(x1_, x2_, world_size_, group_size, options_);
    if (output_ != nullptr) validate_mm_reduce_scatter_out(shape, *output_, x1_, x2_, options_);
    return shape;
  }

  void make_outputs(const CallShape& shape, const comm::Communicator& comm) override {
    if (output_ == nullptr) {
      made_ = Tensor(shape.out_dtype, {shape.m / shape.world_size, shape.n});
      output_ = &made_.view();
    }
    partials_ = comm.attachment<CallScratch>().get(
        0, static_cast<std::size_t>(shape.m * shape.n) * dtype_size(shape.out_dtype));
  }

  gemm::GemmOperands operands(const CallShape& shape) const override {
    return sequence_parallel_operands(
        shape, x1_, x2_, packed_, options_,
        options_.x1_scale ? options_.x1_scale->data_as<const float>() : nullptr);
  }

  std::unique_ptr<pipeline::TileStages> stages(const CallShape& shape,
                                               const gemm::PreparedGemm& gemm,
                                               comm::Communicator& comm, const RunSetup& setup,
                                               const pipeline::TilePlan& plan) override {
    pipeline::ReduceScatterJob job;
    job.gemm = &gemm;
    job.comm = &comm;
    job.m = shape.m;
    job.n = shape.n;
    job.dtype = shape.out_dtype;
    job.partials = partials_;
    job.out = output_->data();
    job.progress = setup.progress;
    job.after_tile_computed = test_hooks::after_tile_computed;
    return pipeline::gemm_reduce_scatter_stages(job,
                                                plan.tile_rows.size() == 1 ? 0 : plan.poll_rows);
  }

  Tensor result() { return std::move(made_); }

 private:
  const TensorView& x1_;
  const TensorView& x2_;
  const PackedWeight* packed_;
  std::int64_t world_size_;
  const MmReduceScatterOptions& options_;
  const TensorView* output_;
  Tensor made_;
  void* partials_ = nullptr;  // this rank's GEMM rows, reduce-scattered tile by tile
};

class AddRmsNormCall final : public OperatorCall {
 public:
  AddRmsNormCall(const TensorView& x1, const TensorView& x2, const PackedWeight* packed,
                 const TensorView& residual, const TensorView& gamma,
                 const MmAllReduceAddRmsNormOptions& options, const TensorView* y,
                 const TensorView* norm_out)
      : x1_(x1),
        x2_(x2),
        packed_(packed),
        residual_(residual),
        gamma_(gamma),
        options_(options),
        gemm_options_(gemm_options(options)),
        y_(y),
        norm_out_(norm_out) {}

  const char* name() const override { return "mm_all_reduce_add_rms_norm"; }

  CallShape validate(int group_size) const override {
    (void)group_size;
    if (packed_ != nullptr) packed_->check_call(x1_, gemm_options_);
    CallShape shape = validate_add_rms_norm(x1_, x2_, residual_, gamma_, options_);
    if (norm_out_ != nullptr) {
      validate_add_rms_norm_out(shape, *y_, *norm_out_, x1_, x2_, residual_, gamma_, options_);
    } else if (y_ != nullptr) {
      validate_add_rms_norm_in_place(x1_, x2_, residual_, gamma_, options_);
    }
    return shape;
  }

  void make_outputs(const CallShape& shape, const comm::Communicator& comm) override {
    (void)comm;
    const std::initializer_list<std::int64_t> dims = {shape.batch, shape.seq, shape.n};
    if (y_ == nullptr) {
      result_.y = Tensor(shape.out_dtype, dims);
      y_ = &result_.y.view();
    }
    if (norm_out_ == nullptr) {
      result_.norm_out = Tensor(shape.out_dtype, dims);
      norm_out_ = &result_.norm_out.view();
    }
  }

  gemm::GemmOperands operands(const CallShape& shape) const override {
    gemm::GemmOperands operands = make_gemm_operands(shape, x1_, x2_, gemm_options_);
    operands.packed = packed_ != nullptr ? packed_->packing() : nullptr;
    return operands;
  }

  // The all-reduce lands in norm_out, which the step then reads, row by row,
  // before it writes the row's norm there.
  std::optional<pipeline::TileJob> all_reduce_job(const CallShape& shape,
                                                  const gemm::PreparedGemm& gemm,
                                                  comm::Communicator& comm,
                                                  const RunSetup& setup) override {
    pipeline::TileJob job = all_reduce_job_into(norm_out_->data(), shape, gemm, comm, setup);
    const AddRmsNormRows step{shape.out_dtype, shape.n, shape.epsilon, gamma_.data()};
    const std::size_t row_bytes = static_cast<std::size_t>(shape.n) * dtype_size(shape.out_dtype);
    auto* norm = static_cast<std::byte*>(norm_out_->data());
    const auto* residual = static_cast<const std::byte*>(residual_.data());
    auto* y = static_cast<std::byte*>(y_->data());
    job.finish_rows = [=](std::int64_t m0, std::int64_t m1) {
      const auto at = static_cast<std::size_t>(m0) * row_bytes;
      add_rms_norm_rows(step, m1 - m0, norm + at, residual + at, y + at, norm + at);
    };
    return job;
  }

  AddRmsNormResult result() { return std::move(result_); }

 private:
  const TensorView& x1_;
  const TensorView& x2_;
  const PackedWeight* packed_;
  const TensorView& residual_;
  const TensorView& gamma_;
  const MmAllReduceAddRmsNormOptions& options_;
  MmAllReduceOptions gemm_options_;
  const TensorView* y_;
  const TensorView* norm_out_;
  AddRmsNormResult result_;
};

}  // namespace

AllGatherMmResult all_gather_base_mm(const TensorView& x1, const TensorView& x2,
                                     std::string_view hcom, std::int64_t world_size,
                                     const AllGatherMmOptions& options) {
  AllGatherMmCall call(x1, x2, nullptr, world_size, options, nullptr, nullptr);
  run_operator_call(call, hcom, "all_gather_base_mm");
  return call.result();
}

void all_gather_base_mm_out(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                            std::int64_t world_size, const AllGatherMmOptions& options,
                            const TensorView& output, const std::optional<TensorView>& gather_out) {
  AllGatherMmCall call(x1, x2, nullptr, world_size, options, &output, &gather_out);
  run_operator_call(call, hcom, "all_gather_base_mm_out");
}

Tensor mm_reduce_scatter_base(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                              std::int64_t world_size, const MmReduceScatterOptions& options) {
  MmReduceScatterCall call(x1, x2, nullptr, world_size, options, nullptr);
  run_operator_call(call, hcom, "mm_reduce_scatter_base");
  return call.result();
}

void mm_reduce_scatter_base_out(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                                std::int64_t world_size, const MmReduceScatterOptions& options,
                                const TensorView& output) {
  MmReduceScatterCall call(x1, x2, nullptr, world_size, options, &output);
  run_operator_call(call, hcom, "mm_reduce_scatter_base_out");
}

AddRmsNormResult mm_all_reduce_add_rms_norm(const TensorView& x1, const TensorView& x2,
                                            const TensorView& residual, const TensorView& gamma,
                                            std::string_view hcom,
                                            const MmAllReduceAddRmsNormOptions& options) {
  AddRmsNormCall call(x1, x2, nullptr, residual, gamma, options, nullptr, nullptr);
  run_operator_call(call, hcom, "mm_all_reduce_add_rms_norm");
  return call.result();
}

Tensor mm_all_reduce_add_rms_norm_(const TensorView& x1, const TensorView& x2,
                                   const TensorView& residual, const TensorView& gamma,
                                   std::string_view hcom,
                                   const MmAllReduceAddRmsNormOptions& options) {
  AddRmsNormCall call(x1, x2, nullptr, residual, gamma, options, &residual, nullptr);
  run_operator_call(call, hcom, "mm_all_reduce_add_rms_norm_");
  return std::move(call.result().norm_out);
}

void mm_all_reduce_add_rms_norm_out(const TensorView& x1, const TensorView& x2,
                                    const TensorView& residual, const TensorView& gamma,
                                    std::string_view hcom,
                                    const MmAllReduceAddRmsNormOptions& options,
                                    const TensorView& y, const TensorView& norm_out) {
  AddRmsNormCall call(x1, x2, nullptr, residual, gamma, options, &y, &norm_out);
  run_operator_call(call, hcom, "mm_all_reduce_add_rms_norm_out");
}

AddRmsNormResult mm_all_reduce_add_rms_norm(const TensorView& x1, const PackedWeight& x2,
                                            const TensorView& residual, const TensorView& gamma,
                                            std::string_view hcom,
                                            const MmAllReduceAddRmsNormOptions& options) {
  AddRmsNormCall call(x1, x2.x2(), &x2, residual, gamma, options, nullptr, nullptr);
  run_operator_call(call, hcom, "mm_all_reduce_add_rms_norm");
  return call.result();
}

Tensor mm_all_reduce_add_rms_norm_(const TensorView& x1, const PackedWeight& x2,
                                   const TensorView& residual, const TensorView& gamma,
                                   std::string_view hcom,
                                   const MmAllReduceAddRmsNormOptions& options) {
  AddRmsNormCall call(x1, x2.x2(), &x2, residual, gamma, options, &residual, nullptr);
  run_operator_call(call, hcom, "mm_all_reduce_add_rms_norm_");
  return std::move(call.result().norm_out);
}

AllGatherMmResult all_gather_base_mm(const TensorView& x1, const PackedWeight& x2,
                                     std::string_view hcom, std::int64_t world_size,
                                     const AllGatherMmOptions& options) {
  AllGatherMmCall call(x1, x2.x2(), &x2, world_size, options, nullptr, nullptr);
  run_operator_call(call, hcom, "all_gather_base_mm");
  return call.result();
}

Tensor mm_reduce_scatter_base(const TensorView& x1, const PackedWeight& x2, std::string_view hcom,
                              std::int64_t world_size, const MmReduceScatterOptions& options) {
  MmReduceScatterCall call(x1, x2.x2(), &x2, world_size, options, nullptr);
  run_operator_call(call, hcom, "mm_reduce_scatter_base");
  return call.result();
}

}  // namespace tpfuse
