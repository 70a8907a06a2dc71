#include "comm/poll_pacer.h"

#include <algorithm>

namespace tpfuse::comm {

std::chrono::microseconds PollPacer::next(bool progressed) {
  using std::chrono::microseconds;
  constexpr microseconds kSpin{200}, kShortest{50}, kLongest{400};
  const auto now = std::chrono::steady_clock::now();
  if (progressed) since_ = now;
  const auto waited = std::chrono::duration_cast<microseconds>(now - since_);
  if (waited < kSpin) return microseconds{0};
  return std::clamp(waited / 4, kShortest, kLongest);
}

}  // namespace tpfuse::comm
