// The operators the CLI runs and benchmarks, by the names its flags take.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tpfuse::cli {

enum class FusedOp { mm_all_reduce, all_gather_mm, mm_reduce_scatter, mm_all_reduce_add_rms_norm };

inline constexpr std::array<FusedOp, 4> kFusedOps = {FusedOp::mm_all_reduce, FusedOp::all_gather_mm,
                                                     FusedOp::mm_reduce_scatter, FusedOp::mm_all_reduce_add_rms_norm};

inline std::string_view op_name(FusedOp op) {
  switch (op) {
    case FusedOp::mm_all_reduce:
      return "mm_all_reduce";
    case FusedOp::all_gather_mm:
      return "all_gather_mm";
    case FusedOp::mm_reduce_scatter:
      return "mm_reduce_scatter";
    case FusedOp::mm_all_reduce_add_rms_norm:
      return "mm_all_reduce_add_rms_norm";
  }
  return "?";
}

// The library function each one is.
inline std::string_view op_function(FusedOp op) {
  switch (op) {
    case FusedOp::mm_all_reduce:
      return "mm_all_reduce_base";
    case FusedOp::all_gather_mm:
      return "all_gather_base_mm";
    case FusedOp::mm_reduce_scatter:
      return "mm_reduce_scatter_base";
    case FusedOp::mm_all_reduce_add_rms_norm:
      return "mm_all_reduce_add_rms_norm";
  }
  return "?";
}

inline std::optional<FusedOp> parse_op(std::string_view name) {
  for (FusedOp op : kFusedOps) {
    if (op_name(op) == name) return op;
  }
  return std::nullopt;
}

// For CLI::IsMember.
inline std::vector<std::string> op_names() {
  std::vector<std::string> names;
  for (FusedOp op : kFusedOps) names.emplace_back(op_name(op));
  return names;
}

}  // namespace tpfuse::cli
