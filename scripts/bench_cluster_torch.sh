#!/usr/bin/env bash
# `make bench-cluster-torch JSON=FILE`: the PyTorch binding across emulated
# hosts (scripts/cluster.sh): tpfuse.npu_mm_all_reduce_base against
# torch.matmul + dist.all_reduce (gloo) on the same process group, timed in
# interleaved rounds by scripts/bench_cluster_torch.py in one torchrun job per
# configuration: 2 hosts x 1 and x 2 ranks, links shaped to 1 and 2.5 Gbit/s,
# a decode and a prefill shape, bf16. Writes FILE (a JSON list of records:
# hosts, ranks_per_host, link_gbps, m, n, k, t_tpfuse, t_torch, ratio =
# t_torch / t_tpfuse, t_gemm, t_allreduce, ...) and FILE's name with .png
# (the plot), and prints the table. About 2 minutes here.
#
#   bench_cluster_torch.sh OUT.json [BUILD_DIR]
#
# Every rank gets one GEMM thread (TPFUSE_NUM_THREADS=1, torch's one thread):
# the emulated hosts share this machine's cores. ROUNDS sets the rounds per
# shape (default 15).
set -euo pipefail

JSON=${1:?usage: bench_cluster_torch.sh OUT.json [BUILD_DIR]}
BUILD=${2:-build}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLUSTER="$ROOT/scripts/cluster.sh"
TORCHRUN="$ROOT/scripts/cluster_torchrun.sh"
WORKER="$ROOT/scripts/bench_cluster_torch.py"
export TPFUSE_PYTHON=${PYTHON:-/usr/bin/python3}
export PYTHONPATH
PYTHONPATH=$(readlink -f "$BUILD/python")
export TPFUSE_CLUSTER=${TPFUSE_CLUSTER:-tpbt$$}     # names of its own: another cluster may be up
export TPFUSE_CLUSTER_SUBNET=${TPFUSE_CLUSTER_SUBNET:-10.231.13}
export TPFUSE_NUM_THREADS=1 OMP_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1
ROUNDS=${ROUNDS:-15}
JOB_DEADLINE_S=300

# Decode: a batch of 16 tokens through a 4096x4096 row-parallel linear (K
# split over the ranks).
DECODE="16x4096x4096"
# Prefill, balanced: with N and K fixed, the GEMM and the all-reduce both
# grow linearly in M, so M cannot move their ratio, only take the per-call
# overheads out of it. Measured here (2 hosts x 1 rank, 1 Gbit/s, medians of
# 15 rounds of the slowest rank, this 2-core machine shared with other work):
# torch.matmul of [M, 2048] x [2048, 4096] bf16 and dist.all_reduce of the
# fp32 [M, 4096] output took
#   M=128: 7.4 and 20.0 ms (15.0 and 21.4 in another run), M=256: 31.4 and
#   36.9 ms, M=384: 42.8 and 56.2 ms, M=512: 66.5 and 71.8 ms, M=768: 88.4
#   and 111.1 ms,
# about 0.12 and 0.14 ms a row from M=256 on (the all-reduce near the link's
# rate: 16 KiB a row at 1 Gbit/s is 0.13 ms). M=256 is the smallest M where
# the two stay within 20% of each other, so rounds stay short (tpfuse's
# all-reduce moves the bf16 product, half those bytes).
PREFILL="256x4096x4096"

[ "$(id -u)" -eq 0 ] || { echo "bench-cluster-torch: needs root (network namespaces)" >&2; exit 1; }
"$TPFUSE_PYTHON" -c "import tpfuse" 2>/dev/null ||
  { echo "bench-cluster-torch: $TPFUSE_PYTHON cannot import tpfuse from $PYTHONPATH (build first)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/tpfuse-bench-cluster-torch.XXXXXX)
JOB_PIDS=()
done_ok=0
# The cluster goes down on every path (cluster.sh down also ends whatever
# still runs inside its hosts); the raw records stay in WORK if a step failed.
cleanup() {
  local pid
  for pid in "${JOB_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  "$CLUSTER" down
  if [ $done_ok -eq 1 ]; then rm -rf "$WORK"; else echo "bench-cluster-torch: logs and raw records kept in $WORK" >&2; fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# One configuration: 2 hosts of PER_HOST ranks each, links at GBPS.
measure() {
  local per_host=$1 gbps=$2
  local tag="h2x${per_host}-${gbps}g"
  echo "== 2 hosts x $per_host ranks, ${gbps} Gbit/s: $DECODE (decode), $PREFILL (prefill)"
  "$CLUSTER" up 2 "$gbps" >/dev/null
  JOB_PIDS=()
  for host in h0 h1; do
    "$TORCHRUN" "$host" 2 "$per_host" "$tag" "$WORK" "$WORKER" rank \
      --out "$WORK/$tag.jsonl" --shape "$DECODE" --shape "$PREFILL" \
      --kind "$DECODE=decode" --kind "$PREFILL=prefill" --rounds "$ROUNDS" \
      --hosts 2 --ranks-per-host "$per_host" --link-gbps "$gbps" >"$WORK/$tag-$host.log" 2>&1 &
    JOB_PIDS+=($!)
  done
  local deadline=$(( $(date +%s) + JOB_DEADLINE_S )) pid alive rc=0
  while :; do
    alive=0
    for pid in "${JOB_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive -eq 1 ] || break
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "bench-cluster-torch: $tag still running after ${JOB_DEADLINE_S} s" >&2
      return 1
    fi
    sleep 0.5
  done
  for pid in "${JOB_PIDS[@]}"; do wait "$pid" || rc=$?; done
  JOB_PIDS=()
  grep -h "Gbit/s .*: tpfuse" "$WORK/$tag"-h*.log || true
  if [ $rc -ne 0 ] || [ ! -s "$WORK/$tag.jsonl" ]; then
    echo "bench-cluster-torch: $tag failed (exit $rc):" >&2
    tail -30 "$WORK/$tag"-h*.log >&2
    return 1
  fi
}

for gbps in 1 2.5; do
  for per_host in 1 2; do
    measure "$per_host" "$gbps"
  done
done
"$CLUSTER" down

"$TPFUSE_PYTHON" "$WORKER" merge "$JSON" "$WORK"/*.jsonl
done_ok=1
