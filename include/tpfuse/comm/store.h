// Rendezvous store: a small key-value store the ranks of a job share while
// they set up a communicator (segment names, tokens). Values are written once
// and read many times; get() waits, bounded, for a key to appear.
//
// A key is a non-empty name without '/' that does not start with '.'; any
// other key is an InvalidArgument.
#pragma once

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>

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

}  // namespace tpfuse::comm
