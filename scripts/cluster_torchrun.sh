#!/usr/bin/env bash
# torchrun on one host of the emulated cluster (scripts/cluster.sh), as it
# would run on a real host: its agent and ranks see a hostname of their own
# that every host resolves to that host's address.
#
#   cluster_torchrun.sh HOST NNODES NPROC_PER_NODE RUN_ID WORK_DIR SCRIPT [ARGS...]
#
# HOST is h0, h1, ...; the rendezvous is torchrun's c10d one, hosted on h0
# (port TPFUSE_RDZV_PORT, default 29400). The ranks inherit the caller's
# environment; the interpreter is TPFUSE_PYTHON (default /usr/bin/python3).
# WORK_DIR gets the hosts file and torchrun's logs. The script ends in an
# exec of torchrun, so the caller's $! is torchrun's pid.
#
# Why each step:
# - The emulated hosts are network namespaces that share the machine's
#   hostname, which resolves to the loopback. torchrun's c10d rendezvous
#   hands every rank the hostname of rank 0's agent as MASTER_ADDR, so ranks
#   on other hosts would look for rank 0 on their own loopback. Each host
#   therefore runs in a UTS namespace named ${TPFUSE_CLUSTER}-hI, with a hosts
#   file (bind-mounted in a mount namespace of its own, nothing outside
#   changes) that maps every host's name to its address. The rendezvous also
#   orders its nodes by name, so h0 holds ranks 0..NPROC_PER_NODE-1, h1 the
#   next ones, and so on.
# - gloo picks its interface from GLOO_SOCKET_IFNAME: the host's veth, eth0.
# - Debian's torch 1.13 under Python 3.11 cannot parse torchrun's default
#   --redirects 0 (Std.from_str returns None: IntFlag no longer iterates the
#   zero member), so stdout is redirected and tee'd (1), into WORK_DIR.
set -euo pipefail

[ $# -ge 6 ] || { echo "usage: $0 HOST NNODES NPROC_PER_NODE RUN_ID WORK_DIR SCRIPT [ARGS...]" >&2; exit 2; }
HOST=$1 NNODES=$2 NPROC=$3 RUN_ID=$4 WORK=$5; shift 5
CLUSTER="$(cd "$(dirname "$0")" && pwd)/cluster.sh"
PREFIX=${TPFUSE_CLUSTER:-tpfc}
SUBNET_BASE=${TPFUSE_CLUSTER_SUBNET:-10.231.7}
case "$HOST" in
  h[0-9]*) index=${HOST#h} ;;
  *) echo "cluster_torchrun.sh: expected a host h0, h1, ..., got \"$HOST\"" >&2; exit 2 ;;
esac

# Every host's name and address, from the cluster's own list; written to a
# temporary file and renamed, so hosts started at once never read half a file.
hosts_file="$WORK/hosts"
tmp=$(mktemp "$WORK/hosts.XXXXXX")
{
  echo "127.0.0.1 localhost"
  "$CLUSTER" hosts | awk -v prefix="$PREFIX" '{ print $1, prefix "-h" NR - 1 }'
} >"$tmp"
mv -f "$tmp" "$hosts_file"

mkdir -p "$WORK/torchrun-$RUN_ID-$HOST"
exec "$CLUSTER" exec "$HOST" unshare --mount --uts \
  sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' sh \
  "$hosts_file" "${PREFIX}-h${index}" \
  env GLOO_SOCKET_IFNAME=eth0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
  "${TPFUSE_PYTHON:-/usr/bin/python3}" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$index" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "${SUBNET_BASE}.1:${TPFUSE_RDZV_PORT:-29400}" \
    --rdzv_id "$RUN_ID" --max_restarts 0 --monitor_interval 1 \
    --redirects 1 --tee 1 --log_dir "$WORK/torchrun-$RUN_ID-$HOST" \
    "$@"
