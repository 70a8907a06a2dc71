"""tpfuse.get_comm_name for groups whose ranks run on several hosts, laid out
in one machine with TPFUSE_HOST: shared memory inside a host, the process
groups' gloo between hosts. The bytes follow the documented order: rank
order for one rank per host (the shm transport's bytes), host sums in rank
order then summed in the hosts' order with several; the same on every rank,
whatever comm_turn, for every operator of the family."""
import os

import pytest
import torch
import torch.distributed as dist

import tpfuse


def group_on_hosts(rank, hosts):
    """A new group over every rank, rank r on host hosts[r] (every rank calls it)."""
    os.environ["TPFUSE_HOST"] = hosts[rank]
    try:
        group = dist.new_group(list(range(dist.get_world_size())))
        return group, tpfuse.get_comm_name(group)
    finally:
        del os.environ["TPFUSE_HOST"]


def operands(rank, dtype, m=24, k=40, n=56):
    g = torch.Generator().manual_seed(7 + rank)
    x1 = torch.randn(m, k, generator=g).to(dtype)
    x2 = torch.randn(k, n, generator=g).to(dtype)
    return x1, x2, None


def all_reduce_on_hosts(rank, world_size, hosts, dtype):
    group, hcom = group_on_hosts(rank, hosts)
    info = tpfuse.comm_info(hcom)
    x1, x2, _ = operands(rank, dtype)
    outs = [tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, comm_turn=turn) for turn in (0, 1, 3)]
    assert all(torch.equal(outs[0], out) for out in outs[1:]), "comm_turn changed the bytes"
    # Every rank's contribution: its product alone, rounded to the dtype.
    alone = tpfuse.npu_mm_all_reduce_base(x1, x2, tpfuse.get_comm_name(dist.new_group([rank])))
    gathered = gather_bits(outs[0], group)
    expected = two_level_sum(gather_bits(alone, group), hosts, dtype)
    # Plain values back (tensors would pass through the pool's queue as
    # shared memory).
    return (info, all(torch.equal(outs[0], other) for other in gathered),
            torch.equal(outs[0], expected))


def gather_bits(tensor, group):
    """Every rank's `tensor`, bit for bit (gloo has no bf16: its bytes travel as uint8)."""
    bits = [torch.empty_like(tensor).view(torch.uint8) for _ in range(dist.get_world_size(group))]
    dist.all_gather(bits, tensor.contiguous().view(torch.uint8), group=group)
    return [b.view(tensor.dtype) for b in bits]


def two_level_sum(contributions, hosts, dtype):
    """Host sums in rank order, then the hosts' sums in the order of their lowest ranks."""
    total = None
    for host in dict.fromkeys(hosts):
        host_sum = None
        for r, h in enumerate(hosts):
            if h == host:
                c = contributions[r].float()
                host_sum = c if host_sum is None else host_sum + c
        total = host_sum if total is None else total + host_sum
    return total.to(dtype)


@pytest.mark.parametrize("hosts,transport,dtype", [
    (["a", "b"], "gloo", torch.bfloat16),
    (["a", "b", "c"], "gloo", torch.float16),
    (["a", "a", "b", "b"], "shm+gloo", torch.bfloat16),
    (["a", "a", "b", "b"], "shm+gloo", torch.float16),
    (["a", "b", "a", "b"], "shm+gloo", torch.bfloat16),
])
def test_all_reduce_across_hosts_follows_the_two_level_order(ranks, hosts, transport, dtype):
    results = ranks(len(hosts)).run(all_reduce_on_hosts, hosts, dtype)
    infos = [info for info, *_ in results]
    assert {info["transport"] for info in infos} == {transport}
    assert {info["hosts"] for info in infos} == {len(set(hosts))}
    assert [info["ranks_on_host"] for info in infos] == [hosts.count(h) for h in hosts]
    assert all(same for _, same, _ in results), "the ranks' bytes differ"
    assert all(ordered for _, _, ordered in results), "not the two-level order's bytes"


def subgroup_inside_a_host(rank, world_size):
    _, spanning = group_on_hosts(rank, ["a", "a", "b", "b"])
    os.environ["TPFUSE_HOST"] = "ab"[rank // 2]
    try:
        local = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
        inside = tpfuse.get_comm_name(local)
    finally:
        del os.environ["TPFUSE_HOST"]
    return tpfuse.comm_info(spanning)["transport"], tpfuse.comm_info(inside)


def test_a_subgroup_inside_one_host_gets_shared_memory(ranks):
    for rank, (spanning, inside) in enumerate(ranks(4).run(subgroup_inside_a_host)):
        assert spanning == "shm+gloo"
        assert inside["transport"] == "shm" and inside["size"] == 2 and inside["rank"] == rank % 2


def family_on_hosts(rank, world_size, hosts):
    _, hcom = group_on_hosts(rank, hosts)
    x1, x2, _ = operands(rank, torch.bfloat16, m=8 * world_size)
    full = tpfuse.npu_mm_all_reduce_base(x1, x2, hcom)
    scattered = tpfuse.npu_mm_reduce_scatter_base(x1, x2, hcom, world_size)
    rows = full.shape[0] // world_size
    assert torch.equal(scattered, full[rank * rows:(rank + 1) * rows])
    block = x1[:8].contiguous()
    _, gathered = tpfuse.npu_all_gather_base_mm(block, x2, hcom, world_size)
    assert torch.equal(gathered, torch.cat(gather_bits(block, dist.group.WORLD)))
    shape = (1,) + tuple(full.shape)
    residual = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(full.dtype)
    gamma = torch.ones(full.shape[-1], dtype=full.dtype)
    y, normed = tpfuse.npu_mm_all_reduce_add_rms_norm(x1.unsqueeze(0), x2, residual, gamma, hcom)
    group = dist.group.WORLD
    return all(torch.equal(a, b) and torch.equal(c, d)
               for a, b, c, d in zip(gather_bits(y, group), [y] * world_size,
                                     gather_bits(normed, group), [normed] * world_size))


def test_the_family_runs_across_hosts_identically_on_every_rank(ranks):
    assert all(ranks(4).run(family_on_hosts, ["a", "a", "b", "b"]))
