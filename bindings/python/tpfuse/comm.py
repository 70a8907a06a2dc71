"""hcom names for torch.distributed process groups.

torch_npu asks HCCL for a group's communicator name
(`group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)`, or
`group.get_hccl_comm_name(rank)` up to torch 2.0.1); gloo has no such method,
so tpfuse code calls `tpfuse.get_comm_name(group)` instead.

Which communicator a group gets depends on where its ranks run (a host is a
hostname and network namespace, or TPFUSE_HOST where set):

- all on one host: tpfuse's shared-memory communicator. Its rendezvous needs
  a directory every rank can see: rank 0 of the group creates a private one,
  sealed with a fresh job secret, and sends its path and the secret over the
  group itself (so a process outside the group cannot join), every rank
  joins, and rank 0 removes the directory once all have (inside the operator
  library's _create_shm_communicator);
- on several hosts, in a job started by mpirun (and a tpfuse built with MPI),
  for a group whose ranks are MPI's world in the same order: the MPI
  communicator, hierarchical where hosts hold several ranks;
- on several hosts otherwise: shared memory inside each host and gloo
  between hosts, on gloo process groups of tpfuse's own (the group's world,
  each rail, each host) that meet through the job's store under a name of
  their own, driven from C++ through c10d's send and recv. A job started by
  torchrun needs nothing more.

`comm_info(hcom)` says which one a name got; the choice is logged at info
level (TPFUSE_LOG=info).
"""
import datetime
import os
import secrets

import torch
import torch.distributed as dist

from . import _tpfuse_c10d

_names_by_group = {}


def get_comm_name(group=None):
    """The hcom string of `group` (default: the default group), the same on every rank.

    The first call for a group is collective: every rank of the group must
    make it, in the same order relative to the group's other collectives.
    Later calls return the cached name. The group's ranks may run on one
    host or several.
    """
    if group is None:
        group = dist.distributed_c10d._get_default_group()
    name = _names_by_group.get(group)
    if name is None:
        name = _create_communicator(group)
        _names_by_group[group] = name
    return name


def comm_info(hcom):
    """What carries the data of communicator `hcom`: a dict with its name, rank,
    size, hosts, ranks_on_host, timeout_ms and transport ("shm", "mpi", "gloo",
    or "shm+mpi" / "shm+gloo": shared memory inside each host, the engine
    between hosts)."""
    return _tpfuse_c10d.comm_info(hcom)


def _create_communicator(group):
    rank = dist.get_rank(group)
    size = dist.get_world_size(group)
    if rank < 0:
        raise ValueError("tpfuse.get_comm_name: this process is not a member of the group")

    # Every rank decides from the same gathered facts, so all decide alike.
    facts = [None] * size
    dist.all_gather_object(facts, (_tpfuse_c10d.this_host_key(), _mpi_rank()), group=group)
    keys = [key for key, _ in facts]
    hosts, _, _, rails = _tpfuse_c10d.host_layout(keys, rank)
    if len(hosts) == 1:
        return _create_shm_communicator(group, rank, size)
    if _tpfuse_c10d.mpi_supported() and all(mpi == (r, size) for r, (_, mpi) in enumerate(facts)):
        return _tpfuse_c10d.create_mpi_communicator()
    return _create_gloo_communicator(group, rank, size, keys, len(hosts), rails)


def _mpi_rank():
    """(rank, size) in MPI's world where mpirun started this process, else None."""
    if not _tpfuse_c10d.launched_by_mpi():
        return None
    return int(os.environ["OMPI_COMM_WORLD_RANK"]), int(os.environ["OMPI_COMM_WORLD_SIZE"])


def _create_gloo_communicator(group, rank, size, keys, hosts, rails):
    name = [f"tpfuse-gloo-{secrets.token_hex(8)}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=dist.distributed_c10d.get_global_rank(group, 0),
                               group=group)
    name = name[0]
    store = dist.distributed_c10d._get_default_store()
    timeout_ms = _tpfuse_c10d.default_timeout_ms()
    # gloo's own deadline lies past tpfuse's, so tpfuse's names the late ranks.
    gloo_timeout = datetime.timedelta(milliseconds=2 * timeout_ms + 10000)

    def process_group(part, members):
        prefixed = dist.PrefixStore(f"tpfuse/{name}/{part}/", store)
        return dist.ProcessGroupGloo(prefixed, members.index(rank), len(members), gloo_timeout)

    world = process_group("world", list(range(size)))
    rail = None
    if hosts < size:
        # Hierarchical (several hosts, some with several ranks): the rails too.
        for j, members in enumerate(rails):
            if rank in members:
                rail = process_group(f"rail{j}", members)
    return _tpfuse_c10d.create_group_communicator(name, world, keys, rail, timeout_ms)


def _create_shm_communicator(group, rank, size):
    # Rank 0 sends the directory and the job secret, or its failure, so no
    # rank waits for a path that never comes.
    payload = [None]
    if rank == 0:
        try:
            payload[0] = ("dir", list(torch.ops.tpfuse._make_rendezvous_dir()))
        except Exception as error:  # noqa: BLE001  (every rank raises it below)
            payload[0] = ("error", str(error))
    # torch 1.13's broadcast takes the source as a global rank.
    dist.broadcast_object_list(payload, src=dist.distributed_c10d.get_global_rank(group, 0),
                               group=group)
    kind, value = payload[0]
    if kind == "error":
        raise RuntimeError(f"tpfuse.get_comm_name: rank 0 could not create the rendezvous "
                           f"directory: {value}")
    store_dir, secret = value
    return torch.ops.tpfuse._create_shm_communicator(store_dir, rank, size, secret)
