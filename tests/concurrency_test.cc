// Threads and communicators: two communicators driven at the same time by two
// threads of each rank work independently (all-reduces and the operator);
// calls that overlap on one communicator are refused on every rank, never
// paired wrongly; calls handed from one thread to another in turn are fine.
// Built under ThreadSanitizer too (make test-tsan).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "ops/test_hooks.h"
#include "rank_harness.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/testing/golden.h"
#include "tpfuse/testing/inputs.h"

namespace tpfuse {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::expect_rank;
using testing::CaseSpec;

// Runs the operator on `hcom` for `spec` and checks the result against the
// golden model of every rank's inputs.
void run_operator_and_check(const CaseSpec& spec, int rank, int size, const std::string& hcom) {
  const auto inputs = testing::make_rank_inputs(spec, rank);
  const Tensor out = mm_all_reduce_base(inputs.args.x1, inputs.args.x2, hcom, inputs.args.options);
  std::vector<testing::RankInputs> all;
  std::vector<testing::RankArgs> args;
  for (int r = 0; r < size; ++r) all.push_back(testing::make_rank_inputs(spec, r));
  for (const auto& in : all) args.push_back(in.args);
  const auto cmp = testing::compare(out, testing::golden_mm_all_reduce(args));
  expect_rank(cmp.ok(), "rank ", rank, " on ", hcom, ": ", cmp.mismatches,
              " elements beyond the bound (worst |err| ", cmp.max_abs_error, ")");
}

// Thread `which` of a rank: its own communicator over its own PrefixStore of
// the job's store, then all-reduces whose exact sums depend on the thread,
// the rank and the call, then operator calls, all while the other thread
// does the same on its communicator.
void drive_own_communicator(int which, comm::RankContext& ctx) {
  const char* dir = std::getenv("TPFUSE_STORE_DIR");
  expect_rank(dir != nullptr, "TPFUSE_STORE_DIR is not set in the rank");
  comm::FileStore base(dir);
  comm::PrefixStore store(which == 0 ? "thread-a-" : "thread-b-", base);
  comm::ShmOptions options;
  options.timeout = 30s;
  options.slot_bytes = 4096;  // so that the larger all-reduces go in chunks
  const auto comm = comm::create_shm_communicator(store, ctx.rank, ctx.size, options);
  expect_rank(comm->name() != ctx.comm->name(), "thread ", which, " got the job's communicator");

  for (int call = 0; call < 40; ++call) {
    // Small integers: every sum is exact in f32, whatever the chunking.
    const std::size_t count = 1 + static_cast<std::size_t>(call) * 97;
    std::vector<float> data(count);
    for (std::size_t i = 0; i < count; ++i) {
      data[i] = static_cast<float>((which + 1) * 1000 + ctx.rank * 10 + call + (i % 7));
    }
    comm->all_reduce(data.data(), data.data(), count, DType::f32);
    for (std::size_t i = 0; i < count; ++i) {
      float expected = 0.0f;
      for (int r = 0; r < ctx.size; ++r) {
        expected += static_cast<float>((which + 1) * 1000 + r * 10 + call + (i % 7));
      }
      expect_rank(data[i] == expected, "thread ", which, " rank ", ctx.rank, " call ", call,
                  " element ", i, ": ", data[i], " instead of ", expected);
    }
  }

  const std::string hcom = comm::register_communicator(comm);
  CaseSpec spec;
  spec.m = 24;
  spec.k = 40;
  spec.n = 16;
  spec.bias = which == 1;
  spec.comm_turn = 3;
  spec.seed = 11 + static_cast<std::uint64_t>(which);
  for (int call = 0; call < 3; ++call) run_operator_and_check(spec, ctx.rank, ctx.size, hcom);
  comm::unregister_communicator(hcom);
}

TEST(Concurrency, TwoCommunicatorsDrivenFromTwoThreadsAtOnce) {
  const auto result = test::run_ranks(3, [](comm::RankContext& ctx) {
    std::exception_ptr errors[2];
    std::vector<std::thread> threads;
    for (int which = 0; which < 2; ++which) {
      threads.emplace_back([&, which] {
        try {
          drive_own_communicator(which, ctx);
        } catch (...) {
          errors[which] = std::current_exception();
        }
      });
    }
    for (auto& thread : threads) thread.join();
    for (const auto& error : errors) {
      if (error) std::rethrow_exception(error);
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
  EXPECT_TRUE(test::segments_gone(result));
}

// Every rank's second thread calls into the communicator while the first is
// inside an operator call (held after its first tile; a barrier on a side
// communicator makes sure every rank's first call is that far). Rank 0's
// second thread calls the operator, the others' call all_gather directly.
// Each is refused with ConcurrentCallError, and the first calls, on every
// rank, fail with AbortedError instead of completing paired with the wrong
// call.
TEST(Concurrency, OverlappingCallsOnOneCommunicatorAreRefusedOnEveryRank) {
  const auto result = test::run_ranks(
      2,
      [](comm::RankContext& ctx) {
        comm::FileStore base(std::getenv("TPFUSE_STORE_DIR"));
        comm::PrefixStore side_store("side-", base);
        comm::ShmOptions side_options;
        side_options.timeout = 20s;
        const auto side =
            comm::create_shm_communicator(side_store, ctx.rank, ctx.size, side_options);
        std::atomic<bool> inside{false};
        std::atomic<bool> refused{false};
        test_hooks::set_after_tile_computed([&](std::int64_t tile) {
          if (tile != 0) return;
          inside.store(true);
          const auto until = Clock::now() + 10s;
          while (!refused.load() && Clock::now() < until) std::this_thread::sleep_for(1ms);
        });
        CaseSpec spec;
        spec.m = 32;
        spec.comm_turn = 4;
        const auto inputs = testing::make_rank_inputs(spec, ctx.rank);
        const std::string hcom = ctx.comm->name();
        std::string first_error;
        const auto start = Clock::now();
        std::thread first([&] {
          try {
            mm_all_reduce_base(inputs.args.x1, inputs.args.x2, hcom, inputs.args.options);
            first_error = "none: the first call completed";
          } catch (const AbortedError& error) {
            first_error = error.what();
          } catch (const std::exception& error) {
            first_error = std::string("wrong type: ") + error.what();
          }
        });
        const auto until = Clock::now() + 10s;
        while (!inside.load() && Clock::now() < until) std::this_thread::sleep_for(1ms);
        const bool was_inside = inside.load();
        side->barrier();
        std::string second_error = "none: the second call was accepted";
        try {
          if (ctx.rank == 0) {
            mm_all_reduce_base(inputs.args.x1, inputs.args.x2, hcom, inputs.args.options);
          } else {
            ctx.comm->all_gather("overlapping");
          }
        } catch (const ConcurrentCallError& error) {
          second_error = error.what();
        }
        refused.store(true);
        first.join();
        test_hooks::set_after_tile_computed(nullptr);
        const auto elapsed = Clock::now() - start;

        expect_rank(was_inside, "rank ", ctx.rank, "'s first call never reached its first tile");
        const char* operation = ctx.rank == 0 ? "mm_all_reduce_base on" : "all_gather on";
        expect_rank(second_error.find(operation) != std::string::npos &&
                        second_error.find("overlapped a call of another thread") !=
                            std::string::npos &&
                        second_error.find("use one communicator per thread") != std::string::npos,
                    "rank ", ctx.rank, " second call: ", second_error);
        // Whichever rank's refusal landed first aborted the group for both.
        expect_rank(first_error.find("overlapped a call of another thread") != std::string::npos,
                    "rank ", ctx.rank, " first call: ", first_error);
        expect_rank(elapsed < 25s, "rank ", ctx.rank, " took until the deadline");
        return 0;
      },
      30s);
  EXPECT_TRUE(result.ok()) << result.describe_failures();
  EXPECT_TRUE(test::segments_gone(result));
}

// Calls from different threads in turn (each ends before the next starts,
// in the same order on every rank) are not overlapping and all succeed.
TEST(Concurrency, CallsHandedFromThreadToThreadInTurnSucceed) {
  const auto result = test::run_ranks(2, [](comm::RankContext& ctx) {
    CaseSpec spec;
    spec.m = 16;
    spec.comm_turn = 2;
    for (int turn = 0; turn < 4; ++turn) {
      std::exception_ptr error;
      std::thread caller([&] {
        try {
          run_operator_and_check(spec, ctx.rank, ctx.size, ctx.comm->name());
          float value = static_cast<float>(ctx.rank + turn);
          ctx.comm->all_reduce(&value, &value, 1, DType::f32);
          expect_rank(value == static_cast<float>(1 + 2 * turn), "turn ", turn, ": ", value);
        } catch (...) {
          error = std::current_exception();
        }
      });
      caller.join();
      if (error) std::rethrow_exception(error);
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// The guard itself, on a communicator that records aborts: nested claims on
// one thread pass; a claim from another thread aborts and throws, and leaves
// the holder's claim in place.
class RecordingCommunicator final : public comm::Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  std::string transport() const override { return "test"; }
  std::chrono::milliseconds timeout() const override { return 1s; }
  std::size_t max_gather_bytes() const override { return 0; }
  void abort(std::string_view reason) override { aborts.emplace_back(reason); }

  std::vector<std::string> aborts;

 protected:
  std::unique_ptr<comm::Work> do_all_reduce_start(const void*, void*, std::size_t, DType) override {
    return nullptr;
  }
  std::vector<std::string> do_all_gather(std::string_view mine) override {
    return {std::string(mine)};
  }

 private:
  std::string name_ = "recording";
};

TEST(ExclusiveUse, NestedOnOneThreadRefusedFromAnother) {
  RecordingCommunicator comm;
  {
    const comm::ExclusiveUse outer(comm, "outer");
    const comm::ExclusiveUse nested(comm, "nested");
    std::string error;
    std::thread other([&] {
      try {
        const comm::ExclusiveUse intruding(comm, "intruding call");
      } catch (const ConcurrentCallError& e) {
        error = e.what();
      }
    });
    other.join();
    EXPECT_NE(error.find("intruding call on communicator \"recording\" (rank 0) overlapped"),
              std::string::npos)
        << error;
    ASSERT_EQ(comm.aborts.size(), 1u);
    EXPECT_NE(comm.aborts[0].find("use one communicator per thread"), std::string::npos);
  }
  // Released: another thread may claim it now.
  std::thread later([&] { const comm::ExclusiveUse claim(comm, "later"); });
  later.join();
  EXPECT_EQ(comm.aborts.size(), 1u);
}

}  // namespace
}  // namespace tpfuse
