// The resource samples `tpfuse soak` judges leaks by: the /proc parsers on
// fixed texts, and each sample against a change this test makes (memory
// touched, descriptors opened, a communicator's segment mapped, files in a
// directory), so that a sampler blind to a kind of leak fails here.
#include "tpfuse/testing/resources.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/core/error.h"

namespace tpfuse::testing {
namespace {

TEST(ParseVmRss, ReadsKibibytesAsBytes) {
  const std::string status =
      "Name:\ttpfuse\nVmPeak:\t  999999 kB\nVmRSS:\t   12345 kB\nRssAnon:\t 100 kB\n";
  EXPECT_EQ(parse_vm_rss(status), 12345 * 1024);
  EXPECT_EQ(parse_vm_rss("VmRSS: 0 kB"), 0);
}

TEST(ParseVmRss, RejectsMissingOrMalformedLine) {
  EXPECT_THROW(parse_vm_rss("Name:\ttpfuse\nVmPeak:\t 10 kB\n"), Error);
  EXPECT_THROW(parse_vm_rss("VmRSS:\t 12x kB\n"), Error);
  EXPECT_THROW(parse_vm_rss("VmRSS:\t 12 pages\n"), Error);
  EXPECT_THROW(parse_vm_rss("VmRSS:\n"), Error);
}

TEST(CountMappings, CountsPathsWithThePrefixOnly) {
  const std::string maps =
      "7f0000000000-7f0000401000 rw-s 00000000 00:1a 1234   /dev/shm/tpfuse-0123abcd (deleted)\n"
      "7f0000500000-7f0000502000 rw-s 00000000 00:1a 1235   /dev/shm/tpfuse-4567 (deleted)\n"
      "7f0000600000-7f0000601000 rw-s 00000000 00:1a 1236   /dev/shm/other\n"
      "7f0000700000-7f0000710000 r-xp 00000000 08:01 99     /usr/lib/lib with space.so\n"
      "7f0000800000-7f0000900000 rw-p 00000000 00:00 0 \n"
      "\n";
  const MappingCount tpfuse = count_mappings(maps, kSegmentPathPrefix);
  EXPECT_EQ(tpfuse.mappings, 2);
  EXPECT_EQ(tpfuse.bytes, 0x401000 + 0x2000);
  const MappingCount spaced = count_mappings(maps, "/usr/lib/lib with space");
  EXPECT_EQ(spaced.mappings, 1);
  EXPECT_EQ(spaced.bytes, 0x10000);
  EXPECT_EQ(count_mappings("", kSegmentPathPrefix).mappings, 0);
}

TEST(CountMappings, RejectsMalformedLines) {
  EXPECT_THROW(count_mappings("not a maps line\n", "/x"), Error);
  EXPECT_THROW(count_mappings("7f00-zz rw-p 0 00:00 0\n", "/x"), Error);
  EXPECT_THROW(count_mappings("7f10-7f00 rw-p 0 00:00 0\n", "/x"), Error);
  EXPECT_THROW(count_mappings("7f00-7f10 rw-p 0\n", "/x"), Error);
}

TEST(SampleProcessResources, SeesMemoryTouched) {
  constexpr std::size_t kBytes = std::size_t{16} << 20;
  const ProcessResources before = sample_process_resources();
  void* memory =
      ::mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(memory, MAP_FAILED);
  const long page = ::sysconf(_SC_PAGESIZE);
  for (std::size_t at = 0; at < kBytes; at += static_cast<std::size_t>(page)) {
    static_cast<volatile char*>(memory)[at] = 1;
  }
  const ProcessResources touched = sample_process_resources();
  ::munmap(memory, kBytes);
  const ProcessResources after = sample_process_resources();
  EXPECT_GE(touched.rss_bytes - before.rss_bytes, static_cast<std::int64_t>(kBytes));
  EXPECT_LT(after.rss_bytes, touched.rss_bytes - static_cast<std::int64_t>(kBytes) / 2);
}

TEST(SampleProcessResources, CountsDescriptorsExactly) {
  const ProcessResources before = sample_process_resources();
  std::vector<int> fds;
  for (int i = 0; i < 3; ++i) fds.push_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  for (int fd : fds) ASSERT_GE(fd, 0);
  const ProcessResources open = sample_process_resources();
  for (int fd : fds) ::close(fd);
  const ProcessResources closed = sample_process_resources();
  EXPECT_EQ(open.open_fds, before.open_fds + 3);
  EXPECT_EQ(closed.open_fds, before.open_fds);
  EXPECT_GT(before.open_fds, 2);  // at least stdin, stdout and stderr
}

TEST(SampleProcessResources, SeesACommunicatorsSegment) {
  const std::filesystem::path dir = comm::FileStore::make_private_dir();
  const ProcessResources before = sample_process_resources();
  ProcessResources held;
  {
    comm::FileStore store(dir);
    comm::ShmOptions options;
    options.timeout = std::chrono::seconds(10);
    options.slot_bytes = 4096;
    const auto communicator = comm::create_shm_communicator(store, 0, 1, options);
    held = sample_process_resources();
  }
  const ProcessResources after = sample_process_resources();
  std::filesystem::remove_all(dir);
  EXPECT_EQ(held.segment_mappings, before.segment_mappings + 1);
  EXPECT_GT(held.segment_mapped_bytes, before.segment_mapped_bytes);
  EXPECT_EQ(after.segment_mappings, before.segment_mappings);
  EXPECT_EQ(after.segment_mapped_bytes, before.segment_mapped_bytes);
}

TEST(SampleShmUsage, CountsRegularFilesWithThePrefix) {
  const std::filesystem::path dir = comm::FileStore::make_private_dir();
  {
    std::ofstream(dir / "tpfuse-a") << std::string(10000, 'x');
    std::ofstream(dir / "tpfuse-b");
    std::ofstream(dir / "other") << std::string(50000, 'y');
  }
  std::filesystem::create_directory(dir / "tpfuse-dir");
  const ShmUsage usage = sample_shm_usage(dir, "tpfuse-");
  EXPECT_EQ(usage.entries, 2);
  EXPECT_GE(usage.bytes, 10000);
  EXPECT_LT(usage.bytes, 50000);
  std::filesystem::remove_all(dir);
  const ShmUsage gone = sample_shm_usage(dir, "tpfuse-");
  EXPECT_EQ(gone.entries, 0);
  EXPECT_EQ(gone.bytes, 0);
}

}  // namespace
}  // namespace tpfuse::testing
