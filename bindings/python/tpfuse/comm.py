"""hcom names for torch.distributed process groups.

torch_npu asks HCCL for a group's communicator name
(`group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)`, or
`group.get_hccl_comm_name(rank)` up to torch 2.0.1); gloo has no such method,
so tpfuse code calls `tpfuse.get_comm_name(group)` instead.

The communicator is tpfuse's shared-memory one. Its rendezvous needs a
directory every rank can see: rank 0 of the group creates a private one,
sealed with a fresh job secret, and sends its path and the secret over the
group itself (so a process outside the group cannot join), every rank joins,
and rank 0 removes the directory once all have (inside the operator
library's _create_shm_communicator).
"""
import pathlib
import socket

import torch
import torch.distributed as dist

_names_by_group = {}


def get_comm_name(group=None):
    """The hcom string of `group` (default: the default group), the same on every rank.

    The first call for a group is collective: every rank of the group must
    make it, in the same order relative to the group's other collectives.
    Later calls return the cached name. The group's ranks must all run on
    this host (tpfuse's transport between hosts comes later).
    """
    if group is None:
        group = dist.distributed_c10d._get_default_group()
    name = _names_by_group.get(group)
    if name is None:
        name = _create_communicator(group)
        _names_by_group[group] = name
    return name


def _host_identity():
    boot_id = pathlib.Path("/proc/sys/kernel/random/boot_id")
    return socket.gethostname(), boot_id.read_text().strip() if boot_id.exists() else ""


def _create_communicator(group):
    rank = dist.get_rank(group)
    size = dist.get_world_size(group)
    if rank < 0:
        raise ValueError("tpfuse.get_comm_name: this process is not a member of the group")

    hosts = [None] * size
    dist.all_gather_object(hosts, _host_identity(), group=group)
    if len(set(hosts)) > 1:
        by_host = {}
        for r, (hostname, _) in enumerate(hosts):
            by_host.setdefault(hostname, []).append(r)
        raise RuntimeError(
            "tpfuse.get_comm_name: the group's ranks run on several hosts "
            f"(ranks by host: {by_host}); tpfuse's shared-memory communicator needs "
            "them all on one host (the transport between hosts comes later)")

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
