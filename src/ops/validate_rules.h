// The rules every operator's validation shares (ops/validate.cc defines
// them): a tensor's own sanity, layouts, scales, bias, and outputs disjoint
// from the inputs. Each failure throws InvalidArgument naming the argument,
// what was expected and what was given.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <utility>

#include "tpfuse/core/error.h"
#include "tpfuse/core/tensor.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/ops/mode.h"

namespace tpfuse::rules {

template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  throw InvalidArgument(cat(std::forward<Parts>(parts)...));
}

std::string shape_text(std::span<const std::int64_t> dims);
// dtype_name, or "unknown dtype code N" for a value outside the enum (which
// dtype_name prints as "?").
std::string dtype_text(DType dtype);
// Shape and dtype (and strides), printable for any view check_view() rejects.
std::string raw_text(const TensorView& view, bool with_strides = true);
bool checked_mul(std::int64_t a, std::int64_t b, std::int64_t& product);
bool has_dims(const TensorView& view, std::span<const std::int64_t> dims);

// A known dtype, a pointer, dims and strides >= 0, sizes that fit int64.
void check_view(const char* name, const TensorView& view);
void check_not_empty(const char* name, const TensorView& view);
void check_contiguous(const char* name, const TensorView& view);
// Whether x2 is a transposed view of a row-major [n, k].
bool check_x2(const TensorView& x2);
// [1] per tensor, [n] or [1, n] per channel; none for any other shape.
ScaleKind channel_scale_kind(const TensorView& scale, std::int64_t n);
// [n], x1's dtype (i32 in full quant), contiguous.
void check_bias(const TensorView& bias, const CallShape& shape);

// validate_call's rules, with or without the output's size (m * n elements
// and bytes that fit int64): an operator whose outputs have the shape of an
// argument it checks (add-RMSNorm's residual) leaves that to the argument,
// which is then the one at fault.
enum class OutputSize { checked, by_an_argument };
CallShape check_gemm_call(const TensorView& x1, const TensorView& x2,
                          const MmAllReduceOptions& options, OutputSize output_size);

struct NamedView {
  const char* name;
  const TensorView* view;  // null: absent, skipped
};
// `out` (named `name`) shares no byte with any of `inputs`.
void check_disjoint(const char* name, const TensorView& out, std::span<const NamedView> inputs);

}  // namespace tpfuse::rules
