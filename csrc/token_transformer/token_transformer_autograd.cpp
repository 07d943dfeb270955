// Autograd of the native token_transformer_fwd op, in C++: one autograd node per call, made and
// run without Python. The CPU and CUDA kernels sit below it (the Autograd key covers both); the
// Triton family keeps its Python autograd.Function (hrnas_kernels/token_transformer/api.py).
//
// Why C++: the block's kernels take ~0.6 ms a training step at 25% alive tokens (N=8, C=36,
// 28x28, 64 tokens), and a Python autograd.Function around them cost ~70 us more (its apply over
// 30 arguments, the saved tensors' unpacking, the backward's argument conversions): too much of
// a step that the search shrinks by killing tokens.
//
// The node saves what the backward op reads (the tape, the weights, the statistics the forward
// normalised with) and calls token_transformer_bwd, whose full-size per-token gradients map
// one-to-one onto the forward's differentiable inputs. The statistics and the tape are outputs
// without gradients. Higher-order gradients are not supported (the backward op has no
// derivative): a backward under create_graph=True raises instead of returning gradients that
// would silently lack their second-order terms.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "token_transformer/token_transformer.h"

namespace hrnas {
namespace token_transformer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSignature = FwdResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                               at::TensorList, const std::optional<at::Tensor>&, at::TensorList,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                               int64_t, c10::SymIntArrayRef, bool, double, bool,
                               const std::optional<at::Tensor>&);
using BwdSignature = BwdResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, at::TensorList,
                               const std::optional<at::Tensor>&, at::TensorList,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                               c10::SymIntArrayRef, bool, bool, double,
                               const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<FwdSignature>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hrnas_kernels::token_transformer_fwd", "")
                             .typed<FwdSignature>();
  return op;
}

const c10::TypedOperatorHandle<BwdSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("hrnas_kernels::token_transformer_bwd", "")
                             .typed<BwdSignature>();
  return op;
}

// The two 1x1 projections' weights as the kernels take them, [rows, cols]: the autograd kernel
// also accepts them conv-shaped, [rows, cols, 1, 1], as nn.Conv2d holds them (the module passes
// its parameters so: a flatten(1) per weight was a view op in the forward and a ViewBackward
// node in the backward). Called below autograd, so the view is no autograd node either.
at::Tensor as_matrix(const at::Tensor& w) {
  return w.dim() == 4 ? w.view({w.size(0), w.size(1)}) : w;
}

void check_projection(const char* name, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 || (w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1), kOp, ": ",
              name, " must be [rows, cols] or [rows, cols, 1, 1], got ", w.sizes());
}

// The op's arguments that are not tensors (apply() gives each one gradient slot, left empty).
struct Options {
  int64_t heads;
  c10::SymIntArrayRef out_size;
  bool residual;
  double eps;
};

// The order of the saved tensors; the encoder's and the decoder's weights follow them.
enum Saved { kTape, kCoords, kWIn, kBnInW, kBnInB, kVarIn, kQuery, kWOut, kBnOutW, kVarOut,
             kSavedBeforeLayers };

// apply()'s arguments: the differentiable inputs first, in the order of the gradients the
// backward returns (x, w_in, bn_in_w, bn_in_b, query, w_out, bn_out_w, bn_out_b, then the
// encoder's and the decoder's weights), then the rest, whose slots stay empty.
constexpr int64_t kSlotsBeforeLayers = 8;
constexpr int64_t kSlotsAfterLayers = 7;  // coords, 4 running statistics, token_index, options

class TokenTransformerFunction : public torch::autograd::Function<TokenTransformerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_in,
                               const at::Tensor& bn_in_w, const at::Tensor& bn_in_b,
                               const std::optional<at::Tensor>& query, const at::Tensor& w_out,
                               const at::Tensor& bn_out_w, const at::Tensor& bn_out_b,
                               at::TensorList encoder, at::TensorList decoder,
                               const at::Tensor& coords, const std::optional<at::Tensor>& rm_in,
                               const std::optional<at::Tensor>& rv_in,
                               const std::optional<at::Tensor>& rm_out,
                               const std::optional<at::Tensor>& rv_out,
                               const std::optional<at::Tensor>& token_index,
                               const Options& options) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, tape, mean_in, var_in, mean_out, var_out] = forward_op().call(
        x, coords, as_matrix(w_in), bn_in_w, bn_in_b, rm_in, rv_in, encoder, query, decoder,
        as_matrix(w_out), bn_out_w, bn_out_b, rm_out, rv_out, options.heads, options.out_size,
        options.residual, options.eps, /*save_tape=*/true, token_index);
    variable_list saved{tape,   coords,  w_in,   bn_in_w, bn_in_b, var_in,
                        query.value_or(at::Tensor()), w_out, bn_out_w, var_out};
    saved.insert(saved.end(), encoder.begin(), encoder.end());
    saved.insert(saved.end(), decoder.begin(), decoder.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["encoder_weights"] = static_cast<int64_t>(encoder.size());
    ctx->saved_data["heads"] = options.heads;
    ctx->saved_data["in_h"] = x.sym_size(2);
    ctx->saved_data["in_w"] = x.sym_size(3);
    ctx->saved_data["residual"] = options.residual;
    ctx->saved_data["batch_stats"] = !rm_in.has_value();
    ctx->saved_data["eps"] = options.eps;
    ctx->saved_data["token_index"] = token_index;
    ctx->saved_data["slots"] = static_cast<int64_t>(kSlotsBeforeLayers + encoder.size() +
                                                    decoder.size() + kSlotsAfterLayers);
    ctx->mark_non_differentiable({tape, mean_in, var_in, mean_out, var_out});
    // the outputs other than y never carry gradients: backward sees them undefined, not zeros
    ctx->set_materialize_grads(false);
    return {y, tape, mean_in, var_in, mean_out, var_out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(ctx->saved_data["slots"].toInt());
    const at::Tensor& gy = grad_outputs[0];
    if (!gy.defined()) return grads;  // only the statistics were reached: nothing flows back
    TORCH_CHECK(!at::GradMode::is_enabled(), kOp,
                ": the native backward has no derivative of its own; higher-order gradients "
                "(create_graph=True) need impl='reference'");
    const variable_list saved = ctx->get_saved_variables();
    const int64_t n_enc = ctx->saved_data["encoder_weights"].toInt();
    const auto layers = at::TensorList(saved).slice(kSavedBeforeLayers);
    const at::TensorList encoder = layers.slice(0, n_enc), decoder = layers.slice(n_enc);
    const std::optional<at::Tensor> query =
        saved[kQuery].defined() ? std::optional<at::Tensor>(saved[kQuery]) : std::nullopt;
    const c10::SymInt in_size[2] = {ctx->saved_data["in_h"].toSymInt(),
                                    ctx->saved_data["in_w"].toSymInt()};
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [g_x, g_w_in, g_bn_in_w, g_bn_in_b, g_enc, g_query, g_dec, g_w_out, g_bn_out_w,
          g_bn_out_b] =
        backward_op().call(gy.contiguous(), saved[kTape], saved[kCoords], as_matrix(saved[kWIn]),
                           saved[kBnInW], saved[kBnInB], saved[kVarIn], encoder, query, decoder,
                           as_matrix(saved[kWOut]), saved[kBnOutW], saved[kVarOut],
                           ctx->saved_data["heads"].toInt(), in_size,
                           ctx->saved_data["residual"].toBool(),
                           ctx->saved_data["batch_stats"].toBool(),
                           ctx->saved_data["eps"].toDouble(),
                           ctx->saved_data["token_index"].toOptional<at::Tensor>());
    grads[0] = g_x;
    grads[1] = g_w_in.view(saved[kWIn].sizes());  // the caller's shape (conv-shaped or not)
    grads[2] = g_bn_in_w;
    grads[3] = g_bn_in_b;
    if (query.has_value()) grads[4] = g_query;
    grads[5] = g_w_out.view(saved[kWOut].sizes());
    grads[6] = g_bn_out_w;
    grads[7] = g_bn_out_b;
    std::copy(g_enc.begin(), g_enc.end(), grads.begin() + kSlotsBeforeLayers);
    std::copy(g_dec.begin(), g_dec.end(), grads.begin() + kSlotsBeforeLayers + n_enc);
    return grads;
  }
};

FwdResult fwd_autograd(const at::Tensor& x, const at::Tensor& coords, const at::Tensor& w_in,
                       const at::Tensor& bn_in_w, const at::Tensor& bn_in_b,
                       const std::optional<at::Tensor>& rm_in,
                       const std::optional<at::Tensor>& rv_in, at::TensorList encoder,
                       const std::optional<at::Tensor>& query, at::TensorList decoder,
                       const at::Tensor& w_out, const at::Tensor& bn_out_w,
                       const at::Tensor& bn_out_b, const std::optional<at::Tensor>& rm_out,
                       const std::optional<at::Tensor>& rv_out, int64_t heads,
                       c10::SymIntArrayRef out_size, bool residual, double eps, bool save_tape,
                       const std::optional<at::Tensor>& token_index) {
  check_projection("input_proj_weight", w_in);
  check_projection("reverse_proj_weight", w_out);
  bool needs_grad = false;
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor* t : {&x, &w_in, &bn_in_w, &bn_in_b, &w_out, &bn_out_w, &bn_out_b}) {
      needs_grad = needs_grad || t->requires_grad();
    }
    needs_grad = needs_grad || (query.has_value() && query->requires_grad());
    for (at::TensorList layer : {encoder, decoder}) {
      for (const at::Tensor& t : layer) needs_grad = needs_grad || t.requires_grad();
    }
  }
  if (!needs_grad) {  // inference: the kernels alone, no node, the tape only when asked for
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(x, coords, as_matrix(w_in), bn_in_w, bn_in_b, rm_in, rv_in, encoder,
                             query, decoder, as_matrix(w_out), bn_out_w, bn_out_b, rm_out, rv_out,
                             heads, out_size, residual, eps, save_tape, token_index);
  }
  const variable_list out = TokenTransformerFunction::apply(
      x, w_in, bn_in_w, bn_in_b, query, w_out, bn_out_w, bn_out_b, encoder, decoder, coords,
      rm_in, rv_in, rm_out, rv_out, token_index, Options{heads, out_size, residual, eps});
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(hrnas_kernels, Autograd, m) {
  m.impl("token_transformer_fwd", &fwd_autograd);
}

}  // namespace token_transformer
}  // namespace hrnas
