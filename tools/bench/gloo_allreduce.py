# torch.distributed gloo all_reduce over a list of sizes: the gloo baseline of
# `tpfuse bench allreduce` and `tpfuse bench fused`.
#
# Same protocol as tpfuse's and MPI's side: a barrier, a batch of calls, the
# slowest rank's time per call; the median over repetitions, sizes taking
# turns within each repetition so that a busy host slows them alike. Ranks pin
# themselves one per core (rank % cores) and use one torch thread each.
# Tensors are fp32: torch 1.13's gloo cannot all-reduce bf16. Rank 0 prints one
# JSON object per size.
#
#   /usr/bin/python3 tools/bench/gloo_allreduce.py --ranks 2 --sizes 4096 16777216
import argparse
import json
import math
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def slowest(seconds):
    """The largest of every rank's `seconds`."""
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value[0])


def timed_batch(tensor, calls):
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(tensor)
    return slowest((time.perf_counter() - start) / calls)


def bench_rank(rank, args, port):
    if not args.no_pin:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.ranks)
    # Zeros stay zeros however often they are summed, so in-place calls never overflow.
    tensors = [torch.zeros(max(1, size // 4), dtype=torch.float32) for size in args.sizes]
    calls = []
    for tensor in tensors:
        once = 0.0
        for _ in range(max(1, args.warmup)):
            once = timed_batch(tensor, 1)
        calls.append(int(min(100000, max(1, math.ceil(args.min_batch_ms * 1e-3 / once)))))
    seconds = [[] for _ in tensors]
    for _ in range(args.reps):
        for i, tensor in enumerate(tensors):
            seconds[i].append(timed_batch(tensor, calls[i]))
    if rank == 0:
        for size, batch, times in zip(args.sizes, calls, seconds):
            print(json.dumps({"impl": "gloo", "ranks": args.ranks, "bytes": size, "dtype": "f32",
                              "seconds": statistics.median(times), "calls": batch,
                              "reps": args.reps, "torch": torch.__version__}), flush=True)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description="torch.distributed gloo all_reduce, fp32")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="bytes")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--min-batch-ms", type=float, default=0.0,
                        help="repeat calls to fill at least this long a batch")
    parser.add_argument("--no-pin", action="store_true", help="do not pin ranks to cores")
    args = parser.parse_args()
    mp.spawn(bench_rank, args=(args, free_port()), nprocs=args.ranks)


if __name__ == "__main__":
    main()
