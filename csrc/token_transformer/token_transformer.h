// Dynamic-token transformer: the backward tape layout and the argument checks shared by the
// kernels (hrnas_kernels/token_transformer/ops.py states the contract).
//
// The op works on compact tokens: every per-token tensor holds only the L alive tokens. Tokens
// are the d = g * g values of a g x g grid. The tape is one flat buffer of N * tape_size values
// laid out quantity by quantity, each quantity a contiguous [N, ...] block, so the batched GEMMs
// of the backward read it without copies. ops.tape_size computes the same total.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace hrnas {
namespace token_transformer {

constexpr const char* kOp = "token_transformer";

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
  int64_t at = 0;
  auto take = [&](int64_t per_sample) {
    const int64_t offset = at;
    at += N * per_sample;
    return offset;
  };
  t.f = take(C * d);
  t.uhat = take(L * d);
  for (int64_t i = 0; i < layers; ++i) {
    LayerTape& l = t.layer[i];
    l.qkv = take(3 * L * d);
    l.o = take(L * d);
    l.t1hat = take(L * d);
    l.h = take(L * d);
    l.t2hat = take(L * d);
    l.p = take(heads * L * L);
    l.rstd1 = take(L);
    l.rstd2 = take(L);
  }
  t.zhat = take(C_out * d);
  t.total = at;
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

}  // namespace token_transformer
}  // namespace hrnas
