"""Run under mpirun with 4 ranks: a torch job whose ranks are laid out as two
hosts (TPFUSE_HOST) gets the MPI engine between them (transport "shm+mpi"),
whose bytes are the fixed two-level order's, as the gloo engine's are
(test_hosts.py); a group that is not MPI's world gets gloo; a subgroup inside
a host gets shared memory. Exits non-zero on any failure."""
import os
import sys

import torch
import torch.distributed as dist

import tpfuse

sys.path.insert(0, os.path.dirname(__file__))
from test_hosts import gather_bits, operands, two_level_sum  # noqa: E402

HOSTS = ["a", "a", "b", "b"]


def main():
    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    size = int(os.environ["OMPI_COMM_WORLD_SIZE"])
    assert size == len(HOSTS), f"run with mpirun -np {len(HOSTS)}"
    os.environ["TPFUSE_HOST"] = HOSTS[rank]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=rank,
                            world_size=size)
    world = dist.group.WORLD
    hcom = tpfuse.get_comm_name(world)
    info = tpfuse.comm_info(hcom)
    assert info["transport"] == "shm+mpi" and info["hosts"] == 2, info
    for dtype in (torch.bfloat16, torch.float16):
        x1, x2, _ = operands(rank, dtype)
        out = tpfuse.npu_mm_all_reduce_base(x1, x2, hcom)
        alone = tpfuse.npu_mm_all_reduce_base(x1, x2, tpfuse.get_comm_name(dist.new_group([rank])))
        expected = two_level_sum(gather_bits(alone, world), HOSTS, dtype)
        assert torch.equal(out, expected), f"rank {rank}: not the two-level order's bytes ({dtype})"
        assert all(torch.equal(out, other) for other in gather_bits(out, world))
    # Ranks 0 and 2, one on each host, are not MPI's world: gloo.
    spanning = dist.new_group([0, 2])
    if rank in (0, 2):
        assert tpfuse.comm_info(tpfuse.get_comm_name(spanning))["transport"] == "gloo"
    local = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    assert tpfuse.comm_info(tpfuse.get_comm_name(local))["transport"] == "shm"
    dist.barrier()
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    main()
