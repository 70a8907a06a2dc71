// Helpers for the family's tests (family_test.cc, family_errors_test.cc):
// bitwise comparisons across ranks, outputs marked with a pattern that a
// failed call must leave, and the checks of a call every rank must fail.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <regex>
#include <string>
#include <string_view>
#include <vector>

#include "rank_harness.h"
#include "tpfuse/core/tensor.h"

namespace tpfuse::test {

inline bool same_bytes(const TensorView& a, const TensorView& b) {
  const std::size_t bytes = static_cast<std::size_t>(a.numel()) * dtype_size(a.dtype());
  return a.dtype() == b.dtype() &&
         std::equal(a.shape().begin(), a.shape().end(), b.shape().begin(), b.shape().end()) &&
         std::memcmp(a.data(), b.data(), bytes) == 0;
}

// Every rank must hold the same bytes in `tensor`.
inline void expect_same_on_every_rank(const Tensor& tensor, comm::RankContext& ctx,
                                      std::string_view what) {
  const std::uint64_t hash = fnv1a(tensor.data(), tensor.nbytes());
  const auto hashes =
      ctx.comm->all_gather(std::string_view(reinterpret_cast<const char*>(&hash), sizeof(hash)));
  for (int r = 0; r < ctx.size; ++r) {
    expect_rank(hashes[static_cast<std::size_t>(r)] == hashes[0], what, ": rank ", r,
                " differs from rank 0");
  }
}

constexpr unsigned char kMark = 0xA5;

// A contiguous tensor whose every byte is kMark, for a failed call to leave so.
inline Tensor marked(DType dtype, const std::vector<std::int64_t>& shape) {
  Tensor tensor(dtype, shape);
  std::memset(tensor.data(), kMark, tensor.nbytes());
  return tensor;
}

inline bool still_marked(const Tensor& tensor) {
  const auto* bytes = static_cast<const unsigned char*>(tensor.data());
  return std::all_of(bytes, bytes + tensor.nbytes(), [](unsigned char b) { return b == kMark; });
}

// Whether `message` has `word` as a word of its own ("k" in "on k:", not in "rank").
inline bool names(const std::string& message, const std::string& word) {
  std::string escaped;
  for (const char c : word) {
    if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) escaped += '\\';
    escaped += c;
  }
  return std::regex_search(message,
                           std::regex("(^|[^A-Za-z0-9_])" + escaped + "($|[^A-Za-z0-9_])"));
}

// Makes `call` on this rank, which must fail well before the communicator's
// deadline (detected, not timed out): rank `bad` with an InvalidArgument that
// names `argument` and holds every fragment, the others with a
// DisagreementError naming rank `bad` and `argument`.
inline void expect_rejected(comm::RankContext& ctx, int bad, const std::string& argument,
                            const std::vector<std::string>& fragments,
                            const std::function<void()>& call) {
  const auto start = std::chrono::steady_clock::now();
  const auto in_time = [&] {
    const auto elapsed = std::chrono::steady_clock::now() - start;
    expect_rank(elapsed < ctx.comm->timeout() / 3, "rank ", ctx.rank, " failed after ",
                std::chrono::duration<double>(elapsed).count(), " s: not detected");
  };
  try {
    call();
  } catch (const InvalidArgument& e) {
    in_time();
    const std::string what = e.what();
    expect_rank(ctx.rank == bad, "rank ", ctx.rank, " got InvalidArgument: ", what);
    expect_rank(names(what, argument), "rank ", ctx.rank, ": the error does not name ", argument,
                ": ", what);
    for (const std::string& fragment : fragments) {
      expect_rank(what.find(fragment) != std::string::npos, "rank ", ctx.rank, ": no '", fragment,
                  "' in: ", what);
    }
    return;
  } catch (const DisagreementError& e) {
    in_time();
    const std::string what = e.what();
    expect_rank(ctx.rank != bad, "rank ", bad,
                " got a DisagreementError for its own error: ", what);
    expect_rank(what.find(cat("rank ", bad)) != std::string::npos && names(what, argument), "rank ",
                ctx.rank, ": the error does not name rank ", bad, " and ", argument, ": ", what);
    return;
  }
  expect_rank(false, "rank ", ctx.rank, " got no error (rank ", bad, " breaks ", argument, ")");
}

// Makes `call`, valid on each rank alone but with rank `odd` passing another
// `field` than the others: every rank must fail, in time, with a
// DisagreementError naming the field and rank `odd`.
inline void expect_disagreement(comm::RankContext& ctx, int odd, const std::string& field,
                                const std::function<void()>& call) {
  const auto start = std::chrono::steady_clock::now();
  try {
    call();
  } catch (const DisagreementError& e) {
    const auto elapsed = std::chrono::steady_clock::now() - start;
    expect_rank(elapsed < ctx.comm->timeout() / 3, "rank ", ctx.rank, " failed after ",
                std::chrono::duration<double>(elapsed).count(), " s: not detected");
    const std::string what = e.what();
    expect_rank(names(what, field) && what.find(cat("rank ", odd)) != std::string::npos, "rank ",
                ctx.rank, ": the error does not name ", field, " and rank ", odd, ": ", what);
    return;
  }
  expect_rank(false, "rank ", ctx.rank, " got no error (rank ", odd, " has another ", field, ")");
}

}  // namespace tpfuse::test
