#!/usr/bin/env bash
# The PyTorch binding across emulated hosts (scripts/cluster.sh), 2 hosts x 2
# ranks, the ranks being tests/python/cluster_worker.py:
#
# 1. a torchrun job over both hosts (torchrun --nnodes 2 in each, c10d
#    rendezvous on h0, scripts/cluster_torchrun.sh): npu_mm_all_reduce_base
#    (bf16, f16, bias), npu_all_gather_base_mm, npu_mm_reduce_scatter_base and
#    npu_mm_all_reduce_add_rms_norm on the 2x2 group (comm_info: 2 hosts,
#    "shm+gloo"), and mm_all_reduce_base on a subgroup of host 0's two ranks
#    ("shm"). Then, with TPFUSE_TIMEOUT_MS=5000, every rank calls the operator
#    in a loop and h1's link is cut: each rank of h0 must raise within the
#    deadline plus CUT_MARGIN_S, naming ranks 2 and 3. The link then comes
#    back (torchrun's agents wait for each other on exit, through h0's store,
#    up to 300 s: the job would not end while h1 is cut off) and the job must
#    end by itself before a hard deadline, leaving no process and nothing new
#    in /dev/shm or TMPDIR;
# 2. the same layout in h0 alone, 4 ranks with TPFUSE_HOST=a,a,b,b: its
#    outputs must be bitwise those of job 1;
# 3. where mpirun is installed, the same cases in a job started by mpirun
#    across both hosts (tpfuse then carries data over MPI: "shm+mpi"), bitwise
#    those of job 1 too (the reduce's order is the layout's).
#
# The judge (cluster_worker.py judge) checks each job's outputs against the
# fp64 references of tests/python/reference.py within their bounds, and for
# the same bits on every rank.
#
#   cluster_test.sh PYTHON PYTHONPATH_DIR CLUSTER_SCRIPT
#
# Exits 77 (ctest's skip) with the reason where namespaces cannot be made
# (not root, no CAP_NET_ADMIN, no ip/tc/unshare).
set -uo pipefail

PYTHON=${1:?usage: cluster_test.sh PYTHON PYTHONPATH_DIR CLUSTER_SCRIPT}
PYDIR=$(readlink -f "${2:?usage: cluster_test.sh PYTHON PYTHONPATH_DIR CLUSTER_SCRIPT}")
CLUSTER=$(readlink -f "${3:?usage: cluster_test.sh PYTHON PYTHONPATH_DIR CLUSTER_SCRIPT}")
HERE=$(cd "$(dirname "$0")" && pwd)
WORKER="$HERE/cluster_worker.py"
TORCHRUN="$(dirname "$CLUSTER")/cluster_torchrun.sh"
export TPFUSE_CLUSTER="tptc$$"          # names of its own: another cluster may be up
export TPFUSE_CLUSTER_SUBNET="10.231.11"
export TPFUSE_PYTHON="$PYTHON" PYTHONPATH="$PYDIR" PYTHONDONTWRITEBYTECODE=1
export TPFUSE_NUM_THREADS=1             # 4 ranks on a 2-core machine
H0="${TPFUSE_CLUSTER_SUBNET}.1"
CUT_TIMEOUT_MS=5000
CUT_MARGIN_S=${CUT_MARGIN_S:-3}
JOB_DEADLINE_S=90                       # a job's start and checks (15 to 40 s here)
END_DEADLINE_S=40                       # from the cut to the cut job's end
SKIP=77

skip() { echo "SKIPPED: $*"; exit "$SKIP"; }
FAILED=0
fail() { echo "FAILED: $*"; FAILED=1; }

[ "$(id -u)" -eq 0 ] || skip "needs root for network namespaces"
for tool in ip tc unshare; do
  command -v "$tool" >/dev/null || skip "$tool not found (apt-get install iproute2 util-linux)"
done
probe="${TPFUSE_CLUSTER}-probe"
ip netns add "$probe" 2>/dev/null || skip "cannot create network namespaces here"
ip netns del "$probe"
"$PYTHON" -c "import tpfuse" 2>/dev/null || { echo "FAILED: $PYTHON cannot import tpfuse from $PYDIR"; exit 1; }

WORK=$(mktemp -d /tmp/tpfuse-cluster-test.XXXXXX)
# The ranks' TMPDIR, where tpfuse's shared-memory rendezvous makes its
# directories: checked for leftovers after each job.
export TMPDIR="$WORK/tmp"
mkdir -p "$TMPDIR"
JOB_PIDS=()
# Every path out ends the job's processes (those left in the cluster's
# namespaces are ended by cluster.sh down) and removes the cluster and WORK.
cleanup() {
  local pid
  for pid in "${JOB_PIDS[@]}"; do kill -9 "$pid" 2>/dev/null; done
  "$CLUSTER" down
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "interrupted"; exit 1' INT TERM

"$CLUSTER" up 2 >/dev/null || { echo "FAILED: cluster.sh up 2"; exit 1; }

# /dev/shm less the cluster's own per-host folders (Open MPI's, removed by down).
shm_listing() { ls -A /dev/shm | grep -v "^${TPFUSE_CLUSTER}-h" | sort; }
# Entries of /dev/shm that are not in the listing BEFORE and are still there a
# second later (a transient entry is another process's setup, not a leftover).
shm_left() {
  local first
  first=$(comm -13 "$1" <(shm_listing))
  [ -n "$first" ] || return 0
  sleep 1
  comm -12 <(echo "$first") <(shm_listing)
}

# Fails naming what a job (its label) left: a process in the cluster's hosts
# (nothing else runs there), new entries of /dev/shm, or tpfuse's rendezvous
# directories in TMPDIR.
check_leftovers() {
  local job=$1 left ns
  for ns in "${TPFUSE_CLUSTER}-h0" "${TPFUSE_CLUSTER}-h1"; do
    left=$(ip netns pids "$ns" 2>/dev/null | xargs -r ps -o pid=,args= -p)
    [ -z "$left" ] || fail "$job left processes in $ns:
$left"
  done
  left=$(shm_left "$WORK/shm-before")
  [ -z "$left" ] || fail "$job left in /dev/shm: $left"
  left=$(ls -A "$TMPDIR" | grep "^tpfuse" || true)
  [ -z "$left" ] || fail "$job left in TMPDIR: $left"
}

show_logs() {  # the job's console output and the ranks' logs
  local job=$1 f
  for f in "$WORK/$job"-h*.log; do
    [ -f "$f" ] && { echo "--- $(basename "$f") ---"; tail -40 "$f"; }
  done
}

# Waits until PIDs have all ended or DEADLINE (epoch seconds) passes; 0 if they ended.
wait_pids_until() {
  local deadline=$1; shift
  local pid alive
  while :; do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && return 0
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# Ends whatever of the job is still running: TERM (torchrun stops its ranks),
# then KILL, then anything left in the cluster's namespaces.
kill_job() {
  local pid
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null; done
  wait_pids_until $(( $(date +%s) + 5 )) "$@" || for pid in "$@"; do kill -9 "$pid" 2>/dev/null; done
  for ns in "${TPFUSE_CLUSTER}-h0" "${TPFUSE_CLUSTER}-h1"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
  done
}

# rank 0's timing line (how long the process group and the cases took)
rank0_timing() { grep -h "^rank 0: process group" "$WORK/$1"-h*.log | head -1; }

count_files() { ls "$1" 2>/dev/null | grep -c "$2"; }

# ---- 1. both hosts, then h1 cut off ----
echo "== 1. torchrun --nnodes 2 across h0 and h1 (2 ranks each), then h1's link cut"
mkdir -p "$WORK/cross"
shm_listing >"$WORK/shm-before"
start=$(date +%s)
for host in h0 h1; do
  TPFUSE_TIMEOUT_MS=$CUT_TIMEOUT_MS TPFUSE_RDZV_PORT=29400 \
    "$TORCHRUN" "$host" 2 2 cross "$WORK" "$WORKER" rank "$WORK/cross" --cut \
    >"$WORK/cross-$host.log" 2>&1 &
  JOB_PIDS+=($!)
done
cross_pids=("${JOB_PIDS[@]}")
deadline=$(( start + JOB_DEADLINE_S ))
while [ "$(count_files "$WORK/cross" '^ready-rank')" -lt 4 ]; do
  alive=0
  for pid in "${cross_pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  if [ $alive -eq 0 ] || [ "$(date +%s)" -ge "$deadline" ]; then break; fi
  sleep 0.2
done
if [ "$(count_files "$WORK/cross" '^ready-rank')" -lt 4 ]; then
  fail "job 1: $(count_files "$WORK/cross" '^ready-rank') of 4 ranks reached the cut loop within ${JOB_DEADLINE_S} s"
  show_logs cross
  kill_job "${cross_pids[@]}"
else
  echo "ranks ready after $(( $(date +%s) - start )) s ($(rank0_timing cross)); cutting h1's link"
  sleep 1                               # every rank well inside its loop
  "$CLUSTER" link h1 down
  cut_at=$(date +%s.%N)
  # The survivors' reports, or their deadline well passed.
  report_by=$(awk -v t="$cut_at" -v d="$CUT_TIMEOUT_MS" 'BEGIN { print int(t + d / 1000 + 15) }')
  while [ "$(count_files "$WORK/cross" '^cut-rank[01]\.json')" -lt 2 ] && [ "$(date +%s)" -lt "$report_by" ]; do
    sleep 0.2
  done
  "$CLUSTER" link h1 up
  end_by=$(awk -v t="$cut_at" -v d="$END_DEADLINE_S" 'BEGIN { print int(t + d) }')
  if wait_pids_until "$end_by" "${cross_pids[@]}"; then
    echo "job 1 ended by itself $(awk -v t="$cut_at" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - t }') s after the cut"
  else
    fail "job 1 still running ${END_DEADLINE_S} s after the cut: killed"
    kill_job "${cross_pids[@]}"
  fi
  wait "${cross_pids[0]}"; rc0=$?
  wait "${cross_pids[1]}"; rc1=$?
  echo "torchrun exit status: h0 $rc0, h1 $rc1 (h1's ranks may fail)"
  [ "$rc0" -eq 0 ] || { fail "h0's torchrun exited $rc0"; show_logs cross; }
  if grep -q "Signal [0-9]* (SIG" "$WORK/cross-h1.log"; then
    echo "note: a rank of h1 was ended by a signal (allowed: h1's ranks may fail):"
    grep -B2 -A2 "Signal [0-9]* (SIG" "$WORK/cross-h1.log"
  fi
  "$PYTHON" "$WORKER" judge-cut "$WORK/cross" --cut-at "$cut_at" --timeout-ms "$CUT_TIMEOUT_MS" \
    --margin-s "$CUT_MARGIN_S" --survivors 0,1 --lost 2,3 || { fail "the cut (above)"; show_logs cross; }
  check_leftovers "job 1"
fi
JOB_PIDS=()

# ---- 2. the same layout in one namespace ----
echo "== 2. torchrun in h0 alone, 4 ranks, TPFUSE_HOST=a,a,b,b"
mkdir -p "$WORK/one"
shm_listing >"$WORK/shm-before"
TPFUSE_TEST_HOST_OF_RANK=a,a,b,b TPFUSE_TIMEOUT_MS=30000 TPFUSE_RDZV_PORT=29401 \
  "$TORCHRUN" h0 1 4 one "$WORK" "$WORKER" rank "$WORK/one" >"$WORK/one-h0.log" 2>&1 &
JOB_PIDS=($!)
start=$(date +%s)
if wait_pids_until $(( start + JOB_DEADLINE_S )) "${JOB_PIDS[@]}"; then
  wait "${JOB_PIDS[0]}" || { fail "job 2 exited $?"; show_logs one; }
  echo "job 2 ended after $(( $(date +%s) - start )) s ($(rank0_timing one))"
else
  fail "job 2 still running after ${JOB_DEADLINE_S} s: killed"; show_logs one
  kill_job "${JOB_PIDS[@]}"
fi
check_leftovers "job 2"
JOB_PIDS=()

# ---- 3. mpirun across both hosts ----
jobs=("cross=$WORK/cross=shm+gloo" "one=$WORK/one=shm+gloo")
same=(--same cross one)
if command -v mpirun >/dev/null; then
  echo "== 3. mpirun across h0 and h1 (2 ranks each)"
  mkdir -p "$WORK/mpi"
  shm_listing >"$WORK/shm-before"
  start=$(date +%s)
  SLOTS=2 timeout -k 5 "$JOB_DEADLINE_S" "$CLUSTER" mpirun -np 4 --bind-to none \
    -x PYTHONPATH -x PYTHONDONTWRITEBYTECODE -x TPFUSE_NUM_THREADS -x OMP_NUM_THREADS=1 \
    -x TPFUSE_TIMEOUT_MS=30000 -x GLOO_SOCKET_IFNAME=eth0 -x MASTER_ADDR="$H0" -x MASTER_PORT=29402 \
    "$PYTHON" "$WORKER" rank "$WORK/mpi" >"$WORK/mpi-h0.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || { fail "job 3 (mpirun) exited $rc"; show_logs mpi; }
  echo "job 3 ended after $(( $(date +%s) - start )) s ($(rank0_timing mpi))"
  check_leftovers "job 3"
  jobs+=("mpi=$WORK/mpi=shm+mpi")
  same+=(--same cross mpi)
else
  echo "== 3. skipped: mpirun not found (apt-get install openmpi-bin)"
fi

echo "== the outputs"
"$PYTHON" "$WORKER" judge "${jobs[@]}" "${same[@]}" || fail "the outputs (above)"

trap - EXIT
cleanup
left=$(ip netns list | grep -c "^${TPFUSE_CLUSTER}-" || true)
[ "$left" -eq 0 ] || fail "$left namespaces left after cluster.sh down"
[ $FAILED -eq 0 ] || exit 1
echo "PASSED"
