# tpfuse's entry points. `make demo` and `make test` each install what is
# missing (as root), configure, build, and then run the demo or the tests.

DEB_PACKAGES := cmake make g++ pkg-config libgtest-dev libcli11-dev nlohmann-json3-dev libdnnl-dev ocl-icd-opencl-dev libopenblas0 \
                libhwy-dev python3-torch libtorch-dev pybind11-dev python3-pytest libopenmpi-dev openmpi-bin \
                gnuplot-nox iproute2 clang-14 libclang-rt-14-dev libomp-14-dev ccache
BUILD        ?= build
DEB_BUILD    ?= build-deb
ASAN_BUILD   ?= build-asan
TSAN_BUILD   ?= build-tsan
FUZZ_BUILD   ?= build-fuzz
JOBS         ?= $(shell nproc)
PYTHON       ?= /usr/bin/python3
CMAKE_FLAGS  ?=
# The release and package trees compile the same sources with the same flags,
# so they share a compiler cache in the clone: the package tree's build takes
# its objects from the release tree's instead of compiling the project again.
# Paths are taken relative to the clone (CCACHE_BASEDIR), so that the two
# trees' command lines match.
CCACHE_TREES := -DCMAKE_CXX_COMPILER_LAUNCHER=ccache
export CCACHE_DIR     := $(CURDIR)/build-ccache
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_MAXSIZE ?= 2G
# The sanitizer trees' RelWithDebInfo flags: -O1 -DNDEBUG, with line tables
# only (-g1: functions, lines and inlined frames, what the reports print)
# instead of full debug info, which costs a fifth of their compile time. At
# -O2, ASan + UBSan took 210 s to compile the AVX-512 GEMM kernels alone
# (21 s at -O1) and a quarter to two fifths longer for the other files.
SAN_FLAGS    ?= -O1 -g1 -DNDEBUG

# The sanitizer suites run with shared-memory slots of 256 KiB (4 MiB by
# default): the cost model measures the transport once per process with some
# twenty all-reduces of a slot's size, which under the sanitizers took most
# of a small test's time (Operator.BitwiseSameAcrossRuns: 28.3 s against
# 4.1 s under TSan, 6.1 s against 0.7 s under ASan). Larger reduces then go
# in more chunks, which those suites check as well.
SAN_ENV      := TPFUSE_SHM_SLOT_BYTES=262144

.PHONY: all deps configure build demo test test-release test-asan test-tsan test-fuzz test-deb clean \
        bench-cluster bench-cluster-torch bench-decoder deb deb-check

all: build

deps:
	@./scripts/install-deps.sh $(DEB_PACKAGES)

configure: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DTPFUSE_PYTHON=$(PYTHON) $(CCACHE_TREES) $(CMAKE_FLAGS) >/dev/null

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

demo: build
	$(BUILD)/tpfuse demo
	PYTHONPATH=$(BUILD)/python $(PYTHON) examples/mm_all_reduce_base.py

# The release suite, then again under ASan + UBSan, the threaded tests under
# TSan, the Debian packages, and the fuzzer for a minute.
test: test-release test-asan test-tsan test-deb test-fuzz

# ctest runs the Python tests too (python.test_*, pytest under $(PYTHON)).
test-release: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# The whole suite again under AddressSanitizer + UndefinedBehaviorSanitizer,
# but for mpi.cluster: the emulated hosts' system test runs alone (serial)
# and took 77 s of the CI's 40 minutes under ASan. It runs in the release
# suite; the transports it drives run under ASan in their own tests, the
# hierarchical communicator over them in the release suite only.
ASAN_SKIP    := ^mpi\.cluster$$
test-asan: deps
	@cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$(SAN_FLAGS)" \
	  -DTPFUSE_SANITIZE=address,undefined $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && $(SAN_ENV) ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j $(JOBS) -E '$(ASAN_SKIP)'

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) $(FUZZ_BUILD) $(DEB_BUILD) $(CCACHE_DIR)

# The Debian packages (cmake/packaging.cmake), built in a tree of their own
# configured for /usr, into $(DEB_BUILD)/*.deb.
deb: deps
	@cmake -S . -B $(DEB_BUILD) -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/usr \
	  -DTPFUSE_BUILD_TESTS=OFF -DTPFUSE_PYTHON=$(PYTHON) $(CCACHE_TREES) $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(DEB_BUILD) -j $(JOBS)
	@rm -f $(DEB_BUILD)/*.deb
	cd $(DEB_BUILD) && cpack -G DEB
	@ls $(DEB_BUILD)/*.deb

# The packages' contents and Depends (dpkg-deb), and their CLI and Python
# package run from an extracted scratch root; nothing is installed.
test-deb: deb
	./tests/package/check_deb.sh $(DEB_BUILD) $(PYTHON)

# Installs the packages for real (apt-get, as root), runs `tpfuse demo` and
# the request's Python example from /, then purges them and checks that
# nothing of theirs is left.
deb-check: deb
	./scripts/deb_check.sh $(DEB_BUILD) $(PYTHON)

# tpfuse bench fused across emulated hosts (network namespaces; root): set
# up, measure, tear down. Writes JSON (and JSON's name with .png, the plot).
bench-cluster: build
	@test -n "$(JSON)" || { echo "usage: make bench-cluster JSON=FILE"; exit 2; }
	./scripts/bench_cluster.sh $(JSON) $(BUILD)

# The PyTorch binding across emulated hosts (root): tpfuse.npu_mm_all_reduce_base
# against torch.matmul + dist.all_reduce (gloo) in torchrun jobs over 2 hosts
# of 1 and 2 ranks, links at 1 and 2.5 Gbit/s, a decode and a prefill shape.
# Writes JSON (and JSON's name with .png, the plot).
bench-cluster-torch: build
	@test -n "$(JSON)" || { echo "usage: make bench-cluster-torch JSON=FILE"; exit 2; }
	PYTHON=$(PYTHON) ./scripts/bench_cluster_torch.sh $(JSON) $(BUILD)

# The tensor-parallel decoder (examples/tp_decoder), tpfuse against torch.matmul
# + dist.all_reduce: prefill and decode, bf16 and int8 weights, 1, 2 and 4
# ranks, in one run; the records in JSON, the table, and JSON's .png.
bench-decoder: build
	@test -n "$(JSON)" || { echo "usage: make bench-decoder JSON=FILE"; exit 2; }
	PYTHONPATH=$(BUILD)/python $(PYTHON) examples/tp_decoder/bench.py --json $(JSON)

# The tests of tpfuse's threads (the communicator, the launcher and its life
# cycle, the pipeline and its helper thread with every operator, faults in
# each operator's call, the operator, concurrency and isolation) again under
# ThreadSanitizer. Only those binaries are built; ctest skips the others
# (their placeholders end in _NOT_BUILT). Three GEMM threads per rank, so
# that the thread pool's workers run too. Nothing is suppressed: oneDNN's
# OpenMP (uninstrumented, so a source of false reports) is held to the
# calling thread by the oneDNN engine and never starts a team. A report ends
# its process at once (halt_on_error) with exit code 66, which fails the
# test, from inside a rank too.
TSAN_TESTS   := comm comm_lifecycle message_transport launcher faults_lifecycle faults_family pipeline planner operator agreement concurrency isolation shm_wait
# Skipped as well: a memory-bandwidth test, the 8-rank operator cases (the
# threads are those of the 3- and 4-rank cases; they took a fifth of the run
# under TSan), and the MPI tests (Open MPI's library is not instrumented).
TSAN_SKIP    := _NOT_BUILT$$|LargeOutputsWrittenAroundTheCaches|EveryMode.*_ranks8|^mpi\.

test-tsan: deps
	@cmake -S . -B $(TSAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$(SAN_FLAGS)" -DTPFUSE_SANITIZE=thread -DTPFUSE_BUILD_CLI=OFF -DTPFUSE_BUILD_PYTHON=OFF $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(TSAN_BUILD) -j $(JOBS) --target $(foreach t,$(TSAN_TESTS),tpfuse_$(t)_test)
	cd $(TSAN_BUILD) && $(SAN_ENV) TPFUSE_NUM_THREADS=3 TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" ctest --output-on-failure -j $(JOBS) -E '$(TSAN_SKIP)'

# libFuzzer on the operators' argument validation (tests/fuzz): built with
# clang under ASan + UBSan in a tree of its own, then run for FUZZ_SECONDS
# from a copy of the committed corpus; a crash, a sanitizer report or a
# broken check fails. clang's OpenMP is pointed at GCC's libgomp, the runtime
# Debian's oneDNN uses, so that one runtime serves the process.
FUZZ_CXX     ?= clang++-14
FUZZ_SECONDS ?= 60

test-fuzz: deps
	@cmake -S . -B $(FUZZ_BUILD) -DCMAKE_CXX_COMPILER=$(FUZZ_CXX) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only -DNDEBUG" \
	  -DTPFUSE_SANITIZE=address,undefined,fuzzer-no-link -DTPFUSE_FUZZ=ON \
	  -DTPFUSE_BUILD_TESTS=OFF -DTPFUSE_BUILD_CLI=OFF -DTPFUSE_BUILD_PYTHON=OFF \
	  -DOpenMP_CXX_FLAGS=-fopenmp=libgomp -DOpenMP_CXX_LIB_NAMES=gomp \
	  -DOpenMP_gomp_LIBRARY=$$($(FUZZ_CXX) -print-file-name=libgomp.so) $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(FUZZ_BUILD) -j $(JOBS) --target tpfuse_validate_fuzz
	@rm -rf $(FUZZ_BUILD)/corpus && cp -r tests/fuzz/corpus $(FUZZ_BUILD)/corpus
	OMP_NUM_THREADS=1 UBSAN_OPTIONS=print_stacktrace=1 $(FUZZ_BUILD)/tests/fuzz/tpfuse_validate_fuzz \
	  -max_total_time=$(FUZZ_SECONDS) -max_len=160 -timeout=60 -verbosity=0 -print_funcs=0 -print_final_stats=1 \
	  -artifact_prefix=$(FUZZ_BUILD)/ $(FUZZ_BUILD)/corpus
