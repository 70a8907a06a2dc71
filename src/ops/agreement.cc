#include "ops/agreement.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <string_view>
#include <vector>

#include "tpfuse/core/error.h"

namespace tpfuse {

namespace {

std::uint32_t epsilon_bits(const CallShape& s) {
  std::uint32_t bits = 0;
  std::memcpy(&bits, &s.epsilon, sizeof(bits));
  return bits;
}

// The fields every rank must agree on, in the order they are compared.
struct AgreedField {
  const char* name;
  std::int64_t (*get)(const CallShape&);
};

constexpr AgreedField kAgreedFields[] = {
    {"operator", [](const CallShape& s) { return static_cast<std::int64_t>(s.op); }},
    {"mode", [](const CallShape& s) { return static_cast<std::int64_t>(s.mode); }},
    {"x1 dtype", [](const CallShape& s) { return static_cast<std::int64_t>(s.in_dtype); }},
    {"output dtype", [](const CallShape& s) { return static_cast<std::int64_t>(s.out_dtype); }},
    {"m", [](const CallShape& s) { return s.m; }},
    {"b (x1 dim 0 of a 3-D x1)", [](const CallShape& s) { return s.batch; }},
    {"s (x1 dim 1 of a 3-D x1)", [](const CallShape& s) { return s.seq; }},
    // all_gather_base_mm: each rank multiplies by its own columns, so n may
    // differ (a fact, combined), while k must agree.
    {"n", [](const CallShape& s) { return s.op == pipeline::Operator::all_gather_mm ? 0 : s.n; }},
    {"k", [](const CallShape& s) { return s.op == pipeline::Operator::all_gather_mm ? s.k : 0; }},
    {"comm_turn", [](const CallShape& s) { return s.comm_turn; }},
    // Gathered along with x1: every rank gives it, or none.
    {"x1_scale",
     [](const CallShape& s) {
       return static_cast<std::int64_t>(s.op == pipeline::Operator::all_gather_mm &&
                                        s.has_row_scale);
     }},
    {"epsilon", [](const CallShape& s) { return static_cast<std::int64_t>(epsilon_bits(s)); }},
};
constexpr std::size_t kFieldCount = std::size(kAgreedFields);
static_assert(kFieldCount == AgreementCache::kFields);

// Payload: a flag (1 = validated), the fields, the rank's facts; then the
// error text, if any.
constexpr std::size_t kFactsAt = kFieldCount + 1;
using Words = std::array<std::int64_t, kFactsAt + 4>;

std::array<std::int64_t, kFieldCount> fields_of(const CallShape& shape) {
  std::array<std::int64_t, kFieldCount> fields{};
  for (std::size_t f = 0; f < kFieldCount; ++f) fields[f] = kAgreedFields[f].get(shape);
  return fields;
}

RankFacts facts_at(const Words& words) {
  return {words[kFactsAt], words[kFactsAt + 3], static_cast<int>(words[kFactsAt + 1]),
          words[kFactsAt + 2] == 1};
}

// 64-bit FNV-1a over words.
struct Digest {
  std::uint64_t value = 1469598103934665603ull;
  void add(std::int64_t word) {
    for (int b = 0; b < 8; ++b) {
      value = (value ^ ((static_cast<std::uint64_t>(word) >> (8 * b)) & 0xffu)) * 1099511628211ull;
    }
  }
};

enum DigestKind : std::int64_t { kPlanned = 1, kUnplanned = 2 };

std::string field_value(std::size_t field, std::int64_t value) {
  const std::string name = kAgreedFields[field].name;
  if (name == "mode") return std::string(mode_name(static_cast<Mode>(value)));
  if (name == "x1_scale") return value != 0 ? "one" : "none";
  if (name == "epsilon") {
    const auto bits = static_cast<std::uint32_t>(value);
    float epsilon = 0;
    std::memcpy(&epsilon, &bits, sizeof(epsilon));
    return cat(epsilon);
  }
  if (name == "operator") {
    return std::string(pipeline::operator_name(static_cast<pipeline::Operator>(value)));
  }
  if (name.find("dtype") != std::string::npos) {
    return std::string(dtype_name(static_cast<DType>(value)));
  }
  return std::to_string(value);
}

// The failure the proposals show, if any: a rank's rejected arguments first,
// then the first field on which a rank differs from rank 0.
std::exception_ptr find_failure(const std::vector<comm::CallHeader>& headers,
                                const std::vector<Words>& words, int rank,
                                const std::string& local_error, std::string_view operation) {
  for (std::size_t r = 0; r < words.size(); ++r) {
    if (words[r][0] == 1) continue;
    if (static_cast<int>(r) == rank) return std::make_exception_ptr(InvalidArgument(local_error));
    return std::make_exception_ptr(DisagreementError(
        cat(operation, ": rank ", r, " rejected its arguments (",
            headers[r].payload_view().substr(sizeof(Words)), "); the call failed on every rank")));
  }
  for (std::size_t f = 0; f < kFieldCount; ++f) {
    for (std::size_t r = 1; r < words.size(); ++r) {
      const std::int64_t first = words[0][f + 1];
      const std::int64_t other = words[r][f + 1];
      if (first == other) continue;
      return std::make_exception_ptr(
          DisagreementError(cat(operation, ": ranks disagree on ", kAgreedFields[f].name,
                                ": rank 0 has ", field_value(f, first), ", rank ", r, " has ",
                                field_value(f, other), " (every rank must pass the same value)")));
    }
  }
  return nullptr;
}

// Agreements remembered per communicator, emptied past kMaxRemembered so
// that calls of ever new shapes do not grow the table forever (on every rank
// at the same call, since every rank makes the same calls).
constexpr std::size_t kMaxRemembered = 1024;

}  // namespace

comm::CallHeader make_header(const Proposal& proposal, const std::optional<PlannedRun>& planned,
                             int rank) {
  Words words{};
  words[0] = proposal.shape ? 1 : 0;
  if (proposal.shape) {
    const auto fields = fields_of(*proposal.shape);
    std::copy(fields.begin(), fields.end(), words.begin() + 1);
  }
  words[kFactsAt] = proposal.mine.k;
  words[kFactsAt + 1] = proposal.mine.threads;
  words[kFactsAt + 2] = proposal.mine.reduce_has_own_core ? 1 : 0;
  words[kFactsAt + 3] = proposal.mine.n;
  std::string payload(reinterpret_cast<const char*>(words.data()), sizeof(words));
  if (!proposal.shape) payload += proposal.error;

  Digest digest;
  if (proposal.shape && planned) {
    digest.add(kPlanned);
    for (std::size_t f = 1; f <= kFieldCount; ++f) digest.add(words[f]);
    digest.add(planned->facts.k);
    digest.add(planned->facts.n);
    digest.add(planned->facts.threads);
    digest.add(planned->facts.reduce_has_own_core ? 1 : 0);
    for (std::int64_t rows : planned->tile_rows) digest.add(rows);
  } else {
    digest.add(kUnplanned);  // no other rank has this digest
    digest.add(rank);
  }
  comm::CallHeader header;
  header.digest = digest.value;
  header.set_payload(payload);
  return header;
}

Agreement judge_headers(const std::vector<comm::CallHeader>& headers, int rank,
                        const std::string& local_error, std::string_view operation) {
  std::vector<Words> words(headers.size());
  for (std::size_t r = 0; r < headers.size(); ++r) {
    if (headers[r].length < sizeof(Words)) {
      throw InternalError(
          cat("agreement: rank ", r, " sent a header of ", headers[r].length, " bytes"));
    }
    std::memcpy(words[r].data(), headers[r].payload.data(), sizeof(Words));
  }
  Agreement agreement;
  agreement.failure = find_failure(headers, words, rank, local_error, operation);
  agreement.facts = facts_at(words[0]);
  for (const Words& w : words) {
    const RankFacts theirs = facts_at(w);
    agreement.facts.k = std::max(agreement.facts.k, theirs.k);
    agreement.facts.n = std::max(agreement.facts.n, theirs.n);
    agreement.facts.threads = std::min(agreement.facts.threads, theirs.threads);
    agreement.facts.reduce_has_own_core =
        agreement.facts.reduce_has_own_core && theirs.reduce_has_own_core;
  }
  return agreement;
}

std::optional<RankFacts> AgreementCache::find(const CallShape& shape, const RankFacts& mine) {
  const std::lock_guard lock(mutex_);
  const auto it =
      agreed_.find({fields_of(shape), mine.k, mine.n, mine.threads, mine.reduce_has_own_core});
  if (it == agreed_.end()) return std::nullopt;
  return it->second;
}

void AgreementCache::remember(const CallShape& shape, const RankFacts& mine,
                              const RankFacts& agreed) {
  const std::lock_guard lock(mutex_);
  if (agreed_.size() >= kMaxRemembered) agreed_.clear();
  agreed_[{fields_of(shape), mine.k, mine.n, mine.threads, mine.reduce_has_own_core}] = agreed;
}

}  // namespace tpfuse
