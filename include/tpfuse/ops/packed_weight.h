// A weight prepared once for many calls. Inference multiplies the same x2
// on every call, and each call would otherwise pack (convert, dequantize,
// reorder) it again: a PackedWeight does that once, for the engine this CPU
// runs, and is accepted where x2 is by mm_all_reduce_base,
// mm_all_reduce_add_rms_norm(_), all_gather_base_mm and
// mm_reduce_scatter_base (for these two, x2_scale is the weight's
// dequant_scale).
//
//   tpfuse::PackedWeight w(tpfuse::DType::bf16, x2);        // once
//   out = tpfuse::mm_all_reduce_base(x1, w, hcom, options); // every call
//
// The results are the same bits as the same call with x2 itself. A
// PackedWeight refers to x2 (and to the scales it was made with), which must
// outlive it and not change: calls with few rows may read x2 where it lies.
// Packed copies are snapshots: to use a changed weight, make a new one.
#pragma once

#include <cstddef>
#include <memory>
#include <string_view>

#include "tpfuse/core/tensor.h"
#include "tpfuse/ops/family.h"
#include "tpfuse/ops/mm_all_reduce_base.h"

namespace tpfuse {

namespace gemm {
class PackedX2;
}

class PackedWeight {
 public:
  // Packs x2 for calls whose x1 has dtype x1_dtype (which, with x2's dtype,
  // gives the mode), with the weight's own arguments from `weight`:
  // antiquant_scale, antiquant_offset and antiquant_group_size (weight-only
  // quant) or dequant_scale (full quant); its other fields are not used.
  // Rules broken are an InvalidArgument naming the argument, as in a call.
  PackedWeight(DType x1_dtype, const TensorView& x2, const MmAllReduceOptions& weight = {});

  const TensorView& x2() const { return x2_; }
  DType x1_dtype() const { return x1_dtype_; }
  // The memory its packed copy holds (0 where the engine reads x2 as stored).
  std::size_t packed_bytes() const;

  // The call's weight arguments against the ones it was packed with: an
  // InvalidArgument naming the first that differs (another tensor, or none),
  // the dequant scale by the call's name for it.
  void check_call(const TensorView& x1, const MmAllReduceOptions& options,
                  const char* dequant_name = "dequant_scale") const;
  const gemm::PackedX2* packing() const { return packing_.get(); }

 private:
  DType x1_dtype_;
  TensorView x2_;
  MmAllReduceOptions weight_;
  std::shared_ptr<const gemm::PackedX2> packing_;
};

// mm_all_reduce_base and its _out form with a packed weight in place of x2.
Tensor mm_all_reduce_base(const TensorView& x1, const PackedWeight& x2, std::string_view hcom,
                          const MmAllReduceOptions& options = {});
void mm_all_reduce_base_out(const TensorView& x1, const PackedWeight& x2, std::string_view hcom,
                            const MmAllReduceOptions& options, const TensorView& out);

// mm_all_reduce_add_rms_norm and its in-place form with a packed weight.
AddRmsNormResult mm_all_reduce_add_rms_norm(const TensorView& x1, const PackedWeight& x2,
                                            const TensorView& residual, const TensorView& gamma,
                                            std::string_view hcom,
                                            const MmAllReduceAddRmsNormOptions& options = {});
Tensor mm_all_reduce_add_rms_norm_(const TensorView& x1, const PackedWeight& x2,
                                   const TensorView& residual, const TensorView& gamma,
                                   std::string_view hcom,
                                   const MmAllReduceAddRmsNormOptions& options = {});

// The sequence-parallel pair with a packed weight.
AllGatherMmResult all_gather_base_mm(const TensorView& x1, const PackedWeight& x2,
                                     std::string_view hcom, std::int64_t world_size,
                                     const AllGatherMmOptions& options = {});
Tensor mm_reduce_scatter_base(const TensorView& x1, const PackedWeight& x2, std::string_view hcom,
                              std::int64_t world_size, const MmReduceScatterOptions& options = {});

}  // namespace tpfuse
