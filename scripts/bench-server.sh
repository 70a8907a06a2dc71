#!/usr/bin/env bash
# scripts/bench-server.sh [JSON]: how tpfuse shares a server's cores, in
# under 8 minutes whatever their number (N, the cores this shell may use):
#
#   1. GEMM thread scaling: tpfuse bench gemm at 2048^3, threads 1, 2, 4, ...
#      N, for bf16, int8 (full quant), weight-only int8 with bf16 activations
#      and f16, x2 packed once, against oneDNN where it has the mode.
#   2. The fused operator on ranks x threads layouts (2 x N/2, 4 x N/4,
#      N x 1): tpfuse bench fused, bf16, a decode (M=16) and a prefill
#      (M=256) shape, N=K=4096, each rank pinned to a block of cores of its
#      own with as many GEMM threads, against its GEMM then its all-reduce
#      (serial) and oneDNN then MPI_Allreduce (the peer, on the same blocks).
#   3. The all-reduce on 2 and N ranks, 64 KiB to 64 MiB, against the bound
#      its memory traffic sets at the copy rate measured alongside.
#
# Writes one JSON object {machine, gemm, fused, allreduce} (each a list of
# the records its benchmark writes) to JSON (default bench-server.json),
# prints the three tables and draws them into JSON's name with .png.
# TPFUSE: the tpfuse program (default build/tpfuse, else tpfuse on PATH).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
JSON=${1:-bench-server.json}
TPFUSE=${TPFUSE:-}
if [ -z "$TPFUSE" ]; then
  if [ -x "$ROOT/build/tpfuse" ]; then TPFUSE="$ROOT/build/tpfuse"; else TPFUSE=$(command -v tpfuse || true); fi
fi
[ -x "$TPFUSE" ] || { echo "bench-server: no tpfuse program (make build, or set TPFUSE)" >&2; exit 2; }
N=$(nproc)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

threads=()
for ((t = 1; t < N; t *= 2)); do threads+=("$t"); done
threads+=("$N")
layouts=()
for r in 2 4 "$N"; do
  if ((r <= N)) && ((N % r == 0)) && [[ " ${layouts[*]-} " != *" $r "* ]]; then layouts+=("$r"); fi
done
ar_ranks=(2)
((N > 2)) && ar_ranks+=("$N")

echo "== bench-server: $N cores; GEMM threads ${threads[*]}; fused ranks ${layouts[*]}; all-reduce ranks ${ar_ranks[*]}"

echo "== 1/3 GEMM thread scaling"
"$TPFUSE" bench gemm --shape 2048x2048x2048 --modes bf16 int8 wq_bf16 f16 --threads "${threads[@]}" \
  --packed on --epilogue off --reps 3 --min-rep-ms 100 --json "$WORK/gemm.json" | sed -n '/^Engines/,$p'

echo "== 2/3 fused operator, ranks x threads"
for r in "${layouts[@]}"; do
  "$TPFUSE" bench fused --shape 16x4096x4096 --shape 256x4096x4096 --ranks "$r" --dtype bf16 \
    --rounds 2 --reps 5 --min-batch-ms 20 --no-gloo --json "$WORK/fused-$r.json" | sed -n '/^Time per call/,/^$/p'
done

echo "== 3/3 all-reduce against its memory bound"
"$TPFUSE" bench allreduce --ranks "${ar_ranks[@]}" --sizes 64K 1M 4M 16M 64M --rounds 2 --reps 3 \
  --min-batch-ms 20 --no-gloo --json "$WORK/allreduce.json" | sed -n '/ranks; tpfuse/,$p'

"${PYTHON:-/usr/bin/python3}" "$ROOT/scripts/bench_server_report.py" --work "$WORK" --out "$JSON" \
  --machine "$N cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "== bench-server took $((SECONDS - START)) s"
