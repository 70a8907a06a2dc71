// The process-wide registry that maps an `hcom` name to its communicator, as
// torch_npu's get_hccl_comm_name does for HCCL groups.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "tpfuse/comm/communicator.h"

namespace tpfuse::comm {

// Registers `comm` under comm->name() and returns that name. Registering a
// second communicator under a name in use is an InvalidArgument.
std::string register_communicator(std::shared_ptr<Communicator> comm);
// The communicator registered as `name`; InvalidArgument naming `hcom` if none.
std::shared_ptr<Communicator> find_communicator(std::string_view name);
// Removes `name` (no-op if absent).
void unregister_communicator(std::string_view name);

}  // namespace tpfuse::comm
