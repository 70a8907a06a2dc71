// Creating, attaching, verifying and unlinking the shm transport's segment,
// the group's abort records and its doorbell.
#include "comm/shm_segment.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#include "comm/unique_fd.h"
#include "tpfuse/core/error.h"

namespace tpfuse::comm::shm {

namespace {

constexpr std::uint64_t kMagic = 0x4d53657375667074;  // "tpfuseSM" in little-endian bytes
constexpr std::uint32_t kVersion = 5;
constexpr mode_t kSegmentMode = 0600;

// The names this process created and has not unlinked. A process that must
// end abruptly unlinks them under the lock and ends holding it, so a segment
// is either named here or never created.
struct CreatedNames {
  std::mutex mutex;
  std::vector<std::string> names;
};

CreatedNames& created_names() {
  static auto* names = new CreatedNames;  // never destroyed: used until _exit
  return *names;
}

int create_and_record(const std::string& name) {
  CreatedNames& created = created_names();
  const std::lock_guard lock(created.mutex);
  const int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, kSegmentMode);
  if (fd >= 0) created.names.push_back(name);
  return fd;
}

// shm_unlink, and the name is no longer this process's to remove.
int unlink_created(const std::string& name) {
  CreatedNames& created = created_names();
  const std::lock_guard lock(created.mutex);
  std::erase(created.names, name);
  return ::shm_unlink(name.c_str());
}

void fill_random(unsigned char* bytes, std::size_t count) {
  std::size_t filled = 0;
  while (filled < count) {
    const ssize_t n = ::getrandom(bytes + filled, count - filled, 0);
    if (n > 0) {
      filled += static_cast<std::size_t>(n);
    } else if (errno != EINTR) {
      break;
    }
  }
  if (filled == count) return;
  // getrandom is missing (old kernel, seccomp): fall back to the device.
  UniqueFd urandom(::open("/dev/urandom", O_RDONLY | O_CLOEXEC));
  if (!urandom.valid()) throw_system_error("shm setup: open(/dev/urandom)", errno);
  while (filled < count) {
    const ssize_t n = ::read(urandom.get(), bytes + filled, count - filled);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw_system_error("shm setup: read(/dev/urandom)", n < 0 ? errno : EIO);
    filled += static_cast<std::size_t>(n);
  }
}

std::string random_hex(std::size_t bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  unsigned char raw[32];
  fill_random(raw, bytes);
  std::string hex;
  for (std::size_t i = 0; i < bytes; ++i) {
    hex += kDigits[raw[i] >> 4];
    hex += kDigits[raw[i] & 15];
  }
  return hex;
}

// A mapping that is unmapped unless handed over with release().
class MappedRegion {
 public:
  MappedRegion(int fd, std::size_t bytes, const std::string& name) : bytes_(bytes) {
    base_ = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base_ == MAP_FAILED) {
      base_ = nullptr;
      throw_system_error(cat("shm setup: mmap(", name, ", ", bytes, " bytes)"), errno);
    }
  }
  MappedRegion(const MappedRegion&) = delete;
  MappedRegion& operator=(const MappedRegion&) = delete;
  ~MappedRegion() {
    if (base_ != nullptr) ::munmap(base_, bytes_);
  }
  std::byte* base() const { return static_cast<std::byte*>(base_); }
  void* release() { return std::exchange(base_, nullptr); }

 private:
  void* base_ = nullptr;
  std::size_t bytes_;
};

// Unlinks a freshly created name unless setup reaches the point where the
// Segment object owns it.
class UnlinkUnlessDismissed {
 public:
  explicit UnlinkUnlessDismissed(const std::string& name) : name_(name) {}
  UnlinkUnlessDismissed(const UnlinkUnlessDismissed&) = delete;
  UnlinkUnlessDismissed& operator=(const UnlinkUnlessDismissed&) = delete;
  ~UnlinkUnlessDismissed() {
    if (armed_) unlink_created(name_);
  }
  void dismiss() { armed_ = false; }

 private:
  const std::string& name_;
  bool armed_ = true;
};

// A segment readable or writable by anyone else would let another user read
// activations or forge flags: insist on ours, 0600.
void verify_owner_and_mode(int fd, const std::string& name, struct stat& info) {
  if (::fstat(fd, &info) != 0) throw_system_error(cat("shm setup: fstat(", name, ")"), errno);
  if (info.st_uid != ::geteuid()) {
    throw SystemError(cat("shm setup: segment ", name, " belongs to uid ", info.st_uid,
                          ", expected this process's uid ", ::geteuid()));
  }
  const mode_t mode = info.st_mode & 0777;
  if (mode != kSegmentMode) {
    throw SystemError(
        cat("shm setup: segment ", name, " has mode 0", std::oct, mode, ", expected 0600"));
  }
}

void reserve_memory(int fd, std::size_t bytes, const std::string& name) {
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    throw_system_error(cat("shm setup: ftruncate(", name, ", ", bytes, ")"), errno);
  }
  // Reserving the pages now turns a full /dev/shm into a clear error here
  // rather than a SIGBUS at the first write into the mapping.
  const int err = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (err == ENOSPC) {
    throw SystemError(cat("shm setup: /dev/shm has no room for ", bytes, " bytes (segment ", name,
                          "); free space there or lower TPFUSE_SHM_SLOT_BYTES"));
  }
  if (err != 0 && err != EOPNOTSUPP && err != EINVAL) {
    throw_system_error(cat("shm setup: posix_fallocate(", name, ")"), err);
  }
}

}  // namespace

SegmentLayout SegmentLayout::compute(int world_size, std::size_t slot_bytes) {
  const auto ranks = static_cast<std::size_t>(world_size);
  SegmentLayout layout;
  std::size_t offset = sizeof(SegmentHeader);
  layout.state = offset;
  offset += sizeof(SegmentState);
  layout.doorbell = offset;
  offset += sizeof(Doorbell);
  layout.records = offset;
  offset += ranks * sizeof(RankRecord);
  layout.ring_flags = offset;
  offset += ranks * kRingDepth * sizeof(RoundFlags);
  layout.gather_flags = offset;
  offset += ranks * sizeof(SlotFlags);
  layout.round_headers = offset;
  offset += ranks * kRingDepth * kRoundHeaderBytes;
  layout.ring_slots = offset;
  offset += ranks * kRingDepth * slot_bytes;
  layout.gather_slots = offset;
  offset += ranks * Channel::kSlotsPerRank * kGatherSlotBytes;
  layout.total_bytes = offset;
  return layout;
}

Segment::Segment(std::string name, void* base, std::size_t bytes, bool owns_name)
    : name_(std::move(name)),
      base_(base),
      bytes_(bytes),
      owns_name_(owns_name),
      header_(static_cast<SegmentHeader*>(base)),
      state_(nullptr),
      doorbell_(nullptr),
      records_(nullptr),
      ring_(nullptr, nullptr, nullptr, 1, 0),
      gather_(nullptr, nullptr, 0) {
  auto* bytes_at = static_cast<std::byte*>(base);
  const SegmentLayout layout =
      SegmentLayout::compute(static_cast<int>(header_->world_size), header_->slot_bytes);
  state_ = std::launder(reinterpret_cast<SegmentState*>(bytes_at + layout.state));
  doorbell_ = std::launder(reinterpret_cast<Doorbell*>(bytes_at + layout.doorbell));
  records_ = std::launder(reinterpret_cast<RankRecord*>(bytes_at + layout.records));
  ring_ = Ring(std::launder(reinterpret_cast<RoundFlags*>(bytes_at + layout.ring_flags)),
               bytes_at + layout.round_headers, bytes_at + layout.ring_slots, kRingDepth,
               header_->slot_bytes);
  gather_ = Channel(std::launder(reinterpret_cast<SlotFlags*>(bytes_at + layout.gather_flags)),
                    bytes_at + layout.gather_slots, kGatherSlotBytes);
}

Segment::Segment(Segment&& other) noexcept
    : name_(std::move(other.name_)),
      base_(std::exchange(other.base_, nullptr)),
      bytes_(other.bytes_),
      owns_name_(std::exchange(other.owns_name_, false)),
      header_(other.header_),
      state_(other.state_),
      doorbell_(other.doorbell_),
      records_(other.records_),
      ring_(other.ring_),
      gather_(other.gather_) {}

Segment::~Segment() {
  if (owns_name_) unlink_created(name_);
  if (base_ != nullptr) ::munmap(base_, bytes_);
}

void unlink_created_segments_and_end(int exit_code) noexcept {
  CreatedNames& created = created_names();
  created.mutex.lock();
  for (const std::string& name : created.names) ::shm_unlink(name.c_str());
  ::_exit(exit_code);
}

std::string Segment::random_name() { return "/tpfuse-" + random_hex(16); }

Segment Segment::create(const std::string& name, int world_size, std::size_t slot_bytes,
                        AlgorithmChoice algorithm) {
  const SegmentLayout layout = SegmentLayout::compute(world_size, slot_bytes);
  UniqueFd fd(create_and_record(name));
  if (!fd.valid())
    throw_system_error(cat("shm setup: shm_open(", name, ", O_CREAT | O_EXCL)"), errno);
  UnlinkUnlessDismissed unlink_on_failure(name);

  // The umask can only remove bits; fchmod makes the mode exactly 0600 and the
  // check below catches a file system that ignores it.
  if (::fchmod(fd.get(), kSegmentMode) != 0)
    throw_system_error(cat("shm setup: fchmod(", name, ")"), errno);
  struct stat info {};
  verify_owner_and_mode(fd.get(), name, info);
  reserve_memory(fd.get(), layout.total_bytes, name);
  MappedRegion region(fd.get(), layout.total_bytes, name);

  auto* header = new (region.base()) SegmentHeader{};
  header->magic = kMagic;
  header->version = kVersion;
  header->world_size = static_cast<std::uint32_t>(world_size);
  header->total_bytes = layout.total_bytes;
  header->slot_bytes = slot_bytes;
  header->gather_slot_bytes = kGatherSlotBytes;
  const std::string token = random_hex(8);
  std::memcpy(header->group_token, token.c_str(), token.size() + 1);
  header->ring_depth = kRingDepth;
  header->algorithm = algorithm;
  new (region.base() + layout.state) SegmentState{};
  new (region.base() + layout.doorbell) Doorbell{};
  for (int r = 0; r < world_size; ++r) {
    new (region.base() + layout.records + r * sizeof(RankRecord)) RankRecord{};
    new (region.base() + layout.gather_flags + r * sizeof(SlotFlags)) SlotFlags{};
  }
  for (std::size_t i = 0; i < static_cast<std::size_t>(world_size) * kRingDepth; ++i) {
    new (region.base() + layout.ring_flags + i * sizeof(RoundFlags)) RoundFlags{};
  }

  unlink_on_failure.dismiss();
  return Segment(name, region.release(), layout.total_bytes, /*owns_name=*/true);
}

std::optional<Segment> Segment::attach(const std::string& name, int world_size) {
  UniqueFd fd(::shm_open(name.c_str(), O_RDWR, 0));
  if (!fd.valid() && errno == ENOENT) return std::nullopt;
  if (!fd.valid()) throw_system_error(cat("shm setup: shm_open(", name, ")"), errno);
  struct stat info {};
  verify_owner_and_mode(fd.get(), name, info);
  const auto bytes = static_cast<std::size_t>(info.st_size);
  if (bytes < sizeof(SegmentHeader)) {
    throw CommError(
        cat("shm setup: segment ", name, " has ", bytes, " bytes, too few for a header"));
  }
  MappedRegion region(fd.get(), bytes, name);
  const auto* header = std::launder(reinterpret_cast<const SegmentHeader*>(region.base()));
  if (header->magic != kMagic || header->version != kVersion) {
    throw CommError(cat("shm setup: segment ", name, " is not a tpfuse segment of version ",
                        kVersion, " (magic 0x", std::hex, header->magic, std::dec, ", version ",
                        header->version, ")"));
  }
  if (header->world_size != static_cast<std::uint32_t>(world_size)) {
    throw InvalidArgument(cat("shm setup: this rank was given world size ", world_size,
                              " but rank 0 created the group for ", header->world_size, " ranks"));
  }
  const SegmentLayout layout = SegmentLayout::compute(world_size, header->slot_bytes);
  if (header->total_bytes != bytes || layout.total_bytes != bytes ||
      header->gather_slot_bytes != kGatherSlotBytes || header->ring_depth != kRingDepth) {
    throw CommError(cat("shm setup: segment ", name, " has ", bytes, " bytes, its header says ",
                        header->total_bytes, " and its layout needs ", layout.total_bytes));
  }
  return Segment(name, region.release(), bytes, /*owns_name=*/false);
}

void Segment::attach_rank(int rank) {
  RankRecord& mine = record(rank);
  std::uint64_t unattached = 0;
  if (!mine.attached.compare_exchange_strong(unattached, 1, std::memory_order_acq_rel)) {
    throw InvalidArgument(cat("shm setup: rank ", rank, " is already attached (pid ",
                              mine.pid.load(std::memory_order_acquire),
                              "); every rank of a group must be a different process or thread"));
  }
  // The pid is stored after the claim: a peer that sees it may watch it for liveness.
  mine.pid.store(::getpid(), std::memory_order_release);
  ring_doorbell(doorbell());
}

void Segment::unlink() {
  if (!owns_name_) return;
  owns_name_ = false;
  if (unlink_created(name_) != 0 && errno != ENOENT) {
    throw_system_error(cat("shm setup: shm_unlink(", name_, ")"), errno);
  }
}

// The futex is shared (not FUTEX_PRIVATE): the ranks are different processes.
// A sleeper counts itself, then reads the word and checks its condition once
// more, then sleeps if the word is unchanged. A ringer, after its store, looks
// for sleepers and only then bumps the word and wakes them. Both sides order
// their two steps with a sequentially consistent fence, so either the ringer
// sees the sleeper or the sleeper sees the store. A ringer that finds no
// sleeper writes nothing: the doorbell's line then stays shared between the
// cores instead of moving to the ringer at every step.
void ring_doorbell(Doorbell& doorbell) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (doorbell.sleepers.load(std::memory_order_relaxed) == 0) return;
  doorbell.rings.fetch_add(1, std::memory_order_seq_cst);
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&doorbell.rings), FUTEX_WAKE, INT_MAX,
            nullptr, nullptr, 0);
}

void count_sleeper(Doorbell& doorbell) {
  doorbell.sleepers.fetch_add(1, std::memory_order_seq_cst);
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

void uncount_sleeper(Doorbell& doorbell) {
  doorbell.sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

void sleep_on_doorbell(Doorbell& doorbell, std::uint32_t seen, std::chrono::microseconds longest) {
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(longest);
  struct timespec timeout {};
  timeout.tv_sec = static_cast<time_t>(seconds.count());
  timeout.tv_nsec = static_cast<long>(std::chrono::nanoseconds(longest - seconds).count());
  // Woken, timed out, interrupted or already rung: the caller polls again either way.
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&doorbell.rings), FUTEX_WAIT, seen,
            &timeout, nullptr, 0);
}

void publish_abort(const Segment& segment, int rank, AbortKind kind,
                   const std::vector<int>& culprits, std::string_view reason) {
  RankRecord& mine = segment.record(rank);
  std::uint64_t unclaimed = 0;
  if (!mine.abort_claimed.compare_exchange_strong(unclaimed, 1, std::memory_order_acq_rel)) return;
  mine.abort_kind = kind;
  std::fill(std::begin(mine.abort_culprits), std::end(mine.abort_culprits), 0);
  for (int culprit : culprits) {
    if (culprit >= 0 && culprit < kMaxRanks)
      mine.abort_culprits[culprit / 64] |= 1ull << (culprit % 64);
  }
  const std::size_t length = std::min(reason.size(), kAbortReasonBytes - 1);
  if (length > 0) std::memcpy(mine.abort_reason, reason.data(), length);
  mine.abort_reason[length] = '\0';
  std::uint64_t not_aborted = 0;
  segment.state().aborted_by.compare_exchange_strong(
      not_aborted, static_cast<std::uint64_t>(rank) + 1, std::memory_order_release,
      std::memory_order_relaxed);
  ring_doorbell(segment.doorbell());
}

std::optional<AbortNotice> read_abort(const Segment& segment) {
  const std::uint64_t aborted_by = segment.state().aborted_by.load(std::memory_order_acquire);
  if (aborted_by == 0) return std::nullopt;
  AbortNotice notice;
  notice.rank = static_cast<int>(aborted_by - 1);
  if (notice.rank >= static_cast<int>(segment.header().world_size)) {
    notice.reason = cat("the segment's abort word names rank ", notice.rank, ", outside the group");
    return notice;
  }
  const RankRecord& record = segment.record(notice.rank);
  notice.kind = record.abort_kind;
  for (int r = 0; r < kMaxRanks; ++r) {
    if (record.abort_culprits[r / 64] & (1ull << (r % 64))) notice.culprits.push_back(r);
  }
  notice.reason.assign(record.abort_reason, strnlen(record.abort_reason, kAbortReasonBytes));
  return notice;
}

void throw_abort(const AbortNotice& notice, int my_rank, std::string_view context) {
  const std::string who = notice.rank == my_rank ? cat("rank ", notice.rank, " (this rank)")
                                                 : cat("rank ", notice.rank);
  switch (notice.kind) {
    case AbortKind::timed_out:
      throw TimeoutError(cat(context, ": ", who, " ", notice.reason), notice.culprits);
    case AbortKind::peer_lost:
      throw PeerLostError(cat(context, ": ", who, " found that ", notice.reason), notice.culprits);
    case AbortKind::aborted:
      break;
  }
  throw AbortedError(cat(context, ": aborted by ", who, ": ", notice.reason), {notice.rank});
}

std::string describe_ranks(const std::vector<int>& ranks) {
  return cat(ranks.size() == 1 ? "rank " : "ranks ", format_ranks(ranks));
}

}  // namespace tpfuse::comm::shm
