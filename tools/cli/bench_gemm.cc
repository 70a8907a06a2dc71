// `tpfuse bench gemm`: tpfuse's GEMM engines against the libraries a user
// would otherwise call, on the same shapes, in one process and one run:
// oneDNN f32 / bf16 / s8s8s32 matmul, OpenBLAS sgemm, and "convert f16 to
// f32, then oneDNN f32". Prints GFLOP/s (median over repetitions, with the
// spread), the ratios to the baselines, and optionally JSON.
//
// Measurements of one shape are interleaved repetition by repetition, across
// engines and thread counts, so a burst of load from other processes hits all
// of them alike and the ratios stay meaningful on a noisy machine. A tpfuse measurement is
// one whole call, prepare_gemm() (x2's conversion and packing) included; a
// library measurement is one execution of a primitive created beforehand.
// Each thread count runs pinned to that many cores (--no-pin to disable).
//
// OpenBLAS is loaded at run time, after OPENBLAS_CORETYPE and
// OPENBLAS_L2_SIZE are cleared in this process: set, they make OpenBLAS pick
// slower kernels than the CPU supports.
#include <dlfcn.h>
#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <dnnl.hpp>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench_common.h"
#include "commands.h"
#include "core/cpu_isa.h"
#include "gemm/engines.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/gemm/tile_gemm.h"
#include "tpfuse/ops/quant_param.h"

namespace tpfuse::cli {

namespace {

using Shape = GemmShape;

struct BenchOptions {
  std::vector<std::string> shapes;
  std::vector<int> threads;
  std::vector<std::string> modes;
  int reps = 5;
  double min_rep_ms = 50;
  std::string json;
  bool no_pin = false;
  bool transposed = false;
  std::string epilogue = "both";
  std::string packed = "both";
  bool no_baselines = false;
  std::string openblas_coretype;  // empty: OPENBLAS_CORETYPE unset
  std::string clock = "wall";
};

// ---- OpenBLAS, loaded at run time ----

struct OpenBlas {
  using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);
  Sgemm sgemm = nullptr;
  void (*set_num_threads)(int) = nullptr;
  std::string config;
};

// The first call loads the library (by its run-time name, which Debian's
// libopenblas0 provides: the baseline needs no -dev package) with
// OPENBLAS_CORETYPE set to `coretype`, or unset when that is empty.
const OpenBlas* load_openblas(const std::string& coretype = "") {
  static const std::unique_ptr<OpenBlas> blas = [&]() -> std::unique_ptr<OpenBlas> {
    if (coretype.empty()) {
      unsetenv("OPENBLAS_CORETYPE");
    } else {
      setenv("OPENBLAS_CORETYPE", coretype.c_str(), 1);
    }
    unsetenv("OPENBLAS_L2_SIZE");
    void* handle = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) return nullptr;
    auto b = std::make_unique<OpenBlas>();
    b->sgemm = reinterpret_cast<OpenBlas::Sgemm>(dlsym(handle, "cblas_sgemm"));
    b->set_num_threads = reinterpret_cast<void (*)(int)>(dlsym(handle, "openblas_set_num_threads"));
    auto get_config = reinterpret_cast<const char* (*)()>(dlsym(handle, "openblas_get_config"));
    auto get_corename = reinterpret_cast<const char* (*)()>(dlsym(handle, "openblas_get_corename"));
    if (b->sgemm == nullptr || b->set_num_threads == nullptr) return nullptr;
    b->config = get_config != nullptr ? get_config() : "?";
    if (get_corename != nullptr) b->config += cat(" (kernel ", get_corename(), ")");
    return b;
  }();
  return blas.get();
}

// ---- inputs ----

class Filler {
 public:
  explicit Filler(std::uint64_t seed) : state_(seed * 0x9E3779B97F4A7C15ull + 1) {}
  double uniform(double lo, double hi) {
    state_ ^= state_ << 13;
    state_ ^= state_ >> 7;
    state_ ^= state_ << 17;
    return lo + (hi - lo) * static_cast<double>(state_ >> 11) * 0x1p-53;
  }

 private:
  std::uint64_t state_;
};

// One shape's operands in every dtype the measurements use.
struct ShapeData {
  ShapeData(const Shape& s, bool transposed) : shape(s), x2_transposed(transposed) {
    const std::int64_t mk = s.m * s.k, kn = s.k * s.n, mn = s.m * s.n;
    x1_f32 = floats(mk, 1, -1, 1);
    x2_f32 = floats(kn, 2, -1, 1);
    x1_f16 = halves(x1_f32);
    x2_f16 = halves(x2_f32);
    x1_bf16 = bhalves(x1_f32);
    x2_bf16 = bhalves(x2_f32);
    x1_i8 = int8s(mk, 3);
    x2_i8 = int8s(kn, 4);
    const std::vector<float> bias_f32 = floats(s.n, 5, -1, 1), x3_f32 = floats(mn, 6, -1, 1);
    bias_f16 = halves(bias_f32);
    bias_bf16 = bhalves(bias_f32);
    x3_f16 = halves(x3_f32);
    x3_bf16 = bhalves(x3_f32);
    const std::vector<float> scale_f32 = floats(s.n, 7, 0.01, 0.05);
    scale_f16 = halves(scale_f32);
    scale_bf16 = bhalves(scale_f32);
    bias_i32.resize(static_cast<std::size_t>(s.n));
    dequant_scale.resize(static_cast<std::size_t>(s.n));
    Filler f(8);
    for (std::int64_t j = 0; j < s.n; ++j) {
      bias_i32[j] = static_cast<std::int32_t>(f.uniform(-1000, 1000));
      dequant_scale[j] = trans_quant_param(static_cast<float>(f.uniform(0.5e-3, 1.5e-3)));
    }
    out.resize(static_cast<std::size_t>(mn) * 4);
    x1_converted.resize(static_cast<std::size_t>(mk));
    x2_converted.resize(static_cast<std::size_t>(kn));
  }

  static std::vector<float> floats(std::int64_t count, std::uint64_t seed, double lo, double hi) {
    Filler f(seed);
    std::vector<float> v(static_cast<std::size_t>(count));
    for (float& x : v) x = static_cast<float>(f.uniform(lo, hi));
    return v;
  }
  static std::vector<Half> halves(const std::vector<float>& v) {
    std::vector<Half> h(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) h[i] = f32_to_f16(v[i]);
    return h;
  }
  static std::vector<BFloat16> bhalves(const std::vector<float>& v) {
    std::vector<BFloat16> h(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) h[i] = f32_to_bf16(v[i]);
    return h;
  }
  static std::vector<std::int8_t> int8s(std::int64_t count, std::uint64_t seed) {
    Filler f(seed);
    std::vector<std::int8_t> v(static_cast<std::size_t>(count));
    for (auto& x : v) x = static_cast<std::int8_t>(f.uniform(-127, 128));
    return v;
  }

  // x2 as the caller stores it: [k, n] row-major, or a transposed [n, k].
  TensorView x2_view(void* data, DType dtype) const {
    const std::int64_t dims[2] = {shape.k, shape.n};
    if (!x2_transposed) return TensorView(data, dtype, dims);
    const std::int64_t strides[2] = {1, shape.k};
    return TensorView(data, dtype, dims, strides);
  }

  Shape shape;
  bool x2_transposed;
  std::vector<float> x1_f32, x2_f32, x1_converted, x2_converted;
  std::vector<Half> x1_f16, x2_f16, bias_f16, x3_f16, scale_f16;
  std::vector<BFloat16> x1_bf16, x2_bf16, bias_bf16, x3_bf16, scale_bf16;
  std::vector<std::int8_t> x1_i8, x2_i8;
  std::vector<std::int32_t> bias_i32;
  std::vector<std::int64_t> dequant_scale;
  std::vector<unsigned char> out;
};

// ---- measurements ----

struct Measurement {
  std::string mode;
  std::string engine;  // "tpfuse" or the baseline's name
  bool epilogue = false;
  bool packed = false;  // tpfuse with x2 packed once (gemm::pack_x2), as a PackedWeight does
  std::string detail;  // the engine tpfuse chose, the library's kernel
  std::string why;     // the rule that chose tpfuse's engine
  std::function<void()> call;
  int calls_per_rep = 1;
  std::vector<double> seconds;  // per call, one per repetition
};

// Wall-clock time, or with --clock cpu the CPU time of this process: on a
// machine shared with other work, a single-threaded run's CPU time leaves out
// the time it was preempted (it still pays for the caches it lost).
bool use_cpu_clock = false;

double now_seconds() {
  timespec ts;
  clock_gettime(use_cpu_clock ? CLOCK_PROCESS_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

gemm::GemmOperands tpfuse_operands(ShapeData& d, const std::string& mode, bool epilogue, int threads) {
  const Shape& s = d.shape;
  gemm::GemmOperands ops;
  GemmProblem& c = ops.shape;
  c.m = s.m;
  c.n = s.n;
  c.k = s.k;
  c.x2_transposed = d.x2_transposed;
  c.has_bias = epilogue;
  c.has_x3 = epilogue;
  ops.threads = threads;
  const std::int64_t x1_dims[2] = {s.m, s.k}, x3_dims[2] = {s.m, s.n}, n_dims[1] = {s.n};
  const bool f16 = mode == "f16" || mode == "wq_f16";
  if (mode == "int8") {
    c.mode = Mode::full_quant;
    c.in_dtype = DType::i8;
    c.out_dtype = DType::f16;
    c.scale_kind = ScaleKind::per_channel;
    ops.x1 = TensorView(d.x1_i8.data(), DType::i8, x1_dims);
    ops.x2 = d.x2_view(d.x2_i8.data(), DType::i8);
    ops.scale = TensorView(d.dequant_scale.data(), DType::i64, n_dims);
    if (epilogue) {
      ops.bias = TensorView(d.bias_i32.data(), DType::i32, n_dims);
      ops.x3 = TensorView(d.x3_f16.data(), DType::f16, x3_dims);
    }
    return ops;
  }
  const DType dtype = f16 ? DType::f16 : DType::bf16;
  c.in_dtype = c.out_dtype = dtype;
  ops.x1 = TensorView(f16 ? static_cast<void*>(d.x1_f16.data()) : d.x1_bf16.data(), dtype, x1_dims);
  if (mode == "wq_f16" || mode == "wq_bf16") {
    c.mode = Mode::weight_quant;
    c.scale_kind = ScaleKind::per_channel;
    ops.x2 = d.x2_view(d.x2_i8.data(), DType::i8);
    ops.scale = TensorView(f16 ? static_cast<void*>(d.scale_f16.data()) : d.scale_bf16.data(), dtype, n_dims);
  } else {
    c.mode = Mode::plain;
    ops.x2 = d.x2_view(f16 ? static_cast<void*>(d.x2_f16.data()) : d.x2_bf16.data(), dtype);
  }
  if (epilogue) {
    ops.bias = TensorView(f16 ? static_cast<void*>(d.bias_f16.data()) : d.bias_bf16.data(), dtype, n_dims);
    ops.x3 = TensorView(f16 ? static_cast<void*>(d.x3_f16.data()) : d.x3_bf16.data(), dtype, x3_dims);
  }
  return ops;
}

// One whole call, prepare_gemm() included; with `packed`, x2 is packed once
// beforehand and every call reads the packing, as calls with a PackedWeight do.
Measurement tpfuse_measurement(ShapeData& d, const std::string& mode, bool epilogue, bool packed, int threads) {
  gemm::GemmOperands ops = tpfuse_operands(d, mode, epilogue, threads);
  Measurement m;
  m.mode = mode;
  m.engine = packed ? "tpfuse_packed" : "tpfuse";
  m.epilogue = epilogue;
  m.packed = packed;
  std::shared_ptr<const gemm::PackedX2> packing = packed ? gemm::pack_x2(ops) : nullptr;
  ops.packed = packing.get();
  m.detail = gemm::prepare_gemm(ops)->engine();
  m.why = gemm::choose_engine(ops, active_isa()).why;
  void* out = d.out.data();
  const std::int64_t rows = d.shape.m, ld = d.shape.n;
  m.call = [ops, packing, out, rows, ld] { gemm::prepare_gemm(ops)->compute_rows(0, rows, out, ld); };
  return m;
}

std::shared_ptr<OneDnnMatmul> make_onednn(ShapeData& d, dnnl::memory::data_type in, dnnl::memory::data_type out,
                                          const void* x1, const void* x2) {
  const Shape& s = d.shape;
  return make_onednn_matmul(s.m, s.n, s.k, in, out, x1, x2, d.out.data(), d.x2_transposed);
}

Measurement onednn_measurement(const std::string& mode, const std::string& engine,
                               std::shared_ptr<OneDnnMatmul> mm) {
  Measurement m;
  m.mode = mode;
  m.engine = engine;
  m.detail = mm->impl;
  m.call = [mm] { mm->execute(); };
  return m;
}

// A half mode's baseline through f32: both operands converted, then oneDNN's
// f32 matmul (what a user does where oneDNN has no fast matmul for the mode).
Measurement converting_baseline(ShapeData& d, const std::string& mode, DType dtype, const void* x1, const void* x2,
                                int threads) {
  using dt = dnnl::memory::data_type;
  auto mm = make_onednn(d, dt::f32, dt::f32, d.x1_converted.data(), d.x2_converted.data());
  Measurement m = onednn_measurement(mode, "convert_onednn_f32", mm);
  ShapeData* data = &d;
  m.call = [mm, data, dtype, x1, x2, threads] {
    convert_to_f32(dtype, x1, static_cast<std::int64_t>(data->x1_converted.size()), data->x1_converted.data(), threads);
    convert_to_f32(dtype, x2, static_cast<std::int64_t>(data->x2_converted.size()), data->x2_converted.data(), threads);
    mm->execute();
  };
  return m;
}

std::vector<Measurement> baselines(ShapeData& d, int threads, const std::vector<std::string>& modes) {
  using dt = dnnl::memory::data_type;
  const auto wants = [&](const std::string& mode) {
    return std::find(modes.begin(), modes.end(), mode) != modes.end();
  };
  std::vector<Measurement> out;
  omp_set_num_threads(threads);
  const bool f16_family = wants("f16") || wants("wq_f16") || wants("wq_bf16");
  if (wants("f32") || f16_family) {
    out.push_back(onednn_measurement("f32", "onednn_f32", make_onednn(d, dt::f32, dt::f32, d.x1_f32.data(), d.x2_f32.data())));
  }
  if (wants("f16")) out.push_back(converting_baseline(d, "f16", DType::f16, d.x1_f16.data(), d.x2_f16.data(), threads));
  if (wants("bf16")) {
    // Where oneDNN has no fast bf16 matmul, a user converts to f32, as for f16.
    const Shape& s = d.shape;
    const auto mm = make_native_onednn_matmul(s.m, s.n, s.k, dt::bf16, dt::bf16, d.x1_bf16.data(), d.x2_bf16.data(),
                                              d.out.data(), d.x2_transposed);
    if (mm != nullptr) {
      out.push_back(onednn_measurement("bf16", "onednn_bf16", mm));
    } else {
      out.push_back(converting_baseline(d, "bf16", DType::bf16, d.x1_bf16.data(), d.x2_bf16.data(), threads));
    }
  }
  if (wants("int8")) {
    out.push_back(onednn_measurement("int8", "onednn_s8", make_onednn(d, dt::s8, dt::s32, d.x1_i8.data(), d.x2_i8.data())));
  }
  const OpenBlas* blas = load_openblas();
  if (blas != nullptr && (wants("f32") || f16_family)) {
    Measurement m;
    m.mode = "f32";
    m.engine = "openblas_sgemm";
    m.detail = blas->config;
    ShapeData* data = &d;
    m.call = [blas, data, threads] {
      constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
      const Shape& s = data->shape;
      blas->set_num_threads(threads);
      blas->sgemm(kRowMajor, kNoTrans, data->x2_transposed ? kTrans : kNoTrans, static_cast<int>(s.m),
                  static_cast<int>(s.n), static_cast<int>(s.k), 1.0f, data->x1_f32.data(), static_cast<int>(s.k),
                  data->x2_f32.data(), static_cast<int>(data->x2_transposed ? s.k : s.n), 0.0f,
                  reinterpret_cast<float*>(data->out.data()), static_cast<int>(s.n));
    };
    out.push_back(m);
  }
  return out;
}

// Pins this process to `threads` cores of those it was started with (the
// last ones: core 0 tends to take the interrupts). Returns a description.
std::string pin_to_cores(const std::vector<int>& allowed, int threads) {
  if (static_cast<int>(allowed.size()) < threads) {
    pin_process(allowed);
    return cat("not pinned: only ", allowed.size(), " cores for ", threads, " threads");
  }
  const std::vector<int> cores(allowed.end() - threads, allowed.end());
  pin_process(cores);
  std::string names;
  for (int core : cores) names += cat(names.empty() ? "" : ",", core);
  return cat("pinned to core", threads > 1 ? "s " : " ", names);
}

// The measurements of one thread count, run pinned to that many cores.
struct ThreadGroup {
  int threads = 0;
  std::string pinning;
  std::vector<Measurement> ms;
};

// Repetitions are interleaved across thread counts as well as engines: the
// scaling ratio (2 threads against 1) then compares repetitions taken side
// by side, not two stretches of the run that other load may treat unevenly.
void measure(std::vector<ThreadGroup>& groups, const std::vector<int>& allowed, bool pin, int reps, double min_rep_ms) {
  const auto enter = [&](ThreadGroup& g) {
    const std::string pinning = pin ? pin_to_cores(allowed, g.threads) : "not pinned";
    if (g.pinning.empty()) g.pinning = pinning;
  };
  for (ThreadGroup& g : groups) {  // warm up, and size a repetition
    enter(g);
    for (Measurement& m : g.ms) {
      const double t0 = now_seconds();
      m.call();
      const double once = std::max(1e-6, now_seconds() - t0);
      m.calls_per_rep = static_cast<int>(std::clamp(min_rep_ms * 1e-3 / once, 1.0, 10000.0));
    }
  }
  for (int r = 0; r < reps; ++r) {
    for (ThreadGroup& g : groups) {
      enter(g);
      for (Measurement& m : g.ms) {
        const double t0 = now_seconds();
        for (int c = 0; c < m.calls_per_rep; ++c) m.call();
        m.seconds.push_back((now_seconds() - t0) / m.calls_per_rep);
      }
    }
  }
}

struct Record {
  std::string mode, engine, detail;
  Shape shape;
  int threads = 0;
  bool epilogue = false;
  bool packed = false;
  std::string why;
  double gflops = 0, gflops_min = 0, gflops_max = 0, seconds = 0;
  int reps = 0;
};

std::string record_key(const std::string& mode, const Shape& s, int threads, const std::string& engine,
                       bool epilogue) {
  return cat(mode, "/", s.m, "x", s.n, "x", s.k, "/", threads, "/", engine, "/", epilogue);
}

Shape parse_shape(const std::string& text) {
  if (const auto shape = parse_mnk(text)) return *shape;
  throw CLI::ValidationError("--shape", cat("expected MxNxK with positive sizes, got \"", text, "\""));
}

// Ratios of medians, each against what it is compared with in this run: a
// tpfuse engine against the library a user would call for the same mode;
// packed x2 against packing in the call; bias + x3 against none; 2 threads
// against 1. Other work on the machine only ever slows a repetition down, so
// the ratio of the best repetitions is shown too: on a busy machine it is
// the steadier estimate of what the code itself does.
void print_ratios(const std::vector<Record>& records, const std::map<std::string, Record>& by_key) {
  // The library's measurement for each mode, as (mode, engine): the first of
  // those measured in this run (bf16's native matmul, or the conversion to
  // f32 where oneDNN has none).
  using Baseline = std::pair<std::string, std::string>;
  const std::vector<Baseline> bf16_library = {{"bf16", "onednn_bf16"}, {"bf16", "convert_onednn_f32"}};
  const std::map<std::string, std::vector<Baseline>> library = {{"f16", {{"f32", "onednn_f32"}}},
                                                                {"bf16", bf16_library},
                                                                {"int8", {{"int8", "onednn_s8"}}},
                                                                {"wq_f16", {{"f32", "onednn_f32"}}},
                                                                {"wq_bf16", bf16_library}};
  std::printf("\nRatios in this run (of medians; best-of-reps in brackets):\n");
  const auto show = [&](const Record& r, const std::string& against_key, const std::string& what) {
    const auto den = by_key.find(against_key);
    if (den == by_key.end()) return;
    std::printf("  %-7s %5lldx%lldx%lld %dt %-9s %-40s %6.3f  (%6.3f)\n", r.mode.c_str(),
                static_cast<long long>(r.shape.m), static_cast<long long>(r.shape.n),
                static_cast<long long>(r.shape.k), r.threads, r.packed ? "packed" : "", what.c_str(),
                r.gflops / den->second.gflops, r.gflops_max / den->second.gflops_max);
  };
  for (const Record& r : records) {
    if (r.engine != "tpfuse" && r.engine != "tpfuse_packed") continue;
    const auto lib = library.find(r.mode);
    if (lib != library.end() && !r.epilogue) {
      for (const auto& [mode, engine] : lib->second) {
        const std::string key = record_key(mode, r.shape, r.threads, engine, false);
        if (by_key.count(key) == 0) continue;
        show(r, key, cat("vs ", engine));
        break;
      }
    }
    if (r.packed) show(r, record_key(r.mode, r.shape, r.threads, "tpfuse", r.epilogue), "vs x2 packed in the call");
    if (r.epilogue) show(r, record_key(r.mode, r.shape, r.threads, r.engine, false), "bias+x3 vs none");
    if (r.threads == 2) show(r, record_key(r.mode, r.shape, 1, r.engine, r.epilogue), "2 threads vs 1");
  }
}

// Which engine each mode took, and the rule that chose it.
void print_engines(const std::vector<Record>& records) {
  std::printf("\nEngines (prepare_gemm.cc's rules):\n");
  std::map<std::string, bool> shown;
  for (const Record& r : records) {
    if (r.why.empty()) continue;
    const std::string line = cat(r.mode, " ", r.shape.m, "x", r.shape.n, "x", r.shape.k, ": ", r.detail, " -- ", r.why);
    if (shown.emplace(line, true).second) std::printf("  %s\n", line.c_str());
  }
}

void write_json(const std::string& path, const std::vector<Record>& records) {
  std::ofstream out(path);
  if (!out) throw CLI::RuntimeError(cat("bench gemm: cannot write ", path), 1);
  out << "[\n";
  for (std::size_t i = 0; i < records.size(); ++i) {
    const Record& r = records[i];
    out << "  {\"mode\": \"" << r.mode << "\", \"m\": " << r.shape.m << ", \"n\": " << r.shape.n
        << ", \"k\": " << r.shape.k << ", \"threads\": " << r.threads << ", \"engine\": \"" << r.engine
        << "\", \"epilogue\": " << (r.epilogue ? "true" : "false") << ", \"packed\": "
        << (r.packed ? "true" : "false") << ", \"gflops\": " << r.gflops
        << ", \"gflops_min\": " << r.gflops_min << ", \"gflops_max\": " << r.gflops_max
        << ", \"seconds\": " << r.seconds << ", \"clock\": \"" << (use_cpu_clock ? "cpu" : "wall")
        << "\", \"reps\": " << r.reps << ", \"detail\": \"" << r.detail << "\", \"why\": \"" << r.why
        << "\"}" << (i + 1 < records.size() ? "," : "") << "\n";
  }
  out << "]\n";
}

void run_bench(const BenchOptions& o) {
  std::vector<Shape> shapes;
  for (const std::string& text : o.shapes) shapes.push_back(parse_shape(text));
  use_cpu_clock = o.clock == "cpu";
  const std::vector<bool> epilogues =
      o.epilogue == "both" ? std::vector<bool>{false, true} : std::vector<bool>{o.epilogue == "on"};
  const std::vector<bool> packings =
      o.packed == "both" ? std::vector<bool>{false, true} : std::vector<bool>{o.packed == "on"};
  const std::vector<int> allowed = allowed_cores();
  if (!o.no_baselines) {
    const OpenBlas* blas = load_openblas(o.openblas_coretype);
    std::printf("OpenBLAS: %s\n", blas != nullptr ? blas->config.c_str() : "not available");
  }
  std::printf("tpfuse ISA level: %s; x2 %s; %d repetitions, median GFLOP/s (min-max), %s time\n",
              std::string(isa_name(active_isa())).c_str(),
              o.transposed ? "transposed ([n, k] storage)" : "row-major [k, n]", o.reps,
              use_cpu_clock ? "process CPU" : "wall-clock");
  std::vector<Record> records;
  std::map<std::string, Record> by_key;
  for (const Shape& shape : shapes) {
    ShapeData data(shape, o.transposed);
    std::vector<ThreadGroup> groups;
    for (int threads : o.threads) {
      ThreadGroup& g = groups.emplace_back();
      g.threads = threads;
      for (const std::string& mode : o.modes) {
        if (mode == "f32") continue;
        for (bool epilogue : epilogues) {
          for (bool packed : packings) g.ms.push_back(tpfuse_measurement(data, mode, epilogue, packed, threads));
        }
      }
      if (!o.no_baselines) {
        for (Measurement& m : baselines(data, threads, o.modes)) g.ms.push_back(std::move(m));
      }
    }
    measure(groups, allowed, !o.no_pin, o.reps, o.min_rep_ms);
    const double flops = 2.0 * static_cast<double>(shape.m) * static_cast<double>(shape.n) * static_cast<double>(shape.k);
    for (const ThreadGroup& g : groups) {
      std::printf("\nm=%lld n=%lld k=%lld, %d thread%s (%s)\n", static_cast<long long>(shape.m),
                  static_cast<long long>(shape.n), static_cast<long long>(shape.k), g.threads,
                  g.threads > 1 ? "s" : "", g.pinning.c_str());
      std::printf("  %-8s %-20s %-9s %9s %19s  %s\n", "mode", "engine", "epilogue", "GFLOP/s", "(min-max)", "detail");
      for (const Measurement& m : g.ms) {
        Record r{m.mode, m.engine, m.detail, shape, g.threads, m.epilogue, m.packed, m.why};
        r.seconds = median(m.seconds);
        r.gflops = flops / r.seconds * 1e-9;
        r.gflops_min = flops / *std::max_element(m.seconds.begin(), m.seconds.end()) * 1e-9;
        r.gflops_max = flops / *std::min_element(m.seconds.begin(), m.seconds.end()) * 1e-9;
        r.reps = static_cast<int>(m.seconds.size());
        std::printf("  %-8s %-20s %-9s %9.1f  (%7.1f-%7.1f)  %s\n", r.mode.c_str(), r.engine.c_str(),
                    r.epilogue ? "bias+x3" : "none", r.gflops, r.gflops_min, r.gflops_max, r.detail.c_str());
        records.push_back(r);
        by_key[record_key(r.mode, shape, g.threads, r.engine, r.epilogue)] = r;
      }
    }
  }
  pin_process(allowed);
  print_engines(records);
  print_ratios(records, by_key);
  if (!o.json.empty()) {
    write_json(o.json, records);
    std::printf("\nwrote %zu records to %s\n", records.size(), o.json.c_str());
  }
}

}  // namespace

void add_bench_gemm_command(CLI::App& bench_app) {
  auto o = std::make_shared<BenchOptions>();
  o->shapes = {"2048x2048x2048", "1x4096x4096", "16x4096x4096", "128x64x512"};
  o->modes = {"f16", "bf16", "int8", "wq_f16", "wq_bf16", "f32"};
  o->threads = {1, 2};
  auto* cmd = bench_app.add_subcommand(
      "gemm", "tpfuse's GEMM engines against oneDNN, OpenBLAS and convert-then-oneDNN on the same shapes");
  cmd->add_option("--shape", o->shapes, "Shapes MxNxK (repeatable)")->capture_default_str();
  cmd->add_option("--threads", o->threads, "Thread counts to run (each pinned to that many cores)")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  cmd->add_option("--modes", o->modes, "Modes: f16 bf16 int8 wq_f16 wq_bf16 f32 (baselines only)")
      ->check(CLI::IsMember({"f16", "bf16", "int8", "wq_f16", "wq_bf16", "f32"}))
      ->capture_default_str();
  cmd->add_option("--reps", o->reps, "Repetitions (the median is reported)")->check(CLI::Range(1, 1000));
  cmd->add_option("--min-rep-ms", o->min_rep_ms, "Calls are repeated to fill at least this long a repetition")
      ->check(CLI::Range(0.0, 10000.0));
  cmd->add_option("--packed", o->packed, "tpfuse with x2 packed once (as a PackedWeight): off, on or both")
      ->check(CLI::IsMember({"off", "on", "both"}))
      ->capture_default_str();
  cmd->add_option("--epilogue", o->epilogue, "tpfuse with bias + x3: off, on or both")
      ->check(CLI::IsMember({"off", "on", "both"}));
  cmd->add_option("--json", o->json, "Write the figures to this file, one record per measurement");
  cmd->add_option("--clock", o->clock, "wall, or cpu: this process's CPU time (for one thread on a busy machine)")
      ->check(CLI::IsMember({"wall", "cpu"}));
  cmd->add_flag("--transposed", o->transposed, "x2 stored transposed ([n, k] row-major)");
  cmd->add_flag("--no-pin", o->no_pin, "Do not pin each thread count to that many cores");
  cmd->add_flag("--no-baselines", o->no_baselines, "Measure tpfuse only");
  cmd->add_option("--openblas-coretype", o->openblas_coretype,
                  "Set OPENBLAS_CORETYPE to this for the OpenBLAS baseline (default: unset, OpenBLAS "
                  "detects the CPU)");
  cmd->callback([o] { run_bench(*o); });
}

}  // namespace tpfuse::cli
