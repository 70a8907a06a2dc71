"""Merges scripts/bench-server.sh's records into one JSON, prints its tables
and draws them (gnuplot): GEMM speed-up against threads, the fused operator
per ranks x threads layout, the all-reduce against its memory bound.

    python3 scripts/bench_server_report.py --work DIR --out FILE.json --machine TEXT
"""
import argparse
import glob
import json
import os
import shutil
import subprocess


def load(path):
    with open(path) as f:
        return json.load(f)


def gemm_rows(gemm):
    """(mode, threads, tpfuse GFLOP/s, oneDNN GFLOP/s or None), tpfuse's own engine only."""
    tpfuse, onednn = {}, {}
    for r in gemm:
        if r.get("epilogue"):
            continue
        key = (r["mode"], r["threads"])
        if r["engine"].startswith("tpfuse"):
            tpfuse[key] = max(tpfuse.get(key, 0.0), r["gflops"])
        elif r["engine"].startswith("onednn"):
            onednn[key] = r["gflops"]
    return [(mode, t, g, onednn.get((mode, t))) for (mode, t), g in sorted(tpfuse.items())]


def print_gemm(rows):
    print("\nGEMM 2048^3, x2 packed once: GFLOP/s against threads (speed-up over 1 thread; efficiency = "
          "speed-up / threads)")
    print(f"  {'mode':8} {'threads':>7} {'tpfuse':>9} {'speed-up':>9} {'efficiency':>10} {'oneDNN':>9} {'tpfuse/oneDNN':>13}")
    one = {mode: g for mode, t, g, _ in rows if t == 1}
    for mode, t, g, d in rows:
        speedup = g / one[mode] if mode in one else float("nan")
        ratio = f"{g / d:13.2f}" if d else f"{'-':>13}"
        dnn = f"{d:9.1f}" if d else f"{'-':>9}"
        print(f"  {mode:8} {t:7d} {g:9.1f} {speedup:9.2f} {speedup / t:10.2f} {dnn} {ratio}")


def print_fused(fused):
    print("\nFused bf16, N=K=4096, ranks x threads (each rank's block of cores): ms per call")
    print(f"  {'layout':>8} {'M':>5} {'T_fused':>9} {'T_serial':>9} {'T_peer':>9} {'fused/serial':>12} "
          f"{'fused/peer':>10} {'hidden':>7}")
    for r in sorted(fused, key=lambda r: (r["m"], r["ranks"])):
        peer = r.get("t_peer")
        vs_peer = f"{r['t_fused'] / peer:10.3f}" if peer else f"{'-':>10}"
        peer_ms = f"{peer * 1e3:9.3f}" if peer else f"{'-':>9}"
        print(f"  {str(r['ranks']) + ' x ' + str(r['threads']):>8} {r['m']:5d} {r['t_fused'] * 1e3:9.3f} "
              f"{r['t_serial'] * 1e3:9.3f} {peer_ms} {r['t_fused'] / r['t_serial']:12.3f} {vs_peer} "
              f"{r['hidden_fraction']:7.2f}")


def print_allreduce(records):
    print("\nAll-reduce (tpfuse, in place): GB/s (bytes / time) and the fraction of the memory-traffic bound")
    mpi = {(r["ranks"], r["bytes"]): r["seconds"] for r in records if r["impl"] == "mpi"}
    print(f"  {'ranks':>5} {'bytes':>10} {'us':>10} {'GB/s':>7} {'bound us':>9} {'of bound':>8} {'MPI/tpfuse':>10}")
    for r in records:
        if r["impl"] != "tpfuse":
            continue
        m = mpi.get((r["ranks"], r["bytes"]))
        vs = f"{m / r['seconds']:10.2f}" if m else f"{'-':>10}"
        print(f"  {r['ranks']:5d} {r['bytes']:10d} {r['seconds'] * 1e6:10.1f} {r['bytes'] / r['seconds'] / 1e9:7.2f} "
              f"{r['bound_seconds'] * 1e6:9.1f} {r['fraction_of_bound']:8.2f} {vs}")


def plot(path, machine, rows, fused, allreduce):
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        print("\nplot skipped: gnuplot not found (apt-get install gnuplot-nox)")
        return
    script = [f"set terminal pngcairo size 1800,600 noenhanced font 'sans,10'", f"set output '{path}'",
              f"set multiplot layout 1,3 title 'tpfuse on {machine}'", "set grid", "set key top left"]
    modes = sorted({mode for mode, _, _, _ in rows})
    one = {mode: g for mode, t, g, _ in rows if t == 1}
    plots = []
    for i, mode in enumerate(modes):
        script.append(f"$gemm{i} << EOD")
        script += [f"{t} {g / one[mode]}" for m, t, g, _ in rows if m == mode and mode in one]
        script.append("EOD")
        plots.append(f"$gemm{i} using 1:2 with linespoints lw 2 title '{mode}'")
    max_t = max((t for _, t, _, _ in rows), default=1)
    script += ["set title 'GEMM 2048^3: speed-up over 1 thread'", "set xlabel 'threads'",
               "set ylabel 'speed-up'", f"set xrange [1:{max_t}]", "set logscale xy 2"]
    script.append("plot " + ", ".join(plots + ["x with lines dt 2 lc 'black' title 'linear'"]))
    script += ["unset logscale", "set autoscale x"]

    script.append("$fused << EOD")
    labels = []
    for i, r in enumerate(sorted(fused, key=lambda r: (r["m"], r["ranks"]))):
        peer = r.get("t_peer") or "?"
        peer = peer * 1e3 if peer != "?" else "?"
        script.append(f"{i} {r['t_fused'] * 1e3} {r['t_serial'] * 1e3} {peer}")
        labels.append(f"'M={r['m']} {r['ranks']}x{r['threads']}' {i}")
    script.append("EOD")
    script += ["set title 'fused bf16 N=K=4096: ms per call'", "set xlabel 'M, ranks x threads'",
               "set ylabel 'ms per call'", "set logscale y", "set datafile missing '?'",
               f"set xtics ({', '.join(labels)}) rotate by -30", "set style fill solid 0.6",
               "set boxwidth 0.25", "set xrange [-0.5:" + str(len(labels) - 0.5) + "]",
               "plot $fused using ($1-0.27):2 with boxes title 'fused', $fused using 1:3 with boxes title 'serial', "
               "$fused using ($1+0.27):4 with boxes title 'peer: oneDNN, MPI_Allreduce'",
               "unset logscale", "set xtics auto", "set autoscale x"]

    plots = []
    for i, ranks in enumerate(sorted({r["ranks"] for r in allreduce})):
        script.append(f"$ar{i} << EOD")
        for r in allreduce:
            if r["impl"] == "tpfuse" and r["ranks"] == ranks:
                script.append(f"{r['bytes'] / 2**20} {r['bytes'] / r['seconds'] / 1e9} {r['bytes'] / r['bound_seconds'] / 1e9}")
        script.append("EOD")
        plots.append(f"$ar{i} using 1:2 with linespoints lw 2 lc {i + 1} title 'tpfuse, {ranks} ranks'")
        plots.append(f"$ar{i} using 1:3 with lines dt 2 lc {i + 1} title 'its memory bound, {ranks} ranks'")
    script += ["set title 'all-reduce: GB/s (bytes / time)'", "set xlabel 'MiB'", "set ylabel 'GB/s'",
               "set logscale x 4", "set format x '%g'", "plot " + ", ".join(plots), "unset multiplot"]
    subprocess.run([gnuplot], input="\n".join(script) + "\n", text=True, check=True)
    print(f"\nwrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--machine", required=True)
    args = parser.parse_args()
    gemm = load(os.path.join(args.work, "gemm.json"))
    fused = [r for path in sorted(glob.glob(os.path.join(args.work, "fused-*.json"))) for r in load(path)]
    allreduce = load(os.path.join(args.work, "allreduce.json"))
    with open(args.out, "w") as f:
        json.dump({"machine": args.machine, "gemm": gemm, "fused": fused, "allreduce": allreduce}, f, indent=1)
    rows = gemm_rows(gemm)
    print_gemm(rows)
    print_fused(fused)
    print_allreduce(allreduce)
    print(f"\nwrote {args.out}")
    plot(os.path.splitext(args.out)[0] + ".png", args.machine, rows, fused, allreduce)


if __name__ == "__main__":
    main()
