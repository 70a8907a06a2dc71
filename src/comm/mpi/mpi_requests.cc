#include "comm/mpi/mpi_requests.h"

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <mutex>
#include <thread>

namespace tpfuse::comm::mpi {

namespace {

std::string error_text(int code) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(code, text, &length);
  return std::string(text, static_cast<std::size_t>(length));
}

// Open MPI's TCP transport sends messages of up to 64 KiB, its header
// included, eagerly (btl_tcp_eager_limit); pieces leave room for the header.
constexpr std::size_t kPieceBytes = std::size_t{32} << 10;

// Calls post(offset, bytes) for each piece of a message, in order; a
// message of 0 bytes is one piece of 0 bytes.
template <class Post>
void for_each_piece(std::size_t bytes, Post&& post) {
  std::size_t offset = 0;
  do {
    const std::size_t piece = std::min(kPieceBytes, bytes - offset);
    post(offset, piece);
    offset += piece;
  } while (offset < bytes);
}

// Whether finalizing at exit is safe: a failure may leave messages that
// never complete, and MPI_Finalize would wait for them (or for peers that
// are gone) forever.
std::atomic<bool> g_finalize_at_exit{false};

void finalize_at_exit() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && g_finalize_at_exit.load()) MPI_Finalize();
}

}  // namespace

void check_mpi(int code, std::string_view call) {
  if (code != MPI_SUCCESS) throw CommError(cat(call, " failed: ", error_text(code)));
}

void wait_collective(MPI_Request& request, std::chrono::milliseconds timeout,
                     std::string_view what) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    int done = 0;
    check_mpi(MPI_Test(&request, &done, MPI_STATUS_IGNORE), what);
    if (done) return;
    if (std::chrono::steady_clock::now() >= deadline) {
      throw TimeoutError(cat(what, ": timed out after ", timeout.count(),
                             " ms (a collective: the missing ranks are not known)"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds{100});
  }
}

void init_mpi() {
  static std::once_flag once;
  std::call_once(once, [] {
    int initialized = 0;
    MPI_Initialized(&initialized);
    int provided = MPI_THREAD_SINGLE;
    if (!initialized) {
      check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided),
                "MPI_Init_thread");
      g_finalize_at_exit = true;
      std::atexit(finalize_at_exit);
    } else {
      MPI_Query_thread(&provided);
    }
    if (provided < MPI_THREAD_SERIALIZED) {
      throw InvalidArgument(cat("mpi: MPI was initialized with thread level ", provided,
                                "; tpfuse needs MPI_THREAD_SERIALIZED (", MPI_THREAD_SERIALIZED,
                                ") or more (a helper thread may advance all-reduces)"));
    }
  });
}

void skip_finalize_at_exit() { g_finalize_at_exit = false; }

Requests::~Requests() {
  for (Pending& p : pending_) {
    if (p.request != MPI_REQUEST_NULL) MPI_Request_free(&p.request);
  }
}

void Requests::irecv(std::byte* data, std::size_t bytes, int peer, int tag, MPI_Comm comm) {
  Pending p{MPI_REQUEST_NULL, peer, true};
  check_mpi(MPI_Irecv(data, static_cast<int>(bytes), MPI_BYTE, peer, tag, comm, &p.request),
            cat("MPI_Irecv from rank ", peer));
  pending_.push_back(p);
}

void Requests::isend(const std::byte* data, std::size_t bytes, int peer, int tag, MPI_Comm comm) {
  Pending p{MPI_REQUEST_NULL, peer, false};
  check_mpi(MPI_Isend(data, static_cast<int>(bytes), MPI_BYTE, peer, tag, comm, &p.request),
            cat("MPI_Isend to rank ", peer));
  pending_.push_back(p);
}

void Requests::irecv_pieces(std::byte* data, std::size_t bytes, int peer, int tag,
                            MPI_Comm comm) {
  for_each_piece(bytes, [&](std::size_t offset, std::size_t piece) {
    irecv(data + offset, piece, peer, tag, comm);
  });
}

void Requests::isend_pieces(const std::byte* data, std::size_t bytes, int peer, int tag,
                            MPI_Comm comm) {
  for_each_piece(bytes, [&](std::size_t offset, std::size_t piece) {
    isend(data + offset, piece, peer, tag, comm);
  });
}

bool Requests::test_all() {
  for (Pending& p : pending_) {
    int done = 0;
    MPI_Status status;
    const int code = MPI_Test(&p.request, &done, &status);
    if (code != MPI_SUCCESS) {
      throw RequestError(cat("MPI_Test: the ", p.receive ? "receive from" : "send to", " rank ",
                             p.peer, " failed: ", error_text(code)),
                         p.peer);
    }
    if (!done) break;
    if (p.receive) {
      int count = 0;
      MPI_Get_count(&status, MPI_BYTE, &count);
      received_[p.peer] = static_cast<std::size_t>(count);
    }
  }
  std::erase_if(pending_, [](const Pending& p) { return p.request == MPI_REQUEST_NULL; });
  return pending_.empty();
}

void Requests::cancel_receives() {
  for (Pending& p : pending_) {
    if (!p.receive || p.request == MPI_REQUEST_NULL) continue;
    MPI_Cancel(&p.request);
    // A receive no message matched completes at once when cancelled; one
    // that matched completes when its message is in, which after a failure
    // may be never: then it is released to MPI.
    int done = 0;
    for (int attempt = 0; attempt < 100 && !done; ++attempt) {
      MPI_Test(&p.request, &done, MPI_STATUS_IGNORE);
      if (!done) std::this_thread::sleep_for(std::chrono::microseconds{100});
    }
    if (!done) MPI_Request_free(&p.request);
  }
  std::erase_if(pending_, [](const Pending& p) { return p.request == MPI_REQUEST_NULL; });
}

std::vector<int> Requests::pending_peers() const {
  std::vector<int> receives, sends;
  for (const Pending& p : pending_) (p.receive ? receives : sends).push_back(p.peer);
  std::vector<int>& peers = receives.empty() ? sends : receives;
  std::sort(peers.begin(), peers.end());
  peers.erase(std::unique(peers.begin(), peers.end()), peers.end());
  return peers;
}

bool Requests::receiving_from(int peer) const {
  return std::any_of(pending_.begin(), pending_.end(),
                     [&](const Pending& p) { return p.receive && p.peer == peer; });
}

std::size_t Requests::received_bytes(int peer) const {
  const auto found = received_.find(peer);
  return found == received_.end() ? 0 : found->second;
}

}  // namespace tpfuse::comm::mpi
