// mm_all_reduce_base: its rules, GEMM and outputs; the path every call takes
// is ops/call.h, its schedule (GEMM then all-reduce, tile by tile) the
// pipeline's.
#include "tpfuse/ops/mm_all_reduce_base.h"

#include "ops/call.h"
#include "tpfuse/ops/explain.h"
#include "tpfuse/ops/gemm_operands.h"
#include "tpfuse/ops/packed_weight.h"
#include "tpfuse/ops/validate.h"

namespace tpfuse {

namespace {

std::vector<std::int64_t> output_shape(const CallShape& s) {
  if (s.batch > 0) return {s.batch, s.seq, s.n};
  return {s.m, s.n};
}

class MmAllReduceCall final : public OperatorCall {
 public:
  MmAllReduceCall(const TensorView& x1, const TensorView& x2, const PackedWeight* packed,
                  const MmAllReduceOptions& options, const TensorView* out)
      : x1_(x1), x2_(x2), packed_(packed), options_(options), out_(out) {}

  const char* name() const override { return "mm_all_reduce_base"; }

  CallShape validate(int group_size) const override {
    (void)group_size;
    // A packed weight names the x1 dtype and scales it was made for first:
    // clearer than what they break in the call's rules.
    if (packed_ != nullptr) packed_->check_call(x1_, options_);
    CallShape shape = validate_call(x1_, x2_, options_);
    if (out_ != nullptr) validate_out(shape, *out_, x1_, x2_, options_);
    return shape;
  }

  void make_outputs(const CallShape& shape, const comm::Communicator& comm) override {
    (void)comm;
    if (out_ != nullptr) return;
    made_ = Tensor(shape.out_dtype, output_shape(shape));
    out_ = &made_.view();
  }

  gemm::GemmOperands operands(const CallShape& shape) const override {
    gemm::GemmOperands operands = make_gemm_operands(shape, x1_, x2_, options_);
    operands.packed = packed_ != nullptr ? packed_->packing() : nullptr;
    return operands;
  }

  std::optional<pipeline::TileJob> all_reduce_job(const CallShape& shape,
                                                  const gemm::PreparedGemm& gemm,
                                                  comm::Communicator& comm,
                                                  const RunSetup& setup) override {
    return all_reduce_job_into(out_->data(), shape, gemm, comm, setup);
  }

  Tensor result() { return std::move(made_); }

 private:
  const TensorView& x1_;
  const TensorView& x2_;
  const PackedWeight* packed_;
  const MmAllReduceOptions& options_;
  const TensorView* out_;
  Tensor made_;
};

Tensor run_call(const TensorView& x1, const TensorView& x2, const PackedWeight* packed,
                std::string_view hcom, const MmAllReduceOptions& options, const TensorView* out,
                const char* operation) {
  MmAllReduceCall call(x1, x2, packed, options, out);
  run_operator_call(call, hcom, operation);
  return call.result();
}

}  // namespace

CallExplanation explain_mm_all_reduce_base(const TensorView& x1, const TensorView& x2,
                                           comm::Communicator& comm,
                                           const MmAllReduceOptions& options) {
  return explain_operator_call(MmAllReduceCall(x1, x2, nullptr, options, nullptr), comm);
}

Tensor mm_all_reduce_base(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                          const MmAllReduceOptions& options) {
  return run_call(x1, x2, nullptr, hcom, options, nullptr, "mm_all_reduce_base");
}

void mm_all_reduce_base_out(const TensorView& x1, const TensorView& x2, std::string_view hcom,
                            const MmAllReduceOptions& options, const TensorView& out) {
  run_call(x1, x2, nullptr, hcom, options, &out, "mm_all_reduce_base_out");
}

Tensor mm_all_reduce_base(const TensorView& x1, const PackedWeight& x2, std::string_view hcom,
                          const MmAllReduceOptions& options) {
  return run_call(x1, x2.x2(), &x2, hcom, options, nullptr, "mm_all_reduce_base");
}

void mm_all_reduce_base_out(const TensorView& x1, const PackedWeight& x2, std::string_view hcom,
                            const MmAllReduceOptions& options, const TensorView& out) {
  run_call(x1, x2.x2(), &x2, hcom, options, &out, "mm_all_reduce_base_out");
}

}  // namespace tpfuse
