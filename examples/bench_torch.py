# bench_torch: tpfuse.npu_mm_all_reduce_base against what torch itself offers
# on CPUs, torch.matmul followed by dist.all_reduce over gloo, in one run:
#
#   bf16: the fused op, and torch.matmul (bf16) + all_reduce. torch 1.13's gloo
#         cannot all-reduce bf16 ("Invalid scalar type"), so the torch path
#         reduces the bf16 partials in fp32 and rounds back to bf16, which is
#         also the contract's numerics (bf16 partials, fp32 sum, one rounding).
#   f16:  the fused op only: torch 1.13 has no f16 matmul on CPU.
#
# Each rank holds a K-slice (k / ranks) of x [m, k] and of the weight [k, n].
# A timed iteration starts after a barrier and lasts until the slowest rank
# is done; the figures are medians over iterations. Both paths get the same
# threads per rank (the cores divided among the ranks).
#
#   PYTHONPATH=build/python /usr/bin/python3 examples/bench_torch.py [--m 512 --k 2048 --n 1024]
import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tpfuse


def timed(fn, iterations, warmup, world_size):
    """Median over iterations of the slowest rank's time, in ms."""
    for _ in range(warmup):
        fn()
    mine = []
    for _ in range(iterations):
        dist.barrier()
        start = time.perf_counter()
        fn()
        mine.append(time.perf_counter() - start)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, mine)
    return 1e3 * statistics.median(max(times) for times in zip(*everyone))


def bench_rank(rank, world_size, port, args, threads):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    torch.set_num_threads(threads)
    hcom = tpfuse.get_comm_name()
    k_rank = args.k // world_size
    generator = torch.Generator().manual_seed(rank)
    x1 = torch.randn(args.m, k_rank, generator=generator)
    x2 = torch.randn(k_rank, args.n, generator=generator) / k_rank ** 0.5
    x1_bf16, x2_bf16 = x1.bfloat16(), x2.bfloat16()
    x1_f16, x2_f16 = x1.half(), x2.half()

    def torch_matmul():
        return torch.matmul(x1_bf16, x2_bf16)

    def torch_all_reduce(partial):
        summed = partial.float()
        dist.all_reduce(summed)
        return summed.bfloat16()

    partial = torch_matmul()
    figures = {
        "bf16 tpfuse fused": timed(lambda: tpfuse.npu_mm_all_reduce_base(x1_bf16, x2_bf16, hcom),
                                   args.iterations, args.warmup, world_size),
        "bf16 torch matmul + all_reduce": timed(lambda: torch_all_reduce(torch_matmul()),
                                                args.iterations, args.warmup, world_size),
        "bf16 torch matmul alone": timed(torch_matmul, args.iterations, args.warmup, world_size),
        "bf16 torch all_reduce alone": timed(lambda: torch_all_reduce(partial), args.iterations,
                                             args.warmup, world_size),
        "f16 tpfuse fused": timed(lambda: tpfuse.npu_mm_all_reduce_base(x1_f16, x2_f16, hcom),
                                  args.iterations, args.warmup, world_size),
    }
    fused = tpfuse.npu_mm_all_reduce_base(x1_bf16, x2_bf16, hcom).float()
    difference = float((fused - torch_all_reduce(torch_matmul()).float()).abs().max())

    if rank == 0:
        ratio = figures["bf16 torch matmul + all_reduce"] / figures["bf16 tpfuse fused"]
        print(f"mm_all_reduce_base, {world_size} ranks, m={args.m} k={args.k} ({k_rank} per rank) "
              f"n={args.n}, {threads} thread(s) per rank, median of {args.iterations}")
        for name, ms in figures.items():
            print(f"  {name:34s} {ms:9.3f} ms")
        print(f"  torch / tpfuse (bf16)              {ratio:9.2f}x")
        print(f"  max |tpfuse - torch| (bf16)        {difference:9.3g}")
        print(json.dumps({"ranks": world_size, "m": args.m, "k": args.k, "n": args.n,
                          "threads_per_rank": threads, "ms": figures,
                          "torch_over_tpfuse_bf16": ratio}))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--m", type=int, default=512)
    parser.add_argument("--k", type=int, default=2048, help="k of the whole layer")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    threads = max(1, len(os.sched_getaffinity(0)) // args.ranks)
    mp.spawn(bench_rank, args=(args.ranks, free_port(), args, threads), nprocs=args.ranks)


if __name__ == "__main__":
    main()
