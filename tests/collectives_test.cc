// The reduce-scatter and the tensor all-gather on the shm transport and
// through the Communicator's default hooks: the reduce-scatter's shards are
// the all-reduce's rows, bitwise; the all-gather's blocks land in rank order,
// each as soon as its rank has sent it; bad arguments are named before any
// rank waits; a rank that never comes is named at the deadline, one that
// died as lost.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "fault_report.h"
#include "rank_harness.h"
#include "recording_communicator.h"
#include "tpfuse/comm/launcher.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"

namespace tpfuse::comm {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::expect_rank;

LaunchResult launch(int ranks, const std::function<int(RankContext&)>& body,
                    std::chrono::milliseconds timeout = 30s, std::size_t slot_bytes = 256) {
  LaunchOptions options;
  options.ranks = ranks;
  options.shm.timeout = timeout;
  options.shm.slot_bytes = slot_bytes;
  return launch_local(options, body);
}

// Rank r's values: spread over many exponents and both signs, so that the
// order of the additions shows in the bits.
std::vector<std::byte> values_of(DType dtype, int rank, std::size_t count) {
  std::vector<std::byte> bytes(count * dtype_size(dtype));
  for (std::size_t i = 0; i < count; ++i) {
    std::uint64_t h = (static_cast<std::uint64_t>(rank + 1) << 40) + i * 0x9e3779b97f4a7c15ull;
    h = (h ^ (h >> 29)) * 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    const float value = std::ldexp(1.0f + static_cast<float>(h & 0xffff) * 0x1p-16f,
                                   static_cast<int>((h >> 16) % 24) - 12) *
                        ((h >> 40) & 1 ? -1.0f : 1.0f);
    if (dtype == DType::f32) {
      std::memcpy(&bytes[i * 4], &value, 4);
    } else if (dtype == DType::f16 || dtype == DType::bf16) {
      const std::uint16_t bits =
          dtype == DType::f16 ? f32_to_f16(value).bits : f32_to_bf16(value).bits;
      std::memcpy(&bytes[i * 2], &bits, 2);
    } else {
      for (std::size_t b = 0; b < dtype_size(dtype); ++b) {
        bytes[i * dtype_size(dtype) + b] = static_cast<std::byte>(h >> (8 * b));
      }
    }
  }
  return bytes;
}

// Uneven shards, one of them empty when there are several ranks.
std::vector<std::size_t> uneven_counts(int ranks, std::size_t unit) {
  std::vector<std::size_t> counts;
  for (int r = 0; r < ranks; ++r) counts.push_back(r == 1 ? 0 : unit * (r + 1) + 3 * r + 1);
  return counts;
}

std::size_t offset_of(const std::vector<std::size_t>& counts, int rank) {
  return std::accumulate(counts.begin(), counts.begin() + rank, std::size_t{0});
}

// The reduce-scatter against the all-reduce of the same inputs, on `comm`.
void check_reduce_scatter(Communicator& comm, DType dtype, std::size_t unit) {
  const auto counts = uneven_counts(comm.size(), unit);
  const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
  const std::size_t element = dtype_size(dtype);
  const auto input = values_of(dtype, comm.rank(), total);
  std::vector<std::byte> all(input.size());
  comm.all_reduce(input.data(), all.data(), total, dtype);
  const std::size_t mine = counts[static_cast<std::size_t>(comm.rank())];
  std::vector<std::byte> shard(mine * element + 64, std::byte{0x5a});
  comm.reduce_scatter_start(input.data(), shard.data(), counts, dtype)->wait();
  const std::size_t from = offset_of(counts, comm.rank()) * element;
  expect_rank(std::equal(shard.begin(), shard.begin() + mine * element, all.begin() + from),
              dtype_name(dtype), " x ", total, ": the shard differs from the all-reduce's rows");
  expect_rank(std::all_of(shard.begin() + mine * element, shard.end(),
                          [](std::byte b) { return b == std::byte{0x5a}; }),
              "the reduce-scatter wrote past its shard");
  expect_rank(input == values_of(dtype, comm.rank(), total), "the input was modified");
}

void check_all_gather(Communicator& comm, DType dtype, std::size_t unit, bool in_place) {
  const auto counts = uneven_counts(comm.size(), unit);
  const std::size_t total = std::accumulate(counts.begin(), counts.end(), std::size_t{0});
  const std::size_t element = dtype_size(dtype);
  std::vector<std::byte> out(total * element, std::byte{0x5a});
  const std::size_t place = offset_of(counts, comm.rank()) * element;
  const auto mine = values_of(dtype, comm.rank(), counts[static_cast<std::size_t>(comm.rank())]);
  if (in_place) std::copy(mine.begin(), mine.end(), out.begin() + place);
  auto work =
      comm.all_gather_start(in_place ? out.data() + place : mine.data(), out.data(), counts, dtype);
  for (int r = 0; r < comm.size(); ++r) work->wait(r);
  work->wait();
  for (int r = 0; r < comm.size(); ++r) {
    const auto theirs = values_of(dtype, r, counts[static_cast<std::size_t>(r)]);
    expect_rank(
        std::equal(theirs.begin(), theirs.end(), out.begin() + offset_of(counts, r) * element),
        dtype_name(dtype), in_place ? " in place" : "", ": rank ", r, "'s block differs");
  }
}

TEST(ReduceScatter, ShardsAreTheAllReducesRowsBitwise) {
  for (int ranks : {1, 2, 3, 4}) {
    const auto result = launch(ranks, [](RankContext& ctx) {
      for (DType dtype : {DType::f32, DType::bf16, DType::f16}) {
        for (std::size_t unit : {std::size_t{1}, std::size_t{40}, std::size_t{700}}) {
          check_reduce_scatter(*ctx.comm, dtype, unit);
        }
      }
      return 0;
    });
    EXPECT_TRUE(result.ok()) << ranks << " ranks: " << result.describe_failures();
  }
}

TEST(AllGather, BlocksLandInRankOrderInAnyDtype) {
  for (int ranks : {1, 2, 3, 5}) {
    const auto result = launch(ranks, [](RankContext& ctx) {
      for (DType dtype : {DType::i8, DType::bf16, DType::f32}) {
        for (std::size_t unit : {std::size_t{1}, std::size_t{90}, std::size_t{1000}}) {
          check_all_gather(*ctx.comm, dtype, unit, false);
          check_all_gather(*ctx.comm, dtype, unit, true);
        }
      }
      return 0;
    });
    EXPECT_TRUE(result.ok()) << ranks << " ranks: " << result.describe_failures();
  }
}

// A transport with only an all-reduce and a byte all-gather gets both
// collectives from the Communicator's defaults, with the same results.
TEST(Collectives, TheDefaultHooksGiveTheSameResults) {
  const auto result = launch(3, [](RankContext& ctx) {
    test::RecordingCommunicator forwarding(ctx.comm, "forwarding");
    class Defaults final : public Communicator {
     public:
      explicit Defaults(Communicator& inner) : inner_(inner) {}
      int rank() const override { return inner_.rank(); }
      int size() const override { return inner_.size(); }
      const std::string& name() const override { return inner_.name(); }
      std::string transport() const override { return inner_.transport(); }
      std::chrono::milliseconds timeout() const override { return inner_.timeout(); }
      std::size_t max_gather_bytes() const override { return 100; }  // many rounds
      void abort(std::string_view reason) override { inner_.abort(reason); }

     protected:
      std::unique_ptr<Work> do_all_reduce_start(const void* input, void* output, std::size_t count,
                                                DType dtype) override {
        return inner_.all_reduce_start(input, output, count, dtype);
      }
      using Communicator::do_all_reduce_start;
      std::vector<std::string> do_all_gather(std::string_view mine) override {
        return inner_.all_gather(mine);
      }

     private:
      Communicator& inner_;
    } defaults(forwarding);
    for (DType dtype : {DType::f32, DType::bf16}) {
      check_reduce_scatter(defaults, dtype, 50);
      check_all_gather(defaults, dtype, 50, false);
      check_all_gather(defaults, dtype, 50, true);
    }
    const auto events = forwarding.events();
    expect_rank(std::count(events.begin(), events.end(), test::CommEvent::all_gather) > 3,
                "the default all-gather did not go through the byte all-gather in pieces");
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// Causal: rank 2 sends its block only once rank 0 has seen rank 1's land
// while rank 2's had not. A rank that waited for every block before
// reporting any would never see that, and rank 2 would wait in vain.
TEST(AllGather, EachBlockIsReadyAsSoonAsItsRankSentIt) {
  struct Page {
    std::atomic<bool> seen{false};
  };
  Page& page = test::shared_page<Page>();
  const auto result = launch(
      3,
      [&page](RankContext& ctx) {
        const std::vector<std::size_t> counts(3, 100);
        const auto mine = values_of(DType::f32, ctx.rank, 100);
        std::vector<std::byte> out(300 * 4);
        if (ctx.rank == 2) {
          const auto deadline = Clock::now() + 30s;
          while (!page.seen.load() && Clock::now() < deadline) std::this_thread::sleep_for(1ms);
          expect_rank(page.seen.load(), "rank 0 never saw rank 1's block alone");
        }
        auto work = ctx.comm->all_gather_start(mine.data(), out.data(), counts, DType::f32);
        if (ctx.rank == 0) {
          work->wait(1);
          expect_rank(work->test(0) && work->test(1), "blocks 0 and 1 are not ready");
          for (int poll = 0; poll < 20; ++poll) {
            expect_rank(!work->test(2), "rank 2's block was ready before rank 2 sent it");
          }
          page.seen = true;
        }
        work->wait();
        const auto last = values_of(DType::f32, 2, 100);
        expect_rank(std::equal(last.begin(), last.end(), out.begin() + 200 * 4),
                    "rank 2's block differs");
        return 0;
      },
      30s, 4096);
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

TEST(Collectives, BadArgumentsAreNamedOnEveryRankBeforeAnyWait) {
  const auto result = launch(2, [](RankContext& ctx) {
    Communicator& comm = *ctx.comm;
    std::vector<float> data(64);
    const std::vector<std::size_t> one{8};
    const std::vector<std::size_t> two{8, 8};
    const auto expect_error = [](auto&& call, const std::string& needle) {
      try {
        call();
        expect_rank(false, "no error; expected one saying: ", needle);
      } catch (const InvalidArgument& error) {
        expect_rank(std::string(error.what()).find(needle) != std::string::npos, "expected \"",
                    needle, "\", got: ", error.what());
      }
    };
    expect_error([&] { comm.reduce_scatter_start(data.data(), data.data() + 32, one, DType::f32); },
                 "reduce_scatter: counts must have one entry per rank (2), got 1");
    expect_error([&] { comm.reduce_scatter_start(data.data(), data.data() + 32, two, DType::i8); },
                 "reduce_scatter: dtype must be f16, bf16 or f32, got i8");
    expect_error([&] { comm.reduce_scatter_start(data.data(), data.data() + 4, two, DType::f32); },
                 "reduce_scatter: input and output must not overlap");
    expect_error([&] { comm.reduce_scatter_start(data.data(), nullptr, two, DType::f32); },
                 "reduce_scatter: output must not be null");
    expect_error([&] { comm.all_gather_start(data.data(), data.data(), one, DType::f32); },
                 "all_gather_start: counts must have one entry per rank (2), got 1");
    expect_error([&] { comm.all_gather_start(data.data() + 1, data.data(), two, DType::f32); },
                 "all_gather_start: input must be this rank's place in output");
    expect_error([&] { comm.all_gather_start(nullptr, data.data(), two, DType::f32); },
                 "all_gather_start: input must not be null");
    // Nothing was started: the group still works.
    check_reduce_scatter(comm, DType::f32, 5);
    check_all_gather(comm, DType::f32, 5, true);
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// Rank 2 is alive but never joins: ranks 0 and 1 fail at the deadline,
// naming it and the collective.
TEST(Collectives, ARankThatNeverArrivesIsNamedAtTheDeadline) {
  for (const char* op : {"reduce-scatter", "all-gather"}) {
    const bool scatter = std::string(op) == "reduce-scatter";
    const auto result = launch(
        3,
        [scatter, op](RankContext& ctx) {
          if (ctx.rank == 2) {
            std::this_thread::sleep_for(1500ms);
            return 0;
          }
          const std::vector<std::size_t> counts{10, 10, 10};
          std::vector<float> in(30, 1.0f), out(30);
          const auto start = Clock::now();
          try {
            if (scatter) {
              ctx.comm->reduce_scatter_start(in.data(), out.data(), counts, DType::f32)->wait();
            } else {
              ctx.comm->all_gather_start(in.data(), out.data(), counts, DType::f32)->wait();
            }
            expect_rank(false, op, " completed without rank 2");
          } catch (const TimeoutError& error) {
            const std::string what = error.what();
            expect_rank(error.ranks() == std::vector<int>{2}, "ranks() should be {2}: ", what);
            expect_rank(
                what.find(op) != std::string::npos && what.find("rank 2") != std::string::npos,
                "the message does not name the ", op, " and rank 2: ", what);
            expect_rank(Clock::now() - start >= 400ms, "gave up before the 500 ms deadline");
          }
          return 0;
        },
        500ms);
    EXPECT_TRUE(result.ok()) << op << ": " << result.describe_failures();
  }
}

TEST(Collectives, AKilledRankIsReportedAsLost) {
  for (bool scatter : {true, false}) {
    const auto result = launch(
        3,
        [scatter](RankContext& ctx) {
          if (ctx.rank == 1) ::raise(SIGKILL);
          const std::vector<std::size_t> counts{10, 10, 10};
          std::vector<float> in(30, 1.0f), out(30);
          try {
            if (scatter) {
              ctx.comm->reduce_scatter_start(in.data(), out.data(), counts, DType::f32)->wait();
            } else {
              auto work = ctx.comm->all_gather_start(in.data(), out.data(), counts, DType::f32);
              work->wait(1);
            }
            expect_rank(false, "completed without rank 1");
          } catch (const PeerLostError& error) {
            expect_rank(error.ranks() == std::vector<int>{1},
                        "ranks() should be {1}: ", error.what());
          }
          return 0;
        },
        10s);
    ASSERT_EQ(result.ranks.size(), 3u);
    EXPECT_EQ(result.ranks[1].signal, SIGKILL);
    EXPECT_TRUE(result.ranks[0].ok() && result.ranks[2].ok()) << result.describe_failures();
    EXPECT_TRUE(test::segments_gone(result));
  }
}

}  // namespace
}  // namespace tpfuse::comm
