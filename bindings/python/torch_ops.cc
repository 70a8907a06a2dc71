// The tpfuse torch operators (namespace torch.ops.tpfuse), loaded by the
// `tpfuse` Python package with torch.ops.load_library:
//
//   mm_all_reduce_base(...)           the fused operator, CPU kernel + Autograd kernel
//   trans_quant_param(scale, offset)  torch_npu's npu_trans_quant_param
//   _packed_weight_cache_info()       [entries, bytes, hits, misses] of the weights kept packed
//   _make_rendezvous_dir()            a private directory for a group's FileStore,
//                                     sealed with a fresh job secret: [dir, secret]
//   _create_shm_communicator(dir, rank, size, secret)   collective; registers and returns hcom
//
// family_ops.cc adds the rest of the family; torch_convert.h has what both share.
//
// Everything here converts between at::Tensor and tpfuse's types and calls the
// C++ API; the rules live in the library. tpfuse errors cross as c10 errors so
// that Python sees ValueError (InvalidArgument) or RuntimeError (the rest)
// carrying the library's message unchanged and without a C++ backtrace.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstring>
#include <filesystem>
#include <list>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "torch_convert.h"
#include "tpfuse/core/config.h"
#include "tpfuse/ops/validate.h"
#include "tpfuse/tpfuse.h"

namespace tpfuse::torch_binding {

namespace {

// The operator's optional arguments, as torch passes them to a kernel.
struct TorchOptions {
  c10::string_view reduce_op;
  c10::optional<at::Tensor> bias;
  c10::optional<at::Tensor> antiquant_scale;
  c10::optional<at::Tensor> antiquant_offset;
  c10::optional<at::Tensor> x3;
  c10::optional<at::Tensor> dequant_scale;
  std::int64_t comm_turn;
  std::int64_t antiquant_group_size;

  // The same arguments in the layouts the library reads.
  TorchOptions as_read() const {
    return {reduce_op,
            torch_binding::as_read(bias),
            torch_binding::as_read(antiquant_scale),
            torch_binding::as_read(antiquant_offset),
            torch_binding::as_read(x3),
            torch_binding::as_read(dequant_scale),
            comm_turn,
            antiquant_group_size};
  }

  WeightArgs weight_args() const {
    return {antiquant_scale, antiquant_offset, dequant_scale, antiquant_group_size};
  }

  MmAllReduceOptions to_tpfuse() const {
    MmAllReduceOptions options;
    options.reduce_op = std::string(reduce_op);
    options.bias = to_view("bias", bias);
    options.antiquant_scale = to_view("antiquant_scale", antiquant_scale);
    options.antiquant_offset = to_view("antiquant_offset", antiquant_offset);
    options.x3 = to_view("x3", x3);
    options.dequant_scale = to_view("dequant_scale", dequant_scale);
    options.comm_turn = comm_turn;
    options.antiquant_group_size = antiquant_group_size;
    return options;
  }
};

// ---- packed weights, reused while the weight tensor is unchanged ----
//
// Inference multiplies the same weight on every call: the first call packs
// it (a PackedWeight), later ones reuse that while x2 and its scales are the
// same tensors (same storage, offset, sizes and strides) at the same version
// (torch bumps a tensor's version at every in-place change, and its views
// share it). torch_npu's signature stays as it is. Not cached: inference
// tensors (they keep no version), weights and scales the library cannot read
// where they lie (a packing refers to them, and their copies live for one
// call), and packings past TPFUSE_PACK_CACHE_MB (least recently used first;
// 0 turns the cache off).
const EnvSetting<std::int64_t> kPackCacheMb{
    "TPFUSE_PACK_CACHE_MB", 4096, "memory for weights the PyTorch binding keeps packed (0: none)"};

// One tensor as the cache identifies it.
struct TensorKey {
  const c10::StorageImpl* storage = nullptr;
  std::int64_t offset = 0;
  std::vector<std::int64_t> sizes, strides;
  at::ScalarType type = at::kFloat;
  std::int64_t version = 0;
  bool operator==(const TensorKey&) const = default;
};

std::optional<TensorKey> key_of(const c10::optional<at::Tensor>& tensor) {
  if (!tensor.has_value() || !tensor->defined()) return std::nullopt;
  return TensorKey{tensor->storage().unsafeGetStorageImpl(), tensor->storage_offset(),
                   tensor->sizes().vec(), tensor->strides().vec(), tensor->scalar_type(),
                   tensor->_version()};
}

struct WeightKey {
  at::ScalarType x1_type;
  TensorKey x2;
  std::optional<TensorKey> antiquant_scale, antiquant_offset, dequant_scale;
  std::int64_t group_size;
  bool operator==(const WeightKey&) const = default;
};

class WeightCache {
 public:
  struct Stats {
    std::int64_t entries = 0, bytes = 0, hits = 0, misses = 0;
  };

  // The packed weight for this call, packed now if it is not cached; null
  // where the call is not cached (or its arguments break a rule: the call
  // itself then reports that, collectively).
  std::shared_ptr<const PackedWeight> find_or_pack(const at::Tensor& x1, const at::Tensor& x2,
                                                   const WeightArgs& options) {
    const std::int64_t limit = kPackCacheMb.get() * (std::int64_t{1} << 20);
    if (limit <= 0 || x2.is_inference() || x2.numel() == 0) return nullptr;
    for (const auto* t : {&options.antiquant_scale, &options.antiquant_offset, &options.dequant_scale}) {
      if (t->has_value() && (*t)->defined() && (*t)->is_inference()) return nullptr;
    }
    const WeightKey key{x1.scalar_type(), *key_of(x2), key_of(options.antiquant_scale),
                        key_of(options.antiquant_offset), key_of(options.dequant_scale),
                        options.antiquant_group_size};
    std::lock_guard lock(mutex_);
    drop_dead();
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->key == key) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        ++stats_.hits;
        return it->packed;
      }
    }
    std::shared_ptr<const PackedWeight> packed;
    try {
      MmAllReduceOptions weight;
      weight.antiquant_scale = to_view("antiquant_scale", options.antiquant_scale);
      weight.antiquant_offset = to_view("antiquant_offset", options.antiquant_offset);
      weight.dequant_scale = to_view("dequant_scale", options.dequant_scale);
      weight.antiquant_group_size = options.antiquant_group_size;
      packed = std::make_shared<PackedWeight>(to_dtype("x1", x1.scalar_type()), to_view("x2", x2), weight);
    } catch (const InvalidArgument&) {
      return nullptr;
    }
    ++stats_.misses;
    entries_.push_front({key, x2.storage().getWeakStorageImpl(), packed});
    trim(limit);
    return packed;
  }

  Stats stats() {
    std::lock_guard lock(mutex_);
    drop_dead();
    Stats s = stats_;
    s.entries = static_cast<std::int64_t>(entries_.size());
    for (const Entry& entry : entries_) s.bytes += static_cast<std::int64_t>(entry.packed->packed_bytes());
    return s;
  }

 private:
  struct Entry {
    WeightKey key;
    // Keeps the storage's identity from being reused while the entry lives
    // (not its memory): an entry whose storage died matches nothing again.
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    std::shared_ptr<const PackedWeight> packed;
  };

  void drop_dead() {
    entries_.remove_if([](const Entry& entry) { return entry.storage.expired(); });
  }

  // Keeps the most recently used entries that fit in `limit` bytes (and the
  // newest whatever its size).
  void trim(std::int64_t limit) {
    std::int64_t kept = 0;
    for (auto it = entries_.begin(); it != entries_.end();) {
      const auto bytes = static_cast<std::int64_t>(it->packed->packed_bytes());
      if (it != entries_.begin() && kept + bytes > limit) {
        it = entries_.erase(it);
        continue;
      }
      kept += bytes;
      ++it;
    }
  }

  std::mutex mutex_;
  std::list<Entry> entries_;
  Stats stats_;
};

WeightCache& weight_cache() {
  static auto* cache = new WeightCache();
  return *cache;
}

}  // namespace

std::shared_ptr<const PackedWeight> cached_packed_weight(const at::Tensor& x1, const at::Tensor& x2,
                                                         const at::Tensor& x2_read,
                                                         const WeightArgs& given,
                                                         const WeightArgs& read) {
  const bool read_in_place = x2_read.is_same(x2) &&
                             same(read.antiquant_scale, given.antiquant_scale) &&
                             same(read.antiquant_offset, given.antiquant_offset) &&
                             same(read.dequant_scale, given.dequant_scale);
  return read_in_place ? weight_cache().find_or_pack(x1, x2, given) : nullptr;
}

namespace {

std::vector<std::int64_t> packed_weight_cache_info() {
  const WeightCache::Stats s = weight_cache().stats();
  return {s.entries, s.bytes, s.hits, s.misses};
}

at::Tensor mm_all_reduce_base_cpu(const at::Tensor& x1, const at::Tensor& x2,
                                  c10::string_view hcom, c10::string_view reduce_op,
                                  const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& antiquant_scale,
                                  const c10::optional<at::Tensor>& antiquant_offset,
                                  const c10::optional<at::Tensor>& x3,
                                  const c10::optional<at::Tensor>& dequant_scale,
                                  std::int64_t comm_turn, std::int64_t antiquant_group_size) {
  return translate_errors([&] {
    const TorchOptions options{reduce_op, bias,          antiquant_scale, antiquant_offset,
                               x3,        dequant_scale, comm_turn,       antiquant_group_size};
    const TorchOptions read = options.as_read();
    const at::Tensor x1_read = as_read(x1);
    const at::Tensor x2_read = weight_as_read(x2);
    const std::string_view group = group_of(hcom);
    const auto packed =
        cached_packed_weight(x1, x2, x2_read, options.weight_args(), read.weight_args());
    if (packed) {
      return adopt(mm_all_reduce_base(to_view("x1", x1_read), *packed, group, read.to_tpfuse()));
    }
    return adopt(mm_all_reduce_base(to_view("x1", x1_read), to_view("x2", x2_read), group,
                                    read.to_tpfuse()));
  });
}

// Plain mode's backward. The output is the same on every rank, so each rank's
// gradients need only its own inputs: no communication. Products run in fp32
// (torch 1.13 has no f16 matmul on CPU) and are rounded once to the input's
// dtype. bias and x3 enter once per rank, so their gradients are the output's
// (summed over rows for the broadcast bias).
class MmAllReduceBaseFunction : public torch::autograd::Function<MmAllReduceBaseFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x1,
                            const at::Tensor& x2, c10::string_view hcom,
                            c10::string_view reduce_op, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& antiquant_scale,
                            const c10::optional<at::Tensor>& antiquant_offset,
                            const c10::optional<at::Tensor>& x3,
                            const c10::optional<at::Tensor>& dequant_scale,
                            std::int64_t comm_turn, std::int64_t antiquant_group_size) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("tpfuse::mm_all_reduce_base", "")
                               .typed<decltype(mm_all_reduce_base_cpu)>();
    at::Tensor out = op.call(x1, x2, hcom, reduce_op, bias, antiquant_scale, antiquant_offset, x3,
                             dequant_scale, comm_turn, antiquant_group_size);
    // The call validated these arguments already; this only names the mode.
    const TorchOptions read =
        TorchOptions{reduce_op, bias,          antiquant_scale, antiquant_offset,
                     x3,        dequant_scale, comm_turn,       antiquant_group_size}
            .as_read();
    const Mode mode = translate_errors([&] {
      return validate_call(to_view("x1", as_read(x1)), to_view("x2", weight_as_read(x2)),
                           read.to_tpfuse())
          .mode;
    });
    ctx->saved_data["mode"] = std::string(mode_name(mode));
    ctx->saved_data["x1_grad"] = x1.requires_grad();
    ctx->saved_data["x2_grad"] = x2.requires_grad();
    ctx->saved_data["bias_grad"] = requires_grad(bias);
    ctx->saved_data["x3_grad"] = requires_grad(x3);
    if (mode == Mode::plain) ctx->save_for_backward({x1, x2});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    if (mode != mode_name(Mode::plain)) {
      throw c10::Error(cat("mm_all_reduce_base: gradients are supported only in plain mode (x1 "
                           "and x2 both f16 or both bf16); this call ran in ",
                           mode, " mode"),
                       "");
    }
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x1 = saved[0];
    const at::Tensor& x2 = saved[1];
    const at::Tensor& grad = grads[0];
    const std::int64_t n = grad.size(-1);
    const at::Tensor grad_rows = grad.reshape({-1, n}).to(at::kFloat);

    at::Tensor grad_x1, grad_x2, grad_bias, grad_x3;
    if (ctx->saved_data["x1_grad"].toBool()) {
      grad_x1 = grad_rows.mm(x2.to(at::kFloat).t()).to(x1.scalar_type()).reshape(x1.sizes());
    }
    if (ctx->saved_data["x2_grad"].toBool()) {
      grad_x2 = x1.reshape({-1, x1.size(-1)}).to(at::kFloat).t().mm(grad_rows).to(x2.scalar_type());
    }
    if (ctx->saved_data["bias_grad"].toBool()) grad_bias = grad_rows.sum(0).to(grad.scalar_type());
    if (ctx->saved_data["x3_grad"].toBool()) grad_x3 = grad;
    // One entry per forward argument: x1, x2, hcom, reduce_op, bias,
    // antiquant_scale, antiquant_offset, x3, dequant_scale, comm_turn, group size.
    return {grad_x1, grad_x2, {}, {}, grad_bias, {}, {}, grad_x3, {}, {}, {}};
  }
};

at::Tensor mm_all_reduce_base_autograd(const at::Tensor& x1, const at::Tensor& x2,
                                       c10::string_view hcom, c10::string_view reduce_op,
                                       const c10::optional<at::Tensor>& bias,
                                       const c10::optional<at::Tensor>& antiquant_scale,
                                       const c10::optional<at::Tensor>& antiquant_offset,
                                       const c10::optional<at::Tensor>& x3,
                                       const c10::optional<at::Tensor>& dequant_scale,
                                       std::int64_t comm_turn, std::int64_t antiquant_group_size) {
  if (!records_gradients(x1, x2, bias, antiquant_scale, antiquant_offset, x3, dequant_scale)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return mm_all_reduce_base_cpu(x1, x2, hcom, reduce_op, bias, antiquant_scale, antiquant_offset,
                                  x3, dequant_scale, comm_turn, antiquant_group_size);
  }
  return MmAllReduceBaseFunction::apply(x1, x2, hcom, reduce_op, bias, antiquant_scale,
                                        antiquant_offset, x3, dequant_scale, comm_turn,
                                        antiquant_group_size);
}

// Values are packed one by one, exactly as torch_npu packs them. The result
// has scale's shape, except that a 1-D scale broadcast against a longer 1-D
// offset gives the offset's length (torch_npu's shape rule).
std::vector<float> float_values(const char* name, const at::Tensor& tensor) {
  require(tensor.scalar_type() == at::kFloat, name, ": expected dtype Float (float32), got ",
          c10::toString(tensor.scalar_type()));
  require(tensor.dim() == 1 || (tensor.dim() == 2 && tensor.size(0) == 1), name,
          ": expected shape [n] or [1, n], got ", tensor.sizes());
  const at::Tensor dense = tensor.contiguous();
  const float* data = dense.data_ptr<float>();
  return std::vector<float>(data, data + dense.numel());
}

at::Tensor trans_quant_param_cpu(const at::Tensor& scale, const c10::optional<at::Tensor>& offset) {
  return translate_errors([&] {
    const std::vector<float> scales = float_values("scale", scale);
    std::vector<float> offsets;
    if (offset.has_value() && offset->defined()) offsets = float_values("offset", *offset);
    const std::vector<std::int64_t> packed = trans_quant_param(scales, offsets);
    std::vector<std::int64_t> sizes(scale.sizes().begin(), scale.sizes().end());
    sizes.back() = static_cast<std::int64_t>(packed.size());
    at::Tensor result = at::empty(sizes, at::TensorOptions().dtype(at::kLong));
    std::memcpy(result.data_ptr<std::int64_t>(), packed.data(),
                packed.size() * sizeof(std::int64_t));
    return result;
  });
}

// A private directory for a group's store, sealed with a fresh job secret:
// [directory, secret]. Rank 0 sends both to the group's other ranks.
std::vector<std::string> make_rendezvous_dir() {
  return translate_errors([] {
    const std::filesystem::path dir = comm::FileStore::make_private_dir();
    try {
      comm::FileStore store(dir);
      const comm::JobSecret secret = comm::JobSecret::generate();
      comm::seal_store(store, secret);
      return std::vector<std::string>{dir.string(), secret.hex()};
    } catch (...) {
      std::filesystem::remove_all(dir);
      throw;
    }
  });
}

// Collective over the group's `size` ranks. The barrier tells rank 0 that
// every rank is done with the store, so it can remove the directory.
std::string create_shm_communicator(c10::string_view store_dir, std::int64_t rank,
                                    std::int64_t size, c10::string_view secret) {
  return translate_errors([&] {
    const std::filesystem::path dir(std::string(store_dir.data(), store_dir.size()));
    require(rank >= 0 && rank < size, "rank: expected 0 <= rank < size = ", size, ", got ", rank);
    std::shared_ptr<comm::Communicator> communicator;
    try {
      comm::FileStore store(dir);
      comm::ShmOptions options;
      options.secret.assign(secret.data(), secret.size());
      communicator = comm::create_shm_communicator(store, static_cast<int>(rank),
                                                   static_cast<int>(size), options);
      communicator->barrier();
    } catch (...) {
      if (rank == 0) std::filesystem::remove_all(dir);
      throw;
    }
    if (rank == 0) std::filesystem::remove_all(dir);
    return comm::register_communicator(std::move(communicator));
  });
}

}  // namespace

}  // namespace tpfuse::torch_binding

TORCH_LIBRARY(tpfuse, m) {
  using namespace tpfuse::torch_binding;
  m.def(
      "mm_all_reduce_base(Tensor x1, Tensor x2, str hcom, *, str reduce_op='sum', "
      "Tensor? bias=None, Tensor? antiquant_scale=None, Tensor? antiquant_offset=None, "
      "Tensor? x3=None, Tensor? dequant_scale=None, int comm_turn=0, "
      "int antiquant_group_size=0) -> Tensor");
  m.def("trans_quant_param(Tensor scale, Tensor? offset=None) -> Tensor");
  m.def("_packed_weight_cache_info() -> int[]", &packed_weight_cache_info);
  m.def("_make_rendezvous_dir() -> str[]", &make_rendezvous_dir);
  m.def("_create_shm_communicator(str store_dir, int rank, int size, str secret) -> str",
        &create_shm_communicator);
}

TORCH_LIBRARY_IMPL(tpfuse, CPU, m) {
  using namespace tpfuse::torch_binding;
  m.impl("mm_all_reduce_base", &mm_all_reduce_base_cpu);
  m.impl("trans_quant_param", &trans_quant_param_cpu);
}

TORCH_LIBRARY_IMPL(tpfuse, Autograd, m) {
  m.impl("mm_all_reduce_base", &tpfuse::torch_binding::mm_all_reduce_base_autograd);
}
