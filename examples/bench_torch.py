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
# Each variant's call starts after a barrier and lasts until the slowest rank
# is done; the variants take turns, and the figures are medians over
# iterations. Both paths get the same threads per rank (the cores divided
# among the ranks).
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


def timed(variants, iterations, warmup, world_size):
    """{name: median over iterations of the slowest rank's time, in ms}. The
    variants take turns within each iteration, so that a busy host slows them
    alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    mine = {name: [] for name in variants}
    for _ in range(iterations):
        for name, fn in variants.items():
            dist.barrier()
            start = time.perf_counter()
            fn()
            mine[name].append(time.perf_counter() - start)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, mine)
    return {name: 1e3 * statistics.median(max(times) for times in
                                          zip(*(rank_times[name] for rank_times in everyone)))
            for name in variants}


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
    figures = timed({
        "bf16 tpfuse fused": lambda: tpfuse.npu_mm_all_reduce_base(x1_bf16, x2_bf16, hcom),
        "bf16 torch matmul + all_reduce": lambda: torch_all_reduce(torch_matmul()),
        "bf16 torch matmul alone": torch_matmul,
        "bf16 torch all_reduce alone": lambda: torch_all_reduce(partial),
        "f16 tpfuse fused": lambda: tpfuse.npu_mm_all_reduce_base(x1_f16, x2_f16, hcom),
    }, args.iterations, args.warmup, world_size)
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
    parser = argparse.ArgumentParser(
        description="tpfuse.npu_mm_all_reduce_base against torch.matmul + gloo all_reduce")
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
