#!/usr/bin/env python3
"""tpfuse.npu_mm_all_reduce_base against torch.matmul + dist.all_reduce (gloo), for
scripts/bench_cluster_torch.sh.

  bench_cluster_torch.py rank --out FILE --shape MxNxK... --hosts H --ranks-per-host R --link-gbps G
  bench_cluster_torch.py merge OUT.json FILE...

`rank` is one rank of a torchrun job (the default group spans the emulated
hosts). For each shape, K is the layer's, split over the ranks as a
row-parallel linear: each rank holds x1 [M, K/p] and x2 [K/p, N], bf16. Four
things are timed in interleaved rounds (their order rotates from round to
round, so that a burst of other work hits each alike), each after a barrier,
each round's time being the slowest rank's; the records hold the medians:

  t_tpfuse     tpfuse.npu_mm_all_reduce_base(x1, x2, hcom)
  t_torch      torch.matmul(x1, x2), then dist.all_reduce of it on the same
               group: gloo in torch 1.13 cannot all-reduce bf16 ("Invalid
               scalar type"), so the product goes to fp32 and back, as a user
               would have it; the wire carries twice tpfuse's bytes
  t_gemm       torch.matmul(x1, x2) alone
  t_allreduce  dist.all_reduce of the fp32 [M, N] alone (what t_torch's
               all-reduce costs)

Rank 0 appends one JSON line per shape to FILE. `merge` gathers the lines of
every job into OUT.json, prints the table and plots OUT.png (gnuplot).
"""
import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import time


def rank_main(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    import tpfuse

    rank, world = dist.get_rank(), dist.get_world_size()
    hcom = tpfuse.get_comm_name()
    info = tpfuse.comm_info(hcom)
    for shape in args.shape:
        m, n, k = (int(v) for v in shape.split("x"))
        if k % world:
            raise SystemExit(f"shape {shape}: K={k} is not divisible by the {world} ranks")
        k_rank = k // world
        generator = torch.Generator().manual_seed(1000 + rank)
        x1 = torch.randn(m, k_rank, generator=generator).to(torch.bfloat16)
        x2 = torch.randn(k_rank, n, generator=generator).to(torch.bfloat16)
        fp32 = torch.empty(m, n)

        def run_tpfuse():
            return tpfuse.npu_mm_all_reduce_base(x1, x2, hcom)

        def run_torch():
            product = torch.matmul(x1, x2).float()
            dist.all_reduce(product)
            return product.to(torch.bfloat16)

        def run_gemm():
            return torch.matmul(x1, x2)

        def run_allreduce():
            dist.all_reduce(fp32)

        ops = {"t_tpfuse": run_tpfuse, "t_torch": run_torch, "t_gemm": run_gemm,
               "t_allreduce": run_allreduce}
        names = list(ops)
        # The first tpfuse call of a dtype measures the transport and the
        # GEMM (the planner's constants, agreed by the ranks): warm-up.
        for _ in range(args.warmup):
            for name in names:
                ops[name]()
        times = {name: [] for name in names}
        started = time.monotonic()
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            mine = torch.zeros(len(names), dtype=torch.float64)
            for name in order:
                dist.barrier()
                start = time.perf_counter()
                ops[name]()
                mine[names.index(name)] = time.perf_counter() - start
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            for i, name in enumerate(names):
                times[name].append(float(mine[i]))
        if rank == 0:
            record = {"hosts": args.hosts, "ranks_per_host": args.ranks_per_host,
                      "link_gbps": args.link_gbps, "m": m, "n": n, "k": k, "k_per_rank": k_rank,
                      "dtype": "bf16", "kind": args.kind.get(shape, ""),
                      "transport": info["transport"], "rounds": args.rounds}
            record.update({name: statistics.median(values) for name, values in times.items()})
            record["ratio"] = record["t_torch"] / record["t_tpfuse"]
            record["spread_tpfuse"] = [min(times["t_tpfuse"]), max(times["t_tpfuse"])]
            record["spread_torch"] = [min(times["t_torch"]), max(times["t_torch"])]
            with open(args.out, "a") as out:
                out.write(json.dumps(record) + "\n")
            print(f"{args.hosts}x{args.ranks_per_host} {args.link_gbps:g} Gbit/s {shape}: "
                  f"tpfuse {record['t_tpfuse'] * 1e3:.2f} ms, torch {record['t_torch'] * 1e3:.2f} ms "
                  f"({args.rounds} rounds in {time.monotonic() - started:.1f} s)",
                  file=sys.stderr, flush=True)
    dist.barrier()
    dist.destroy_process_group()


def merge_main(out_path, inputs):
    records = []
    for path in inputs:
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    if not records:
        raise SystemExit("bench_cluster_torch.py merge: no records")
    with open(out_path, "w") as out:
        json.dump(records, out, indent=1)
    print(f"\nwrote {len(records)} records to {out_path}")
    print("times per call, medians of the slowest rank; torch = matmul, fp32 all_reduce (gloo)")
    print(f'{"hosts":>5} {"x":>2} {"Gbps":>5} {"kind":>8} {"MxNxK":>16} {"t_tpfuse":>9} {"t_torch":>9} '
          f'{"ratio":>6} {"t_gemm":>9} {"t_allred":>9} {"transport":>9}')
    for r in records:
        ms = lambda key: f"{r[key] * 1e3:9.2f}"  # noqa: E731
        print(f'{r["hosts"]:5d} {r["ranks_per_host"]:2d} {r["link_gbps"]:5g} {r["kind"]:>8} '
              f'{r["m"]}x{r["n"]}x{r["k"]:<6} {ms("t_tpfuse")} {ms("t_torch")} {r["ratio"]:6.2f} '
              f'{ms("t_gemm")} {ms("t_allreduce")} {r["transport"]:>9}')
    plot(records, out_path.rsplit(".", 1)[0] + ".png")


def plot(records, path):
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        print("plot skipped: gnuplot not found (apt-get install gnuplot-nox)")
        return
    data = "$data << EOD\n"
    for r in records:
        label = f'{r["hosts"]}x{r["ranks_per_host"]} {r["link_gbps"]:g}G {r["kind"]} M={r["m"]}'
        data += f'"{label}" {r["t_tpfuse"] * 1e3} {r["t_torch"] * 1e3}\n'
    data += "EOD\n"
    script = (
        "set terminal pngcairo size 1200,650 noenhanced font 'sans,10'\n"
        f"set output '{path}'\n"
        "set title \"tpfuse.npu_mm_all_reduce_base vs torch.matmul + dist.all_reduce (gloo, fp32) "
        "across emulated hosts\\nbf16, N=4096, K=4096 split over the ranks; "
        "time per call, median of the slowest rank\"\n"
        "set style data histograms\nset style histogram clustered gap 1\n"
        "set style fill solid 0.8 border -1\nset ylabel 'ms'\nset logscale y\n"
        "set xtics rotate by -30\nset grid ytics\n"
        f"{data}"
        "plot $data using 2:xtic(1) title 'tpfuse.npu_mm_all_reduce_base', "
        "'' using 3 title 'torch.matmul + dist.all_reduce'\n")
    subprocess.run([gnuplot], input=script.encode(), check=True)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rank = commands.add_parser("rank")
    rank.add_argument("--out", required=True)
    rank.add_argument("--shape", action="append", required=True, metavar="MxNxK")
    rank.add_argument("--kind", action="append", default=[], metavar="MxNxK=NAME",
                      help="a name for a shape in the records (decode, prefill)")
    rank.add_argument("--hosts", type=int, required=True)
    rank.add_argument("--ranks-per-host", type=int, required=True)
    rank.add_argument("--link-gbps", type=float, required=True)
    rank.add_argument("--rounds", type=int, default=15)
    rank.add_argument("--warmup", type=int, default=2)
    merge = commands.add_parser("merge")
    merge.add_argument("out")
    merge.add_argument("inputs", nargs="+")
    args = parser.parse_args()
    if args.command == "rank":
        args.kind = dict(item.split("=", 1) for item in args.kind)
        return rank_main(args)
    return merge_main(args.out, args.inputs)


if __name__ == "__main__":
    sys.exit(main())
