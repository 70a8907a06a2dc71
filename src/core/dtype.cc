#include "tpfuse/core/dtype.h"

#include <string>

#include "tpfuse/core/error.h"

namespace tpfuse {

DType parse_dtype(std::string_view name) {
  struct Alias {
    std::string_view name;
    DType dtype;
  };
  static constexpr Alias kAliases[] = {
      {"f16", DType::f16},     {"float16", DType::f16}, {"bf16", DType::bf16},
      {"bfloat16", DType::bf16}, {"f32", DType::f32},   {"float32", DType::f32},
      {"i8", DType::i8},       {"int8", DType::i8},     {"i32", DType::i32},
      {"int32", DType::i32},   {"i64", DType::i64},     {"int64", DType::i64},
  };
  for (const auto& alias : kAliases) {
    if (alias.name == name) return alias.dtype;
  }
  throw InvalidArgument(cat("dtype: expected one of f16, bf16, f32, i8, i32, i64, got \"",
                            std::string(name), "\""));
}

}  // namespace tpfuse
