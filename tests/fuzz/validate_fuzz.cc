// libFuzzer target: hostile arguments to mm_all_reduce_base and the family
// (all_gather_base_mm, mm_reduce_scatter_base, mm_all_reduce_add_rms_norm and
// its in-place form, and their _out forms). Each input decodes to a call
// (fuzz_call.h) that the contract model (contract_model.h) judges
// independently; then
//   - validation must agree with the model: accept what it accepts, with the
//     same facts (CallShape), and reject what it rejects with an
//     InvalidArgument "<argument>: ... got ..." naming an argument at fault;
//   - a rejected call, through the operator on a one-rank communicator, must
//     fail with that same error after exactly one collective round, the
//     call's checked round with an empty contribution, its header carrying
//     the error (so that peers fail rather than wait): no data reduced, no
//     allocation of 64 KiB or more (an output's), and the caller's outputs
//     (and the residual the in-place form writes) left as they were;
//   - an accepted call's first round is a checked one whose header says it
//     validated;
//   - an accepted call small enough to back with memory runs, and its
//     outputs match what the contract makes them on one rank
//     (output_checks.h).
// Anything else (a crash, a sanitizer report, another exception) aborts.
#include <sanitizer/allocator_interface.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "calls.h"
#include "contract_model.h"
#include "fuzz_call.h"
#include "output_checks.h"
#include "recording_communicator.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/core/error.h"

namespace tpfuse::fuzz {
namespace {

using test::CommEvent;
using test::RecordingCommunicator;

// Calls this large or larger are only validated: the golden model's and the
// checks' scalar loops would dominate the run.
constexpr __int128 kMaxRunMacs = 1 << 16;
// A rejected call allocates its message and exception, never this much.
constexpr std::size_t kLargeAllocation = 64 * 1024;

RecordingCommunicator* g_comm = nullptr;

// The largest allocation since arm(), from the sanitizer's malloc hook (any thread).
std::atomic<bool> g_armed{false};
std::atomic<std::size_t> g_largest{0};

void on_malloc(const volatile void*, std::size_t size) {
  if (!g_armed.load(std::memory_order_relaxed)) return;
  std::size_t seen = g_largest.load(std::memory_order_relaxed);
  while (size > seen && !g_largest.compare_exchange_weak(seen, size)) {
  }
}

void on_free(const volatile void*) {}

[[noreturn]] void finding(const CallSpec& spec, const std::string& what) {
  std::fprintf(stderr, "\n=== validate_fuzz finding: %s\n--- call:\n%s\n", what.c_str(),
               describe_call(spec).c_str());
  std::abort();
}

std::string shape_text(const CallShape& s) {
  return cat("op ", static_cast<int>(s.op), " mode ", mode_name(s.mode), " in ",
             dtype_name(s.in_dtype), " out ", dtype_name(s.out_dtype), " b ", s.batch, " s ", s.seq,
             " m ", s.m, " k ", s.k, " n ", s.n, " transposed ", s.x2_transposed, " bias ",
             s.has_bias, " x3 ", s.has_x3, " scale ", scale_kind_name(s.scale_kind), " offset ",
             s.has_offset, " group ", s.group_size, " row scale ", s.has_row_scale, " comm_turn ",
             s.comm_turn, " world_size ", s.world_size, " gather_output ", s.gather_output,
             " epsilon 0x", std::hex, std::bit_cast<std::uint32_t>(s.epsilon));
}

bool same_shape(const CallShape& a, const CallShape& b) { return shape_text(a) == shape_text(b); }

// Memory that a rejected call must leave as it was, with its bytes before
// the call: each output's own memory (its sentinel), the argument an output
// lies inside, and the residual the in-place form writes.
struct Kept {
  Arg arg;
  std::vector<std::byte> bytes;
};

std::vector<Kept> memory_to_keep(const CallSpec& spec, const MaterializedCall& call) {
  std::vector<bool> keep(kArgCount, false);
  for (int a = 0; a < kArgCount; ++a) {
    const ArgSpec& arg = spec.args[a];
    if (!arg.present || !can_alias(static_cast<Arg>(a))) continue;
    if (arg.alias_of >= 0) keep[arg.alias_of] = true;
    if (is_output(static_cast<Arg>(a))) keep[a] = true;
  }
  if (call_form(spec) == Form::in_place) keep[static_cast<int>(Arg::residual)] = true;
  std::vector<Kept> kept;
  for (int a = 0; a < kArgCount; ++a) {
    if (!keep[a] || call.bytes[a] == 0) continue;
    const auto* data = static_cast<const std::byte*>(call.views[a]->data());
    if (data == nullptr) continue;
    kept.push_back({static_cast<Arg>(a), std::vector<std::byte>(data, data + call.bytes[a])});
  }
  return kept;
}

void check_rejected(const CallSpec& spec, const MaterializedCall& call, const Verdict& verdict,
                    const std::string& error) {
  // "<argument>: expected ..., got ...", quoting what was given ("?" is
  // how dtype_name prints a dtype it does not know: not a quote).
  const std::string name = error.substr(0, error.find(':'));
  if (error.find(':') == std::string::npos || !verdict.faults.contains(name) ||
      error.find("got") == std::string::npos || error.find('?') != std::string::npos) {
    std::string faults;
    for (const auto& f : verdict.faults) faults += f + " ";
    finding(spec, cat("rejected with an error that does not name an argument at fault (", faults,
                      "): ", error));
  }

  const std::vector<Kept> kept = memory_to_keep(spec, call);
  g_comm->clear();
  g_largest = 0;
  g_armed = true;
  std::string thrown;
  try {
    Results results;
    run_operator(spec, call, g_comm->name(), results);
  } catch (const InvalidArgument& e) {
    thrown = e.what();
  } catch (const std::exception& e) {
    g_armed = false;
    finding(spec, cat("the operator threw something other than InvalidArgument: ", e.what()));
  }
  g_armed = false;
  if (thrown != error) {
    finding(spec, cat("the operator's error differs from validation's: \"", thrown, "\" vs \"",
                      error, "\""));
  }
  const auto events = g_comm->events();
  if (events != std::vector{CommEvent::acquire_reduce_buffer, CommEvent::checked_all_reduce} ||
      g_comm->largest_buffer() != 0) {
    finding(spec,
            cat("a rejected call made ", events.size(), " communicator calls, reducing up to ",
                g_comm->largest_buffer(), " elements; expected only an empty checked round"));
  }
  if (g_comm->first_header().find(error.substr(0, 48)) == std::string::npos) {
    finding(spec, "the checked round's header did not carry the error to the peers");
  }
  if (g_largest.load() >= kLargeAllocation) {
    finding(spec, cat("a rejected call allocated ", g_largest.load(), " bytes at once"));
  }
  for (const Kept& before : kept) {
    if (std::memcmp(call.views[static_cast<int>(before.arg)]->data(), before.bytes.data(),
                    before.bytes.size()) != 0) {
      finding(spec, cat("a rejected call wrote into ", arg_name(before.arg)));
    }
  }
}

bool runnable(const MaterializedCall& call, const Verdict& verdict) {
  const CallShape& s = verdict.shape;
  return call.all_backed() && verdict.output_bytes <= kMaxBackedBytes &&
         static_cast<__int128>(s.m) * s.n * s.k <= kMaxRunMacs;
}

void check_accepted_run(const CallSpec& spec, const MaterializedCall& call,
                        const CallShape& shape) {
  const TensorView residual = call.view(Arg::residual);
  std::vector<std::byte> residual_before;
  if (residual.data() != nullptr) {
    const auto* data = static_cast<const std::byte*>(residual.data());
    residual_before.assign(data, data + residual.numel() * dtype_size(residual.dtype()));
  }
  g_comm->clear();
  Results results;
  try {
    run_operator(spec, call, g_comm->name(), results);
  } catch (const std::exception& e) {
    finding(spec, cat("an accepted call failed: ", e.what()));
  }
  const auto events = g_comm->events();
  const auto first_round = std::find_if(events.begin(), events.end(), [](CommEvent e) {
    return e != CommEvent::acquire_reduce_buffer;
  });
  const std::string sent = g_comm->first_header();
  std::int64_t flag = 0;
  if (sent.size() >= sizeof(flag)) std::memcpy(&flag, sent.data(), sizeof(flag));
  if (first_round == events.end() || *first_round != CommEvent::checked_all_reduce || flag != 1) {
    finding(spec, "an accepted call did not start with a checked round saying it validated");
  }
  const std::string wrong =
      check_outputs(spec, call, shape, results, residual_before, g_comm->name());
  if (!wrong.empty()) finding(spec, wrong);
}

void fuzz_one(std::span<const std::uint8_t> bytes) {
  const CallSpec spec = decode_call(bytes);
  const MaterializedCall call = materialize(spec);
  const Verdict verdict = judge(spec, call);

  CallShape shape;
  const std::string error = validation_error(spec, call, static_cast<int>(kGroupSize), shape);
  if (!verdict.accepted()) {
    if (error.empty()) {
      std::string faults;
      for (const auto& f : verdict.faults) faults += f + " ";
      finding(spec, cat("validation accepted a call the contract rejects (", faults, ")"));
    }
    check_rejected(spec, call, verdict, error);
    return;
  }
  if (!error.empty()) finding(spec, cat("validation rejected a valid call: ", error));
  if (!same_shape(shape, verdict.shape)) {
    finding(spec, cat("validation described the call as\n  ", shape_text(shape),
                      "\nthe contract as\n  ", shape_text(verdict.shape)));
  }
  if (runnable(call, verdict)) check_accepted_run(spec, call, shape);
}

}  // namespace
}  // namespace tpfuse::fuzz

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  using namespace tpfuse;
  // One GEMM thread: results do not depend on it, and executions are faster.
  setenv("TPFUSE_NUM_THREADS", "1", 0);
  __sanitizer_install_malloc_and_free_hooks(fuzz::on_malloc, fuzz::on_free);
  // A real one-rank shared-memory communicator (its segment is unlinked once
  // attached, so nothing is left behind even if the fuzzer dies), small slots
  // so that larger outputs are reduced in chunks.
  const auto dir = comm::FileStore::make_private_dir();
  std::shared_ptr<comm::Communicator> inner;
  {
    comm::FileStore store(dir);
    comm::ShmOptions options;
    options.timeout = std::chrono::seconds(10);
    options.slot_bytes = 64 * 1024;
    inner = comm::create_shm_communicator(store, 0, 1, options);
  }
  std::filesystem::remove_all(dir);
  auto recording = std::make_shared<test::RecordingCommunicator>(inner, "validate_fuzz");
  fuzz::g_comm = recording.get();
  comm::register_communicator(recording);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  tpfuse::fuzz::fuzz_one({data, size});
  return 0;
}
