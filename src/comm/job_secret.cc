// The job secret: generation, the hashes derived from it, and the check a
// rank makes before it joins a rendezvous. SHA-256 is written out here (FIPS
// 180-4) rather than taken from a crypto library: it is the only primitive
// needed, and it keeps the library's dependencies to the GEMM's.
#include <sys/random.h>

#include <bit>
#include <cerrno>
#include <cstring>

#include "tpfuse/comm/store.h"
#include "tpfuse/core/error.h"

namespace tpfuse::comm {

namespace {

constexpr std::uint32_t kRoundConstants[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

void compress(std::uint32_t state[8], const std::uint8_t block[64]) {
  std::uint32_t w[64];
  for (int i = 0; i < 16; ++i) {
    w[i] = std::uint32_t{block[4 * i]} << 24 | std::uint32_t{block[4 * i + 1]} << 16 |
           std::uint32_t{block[4 * i + 2]} << 8 | std::uint32_t{block[4 * i + 3]};
  }
  for (int i = 16; i < 64; ++i) {
    const std::uint32_t s0 = std::rotr(w[i - 15], 7) ^ std::rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
    const std::uint32_t s1 = std::rotr(w[i - 2], 17) ^ std::rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  std::uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
  std::uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
  for (int i = 0; i < 64; ++i) {
    const std::uint32_t t1 = h + (std::rotr(e, 6) ^ std::rotr(e, 11) ^ std::rotr(e, 25)) +
                             ((e & f) ^ (~e & g)) + kRoundConstants[i] + w[i];
    const std::uint32_t t2 =
        (std::rotr(a, 2) ^ std::rotr(a, 13) ^ std::rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    h = g;
    g = f;
    f = e;
    e = d + t1;
    d = c;
    c = b;
    b = a;
    a = t1 + t2;
  }
  state[0] += a, state[1] += b, state[2] += c, state[3] += d;
  state[4] += e, state[5] += f, state[6] += g, state[7] += h;
}

std::string to_hex(const std::uint8_t* bytes, std::size_t count) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text;
  for (std::size_t i = 0; i < count; ++i) {
    text += kDigits[bytes[i] >> 4];
    text += kDigits[bytes[i] & 15];
  }
  return text;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string hash_hex(std::string_view purpose, const std::string& secret_hex) {
  const auto digest = sha256(std::string(purpose) + secret_hex);
  return to_hex(digest.data(), digest.size());
}

}  // namespace

std::array<std::uint8_t, 32> sha256(std::string_view data) {
  std::uint32_t state[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                            0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::size_t done = 0;
  for (; data.size() - done >= 64; done += 64) {
    compress(state, reinterpret_cast<const std::uint8_t*>(data.data() + done));
  }
  // The tail, a 1 bit, zeros, and the length in bits: one or two blocks.
  std::uint8_t tail[128] = {};
  const std::size_t rest = data.size() - done;
  std::memcpy(tail, data.data() + done, rest);
  tail[rest] = 0x80;
  const std::size_t tail_bytes = rest < 56 ? 64 : 128;
  const std::uint64_t bits = static_cast<std::uint64_t>(data.size()) * 8;
  for (int i = 0; i < 8; ++i) tail[tail_bytes - 1 - i] = static_cast<std::uint8_t>(bits >> (8 * i));
  for (std::size_t block = 0; block < tail_bytes; block += 64) compress(state, tail + block);

  std::array<std::uint8_t, 32> digest{};
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 4; ++j) digest[4 * i + j] = static_cast<std::uint8_t>(state[i] >> (24 - 8 * j));
  }
  return digest;
}

JobSecret JobSecret::generate() {
  JobSecret secret;
  std::size_t filled = 0;
  while (filled < secret.bytes_.size()) {
    const ssize_t n = ::getrandom(secret.bytes_.data() + filled, secret.bytes_.size() - filled, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_system_error("job secret: getrandom", errno);
    }
    filled += static_cast<std::size_t>(n);
  }
  return secret;
}

JobSecret JobSecret::parse(std::string_view text, std::string_view what) {
  JobSecret secret;
  bool ok = text.size() == 2 * secret.bytes_.size();
  for (std::size_t i = 0; ok && i < secret.bytes_.size(); ++i) {
    const int high = hex_value(text[2 * i]);
    const int low = hex_value(text[2 * i + 1]);
    ok = high >= 0 && low >= 0;
    if (ok) secret.bytes_[i] = static_cast<std::uint8_t>(high << 4 | low);
  }
  // The text is a secret: say what is wrong with it, never echo it.
  require(ok, what, ": expected 32 hex digits (a 128-bit job secret), got ", text.size(),
          " characters", text.size() == 32 ? " that are not all hex digits" : "");
  return secret;
}

std::string JobSecret::hex() const { return to_hex(bytes_.data(), bytes_.size()); }

std::string JobSecret::verifier() const { return hash_hex("tpfuse job verifier\n", hex()); }

std::string JobSecret::key_prefix() const {
  return "job-" + hash_hex("tpfuse job keys\n", hex()).substr(0, 16) + "-";
}

void seal_store(Store& store, const JobSecret& secret) {
  const std::string verifier = secret.verifier();
  if (const auto existing = store.try_get(JobSecret::kVerifierKey)) {
    if (*existing == verifier) return;
    throw AccessDenied("seal_store: the store is sealed with another job's secret");
  }
  store.set(JobSecret::kVerifierKey, verifier);
}

std::string check_job_secret(Store& store, const JobSecret* secret, int rank,
                             std::chrono::milliseconds timeout, std::string_view where) {
  std::optional<std::string> verifier = store.try_get(JobSecret::kVerifierKey);
  if (secret == nullptr) {
    if (!verifier) return {};
    throw AccessDenied(cat(where, ": refused to join: the job's store is sealed with a job "
                                  "secret and this process holds none (set TPFUSE_SECRET to the "
                                  "job's secret)"));
  }
  if (!verifier) {
    if (rank == 0) {
      seal_store(store, *secret);
      return secret->key_prefix();
    }
    try {
      verifier = store.get(JobSecret::kVerifierKey, timeout);
    } catch (const TimeoutError& error) {
      throw TimeoutError(cat(where, ": rank 0 did not seal the job's store with the job secret: ",
                             error.what()),
                         {0});
    }
  }
  if (*verifier != secret->verifier()) {
    throw AccessDenied(cat(where, ": refused to join: this process's job secret (TPFUSE_SECRET) "
                                  "is not the one the job's store is sealed with"));
  }
  return secret->key_prefix();
}

}  // namespace tpfuse::comm
