#include "ops/agreement.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "tpfuse/core/error.h"

namespace tpfuse {

namespace {

// The fields every rank must agree on, in the order they are compared.
struct AgreedField {
  const char* name;
  std::int64_t (*get)(const CallShape&);
};

constexpr AgreedField kAgreedFields[] = {
    {"mode", [](const CallShape& s) { return static_cast<std::int64_t>(s.mode); }},
    {"x1 dtype", [](const CallShape& s) { return static_cast<std::int64_t>(s.in_dtype); }},
    {"output dtype", [](const CallShape& s) { return static_cast<std::int64_t>(s.out_dtype); }},
    {"m", [](const CallShape& s) { return s.m; }},
    {"b (x1 dim 0 of a 3-D x1)", [](const CallShape& s) { return s.batch; }},
    {"s (x1 dim 1 of a 3-D x1)", [](const CallShape& s) { return s.seq; }},
    {"n", [](const CallShape& s) { return s.n; }},
    {"comm_turn", [](const CallShape& s) { return s.comm_turn; }},
};
constexpr std::size_t kFieldCount = std::size(kAgreedFields);

// Wire form: a flag (1 = validated), the fields, the rank's facts, then the
// error text if any.
constexpr std::size_t kFactsAt = kFieldCount + 1;
using Words = std::array<std::int64_t, kFactsAt + 3>;

std::string encode(const std::optional<CallShape>& shape, const std::string& error,
                   const RankFacts& mine, std::size_t max_bytes) {
  Words words{};
  words[0] = shape ? 1 : 0;
  if (shape) {
    for (std::size_t f = 0; f < kFieldCount; ++f) words[f + 1] = kAgreedFields[f].get(*shape);
  }
  words[kFactsAt] = mine.k;
  words[kFactsAt + 1] = mine.threads;
  words[kFactsAt + 2] = mine.reduce_has_own_core ? 1 : 0;
  std::string blob(reinterpret_cast<const char*>(words.data()), sizeof(words));
  if (!shape) blob += error.substr(0, max_bytes - blob.size());
  return blob;
}

std::string field_value(std::size_t field, std::int64_t value) {
  const std::string name = kAgreedFields[field].name;
  if (name == "mode") return std::string(mode_name(static_cast<Mode>(value)));
  if (name.find("dtype") != std::string::npos) {
    return std::string(dtype_name(static_cast<DType>(value)));
  }
  return std::to_string(value);
}

}  // namespace

RankFacts check_agreement(comm::Communicator& comm, const std::optional<CallShape>& shape,
                          const std::string& local_error, const RankFacts& mine) {
  const auto blobs = comm.all_gather(encode(shape, local_error, mine, comm.max_gather_bytes()));
  std::vector<Words> words(blobs.size());
  for (std::size_t r = 0; r < blobs.size(); ++r) {
    if (blobs[r].size() < sizeof(words[r])) {
      throw InternalError(cat("agreement: rank ", r, " sent ", blobs[r].size(), " bytes"));
    }
    std::memcpy(words[r].data(), blobs[r].data(), sizeof(words[r]));
  }

  for (std::size_t r = 0; r < blobs.size(); ++r) {
    if (words[r][0] == 1) continue;
    if (static_cast<int>(r) == comm.rank()) throw InvalidArgument(local_error);
    throw DisagreementError(cat("mm_all_reduce_base: rank ", r, " rejected its arguments (",
                                blobs[r].substr(sizeof(words[r])), "); no rank ran the call"));
  }

  for (std::size_t f = 0; f < kFieldCount; ++f) {
    for (std::size_t r = 1; r < words.size(); ++r) {
      const std::int64_t first = words[0][f + 1];
      const std::int64_t other = words[r][f + 1];
      if (first == other) continue;
      throw DisagreementError(cat("mm_all_reduce_base: ranks disagree on ", kAgreedFields[f].name,
                                  ": rank 0 has ", field_value(f, first), ", rank ", r, " has ",
                                  field_value(f, other), " (every rank must pass the same value)"));
    }
  }

  RankFacts agreed = mine;
  for (const Words& rank : words) {
    agreed.k = std::max(agreed.k, rank[kFactsAt]);
    agreed.threads = std::min(agreed.threads, static_cast<int>(rank[kFactsAt + 1]));
    agreed.reduce_has_own_core = agreed.reduce_has_own_core && rank[kFactsAt + 2] == 1;
  }
  return agreed;
}

}  // namespace tpfuse
