// The host side of the CUDA kernels: argument checks, allocation, and the sequence of CTA
// programs (token_transformer_device.h), templated on an executor `Exec` that runs one program
// over a grid of CTAs: token_transformer_cuda.cu launches kernels, the host check
// (tests/ops/token_transformer_host_driver.cpp) runs the same programs on CPU tensors.
//
// Forward, 3 launches: FwdTokens (one CTA per sample), FwdLayers (one per sample), FwdOutput
// (one per output plane). Backward, 4: BwdOutput (per plane), BwdLayers, BwdInput (per sample),
// BwdReduce (the weight gradients: per-sample partials summed in sample order).
// Statistics come out in float (double for double inputs), the tape in the input's dtype
// (ops.py's fake kernels).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "token_transformer/token_transformer.h"
#include "token_transformer/token_transformer_device.h"

namespace hrnas {
namespace token_transformer {
namespace device {

inline at::ScalarType stats_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The sizes every program relies on (the Python API has given users clear errors already).
inline Dims check_args(const at::Tensor& coords, const at::Tensor& w_in, at::TensorList encoder,
                       const std::optional<at::Tensor>& query, at::TensorList decoder,
                       const at::Tensor& w_out, int64_t heads, const at::Tensor& ref) {
  check_weights(coords, w_in, encoder, query, decoder, w_out, heads, ref);
  const int64_t g = coords.size(1), d = g * g;
  Dims s{};
  s.C = w_in.size(1) - 2;
  s.g = g;
  s.d = d;
  s.L = w_in.size(0);
  s.Co = w_out.size(0);
  s.heads = heads;
  s.decoder = query.has_value();
  return s;
}

// Contiguous copies of a weight list, kept alive while the programs read their pointers.
template <typename T>
std::vector<at::Tensor> layer_pointers(at::TensorList ws, const T** out) {
  std::vector<at::Tensor> kept;
  for (size_t i = 0; i < ws.size(); ++i) {
    kept.push_back(ws[i].contiguous());
    out[i] = kept.back().template const_data_ptr<T>();
  }
  return kept;
}

template <typename T, class Exec>
FwdResult forward(const Exec& exec, const at::Tensor& x_in, const at::Tensor& coords_in,
                  const at::Tensor& w_in_in, const at::Tensor& bn_in_w_in,
                  const at::Tensor& bn_in_b_in, const std::optional<at::Tensor>& rm_in,
                  const std::optional<at::Tensor>& rv_in, at::TensorList encoder,
                  const std::optional<at::Tensor>& query_in, at::TensorList decoder,
                  const at::Tensor& w_out_in, const at::Tensor& bn_out_w_in,
                  const at::Tensor& bn_out_b_in, const std::optional<at::Tensor>& rm_out,
                  const std::optional<at::Tensor>& rv_out, int64_t heads, int64_t Ho,
                  int64_t Wo, bool residual, double eps,
                  const std::optional<at::Tensor>& token_index) {
  using A = at::opmath_type<T>;
  check_nchw(kOp, "x", x_in);
  Dims s = check_args(coords_in, w_in_in, encoder, query_in, decoder, w_out_in, heads, x_in);
  const int64_t tokens = s.L;  // the per-token parameters' size; s.L: the alive tokens
  check_token_index(token_index, tokens, x_in);
  const at::Tensor index =
      token_index.has_value() ? token_index->contiguous() : at::Tensor();
  if (index.defined()) s.L = index.numel();
  s.N = x_in.size(0);
  s.H = x_in.size(2);
  s.W = x_in.size(3);
  s.Ho = Ho;
  s.Wo = Wo;
  s.residual = residual;
  s.batch_stats = !rm_in.has_value();
  TORCH_CHECK(x_in.size(1) == s.C, kOp, ": x has ", x_in.size(1), " channels, input_proj_weight ",
              s.C + 2, " - 2");
  TORCH_CHECK(Ho >= 1 && Wo >= 1, kOp, ": out_size must be positive, got ", Ho, "x", Wo);
  TORCH_CHECK(!residual || (Ho == s.H && Wo == s.W && s.Co == s.C), kOp,
              ": residual needs the output shape to equal x's");
  TORCH_CHECK(s.batch_stats == !rv_in.has_value() && s.batch_stats == !rm_out.has_value() &&
                  s.batch_stats == !rv_out.has_value(),
              kOp, ": pass all four running statistics or none");
  TORCH_CHECK(s.N > 0 || !s.batch_stats, kOp,
              ": batch statistics of an empty batch are undefined");
  const auto opt = x_in.options();
  const auto sopt = opt.dtype(stats_type(x_in.scalar_type()));
  const TapeLayout tp = make_tape_layout(s.N, s.C, s.L, s.d, heads, 1 + s.decoder, s.Co);
  at::Tensor tape = at::empty({tp.total}, opt);
  at::Tensor y = at::empty({s.N, s.Co, Ho, Wo}, opt);
  at::Tensor mean_in = at::empty({s.L}, sopt), var_in = at::empty({s.L}, sopt);
  at::Tensor mean_out = at::empty({s.Co}, sopt), var_out = at::empty({s.Co}, sopt);
  if (s.N == 0) {  // eval on an empty batch: the statistics used are the running ones
    mean_in.copy_(index.defined() ? rm_in->index_select(0, index) : *rm_in);
    var_in.copy_(index.defined() ? rv_in->index_select(0, index) : *rv_in);
    mean_out.copy_(*rm_out);
    var_out.copy_(*rv_out);
    return {y, tape, mean_in, var_in, mean_out, var_out};
  }
  const at::Tensor x = x_in.contiguous(), coords = coords_in.contiguous(),
                   w_in = w_in_in.contiguous(), w_out = w_out_in.contiguous();
  std::vector<at::Tensor> kept = {bn_in_w_in.contiguous(), bn_in_b_in.contiguous(),
                                  bn_out_w_in.contiguous(), bn_out_b_in.contiguous()};
  for (const auto* t : {&rm_in, &rv_in, &rm_out, &rv_out, &query_in})
    kept.push_back(t->has_value() ? (*t)->contiguous() : at::Tensor());
  auto ptr = [](const at::Tensor& t) {
    return t.defined() ? t.template const_data_ptr<T>() : static_cast<const T*>(nullptr);
  };
  FwdArgs<T, A> a{};
  a.s = s;
  a.eps = static_cast<A>(eps);
  a.token = index.defined() ? index.const_data_ptr<int64_t>() : nullptr;
  a.tokens = tokens;
  a.x = x.const_data_ptr<T>();
  a.coords = coords.const_data_ptr<T>();
  a.w_in = w_in.const_data_ptr<T>();
  a.bn_in_w = ptr(kept[0]);
  a.bn_in_b = ptr(kept[1]);
  a.bn_out_w = ptr(kept[2]);
  a.bn_out_b = ptr(kept[3]);
  a.rm_in = ptr(kept[4]);
  a.rv_in = ptr(kept[5]);
  a.rm_out = ptr(kept[6]);
  a.rv_out = ptr(kept[7]);
  a.query = ptr(kept[8]);
  a.w_out = w_out.const_data_ptr<T>();
  const std::vector<at::Tensor> enc = layer_pointers<T>(encoder, a.enc);
  const std::vector<at::Tensor> dec = layer_pointers<T>(decoder, a.dec);
  a.w = make_fwd_work(s.N, s.L, s.d, s.Co);
  at::Tensor ws = at::empty({a.w.total}, sopt);
  a.tp = tp;
  a.y = y.mutable_data_ptr<T>();
  a.tape = tape.mutable_data_ptr<T>();
  a.mean_in = mean_in.mutable_data_ptr<A>();
  a.var_in = var_in.mutable_data_ptr<A>();
  a.mean_out = mean_out.mutable_data_ptr<A>();
  a.var_out = var_out.mutable_data_ptr<A>();
  a.ws = ws.mutable_data_ptr<A>();
  exec.template run<FwdTokens>(s.N, a);
  exec.template run<FwdLayers>(s.N, a);
  exec.template run<FwdOutput>(s.N * s.Co, a);
  return {y, tape, mean_in, var_in, mean_out, var_out};
}

template <typename T, class Exec>
BwdResult backward(const Exec& exec, const at::Tensor& gy_in, const at::Tensor& tape,
                   const at::Tensor& coords_in, const at::Tensor& w_in_in,
                   const at::Tensor& bn_in_w_in, const at::Tensor& bn_in_b_in,
                   const at::Tensor& var_in_in, at::TensorList encoder,
                   const std::optional<at::Tensor>& query_in, at::TensorList decoder,
                   const at::Tensor& w_out_in, const at::Tensor& bn_out_w_in,
                   const at::Tensor& var_out_in, int64_t heads, int64_t H, int64_t W,
                   bool residual, bool use_batch_stats, double eps) {
  using A = at::opmath_type<T>;
  check_nchw(kOp, "grad_out", gy_in);
  Dims s = check_args(coords_in, w_in_in, encoder, query_in, decoder, w_out_in, heads, gy_in);
  s.N = gy_in.size(0);
  s.H = H;
  s.W = W;
  s.Ho = gy_in.size(2);
  s.Wo = gy_in.size(3);
  s.residual = residual;
  s.batch_stats = use_batch_stats;
  TORCH_CHECK(gy_in.size(1) == s.Co, kOp, ": grad_out has ", gy_in.size(1),
              " channels, expected ", s.Co);
  TORCH_CHECK(!residual || (H == s.Ho && W == s.Wo && s.Co == s.C), kOp,
              ": residual needs the output shape to equal x's");
  const TapeLayout tp = make_tape_layout(s.N, s.C, s.L, s.d, heads, 1 + s.decoder, s.Co);
  TORCH_CHECK(tape.dim() == 1 && tape.numel() == tp.total, kOp, ": the tape has ", tape.numel(),
              " values, expected ", tp.total);
  check_same(kOp, "the tape", tape, gy_in);
  TORCH_CHECK(var_in_in.numel() == s.L && var_out_in.numel() == s.Co, kOp,
              ": the statistics have ", var_in_in.numel(), " and ", var_out_in.numel(),
              " values, expected ", s.L, " and ", s.Co);
  const auto opt = gy_in.options();
  const auto sopt = opt.dtype(stats_type(gy_in.scalar_type()));
  at::Tensor gx = at::empty({s.N, s.C, H, W}, opt);
  std::vector<at::Tensor> grads(kGrads);
  auto like = [&](const at::Tensor& t) { return at::zeros(t.sizes(), opt); };
  grads[kWIn] = like(w_in_in);
  grads[kBnInW] = like(bn_in_w_in);
  grads[kBnInB] = like(bn_in_w_in);
  for (int i = 0; i < 8; ++i) {
    grads[kEnc + i] = like(encoder[i]);
    grads[kDec + i] = s.decoder ? like(decoder[i]) : at::Tensor();
  }
  grads[kQuery] = s.decoder ? like(*query_in) : at::empty({0}, opt);
  grads[kWOut] = like(w_out_in);
  grads[kBnOutW] = like(bn_out_w_in);
  grads[kBnOutB] = like(bn_out_w_in);
  auto result = [&] {
    const std::vector<at::Tensor> g_enc(grads.begin() + kEnc, grads.begin() + kEnc + 8);
    const std::vector<at::Tensor> g_dec =
        s.decoder ? std::vector<at::Tensor>(grads.begin() + kDec, grads.begin() + kDec + 8)
                  : std::vector<at::Tensor>();
    return BwdResult{gx,    grads[kWIn],  grads[kBnInW],   grads[kBnInB],  g_enc,
                     grads[kQuery], g_dec, grads[kWOut], grads[kBnOutW], grads[kBnOutB]};
  };
  if (s.N == 0) return result();  // no samples: every weight gradient is an empty sum
  const at::Tensor gy = gy_in.contiguous(), tp_c = tape.contiguous(),
                   coords = coords_in.contiguous(), w_in = w_in_in.contiguous(),
                   w_out = w_out_in.contiguous(), bn_in_w = bn_in_w_in.contiguous(),
                   bn_in_b = bn_in_b_in.contiguous(), bn_out_w = bn_out_w_in.contiguous(),
                   var_in = var_in_in.to(sopt).contiguous(),
                   var_out = var_out_in.to(sopt).contiguous();
  const at::Tensor query = s.decoder ? query_in->contiguous() : at::Tensor();
  BwdArgs<T, A> a{};
  a.s = s;
  a.eps = static_cast<A>(eps);
  a.gy = gy.const_data_ptr<T>();
  a.tape = tp_c.const_data_ptr<T>();
  a.coords = coords.const_data_ptr<T>();
  a.w_in = w_in.const_data_ptr<T>();
  a.bn_in_w = bn_in_w.const_data_ptr<T>();
  a.bn_in_b = bn_in_b.const_data_ptr<T>();
  a.var_in = var_in.const_data_ptr<A>();
  a.query = s.decoder ? query.const_data_ptr<T>() : nullptr;
  a.w_out = w_out.const_data_ptr<T>();
  a.bn_out_w = bn_out_w.const_data_ptr<T>();
  a.var_out = var_out.const_data_ptr<A>();
  const std::vector<at::Tensor> enc = layer_pointers<T>(encoder, a.enc);
  const std::vector<at::Tensor> dec = layer_pointers<T>(decoder, a.dec);
  a.gx = gx.mutable_data_ptr<T>();
  for (int k = 0; k < kGrads; ++k)
    a.grad[k] = grads[k].defined() && grads[k].numel() ? grads[k].mutable_data_ptr<T>() : nullptr;
  a.tp = tp;
  a.w = make_bwd_work(s.N, s.C, s.L, s.d, s.g, s.Co, s.Ho);
  a.ga = make_grad_layout(s.C, s.L, s.d, s.Co, s.decoder);
  at::Tensor ws = at::empty({a.w.total}, sopt);
  at::Tensor part = at::empty({s.N * a.ga.at[kGrads]}, sopt);
  a.ws = ws.mutable_data_ptr<A>();
  a.part = part.mutable_data_ptr<A>();
  exec.template run<BwdOutput>(s.N * s.Co, a);
  exec.template run<BwdLayers>(s.N, a);
  exec.template run<BwdInput>(s.N, a);
  exec.template run<BwdReduce>((a.ga.at[kGrads] + kThreads - 1) / kThreads, a);
  return result();
}

}  // namespace device
}  // namespace token_transformer
}  // namespace hrnas
