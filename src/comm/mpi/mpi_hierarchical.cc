// The hierarchical communicator over MPI: the world and each rail a group of
// its own (see tpfuse/comm/hierarchical.h).
#include <string>
#include <vector>

#include "comm/mpi/mpi_group.h"
#include "tpfuse/comm/hierarchical.h"
#include "tpfuse/core/config.h"
#include "tpfuse/core/error.h"

namespace tpfuse::comm::mpi {

namespace {

const EnvSetting<std::string> kHierarchical{
    "TPFUSE_MPI_HIERARCHICAL", "auto",
    "auto: reduce inside each host over shm, then between hosts over MPI, when hosts hold "
    "several ranks; off: one flat MPI all-reduce over every rank"};

}  // namespace

std::shared_ptr<Communicator> make_hierarchical(std::shared_ptr<Communicator> flat,
                                                const MpiOptions& options) {
  const std::string& mode = kHierarchical.get();
  require(mode == "auto" || mode == "off", kHierarchical.name(), ": expected auto or off, got \"",
          mode, "\"");
  const HostLayout layout = host_layout(flat->all_gather(this_host_key()), flat->rank());
  // Every rank sees the same keys, so every rank takes the same branch.
  if (mode == "off" || !layout.hierarchical()) return flat;
  // Every rank takes part in making every group (collective over the world).
  HierarchicalParts parts;
  parts.engine = "mpi";
  parts.world = flat;
  parts.layout = layout;
  for (const std::vector<int>& members : layout.rails) {
    if (auto group = create_group(options, members)) parts.rail = std::move(group);
  }
  return create_hierarchical_communicator(std::move(parts));
}

}  // namespace tpfuse::comm::mpi
