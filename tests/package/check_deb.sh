#!/usr/bin/env bash
# Checks the Debian packages that `make deb` built, without installing them
# (grep reads its input whole, never -q: under pipefail, the SIGPIPE that an
# early exit gives the command before it would fail the pipe):
#   - the four packages are there, each with its own files (no file in two,
#     nothing outside /usr, no RPATH in a binary that lands in a system path);
#   - their Depends: Debian's run-time packages (never a -dev one), exact
#     versions between tpfuse's own packages, PyTorch's release for the
#     Python package;
#   - extracted into a scratch root: the CLI runs a checked call, `import
#     tpfuse` finds the packaged module and runs the request's example, and a
#     program builds against the -dev package with pkg-config and with CMake.
#
#   check_deb.sh DEB_BUILD_DIR PYTHON
set -euo pipefail
debs=$(cd "$1" && pwd) python=$2
src=$(cd "$(dirname "$0")/../.." && pwd)
work=$debs/check
rm -rf "$work" && mkdir -p "$work/root" "$work/outside"
fail() { echo "check_deb: $*" >&2; exit 1; }

deb_of() {
  local found=("$debs"/"$1"_*.deb)
  [ -f "${found[0]}" ] || fail "no $1 package in $debs"
  echo "${found[0]}"
}
lib=$(deb_of libtpfuse0) dev=$(deb_of libtpfuse-dev) cli=$(deb_of tpfuse) py=$(deb_of python3-tpfuse)
version=$(dpkg-deb -f "$lib" Version)
triplet=$(gcc -print-multiarch)

echo "== files"
files_of() { dpkg-deb -c "$1" | awk '$1 !~ /^d/ {print $6}' | sed 's|^\./|/|'; }
expect_file() {  # package, path pattern (grep -E, anchored)
  files_of "$1" | grep -E "^$2\$" >/dev/null || fail "$(basename "$1") lacks $2"
}
expect_file "$lib" "/usr/lib/$triplet/libtpfuse\.so\.0"
expect_file "$dev" "/usr/include/tpfuse/tpfuse\.h"
expect_file "$dev" "/usr/include/tpfuse/version\.h"
expect_file "$dev" "/usr/lib/$triplet/libtpfuse\.so"
expect_file "$dev" "/usr/lib/$triplet/cmake/tpfuse/tpfuseConfig\.cmake"
expect_file "$dev" "/usr/lib/$triplet/pkgconfig/tpfuse\.pc"
expect_file "$cli" "/usr/bin/tpfuse"
expect_file "$py" "/usr/lib/python3/dist-packages/tpfuse/__init__\.py"
expect_file "$py" "/usr/lib/python3/dist-packages/tpfuse/_tpfuse_torch\.so"
expect_file "$py" "/usr/lib/python3/dist-packages/tpfuse/_tpfuse_c10d\..*\.so"
files_of "$lib" | grep '^/usr/include/' >/dev/null && fail "libtpfuse0 ships headers"
all=$(for d in "$lib" "$dev" "$cli" "$py"; do files_of "$d"; done)
dups=$(echo "$all" | sort | uniq -d)
[ -z "$dups" ] || fail "files in two packages: $dups"
outside=$(echo "$all" | grep -v '^/usr/' || true)
[ -z "$outside" ] || fail "files outside /usr: $outside"
dpkg-deb -I "$lib" shlibs | grep "^libtpfuse 0 libtpfuse0 (>= " >/dev/null || fail "libtpfuse0 has no shlibs file"
grep -q "^prefix=/usr$" <(dpkg-deb --fsys-tarfile "$dev" | tar -xO "./usr/lib/$triplet/pkgconfig/tpfuse.pc") \
  || fail "tpfuse.pc does not say prefix=/usr"

echo "== Depends"
depends() { dpkg-deb -f "$1" Depends | tr ',' '\n' | sed 's/^ *//'; }
for d in "$lib" "$dev" "$cli" "$py"; do
  name=$(dpkg-deb -f "$d" Package)
  echo "$name: $(dpkg-deb -f "$d" Depends)"
  bad=$(depends "$d" | grep -E '^[^ ]+-dev( |$)' || true)
  [ -z "$bad" ] || fail "$name depends on a development package: $bad"
done
depends "$lib" | grep '^libdnnl2 ' >/dev/null || fail "libtpfuse0 does not depend on libdnnl2"
depends "$lib" | grep '^libtpfuse' >/dev/null && fail "libtpfuse0 depends on itself"
for d in "$dev" "$cli" "$py"; do
  depends "$d" | grep -x "libtpfuse0 (= $version)" >/dev/null \
    || fail "$(dpkg-deb -f "$d" Package) does not depend on libtpfuse0 (= $version)"
done
depends "$py" | grep '^python3-torch (>= ' >/dev/null || fail "python3-tpfuse does not depend on python3-torch"
depends "$py" | grep '^python3-torch (<< ' >/dev/null || fail "python3-tpfuse does not bound python3-torch's release"
for d in "$lib" "$cli" "$py"; do
  dpkg-deb -x "$d" "$work/root"
done
dpkg-deb -x "$dev" "$work/root"
for binary in "$work/root/usr/bin/tpfuse" "$work/root/usr/lib/$triplet/libtpfuse.so.0" \
              "$work/root/usr/lib/python3/dist-packages/tpfuse/_tpfuse_torch.so" \
              "$work/root/usr/lib/python3/dist-packages/tpfuse/"_tpfuse_c10d.*.so; do
  if readelf -d "$binary" | grep -E 'RPATH|RUNPATH' >/dev/null; then fail "$binary carries an RPATH"; fi
done

echo "== run from the extracted root"
root=$work/root
cd "$work/outside"
export LD_LIBRARY_PATH=$root/usr/lib/$triplet
[ "$("$root/usr/bin/tpfuse" --version)" = "tpfuse ${version%-*}" ] || fail "tpfuse --version: $("$root/usr/bin/tpfuse" --version)"
"$root/usr/bin/tpfuse" run --m 16 --k 64 --n 8 --dtype f16 --ranks 2
where=$(PYTHONPATH=$root/usr/lib/python3/dist-packages PYTHONDONTWRITEBYTECODE=1 \
        "$python" -c 'import tpfuse; print(tpfuse.__file__)')
[ "$where" = "$root/usr/lib/python3/dist-packages/tpfuse/__init__.py" ] || fail "import tpfuse found $where"
PYTHONPATH=$root/usr/lib/python3/dist-packages PYTHONDONTWRITEBYTECODE=1 \
  "$python" "$src/examples/mm_all_reduce_base.py"

echo "== build against libtpfuse-dev"
# pkg-config's sysroot prepends the root to the .pc's /usr paths.
# shellcheck disable=SC2046  # pkg-config's flags are words
g++ -std=c++20 -o pc-consumer "$src/examples/consumer/main.cc" \
  $(PKG_CONFIG_SYSROOT_DIR=$root PKG_CONFIG_LIBDIR=$root/usr/lib/$triplet/pkgconfig \
    pkg-config --cflags --libs tpfuse)
./pc-consumer
cmake -S "$src/examples/consumer" -B cmake-consumer -DCMAKE_PREFIX_PATH="$root/usr" >/dev/null
cmake --build cmake-consumer >/dev/null
./cmake-consumer/consumer
echo "packages: ok"
