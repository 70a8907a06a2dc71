#!/usr/bin/env bash
# An installed tpfuse works outside the source tree: installs the build into a
# scratch prefix, then, from a directory outside both trees,
#   - runs the installed CLI (--version, and a small checked run);
#   - builds and runs examples/consumer with CMake (find_package(tpfuse));
#   - builds and runs the same program with pkg-config alone;
#   - runs the request's Python example with the installed Python package.
#
#   check_install.sh SOURCE_DIR BUILD_DIR WORK_DIR PYTHON VERSION
set -euo pipefail
src=$1 build=$2 work=$3 python=$4 version=$5
prefix=$work/prefix

rm -rf "$work"
mkdir -p "$work/outside"
cmake --install "$build" --prefix "$prefix" >"$work/install.log"
cd "$work/outside"
cache_value() { sed -n "s/^$1:[A-Z]*=//p" "$build/CMakeCache.txt"; }

echo "== the CLI"
[ "$("$prefix/bin/tpfuse" --version)" = "tpfuse $version" ] \
  || { echo "tpfuse --version printed '$("$prefix/bin/tpfuse" --version)', expected 'tpfuse $version'"; exit 1; }
# (ldd's output is read whole: grep -q would stop reading it, and under
# pipefail the SIGPIPE that ldd then gets would fail the check.)
libraries=$(ldd "$prefix/bin/tpfuse")
grep -q "libtpfuse.so.* => $prefix/" <<<"$libraries" \
  || { echo "the installed CLI does not load the installed library:"; echo "$libraries"; exit 1; }
"$prefix/bin/tpfuse" run --m 16 --k 64 --n 8 --dtype bf16 --ranks 2

echo "== a CMake consumer"
cmake -S "$src/examples/consumer" -B cmake-consumer -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build cmake-consumer >/dev/null
./cmake-consumer/consumer

echo "== a pkg-config consumer"
export PKG_CONFIG_PATH=$prefix/$(cache_value CMAKE_INSTALL_LIBDIR)/pkgconfig
[ "$(pkg-config --modversion tpfuse)" = "$version" ]
# shellcheck disable=SC2046  # pkg-config's flags are words
g++ -std=c++20 -o pc-consumer "$src/examples/consumer/main.cc" $(pkg-config --cflags --libs tpfuse) \
  -Wl,-rpath,"$(pkg-config --variable=libdir tpfuse)"
./pc-consumer

echo "== the Python package"
if [ -f "$build/python/tpfuse/_tpfuse_torch.so" ]; then
  site=$prefix/$(cache_value TPFUSE_PYTHON_INSTALL_DIR)
  export PYTHONPATH=$site PYTHONDONTWRITEBYTECODE=1
  where=$("$python" -c 'import tpfuse; print(tpfuse.__file__, tpfuse.__version__)')
  [ "$where" = "$site/tpfuse/__init__.py $version" ] \
    || { echo "imported '$where', expected the installed $site/tpfuse, version $version"; exit 1; }
  "$python" "$src/examples/mm_all_reduce_base.py"
else
  echo "(not built: no PyTorch for C++)"
fi
echo "installed tree: ok"
