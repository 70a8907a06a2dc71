// The hierarchical communicator: shared memory inside each host, an existing
// distributed engine between hosts (MPI, or a torch process group's gloo).
//
// With L ranks on every host (the fewest any host has), the output of an
// all-reduce is cut into L slices and the j-th rank of every host looks
// after slice j:
//   1. host sum: the ranks of a host sum their contributions, widened to
//      fp32, over the shm transport (every rank of the host gets the sum);
//   2. rails: the j-th ranks of all hosts (rail j) all-reduce slice j of
//      their host sums over the engine, in fp32, and round the total once to
//      the dtype (all_reduce_rounding_start); so the L rails share the
//      network and the CPU work instead of one leader per host doing it all;
//   3. gather: the ranks of a host exchange their slices over shm.
// Only host sums cross the network, once per host instead of once per rank.
// A call's agreement (the byte all_gather) goes through shm and then along
// the rails where the hosts hold as many ranks each, else over the world.
//
// Numerics: contributions are widened to fp32 (exactly), summed in fp32 in
// rank order inside each host, the host sums summed in fp32 in the order of
// the rail's ranks (the hosts' order where a host's ranks are consecutive),
// and the total rounded once to the dtype. The order is fixed by the layout,
// whichever engine runs between the hosts, so every rank gets the same
// bytes; it is not the flat rank-order sum (((x0 + x1) + x2) + x3 becomes
// (x0 + x1) + (x2 + x3) with two ranks on each of two hosts).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "tpfuse/comm/communicator.h"

namespace tpfuse::comm {

// This process's host: "hostname:network namespace" (emulated hosts share
// the hostname), or "TPFUSE_HOST=VALUE" where that variable is set, which
// lays a host layout out on one machine (tests, emulation).
std::string this_host_key();

// Where the ranks of a group run, from every rank's host key.
struct HostLayout {
  // Each host's ranks, increasing; hosts in the order of their keys.
  std::vector<std::vector<int>> hosts;
  int host = 0;   // this rank's host, an index into `hosts`
  int place = 0;  // this rank's index in hosts[host]
  // Rail j: the j-th rank of every host, increasing; as many rails as the
  // fewest ranks any host has.
  std::vector<std::vector<int>> rails;

  // Several hosts, some of which hold several ranks: where the hierarchical
  // communicator pays (with one rank per host it would be the flat one).
  bool hierarchical() const;
};
HostLayout host_layout(const std::vector<std::string>& keys, int rank);

// What a hierarchical communicator is made of, each over the engine.
struct HierarchicalParts {
  std::string engine;                   // "mpi" or "gloo"
  std::shared_ptr<Communicator> world;  // every rank of the group, in its rank order
  std::shared_ptr<Communicator> rail;   // this rank's rail; null where its place has none
  HostLayout layout;                    // layout.hierarchical() holds
};

// Collective over parts.world. Makes the host's two shm groups (host sums;
// gathers of slices), each of which meets in a private directory sealed
// with a fresh job secret that the host's lowest rank sends its peers over
// the world (and removes once all have joined). Their waits last half as
// long again as those across hosts, so that a rank waiting on a cut host
// fails first (within 1.25 timeouts of its last progress) and aborts the
// host's groups with its reason: every rank then names the unreachable
// ranks, not that peer, whose rounds in the host may have started before
// that rank last progressed.
std::shared_ptr<Communicator> create_hierarchical_communicator(HierarchicalParts parts);

}  // namespace tpfuse::comm
