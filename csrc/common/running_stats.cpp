// BatchNorm's running-statistics update after a training forward of the searched ops, on the
// CPU: the kernel of hrnas_kernels::batch_norm_running_update (its schema, contract and the
// composite that serves other devices: hrnas_kernels/_running_stats.py).
//
// r = lerp(r, stat, momentum) for the running mean and the running variance (the batch variance
// of `count` values per unit, times count / (count - 1)), at the entries `index` lists (all
// without one). One loop in place: the same update in ATen calls (index_select, mul, lerp,
// index_copy_) cost the token transformer's training step 30-60 us of dispatch.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "common/checks.h"

namespace hrnas {
namespace {

constexpr const char* kOp = "batch_norm_running_update";

// torch.lerp's formula with its fused multiply-adds (ATen's vectorised lerp), so the update
// matches the composite's bits.
template <typename T>
T lerp(T a, T b, T w) {
  return w < T(0.5) ? std::fma(w, b - a, a) : std::fma(a - b, T(1) - w, b);
}

void update_cpu(const at::Tensor& running_mean, const at::Tensor& running_var,
                const at::Tensor& mean, const at::Tensor& var,
                const std::optional<at::Tensor>& index, double momentum, int64_t count) {
  TORCH_CHECK(running_mean.dim() == 1 && running_var.sizes() == running_mean.sizes(), kOp,
              ": running_mean and running_var must be 1-d of one size, got ",
              running_mean.sizes(), " and ", running_var.sizes());
  const int64_t size = running_mean.size(0);
  const int64_t units = index.has_value() ? index->numel() : size;
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == units && var.sizes() == mean.sizes(), kOp,
              ": mean and var must be 1-d of ", units, " entries, got ", mean.sizes(), " and ",
              var.sizes());
  check_same(kOp, "running_var", running_var, running_mean);
  check_same(kOp, "mean", mean, running_mean);
  check_same(kOp, "var", var, running_mean);
  const int64_t* alive = nullptr;
  at::Tensor index_c;
  if (index.has_value()) {
    TORCH_CHECK(index->dim() == 1 && index->scalar_type() == at::kLong && index->is_cpu(), kOp,
                ": index must be a 1-d int64 CPU tensor, got ", index->scalar_type(), " ",
                index->sizes(), " on ", index->device());
    index_c = index->contiguous();
    alive = index_c.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < units; ++i) {
      TORCH_CHECK(alive[i] >= 0 && alive[i] < size, kOp, ": index holds ", alive[i],
                  ", outside [0, ", size, ")");
    }
  }
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), kOp, [&] {
    using T = scalar_t;
    T* rm = running_mean.mutable_data_ptr<T>();
    T* rv = running_var.mutable_data_ptr<T>();
    const T* m = mean.const_data_ptr<T>();
    const T* v = var.const_data_ptr<T>();
    const int64_t srm = running_mean.stride(0), srv = running_var.stride(0);
    const int64_t sm = mean.stride(0), sv = var.stride(0);
    const T w = static_cast<T>(momentum);
    const T correction =
        static_cast<T>(static_cast<double>(count) / std::max<int64_t>(count - 1, 1));
    for (int64_t i = 0; i < units; ++i) {
      const int64_t j = alive != nullptr ? alive[i] : i;
      rm[j * srm] = lerp(rm[j * srm], m[i * sm], w);
      rv[j * srv] = lerp(rv[j * srv], v[i * sv] * correction, w);
    }
  });
  // In place, as ATen's in-place ops: autograd sees the buffers change.
  running_mean.unsafeGetTensorImpl()->bump_version();
  running_var.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(hrnas_kernels, CPU, m) { m.impl("batch_norm_running_update", &update_cpu); }

}  // namespace hrnas
