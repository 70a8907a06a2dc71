#!/usr/bin/env python3
"""Merges bench_cluster.sh's runs into one JSON file and plots them.

Each run is `bench fused --json` records for one cluster configuration and
the MPI peer's lines for its shapes: the peer's time goes into t_peer (with
the hidden fraction unchanged), and every record gets hosts, ranks_per_host,
link_gbps, hierarchical and progress. The table printed also gives f/bound,
T_fused / max(T_gemm, T_comm): how near the fused call comes to the longer of
its two parts, a figure that, unlike the hidden fraction, does not rest on
T_serial. The plot (OUT.png) puts T_serial, T_fused and T_peer side by side
for every record.
"""
import json
import shutil
import subprocess
import sys


def main(runs_path, progress, out_path):
    records = []
    with open(runs_path) as runs:
        for line in runs:
            hosts, per_host, gbps, hierarchical, turn, bench, peer = line.split()
            peers = []
            try:
                with open(peer) as f:
                    peers = [json.loads(l) for l in f if l.strip()]
            except FileNotFoundError:
                pass
            with open(bench) as f:
                for record in json.load(f):
                    for p in peers:
                        if (p["m"], p["n"], p["k_per_rank"]) == (
                                record["m"], record["n"], record["k_per_rank"]):
                            record["t_peer"] = p["t_peer"]
                            record["t_peer_gemm"] = p["t_gemm"]
                            record["t_comm_mpi"] = p["t_comm"]
                            record["peer"] = f'{p["gemm"]}; {p["reduce"]}'
                    record.update(hosts=int(hosts), ranks_per_host=int(per_host),
                                  link_gbps=float(gbps), hierarchical=hierarchical,
                                  comm_turn=int(turn),
                                  progress=progress)
                    records.append(record)
    with open(out_path, "w") as out:
        json.dump(records, out, indent=1)
    print(f"\nwrote {len(records)} records to {out_path}")
    print(f'{"hosts":>5} {"x":>2} {"turn":>4} {"Gbps":>4} {"hier":>4} {"shape":>14} {"T_gemm":>8} {"T_comm":>8} '
          f'{"T_serial":>8} {"T_fused":>8} {"T_peer":>8} {"hidden":>7} {"peer/f":>7} {"f/ser":>6} {"f/bound":>7}')
    for r in records:
        def ms(key):
            return f'{r[key] * 1e3:8.2f}' if r.get(key) is not None else f'{"-":>8}'
        peer_ratio = r["t_peer"] / r["t_fused"] if r.get("t_peer") else float("nan")
        print(f'{r["hosts"]:5d} {r["ranks_per_host"]:2d} {r["comm_turn"]:4d} {r["link_gbps"]:4g} {r["hierarchical"]:>4} '
              f'{r["shape"]:>14} {ms("t_gemm")} {ms("t_comm")} {ms("t_serial")} {ms("t_fused")} '
              f'{ms("t_peer")} {r["hidden_fraction"]:7.3f} {peer_ratio:7.3f} '
              f'{r["t_fused"] / r["t_serial"]:6.3f} {r["t_fused"] / max(r["t_gemm"], r["t_comm"]):7.3f}')
    plot(records, out_path.rsplit(".", 1)[0] + ".png")


def plot(records, path):
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        print("plot skipped: gnuplot not found (apt-get install gnuplot-nox)")
        return
    data = "$data << EOD\n"
    for r in records:
        label = (f'{r["hosts"]}x{r["ranks_per_host"]} {r["link_gbps"]:g}G '
                 f'{"hier " if r["ranks_per_host"] > 1 and r["hierarchical"] == "auto" else ""}'
                 f'{"turn8 " if r["comm_turn"] else ""}'
                 f'K={r["k"]}')
        peer = r["t_peer"] * 1e3 if r.get("t_peer") else "?"
        data += f'"{label}" {r["t_serial"] * 1e3} {r["t_fused"] * 1e3} {peer}\n'
    data += "EOD\n"
    script = (
        "set terminal pngcairo size 1400,700 noenhanced font 'sans,10'\n"
        f"set output '{path}'\n"
        "set title 'tpfuse across emulated hosts (bf16, M=256 N=4096; K of the whole layer): "
        "time per call, median of the slowest rank'\n"
        "set style data histograms\nset style histogram clustered gap 1\n"
        "set style fill solid 0.8 border -1\nset ylabel 'ms'\nset logscale y\n"
        "set xtics rotate by -35\nset grid ytics\nset datafile missing '?'\n"
        f"{data}"
        "plot $data using 2:xtic(1) title 'T_serial (GEMM, then all-reduce)', "
        "'' using 3 title 'T_fused', '' using 4 title 'T_peer (oneDNN, then MPI_Allreduce)'\n")
    subprocess.run([gnuplot], input=script.encode(), check=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
