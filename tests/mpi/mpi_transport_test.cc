// The MPI transport, run under `mpirun -np 2` and `-np 3` on one host: its
// all-reduce gives the shm transport's bytes (both run on the same inputs in
// the same job), pipelined buffers and a helper thread, all_gather, the
// reduce-scatter and the tensor all-gather, and its failures (a rank that
// never arrives, abort) within the deadline, and on the hierarchical
// transport its steps in the timeline. Then the four operators on it:
// the shm transport's bytes, and the relations between them that the
// contract pins (on the hierarchical transport too, tests/mpi/cluster_test.sh).
#include <gtest/gtest.h>
#include <mpi.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <mutex>
#include <numeric>
#include <random>
#include <string_view>
#include <thread>
#include <vector>

#include "../family_cases.h"
#include "comm/shm_reduce_kernels.h"
#include "core/trace.h"
#include "tpfuse/comm/mpi.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/testing/golden.h"

namespace tpfuse::comm {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

std::shared_ptr<Communicator>& world() {
  static std::shared_ptr<Communicator> comm;
  return comm;
}

// Rank r's contribution: random values, with a NaN, infinities and values
// that cancel, so that the order of the additions shows in the bits.
std::vector<std::byte> contribution(DType dtype, std::size_t count, int rank, std::uint64_t seed) {
  std::mt19937_64 random(seed * 1000 + static_cast<std::uint64_t>(rank));
  std::uniform_real_distribution<float> value(-4.0f, 4.0f);
  std::vector<std::byte> bytes(count * dtype_size(dtype));
  for (std::size_t i = 0; i < count; ++i) {
    float v = value(random) * (i % 7 == 0 ? 65504.0f / 4 : 1.0f);
    if (i == 3 && rank == 1) v = std::numeric_limits<float>::quiet_NaN();
    if (i == 5) v = rank % 2 == 0 ? std::numeric_limits<float>::infinity() : 1.0f;
    if (dtype == DType::f32) {
      std::memcpy(&bytes[i * 4], &v, 4);
    } else {
      const std::uint16_t bits = dtype == DType::f16 ? f32_to_f16(v).bits : f32_to_bf16(v).bits;
      std::memcpy(&bytes[i * 2], &bits, 2);
    }
  }
  return bytes;
}

// The rank-order sum of every rank's contribution, computed here.
std::vector<std::byte> expected_sum(DType dtype, std::size_t count, int size, std::uint64_t seed) {
  std::vector<std::vector<std::byte>> all;
  std::vector<const std::byte*> sources;
  for (int r = 0; r < size; ++r) all.push_back(contribution(dtype, count, r, seed));
  for (const auto& c : all) sources.push_back(c.data());
  std::vector<std::byte> out(count * dtype_size(dtype));
  shm::sum_in_rank_order_portable(dtype, sources, count, out.data());
  return out;
}

// A shm group of the same ranks (they share this host), through a store
// directory that rank 0 makes and the others learn from MPI.
std::shared_ptr<Communicator> shm_group() {
  Communicator& comm = *world();
  std::string dir;
  if (comm.rank() == 0) {
    char path[] = "/tmp/tpfuse-mpi-test-XXXXXX";
    if (mkdtemp(path) == nullptr) throw_system_error("mkdtemp", errno);
    dir = path;
  }
  dir = comm.all_gather(dir)[0];
  FileStore store(dir);
  auto shm = create_shm_communicator(store, comm.rank(), comm.size());
  comm.barrier();
  if (comm.rank() == 0) std::filesystem::remove_all(dir);
  return shm;
}

TEST(MpiTransport, AllReduceGivesTheShmTransportsBytes) {
  Communicator& comm = *world();
  auto shm = shm_group();
  std::uint64_t seed = 1;
  for (DType dtype : {DType::f16, DType::bf16, DType::f32}) {
    for (std::size_t count : {std::size_t{1}, std::size_t{2}, std::size_t{7}, std::size_t{4099},
                              std::size_t{300001}}) {
      for (bool in_place : {false, true}) {
        SCOPED_TRACE(cat(dtype_name(dtype), " count ", count, in_place ? " in place" : ""));
        ++seed;
        const auto mine = contribution(dtype, count, comm.rank(), seed);
        std::vector<std::byte> over_mpi = mine, over_shm = mine;
        std::vector<std::byte> out_mpi(mine.size()), out_shm(mine.size());
        comm.all_reduce(over_mpi.data(), in_place ? over_mpi.data() : out_mpi.data(), count, dtype);
        shm->all_reduce(over_shm.data(), in_place ? over_shm.data() : out_shm.data(), count, dtype);
        const auto& got_mpi = in_place ? over_mpi : out_mpi;
        const auto& got_shm = in_place ? over_shm : out_shm;
        EXPECT_EQ(got_mpi, got_shm);
        EXPECT_EQ(got_mpi, expected_sum(dtype, count, comm.size(), seed));
        if (!in_place) EXPECT_EQ(over_mpi, mine) << "the input was modified";
      }
    }
  }
}

TEST(MpiTransport, PipelinedBuffersReduceInOrderWhileOthersAreFilled) {
  Communicator& comm = *world();
  const DType dtype = DType::bf16;
  const std::size_t count = 50000;
  const int tiles = 3 * comm.max_reduces_in_flight() + 1;
  std::vector<std::vector<std::byte>> outputs(tiles, std::vector<std::byte>(count * 2));
  std::vector<std::unique_ptr<Work>> works;
  for (int t = 0; t < tiles; ++t) {
    ReduceBuffer buffer = comm.acquire_reduce_buffer(count, dtype);
    const auto mine = contribution(dtype, count, comm.rank(), 100 + t);
    std::memcpy(buffer.data, mine.data(), mine.size());
    works.push_back(comm.all_reduce_start(std::move(buffer), outputs[t].data()));
    works.front()->test();
  }
  for (auto& work : works) work->wait();
  for (int t = 0; t < tiles; ++t) {
    EXPECT_EQ(outputs[t], expected_sum(dtype, count, comm.size(), 100 + t)) << "tile " << t;
  }
}

TEST(MpiTransport, AHelperThreadMayAdvanceWhileTheCallerStartsMore) {
  Communicator& comm = *world();
  const DType dtype = DType::f16;
  const std::size_t count = 20000;
  const int tiles = 12;
  std::vector<std::vector<std::byte>> outputs(tiles, std::vector<std::byte>(count * 2));
  std::mutex mutex;
  std::deque<std::unique_ptr<Work>> queue;
  bool done = false;
  std::thread helper([&] {
    for (;;) {
      std::unique_ptr<Work> work;
      {
        std::lock_guard lock(mutex);
        if (queue.empty() && done) return;
        if (!queue.empty()) {
          work = std::move(queue.front());
          queue.pop_front();
        }
      }
      if (work) work->wait();
    }
  });
  for (int t = 0; t < tiles; ++t) {
    ReduceBuffer buffer = comm.acquire_reduce_buffer(count, dtype);
    const auto mine = contribution(dtype, count, comm.rank(), 200 + t);
    std::memcpy(buffer.data, mine.data(), mine.size());
    auto work = comm.all_reduce_start(std::move(buffer), outputs[t].data());
    std::lock_guard lock(mutex);
    queue.push_back(std::move(work));
  }
  {
    std::lock_guard lock(mutex);
    done = true;
  }
  helper.join();
  for (int t = 0; t < tiles; ++t) {
    EXPECT_EQ(outputs[t], expected_sum(dtype, count, comm.size(), 200 + t)) << "tile " << t;
  }
}

TEST(MpiTransport, AllGatherReturnsEveryContributionInRankOrder) {
  Communicator& comm = *world();
  const auto mine = std::string(static_cast<std::size_t>(comm.rank()) * 3, 'a' + comm.rank());
  const auto gathered = comm.all_gather(mine);
  ASSERT_EQ(gathered.size(), static_cast<std::size_t>(comm.size()));
  for (int r = 0; r < comm.size(); ++r) {
    EXPECT_EQ(gathered[r], std::string(static_cast<std::size_t>(r) * 3, 'a' + r));
  }
  EXPECT_THROW(comm.all_gather(std::string(comm.max_gather_bytes() + 1, 'x')), InvalidArgument);
  EXPECT_TRUE(comm.name().starts_with("tpfuse-mpi-"));
  EXPECT_EQ(comm.all_gather(comm.name())[0], comm.name());
  EXPECT_EQ(comm.ranks_on_host(), comm.size());
}

// The last rank never joins an all-reduce (or a tensor all-gather): the
// others fail at the deadline naming it, and their report makes the last
// rank fail too, before its own deadline.
TEST(MpiTransport, ARankThatNeverArrivesIsNamedAtTheDeadline) {
  for (const bool gather : {false, true}) {
    SCOPED_TRACE(gather ? "all-gather" : "all-reduce");
    const int last = world()->size() - 1;
    auto comm = create_mpi_communicator({.timeout = 2000ms});
    world()->barrier();  // every rank has finished setting up the communicator
    const auto start = Clock::now();
    if (comm->rank() != last) {
      std::vector<float> values(static_cast<std::size_t>(comm->size()), 1.0f);
      const std::vector<std::size_t> counts(values.size(), 1);
      try {
        if (gather) {
          comm->all_gather_start(&values[comm->rank()], values.data(), counts, DType::f32)
              ->wait(last);
        } else {
          comm->all_reduce(values.data(), values.data(), 1, DType::f32);
        }
        ADD_FAILURE() << "the collective completed without rank " << last;
      } catch (const TimeoutError& error) {
        EXPECT_EQ(error.ranks(), std::vector<int>{last}) << error.what();
        EXPECT_NE(std::string(error.what()).find(cat("ranks ", last)), std::string::npos)
            << error.what();
      }
      // Not before the deadline; the error may come from a peer whose own
      // deadline came a moment earlier (it left the barrier first): allow that skew.
      EXPECT_GE(Clock::now() - start, 1800ms);
      EXPECT_LT(Clock::now() - start, 6000ms);
      EXPECT_THROW(comm->all_gather("after"), TimeoutError);
    } else {
      std::this_thread::sleep_for(1000ms);
      try {
        comm->all_gather("late");
        ADD_FAILURE() << "the all-gather completed while the others were in another collective";
      } catch (const TimeoutError& error) {
        EXPECT_EQ(error.ranks(), std::vector<int>{last}) << error.what();
        EXPECT_LT(Clock::now() - start, 2900ms)
            << "it waited for its own deadline: " << error.what();
      }
    }
    world()->barrier();
  }
}

TEST(MpiTransport, AbortReachesEveryRank) {
  auto comm = create_mpi_communicator({.timeout = 10000ms});
  world()->barrier();  // or rank 0's abort may reach a rank still in setup
  const auto start = Clock::now();
  if (comm->rank() == 0) {
    comm->abort("stopping on purpose");
    EXPECT_THROW(comm->all_gather("x"), AbortedError);
  } else {
    try {
      comm->all_gather("x");
      ADD_FAILURE() << "the all-gather completed after rank 0 aborted";
    } catch (const AbortedError& error) {
      EXPECT_EQ(error.ranks(), std::vector<int>{0});
      EXPECT_NE(std::string(error.what()).find("stopping on purpose"), std::string::npos)
          << error.what();
    }
    EXPECT_LT(Clock::now() - start, 5000ms);
  }
  world()->barrier();
}

// Uneven shards (rank 1's empty), as the family's operators cut rows.
std::vector<std::size_t> uneven_counts(int ranks, std::size_t unit) {
  std::vector<std::size_t> counts;
  for (int r = 0; r < ranks; ++r) counts.push_back(r == 1 ? 0 : unit * (r + 1) + 3 * r + 1);
  return counts;
}

// Each shard is the matching rows of this transport's all-reduce, bitwise,
// and (flat, one host) of the rank-order sum computed here. Run across
// emulated hosts too (tests/mpi/cluster_test.sh), where the transport is
// hierarchical and sums each host's ranks first.
TEST(MpiTransport, ReduceScatterShardsAreTheAllReducesRows) {
  Communicator& comm = *world();
  std::uint64_t seed = 100;
  for (DType dtype : {DType::f16, DType::bf16, DType::f32}) {
    for (std::size_t unit : {std::size_t{1}, std::size_t{30}, std::size_t{70000}}) {
      SCOPED_TRACE(cat(dtype_name(dtype), " unit ", unit));
      const auto counts = uneven_counts(comm.size(), unit);
      const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
      const std::size_t before =
          std::accumulate(counts.begin(), counts.begin() + comm.rank(), std::size_t{0});
      const std::size_t element = dtype_size(dtype), mine = counts[comm.rank()];
      ++seed;
      const auto input = contribution(dtype, total, comm.rank(), seed);
      std::vector<std::byte> all(input.size()), shard(mine * element);
      comm.all_reduce(input.data(), all.data(), total, dtype);
      comm.reduce_scatter_start(input.data(), shard.data(), counts, dtype)->wait();
      EXPECT_TRUE(std::equal(shard.begin(), shard.end(), all.begin() + before * element));
      if (comm.ranks_on_host() == comm.size()) {  // flat: every rank in rank order
        const auto expected = expected_sum(dtype, total, comm.size(), seed);
        EXPECT_TRUE(std::equal(shard.begin(), shard.end(), expected.begin() + before * element));
      }
    }
  }
}

TEST(MpiTransport, AllGatherPutsEveryBlockInRankOrder) {
  Communicator& comm = *world();
  for (DType dtype : {DType::i8, DType::bf16}) {
    for (std::size_t unit : {std::size_t{1}, std::size_t{50000}}) {
      for (bool in_place : {false, true}) {
        SCOPED_TRACE(cat(dtype_name(dtype), " unit ", unit, in_place ? " in place" : ""));
        const auto counts = uneven_counts(comm.size(), unit);
        const std::size_t element = dtype_size(dtype);
        std::vector<std::size_t> offsets{0};
        for (std::size_t count : counts) offsets.push_back(offsets.back() + count * element);
        // Any bytes: rank r's block is its f16 contribution's bytes, cut.
        const auto block = [&](int r) {
          auto bytes = contribution(DType::f16, counts[r] * element, r, 7);
          bytes.resize(counts[r] * element);
          return bytes;
        };
        const auto mine = block(comm.rank());
        std::vector<std::byte> out(offsets.back(), std::byte{0x5a});
        std::byte* place = out.data() + offsets[comm.rank()];
        if (in_place) std::copy(mine.begin(), mine.end(), place);
        auto work =
            comm.all_gather_start(in_place ? place : mine.data(), out.data(), counts, dtype);
        for (int step = 1; step <= comm.size(); ++step)
          work->wait((comm.rank() + step) % comm.size());
        work->wait();  // this rank's own sends too: then `mine` may go
        for (int r = 0; r < comm.size(); ++r) {
          const auto theirs = block(r);
          EXPECT_TRUE(std::equal(theirs.begin(), theirs.end(), out.begin() + offsets[r]))
              << "rank " << r << "'s block";
        }
      }
    }
  }
}

// On the hierarchical transport, an all-reduce's steps are on the timeline,
// each for its whole count and one after another: the host's sum, the rail
// between hosts, the gather of the slices in the host.
TEST(MpiTransport, HierarchicalStepsShowInTheTimeline) {
  Communicator& comm = *world();
  if (comm.transport() != "shm+mpi") GTEST_SKIP() << "not hierarchical: " << comm.transport();
  const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                    cat("tpfuse-mpi-trace-", comm.rank(), "-", ::getpid());
  std::filesystem::remove_all(dir);
  constexpr std::size_t kCount = 4099;
  const auto mine = contribution(DType::bf16, kCount, comm.rank(), 99);
  std::vector<std::byte> out(mine.size());
  trace::start(dir.string());
  comm.all_reduce(mine.data(), out.data(), kCount, DType::bf16);
  trace::stop();
  std::string text;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    std::ifstream in(entry.path());
    text.append(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  std::filesystem::remove_all(dir);
  std::size_t previous = 0;
  for (const char* step : {"\"host sum\"", "\"rail\"", "\"host gather\""}) {
    SCOPED_TRACE(step);
    const std::size_t at = text.find(step);
    ASSERT_NE(at, std::string::npos) << text;
    EXPECT_GE(at, previous) << "out of order: " << text;
    EXPECT_NE(text.find(cat("\"elements\":", kCount), at), std::string::npos) << text;
    previous = at;
  }
}

TEST(MpiTransport, BadArgumentsAreRejectedBeforeAnyMessage) {
  Communicator& comm = *world();
  float value = 0;
  EXPECT_THROW(comm.all_reduce(&value, &value, 1, DType::i8), InvalidArgument);
  EXPECT_THROW(comm.all_reduce(nullptr, &value, 1, DType::f32), InvalidArgument);
  EXPECT_THROW(create_mpi_communicator({.timeout = 0ms}), InvalidArgument);
  const std::vector<std::size_t> short_counts{1};
  EXPECT_THROW(comm.reduce_scatter_start(&value, &value, short_counts, DType::f32),
               InvalidArgument);
  EXPECT_THROW(comm.all_gather_start(&value, nullptr, short_counts, DType::f32), InvalidArgument);
  comm.barrier();
}

// ---- the operators over MPI ----

// Each operator on small shapes of several tiles (across the all-gather's
// blocks and the reduce-scatter's shards; m a multiple of 2, 3 and 4),
// and add-RMSNorm of one tile (one round).
std::vector<test::FamilyCase> family_cases() {
  using test::FamilyOp;
  return {
      {.op = FamilyOp::mm_all_reduce_base, .m = 36, .k = 64, .n = 40, .bias = true, .comm_turn = 3},
      {.op = FamilyOp::all_gather_base_mm,
       .dtype = DType::f16,
       .m = 10,
       .k = 48,
       .n = 24,
       .bias = true,
       .comm_turn = 4,
       .seed = 2},
      {.op = FamilyOp::mm_reduce_scatter_base,
       .m = 36,
       .k = 64,
       .n = 24,
       .bias = true,
       .comm_turn = 5,
       .seed = 3},
      {.op = FamilyOp::add_rms_norm,
       .m = 36,
       .k = 64,
       .n = 40,
       .batch = 3,
       .bias = true,
       .comm_turn = 3,
       .seed = 4},
      {.op = FamilyOp::add_rms_norm,
       .dtype = DType::f16,
       .m = 2,
       .k = 64,
       .n = 256,
       .batch = 2,
       .comm_turn = 1,
       .seed = 5},
  };
}

std::string case_label(const test::FamilyCase& c) {
  return cat(test::family_op_name(c.op), " m=", c.m, " comm_turn=", c.comm_turn);
}

// `comm` registered under its name for as long as this lives.
class Registered {
 public:
  explicit Registered(std::shared_ptr<Communicator> comm)
      : name_(register_communicator(std::move(comm))) {}
  ~Registered() { unregister_communicator(name_); }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
};

// The same calls over MPI and over shm, on the same inputs: the same bytes
// (twice each, the second a call the ranks agreed on before). Where hosts
// hold several ranks the MPI transport is hierarchical, whose sums are in
// another order (hierarchical.cc): not compared.
TEST(MpiFamily, EveryOperatorGivesTheShmTransportsBytes) {
  Communicator& comm = *world();
  if (comm.ranks_on_host() != comm.size()) GTEST_SKIP() << "hierarchical: sums in another order";
  const Registered over_mpi(world()), over_shm(shm_group());
  for (const test::FamilyCase& c : family_cases()) {
    SCOPED_TRACE(case_label(c));
    const test::FamilyInputs in = test::family_inputs(c, comm.rank());
    for (int call = 0; call < 2; ++call) {
      const auto mpi = test::bytes_of(test::run_family_case(c, in, over_mpi.name(), comm.size()));
      const auto shm = test::bytes_of(test::run_family_case(c, in, over_shm.name(), comm.size()));
      EXPECT_FALSE(mpi.empty());
      EXPECT_TRUE(mpi == shm) << "call " << call << ": the bytes differ";
    }
  }
}

// On any layout (across emulated hosts too): the all-gather's gathered rows
// are every rank's x1 and its product the golden model's; the
// reduce-scatter's rows and add-RMSNorm's outputs are what mm_all_reduce_base
// on this communicator pins, bitwise; and every rank got the same add-RMSNorm bytes.
TEST(MpiFamily, OperatorsGiveWhatMmAllReduceBasePinsOnThisTransport) {
  Communicator& comm = *world();
  const Registered over_mpi(world());
  for (const test::FamilyCase& c : family_cases()) {
    SCOPED_TRACE(case_label(c));
    const test::FamilyInputs in = test::family_inputs(c, comm.rank());
    const auto out = test::run_family_case(c, in, over_mpi.name(), comm.size());
    test::FamilyCase base = c;
    base.op = test::FamilyOp::mm_all_reduce_base;
    switch (c.op) {
      case test::FamilyOp::all_gather_base_mm: {
        EXPECT_TRUE(test::bytes_of(out[1]) == test::gathered_x1(c, comm.size()));
        testing::RankArgs args{out[1].view(), in.x2.view(), {}};
        args.options.bias = in.bias.view();
        const auto cmp = testing::compare(out[0], testing::golden_mm_all_reduce({&args, 1}));
        EXPECT_TRUE(cmp.ok()) << cmp.mismatches << " elements beyond the golden bound";
        break;
      }
      case test::FamilyOp::mm_reduce_scatter_base: {
        const auto reduced = test::run_family_case(base, in, over_mpi.name(), comm.size());
        EXPECT_TRUE(test::bytes_of(out) ==
                    test::reduce_scatter_rows(reduced[0], comm.rank(), comm.size()));
        break;
      }
      case test::FamilyOp::add_rms_norm: {
        const auto reduced = test::run_family_case(base, in, over_mpi.name(), comm.size());
        const auto bytes = test::bytes_of(out);
        EXPECT_TRUE(bytes == test::add_rms_norm_of(c, in, reduced[0]));
        const std::string_view mine(reinterpret_cast<const char*>(bytes.data()), bytes.size());
        const auto hashes = comm.all_gather(cat(std::hash<std::string_view>()(mine)));
        for (int r = 0; r < comm.size(); ++r) EXPECT_EQ(hashes[r], hashes[0]) << "rank " << r;
        break;
      }
      case test::FamilyOp::mm_all_reduce_base:
        break;
    }
  }
}

}  // namespace
}  // namespace tpfuse::comm

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  tpfuse::comm::world() =
      tpfuse::comm::create_mpi_communicator({.timeout = std::chrono::milliseconds{30000}});
  const int result = RUN_ALL_TESTS();
  // Every rank agrees on the verdict, so that mpirun's exit status is one.
  int failed = result != 0, any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  tpfuse::comm::world().reset();
  return any_failed;
}
