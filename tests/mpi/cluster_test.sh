#!/usr/bin/env bash
# tpfuse across emulated hosts (scripts/cluster.sh): every mode on 2 and 3
# hosts with 1 and 2 ranks each, checked by `tpfuse run` against the golden
# model and for the same bytes on every rank; then a host whose link is cut
# mid-call (one rank per host, and two with several all-reduces in flight):
# every surviving rank fails within the deadline naming a rank of the cut
# host; then the namespaces are gone. With TRANSPORT_TEST (the MPI
# transport's test binary), its reduce-scatter and all-gather tests and its
# tests of the four operators run on the hierarchical transport too (2 hosts
# x 2 ranks).
#
#   cluster_test.sh TPFUSE_BINARY CLUSTER_SCRIPT [TRANSPORT_TEST]
#
# Exits 77 (ctest's skip) with the reason where namespaces or mpirun cannot
# be used (not root, no CAP_NET_ADMIN, no mpirun).
set -uo pipefail

TPFUSE=$1
CLUSTER=$2
TRANSPORT_TEST=${3:-}
export TPFUSE_CLUSTER="tpft$$"          # names of its own: a benchmark's cluster may be up
export TPFUSE_CLUSTER_SUBNET="10.231.9"
SKIP=77

skip() { echo "SKIPPED: $*"; exit "$SKIP"; }
fail() { echo "FAILED: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || skip "needs root for network namespaces"
command -v mpirun >/dev/null || skip "mpirun not found (apt-get install openmpi-bin)"
command -v ip >/dev/null && command -v tc >/dev/null || skip "ip or tc not found (apt-get install iproute2)"
probe="${TPFUSE_CLUSTER}-probe"
ip netns add "$probe" 2>/dev/null || skip "cannot create network namespaces here"
ip netns del "$probe"

cleanup() { "$CLUSTER" down; }
trap cleanup EXIT
"$CLUSTER" up 3 || fail "cluster.sh up 3"

# `tpfuse run` across HOSTS hosts with PER_HOST ranks each (RANKS fewer
# leaves the last host short); ARGS pick the mode (and with --comm-turn,
# several all-reduces in flight); HIERARCHICAL=off makes it flat where hosts
# hold several ranks.
run_case() {
  local hosts=$1 per_host=$2; shift 2
  local ranks=${RANKS:-$(( hosts * per_host ))}
  local out
  out=$(SLOTS=$per_host timeout 120 "$CLUSTER" mpirun -np "$ranks" --bind-to none \
          -x TPFUSE_TIMEOUT_MS=30000 -x TPFUSE_MPI_HIERARCHICAL="${HIERARCHICAL:-auto}" \
          "$TPFUSE" run --iterations 2 "$@" 2>&1)
  local rc=$?
  echo "$hosts hosts x $per_host (${HIERARCHICAL:-auto}): $(echo "$out" | tail -1)"
  [ $rc -eq 0 ] || fail "$hosts hosts x $per_host ranks, run $*: exit $rc
$out"
  echo "$out" | grep -q "ok, identical on all ranks" || fail "no verdict from run $*:
$out"
}

for hosts in 2 3; do
  for per_host in 1 2; do
    run_case "$hosts" "$per_host" --m 48 --k 128 --n 96 --dtype bf16 --bias --comm-turn 5
    run_case "$hosts" "$per_host" --m 33 --k 128 --n 64 --mode weight_quant --scale per_group \
      --group-size 32 --offset
    run_case "$hosts" "$per_host" --m 40 --k 64 --n 80 --mode full_quant --dtype f16 \
      --scale per_channel --x3
  done
done

# Three rails (three ranks on each host), and hosts of two ranks and one
# (one rail; the second rank of the first host only receives).
run_case 2 3 --m 40 --k 96 --n 72 --dtype bf16 --x3 --comm-turn 4
RANKS=3 run_case 2 2 --m 48 --k 128 --n 96 --dtype f16 --bias --comm-turn 4

# The hierarchical transport's reduce-scatter (its all-reduce's rows) and
# tensor all-gather (over the flat group), checked by the transport's tests,
# its steps in the timeline, and the operators on it (what mm_all_reduce_base pins there; the
# comparison with shm's bytes skips itself, the sums being in another order).
if [ -n "$TRANSPORT_TEST" ]; then
  out=$(SLOTS=2 timeout 120 "$CLUSTER" mpirun -np 4 --bind-to none "$TRANSPORT_TEST" \
          --gtest_filter='MpiTransport.ReduceScatterShards*:MpiTransport.AllGatherPuts*:MpiTransport.HierarchicalSteps*:MpiFamily.*' 2>&1)
  rc=$?
  echo "transport tests, 2 hosts x 2: $(echo "$out" | grep -c '\[       OK \]') passed on the ranks"
  [ $rc -eq 0 ] || fail "the transport's collectives across 2 hosts x 2: exit $rc
$out"
fi

# The flat MPI all-reduce where hosts hold several ranks (hierarchical above).
HIERARCHICAL=off run_case 2 2 --m 48 --k 128 --n 96 --dtype f16 --bias

# Cut host CUT's link while HOSTS hosts of PER_HOST ranks are in the middle
# of calls. The survivors fail at the deadline of the wait they are in,
# naming a rank of the cut host; the slack covers a loaded 2-core machine and
# mpirun forwarding their messages.
cut_case() {
  local hosts=$1 per_host=$2 cut_host=$3; shift 3
  local ranks=$(( hosts * per_host )) deadline_ms=2000 log start cut seen
  local first=$(( cut_host * per_host )) last=$(( cut_host * per_host + per_host - 1 ))
  local pattern
  pattern="waiting for ranks \($(seq -s '\|' "$first" "$last")\)"
  log=$(mktemp)
  "$CLUSTER" up "$hosts" || fail "cluster.sh up $hosts"
  start=$(date +%s%N)
  # The job is killed at the end, and Open MPI's shared-memory transport
  # would leave its segments in /dev/shm: ranks of one host talk over TCP.
  SLOTS=$per_host TPFUSE_CLUSTER_BTL=tcp,self timeout 60 "$CLUSTER" mpirun -np "$ranks" \
    --bind-to none --tag-output -x TPFUSE_TIMEOUT_MS=$deadline_ms "$TPFUSE" run --m 256 --k 512 --n 512 --iterations 1000000 \
    --no-check "$@" >"$log" 2>&1 &
  local job=$!
  sleep 3
  "$CLUSTER" link "h$cut_host" down
  cut=$(date +%s%N)
  for _ in $(seq 1 100); do
    [ "$(grep -c "$pattern" "$log")" -ge $(( ranks - per_host )) ] && break
    sleep 0.1
  done
  seen=$(date +%s%N)
  kill "$job" 2>/dev/null
  wait "$job" 2>/dev/null
  echo "--- $hosts hosts x $per_host, h$cut_host cut (ranks $first..$last): job output after the cut ---"
  grep -v "<stdout>:plain" "$log" | head -20
  for rank in $(seq 0 $(( ranks - 1 ))); do
    [ "$rank" -ge "$first" ] && [ "$rank" -le "$last" ] && continue
    grep -q "^\[1,$rank\]<stderr>:.*$pattern" "$log" ||
      fail "rank $rank did not fail naming a rank of h$cut_host"
  done
  local elapsed_ms=$(( (seen - cut) / 1000000 ))
  echo "survivors failed ${elapsed_ms} ms after the cut (deadline ${deadline_ms} ms; $(( (cut - start) / 1000000 )) ms of calls before it)"
  [ "$elapsed_ms" -le $(( deadline_ms + 3000 )) ] || fail "the survivors took ${elapsed_ms} ms"
  rm -f "$log"
}

cut_case 3 1 2
# Hierarchical, several all-reduces in flight: each survivor waits on its rail.
cut_case 2 2 1 --comm-turn 4

trap - EXIT
cleanup
left=$(ip netns list | grep -c "^${TPFUSE_CLUSTER}-" || true)
[ "$left" -eq 0 ] || fail "$left namespaces left after cluster.sh down"
echo "PASSED"
