// Element types and their names. Conversions between f16/bf16 and f32 live in
// half.h; this header only says what a type is.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace tpfuse {

enum class DType : std::uint8_t { f16, bf16, f32, i8, i32, i64 };

// Bytes per element.
constexpr std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::f32:
    case DType::i32:
      return 4;
    case DType::i8:
      return 1;
    case DType::i64:
      return 8;
  }
  return 0;
}

// "f16", "bf16", "f32", "i8", "i32", "i64".
constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::f32:
      return "f32";
    case DType::i8:
      return "i8";
    case DType::i32:
      return "i32";
    case DType::i64:
      return "i64";
  }
  return "?";
}

// Parses a name accepted by dtype_name() (and the long forms "float16",
// "bfloat16", "float32", "int8", "int32", "int64"); throws InvalidArgument.
DType parse_dtype(std::string_view name);

constexpr bool is_floating(DType t) {
  return t == DType::f16 || t == DType::bf16 || t == DType::f32;
}

}  // namespace tpfuse
