#!/usr/bin/env bash
# An emulated cluster on one machine, for tests and benchmarks of the
# multi-host path: H hosts as network namespaces, each joined by a veth pair to
# a bridge that lives in a switch namespace of its own, so no traffic can
# reach the machine's real interfaces. `tc tbf` shapes every link, in both
# directions (netem is not available on these machines, so no delay is added).
#
#   scripts/cluster.sh up HOSTS [GBIT_PER_S]   create hosts h0..h{HOSTS-1} (unshaped if no rate)
#   scripts/cluster.sh down                     remove everything the cluster made
#   scripts/cluster.sh exec HOST CMD...         run CMD inside HOST (h0, h1, ... or its address)
#   scripts/cluster.sh hosts                    print "address slots=1" lines, a hostfile for mpirun
#   scripts/cluster.sh mpirun ARGS...           run mpirun from h0 across the cluster's hosts
#   scripts/cluster.sh link HOST up|down        raise or cut one host's link
#
# Names carry a prefix (TPFUSE_CLUSTER, default "tpfc") so that two clusters
# can exist at once; everything is created under that prefix and `down`
# removes exactly that. Needs root (CAP_NET_ADMIN). TPFUSE_CLUSTER_BTL sets
# Open MPI's transports for `mpirun` (default tcp,self,vader; tcp,self for a
# job that will be killed: vader leaves h0's segments in /dev/shm then).
set -euo pipefail

PREFIX=${TPFUSE_CLUSTER:-tpfc}
SWITCH="${PREFIX}-sw"
SUBNET_BASE=${TPFUSE_CLUSTER_SUBNET:-10.231.7}
STATE_DIR="/run/${PREFIX}-cluster"
SELF=$(readlink -f "$0")

die() { echo "cluster.sh: $*" >&2; exit 1; }

host_ns() { echo "${PREFIX}-h$1"; }
host_addr() { echo "${SUBNET_BASE}.$(( $1 + 1 ))"; }

# Maps "h3", "3" or an address of this cluster to the host index.
host_index() {
  local name=$1
  case "$name" in
    h[0-9]*) echo "${name#h}" ;;
    "${SUBNET_BASE}".*) echo $(( ${name##*.} - 1 )) ;;
    [0-9]*) echo "$name" ;;
    *) die "unknown host \"$name\" (expected h0.., an index, or ${SUBNET_BASE}.N)" ;;
  esac
}

host_count() {
  [ -f "$STATE_DIR/hosts" ] || die "no cluster is up (run: $0 up HOSTS)"
  cat "$STATE_DIR/hosts"
}

shape_link() {  # namespace device rate
  local ns=$1 dev=$2 rate=$3
  # Burst of about 1 ms of traffic at the rate (at least 64 KiB) keeps tbf
  # accurate at Gbit/s. The rate may be fractional (2.5): awk does the sum.
  local burst
  burst=$(awk -v r="$rate" 'BEGIN { b = int(r * 1e9 / 8 / 1000); print (b < 65536 ? 65536 : b) }')
  ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate "${rate}gbit" burst "$burst" latency 50ms
}

cmd_up() {
  local hosts=${1:-}; local rate=${2:-}
  [ -n "$hosts" ] && [ "$hosts" -ge 1 ] 2>/dev/null || die "up: expected a host count >= 1, got \"${hosts}\""
  [ -z "$rate" ] || awk -v r="$rate" 'BEGIN { exit !(r + 0 > 0) }' ||
    die "up: expected a positive rate in Gbit/s, got \"${rate}\""
  [ "$(id -u)" -eq 0 ] || die "up: needs root (network namespaces)"
  [ -d "$STATE_DIR" ] && cmd_down
  mkdir -p "$STATE_DIR"
  echo "$hosts" > "$STATE_DIR/hosts"
  trap 'cmd_down; exit 1' ERR
  ip netns add "$SWITCH"
  ip -n "$SWITCH" link add br0 type bridge
  ip -n "$SWITCH" link set br0 up
  ip -n "$SWITCH" link set lo up
  for (( i = 0; i < hosts; i++ )); do
    local ns; ns=$(host_ns "$i")
    ip netns add "$ns"
    ip link add "${PREFIX}h${i}" type veth peer name "${PREFIX}s${i}"
    ip link set "${PREFIX}h${i}" netns "$ns" name eth0
    ip link set "${PREFIX}s${i}" netns "$SWITCH" name "port${i}"
    ip -n "$SWITCH" link set "port${i}" master br0 up
    ip -n "$ns" addr add "$(host_addr "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    if [ -n "$rate" ]; then
      shape_link "$ns" eth0 "$rate"
      shape_link "$SWITCH" "port${i}" "$rate"
    fi
  done
  echo "${rate:-unshaped}" > "$STATE_DIR/rate"
  trap - ERR
  local shaped="unshaped"
  [ -n "$rate" ] && shaped="${rate} Gbit/s"
  echo "cluster up: $hosts hosts (${SUBNET_BASE}.1..${hosts}), links $shaped"
}

cmd_down() {
  local ns
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^${PREFIX}-(h[0-9]+|sw)$" || true); do
    # Processes left inside a host (a killed job) would keep it alive: end them.
    local pids; pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    ip netns del "$ns"
  done
  rm -rf "$STATE_DIR" /dev/shm/"${PREFIX}"-h[0-9]*
}

cmd_exec() {
  local index; index=$(host_index "${1:?exec: expected a host}"); shift
  exec ip netns exec "$(host_ns "$index")" "$@"
}

cmd_hosts() {
  local hosts; hosts=$(host_count)
  for (( i = 0; i < hosts; i++ )); do echo "$(host_addr "$i") slots=${SLOTS:-1}"; done
}

# Open MPI names its shared-memory (vader) segments and its session directory
# after the hostname, which the hosts share: ranks of two hosts would map
# each other's segments, and daemons race to create the same directories. So
# each host gets a directory of its own for both (h0's ranks, started by
# mpirun itself, keep the defaults), and PMIx keeps its data in each
# process (gds hash) rather than in shared files.
host_shm_dir() { echo "/dev/shm/${PREFIX}-h$1"; }

# OpenMPI's launcher calls this as its rsh agent: `agent HOST CMD...`.
cmd_rsh() {
  local host=$1; shift
  local index; index=$(host_index "$host")
  local dir; dir=$(host_shm_dir "$index")
  mkdir -p "$dir"
  cmd_exec "$host" env OMPI_MCA_btl_vader_backing_directory="$dir" \
    OMPI_MCA_orte_tmpdir_base="$dir" PMIX_MCA_gds=hash /bin/sh -c "$*"
}

cmd_mpirun() {
  host_count >/dev/null
  cmd_hosts > "$STATE_DIR/hostfile"
  local agent="$STATE_DIR/rsh-agent"
  printf '#!/bin/sh\nTPFUSE_CLUSTER=%s TPFUSE_CLUSTER_SUBNET=%s exec %s rsh "$@"\n' \
    "$PREFIX" "$SUBNET_BASE" "$SELF" > "$agent"
  chmod 0755 "$agent"
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PMIX_MCA_gds=hash \
    ip netns exec "$(host_ns 0)" mpirun --hostfile "$STATE_DIR/hostfile" \
      --mca plm_rsh_agent "$agent" \
      --mca btl "${TPFUSE_CLUSTER_BTL:-tcp,self,vader}" --mca btl_tcp_if_include "${SUBNET_BASE}.0/24" \
      --mca oob_tcp_if_include "${SUBNET_BASE}.0/24" "$@"
}

cmd_link() {
  local index; index=$(host_index "${1:?link: expected a host}")
  local state=${2:?link: expected up or down}
  ip -n "$SWITCH" link set "port${index}" "$state"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  exec) shift; cmd_exec "$@" ;;
  hosts) cmd_hosts ;;
  rsh) shift; cmd_rsh "$@" ;;
  mpirun) shift; cmd_mpirun "$@" ;;
  link) shift; cmd_link "$@" ;;
  *) die "usage: $0 up HOSTS [GBIT_PER_S] | down | exec HOST CMD... | hosts | mpirun ARGS... | link HOST up|down" ;;
esac
