// The Communicator: the narrow interface the operators use to talk to the
// other ranks of a process group. Transports (shm today, MPI later) implement
// it; the ops never see which one runs.
//
// Guarantees every implementation gives:
// - all-reduce sums in fp32, in an order fixed by the group's layout, and
//   rounds once to the buffer's dtype, so every rank gets bitwise the same
//   result. The order is rank order 0..p-1 for the shm and flat MPI
//   transports (which give the same bytes); the hierarchical MPI transport
//   (several ranks on each of several hosts) sums each host's ranks in rank
//   order, then the host sums in the order of their lowest ranks;
// - every wait is bounded by timeout(); at the deadline it throws TimeoutError
//   naming the ranks that did not arrive; a peer known to be dead gives
//   PeerLostError; an abort on any rank gives AbortedError on all of them.
//
// Threads: a communicator serves one thread at a time (plus the helper that
// may test() and wait() its Works). Collectives must come in the same order
// on every rank, and two threads of one process calling into the same
// communicator at once have no order: each rank would pair them with its
// peers' calls as its own threads happened to run, so a serialising lock
// would not deadlock but would silently mix one call's data into another.
// An overlapping call is therefore refused (see ExclusiveUse): it aborts the
// communicator on every rank, so no rank pairs calls wrongly, and throws
// ConcurrentCallError. Threads that communicate concurrently use a
// communicator each (one create_shm_communicator per thread, each group on
// its own PrefixStore); those run independently.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <typeindex>
#include <typeinfo>
#include <vector>

#include "tpfuse/core/dtype.h"

namespace tpfuse::comm {

// One asynchronous collective in flight. Destroying a Work that has not
// completed waits for it (its buffers may be in use until then); an error
// met there is not lost: the communicator is aborted and the next call throws.
// test() and wait() may run on another thread than the one that acquires and
// starts all-reduces, concurrently with it (a communication helper thread);
// the shm transport serialises them internally.
class Work {
 public:
  virtual ~Work() = default;
  // Advances without blocking; true once the result is in place.
  virtual bool test() = 0;
  // Blocks until the result is in place (or throws at the deadline).
  virtual void wait() = 0;
};

// What a rank says about the call a checked all-reduce belongs to: a digest
// that must be the same on every rank for the round to count, and what the
// rank wants every peer to know when it is not (its call's facts, its error).
struct CallHeader {
  static constexpr std::size_t kPayloadBytes = 1008;
  std::uint64_t digest = 0;
  std::uint32_t length = 0;  // bytes of payload in use
  std::uint32_t reserved = 0;
  std::array<std::byte, kPayloadBytes> payload{};

  // The payload set from / read as text (cut at kPayloadBytes).
  void set_payload(std::string_view bytes);
  std::string_view payload_view() const;
};
static_assert(sizeof(CallHeader) == 1024);

// A checked all-reduce in flight (see checked_all_reduce_start). Once it has
// completed: null when every rank's digest was this rank's (the sum is in
// the output), else every rank's header, in rank order (no rank summed).
class CheckedWork : public Work {
 public:
  virtual const std::vector<CallHeader>* mismatch() const = 0;
};

// Where a rank writes its contribution to one all-reduce, so that producing
// it is the transfer: for the shm transport, this rank's slot in shared
// memory. Obtained from acquire_reduce_buffer(), handed back (moved) to
// all_reduce_start(buffer, output).
struct ReduceBuffer {
  std::byte* data = nullptr;  // count * dtype_size(dtype) bytes, cache-line aligned
  std::size_t count = 0;
  DType dtype = DType::f32;
  // The transport's own: which round of its ring the buffer belongs to.
  std::uint64_t round = 0;
  // Owns the memory when the transport has no shared buffer to offer.
  std::shared_ptr<std::byte[]> scratch;
};

// An all-gather of tensors in flight (see all_gather_start): each rank's
// block lands in the output as soon as it arrives, so that a consumer may
// start on the blocks it has while the others are still on their way.
class GatherWork : public Work {
 public:
  // Advances without blocking; true once `rank`'s block is in the output.
  virtual bool test(int rank) = 0;
  // Blocks until `rank`'s block is in the output (or throws at the deadline).
  virtual void wait(int rank) = 0;
  using Work::test;
  using Work::wait;
};

// The collectives are non-virtual entry points that claim the communicator
// (ExclusiveUse) and check their arguments, over protected virtual hooks
// (do_*) that a transport implements: so every transport keeps the contract
// above by construction, and a hook sees only arguments that passed.
class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The group's name, the same string on every rank (the operator's `hcom`).
  virtual const std::string& name() const = 0;
  // The deadline every wait of this communicator uses.
  virtual std::chrono::milliseconds timeout() const = 0;
  // How many ranks of the group run on this rank's host (they share its
  // cores); every rank for transports within one host.
  virtual int ranks_on_host() const { return size(); }
  // Whether data moves only while this rank calls into the transport (MPI
  // over a network): the fused operator then advances its all-reduces from a
  // thread of its own rather than between GEMM blocks, which would leave the
  // network idle for a block at a time.
  virtual bool progresses_only_when_called() const { return false; }
  // What carries the data: "shm", "mpi", "gloo" (a torch process group's
  // engine), or "shm+mpi" / "shm+gloo" for a hierarchical communicator
  // (shared memory inside each host, the engine between hosts).
  virtual std::string transport() const = 0;
  // How many hosts the group's ranks run on.
  virtual int hosts() const { return 1; }

  // Starts summing `count` elements of `dtype` (f16, bf16 or f32) across all
  // ranks; the result lands in `output` on every rank. `input` and `output`
  // may be the same buffer; both must stay valid until the Work completes.
  // Collectives are issued in the same order on every rank. This call, and
  // the all-gathers, first complete every all-reduce in flight; so with this
  // form one all-reduce is in flight at a time.
  std::unique_ptr<Work> all_reduce_start(const void* input, void* output, std::size_t count,
                                         DType dtype);

  // Sums fp32 contributions (`count` floats at `input`) as all_reduce_start
  // does and rounds each sum once to `dtype` (f16, bf16 or f32) into
  // `output`, which must not overlap `input`: so a transport may send the
  // rounded sums rather than fp32 ones, half the bytes. Same order of calls
  // and same claim as all_reduce_start.
  std::unique_ptr<Work> all_reduce_rounding_start(const float* input, void* output,
                                                  std::size_t count, DType dtype);

  // The pipelined form, for producers that can write their contribution where
  // the transport wants it. acquire_reduce_buffer() is collective (every rank
  // calls it in the same order, with the same count and dtype) and returns
  // the buffer to fill; it may wait, bounded, until that memory is free,
  // which is until the all-reduce that last used it has completed on every
  // rank. all_reduce_start(buffer, output) then starts the all-reduce; the
  // result lands in `output`. Buffers are started in the order they were
  // acquired, and up to max_reduces_in_flight() of them may be acquired or
  // in flight at once: a caller may fill one while earlier ones are reduced.
  // A buffer holds at most max_reduce_buffer_bytes(). The default hooks hand
  // out private memory and copy it in all_reduce_start (one in flight).
  ReduceBuffer acquire_reduce_buffer(std::size_t count, DType dtype);
  std::unique_ptr<Work> all_reduce_start(ReduceBuffer buffer, void* output);
  virtual std::size_t max_reduce_buffer_bytes() const;
  virtual int max_reduces_in_flight() const { return 1; }

  // The pipelined all-reduce with a header: every rank's header travels with
  // its contribution, and the round sums only if every rank's digest is the
  // same; else no rank reads any contribution (their counts may then differ,
  // 0 included), and every rank learns every header. So a call's agreement
  // costs no round of its own where the transport carries headers (shm); the
  // default sends them in an all_gather first.
  std::unique_ptr<CheckedWork> checked_all_reduce_start(ReduceBuffer buffer, void* output,
                                                        const CallHeader& mine);

  // Sums `input` (counts[0] + ... + counts[p-1] elements of `dtype`, f16,
  // bf16 or f32) across all ranks and leaves on rank r only its shard: the
  // counts[r] elements that follow shard r-1's, in `output`. The shards are
  // the caller's (rows of a matrix, any of them empty) and the same on every
  // rank. Each element is the sum the all-reduce of the same inputs gives,
  // bitwise: the same fp32 sum, in the same order, rounded once.
  std::unique_ptr<Work> reduce_scatter_start(const void* input, void* output,
                                             std::span<const std::size_t> counts, DType dtype);

  // Every rank r contributes counts[r] elements of `dtype` (any dtype: the
  // bytes are copied, not summed); `output` receives them all, in rank order.
  // The counts are the same on every rank. `input` may be this rank's place
  // in `output` (in place), else must not overlap it. The returned Work says
  // which ranks' blocks have landed (GatherWork::test(rank)).
  std::unique_ptr<GatherWork> all_gather_start(const void* input, void* output,
                                               std::span<const std::size_t> counts, DType dtype);

  // Every rank contributes up to max_gather_bytes() bytes; returns each
  // rank's contribution, in rank order. Blocking and bounded.
  std::vector<std::string> all_gather(std::string_view mine);
  virtual std::size_t max_gather_bytes() const = 0;

  // Marks the communicator failed on every rank: their waits wake at once and
  // throw AbortedError naming this rank and the reason. Safe from any thread,
  // and so not claimed: it is how a claim that overlapped another fails.
  virtual void abort(std::string_view reason) = 0;

  // Blocking all-reduce: start, then wait.
  void all_reduce(const void* input, void* output, std::size_t count, DType dtype) {
    all_reduce_start(input, output, count, dtype)->wait();
  }
  void barrier() { all_gather({}); }

  // State that belongs to the group rather than to the process: the caches
  // whose hits must be the same on every rank (agreed calls, measured
  // constants, plans). One T per communicator, made on first use, destroyed
  // with it; every rank fills its own through the same sequence of calls, so
  // the ranks' copies stay alike, eviction included.
  template <class T>
  T& attachment() const {
    const std::lock_guard lock(attachments_mutex_);
    std::shared_ptr<void>& slot = attachments_[std::type_index(typeid(T))];
    if (!slot) slot = std::make_shared<T>();
    return *static_cast<T*>(slot.get());
  }

 protected:
  // The transport's side of each entry point above, called with the
  // communicator claimed and the arguments checked. A buffer handed to
  // do_all_reduce_start(buffer) came from this communicator's
  // do_acquire_reduce_buffer, oldest first (the transport checks that it is
  // its own); one handed to do_checked_all_reduce_start likewise.
  virtual std::unique_ptr<Work> do_all_reduce_start(const void* input, void* output,
                                                    std::size_t count, DType dtype) = 0;
  virtual ReduceBuffer do_acquire_reduce_buffer(std::size_t count, DType dtype);
  // The default: an fp32 all-reduce into private memory, rounded on completion.
  virtual std::unique_ptr<Work> do_all_reduce_rounding_start(const float* input, void* output,
                                                             std::size_t count, DType dtype);
  virtual std::unique_ptr<Work> do_all_reduce_start(ReduceBuffer buffer, void* output);
  virtual std::unique_ptr<CheckedWork> do_checked_all_reduce_start(ReduceBuffer buffer,
                                                                   void* output,
                                                                   const CallHeader& mine);
  // The defaults: the all-reduce into private memory, then the shard copied
  // out; and the blocks carried by all_gather, max_gather_bytes() at a time.
  // Both keep every guarantee of the hooks they use, at more traffic.
  virtual std::unique_ptr<Work> do_reduce_scatter_start(const void* input, void* output,
                                                        std::span<const std::size_t> counts,
                                                        DType dtype);
  virtual std::unique_ptr<GatherWork> do_all_gather_start(const void* input, void* output,
                                                          std::span<const std::size_t> counts,
                                                          DType dtype);
  virtual std::vector<std::string> do_all_gather(std::string_view mine) = 0;

 private:
  mutable std::mutex attachments_mutex_;
  mutable std::map<std::type_index, std::shared_ptr<void>> attachments_;

  friend class ExclusiveUse;
  // The thread inside a collective or an operator call, or none.
  std::atomic<std::thread::id> user_{};
  // Reduce buffers acquired and not yet started (entry points only).
  int acquired_ = 0;
};

// Claims `comm` for the calling thread while it lives: operators hold one for
// a whole call (it issues several collectives), and the transports' collective
// entry points hold one too. Nested claims on the same thread are free. A
// claim while another thread holds the communicator aborts it (every rank's
// calls on it fail at once with AbortedError giving the reason) and throws
// ConcurrentCallError naming `operation`; the communicator cannot be used
// afterwards.
class ExclusiveUse {
 public:
  ExclusiveUse(Communicator& comm, std::string_view operation);
  ~ExclusiveUse();
  ExclusiveUse(const ExclusiveUse&) = delete;
  ExclusiveUse& operator=(const ExclusiveUse&) = delete;

 private:
  Communicator& comm_;
  bool claimed_ = false;  // false for a nested claim: the outer one releases
};

}  // namespace tpfuse::comm
