#include "ops/agreement.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <mutex>
#include <string_view>
#include <tuple>
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

// Wire form: a flag (1 = validated), the fields, the rank's facts, a flag
// (1 = ran ahead) and the facts it assumed, then the error text if any.
constexpr std::size_t kFactsAt = kFieldCount + 1;
constexpr std::size_t kAssumedAt = kFactsAt + 3;
using Words = std::array<std::int64_t, kAssumedAt + 4>;

// Where a field is in the wire form (past the fields: no such field).
constexpr std::size_t word_of(std::string_view name) {
  std::size_t f = 0;
  while (f < kFieldCount && std::string_view(kAgreedFields[f].name) != name) ++f;
  return f + 1;
}
constexpr std::size_t kOutDtypeWord = word_of("output dtype");
constexpr std::size_t kMWord = word_of("m");
constexpr std::size_t kNWord = word_of("n");
static_assert(kOutDtypeWord <= kFieldCount && kMWord <= kFieldCount && kNWord <= kFieldCount);

void put_facts(Words& words, std::size_t at, const RankFacts& facts) {
  words[at] = facts.k;
  words[at + 1] = facts.threads;
  words[at + 2] = facts.reduce_has_own_core ? 1 : 0;
}

RankFacts get_facts(const Words& words, std::size_t at) {
  return {words[at], static_cast<int>(words[at + 1]), words[at + 2] == 1};
}

std::string field_value(std::size_t field, std::int64_t value) {
  const std::string name = kAgreedFields[field].name;
  if (name == "mode") return std::string(mode_name(static_cast<Mode>(value)));
  if (name.find("dtype") != std::string::npos) {
    return std::string(dtype_name(static_cast<DType>(value)));
  }
  return std::to_string(value);
}

// The failure the proposals show, if any: a rank's rejected arguments first,
// then the first field on which a rank differs from rank 0.
std::exception_ptr find_failure(const std::vector<std::string>& blobs,
                                const std::vector<Words>& words, int rank,
                                const std::string& local_error) {
  for (std::size_t r = 0; r < blobs.size(); ++r) {
    if (words[r][0] == 1) continue;
    if (static_cast<int>(r) == rank) return std::make_exception_ptr(InvalidArgument(local_error));
    return std::make_exception_ptr(DisagreementError(
        cat("mm_all_reduce_base: rank ", r, " rejected its arguments (",
            blobs[r].substr(sizeof(words[r])), "); the call failed on every rank")));
  }
  for (std::size_t f = 0; f < kFieldCount; ++f) {
    for (std::size_t r = 1; r < words.size(); ++r) {
      const std::int64_t first = words[0][f + 1];
      const std::int64_t other = words[r][f + 1];
      if (first == other) continue;
      return std::make_exception_ptr(DisagreementError(
          cat("mm_all_reduce_base: ranks disagree on ", kAgreedFields[f].name, ": rank 0 has ",
              field_value(f, first), ", rank ", r, " has ", field_value(f, other),
              " (every rank must pass the same value)")));
    }
  }
  return nullptr;
}

using MemoryKey = std::tuple<std::string, std::array<std::int64_t, kFieldCount>, std::int64_t,
                             int, bool>;

// Agreements remembered, dropped all at once past kMaxRemembered so that calls
// of ever new shapes do not grow the table forever.
constexpr std::size_t kMaxRemembered = 1024;

struct Memory {
  std::mutex mutex;
  std::map<MemoryKey, RankFacts> agreed;
};

Memory& memory() {
  static Memory instance;
  return instance;
}

MemoryKey memory_key(const comm::Communicator& comm, const CallShape& shape,
                     const RankFacts& mine) {
  std::array<std::int64_t, kFieldCount> fields{};
  for (std::size_t f = 0; f < kFieldCount; ++f) fields[f] = kAgreedFields[f].get(shape);
  return {comm.name(), fields, mine.k, mine.threads, mine.reduce_has_own_core};
}

}  // namespace

std::string encode_proposal(const Proposal& proposal, std::size_t max_bytes) {
  Words words{};
  words[0] = proposal.shape ? 1 : 0;
  if (proposal.shape) {
    for (std::size_t f = 0; f < kFieldCount; ++f) {
      words[f + 1] = kAgreedFields[f].get(*proposal.shape);
    }
  }
  put_facts(words, kFactsAt, proposal.mine);
  words[kAssumedAt] = proposal.assumed ? 1 : 0;
  if (proposal.assumed) put_facts(words, kAssumedAt + 1, *proposal.assumed);
  std::string blob(reinterpret_cast<const char*>(words.data()), sizeof(words));
  if (!proposal.shape) blob += proposal.error.substr(0, max_bytes - blob.size());
  return blob;
}

Agreement judge_proposals(const std::vector<std::string>& blobs, int rank,
                          const std::string& local_error) {
  std::vector<Words> words(blobs.size());
  for (std::size_t r = 0; r < blobs.size(); ++r) {
    if (blobs[r].size() < sizeof(words[r])) {
      throw InternalError(cat("agreement: rank ", r, " sent ", blobs[r].size(), " bytes"));
    }
    std::memcpy(words[r].data(), blobs[r].data(), sizeof(words[r]));
  }
  Agreement agreement;
  agreement.failure = find_failure(blobs, words, rank, local_error);
  agreement.facts = get_facts(words[0], kFactsAt);
  for (const Words& w : words) {
    const RankFacts theirs = get_facts(w, kFactsAt);
    agreement.facts.k = std::max(agreement.facts.k, theirs.k);
    agreement.facts.threads = std::min(agreement.facts.threads, theirs.threads);
    agreement.facts.reduce_has_own_core =
        agreement.facts.reduce_has_own_core && theirs.reduce_has_own_core;
  }
  bool assumptions_hold = true;
  for (const Words& w : words) {
    if (w[kAssumedAt] != 1) continue;
    if (!agreement.ran_ahead) {
      agreement.ran_ahead = true;
      agreement.ahead_count =
          static_cast<std::size_t>(w[kMWord]) * static_cast<std::size_t>(w[kNWord]);
      agreement.ahead_dtype = static_cast<DType>(w[kOutDtypeWord]);
    }
    assumptions_hold = assumptions_hold && get_facts(w, kAssumedAt + 1) == agreement.facts;
  }
  agreement.ran_ahead_rightly =
      agreement.ran_ahead && agreement.failure == nullptr && assumptions_hold;
  return agreement;
}

std::optional<RankFacts> remembered_agreement(const comm::Communicator& comm,
                                              const CallShape& shape, const RankFacts& mine) {
  const std::lock_guard lock(memory().mutex);
  const auto it = memory().agreed.find(memory_key(comm, shape, mine));
  if (it == memory().agreed.end()) return std::nullopt;
  return it->second;
}

void remember_agreement(const comm::Communicator& comm, const CallShape& shape,
                        const RankFacts& mine, const RankFacts& agreed) {
  const std::lock_guard lock(memory().mutex);
  if (memory().agreed.size() >= kMaxRemembered) memory().agreed.clear();
  memory().agreed[memory_key(comm, shape, mine)] = agreed;
}

}  // namespace tpfuse
