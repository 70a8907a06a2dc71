#include "ops/agreement.h"

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

// Wire form: a flag (1 = validated), the fields, then the error text if any.
std::string encode(const std::optional<CallShape>& shape, const std::string& error,
                   std::size_t max_bytes) {
  std::array<std::int64_t, kFieldCount + 1> words{};
  words[0] = shape ? 1 : 0;
  if (shape) {
    for (std::size_t f = 0; f < kFieldCount; ++f) words[f + 1] = kAgreedFields[f].get(*shape);
  }
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

void check_agreement(comm::Communicator& comm, const std::optional<CallShape>& shape,
                     const std::string& local_error) {
  const auto blobs = comm.all_gather(encode(shape, local_error, comm.max_gather_bytes()));
  std::vector<std::array<std::int64_t, kFieldCount + 1>> words(blobs.size());
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
}

}  // namespace tpfuse
