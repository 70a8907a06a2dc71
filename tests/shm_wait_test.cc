// PeerWait's failure paths that timing alone decides: a peer that does its
// part and exits between two looks of a waiting rank arrived, and is not lost.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "comm/shm_group.h"
#include "comm/shm_segment.h"
#include "comm/shm_wait.h"
#include "tpfuse/core/error.h"

namespace tpfuse::comm::shm {
namespace {

using namespace std::chrono_literals;

// The waiting rank's first look finds rank 1 not yet arrived; rank 1 then
// arrives and exits before the liveness check (forced here: the first look
// waits for rank 1's process to end). Seen slow under ThreadSanitizer, where
// a rank finishing an all_gather was reported dead by a peer still in it.
TEST(PeerWait, PeerThatArrivedAndExitedIsNotLost) {
  Segment segment = Segment::create(Segment::random_name(), 2, 4096, AlgorithmChoice::automatic);
  const std::string name = segment.name();
  const pid_t child = ::fork();
  if (child == 0) {
    try {
      Segment::attach(name, 2).value().attach_rank(1);
    } catch (...) {
      ::_exit(1);
    }
    ::_exit(0);
  }
  ASSERT_GT(child, 0);
  segment.attach_rank(0);
  ShmGroup group(std::move(segment), 0, 10s);

  bool first_look = true;
  auto arrived = [&](int) {
    if (!first_look) return true;
    first_look = false;
    int status = 0;
    EXPECT_EQ(::waitpid(child, &status, 0), child);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    std::this_thread::sleep_for(50ms);  // past the first liveness check
    return false;
  };
  PeerWait wait(group);
  wait.start({"all-gather", 1, "to contribute"});
  bool done = false;
  EXPECT_NO_THROW(done = wait.poll(arrived)) << "a peer that arrived was reported lost";
  EXPECT_TRUE(done || wait.poll(arrived));
  group.segment.unlink();
}

// The same peer gone without arriving is lost, and named.
TEST(PeerWait, PeerGoneWithoutArrivingIsLost) {
  Segment segment = Segment::create(Segment::random_name(), 2, 4096, AlgorithmChoice::automatic);
  const std::string name = segment.name();
  const pid_t child = ::fork();
  if (child == 0) {
    try {
      Segment::attach(name, 2).value().attach_rank(1);
    } catch (...) {
      ::_exit(1);
    }
    ::_exit(0);
  }
  ASSERT_GT(child, 0);
  segment.attach_rank(0);
  ShmGroup group(std::move(segment), 0, 10s);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  std::this_thread::sleep_for(50ms);
  PeerWait wait(group);
  wait.start({"all-gather", 1, "to contribute"});
  std::this_thread::sleep_for(50ms);
  try {
    wait.poll([](int) { return false; });
    ADD_FAILURE() << "a peer gone without arriving was not reported";
  } catch (const PeerLostError& error) {
    EXPECT_EQ(error.ranks(), std::vector<int>{1});
    EXPECT_NE(std::string(error.what()).find("all-gather #1: rank 1 (pid "), std::string::npos)
        << error.what();
  }
  group.segment.unlink();
}

}  // namespace
}  // namespace tpfuse::comm::shm
