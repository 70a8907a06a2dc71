// A job's segment and rendezvous store are private to it: another user
// cannot open the segment (while it has a name) or the store; a process that
// does not hold the job's secret is refused at the rendezvous, at once and
// with a clear error, and the job goes on. Also SHA-256 and JobSecret.
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <pwd.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "comm/shm_segment.h"
#include "rank_harness.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"

namespace tpfuse::comm {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using test::expect_rank;

std::string hex(const std::array<std::uint8_t, 32>& digest) {
  std::string text;
  char byte[3];
  for (const std::uint8_t b : digest) {
    std::snprintf(byte, sizeof byte, "%02x", b);
    text += byte;
  }
  return text;
}

// Waits, bounded, for a child; kills it at the deadline. Returns its exit
// code, or 128 + the signal that ended it.
int wait_child(pid_t pid, std::chrono::milliseconds deadline) {
  const auto until = Clock::now() + deadline;
  int status = 0;
  while (true) {
    const pid_t done = ::waitpid(pid, &status, WNOHANG);
    if (done == pid) break;
    if (done < 0 && errno != EINTR) return -1;
    if (Clock::now() >= until) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      break;
    }
    std::this_thread::sleep_for(5ms);
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Runs `body` in a forked child (exit code 0 when it returns true) and
// returns that child's exit code.
int run_in_child(const std::function<bool()>& body, std::chrono::milliseconds deadline = 20s) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    bool ok = false;
    try {
      ok = body();
    } catch (const std::exception& error) {
      std::fprintf(stderr, "child: unexpected error: %s\n", error.what());
    }
    std::fflush(nullptr);
    ::_exit(ok ? 0 : 1);
  }
  return pid < 0 ? -1 : wait_child(pid, deadline);
}

// ---- SHA-256 and the secret ------------------------------------------------------

TEST(JobSecret, Sha256MatchesTheStandardsVectors) {
  EXPECT_EQ(hex(sha256("")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(hex(sha256("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex(sha256("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  // Lengths at the padding's edges (one or two final blocks), and many blocks.
  EXPECT_EQ(hex(sha256(std::string(55, 'a'))),
            "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318");
  EXPECT_EQ(hex(sha256(std::string(56, 'a'))),
            "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a");
  EXPECT_EQ(hex(sha256(std::string(64, 'a'))),
            "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb");
  EXPECT_EQ(hex(sha256(std::string(1000000, 'a'))),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(JobSecret, RoundTripsAndRejectsMalformedTextWithoutEchoingIt) {
  const JobSecret a = JobSecret::generate();
  const JobSecret b = JobSecret::generate();
  EXPECT_EQ(a.hex().size(), 32u);
  EXPECT_NE(a.hex(), b.hex()) << "two generated secrets are equal";
  EXPECT_EQ(JobSecret::parse(a.hex(), "test").hex(), a.hex());
  std::string upper = a.hex();
  std::transform(upper.begin(), upper.end(), upper.begin(), ::toupper);
  EXPECT_EQ(JobSecret::parse(upper, "test").verifier(), a.verifier());
  EXPECT_NE(a.verifier(), b.verifier());
  EXPECT_NE(a.key_prefix(), b.key_prefix());
  EXPECT_EQ(a.verifier().find(a.hex()), std::string::npos) << "the verifier shows the secret";
  EXPECT_EQ(a.key_prefix().find(a.hex().substr(0, 8)), std::string::npos);

  for (const std::string& bad : {std::string(), std::string(31, 'a'), std::string(33, 'a'),
                                "zz" + std::string(30, 'a')}) {
    try {
      JobSecret::parse(bad, "TPFUSE_SECRET");
      ADD_FAILURE() << "accepted \"" << bad << "\"";
    } catch (const InvalidArgument& error) {
      const std::string what = error.what();
      EXPECT_EQ(what.rfind("TPFUSE_SECRET: expected 32 hex digits", 0), 0u) << what;
      if (!bad.empty()) {
        EXPECT_EQ(what.find(bad), std::string::npos) << "echoed: " << what;
      }
    }
  }
}

// ---- another user ------------------------------------------------------------------

// Rank 0 creates the segment and waits for rank 1; in that window (the only
// one in which the segment has a name) a child running as `nobody` tries to
// open the segment and everything in the store. Every attempt must fail with
// EACCES. Then rank 1 joins and the job works.
TEST(Isolation, AnotherUserCannotOpenTheSegmentOrTheStore) {
  if (::geteuid() != 0) {
    GTEST_SKIP() << "needs root, to run a child as the user nobody (CI runs as root)";
  }
  const passwd* nobody = ::getpwnam("nobody");
  ASSERT_NE(nobody, nullptr) << "no user nobody on this system";
  const uid_t uid = nobody->pw_uid;
  const gid_t gid = nobody->pw_gid;

  const std::filesystem::path dir = FileStore::make_private_dir();
  FileStore store(dir);
  const JobSecret secret = JobSecret::generate();
  seal_store(store, secret);
  ShmOptions options;
  options.timeout = 20s;
  options.secret = secret.hex();
  std::shared_ptr<Communicator> rank0;
  std::exception_ptr rank0_error;
  std::thread creator([&] {
    try {
      rank0 = create_shm_communicator(store, 0, 2, options);
    } catch (...) {
      rank0_error = std::current_exception();
    }
  });
  const std::string segment_key = secret.key_prefix() + shm::kSegmentKey;
  const std::string name = store.get(segment_key, 10s);

  // Everything the child touches is prepared here: after fork() in a
  // threaded process it makes only system calls.
  struct Attempt {
    std::string what;
    std::function<int()> call;  // returns the call's result; errno tells why it failed
  };
  const std::string dev_shm = "/dev/shm" + name;
  const std::string key_path = (dir / segment_key).string();
  const std::string verifier_path = (dir / JobSecret::kVerifierKey).string();
  const std::string new_key_path = (dir / "intruder").string();
  const std::vector<Attempt> attempts = {
      {"shm_open(segment, O_RDWR)", [&] { return ::shm_open(name.c_str(), O_RDWR, 0); }},
      {"shm_open(segment, O_RDONLY)", [&] { return ::shm_open(name.c_str(), O_RDONLY, 0); }},
      {"open(/dev/shm/segment)", [&] { return ::open(dev_shm.c_str(), O_RDONLY); }},
      {"open(store, O_DIRECTORY) to list it",
       [&] { return ::open(dir.c_str(), O_RDONLY | O_DIRECTORY); }},
      {"open(store/segment key)", [&] { return ::open(key_path.c_str(), O_RDONLY); }},
      {"open(store/verifier)", [&] { return ::open(verifier_path.c_str(), O_RDONLY); }},
      {"create(store/new key)",
       [&] { return ::open(new_key_path.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600); }},
  };
  int report[2];
  ASSERT_EQ(::pipe(report), 0);
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(report[0]);
    int results[16] = {};  // per attempt: 0 when it failed with EACCES, else errno or -1
    if (::setgroups(0, nullptr) != 0 || ::setgid(gid) != 0 || ::setuid(uid) != 0 ||
        ::geteuid() == 0) {
      ::_exit(2);
    }
    for (std::size_t i = 0; i < attempts.size(); ++i) {
      errno = 0;
      const int result = attempts[i].call();
      results[i] = result >= 0 ? -1 : (errno == EACCES ? 0 : errno);
      // A segment that opened would be mappable too: try, to report it.
      if (result >= 0 && i < 3 &&
          ::mmap(nullptr, 4096, PROT_READ, MAP_SHARED, result, 0) != MAP_FAILED) {
        results[i] = -2;
      }
    }
    const ssize_t written = ::write(report[1], results, sizeof results);
    ::_exit(written == static_cast<ssize_t>(sizeof results) ? 0 : 3);
  }
  ::close(report[1]);
  ASSERT_GT(pid, 0);
  int results[16] = {};
  const ssize_t got = ::read(report[0], results, sizeof results);
  ::close(report[0]);
  EXPECT_EQ(wait_child(pid, 10s), 0) << "the child could not become nobody";
  ASSERT_EQ(got, static_cast<ssize_t>(sizeof results));
  for (std::size_t i = 0; i < attempts.size(); ++i) {
    EXPECT_EQ(results[i], 0) << "as nobody, " << attempts[i].what << " did not fail with EACCES: "
                             << (results[i] == -1   ? "it succeeded"
                                 : results[i] == -2 ? "it succeeded and the segment mapped"
                                                    : std::strerror(results[i]));
  }

  auto rank1 = create_shm_communicator(store, 1, 2, options);
  creator.join();
  ASSERT_FALSE(rank0_error);
  float value0 = 1.0f, value1 = 2.0f;
  std::thread peer([&] { rank0->all_reduce(&value0, &value0, 1, DType::f32); });
  rank1->all_reduce(&value1, &value1, 1, DType::f32);
  peer.join();
  EXPECT_EQ(value0, 3.0f);
  EXPECT_EQ(value1, 3.0f);
  std::filesystem::remove_all(dir);
}

// ---- the job's secret --------------------------------------------------------------

// A stray process tries to join as `rank` of 2 with `secret_hex` ("" for
// none); it must be refused with AccessDenied saying why, well before its
// deadline (refused, not timed out).
bool refused(const std::filesystem::path& dir, int rank, const std::string& secret_hex,
             const std::string& expected) {
  FileStore store(dir);
  ShmOptions options;
  options.timeout = 20s;
  options.secret = secret_hex;
  const auto start = Clock::now();
  try {
    create_shm_communicator(store, rank, 2, options);
    std::fprintf(stderr, "stray rank %d joined the job\n", rank);
    return false;
  } catch (const AccessDenied& error) {
    const std::string what = error.what();
    const bool named = what.find("shm setup: refused to join") != std::string::npos &&
                       what.find(expected) != std::string::npos;
    const bool quick = Clock::now() - start < options.timeout / 4;
    if (!named || !quick) std::fprintf(stderr, "stray rank %d: %s\n", rank, what.c_str());
    return named && quick;
  }
}

// The real ranks are processes; rank 0 is waiting in the rendezvous for
// rank 1 while strays come: without a secret, with a wrong one, claiming
// rank 0 or 1, through create_shm_communicator_from_env too. Each is refused
// without writing anything into the store, and the job then completes.
TEST(Isolation, ProcessWithoutTheSecretIsRefusedAndTheJobGoesOn) {
  const std::filesystem::path dir = FileStore::make_private_dir();
  FileStore store(dir);
  const JobSecret secret = JobSecret::generate();
  seal_store(store, secret);

  auto real_rank = [&](int rank) {
    return [&, rank] {
      FileStore own(dir);
      ShmOptions options;
      options.timeout = 20s;
      options.secret = secret.hex();
      auto comm = create_shm_communicator(own, rank, 2, options);
      std::vector<float> data(1000, static_cast<float>(rank + 1));
      comm->all_reduce(data.data(), data.data(), data.size(), DType::f32);
      const bool ok = std::all_of(data.begin(), data.end(), [](float v) { return v == 3.0f; });
      if (!ok) std::fprintf(stderr, "real rank %d: wrong sum\n", rank);
      return ok;
    };
  };
  std::fflush(nullptr);
  std::vector<pid_t> real(2);
  real[0] = ::fork();
  if (real[0] == 0) ::_exit(real_rank(0)() ? 0 : 1);
  ASSERT_GT(real[0], 0);
  const std::string segment_key = secret.key_prefix() + shm::kSegmentKey;
  const std::string name = store.get(segment_key, 10s);
  // Rank 0 now waits for rank 1 and writes nothing more.
  auto keys = [&] {
    std::set<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      names.insert(entry.path().filename().string());
    }
    return names;
  };
  const std::set<std::string> keys_before = keys();
  for (const std::string& key : keys_before) {
    EXPECT_TRUE(key == JobSecret::kVerifierKey || key.rfind(secret.key_prefix(), 0) == 0)
        << "a key of the job outside its prefix: " << key;
  }

  const std::string wrong = JobSecret::generate().hex();
  const char* none_text = "this process holds none";
  const char* wrong_text = "is not the one the job's store is sealed with";
  EXPECT_EQ(run_in_child([&] { return refused(dir, 1, "", none_text); }), 0) << "no secret, rank 1";
  EXPECT_EQ(run_in_child([&] { return refused(dir, 0, "", none_text); }), 0) << "no secret, rank 0";
  EXPECT_EQ(run_in_child([&] { return refused(dir, 1, wrong, wrong_text); }), 0)
      << "wrong secret, rank 1";
  EXPECT_EQ(run_in_child([&] { return refused(dir, 0, wrong, wrong_text); }), 0)
      << "wrong secret, rank 0";
  EXPECT_EQ(run_in_child([&] {
              ::setenv("TPFUSE_RANK", "1", 1);
              ::setenv("TPFUSE_WORLD_SIZE", "2", 1);
              ::setenv("TPFUSE_STORE_DIR", dir.c_str(), 1);
              ::unsetenv("TPFUSE_SECRET");
              try {
                create_shm_communicator_from_env();
              } catch (const AccessDenied& error) {
                return std::string(error.what()).find(none_text) != std::string::npos;
              }
              return false;
            }),
            0)
      << "no TPFUSE_SECRET, from the environment";

  EXPECT_EQ(keys(), keys_before) << "a stray process wrote into the job's store";

  real[1] = ::fork();
  if (real[1] == 0) ::_exit(real_rank(1)() ? 0 : 1);
  ASSERT_GT(real[1], 0);
  EXPECT_EQ(wait_child(real[0], 30s), 0) << "real rank 0";
  EXPECT_EQ(wait_child(real[1], 30s), 0) << "real rank 1";
  EXPECT_NE(::shm_unlink(name.c_str()), 0) << "the job's segment was left in /dev/shm";
  std::filesystem::remove_all(dir);
}

// launch_local makes the store, generates the secret, seals the store and
// gives the secret to its ranks only: a stray forked by a rank without it
// is refused, and the job goes on.
TEST(Isolation, LaunchLocalSealsItsStoreAndRefusesAStray) {
  const auto result = test::run_ranks(2, [](RankContext& ctx) {
    const char* text = std::getenv("TPFUSE_SECRET");
    expect_rank(text != nullptr, "launch_local did not set TPFUSE_SECRET");
    const JobSecret secret = JobSecret::parse(text, "TPFUSE_SECRET");
    FileStore store(std::getenv("TPFUSE_STORE_DIR"));
    expect_rank(store.try_get(JobSecret::kVerifierKey) == secret.verifier(),
                "the store is not sealed with the ranks' secret");
    if (ctx.rank == 0) {
      const int stray = run_in_child([] {
        ::unsetenv("TPFUSE_SECRET");
        try {
          create_shm_communicator_from_env();
        } catch (const AccessDenied& error) {
          return std::string(error.what()).find("holds none") != std::string::npos;
        }
        return false;
      });
      expect_rank(stray == 0, "the stray was not refused (exit ", stray, ")");
    }
    float value = static_cast<float>(ctx.rank + 1);
    ctx.comm->all_reduce(&value, &value, 1, DType::f32);
    expect_rank(value == 3.0f, "rank ", ctx.rank, " got ", value);
    return 0;
  });
  EXPECT_TRUE(result.ok()) << result.describe_failures();
}

// Ranks started otherwise share TPFUSE_SECRET and an unsealed directory:
// rank 0 seals it, rank 1 waits for that seal, and a stray with another
// secret that comes afterwards is refused.
TEST(Isolation, RankZeroSealsAStoreTheUserMade) {
  const std::filesystem::path dir = FileStore::make_private_dir();
  FileStore store(dir);
  ShmOptions options;
  options.timeout = 20s;
  options.secret = JobSecret::generate().hex();
  std::shared_ptr<Communicator> rank1;
  std::exception_ptr rank1_error;
  std::thread joiner([&] {
    try {
      rank1 = create_shm_communicator(store, 1, 2, options);
    } catch (...) {
      rank1_error = std::current_exception();
    }
  });
  std::this_thread::sleep_for(100ms);  // rank 1 waits for the seal
  auto rank0 = create_shm_communicator(store, 0, 2, options);
  joiner.join();
  ASSERT_FALSE(rank1_error);
  ASSERT_TRUE(rank1);
  EXPECT_EQ(store.try_get(JobSecret::kVerifierKey),
            JobSecret::parse(options.secret, "secret").verifier());
  ShmOptions stray = options;
  stray.secret = JobSecret::generate().hex();
  EXPECT_THROW(create_shm_communicator(store, 1, 2, stray), AccessDenied);
  ShmOptions malformed = options;
  malformed.secret = "not-a-secret";
  try {
    create_shm_communicator(store, 1, 2, malformed);
    ADD_FAILURE() << "a malformed secret was accepted";
  } catch (const InvalidArgument& error) {
    EXPECT_NE(std::string(error.what()).find("TPFUSE_SECRET"), std::string::npos) << error.what();
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace tpfuse::comm
