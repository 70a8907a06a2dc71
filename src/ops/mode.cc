// Printable names of the operator's modes and scale layouts, for messages,
// logs and the CLI.
#include "tpfuse/ops/mode.h"

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

}  // namespace tpfuse
