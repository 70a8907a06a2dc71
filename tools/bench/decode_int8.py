# Weight-only int8 against plain bf16 at decode shapes, through the PyTorch
# binding, weights out of cache: a decode step reads each weight once, so
# each measurement cycles through enough different weights (12 by default,
# 70 MB of bf16 at n = 5632, k = 1024) that every call reads its weight from
# DRAM. Weights are torch Linear's layout ([n, k] row-major) passed as w.t()
# (or --row-major: [k, n]); the binding's packed weight cache holds them
# packed after the first call, as in inference. Modes take turns within each
# repetition so that a busy host slows them alike; prints the median time per
# matrix and the ratio to bf16 of the same shape. Threads: TPFUSE_NUM_THREADS.
#
#   TPFUSE_NUM_THREADS=1 PYTHONPATH=build/python /usr/bin/python3 \
#       tools/bench/decode_int8.py --shapes 5632x1024 1024x2816 --rows 1 8
import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist

import tpfuse


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_weights(mode, n, k, count, group, row_major):
    """`count` (x2, kwargs) pairs of one mode: plain bf16, or int8 with scales."""
    weights = []
    for _ in range(count):
        if mode == "bf16":
            w = torch.randn(n, k).to(torch.bfloat16)
            weights.append((w.t().contiguous() if row_major else w.t(), {}))
            continue
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        groups = (k + group - 1) // group
        shape = (groups, n) if mode.startswith("group") else (n,)
        kwargs = {"antiquant_scale": (torch.rand(shape) * 0.02 + 0.001).to(torch.bfloat16)}
        if mode.endswith("+offset"):
            kwargs["antiquant_offset"] = torch.randint(-8, 8, shape).to(torch.bfloat16)
        if mode.startswith("group"):
            kwargs["antiquant_group_size"] = group
        weights.append((q.t().contiguous() if row_major else q.t(), kwargs))
    return weights


def time_per_matrix(x, weights, hcom, sweeps):
    start = time.perf_counter()
    for _ in range(sweeps):
        for w, kwargs in weights:
            tpfuse.npu_mm_all_reduce_base(x, w, hcom, **kwargs)
    return (time.perf_counter() - start) / (sweeps * len(weights))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["5632x1024", "1024x2816", "3072x1024"],
                        help="n x k of the weight")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--modes", nargs="+",
                        default=["channel", "channel+offset", "group", "group+offset"])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--weights", type=int, default=12)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--sweeps", type=int, default=4)
    parser.add_argument("--row-major", action="store_true", help="x2 as [k, n] row-major")
    args = parser.parse_args()

    dist.init_process_group("gloo", rank=0, world_size=1,
                            init_method=f"tcp://127.0.0.1:{free_port()}")
    hcom = tpfuse.get_comm_name(dist.group.WORLD)
    torch.manual_seed(0)
    print(f"{'shape':>10} {'m':>3} {'mode':>15} {'us':>8} {'bf16 us':>8} {'ratio':>6}")
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        modes = ["bf16"] + args.modes
        weights = {mode: make_weights(mode, n, k, args.weights, args.group, args.row_major)
                   for mode in modes}
        for m in args.rows:
            x = torch.randn(m, k).to(torch.bfloat16)
            times = {mode: [] for mode in modes}
            for mode in modes:  # packs every weight into the cache
                time_per_matrix(x, weights[mode], hcom, 1)
            for _ in range(args.reps):
                for mode in modes:
                    times[mode].append(time_per_matrix(x, weights[mode], hcom, args.sweeps))
            base = statistics.median(times["bf16"]) * 1e6
            for mode in modes:
                us = statistics.median(times[mode]) * 1e6
                print(f"{shape:>10} {m:>3} {mode:>15} {us:8.1f} {base:8.1f} {base / us:6.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
