// Typed TPFUSE_* settings. Each is declared next to the code that uses it,
// read from the environment once, and logged at info level when set:
//
//   const EnvSetting<std::int64_t> kTimeoutMs{"TPFUSE_TIMEOUT_MS", 300000, "deadline of every wait"};
//   auto ms = kTimeoutMs.get();
//
// A malformed value is an InvalidArgument naming the variable.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>

namespace tpfuse {

namespace detail {
std::optional<std::string> read_env(const char* name);
std::int64_t parse_env_int(const char* name, const std::string& text);
void log_setting(const char* name, const std::string& value, const char* help);
}  // namespace detail

template <class T>
class EnvSetting;

template <>
class EnvSetting<std::int64_t> {
 public:
  constexpr EnvSetting(const char* name, std::int64_t fallback, const char* help)
      : name_(name), fallback_(fallback), help_(help) {}
  std::int64_t get() const {
    std::call_once(once_, [this] {
      value_ = fallback_;
      if (auto text = detail::read_env(name_)) {
        value_ = detail::parse_env_int(name_, *text);
        detail::log_setting(name_, *text, help_);
      }
    });
    return value_;
  }
  const char* name() const { return name_; }

 private:
  const char* name_;
  std::int64_t fallback_;
  const char* help_;
  mutable std::once_flag once_;
  mutable std::int64_t value_ = 0;
};

template <>
class EnvSetting<std::string> {
 public:
  EnvSetting(const char* name, std::string fallback, const char* help)
      : name_(name), fallback_(std::move(fallback)), help_(help) {}
  const std::string& get() const {
    std::call_once(once_, [this] {
      value_ = fallback_;
      if (auto text = detail::read_env(name_)) {
        value_ = *text;
        detail::log_setting(name_, *text, help_);
      }
    });
    return value_;
  }
  const char* name() const { return name_; }

 private:
  const char* name_;
  std::string fallback_;
  const char* help_;
  mutable std::once_flag once_;
  mutable std::string value_;
};

}  // namespace tpfuse
