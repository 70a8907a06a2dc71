"""tpfuse.get_comm_name: one hcom per torch.distributed group, the same on
every rank, cached, usable by the operator; subgroups get their own; the
rendezvous leaves nothing behind; failures are errors on every rank."""
import os

import pytest
import torch
import torch.distributed as dist

import tpfuse
import tpfuse.comm


def names_of_default_group(rank, world_size):
    default_group = dist.distributed_c10d._get_default_group()
    first = tpfuse.get_comm_name()
    return first, tpfuse.get_comm_name(default_group) is first


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_one_cached_name_on_every_rank(ranks, world_size):
    results = ranks(world_size).run(names_of_default_group)
    names = {name for name, _ in results}
    assert len(names) == 1 and next(iter(names)).startswith("tpfuse-shm-")
    assert all(cached for _, cached in results)


def new_group_leaves_no_rendezvous_dir(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    name = tpfuse.get_comm_name(group)
    dist.barrier()
    return name, os.listdir(os.environ["TMPDIR"])


def test_rendezvous_directory_is_removed(ranks):
    results = ranks(2).run(new_group_leaves_no_rendezvous_dir)
    assert results[0][0] == results[1][0]
    assert [leftover for _, leftover in results] == [[], []]


def sum_over_subgroup(rank, world_size):
    """Ranks {0, 1} and {2, 3} each reduce rank + 1 times k over their own subgroup."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine, other = pairs[rank // 2], pairs[1 - rank // 2]
    name = tpfuse.get_comm_name(mine)
    k = 8
    x1 = torch.full((4, k), float(rank + 1), dtype=torch.bfloat16)
    out = tpfuse.npu_mm_all_reduce_base(x1, torch.ones(k, 2, dtype=torch.bfloat16), name)
    try:
        tpfuse.get_comm_name(other)
        outsider = None
    except ValueError as error:
        outsider = str(error)
    return name, tpfuse.get_comm_name(), out.float().unique().tolist(), outsider


def test_subgroups_get_their_own_communicator(ranks):
    results = ranks(4).run(sum_over_subgroup)
    names = [name for name, _, _, _ in results]
    assert names[0] == names[1] and names[2] == names[3] and names[0] != names[2]
    assert results[0][1] not in names
    assert [values for _, _, values, _ in results] == [[24.0], [24.0], [56.0], [56.0]]
    for _, _, _, outsider in results:
        assert outsider == "tpfuse.get_comm_name: this process is not a member of the group"


def rendezvous_dir_fails_on_rank_0(rank, world_size):
    real_tmpdir = os.environ["TMPDIR"]
    if rank == 0:
        os.environ["TMPDIR"] = os.path.join(real_tmpdir, "no-such-dir")
    try:
        tpfuse.get_comm_name(dist.new_group(list(range(world_size))))
    except RuntimeError as error:
        return str(error)
    finally:
        os.environ["TMPDIR"] = real_tmpdir
    return None


def test_failed_rendezvous_directory_fails_every_rank(ranks):
    for message in ranks(2).run(rendezvous_dir_fails_on_rank_0):
        assert message is not None and message.startswith(
            "tpfuse.get_comm_name: rank 0 could not create the rendezvous directory: "), message
