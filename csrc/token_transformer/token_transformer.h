// Dynamic-token transformer: the backward tape layout and the argument checks shared by the
// kernels (hrnas_kernels/token_transformer/ops.py states the contract).
//
// The op works on compact tokens: every per-token tensor holds only the L alive tokens. Tokens
// are the d = g * g values of a g x g grid. The tape is one flat buffer of N * tape_size values
// laid out quantity by quantity, each quantity a contiguous [N, ...] block, so the backward's
// weight gradients read each as one [N * L, ...] operand without copies. ops.tape_size computes
// the same total.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

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

}  // namespace token_transformer
}  // namespace hrnas
