#!/usr/bin/env bash
# `make bench-cluster JSON=FILE`: tpfuse bench fused across emulated hosts
# (scripts/cluster.sh): 2 and 4 hosts with one rank each, links shaped to 1
# and 2.5 Gbit/s, a balanced, a GEMM-dominated and a communication-dominated
# shape; then 2 hosts x 2 ranks, hierarchical against flat, on the
# communication-dominated shape. The MPI peer (oneDNN GEMM, then
# MPI_Allreduce) runs under the same cluster right after tpfuse. Writes the
# records of `bench fused --json` plus hosts, ranks_per_host, link_gbps,
# hierarchical and progress, and a plot next to FILE (FILE.png).
#
# Every emulated host runs on this machine's cores: each rank gets one GEMM
# thread (TPFUSE_NUM_THREADS=1) and is pinned to core rank % cores, and the
# all-reduces are advanced by a helper thread (TPFUSE_PIPELINE_PROGRESS;
# MPI's TCP transport moves data only inside MPI calls, which polling
# between GEMM blocks makes too rarely).
set -euo pipefail

JSON=${1:?usage: bench_cluster.sh OUT.json [BUILD_DIR]}
BUILD=${2:-build}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER="$ROOT/scripts/cluster.sh"
TPFUSE=$(readlink -f "$BUILD/tpfuse")
PEER=$(readlink -f "$BUILD/tpfuse_mpi_bench")
PROGRESS=${TPFUSE_PIPELINE_PROGRESS:-helper_thread}
REPS=${REPS:-5}
WORK=$(mktemp -d)
# The raw records stay in $WORK if a step fails.
trap '"$CLUSTER" down' EXIT

[ "$(id -u)" -eq 0 ] || { echo "bench-cluster: needs root (network namespaces)" >&2; exit 1; }
[ -x "$TPFUSE" ] && [ -x "$PEER" ] || { echo "bench-cluster: build first (needs MPI)" >&2; exit 1; }

# One configuration: HOSTS hosts, PER_HOST ranks each, links at GBPS; the
# shapes' K is that of the whole layer, so each rank's K-slice stays the same
# whatever the host count.
measure() {
  local hosts=$1 per_host=$2 gbps=$3 hierarchical=$4; shift 4
  local ranks=$(( hosts * per_host ))
  local tag="h${hosts}x${per_host}-${gbps}g-${hierarchical}-t${COMM_TURN:-0}"
  local shapes=() s
  for s in "$@"; do shapes+=(--shape "$s"); done
  echo "== $hosts hosts x $per_host ranks, ${gbps} Gbit/s, hierarchical $hierarchical: $*"
  SLOTS=$per_host "$CLUSTER" mpirun -np "$ranks" --bind-to none -x TPFUSE_NUM_THREADS=1 \
    -x TPFUSE_PIPELINE_PROGRESS="$PROGRESS" -x TPFUSE_MPI_HIERARCHICAL="$hierarchical" \
    "$TPFUSE" bench fused "${shapes[@]}" --dtype bf16 --rounds 1 --reps "$REPS" \
    --comm-turn "${COMM_TURN:-0}" \
    --json "$WORK/$tag.json" | sed -n '/^Time per call/,$p'
  for s in "$@"; do
    IFS=x read -r m n k <<<"$s"
    SLOTS=$per_host "$CLUSTER" mpirun -np "$ranks" --bind-to none -x OMP_NUM_THREADS=1 \
      "$PEER" peer --m "$m" --n "$n" --k $(( k / ranks )) --dtype bf16 --reps "$REPS" \
      --warmup 1 | grep '"what": "peer"' >>"$WORK/$tag.peer" || true
  done
  echo "$hosts $per_host $gbps $hierarchical ${COMM_TURN:-0} $WORK/$tag.json $WORK/$tag.peer" \
    >>"$WORK/runs"
}

# Balanced: each rank's K-slice set so that its GEMM takes about as long as
# the all-reduce of the 256x4096 bf16 output on the link (measured here: 256
# at 2.5 Gbit/s, 640 at 1 Gbit/s, the link's time growing as its rate falls).
balanced_k() { awk -v g="$1" 'BEGIN { print int(640 / g + 0.5) }'; }
for gbps in 1 2.5; do
  for hosts in 2 4; do
    "$CLUSTER" up "$hosts" "$gbps"
    measure "$hosts" 1 "$gbps" auto "256x4096x$(( $(balanced_k "$gbps") * hosts ))" \
      "256x4096x$(( 2048 * hosts ))" "256x4096x$(( 32 * hosts ))"
  done
done
"$CLUSTER" up 2 1
for hierarchical in auto off; do
  measure 2 2 1 "$hierarchical" "256x4096x256"
done
# The balanced shape again with the tiles fixed (comm_turn 8) rather than planned.
COMM_TURN=8 measure 2 1 1 auto "256x4096x$(( $(balanced_k 1) * 2 ))"

python3 "$ROOT/scripts/bench_cluster_merge.py" "$WORK/runs" "$PROGRESS" "$JSON"
rm -rf "$WORK"
