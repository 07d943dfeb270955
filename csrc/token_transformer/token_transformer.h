// Dynamic-token transformer: the backward tape layout and the argument checks shared by the
// kernels (hrnas_kernels/token_transformer/ops.py states the contract).
//
// The kernels work on compact tokens: every per-token tensor holds only the L alive tokens. The
// ops take the full per-token parameters and an optional token_index; AliveTokens below gathers
// the alive ones for the kernels (the CUDA forward programs read them through the index instead,
// as triton.py's forward kernels do) and puts the gradients back at full size, dead tokens'
// entries exactly zero. Tokens are the d = g * g values of a g x g grid. The tape is one flat
// buffer of N * tape_size values laid out quantity by quantity, each quantity a contiguous
// [N, ...] block, so the backward's weight gradients read each as one [N * L, ...] operand
// without copies. ops.tape_size computes the same total.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"

namespace hrnas {
namespace token_transformer {

constexpr const char* kOp = "token_transformer";

// Lays quantities out one after another in one flat buffer, each a contiguous [N, ...] block:
// take(per_sample) returns the next block's offset; `at` ends as the total size.
struct BlockLayout {
  int64_t N;
  int64_t at = 0;
  int64_t take(int64_t per_sample) {
    const int64_t offset = at;
    at += N * per_sample;
    return offset;
  }
};

// Offsets (in values, already multiplied by N) of each saved quantity of one layer.
struct LayerTape {
  int64_t qkv;                          // [N, L, 3d] the query, key and value projections
  int64_t o, t1hat, h, t2hat;           // [N, L, d] each
  int64_t p;                            // [heads, N, L, L] softmax probabilities
  int64_t rstd1, rstd2;                 // [N, L] LayerNorm reciprocal deviations
};

struct TapeLayout {
  int64_t f;      // [N, C, d] the input resized to the grid
  int64_t uhat;   // [N, L, d] the normalised token projections
  LayerTape layer[2];
  int64_t zhat;   // [N, C_out, d] the normalised output projection
  int64_t total;  // N * tape_size
};

inline TapeLayout make_tape_layout(int64_t N, int64_t C, int64_t L, int64_t d, int64_t heads,
                                   int64_t layers, int64_t C_out) {
  TapeLayout t{};
  BlockLayout b{N};
  t.f = b.take(C * d);
  t.uhat = b.take(L * d);
  for (int64_t i = 0; i < layers; ++i) {
    LayerTape& l = t.layer[i];
    l.qkv = b.take(3 * L * d);
    l.o = b.take(L * d);
    l.t1hat = b.take(L * d);
    l.h = b.take(L * d);
    l.t2hat = b.take(L * d);
    l.p = b.take(heads * L * L);
    l.rstd1 = b.take(L);
    l.rstd2 = b.take(L);
  }
  t.zhat = b.take(C_out * d);
  t.total = b.at;
  return t;
}

// The shapes every kernel relies on; the Python API has already given users clear errors.
inline void check_layer(at::TensorList w, int64_t d, const at::Tensor& ref) {
  TORCH_CHECK(w.size() == 8, kOp, ": a layer has 8 weights, got ", w.size());
  for (size_t i = 0; i < 8; ++i) {
    const bool matrix = i < 4;
    TORCH_CHECK(w[i].dim() == (matrix ? 2 : 1) && w[i].size(-1) == d &&
                    (!matrix || w[i].size(0) == (i == 0 ? 3 * d : d)),
                kOp, ": layer weight ", i, " has shape ", w[i].sizes());
    check_same(kOp, "a layer weight", w[i], ref);
  }
}

// The weights' shapes, their agreement with each other and with `ref` (dtype, device), for the
// g x g grid of coords; shared by the CPU and CUDA kernels.
inline void check_weights(const at::Tensor& coords, const at::Tensor& w_in, at::TensorList encoder,
                          const std::optional<at::Tensor>& query, at::TensorList decoder,
                          const at::Tensor& w_out, int64_t heads, const at::Tensor& ref) {
  TORCH_CHECK(coords.dim() == 3 && coords.size(0) == 2 && coords.size(1) == coords.size(2), kOp,
              ": coords must be [2, g, g], got ", coords.sizes());
  const int64_t d = coords.size(1) * coords.size(1);
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(1) >= 2 && w_out.dim() == 2 &&
                  w_out.size(1) == w_in.size(0),
              kOp, ": input_proj_weight [L, C + 2] and reverse_proj_weight [C_out, L] disagree: ",
              w_in.sizes(), " vs ", w_out.sizes());
  TORCH_CHECK(heads >= 1 && d % heads == 0, kOp, ": num_heads ", heads, " does not divide ", d);
  check_layer(encoder, d, ref);
  TORCH_CHECK(query.has_value() == !decoder.empty(), kOp,
              ": query_embed and decoder go together");
  if (query.has_value()) {
    check_layer(decoder, d, ref);
    TORCH_CHECK(query->dim() == 2 && query->size(0) == w_in.size(0) && query->size(1) == d, kOp,
                ": query_embed must be [L, d], got ", query->sizes());
    check_same(kOp, "query_embed", *query, ref);
  }
  for (const at::Tensor* t : {&coords, &w_in, &w_out}) check_same(kOp, "a weight", *t, ref);
}

using FwdResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BwdResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor,
               std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor>;

// The alive tokens of the full per-token parameters: rows of input_proj_weight, of the input
// BatchNorm's tensors and of query_embed, columns of reverse_proj_weight. Without an index every
// token is alive. The index must hold distinct tokens of [0, L) in increasing order: the public
// API checks that before the op; check_token_index checks it on the CPU only (on a GPU that
// would cost a device synchronisation). AliveTokens gathers the parameters (the CPU ops
// and the CUDA backward); the CUDA forward programs read them through the index instead.
inline void check_token_index(const std::optional<at::Tensor>& index, int64_t tokens,
                              const at::Tensor& ref) {
  if (!index.has_value()) return;
  TORCH_CHECK(index->dim() == 1 && index->scalar_type() == at::kLong, kOp,
              ": token_index must be a 1-d int64 tensor, got ", index->scalar_type(), " of shape ",
              index->sizes());
  TORCH_CHECK(index->device() == ref.device(), kOp, ": token_index is on ", index->device(),
              ", expected ", ref.device());
  TORCH_CHECK(index->numel() <= tokens, kOp, ": token_index lists ", index->numel(),
              " tokens of ", tokens);
  if (index->device().is_cpu()) {
    const at::Tensor c = index->contiguous();
    const int64_t* p = c.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      TORCH_CHECK(p[i] >= 0 && p[i] < tokens, kOp, ": token_index holds ", p[i],
                  ", outside the tokens [0, ", tokens, ")");
      TORCH_CHECK(i == 0 || p[i] > p[i - 1], kOp,
                  ": token_index must be strictly increasing (sorted, no duplicates), got ",
                  p[i - 1], " then ", p[i]);
    }
  }
}

class AliveTokens {
 public:
  AliveTokens(const std::optional<at::Tensor>& index, const at::Tensor& w_in,
              const at::Tensor& ref)
      : index_(index), tokens_(w_in.dim() == 2 ? w_in.size(0) : 0) {
    check_token_index(index_, tokens_, ref);
    if (index_.has_value() && index_->device().is_cpu()) index_ = index_->contiguous();
  }
  at::Tensor rows(const at::Tensor& t) const {
    if (!index_.has_value()) return t;
    if (!t.device().is_cpu()) return t.index_select(0, *index_);
    return copy_tokens(t.contiguous(), false, 0);
  }
  std::optional<at::Tensor> rows(const std::optional<at::Tensor>& t) const {
    return t.has_value() ? std::optional<at::Tensor>(rows(*t)) : t;
  }
  at::Tensor cols(const at::Tensor& t) const {
    if (!index_.has_value()) return t;
    if (!t.device().is_cpu()) return t.index_select(1, *index_);
    return copy_tokens(t.contiguous(), false, 1);
  }
  // The gradient of a gathered tensor along `dim`, at full size: zero for the dead tokens.
  at::Tensor scatter(const at::Tensor& grad, int64_t dim) const {
    if (!index_.has_value()) return grad;
    if (!grad.device().is_cpu()) {
      std::vector<int64_t> sizes = grad.sizes().vec();
      sizes[dim] = tokens_;
      return grad.new_zeros(sizes).index_copy_(dim, *index_, grad);
    }
    return copy_tokens(grad.contiguous(), true, dim);
  }

 private:
  // On the CPU, the gather (scatter: false) of the alive tokens' entries along `dim` (0: rows,
  // 1: columns of a 2-d tensor) of the contiguous `t`, or the scatter back to full size, by plain
  // copies: index_select and index_copy_ cost a few microseconds of dispatch each, and a
  // training step of the block made 15 of them. The scatter writes every entry of its output
  // once, the dead tokens' zeros in the same pass as the alive tokens' rows.
  at::Tensor copy_tokens(const at::Tensor& t, bool scatter, int64_t dim) const {
    std::vector<int64_t> sizes = t.sizes().vec();
    const int64_t alive = index_->numel();
    sizes[dim] = scatter ? tokens_ : alive;
    at::Tensor out = at::empty(sizes, t.options());
    const int64_t* index = index_->const_data_ptr<int64_t>();
    const int64_t outer = dim == 0 ? 1 : t.size(0);
    int64_t inner = 1;  // the values per token (t may have no token: sizes, not numel)
    for (int64_t k = dim + 1; k < t.dim(); ++k) inner *= t.size(k);
    const int64_t bytes = inner * t.element_size();
    const int64_t compact = alive * bytes, full = tokens_ * bytes;
    const char* src = static_cast<const char*>(t.const_data_ptr());
    char* dst = static_cast<char*>(out.mutable_data_ptr());
    for (int64_t r = 0; r < outer; ++r) {
      if (scatter) {
        int64_t next = 0;  // the first token not written yet
        for (int64_t i = 0; i <= alive; ++i) {
          const int64_t token = i < alive ? index[i] : tokens_;
          std::memset(dst + r * full + next * bytes, 0, (token - next) * bytes);
          if (i < alive) {
            std::memcpy(dst + r * full + token * bytes, src + r * compact + i * bytes, bytes);
          }
          next = token + 1;
        }
      } else {
        for (int64_t i = 0; i < alive; ++i) {
          std::memcpy(dst + r * compact + i * bytes, src + r * full + index[i] * bytes, bytes);
        }
      }
    }
    return out;
  }

  std::optional<at::Tensor> index_;
  int64_t tokens_;
};

// The forward op on the gathered alive tokens, registered as such for the CPU: `Fwd` is a kernel
// of the op's signature less token_index.
template <auto Fwd>
FwdResult forward_alive_tokens(const at::Tensor& x, const at::Tensor& coords,
                               const at::Tensor& w_in, const at::Tensor& bn_in_w,
                               const at::Tensor& bn_in_b, const std::optional<at::Tensor>& rm_in,
                               const std::optional<at::Tensor>& rv_in, at::TensorList encoder,
                               const std::optional<at::Tensor>& query, at::TensorList decoder,
                               const at::Tensor& w_out, const at::Tensor& bn_out_w,
                               const at::Tensor& bn_out_b, const std::optional<at::Tensor>& rm_out,
                               const std::optional<at::Tensor>& rv_out, int64_t heads,
                               c10::SymIntArrayRef out_size, bool residual, double eps,
                               bool save_tape, const std::optional<at::Tensor>& token_index) {
  const AliveTokens a(token_index, w_in, x);
  return Fwd(x, coords, a.rows(w_in), a.rows(bn_in_w), a.rows(bn_in_b), a.rows(rm_in),
             a.rows(rv_in), encoder, a.rows(query), decoder, a.cols(w_out), bn_out_w, bn_out_b,
             rm_out, rv_out, heads, out_size, residual, eps, save_tape);
}

// The backward op on the alive tokens (var_in holds the alive tokens' statistics, as the forward
// returned them); the per-token gradients come back at full size.
template <auto Bwd>
BwdResult backward_alive_tokens(const at::Tensor& gy, const at::Tensor& tape,
                                const at::Tensor& coords, const at::Tensor& w_in,
                                const at::Tensor& bn_in_w, const at::Tensor& bn_in_b,
                                const at::Tensor& var_in, at::TensorList encoder,
                                const std::optional<at::Tensor>& query, at::TensorList decoder,
                                const at::Tensor& w_out, const at::Tensor& bn_out_w,
                                const at::Tensor& var_out, int64_t heads,
                                c10::SymIntArrayRef in_size, bool residual, bool use_batch_stats,
                                double eps, const std::optional<at::Tensor>& token_index) {
  const AliveTokens a(token_index, w_in, gy);
  BwdResult r = Bwd(gy, tape, coords, a.rows(w_in), a.rows(bn_in_w), a.rows(bn_in_b), var_in,
                    encoder, a.rows(query), decoder, a.cols(w_out), bn_out_w, var_out, heads,
                    in_size, residual, use_batch_stats, eps);
  std::get<1>(r) = a.scatter(std::get<1>(r), 0);
  std::get<2>(r) = a.scatter(std::get<2>(r), 0);
  std::get<3>(r) = a.scatter(std::get<3>(r), 0);
  if (query.has_value()) std::get<5>(r) = a.scatter(std::get<5>(r), 0);
  std::get<7>(r) = a.scatter(std::get<7>(r), 1);
  return r;
}

}  // namespace token_transformer
}  // namespace hrnas
