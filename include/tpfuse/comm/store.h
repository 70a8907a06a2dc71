// Rendezvous store: a small key-value store the ranks of a job share while
// they set up a communicator (segment names, tokens). Values are written once
// and read many times; get() waits, bounded, for a key to appear.
//
// A key is a non-empty name without '/' that does not start with '.'; any
// other key is an InvalidArgument.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace tpfuse::comm {

class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::string& value) = 0;
  // Waits up to `timeout` for the key; throws TimeoutError naming the key.
  virtual std::string get(const std::string& key, std::chrono::milliseconds timeout) = 0;
  // The value if present now, without waiting.
  virtual std::optional<std::string> try_get(const std::string& key) = 0;
};

// A store in a private directory (mode 0700) on the local file system; each
// key is one file (mode 0600), written atomically (write, then rename).
class FileStore : public Store {
 public:
  // `dir` must be an existing directory; InvalidArgument otherwise.
  explicit FileStore(std::filesystem::path dir);
  void set(const std::string& key, const std::string& value) override;
  std::string get(const std::string& key, std::chrono::milliseconds timeout) override;
  std::optional<std::string> try_get(const std::string& key) override;
  const std::filesystem::path& dir() const { return dir_; }

  // Creates a fresh private directory for a job's store under $TMPDIR (or /tmp).
  static std::filesystem::path make_private_dir();

 private:
  std::filesystem::path dir_;
};

// Puts `prefix` in front of every key of `base`, so that several groups can
// rendezvous through one store without their keys colliding. `base` must
// outlive it.
class PrefixStore : public Store {
 public:
  PrefixStore(std::string prefix, Store& base);
  void set(const std::string& key, const std::string& value) override;
  std::string get(const std::string& key, std::chrono::milliseconds timeout) override;
  std::optional<std::string> try_get(const std::string& key) override;

 private:
  std::string prefix_;
  Store& base_;
};

// A job's secret: 128 random bits that every rank of the job holds and no
// other process does, written as 32 hex digits (TPFUSE_SECRET). Whoever
// creates a job's store generates it (launch_local, tpfuse.get_comm_name;
// a user who starts the ranks otherwise sets TPFUSE_SECRET in each) and seals
// the store with it. A rank that joins under a secret:
// - checks the store's verifier record, a hash of the secret, first: a
//   process whose secret differs, or that has none, is refused with
//   AccessDenied before it reads or writes any other key;
// - keeps every other key under a prefix that is another hash of the
//   secret, so a process without it can neither read the job's keys (the
//   segment's name) nor overwrite them, whatever order the processes come in.
// A same-user process could read the secret from a rank's environment: the
// secret keeps out strays (a process of another job, a leftover rank), the
// store directory's mode 0700 and the segment's 0600 keep out other users.
class JobSecret {
 public:
  static JobSecret generate();
  // `text`: 32 hex digits; InvalidArgument naming `what` otherwise.
  static JobSecret parse(std::string_view text, std::string_view what);
  std::string hex() const;
  // The record stored under kVerifierKey (64 hex digits).
  std::string verifier() const;
  // The prefix of the job's keys ("job-" and 16 hex digits, then "-").
  std::string key_prefix() const;

  // The key of the verifier record.
  static constexpr const char* kVerifierKey = "job-verifier";

 private:
  std::array<std::uint8_t, 16> bytes_{};
};

// Writes `secret`'s verifier into `store`, unless it holds that one already;
// AccessDenied if it holds another's. Call before any rank joins.
void seal_store(Store& store, const JobSecret& secret);

// Checks `store` against `secret` (nullptr: this process holds none) and
// returns the prefix of the job's keys. A sealed store refuses a process
// without its secret (AccessDenied, naming `where`). An unsealed one is
// sealed by `rank` 0 when it holds a secret; the other ranks wait, bounded by
// `timeout`, for that seal; without a secret it is used as it is (no prefix).
std::string check_job_secret(Store& store, const JobSecret* secret, int rank,
                             std::chrono::milliseconds timeout, std::string_view where);

// SHA-256 of `data` (the hashes behind JobSecret).
std::array<std::uint8_t, 32> sha256(std::string_view data);

}  // namespace tpfuse::comm
