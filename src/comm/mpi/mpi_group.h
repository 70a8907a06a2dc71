// What the hierarchical all-reduce needs of the MPI transport: groups over
// some of the world's ranks, every rank's host, an all-reduce that rounds
// fp32 sums to the output's dtype, and exchanging slices of a buffer inside
// a host.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "tpfuse/comm/mpi.h"

namespace tpfuse::comm::mpi {

// The flat MPI communicator over `members` (world ranks, increasing), on a
// duplicate of MPI_COMM_WORLD of its own. Collective over the whole world:
// every rank calls it; those not among the members get null.
std::shared_ptr<Communicator> create_group(const MpiOptions& options,
                                           const std::vector<int>& members);

// Every rank's host ("hostname:network namespace"), by rank; `comm` is one
// that create_group made.
const std::vector<std::string>& host_keys(const Communicator& comm);

// The all-reduce of fp32 contributions whose sums, fp32 in rank order, are
// rounded once to `out_dtype` (f16, bf16 or f32) into `output`: what crosses
// the network after the sums is in the output's dtype. Same order of calls
// as all_reduce_start on `comm` (which create_group made).
std::unique_ptr<Work> all_reduce_rounding_start(Communicator& comm, const float* input,
                                                std::byte* output, std::size_t count,
                                                DType out_dtype);

// Every one of `members` (ranks of `comm`, which create_group made) sends
// its slice of `data`, bytes [offsets[i], offsets[i + 1]) for members[i],
// to the others, and receives theirs; empty slices send nothing. Each
// member calls it, in the same order as its other calls on `comm`.
std::unique_ptr<Work> gather_slices_start(Communicator& comm, std::byte* data,
                                          const std::vector<std::size_t>& offsets,
                                          const std::vector<int>& members);

// Where share `rank` of `count` elements cut in `size` shares begins:
// floor(count * rank / size), without the product overflowing.
std::size_t share_begin(std::size_t count, int size, int rank);

// fp32 values rounded to `dtype` (f16, bf16 or f32), each once.
void narrow(DType dtype, const float* in, std::size_t count, std::byte* out);

// The hierarchical communicator over `flat` (every rank), when some hosts
// hold several ranks and there are several hosts; else `flat` itself.
// Collective over the world.
std::shared_ptr<Communicator> make_hierarchical(std::shared_ptr<Communicator> flat,
                                                const MpiOptions& options);

}  // namespace tpfuse::comm::mpi
