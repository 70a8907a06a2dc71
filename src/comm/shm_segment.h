// The shared-memory segment of the shm transport: its layout, its life cycle
// (create with a random name, attach, verify, unlink) and the abort records.
// Algorithms see the segment only through Ring, Channel and the per-rank records;
// they never compute offsets themselves, so a new algorithm can reuse the
// layout as it is.
//
// Layout (every part starts on a cache line):
//   SegmentHeader | SegmentState | Doorbell | RankRecord x p
//   | RoundFlags x p x ring_depth | SlotFlags x p (gather)
//   | round headers: p x ring_depth x kRoundHeaderBytes
//   | ring slots: p x ring_depth x slot_bytes | gather slots: p x 2 x gather_slot_bytes
//
// Every field another rank reads while the owner writes it is a std::atomic,
// written with release stores and read with acquire loads; plain fields are
// written before the release that publishes them.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tpfuse::comm::shm {

inline constexpr std::size_t kCacheLine = 64;
inline constexpr int kMaxRanks = 256;
// The store key under which rank 0 publishes the segment's name.
inline constexpr const char* kSegmentKey = "shm-segment";
// The key under which rank 0 records the name before it creates the segment,
// so that a launcher finds the name even if rank 0 dies before publishing it.
// It ends in kSegmentKey: a launcher collects the names of every key that does.
inline constexpr const char* kReservedSegmentKey = "reserved-shm-segment";
// Bytes a rank may contribute to one all_gather.
inline constexpr std::size_t kMaxGatherBytes = 4096;
// A gather slot holds the contribution's length in its first cache line.
inline constexpr std::size_t kGatherSlotBytes = kMaxGatherBytes + kCacheLine;
// Slots per rank in the all-reduce ring: how many rounds may be in flight.
// Two let a producer fill one while the other is reduced; the third absorbs
// a peer that runs a round behind without stalling the producer.
inline constexpr std::size_t kRingDepth = 3;
// Bytes of the header a checked round carries beside each contribution (a
// Communicator's CallHeader).
inline constexpr std::size_t kRoundHeaderBytes = 1024;

static_assert(std::atomic<std::uint64_t>::is_always_lock_free,
              "the segment's flags must be lock-free to work across processes");
static_assert(std::atomic<std::int64_t>::is_always_lock_free);

// How the group all-reduces a round; rank 0's choice, recorded in the header,
// is the group's, so that every rank runs the same algorithm.
enum class AlgorithmChoice : std::uint32_t { automatic = 0, one_shot = 1, reduce_scatter = 2 };

// Written once by rank 0 before it publishes the segment's name; read-only after.
struct alignas(kCacheLine) SegmentHeader {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t world_size;
  std::uint64_t total_bytes;
  std::uint64_t slot_bytes;
  std::uint64_t gather_slot_bytes;
  char group_token[24];  // the random part of the communicator's name, NUL-terminated
  std::uint64_t ring_depth;
  AlgorithmChoice algorithm;
};
static_assert(sizeof(SegmentHeader) == 2 * kCacheLine);

// Group-wide words that any rank may change.
struct alignas(kCacheLine) SegmentState {
  std::atomic<std::uint64_t> ready;       // 1 once rank 0 saw every rank attach and unlinked
  std::atomic<std::uint64_t> aborted_by;  // 0, or 1 + the rank whose abort record counts
  // Rank 0's deadline for every rank to attach (steady clock, in ns; the
  // same clock in every process of the host); 0 until rank 0 waits.
  std::atomic<std::int64_t> setup_deadline_ns;
};
static_assert(sizeof(SegmentState) == kCacheLine);

// Lets a rank that waits sleep until a peer moves, instead of polling: every
// store a peer may be waiting for is followed by ring_doorbell(), which, when
// `sleepers` counts anyone, bumps `rings` (a futex word) and wakes them. In a
// line of its own, which every rank reads on every step.
struct alignas(kCacheLine) Doorbell {
  std::atomic<std::uint32_t> rings;
  std::atomic<std::uint32_t> sleepers;
};
static_assert(sizeof(Doorbell) == kCacheLine);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free &&
                  sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t),
              "the doorbell's words must be usable as futexes");

enum class AbortKind : std::uint32_t { aborted = 1, timed_out = 2, peer_lost = 3 };

inline constexpr std::size_t kAbortReasonBytes = 448;

// One rank's identity and its first error; written only by that rank.
struct alignas(kCacheLine) RankRecord {
  std::atomic<std::int64_t> pid;
  std::atomic<std::uint64_t> attached;
  std::atomic<std::uint64_t> abort_claimed;  // set once; guards the fields below
  AbortKind abort_kind;
  std::uint32_t padding;
  std::uint64_t abort_culprits[kMaxRanks / 64];  // bit r: rank r is at fault
  char abort_reason[kAbortReasonBytes];          // NUL-terminated
};
static_assert(sizeof(RankRecord) == 512);

// One rank's progress on one ring slot, as round numbers (counted from 1;
// slot (round - 1) % ring_depth holds a round); written only by that rank.
// Release stores publish, acquire loads consume.
struct alignas(kCacheLine) RoundFlags {
  std::atomic<std::uint64_t> contributed;  // my contribution to this round is in my slot
  std::atomic<std::uint64_t> reduced;      // my share of the round, summed, is in my slot
  std::atomic<std::uint64_t> consumed;     // I have read this round from every rank's slot
  // A checked round's digest (CallHeader::digest), stored before
  // `contributed`: on the line a peer reads anyway to see the contribution.
  std::atomic<std::uint64_t> digest;
};
static_assert(sizeof(RoundFlags) == kCacheLine);

// The all-reduce ring: ring_depth slots per rank, each with its flags.
class Ring {
 public:
  Ring(RoundFlags* flags, std::byte* headers, std::byte* slots, std::size_t depth,
       std::size_t slot_bytes)
      : flags_(flags), headers_(headers), slots_(slots), depth_(depth), slot_bytes_(slot_bytes) {}
  std::size_t depth() const { return depth_; }
  std::size_t slot_bytes() const { return slot_bytes_; }
  RoundFlags& flags(int rank, std::uint64_t round) const { return flags_[index(rank, round)]; }
  std::byte* slot(int rank, std::uint64_t round) const {
    return slots_ + index(rank, round) * slot_bytes_;
  }
  // The header of a checked round, beside the slot.
  std::byte* header(int rank, std::uint64_t round) const {
    return headers_ + index(rank, round) * kRoundHeaderBytes;
  }

 private:
  std::size_t index(int rank, std::uint64_t round) const {
    return static_cast<std::size_t>(rank) * depth_ + static_cast<std::size_t>((round - 1) % depth_);
  }

  RoundFlags* flags_;
  std::byte* headers_;
  std::byte* slots_;
  std::size_t depth_;
  std::size_t slot_bytes_;
};

// One rank's progress on one channel; written only by that rank.
struct alignas(kCacheLine) SlotFlags {
  std::atomic<std::uint64_t> published;  // last sequence number whose data is in my slot
  std::atomic<std::uint64_t> consumed;   // last sequence number I have read from every slot
};
static_assert(sizeof(SlotFlags) == kCacheLine);

// Two slots per rank, taken in turn, plus its flags. A round with sequence
// number s: a rank waits until every peer consumed s - 2 (so the slot of s is
// free), fills it, publishes s, waits until every peer published s, reads,
// and consumes s. With two slots a rank that is done with round s may start
// s + 1 while a slower peer still reads s.
class Channel {
 public:
  static constexpr std::size_t kSlotsPerRank = 2;
  Channel(SlotFlags* flags, std::byte* slots, std::size_t slot_bytes)
      : flags_(flags), slots_(slots), slot_bytes_(slot_bytes) {}
  SlotFlags& flags(int rank) const { return flags_[rank]; }
  std::byte* slot(int rank, std::uint64_t sequence) const {
    return slots_ + (static_cast<std::size_t>(rank) * kSlotsPerRank + sequence % kSlotsPerRank) *
                        slot_bytes_;
  }
  std::size_t slot_bytes() const { return slot_bytes_; }

 private:
  SlotFlags* flags_;
  std::byte* slots_;
  std::size_t slot_bytes_;
};

// Byte offsets of the parts of a segment for a world size and slot size.
struct SegmentLayout {
  std::size_t state = 0;
  std::size_t doorbell = 0;
  std::size_t records = 0;
  std::size_t ring_flags = 0;
  std::size_t gather_flags = 0;
  std::size_t round_headers = 0;
  std::size_t ring_slots = 0;
  std::size_t gather_slots = 0;
  std::size_t total_bytes = 0;

  static SegmentLayout compute(int world_size, std::size_t slot_bytes);
};

// What a rank learns from the segment once some rank aborted the group.
struct AbortNotice {
  int rank = -1;  // the rank whose record counts (the first to report)
  AbortKind kind = AbortKind::aborted;
  std::vector<int> culprits;
  std::string reason;
};

// For a process that must end at once (its launcher died): unlinks every
// segment it created and still names, then _exit(exit_code). A create() racing
// with it either finishes first, and its segment is unlinked, or never runs.
[[noreturn]] void unlink_created_segments_and_end(int exit_code) noexcept;

// A mapped segment. Rank 0 creates it and owns its name until unlink(): if
// the owner is destroyed before that (setup failed), it unlinks the name.
class Segment {
 public:
  // A fresh random name for create().
  static std::string random_name();
  // Rank 0: a new segment under `name` (from random_name()), mode 0600,
  // initialised. SystemError if the name exists.
  static Segment create(const std::string& name, int world_size, std::size_t slot_bytes,
                        AlgorithmChoice algorithm);
  // The other ranks: maps `name` and checks the header against `world_size`;
  // nullopt when no segment has that name any more (rank 0 gave up on setup
  // and unlinked it, or the launcher reclaimed it).
  static std::optional<Segment> attach(const std::string& name, int world_size);

  Segment(Segment&& other) noexcept;
  Segment& operator=(Segment&&) = delete;
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;
  ~Segment();

  const std::string& name() const { return name_; }
  std::size_t total_bytes() const { return bytes_; }
  const SegmentHeader& header() const { return *header_; }
  SegmentState& state() const { return *state_; }
  Doorbell& doorbell() const { return *doorbell_; }
  RankRecord& record(int rank) const { return records_[rank]; }
  const Ring& ring() const { return ring_; }
  const Channel& gather() const { return gather_; }
  AlgorithmChoice algorithm() const { return header_->algorithm; }
  std::string group_token() const { return header_->group_token; }

  // Records this process as `rank`; InvalidArgument if that rank attached already.
  void attach_rank(int rank);
  // Removes the name from the file system (the mapping stays valid).
  void unlink();

 private:
  Segment(std::string name, void* base, std::size_t bytes, bool owns_name);

  std::string name_;
  void* base_;
  std::size_t bytes_;
  bool owns_name_;
  SegmentHeader* header_;
  SegmentState* state_;
  Doorbell* doorbell_;
  RankRecord* records_;
  Ring ring_;
  Channel gather_;
};

// Wakes every rank asleep on the doorbell; call after each store a peer may
// wait for. Writes nothing when no one sleeps (the usual case while ranks
// keep pace).
void ring_doorbell(Doorbell& doorbell);
// A waiter counts itself among the sleepers before it reads the word (`seen`)
// and checks its condition for the last time, and uncounts itself when it
// stops waiting; while counted, it may sleep until the doorbell rings after it
// showed `seen`, or `longest` has passed (a wait must still check its deadline
// and its peers' liveness).
void count_sleeper(Doorbell& doorbell);
void uncount_sleeper(Doorbell& doorbell);
void sleep_on_doorbell(Doorbell& doorbell, std::uint32_t seen, std::chrono::microseconds longest);

// Makes `rank`'s report the group's abort unless some rank reported first;
// a rank's first report is the only one kept. Lock-free, so safe from any thread.
void publish_abort(const Segment& segment, int rank, AbortKind kind,
                   const std::vector<int>& culprits, std::string_view reason);
// The group's abort, if any rank reported one.
std::optional<AbortNotice> read_abort(const Segment& segment);
// Throws the error a notice stands for, prefixed by `context` ("all-reduce #3").
[[noreturn]] void throw_abort(const AbortNotice& notice, int my_rank, std::string_view context);

// "rank 2" or "ranks 2, 5".
std::string describe_ranks(const std::vector<int>& ranks);

}  // namespace tpfuse::comm::shm
