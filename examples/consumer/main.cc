// Two local ranks multiply their K-halves and all-reduce, through the
// installed library; exits 0 when every rank got the expected sum. Built by
// CMake (CMakeLists.txt: find_package(tpfuse)) or by hand with pkg-config:
//   g++ -std=c++20 main.cc $(pkg-config --cflags --libs tpfuse)
#include <tpfuse/tpfuse.h>

#include <cstdio>
#include <cstring>

int main() {
  tpfuse::comm::LaunchOptions options;
  options.ranks = 2;
  const auto result = tpfuse::comm::launch_local(options, [](tpfuse::comm::RankContext& ctx) {
    // x1 = all ones [4, 8], x2 = all ones [8, 3]: each rank's partial is 8, the sum 16.
    tpfuse::Tensor x1(tpfuse::DType::bf16, {4, 8});
    tpfuse::Tensor x2(tpfuse::DType::bf16, {8, 3});
    auto* a = x1.data_as<tpfuse::BFloat16>();
    auto* b = x2.data_as<tpfuse::BFloat16>();
    for (int i = 0; i < 32; ++i) a[i] = tpfuse::f32_to_bf16(1.0f);
    for (int i = 0; i < 24; ++i) b[i] = tpfuse::f32_to_bf16(1.0f);
    const auto out = tpfuse::mm_all_reduce_base(x1, x2, ctx.comm->name());
    for (int i = 0; i < 12; ++i) {
      if (tpfuse::bf16_to_f32(out.data_as<tpfuse::BFloat16>()[i]) != 16.0f) return 1;
    }
    return 0;
  });
  // The headers it was built with and the library it runs with must be one release.
  if (std::strcmp(tpfuse::version(), TPFUSE_VERSION) != 0) {
    std::printf("consumer: built with tpfuse %s, runs with %s\n", TPFUSE_VERSION, tpfuse::version());
    return 1;
  }
  std::printf("consumer (tpfuse %s): %s\n", tpfuse::version(),
              result.ok() ? "ok" : result.describe_failures().c_str());
  return result.ok() ? 0 : 1;
}
