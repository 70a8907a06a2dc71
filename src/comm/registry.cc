// The process-wide registry of communicators by `hcom` name. A mutex guards the
// map: ranks that use threads may register and look up concurrently.
#include "tpfuse/comm/registry.h"

#include <map>
#include <mutex>

#include "tpfuse/core/error.h"

namespace tpfuse::comm {

namespace {

struct Registry {
  std::mutex mutex;
  std::map<std::string, std::shared_ptr<Communicator>, std::less<>> by_name;
};

Registry& registry() {
  static Registry instance;
  return instance;
}

std::string known_names(const Registry& reg) {
  if (reg.by_name.empty()) return "none";
  std::string names;
  for (const auto& [name, comm] : reg.by_name) {
    if (!names.empty()) names += ", ";
    names += name;
  }
  return names;
}

}  // namespace

std::string register_communicator(std::shared_ptr<Communicator> comm) {
  require(comm != nullptr, "hcom: cannot register a null communicator");
  std::string name = comm->name();
  require(!name.empty(), "hcom: cannot register a communicator with an empty name");
  Registry& reg = registry();
  std::lock_guard lock(reg.mutex);
  const auto [it, inserted] = reg.by_name.try_emplace(name, std::move(comm));
  require(inserted, "hcom: a communicator named \"", name,
          "\" is already registered in this process");
  return name;
}

std::shared_ptr<Communicator> find_communicator(std::string_view name) {
  Registry& reg = registry();
  std::lock_guard lock(reg.mutex);
  const auto it = reg.by_name.find(name);
  if (it == reg.by_name.end()) {
    throw InvalidArgument(cat("hcom: no communicator named \"", std::string(name),
                              "\" in this process (known: ", known_names(reg), ")"));
  }
  return it->second;
}

void unregister_communicator(std::string_view name) {
  std::shared_ptr<Communicator> removed;  // released after the lock: its destructor unmaps memory
  Registry& reg = registry();
  std::lock_guard lock(reg.mutex);
  const auto it = reg.by_name.find(name);
  if (it == reg.by_name.end()) return;
  removed = std::move(it->second);
  reg.by_name.erase(it);
}

}  // namespace tpfuse::comm
