// Rendezvous store: a small key-value store the ranks of a job share while
// they set up a communicator (segment names, tokens). Values are written once
// and read many times; get() waits, bounded, for a key to appear.
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
// key is one file, written atomically (write, then rename).
class FileStore : public Store {
 public:
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

}  // namespace tpfuse::comm
