#!/usr/bin/env bash
# `make deb-check`: installs the Debian packages that `make deb` built, for
# real (apt-get, as root), runs `tpfuse demo` and the request's Python example
# from /, builds a program against the installed -dev package, then purges the
# packages and checks that nothing of theirs is left on the machine.
#
#   deb_check.sh DEB_BUILD_DIR PYTHON
set -euo pipefail
debs=$(cd "$1" && pwd) python=$2
src=$(cd "$(dirname "$0")/.." && pwd)
packages=(libtpfuse0 libtpfuse-dev tpfuse python3-tpfuse)
[ "$(id -u)" -eq 0 ] || { echo "deb-check installs packages: run it as root" >&2; exit 2; }

files=()
for deb in "$debs"/*.deb; do
  mapfile -t -O "${#files[@]}" files < <(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print $6}' | sed 's|^\./|/|')
done
work=$(mktemp -d /tmp/tpfuse-deb-check-XXXXXX)
purge() { DEBIAN_FRONTEND=noninteractive apt-get purge -y -q "${packages[@]}" >"$work/purge.log" 2>&1; }
trap 'purge || true; rm -rf "$work"' EXIT

echo "== apt-get install $debs/*.deb"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$debs"/*.deb >"$work/install.log" 2>&1 \
  || { cat "$work/install.log"; exit 1; }

cd /
echo "== tpfuse demo (from /)"
tpfuse --version
tpfuse demo
echo "== the request's example with the installed Python package (from /)"
where=$("$python" -c "import tpfuse; print(tpfuse.__file__)")
[ "$where" = /usr/lib/python3/dist-packages/tpfuse/__init__.py ] || { echo "import tpfuse found $where" >&2; exit 1; }
"$python" "$src/examples/mm_all_reduce_base.py"
echo "== a program built against libtpfuse-dev"
# shellcheck disable=SC2046  # pkg-config's flags are words
g++ -std=c++20 -o "$work/consumer" "$src/examples/consumer/main.cc" $(pkg-config --cflags --libs tpfuse)
"$work/consumer"

echo "== apt-get purge ${packages[*]}"
purge || { cat "$work/purge.log"; exit 1; }
left=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep 'installed' >/dev/null && left+=("package $pkg")
done
for f in "${files[@]}"; do
  [ -e "$f" ] || [ -L "$f" ] && left+=("$f")
done
for d in /usr/include/tpfuse /usr/lib/python3/dist-packages/tpfuse /usr/libexec/tpfuse; do
  [ -e "$d" ] && left+=("$d")
done
if [ ${#left[@]} -gt 0 ]; then
  printf 'left behind: %s\n' "${left[@]}" >&2
  exit 1
fi
echo "deb-check: installed, ran, purged; nothing left behind"
