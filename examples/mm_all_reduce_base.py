# The request's torch_npu example, run on CPUs with tpfuse: 8 processes, each
# with its K-slice of x (x1 [128, 512]) and of the weight (x2 [512, 64]), f16.
# What changed for CPUs: tpfuse replaces torch_npu (no set_device, no .npu()),
# the backend is gloo, the hcom comes from tpfuse.get_comm_name, and the port
# is a free one rather than 50001 so that runs can share a host. Added: each
# rank seeds its inputs, so that rank 0 can check every rank's output against
# a torch fp64 reference and print the errors.
#
#   PYTHONPATH=build/python /usr/bin/python3 examples/mm_all_reduce_base.py
import socket
import sys

import torch
import tpfuse
import torch.distributed as dist
import torch.multiprocessing as mp


def run_mm_all_reduce_base(rank, world_size, master_ip, master_port, x1_shape, x2_shape, dtype):
    init_method = 'tcp://' + master_ip + ':' + master_port
    dist.init_process_group(backend="gloo", rank=rank, world_size=world_size, init_method=init_method)
    from torch.distributed.distributed_c10d import _get_default_group
    default_pg = _get_default_group()
    hcom_info = tpfuse.get_comm_name(default_pg)
    torch.manual_seed(rank)
    input_ = torch.randn(x1_shape, dtype=dtype)
    weight = torch.randn(x2_shape, dtype=dtype)
    output = tpfuse.npu_mm_all_reduce_base(input_, weight, hcom_info, reduce_op='sum')
    report(rank, world_size, output, x1_shape, x2_shape, dtype)


def report(rank, world_size, output, x1_shape, x2_shape, dtype):
    """Rank 0 prints each rank's max error against the fp64 sum of every rank's product.

    The bound is the contract's: each rank's fp32 partial is rounded to f16,
    the partials are summed in fp32 and rounded again, so
    |error| <= 2 u (sum |partials|) + (k + 3 + p) 2^-24 (sum |products|), u = 2^-11.
    """
    partials, magnitudes = [], []
    for r in range(world_size):
        generator = torch.Generator().manual_seed(r)
        x1 = torch.randn(x1_shape, dtype=dtype, generator=generator).double()
        x2 = torch.randn(x2_shape, dtype=dtype, generator=generator).double()
        partials.append(x1 @ x2)
        magnitudes.append(x1.abs() @ x2.abs())
    reference = sum(partials)
    bound = (2 * 2.0 ** -11 * sum(p.abs() for p in partials)
             + (x1_shape[-1] + 3 + world_size) * 2.0 ** -24 * sum(magnitudes))
    error = (output.double() - reference).abs()
    mine = (float(error.max()), bool((error <= 1.01 * bound).all()))

    results = [None] * world_size
    dist.all_gather_object(results, mine)
    if rank == 0:
        print(f"tpfuse.npu_mm_all_reduce_base: {world_size} ranks, x1 {x1_shape} x2 {x2_shape} "
              f"{str(dtype).replace('torch.', '')}, out {list(output.shape)}, "
              f"|out| <= {float(reference.abs().max()):.1f}")
        for r, (max_error, within) in enumerate(results):
            print(f"  rank {r}: max |out - fp64 reference| = {max_error:.3g}"
                  f"{'' if within else '  ABOVE THE CONTRACT BOUND'}")
    if not all(within for _, within in results):
        sys.exit(1)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


if __name__ == "__main__":
    worksize = 8
    master_ip = '127.0.0.1'
    master_port = free_port()
    x1_shape = [128, 512]
    x2_shape = [512, 64]
    dtype = torch.float16
    mp.spawn(run_mm_all_reduce_base, args=(worksize, master_ip, master_port, x1_shape, x2_shape, dtype), nprocs=worksize)
