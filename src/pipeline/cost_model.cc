// The cost model's constants: measured on this machine, agreed across the
// ranks (the slowest rank's figure counts, since it paces the pipeline), and
// cached per communicator; and plan_call, which puts them together.
//
// Every decision here that leads to a collective (measure or not, plan or
// not) depends only on values every rank has alike: the call's agreed shape,
// the cache (filled by the same sequence of collective calls on every rank)
// and values just gathered. A rank that decided otherwise would wait in a
// collective its peers never enter.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "tpfuse/core/config.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/log.h"
#include "tpfuse/pipeline/plan.h"

namespace tpfuse::pipeline {

namespace {

using Clock = std::chrono::steady_clock;

struct TransportConstants {
  double reduce_round_seconds = 0;
  double reduce_seconds_per_byte = 0;
  double copy_seconds_per_byte = 0;
  double reduce_cpu_share = 1;
  double reduce_overlap = 0;
};

struct GemmConstants {
  double flops = 0;
  double pass_seconds = 0;
  double call_seconds = 0;
};

using TransportKey = DType;
using GemmKey = std::tuple<Mode, DType, DType, std::int64_t, std::int64_t, int>;
using PlanKey = std::tuple<Operator, std::int64_t, Mode, DType, DType, std::int64_t, std::int64_t,
                           int, bool, std::int64_t, int>;

// Plans made, so that a call of a shape seen before (every layer of a model,
// every step) skips the search: about a millisecond of CPU for m = 128, paid
// by every rank, which with 8 ranks on 2 cores was 6 ms a call. A plan is a
// pure function of the request and the cached constants, so a rank's cache
// never changes what it runs; the table is emptied when it grows past
// kMaxPlans, so that calls of ever new shapes do not grow it forever.
constexpr std::size_t kMaxPlans = 1024;

// A communicator's measured constants and plans (Communicator::attachment:
// their life is the group's, and every rank fills them alike).
struct Cache {
  std::mutex mutex;
  std::map<TransportKey, TransportConstants> transport;
  std::map<GemmKey, GemmConstants> gemm;
  std::map<PlanKey, TilePlan> plans;
};

Cache& cache(const comm::Communicator& comm) { return comm.attachment<Cache>(); }

// Every rank's values, element by element, the largest.
std::vector<double> agreed_max(comm::Communicator& comm, const std::vector<double>& mine) {
  const auto blobs = comm.all_gather(
      std::string_view(reinterpret_cast<const char*>(mine.data()), mine.size() * sizeof(double)));
  std::vector<double> result = mine;
  for (const std::string& blob : blobs) {
    if (blob.size() != mine.size() * sizeof(double)) {
      throw InternalError(cat("plan: a rank sent ", blob.size(), " bytes of constants, expected ",
                              mine.size() * sizeof(double)));
    }
    for (std::size_t i = 0; i < result.size(); ++i) {
      double value = 0;
      std::memcpy(&value, blob.data() + i * sizeof(double), sizeof(double));
      result[i] = std::max(result[i], value);
    }
  }
  return result;
}

// CPU time of the calling thread, user and system.
double thread_cpu_seconds() {
  timespec now{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
  return static_cast<double>(now.tv_sec) + static_cast<double>(now.tv_nsec) * 1e-9;
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One call of `body`, timed by the wall clock and by the calling thread's CPU.
struct Timing {
  double wall = 0;
  double cpu = 0;
};
template <class Body>
Timing time_call(Body&& body) {
  const double cpu_start = thread_cpu_seconds();
  const auto start = Clock::now();
  body();
  return {seconds_since(start), thread_cpu_seconds() - cpu_start};
}

// The fastest of `reps` timed calls of `body`, after one untimed: on a
// shared machine the fastest is the one least disturbed by other work.
template <class Body>
double fastest_seconds(int reps, Body&& body) {
  body();
  double fastest = 0;
  for (int r = 0; r < reps; ++r) {
    const double seconds = time_call(body).wall;
    fastest = r == 0 ? seconds : std::min(fastest, seconds);
  }
  return fastest;
}

// Rounds from the transport's buffer (what a tile costs), tiny and at the
// largest size, and two of the largest at once (how much reduces in flight
// together overlap); and the copy into a buffer that the plain all-reduce
// adds.
TransportConstants measure_transport(comm::Communicator& comm, DType dtype) {
  constexpr int kReps = 3;
  const std::size_t element = dtype_size(dtype);
  const std::size_t large =
      std::min<std::size_t>(comm.max_reduce_buffer_bytes(), std::size_t{4} << 20) / element;
  const std::size_t small = std::min<std::size_t>(64, large);
  std::vector<std::byte> private_input(large * element);
  std::vector<std::byte> output(large * element);
  auto buffer_round = [&](std::size_t count, bool copy_in) {
    comm::ReduceBuffer buffer = comm.acquire_reduce_buffer(count, dtype);
    if (copy_in) std::memcpy(buffer.data, private_input.data(), count * element);
    comm.all_reduce_start(std::move(buffer), output.data())->wait();
  };
  comm.barrier();
  const double round = fastest_seconds(kReps, [&] { buffer_round(small, false); });
  // One round and, where the transport lets two be in flight, two at once,
  // in turns, so that a burst of other work hits both alike.
  std::vector<std::byte> second_output(large * element);
  const auto two_rounds = [&] {
    comm::ReduceBuffer first = comm.acquire_reduce_buffer(large, dtype);
    comm::ReduceBuffer second = comm.acquire_reduce_buffer(large, dtype);
    const auto first_work = comm.all_reduce_start(std::move(first), output.data());
    const auto second_work = comm.all_reduce_start(std::move(second), second_output.data());
    first_work->wait();
    second_work->wait();
  };
  const bool pairs = comm.max_reduces_in_flight() >= 2;
  Timing full_total;
  double full = 0, pair = 0;
  buffer_round(large, false);
  for (int r = 0; r < 2 * kReps; ++r) {
    const Timing one = time_call([&] { buffer_round(large, false); });
    full_total.wall += one.wall;
    full_total.cpu += one.cpu;
    full = r == 0 ? one.wall : std::min(full, one.wall);
    const double both = pairs ? time_call(two_rounds).wall : 2 * one.wall;
    pair = r == 0 ? both : std::min(pair, both);
  }
  const double copied = fastest_seconds(kReps, [&] { buffer_round(large, true); });
  const auto agreed = agreed_max(
      comm, {round, full, copied, full_total.cpu / std::max(full_total.wall, 1e-9), pair});
  const double bytes = static_cast<double>(large * element);
  TransportConstants constants;
  constants.reduce_round_seconds = agreed[0];
  constants.reduce_seconds_per_byte = std::max(0.0, agreed[1] - agreed[0]) / bytes;
  constants.copy_seconds_per_byte = std::max(0.0, agreed[2] - agreed[1]) / bytes;
  constants.reduce_cpu_share = std::clamp(agreed[3], 0.0, 1.0);
  constants.reduce_overlap = std::clamp(2.0 - agreed[4] / std::max(agreed[1], 1e-9), 0.0, 1.0);
  return constants;
}

// compute_rows on the call's own GEMM, each figure the fastest of two (after
// one untimed): one row, for the pass over the weight that every call makes;
// r rows (up to 64: full micro-kernel blocks, and a few percent of a call
// worth planning) and 2r rows in one call and in two. A call of rows then costs a fixed part,
// two calls of r less one of 2r, plus each row's share, one call of 2r less
// one of r over r; with fewer than 2r rows, the fixed part is not told apart.
// Once per shape.
GemmConstants measure_gemm(comm::Communicator& comm, const gemm::PreparedGemm& gemm,
                           const PlanRequest& request) {
  const std::int64_t rows = std::min<std::int64_t>(request.m, 64);
  const bool pairs = request.m >= 2 * rows;
  const std::size_t row_bytes =
      static_cast<std::size_t>(request.n) * dtype_size(request.out_dtype);
  std::vector<std::byte> scratch(static_cast<std::size_t>(pairs ? 2 * rows : rows) * row_bytes);
  const auto rows_from = [&](std::int64_t begin, std::int64_t end) {
    gemm.compute_rows(begin, end, scratch.data() + static_cast<std::size_t>(begin) * row_bytes,
                      request.n);
  };
  const auto fastest = [](auto&& body) { return std::max(fastest_seconds(2, body), 1e-9); };
  const double pass = fastest([&] { rows_from(0, 1); });
  const double call_of_r = fastest([&] { rows_from(0, rows); });
  double rows_seconds = call_of_r, call_seconds = 0;
  if (pairs) {
    const double call_of_2r = fastest([&] { rows_from(0, 2 * rows); });
    const double two_calls = fastest([&] {
      rows_from(0, rows);
      rows_from(rows, 2 * rows);
    });
    // Noise can make the difference small: r rows take at least half a call of r.
    rows_seconds = std::max(call_of_2r - call_of_r, 0.5 * call_of_r);
    call_seconds = std::max(0.0, two_calls - call_of_2r);
  }
  const auto slowest_rank = agreed_max(comm, {rows_seconds, pass, call_seconds});
  GemmConstants constants;
  constants.flops = 2.0 * static_cast<double>(rows) * static_cast<double>(request.n) *
                    static_cast<double>(request.k) / slowest_rank[0];
  constants.pass_seconds = slowest_rank[1];
  constants.call_seconds = slowest_rank[2];
  return constants;
}

// The cached value for `key`, or (collectively: every rank misses alike)
// the one `measure` returns, cached. The lock is not held while measuring.
// A table is emptied past kMaxPlans entries, which happens on all the
// communicator's ranks at the same call, since they make the same calls.
const EnvSetting<std::int64_t> kCheckCaches{
    "TPFUSE_CHECK_CACHES", 0,
    "1: before each lookup of measured constants in a communicator's cache, its ranks compare the "
    "key and whether they hold it (one all_gather), and fail naming the ranks that differ"};

template <class T>
requires std::is_enum_v<T> || std::is_arithmetic_v<T> std::string key_text(const T& value) {
  return std::to_string(static_cast<long long>(value));
}

template <class... T>
std::string key_text(const std::tuple<T...>& key) {
  std::string text;
  const auto append = [&](const auto& field) {
    if (!text.empty()) text += ',';
    text += key_text(field);
  };
  std::apply([&](const auto&... field) { (append(field), ...); }, key);
  return text;
}

// The debugging check of TPFUSE_CHECK_CACHES: a lookup that hits on one rank
// and misses on another would have only some ranks measure, collectively.
void check_same_lookup(comm::Communicator& comm, std::string_view table, const std::string& key,
                       bool held) {
  const auto lookups = comm.all_gather(cat(held ? "holds " : "lacks ", table, " key (", key, ")"));
  for (std::size_t r = 1; r < lookups.size(); ++r) {
    if (lookups[r] == lookups[0]) continue;
    throw InternalError(cat("cost-model cache: rank 0 ", lookups[0], ", rank ", r, " ", lookups[r],
                            "; every rank of a communicator must hold the same entries"));
  }
}

template <class Key, class Value, class Measure>
Value cached_or_measured(comm::Communicator& comm, Cache& cache, std::string_view name,
                         std::map<Key, Value>& table, const Key& key, Measure&& measure) {
  {
    std::unique_lock lock(cache.mutex);
    const auto it = table.find(key);
    if (kCheckCaches.get() != 0) {
      const bool held = it != table.end();
      lock.unlock();
      check_same_lookup(comm, name, key_text(key), held);
      lock.lock();
    }
    if (auto found = table.find(key); found != table.end()) return found->second;
  }
  const Value value = measure();
  const std::lock_guard lock(cache.mutex);
  if (table.size() >= kMaxPlans) table.clear();
  table[key] = value;
  return value;
}

// A forced or one-row plan, or the all-gather's (a tile per rank's block),
// needs no constants; its predictions are then
// meaningless and unused.
bool needs_no_constants(const PlanRequest& request) {
  return request.comm_turn > 0 || request.m == 1 || request.op == Operator::all_gather_mm;
}

bool one_round_is_enough(const PlanRequest& request, const TransportConstants& transport) {
  const double output_bytes = static_cast<double>(request.m) *
                              static_cast<double>(request.n) *
                              static_cast<double>(dtype_size(request.out_dtype));
  return output_bytes * transport.reduce_seconds_per_byte <= transport.reduce_round_seconds;
}

TilePlan one_tile_plan(const PlanRequest& request) {
  TilePlan plan;
  plan.tile_rows = {request.m};
  plan.poll_rows = request.m;
  plan.reason = "one tile: reducing the whole output costs less than one more round";
  return plan;
}

GemmKey gemm_key(const PlanRequest& request) {
  return {request.mode, request.in_dtype, request.out_dtype, request.n, request.k, request.threads};
}

PlanKey plan_key(const PlanRequest& request) {
  return {request.op,        request.n,         request.mode,
          request.in_dtype,  request.out_dtype, request.m,
          request.k,         request.threads,   request.reduce_has_own_core,
          request.comm_turn, request.ranks};
}

}  // namespace

std::string_view operator_name(Operator op) {
  switch (op) {
    case Operator::mm_all_reduce:
      return "mm_all_reduce";
    case Operator::all_gather_mm:
      return "all_gather_mm";
    case Operator::mm_reduce_scatter:
      return "mm_reduce_scatter";
    case Operator::mm_all_reduce_add_rms_norm:
      return "mm_all_reduce_add_rms_norm";
  }
  return "?";
}

PlanRequest make_request(Operator op, const GemmProblem& shape, std::int64_t comm_turn, int threads,
                         bool reduce_has_own_core) {
  PlanRequest request;
  request.op = op;
  request.m = shape.m;
  request.n = shape.n;
  request.k = shape.k;
  request.mode = shape.mode;
  request.in_dtype = shape.in_dtype;
  request.out_dtype = shape.out_dtype;
  request.threads = threads;
  request.comm_turn = comm_turn;
  request.reduce_has_own_core = reduce_has_own_core;
  return request;
}

PlanRequest agree_request(comm::Communicator& comm, PlanRequest request) {
  const auto agreed =
      agreed_max(comm, {static_cast<double>(request.k), -static_cast<double>(request.threads),
                        request.reduce_has_own_core ? 0.0 : 1.0, static_cast<double>(request.n)});
  request.k = static_cast<std::int64_t>(agreed[0]);
  request.threads = static_cast<int>(-agreed[1]);
  request.reduce_has_own_core = agreed[2] == 0.0;
  request.n = static_cast<std::int64_t>(agreed[3]);
  return request;
}

TilePlan plan_call(comm::Communicator& comm, const gemm::PreparedGemm& gemm,
                   const PlanRequest& request, CostConstants* used) {
  if (needs_no_constants(request) && used == nullptr) return make_plan(request, {.gemm_flops = 1});
  Cache& tables = cache(comm);
  const TransportConstants transport =
      cached_or_measured(comm, tables, "transport", tables.transport, request.out_dtype,
                         [&] { return measure_transport(comm, request.out_dtype); });
  // No split can pay when reducing the whole output costs less than one
  // more round: decided from agreed values alone, so the call is spared the
  // gather below (a small output's call is mostly synchronisation).
  if (one_round_is_enough(request, transport) && used == nullptr) return one_tile_plan(request);
  const GemmConstants gemm_constants =
      cached_or_measured(comm, tables, "gemm", tables.gemm, gemm_key(request),
                         [&] { return measure_gemm(comm, gemm, request); });

  CostConstants constants;
  constants.gemm_flops = gemm_constants.flops;
  constants.gemm_pass_seconds = gemm_constants.pass_seconds;
  constants.gemm_call_seconds = gemm_constants.call_seconds;
  constants.reduce_round_seconds = transport.reduce_round_seconds;
  constants.reduce_seconds_per_byte = transport.reduce_seconds_per_byte;
  constants.copy_seconds_per_byte = transport.copy_seconds_per_byte;
  constants.reduce_cpu_share = transport.reduce_cpu_share;
  constants.reduce_overlap = transport.reduce_overlap;
  constants.buffer_bytes = static_cast<std::int64_t>(
      std::min<std::size_t>(comm.max_reduce_buffer_bytes(), std::size_t{1} << 62));
  constants.max_in_flight = comm.max_reduces_in_flight();
  if (used != nullptr) *used = constants;
  const PlanKey key = plan_key(request);
  {
    const std::lock_guard lock(tables.mutex);
    if (auto it = tables.plans.find(key); it != tables.plans.end()) return it->second;
  }
  TilePlan plan = make_plan(request, constants);
  log::debug("plan for m=", request.m, " n=", request.n, " k=", request.k, ": ",
             plan.tile_rows.size(), " tiles (", plan.reason, ")");
  const std::lock_guard lock(tables.mutex);
  if (tables.plans.size() >= kMaxPlans) tables.plans.clear();
  tables.plans.emplace(key, plan);
  return plan;
}

void forget_measurements(const comm::Communicator& comm) {
  Cache& tables = cache(comm);
  const std::lock_guard lock(tables.mutex);
  tables.transport.clear();
  tables.gemm.clear();
  tables.plans.clear();
}

std::optional<TilePlan> cached_plan(const comm::Communicator& comm, const PlanRequest& request) {
  if (needs_no_constants(request)) return make_plan(request, {.gemm_flops = 1});
  Cache& tables = cache(comm);
  const std::lock_guard lock(tables.mutex);
  const auto transport = tables.transport.find(request.out_dtype);
  if (transport == tables.transport.end()) return std::nullopt;
  if (one_round_is_enough(request, transport->second)) return one_tile_plan(request);
  // The GEMM's constants too: plan_call on a peer that has no plan cached
  // then computes the same plan without measuring (the tables of constants
  // change only when every rank measures together; the plans' do not).
  const auto plan = tables.plans.find(plan_key(request));
  if (plan == tables.plans.end() || !tables.gemm.contains(gemm_key(request))) return std::nullopt;
  return plan->second;
}

}  // namespace tpfuse::pipeline
