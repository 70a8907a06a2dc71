// Printable names of the modes and scale layouts, for messages, logs and
// the CLI; the packed scale's unpacking.
#include "tpfuse/gemm/problem.h"

#include <bit>

namespace tpfuse {

std::string_view mode_name(Mode mode) {
  switch (mode) {
    case Mode::plain:
      return "plain";
    case Mode::weight_quant:
      return "weight_quant";
    case Mode::full_quant:
      return "full_quant";
  }
  return "?";
}

std::string_view scale_kind_name(ScaleKind kind) {
  switch (kind) {
    case ScaleKind::none:
      return "none";
    case ScaleKind::per_tensor:
      return "per_tensor";
    case ScaleKind::per_channel:
      return "per_channel";
    case ScaleKind::per_group:
      return "per_group";
  }
  return "?";
}

float unpack_quant_scale(std::int64_t packed) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(static_cast<std::uint64_t>(packed)));
}

}  // namespace tpfuse
