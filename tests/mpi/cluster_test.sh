#!/usr/bin/env bash
# tpfuse across emulated hosts (scripts/cluster.sh): every mode on 2 and 3
# hosts with 1 and 2 ranks each, checked by `tpfuse run` against the golden
# model and for the same bytes on every rank; then a host whose link is cut
# mid-call: every surviving rank fails within the deadline naming the cut
# host's rank; then the namespaces are gone.
#
#   cluster_test.sh TPFUSE_BINARY CLUSTER_SCRIPT
#
# Exits 77 (ctest's skip) with the reason where namespaces or mpirun cannot
# be used (not root, no CAP_NET_ADMIN, no mpirun).
set -uo pipefail

TPFUSE=$1
CLUSTER=$2
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
# leaves the last host short); ARGS pick the mode; HIERARCHICAL=off makes it
# flat where hosts hold several ranks.
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
    run_case "$hosts" "$per_host" --m 48 --k 128 --n 96 --dtype bf16 --bias
    run_case "$hosts" "$per_host" --m 33 --k 128 --n 64 --mode weight_quant --scale per_group \
      --group-size 32 --offset
    run_case "$hosts" "$per_host" --m 40 --k 64 --n 80 --mode full_quant --dtype f16 \
      --scale per_channel --x3
  done
done

# Three rails (three ranks on each host), and hosts of two ranks and one
# (one rail; the second rank of the first host only receives).
run_case 2 3 --m 40 --k 96 --n 72 --dtype bf16 --x3
RANKS=3 run_case 2 2 --m 48 --k 128 --n 96 --dtype f16 --bias

# The flat MPI all-reduce where hosts hold several ranks (hierarchical above).
HIERARCHICAL=off run_case 2 2 --m 48 --k 128 --n 96 --dtype f16 --bias

# Cut h2's link while 3 ranks (one per host) are in the middle of calls. The
# survivors fail at the deadline of the wait they are in; the slack covers a
# loaded 2-core machine and mpirun forwarding their messages.
deadline_ms=2000
log=$(mktemp)
start=$(date +%s%N)
timeout 60 "$CLUSTER" mpirun -np 3 --bind-to none --tag-output -x TPFUSE_TIMEOUT_MS=$deadline_ms \
  "$TPFUSE" run --m 256 --k 512 --n 512 --iterations 1000000 --no-check >"$log" 2>&1 &
job=$!
sleep 3
"$CLUSTER" link h2 down
cut=$(date +%s%N)
for _ in $(seq 1 100); do
  [ "$(grep -c "waiting for ranks 2" "$log")" -ge 2 ] && break
  sleep 0.1
done
seen=$(date +%s%N)
kill "$job" 2>/dev/null
wait "$job" 2>/dev/null
echo "--- job output after the cut (h2 holds rank 2) ---"
grep -v "^\[1,[0-9]\]<stdout>:plain" "$log" | head -20
for rank in 0 1; do
  grep -q "^\[1,$rank\]<stderr>:.*waiting for ranks 2" "$log" ||
    fail "rank $rank did not fail naming rank 2"
done
elapsed_ms=$(( (seen - cut) / 1000000 ))
echo "survivors failed ${elapsed_ms} ms after the cut (deadline ${deadline_ms} ms; $(( (cut - start) / 1000000 )) ms of calls before it)"
[ "$elapsed_ms" -le $(( deadline_ms + 3000 )) ] || fail "the survivors took ${elapsed_ms} ms"
rm -f "$log"

trap - EXIT
cleanup
left=$(ip netns list | grep -c "^${TPFUSE_CLUSTER}-" || true)
[ "$left" -eq 0 ] || fail "$left namespaces left after cluster.sh down"
echo "PASSED"
