// The communication layer: the shm communicator's all-reduce (values, order,
// rounding, chunking, in place, bitwise agreement), its sum kernels, reduce
// buffers, test/wait, all_gather and argument checks. Failures, the segment,
// the registry and the store are in comm_lifecycle_test.cc.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "comm/shm_reduce_kernels.h"
#include "comm/shm_segment.h"
#include "core/cpu_isa.h"
#include "fault_report.h"
#include "rank_harness.h"
#include "tpfuse/comm/launcher.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/core/half.h"
#include "tpfuse/core/log.h"

namespace tpfuse::comm {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::expect_rank;

LaunchResult launch(int ranks, const std::function<int(RankContext&)>& body,
                    std::chrono::milliseconds timeout = 30s, std::size_t slot_bytes = 4096,
                    ShmAlgorithm algorithm = ShmAlgorithm::automatic) {
  LaunchOptions options;
  options.ranks = ranks;
  options.shm.timeout = timeout;
  options.shm.slot_bytes = slot_bytes;
  options.shm.algorithm = algorithm;
  return launch_local(options, body);
}

const char* algorithm_name(ShmAlgorithm algorithm) {
  switch (algorithm) {
    case ShmAlgorithm::automatic:
      return "auto";
    case ShmAlgorithm::one_shot:
      return "one_shot";
    case ShmAlgorithm::reduce_scatter:
      return "reduce_scatter";
  }
  return "?";
}

// ---- element access in any float dtype --------------------------------------

float load_element(DType dtype, const std::byte* base, std::size_t i) {
  if (dtype == DType::f32) {
    float value;
    std::memcpy(&value, base + 4 * i, 4);
    return value;
  }
  std::uint16_t bits;
  std::memcpy(&bits, base + 2 * i, 2);
  return dtype == DType::f16 ? f16_to_f32(Half{bits}) : bf16_to_f32(BFloat16{bits});
}

void store_element(DType dtype, std::byte* base, std::size_t i, float value) {
  if (dtype == DType::f32) {
    std::memcpy(base + 4 * i, &value, 4);
    return;
  }
  const std::uint16_t bits = dtype == DType::f16 ? f32_to_f16(value).bits : f32_to_bf16(value).bits;
  std::memcpy(base + 2 * i, &bits, 2);
}

std::vector<std::byte> buffer_of(DType dtype, const std::vector<float>& values) {
  std::vector<std::byte> bytes(values.size() * dtype_size(dtype));
  for (std::size_t i = 0; i < values.size(); ++i) store_element(dtype, bytes.data(), i, values[i]);
  return bytes;
}

// Rank r's input: full mantissas, both signs, and exponents spread wide
// enough (within f16's range for f16) that the fp32 sums round, so any other
// order of addition or a second rounding changes bits.
std::vector<std::byte> make_input(DType dtype, int rank, std::size_t count) {
  const int lowest_exponent = dtype == DType::f16 ? -14 : -20;
  const int exponents = dtype == DType::f16 ? 25 : 40;
  std::vector<float> values(count);
  for (std::size_t i = 0; i < count; ++i) {
    std::uint64_t h = (static_cast<std::uint64_t>(rank) << 40) + i + 0x9e3779b97f4a7c15ull;
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    h ^= h >> 31;
    const float mantissa = 1.0f + static_cast<float>(h & 0x7fffff) * 0x1p-23f;
    const int exponent =
        lowest_exponent + static_cast<int>((h >> 24) % static_cast<std::uint64_t>(exponents));
    const float value = std::ldexp(mantissa, exponent);
    values[i] = (h >> 40) & 1 ? -value : value;
  }
  return buffer_of(dtype, values);
}

// The contract, computed independently: fp32, rank order, rounded once. Rank
// r's input is make_input(dtype, r + seed, count).
std::vector<std::byte> expected_sum(DType dtype, int world_size, std::size_t count, int seed = 0) {
  std::vector<std::vector<std::byte>> inputs;
  for (int r = 0; r < world_size; ++r) inputs.push_back(make_input(dtype, r + seed, count));
  std::vector<std::byte> out(count * dtype_size(dtype));
  for (std::size_t i = 0; i < count; ++i) {
    float sum = load_element(dtype, inputs[0].data(), i);
    for (int r = 1; r < world_size; ++r) sum += load_element(dtype, inputs[r].data(), i);
    store_element(dtype, out.data(), i, sum);
  }
  return out;
}

// Every rank holds bitwise the same bytes.
void expect_same_on_every_rank(Communicator& comm, const std::vector<std::byte>& bytes,
                               const std::string& what) {
  const std::uint64_t hash = test::fnv1a(bytes.data(), bytes.size());
  const auto hashes =
      comm.all_gather(std::string_view(reinterpret_cast<const char*>(&hash), sizeof hash));
  for (int r = 0; r < comm.size(); ++r)
    expect_rank(hashes[r] == hashes[0], what, ": rank ", r, " differs from rank 0");
}

// ---- all-reduce values -------------------------------------------------------

class AllReduceTest
    : public ::testing::TestWithParam<std::tuple<int, DType, ShmAlgorithm>> {};

TEST_P(AllReduceTest, SumsInFp32InRankOrderRoundedOnce) {
  const auto [ranks, dtype, algorithm] = GetParam();
  constexpr std::size_t kSlotBytes = 4096;
  // 0, 1, odd, and more than two slots' worth (so several chunks, the last partial).
  const std::size_t counts[] = {0, 1, 7, 2 * kSlotBytes / dtype_size(dtype) + 123};
  const auto result = launch(
      ranks,
      [&](RankContext& ctx) {
        const std::size_t element = dtype_size(dtype);
        constexpr std::size_t kGuard = 64;
        for (std::size_t count : counts) {
          const auto input = make_input(dtype, ctx.rank, count);
          const auto expected = expected_sum(dtype, ctx.size, count);
          for (bool in_place : {false, true}) {
            const std::string what =
                cat(dtype_name(dtype), " count ", count, in_place ? " in place" : " out of place");
            // Guard bytes after the output catch a chunk written past its end.
            std::vector<std::byte> output(count * element + kGuard, std::byte{0xab});
            std::vector<std::byte> copy = input;
            if (in_place) {
              std::copy(input.begin(), input.end(), output.begin());
              ctx.comm->all_reduce(output.data(), output.data(), count, dtype);
            } else {
              ctx.comm->all_reduce(copy.data(), output.data(), count, dtype);
              expect_rank(copy == input, what, ": the input changed");
            }
            expect_rank(std::equal(expected.begin(), expected.end(), output.begin()), what,
                        ": result differs from the fp32 rank-order sum");
            for (std::size_t g = 0; g < kGuard; ++g) {
              expect_rank(output[count * element + g] == std::byte{0xab}, what,
                          ": wrote past the output");
            }
            output.resize(count * element);
            expect_same_on_every_rank(*ctx.comm, output, what);
          }
        }
        return 0;
      },
      30s, kSlotBytes, algorithm);
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

INSTANTIATE_TEST_SUITE_P(
    RanksAndDtypes, AllReduceTest,
    ::testing::Combine(::testing::Values(1, 2, 3, 4, 8),
                       ::testing::Values(DType::f16, DType::bf16, DType::f32),
                       ::testing::Values(ShmAlgorithm::automatic, ShmAlgorithm::one_shot,
                                         ShmAlgorithm::reduce_scatter)),
    [](const auto& info) {
      return cat("p", std::get<0>(info.param), "_", dtype_name(std::get<1>(info.param)), "_",
                 algorithm_name(std::get<2>(info.param)));
    });

// 2^11 + 2^-14 rounds back to 2^11 in fp32 (and all three values are exact
// in every dtype). In rank order both calls give 0; (x0 + x2) + x1 gives
// 2^-14 in the first, x2 + x1 + x0 gives 2^-14 in the second.
TEST(AllReduce, AddsInRankOrder) {
  const auto result = launch(3, [](RankContext& ctx) {
    const float first[] = {0x1p11f, 0x1p-14f, -0x1p11f};
    const float second[] = {0x1p-14f, 0x1p11f, -0x1p11f};
    for (DType dtype : {DType::f16, DType::bf16, DType::f32}) {
      for (const float* mine : {first, second}) {
        auto value = buffer_of(dtype, {mine[ctx.rank]});
        ctx.comm->all_reduce(value.data(), value.data(), 1, dtype);
        const float sum = load_element(dtype, value.data(), 0);
        expect_rank(sum == 0.0f, dtype_name(dtype), ": expected 0 from ", mine[0], " + ", mine[1],
                    " + ", mine[2], " in fp32 in rank order, got ", sum);
      }
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// 1 + 2^-11 + 2^-11: one rounding at the end gives 1 + 2^-10; rounding to f16
// after each addition would give 1 (each 2^-11 is a tie to even).
TEST(AllReduce, RoundsToF16OnceAtTheEnd) {
  const auto result = launch(3, [](RankContext& ctx) {
    const float mine[] = {1.0f, 0x1p-11f, 0x1p-11f};
    Half value = f32_to_f16(mine[ctx.rank]);
    ctx.comm->all_reduce(&value, &value, 1, DType::f16);
    expect_rank(f16_to_f32(value) == 1.0f + 0x1p-10f, "expected 1 + 2^-10, got ",
                f16_to_f32(value));
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// Each rank joins two more groups over the job's store, one per algorithm,
// and all-reduces the same inputs in both: the bytes must be the same, and
// the rank-order sum, at sizes that are odd and span several slots.
class AlgorithmsAgree : public ::testing::TestWithParam<int> {};

TEST_P(AlgorithmsAgree, OneShotAndReduceScatterGiveTheSameBytes) {
  const int ranks = GetParam();
  const auto result = launch(ranks, [](RankContext& ctx) {
    FileStore store(std::getenv("TPFUSE_STORE_DIR"));
    ShmOptions options;
    options.timeout = 30s;
    options.slot_bytes = 4096;
    options.algorithm = ShmAlgorithm::one_shot;
    PrefixStore one_shot_store("one_shot.", store);
    auto one_shot = create_shm_communicator(one_shot_store, ctx.rank, ctx.size, options);
    options.algorithm = ShmAlgorithm::reduce_scatter;
    PrefixStore reduce_scatter_store("reduce_scatter.", store);
    auto reduce_scatter = create_shm_communicator(reduce_scatter_store, ctx.rank, ctx.size, options);
    for (DType dtype : {DType::f16, DType::bf16, DType::f32}) {
      for (std::size_t count : {std::size_t{1}, std::size_t{5}, std::size_t{33}, std::size_t{1001},
                                std::size_t{6007}}) {
        const auto input = make_input(dtype, ctx.rank, count);
        std::vector<std::byte> first(input.size()), second(input.size());
        one_shot->all_reduce(input.data(), first.data(), count, dtype);
        reduce_scatter->all_reduce(input.data(), second.data(), count, dtype);
        const std::string what = cat(dtype_name(dtype), " count ", count);
        expect_rank(first == second, what, ": one-shot and reduce-scatter differ");
        expect_rank(first == expected_sum(dtype, ctx.size, count), what,
                    ": differs from the fp32 rank-order sum");
      }
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

INSTANTIATE_TEST_SUITE_P(Ranks, AlgorithmsAgree, ::testing::Values(2, 3, 4, 8),
                         [](const auto& info) { return cat("p", info.param); });

// ---- the vector sum kernel ----------------------------------------------------

// Random bit patterns (every exponent, subnormals, infinities, NaNs) at odd
// counts and unaligned addresses: every vector kernel this CPU has, with its
// outputs through the caches or around them, must give the portable
// kernel's bits, NaN payloads included.
TEST(SumKernel, VectorKernelsMatchPortableBitForBit) {
  std::printf("sum kernel on this CPU: %s\n", shm::sum_kernel_name());
  std::uint64_t state = 0x243f6a8885a308d3ull;
  auto next = [&] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<std::uint32_t>(state >> 29);
  };
  std::vector<IsaLevel> levels;
  for (IsaLevel level : {IsaLevel::avx2, IsaLevel::avx512}) {
    if (level <= detected_isa()) levels.push_back(level);
  }
  for (DType dtype : {DType::f16, DType::bf16, DType::f32}) {
    const std::size_t size = dtype_size(dtype);
    for (int ranks : {1, 2, 3, 8, 9}) {
      for (std::size_t count : {std::size_t{0}, std::size_t{1}, std::size_t{15}, std::size_t{17},
                                std::size_t{511}, std::size_t{513}, std::size_t{2000}}) {
        std::vector<std::vector<std::byte>> inputs(static_cast<std::size_t>(ranks));
        std::vector<const std::byte*> sources;
        for (auto& input : inputs) {
          input.resize(count * size + 2);
          for (auto& byte : input) byte = static_cast<std::byte>(next());
          sources.push_back(input.data() + 2);  // unaligned on purpose
        }
        std::vector<std::byte> portable(count * size + 2);
        shm::sum_in_rank_order_portable(dtype, sources, count, portable.data() + 2);
        for (IsaLevel level : levels) {
          std::vector<std::byte> vector(count * size + 2), second(count * size + 2),
              streamed(count * size + 2);
          shm::sum_in_rank_order_at(level, dtype, sources, count, vector.data() + 2,
                                    second.data() + 2);
          shm::sum_in_rank_order_at(level, dtype, sources, count, streamed.data() + 2, nullptr,
                                    shm::OutputStore::streaming);
          const char* kernel = shm::sum_kernel_name(level);
          EXPECT_EQ(vector, second) << kernel << ": the second output differs";
          EXPECT_EQ(vector, streamed) << kernel << ": streaming stores changed the output";
          for (std::size_t i = 0; i < count; ++i) {
            const float want = load_element(dtype, portable.data() + 2, i);
            const float got = load_element(dtype, vector.data() + 2, i);
            ASSERT_EQ(
                0, std::memcmp(portable.data() + 2 + i * size, vector.data() + 2 + i * size, size))
                << kernel << " " << dtype_name(dtype) << " p=" << ranks << " count " << count
                << " element " << i << ": portable " << want << ", vector " << got;
          }
        }
      }
    }
  }
}

// Which NaN a sum gives is a rule, not the compiler's operand order: the
// first NaN in rank order, made quiet; inf - inf gives the default NaN.
TEST(SumKernel, NanSumsFollowTheRankOrderRule) {
  const std::uint32_t first_nan = 0x7f800123u;   // signalling, payload 0x123
  const std::uint32_t second_nan = 0xffc00456u;  // quiet, negative
  const std::uint32_t infinity = 0x7f800000u, minus_infinity = 0xff800000u, one = 0x3f800000u;
  const std::uint32_t rank0[] = {one, one, infinity, second_nan};
  const std::uint32_t rank1[] = {first_nan, one, minus_infinity, first_nan};
  const std::uint32_t rank2[] = {second_nan, first_nan, one, one};
  const std::uint32_t expected[] = {first_nan | 0x00400000u, first_nan | 0x00400000u, 0xffc00000u,
                                    second_nan};
  std::vector<const std::byte*> sources = {reinterpret_cast<const std::byte*>(rank0),
                                           reinterpret_cast<const std::byte*>(rank1),
                                           reinterpret_cast<const std::byte*>(rank2)};
  std::uint32_t vector[4] = {}, portable[4] = {};
  shm::sum_in_rank_order(DType::f32, sources, 4, reinterpret_cast<std::byte*>(vector));
  shm::sum_in_rank_order_portable(DType::f32, sources, 4, reinterpret_cast<std::byte*>(portable));
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(vector[i], expected[i]) << "vector kernel, element " << i;
    EXPECT_EQ(portable[i], expected[i]) << "portable kernel, element " << i;
  }
}

// Streamed copies at every alignment of source and destination and odd sizes.
// TPFUSE_ISA caps the all-reduce's kernels as it caps the GEMM's (read once
// per process: the capped check runs in a fresh one).
TEST(SumKernelDeathTest, TpfuseIsaCapsTheKernel) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        setenv("TPFUSE_ISA", "portable", 1);
        std::exit(std::string(shm::sum_kernel_name()) == "portable" ? 0 : 1);
      },
      ::testing::ExitedWithCode(0), "");
  if (detected_isa() >= IsaLevel::avx512) {
    EXPECT_EXIT(
        {
          setenv("TPFUSE_ISA", "avx2", 1);
          std::exit(std::string(shm::sum_kernel_name()) == "avx2" ? 0 : 1);
        },
        ::testing::ExitedWithCode(0), "");
  }
  // Here, uncapped (after the death test: a re-run child reads TPFUSE_ISA first).
  const IsaLevel level = active_isa();
  EXPECT_STREQ(shm::sum_kernel_name(), level >= IsaLevel::avx512 ? "avx512"
                                       : level >= IsaLevel::avx2 ? "avx2"
                                                                 : "portable");
}

TEST(SumKernel, StreamingCopyIsACopy) {
  std::vector<std::byte> source(5000);
  for (std::size_t i = 0; i < source.size(); ++i) source[i] = static_cast<std::byte>(i * 131 + 7);
  for (std::size_t out_offset : {0, 1, 2, 33, 63}) {
    for (std::size_t in_offset : {0, 5, 64}) {
      for (std::size_t bytes : {0, 1, 63, 64, 65, 1000, 4000}) {
        std::vector<std::byte> out(bytes + 128, std::byte{0xee});
        shm::copy_to_output(out.data() + out_offset, source.data() + in_offset, bytes,
                            shm::OutputStore::streaming);
        ASSERT_EQ(0, std::memcmp(out.data() + out_offset, source.data() + in_offset, bytes))
            << bytes << " bytes at offsets " << out_offset << ", " << in_offset;
        for (std::size_t i = out_offset + bytes; i < out.size(); ++i)
          ASSERT_EQ(out[i], std::byte{0xee}) << "wrote past the end";
      }
    }
  }
}

// Large enough that outputs are written around the caches, through both
// algorithms, in chunks and in place.
TEST(AllReduce, LargeOutputsWrittenAroundTheCaches) {
  for (ShmAlgorithm algorithm : {ShmAlgorithm::one_shot, ShmAlgorithm::reduce_scatter}) {
    const auto result = launch(
        3,
        [](RankContext& ctx) {
          const std::size_t count = (std::size_t{3} << 20) / 2 + 77;  // 3 MiB of f16, and some
          const auto input = make_input(DType::f16, ctx.rank, count);
          std::vector<std::byte> output(input.size() + 1);
          ctx.comm->all_reduce(input.data(), output.data() + 1, count, DType::f16);
          const auto expected = expected_sum(DType::f16, ctx.size, count);
          expect_rank(std::equal(expected.begin(), expected.end(), output.begin() + 1),
                      "an unaligned streamed output differs");
          std::vector<std::byte> in_place = input;
          ctx.comm->all_reduce(in_place.data(), in_place.data(), count, DType::f16);
          expect_rank(in_place == expected, "a streamed in-place output differs");
          return 0;
        },
        30s, std::size_t{1} << 20, algorithm);
    EXPECT_TRUE(result.ok()) << algorithm_name(algorithm) << ": " << result.describe_failures();
  }
}

// ---- reduce buffers (the pipelined form) --------------------------------------

class ReduceBufferTest : public ::testing::TestWithParam<std::tuple<int, ShmAlgorithm>> {};

// Tiles of odd sizes, each produced straight into the acquired buffer while
// up to max_reduces_in_flight() - 1 earlier ones are still being reduced.
TEST_P(ReduceBufferTest, RoundsInFlightGiveTheRankOrderSum) {
  const auto [ranks, algorithm] = GetParam();
  constexpr std::size_t kSlotBytes = 4096;
  const auto result = launch(
      ranks,
      [](RankContext& ctx) {
        const DType dtype = DType::bf16;
        const int depth = ctx.comm->max_reduces_in_flight();
        expect_rank(depth >= 2, "only ", depth, " all-reduce(s) may be in flight");
        expect_rank(ctx.comm->max_reduce_buffer_bytes() == kSlotBytes, "buffers of ",
                    ctx.comm->max_reduce_buffer_bytes(), " bytes");
        const std::size_t counts[] = {2048, 1, 777, 2047, 64, 1500, 2048, 3, 999, 2000};
        struct Tile {
          std::unique_ptr<Work> work;
          std::vector<std::byte> output;
          std::size_t count = 0;
          int seed = 0;
        };
        std::deque<Tile> in_flight;
        auto complete_oldest = [&] {
          Tile& tile = in_flight.front();
          tile.work->wait();
          expect_rank(tile.output == expected_sum(dtype, ctx.size, tile.count, 16 * tile.seed),
                      "tile ", tile.seed, ": not the rank-order sum");
          in_flight.pop_front();
        };
        for (int t = 0; t < static_cast<int>(std::size(counts)); ++t) {
          if (static_cast<int>(in_flight.size()) == depth) complete_oldest();
          const std::size_t count = counts[t];
          ReduceBuffer buffer = ctx.comm->acquire_reduce_buffer(count, dtype);
          expect_rank(reinterpret_cast<std::uintptr_t>(buffer.data) % 64 == 0, "buffer unaligned");
          const auto input = make_input(dtype, ctx.rank + 16 * t, count);
          std::memcpy(buffer.data, input.data(), input.size());
          Tile tile;
          tile.output.resize(input.size());
          tile.count = count;
          tile.seed = t;
          tile.work = ctx.comm->all_reduce_start(std::move(buffer), tile.output.data());
          in_flight.push_back(std::move(tile));
        }
        while (!in_flight.empty()) complete_oldest();
        return 0;
      },
      30s, kSlotBytes, algorithm);
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

INSTANTIATE_TEST_SUITE_P(RanksAndAlgorithms, ReduceBufferTest,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4, 8),
                                            ::testing::Values(ShmAlgorithm::one_shot,
                                                              ShmAlgorithm::reduce_scatter)),
                         [](const auto& info) {
                           return cat("p", std::get<0>(info.param), "_",
                                      algorithm_name(std::get<1>(info.param)));
                         });

TEST(ReduceBuffer, MisuseIsAnInvalidArgument) {
  const auto result = launch(1, [](RankContext& ctx) {
    Communicator& comm = *ctx.comm;
    bool threw = false;
    try {
      comm.acquire_reduce_buffer(comm.max_reduce_buffer_bytes() / 4 + 1, DType::f32);
    } catch (const InvalidArgument& error) {
      threw = std::string(error.what()).find("max_reduce_buffer_bytes") != std::string::npos;
    }
    expect_rank(threw, "an oversized buffer was handed out");
    std::vector<ReduceBuffer> acquired;
    for (int i = 0; i < comm.max_reduces_in_flight(); ++i)
      acquired.push_back(comm.acquire_reduce_buffer(4, DType::f32));
    threw = false;
    try {
      comm.acquire_reduce_buffer(4, DType::f32);
    } catch (const InvalidArgument&) {
      threw = true;
    }
    expect_rank(threw, "more buffers than slots were acquired without a start");
    float value = 1.0f;
    threw = false;
    try {
      comm.all_reduce(&value, &value, 1, DType::f32);
    } catch (const InvalidArgument&) {
      threw = true;
    }
    expect_rank(threw, "a plain all-reduce ran while buffers were acquired and not started");
    std::vector<float> out(4);
    for (auto& buffer : acquired) {
      std::fill_n(reinterpret_cast<float*>(buffer.data), 4, 2.0f);
      comm.all_reduce_start(std::move(buffer), out.data())->wait();
      expect_rank(out[3] == 2.0f, "a buffer of one rank did not come back unchanged");
    }
    comm.all_reduce(&value, &value, 1, DType::f32);  // usable again
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// A transport without shared buffers gets the Communicator's generic ones.
class LoopbackCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  std::string transport() const override { return "test"; }
  std::chrono::milliseconds timeout() const override { return 1s; }
  std::size_t max_gather_bytes() const override { return 0; }
  void abort(std::string_view) override {}

 protected:
  std::unique_ptr<Work> do_all_reduce_start(const void* input, void* output, std::size_t count,
                                            DType dtype) override {
    std::memmove(output, input, count * dtype_size(dtype));
    return std::make_unique<DoneWork>();
  }
  using Communicator::do_all_reduce_start;
  std::vector<std::string> do_all_gather(std::string_view mine) override {
    return {std::string(mine)};
  }

 private:
  struct DoneWork final : Work {
    bool test() override { return true; }
    void wait() override {}
  };
  std::string name_ = "loopback";
};

TEST(ReduceBuffer, GenericFallbackUsesPrivateMemory) {
  LoopbackCommunicator comm;
  ReduceBuffer buffer = comm.acquire_reduce_buffer(1000, DType::f16);
  ASSERT_NE(buffer.data, nullptr);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(buffer.data) % 64, 0u);
  const auto input = make_input(DType::f16, 0, 1000);
  std::memcpy(buffer.data, input.data(), input.size());
  std::vector<std::byte> output(input.size());
  comm.all_reduce_start(std::move(buffer), output.data())->wait();
  EXPECT_EQ(output, input);
}

// ---- test() and wait() -------------------------------------------------------

// Causal, not timed: rank 1 contributes only once rank 0 has seen test()
// false a number of times, and rank 0 then sees it turn true.
TEST(AllReduceWork, TestIsFalseUntilEveryPeerContributed) {
  struct Page {
    std::atomic<bool> polled{false};
  };
  Page& page = test::shared_page<Page>();
  constexpr int kPolls = 50;
  const auto result = launch(2, [&page](RankContext& ctx) {
    std::vector<float> data(1000, static_cast<float>(ctx.rank + 1));
    if (ctx.rank == 1) {
      const auto deadline = Clock::now() + 30s;
      while (!page.polled.load() && Clock::now() < deadline) std::this_thread::sleep_for(1ms);
      expect_rank(page.polled.load(), "rank 0 never finished polling");
      ctx.comm->all_reduce(data.data(), data.data(), data.size(), DType::f32);
      return 0;
    }
    auto work = ctx.comm->all_reduce_start(data.data(), data.data(), data.size(), DType::f32);
    for (int poll = 0; poll < kPolls; ++poll) {
      expect_rank(!work->test(), "test() was true at poll ", poll, ", before rank 1 contributed");
    }
    page.polled = true;
    const auto deadline = Clock::now() + 30s;
    while (!work->test()) {
      expect_rank(Clock::now() < deadline, "test() never became true");
      std::this_thread::sleep_for(1ms);
    }
    expect_rank(work->test(), "test() is not true again after completion");
    work->wait();  // returns at once once complete
    for (float value : data) expect_rank(value == 3.0f, "expected 1 + 2, got ", value);
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

TEST(AllReduceWork, StartingAnotherCompletesThePrevious) {
  const auto result = launch(3, [](RankContext& ctx) {
    std::vector<float> first(5000, 1.0f);
    std::vector<float> second(3, static_cast<float>(ctx.rank));
    auto first_work =
        ctx.comm->all_reduce_start(first.data(), first.data(), first.size(), DType::f32);
    auto second_work =
        ctx.comm->all_reduce_start(second.data(), second.data(), second.size(), DType::f32);
    expect_rank(first_work->test(),
                "the first all-reduce is not complete after starting the second");
    second_work->wait();
    for (float value : first) expect_rank(value == 3.0f, "first: expected 3, got ", value);
    for (float value : second)
      expect_rank(value == 3.0f, "second: expected 0 + 1 + 2, got ", value);
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

TEST(AllReduceWork, DroppingWorkCompletesIt) {
  const auto result = launch(2, [](RankContext& ctx) {
    std::vector<Half> data(3000, f32_to_f16(1.5f));
    ctx.comm->all_reduce_start(data.data(), data.data(), data.size(), DType::f16).reset();
    for (Half value : data)
      expect_rank(f16_to_f32(value) == 3.0f, "expected 3, got ", f16_to_f32(value));
    ctx.comm->barrier();
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// ---- all_gather, names, arguments ------------------------------------------

TEST(AllGather, ReturnsEveryBlobInRankOrder) {
  const auto result = launch(4, [](RankContext& ctx) {
    const std::size_t max = ctx.comm->max_gather_bytes();
    expect_rank(max >= 1024, "max_gather_bytes() is ", max, ", expected at least 1 KiB");
    auto blob_of = [&](int rank, int round) {
      if (rank == 0) return std::string();  // empty
      if (rank == 3)
        return std::string(max, static_cast<char>('a' + round));  // the largest allowed
      return cat("rank ", rank, " round ", round,
                 std::string(static_cast<std::size_t>(rank) * 100, '\0'));
    };
    for (int round = 0; round < 3; ++round) {
      const auto blobs = ctx.comm->all_gather(blob_of(ctx.rank, round));
      expect_rank(blobs.size() == 4u, "expected 4 blobs, got ", blobs.size());
      for (int r = 0; r < 4; ++r)
        expect_rank(blobs[r] == blob_of(r, round), "round ", round, ": blob of rank ", r);
    }
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// A checked all-reduce whose digests match sums like any other; whose
// digests differ reads no contribution (rank 0's count is large, rank 2's is
// 0), sums nothing, and tells every rank every header; the next round works.
// On shm (the headers beside the slots) and through the Communicator's
// default (the headers in an all_gather first), which a communicator that
// only forwards the other collectives gets.
class Forwarding final : public Communicator {
 public:
  explicit Forwarding(std::shared_ptr<Communicator> inner) : inner_(std::move(inner)) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  const std::string& name() const override { return inner_->name(); }
  std::string transport() const override { return inner_->transport(); }
  std::chrono::milliseconds timeout() const override { return inner_->timeout(); }
  std::size_t max_gather_bytes() const override { return inner_->max_gather_bytes(); }
  void abort(std::string_view reason) override { inner_->abort(reason); }

 protected:
  std::unique_ptr<Work> do_all_reduce_start(const void* input, void* output, std::size_t count,
                                            DType dtype) override {
    return inner_->all_reduce_start(input, output, count, dtype);
  }
  using Communicator::do_all_reduce_start;
  std::vector<std::string> do_all_gather(std::string_view mine) override {
    return inner_->all_gather(mine);
  }

 private:
  std::shared_ptr<Communicator> inner_;
};

comm::CallHeader header_with(std::uint64_t digest, const std::string& text) {
  comm::CallHeader header;
  header.digest = digest;
  header.set_payload(text);
  return header;
}

void checked_rounds(Communicator& comm, const RankContext& ctx) {
  const std::size_t count = 1000;
  std::vector<float> out(count, -1.0f);
  // Matching digests: the sum.
  comm::ReduceBuffer buffer = comm.acquire_reduce_buffer(count, DType::f32);
  for (std::size_t i = 0; i < count; ++i)
    reinterpret_cast<float*>(buffer.data)[i] = float(ctx.rank + i);
  auto work = comm.checked_all_reduce_start(std::move(buffer), out.data(), header_with(7, "same"));
  work->wait();
  expect_rank(work->mismatch() == nullptr, "matching digests reported a mismatch");
  for (std::size_t i = 0; i < count; ++i)
    expect_rank(out[i] == float(3 + 3 * i), "element ", i, " is ", out[i]);
  // Rank 2's digest differs, and its count: nothing is read or summed.
  std::fill(out.begin(), out.end(), -1.0f);
  const std::size_t mine = ctx.rank == 2 ? 0 : count;
  buffer = comm.acquire_reduce_buffer(mine, DType::f32);
  if (mine > 0) std::memset(buffer.data, 0, mine * sizeof(float));
  work = comm.checked_all_reduce_start(std::move(buffer), out.data(),
                                       header_with(ctx.rank == 2 ? 9 : 7, cat("rank ", ctx.rank)));
  work->wait();
  const std::vector<comm::CallHeader>* headers = work->mismatch();
  expect_rank(headers != nullptr && headers->size() == 3u, "no mismatch reported");
  for (int r = 0; r < 3; ++r) {
    expect_rank((*headers)[r].payload_view() == cat("rank ", r), "header of rank ", r, ": ",
                (*headers)[r].payload_view());
  }
  expect_rank(std::all_of(out.begin(), out.end(), [](float v) { return v == -1.0f; }),
              "a mismatched round wrote the output");
  // And the communicator goes on.
  std::vector<float> one(4, float(ctx.rank)), sum(4);
  comm.all_reduce(one.data(), sum.data(), 4, DType::f32);
  expect_rank(sum[0] == 3.0f, "the next all-reduce gave ", sum[0]);
}

TEST(CheckedAllReduce, SumsWhenDigestsMatchAndReadsNothingWhenNot) {
  const auto result = launch(3, [](RankContext& ctx) {
    checked_rounds(*ctx.comm, ctx);
    Forwarding by_default(ctx.comm);
    checked_rounds(by_default, ctx);
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

TEST(AllGather, RejectsABlobOverTheLimit) {
  const auto result = launch(2, [](RankContext& ctx) {
    const std::string too_big(ctx.comm->max_gather_bytes() + 1, 'x');
    try {
      ctx.comm->all_gather(too_big);
      expect_rank(false, "an oversized blob was accepted");
    } catch (const InvalidArgument& error) {
      expect_rank(std::string(error.what()).find("max_gather_bytes") != std::string::npos,
                  error.what());
    }
    const auto blobs = ctx.comm->all_gather(cat(ctx.rank));  // the group is still usable
    expect_rank(blobs[0] == "0" && blobs[1] == "1", "gather after the rejected one failed");
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

TEST(ShmCommunicator, NameIsSharedRegisteredAndLogged) {
  const auto result = launch(3, [](RankContext& ctx) {
    const std::string& name = ctx.comm->name();
    expect_rank(name.rfind("tpfuse-shm-", 0) == 0 && name.size() > 11, "unexpected name ", name);
    const auto names = ctx.comm->all_gather(name);
    for (const auto& other : names)
      expect_rank(other == name, "names differ: ", other, " vs ", name);
    expect_rank(find_communicator(name) == ctx.comm, "the launcher did not register ", name);
    expect_rank(ctx.comm->rank() == ctx.rank && ctx.comm->size() == 3, "rank or size wrong");
    expect_rank(ctx.comm->timeout() == 30s, "timeout is ", ctx.comm->timeout().count(), " ms");
    expect_rank(log::rank() == ctx.rank, "log rank is ", log::rank());
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

TEST(ShmCommunicator, RejectsBadArguments) {
  const std::filesystem::path dir = FileStore::make_private_dir();
  FileStore store(dir);
  ShmOptions options;
  options.timeout = 2s;
  EXPECT_THROW(create_shm_communicator(store, 0, 0, options), InvalidArgument);
  EXPECT_THROW(create_shm_communicator(store, 2, 2, options), InvalidArgument);
  ShmOptions odd_slot = options;
  odd_slot.slot_bytes = 100;
  EXPECT_THROW(create_shm_communicator(store, 0, 1, odd_slot), InvalidArgument);

  auto comm = create_shm_communicator(store, 0, 1, options);
  std::vector<float> data(16, 1.0f);
  EXPECT_THROW(comm->all_reduce(data.data(), data.data(), 4, DType::i32), InvalidArgument);
  EXPECT_THROW(comm->all_reduce(nullptr, data.data(), 4, DType::f32), InvalidArgument);
  EXPECT_THROW(comm->all_reduce(data.data(), data.data() + 1, 8, DType::f32), InvalidArgument);
  comm->all_reduce(data.data(), data.data() + 8, 8, DType::f32);  // adjacent is fine
  EXPECT_EQ(data[8], 1.0f);
  std::filesystem::remove_all(dir);
}

// The bytes a rank moves follow the algorithm each round runs: one-shot
// reads all p contributions, reduce-scatter about 3 per element whatever p.
TEST(MemoryTraffic, FollowsTheAlgorithmOfEachRound) {
  constexpr std::uint64_t KiB = 1 << 10, MiB = 1 << 20;
  ShmOptions options;
  options.slot_bytes = 4 * MiB;
  options.algorithm = ShmAlgorithm::automatic;
  const auto expect = [&](int size, std::uint64_t bytes, std::uint64_t read,
                          std::uint64_t written) {
    const MemoryTraffic traffic = shm_all_reduce_traffic(size, bytes, options);
    EXPECT_EQ(traffic.read, read) << size << " ranks, " << bytes << " bytes";
    EXPECT_EQ(traffic.written, written) << size << " ranks, " << bytes << " bytes";
  };
  expect(1, MiB, MiB, MiB);
  expect(2, 64 * KiB, 3 * 64 * KiB, 2 * 64 * KiB);                     // one-shot
  expect(2, 16 * MiB, 4 * (2 + 4 + 2) * MiB, 2 * 16 * MiB);            // 4 reduce-scatter rounds
  expect(2, 5 * MiB, (2 + 4 + 2) * MiB + 3 * MiB, 8 * MiB + 2 * MiB);  // the last round one-shot
  options.algorithm = ShmAlgorithm::reduce_scatter;
  expect(8, 64 * KiB, (56 + 64 + 56) * KiB, 2 * 64 * KiB);
  options.algorithm = ShmAlgorithm::one_shot;
  expect(8, 4 * MiB, 9 * 4 * MiB, 2 * 4 * MiB);
  EXPECT_THROW(shm_all_reduce_traffic(0, MiB, options), InvalidArgument);
}

}  // namespace
}  // namespace tpfuse::comm
