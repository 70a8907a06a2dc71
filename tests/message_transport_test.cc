// The message transport (tpfuse/comm/messages.h) over an in-process engine:
// ranks are threads, messages are copies held by a shared post office until
// their receive is posted and tested. The bytes are the shm kernel's, the
// gathers carry every rank's bytes, and failures name the right ranks.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <thread>
#include <tuple>
#include <vector>

#include "comm/shm_reduce_kernels.h"
#include "tpfuse/comm/messages.h"
#include "tpfuse/core/error.h"

namespace tpfuse::comm {
namespace {

using namespace std::chrono_literals;

struct PostOffice {
  std::mutex mutex;
  std::map<std::tuple<int, int, int>, std::deque<std::vector<std::byte>>> posted;  // from, to, tag
  std::set<int> lost;  // ranks whose messages fail (a dead peer)
  // For engines that tell of their completions: a count of the messages
  // posted (each may complete a receive), and the waits on it.
  std::condition_variable arrived;
  std::uint64_t posts = 0;
  int awaits = 0;
};

class Delivered final : public MessageEngine::Transfer {
 public:
  bool test() override { return true; }
  void cancel() override {}
};

class Receive final : public MessageEngine::Transfer {
 public:
  Receive(std::shared_ptr<PostOffice> office, std::tuple<int, int, int> key, std::byte* data,
          std::size_t bytes)
      : office_(std::move(office)), key_(key), data_(data), bytes_(bytes) {}
  bool test() override {
    const std::lock_guard lock(office_->mutex);
    if (office_->lost.count(std::get<0>(key_)) != 0) throw std::runtime_error("connection closed");
    auto& queue = office_->posted[key_];
    if (queue.empty()) return false;
    if (queue.front().size() != bytes_) throw std::runtime_error("message of the wrong size");
    if (bytes_ > 0) std::memcpy(data_, queue.front().data(), bytes_);
    queue.pop_front();
    return true;
  }
  void cancel() override {}

 private:
  std::shared_ptr<PostOffice> office_;
  std::tuple<int, int, int> key_;
  std::byte* data_;
  std::size_t bytes_;
};

// `signals`: the engine tells of its completions (as the process groups'
// does), so that waits can sleep until a message is posted.
class LoopbackEngine final : public MessageEngine {
 public:
  LoopbackEngine(std::shared_ptr<PostOffice> office, int rank, int size, bool signals = false)
      : office_(std::move(office)), rank_(rank), size_(size), signals_(signals) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::unique_ptr<Transfer> send(int peer, int tag, const std::byte* data,
                                 std::size_t bytes) override {
    const std::lock_guard lock(office_->mutex);
    office_->posted[{rank_, peer, tag}].emplace_back(data, data + bytes);
    ++office_->posts;
    office_->arrived.notify_all();
    return std::make_unique<Delivered>();
  }
  std::optional<std::uint64_t> completions() override {
    if (!signals_) return std::nullopt;
    const std::lock_guard lock(office_->mutex);
    return office_->posts;
  }
  void await_completion(std::uint64_t seen, std::chrono::microseconds limit) override {
    std::unique_lock lock(office_->mutex);
    ++office_->awaits;
    office_->arrived.wait_for(lock, limit, [&] { return office_->posts != seen; });
  }
  std::unique_ptr<Transfer> receive(int peer, int tag, std::byte* data,
                                    std::size_t bytes) override {
    return std::make_unique<Receive>(office_, std::make_tuple(peer, rank_, tag), data, bytes);
  }

 private:
  std::shared_ptr<PostOffice> office_;
  int rank_, size_;
  bool signals_;
};

// Runs body(communicator) on p threads, one communicator each; rethrows the
// first failure of a thread that was not expected to fail.
struct Group {
  explicit Group(int p, std::chrono::milliseconds timeout = 20s, std::vector<int> job_ranks = {},
                 bool signals = false)
      : office(std::make_shared<PostOffice>()) {
    for (int r = 0; r < p; ++r) {
      MessageOptions options{.name = "loopback", .transport = "loopback", .timeout = timeout};
      options.job_ranks = job_ranks;
      comms.push_back(create_message_communicator(
          std::make_shared<LoopbackEngine>(office, r, p, signals), options));
    }
  }
  void run(const std::function<void(Communicator&)>& body) {
    std::vector<std::exception_ptr> failures(comms.size());
    std::vector<std::thread> threads;
    for (std::size_t r = 0; r < comms.size(); ++r) {
      threads.emplace_back([&, r] {
        try {
          body(*comms[r]);
        } catch (...) {
          failures[r] = std::current_exception();
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    for (const auto& failure : failures) {
      if (failure) std::rethrow_exception(failure);
    }
  }
  std::shared_ptr<PostOffice> office;
  std::vector<std::shared_ptr<Communicator>> comms;
};

std::vector<std::uint16_t> random_halves(int seed, std::size_t count) {
  std::mt19937 engine(seed);
  std::vector<std::uint16_t> values(count);
  // bf16 and f16 bit patterns of moderate finite values.
  for (auto& v : values) v = static_cast<std::uint16_t>(0x3000 + engine() % 0x1000);
  return values;
}

class AllReduce : public ::testing::TestWithParam<std::tuple<int, DType>> {};

TEST_P(AllReduce, GivesTheShmKernelsBytesOnEveryRank) {
  const auto [p, dtype] = GetParam();
  const std::size_t count = 1001;  // uneven shares
  std::vector<std::vector<std::uint16_t>> inputs;
  std::vector<const std::byte*> sources;
  for (int r = 0; r < p; ++r) inputs.push_back(random_halves(r, count));
  for (const auto& input : inputs)
    sources.push_back(reinterpret_cast<const std::byte*>(input.data()));
  std::vector<std::uint16_t> expected(count);
  shm::sum_in_rank_order_portable(dtype, sources, count,
                                  reinterpret_cast<std::byte*>(expected.data()));
  Group group(p);
  std::vector<std::vector<std::uint16_t>> outputs(p, std::vector<std::uint16_t>(count));
  group.run([&](Communicator& comm) {
    const int r = comm.rank();
    comm.all_reduce(inputs[r].data(), outputs[r].data(), count, dtype);
    // Pipelined: three buffers in flight, then each one's result.
    std::vector<std::vector<std::uint16_t>> piped(3, std::vector<std::uint16_t>(count));
    std::vector<std::unique_ptr<Work>> works;
    for (auto& out : piped) {
      ReduceBuffer buffer = comm.acquire_reduce_buffer(count, dtype);
      std::memcpy(buffer.data, inputs[r].data(), count * 2);
      works.push_back(comm.all_reduce_start(std::move(buffer), out.data()));
    }
    for (std::size_t i = 0; i < works.size(); ++i) {
      works[i]->wait();
      ASSERT_EQ(piped[i], outputs[r]);
    }
  });
  for (int r = 0; r < p; ++r) EXPECT_EQ(outputs[r], expected) << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(Ranks, AllReduce,
                         ::testing::Combine(::testing::Values(2, 3, 4),
                                            ::testing::Values(DType::bf16, DType::f16)));

TEST(MessageTransport, RoundingAllReduceRoundsTheFp32SumsOnce) {
  const int p = 3;
  const std::size_t count = 37;
  std::vector<std::vector<float>> inputs(p, std::vector<float>(count));
  for (int r = 0; r < p; ++r) {
    for (std::size_t i = 0; i < count; ++i) inputs[r][i] = 1.0f + 0.001f * (i + 1) * (r + 1);
  }
  std::vector<const std::byte*> sources;
  for (const auto& input : inputs)
    sources.push_back(reinterpret_cast<const std::byte*>(input.data()));
  std::vector<float> sums(count);
  shm::sum_in_rank_order_portable(DType::f32, sources, count,
                                  reinterpret_cast<std::byte*>(sums.data()));
  Group group(p);
  std::vector<std::vector<std::uint16_t>> outputs(p, std::vector<std::uint16_t>(count));
  std::vector<std::vector<std::uint16_t>> through_f32(p, std::vector<std::uint16_t>(count));
  group.run([&](Communicator& comm) {
    const int r = comm.rank();
    comm.all_reduce_rounding_start(inputs[r].data(), outputs[r].data(), count, DType::bf16)->wait();
  });
  for (int r = 0; r < p; ++r) {
    for (std::size_t i = 0; i < count; ++i) {
      std::uint32_t bits = 0;
      std::memcpy(&bits, &sums[i], 4);
      const auto rounded = static_cast<std::uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
      ASSERT_EQ(outputs[r][i], rounded) << "rank " << r << " element " << i;
    }
  }
}

TEST(MessageTransport, GathersCarryEveryRanksBytes) {
  const int p = 3;
  const std::vector<std::size_t> counts{5, 0, 3};
  Group group(p);
  group.run([&](Communicator& comm) {
    const int r = comm.rank();
    // Lengths 0, 3000 (past the first round's slot) and 6.
    const auto length = [](int q) { return static_cast<std::size_t>(q == 1 ? 3000 : q * 3); };
    const auto strings = comm.all_gather(std::string(length(r), 'a' + r));
    for (int q = 0; q < p; ++q) ASSERT_EQ(strings[q], std::string(length(q), 'a' + q));
    const auto small = comm.all_gather(std::string(1, 'x'));
    ASSERT_EQ(small, std::vector<std::string>(p, "x"));
    std::vector<std::int32_t> out(8, -1);
    std::size_t offset = 0;
    for (int q = 0; q < r; ++q) offset += counts[q];
    for (std::size_t i = 0; i < counts[r]; ++i) out[offset + i] = 100 * r + static_cast<int>(i);
    comm.all_gather_start(out.data() + offset, out.data(), counts, DType::i32)->wait();  // in place
    const std::vector<std::int32_t> expected{0, 1, 2, 3, 4, 200, 201, 202};
    ASSERT_EQ(out, expected) << "rank " << r;
  });
}

TEST(MessageTransport, ASilentRankIsNamedAtTheDeadline) {
  Group group(3, 400ms);
  const auto start = std::chrono::steady_clock::now();
  group.run([&](Communicator& comm) {
    if (comm.rank() == 2) return;
    std::vector<std::uint16_t> data(64, 0x3F80);
    try {
      comm.all_reduce(data.data(), data.data(), data.size(), DType::bf16);
      ADD_FAILURE() << "rank " << comm.rank() << " finished without rank 2";
    } catch (const TimeoutError& error) {
      EXPECT_EQ(error.ranks(), std::vector<int>{2}) << error.what();
    } catch (const AbortedError& error) {  // the other waiting rank timed out first
      EXPECT_NE(std::string(error.what()).find("rank(s) 2"), std::string::npos) << error.what();
    }
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
}

// An engine that tells of its completions is waited on, not polled: rank 1
// starts 100 ms late, and rank 0 sleeps until its messages are posted.
TEST(MessageTransport, WaitsSleepUntilAnEngineSaysAMessageCompleted) {
  Group group(2, 20s, {}, /*signals=*/true);
  std::vector<std::vector<std::uint16_t>> data(2, std::vector<std::uint16_t>(100, 0x3F80));  // 1.0
  group.run([&](Communicator& comm) {
    if (comm.rank() == 1) std::this_thread::sleep_for(100ms);
    comm.all_reduce(data[comm.rank()].data(), data[comm.rank()].data(), 100, DType::bf16);
  });
  for (const auto& result : data)
    EXPECT_EQ(result, std::vector<std::uint16_t>(100, 0x4000));  // 2.0
  // Each await lasts until a post, or at most a few milliseconds: rank 0's
  // 100 ms took some, and far fewer than the polls of a paced wait.
  EXPECT_GT(group.office->awaits, 0);
  EXPECT_LT(group.office->awaits, 200);
}

// Its waits still end at the deadline, naming the silent rank.
TEST(MessageTransport, AnEngineThatSignalsStillTimesOut) {
  Group group(2, 300ms, {}, /*signals=*/true);
  const auto start = std::chrono::steady_clock::now();
  group.run([&](Communicator& comm) {
    if (comm.rank() == 1) return;
    std::vector<std::uint16_t> data(8, 0x3F80);
    try {
      comm.all_reduce(data.data(), data.data(), data.size(), DType::bf16);
      ADD_FAILURE() << "rank 0 finished without rank 1";
    } catch (const TimeoutError& error) {
      EXPECT_EQ(error.ranks(), std::vector<int>{1}) << error.what();
    }
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
}

TEST(MessageTransport, ErrorsNameTheJobsRanks) {
  Group group(3, 300ms, {4, 7, 9});  // a rail of a larger job
  group.run([&](Communicator& comm) {
    if (comm.rank() != 0) return;
    std::vector<std::uint16_t> data(8, 0x3F80);
    try {
      comm.all_reduce(data.data(), data.data(), data.size(), DType::bf16);
      ADD_FAILURE() << "finished without its peers";
    } catch (const TimeoutError& error) {
      EXPECT_EQ(error.ranks(), (std::vector<int>{7, 9})) << error.what();
      EXPECT_NE(std::string(error.what()).find("rank 4 waited"), std::string::npos) << error.what();
    }
  });
}

TEST(MessageTransport, ALostPeerIsNamed) {
  Group group(2);
  group.office->lost.insert(1);
  std::vector<std::uint16_t> data(16, 0x3F80);
  try {
    group.comms[0]->all_reduce(data.data(), data.data(), data.size(), DType::bf16);
    FAIL() << "no error with rank 1 lost";
  } catch (const PeerLostError& error) {
    EXPECT_EQ(error.ranks(), std::vector<int>{1}) << error.what();
  }
  EXPECT_THROW(group.comms[0]->barrier(), PeerLostError);  // the failure stays
}

TEST(MessageTransport, AnAbortReachesThePeersAtOnce) {
  Group group(2, 60s);
  const auto start = std::chrono::steady_clock::now();
  group.comms[0]->abort("stop here");
  std::vector<std::uint16_t> data(16, 0x3F80);
  try {
    group.comms[1]->all_reduce(data.data(), data.data(), data.size(), DType::bf16);
    FAIL() << "no error after rank 0 aborted";
  } catch (const AbortedError& error) {
    EXPECT_EQ(error.ranks(), std::vector<int>{0});
    EXPECT_NE(std::string(error.what()).find("stop here"), std::string::npos) << error.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
}

}  // namespace
}  // namespace tpfuse::comm
