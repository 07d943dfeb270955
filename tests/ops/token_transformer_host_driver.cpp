// Host check of the CUDA kernels of token_transformer: runs the CTA programs of
// csrc/token_transformer/token_transformer_device.h on CPU tensors through the same host
// sequence as token_transformer_cuda.cu (token_transformer_run.h), one CTA after another.
// Kept under tests/ (not csrc/) so the package build never compiles it; the test builds it with
// torch.utils.cpp_extension.load.
#include <torch/extension.h>

#include <functional>
#include <optional>
#include <vector>

#include "token_transformer/token_transformer_run.h"

namespace {

using hrnas::token_transformer::backward_alive_tokens;
using hrnas::token_transformer::BwdResult;
using hrnas::token_transformer::FwdResult;
using namespace hrnas::token_transformer::device;

// A CTA on the host, in one of two orders (set_order):
//   in order:  each phase's bodies as they come, i = 0, 1, ...;
//   deferred:  bodies are held until the next sync, then run last-first. A phase whose bodies
//              read what another body of the same phase writes, or a missing sync between two
//              dependent phases (the later phase's bodies then run before the earlier's), gives
//              results that differ from the in-order run; with neither, both are bitwise equal.
bool g_deferred = false;
std::vector<std::function<void()>> g_pending;

struct HostCta {
  template <class F>
  void each(int64_t count, F&& body) const {
    for (int64_t i = 0; i < count; ++i) {
      if (g_deferred) {
        g_pending.emplace_back([body, i]() mutable { body(i); });
      } else {
        body(i);
      }
    }
  }
  void sync() const {
    while (!g_pending.empty()) {
      const std::function<void()> body = std::move(g_pending.back());
      g_pending.pop_back();
      body();
    }
  }
};

struct HostExec {
  template <class P, class Args>
  void run(int64_t ctas, const Args& a) const {
    for (int64_t b = 0; b < ctas; ++b) {
      P::run(HostCta{}, b, a);
      TORCH_CHECK(g_pending.empty(), "a CTA program ended without a sync after its last phase");
    }
  }
};

void set_order(bool deferred) { g_deferred = deferred; }

// The host sequence, as fwd_cuda and bwd_cuda of token_transformer_cuda.cu: the forward reads
// the alive tokens through the index, the backward runs on gathered (compact) tokens.
FwdResult fwd(const at::Tensor& x, const at::Tensor& coords, const at::Tensor& w_in,
              const at::Tensor& bn_in_w, const at::Tensor& bn_in_b,
              const std::optional<at::Tensor>& rm_in, const std::optional<at::Tensor>& rv_in,
              const std::vector<at::Tensor>& encoder, const std::optional<at::Tensor>& query,
              const std::vector<at::Tensor>& decoder, const at::Tensor& w_out,
              const at::Tensor& bn_out_w, const at::Tensor& bn_out_b,
              const std::optional<at::Tensor>& rm_out, const std::optional<at::Tensor>& rv_out,
              int64_t heads, const std::vector<int64_t>& out_size, bool residual, double eps,
              bool save_tape, const std::optional<at::Tensor>& token_index) {
  TORCH_CHECK(out_size.size() == 2, "out_size must be [Ho, Wo]");
  FwdResult r;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "token_transformer_host_fwd", [&] {
    r = forward<scalar_t>(HostExec{}, x, coords, w_in, bn_in_w, bn_in_b, rm_in, rv_in, encoder,
                          query, decoder, w_out, bn_out_w, bn_out_b, rm_out, rv_out, heads,
                          out_size[0], out_size[1], residual, eps, token_index);
  });
  if (!save_tape) std::get<1>(r) = std::get<1>(r).new_empty({0});
  return r;
}

BwdResult bwd_compact(const at::Tensor& gy, const at::Tensor& tape, const at::Tensor& coords,
                      const at::Tensor& w_in, const at::Tensor& bn_in_w,
                      const at::Tensor& bn_in_b, const at::Tensor& var_in,
                      at::TensorList encoder, const std::optional<at::Tensor>& query,
                      at::TensorList decoder, const at::Tensor& w_out,
                      const at::Tensor& bn_out_w, const at::Tensor& var_out, int64_t heads,
                      c10::SymIntArrayRef in_size, bool residual, bool use_batch_stats,
                      double eps) {
  TORCH_CHECK(in_size.size() == 2, "in_size must be [H, W]");
  BwdResult r;
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "token_transformer_host_bwd", [&] {
    r = backward<scalar_t>(HostExec{}, gy, tape, coords, w_in, bn_in_w, bn_in_b, var_in,
                           encoder, query, decoder, w_out, bn_out_w, var_out, heads,
                           in_size[0].expect_int(), in_size[1].expect_int(), residual,
                           use_batch_stats, eps);
  });
  return r;
}

// The backward as registered for CUDA: the alive tokens gathered first (token_transformer.h).
BwdResult bwd(const at::Tensor& gy, const at::Tensor& tape, const at::Tensor& coords,
              const at::Tensor& w_in, const at::Tensor& bn_in_w, const at::Tensor& bn_in_b,
              const at::Tensor& var_in, const std::vector<at::Tensor>& encoder,
              const std::optional<at::Tensor>& query, const std::vector<at::Tensor>& decoder,
              const at::Tensor& w_out, const at::Tensor& bn_out_w, const at::Tensor& var_out,
              int64_t heads, const std::vector<int64_t>& in_size, bool residual,
              bool use_batch_stats, double eps, const std::optional<at::Tensor>& token_index) {
  return backward_alive_tokens<&bwd_compact>(gy, tape, coords, w_in, bn_in_w, bn_in_b, var_in,
                                             encoder, query, decoder, w_out, bn_out_w, var_out,
                                             heads, c10::fromIntArrayRefSlow(in_size), residual,
                                             use_batch_stats, eps, token_index);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("bwd", &bwd);
  m.def("set_order", &set_order);
}
