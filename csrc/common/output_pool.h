// Output tensors of the CPU kernels, allocated from a pool of reused blocks.
//
// A training step allocates the same large outputs (activations, tapes, gradients) every
// iteration and frees them after backward. glibc returns such blocks to the kernel (mmap'd
// chunks, or the trimmed top of the heap), so each new one costs a page fault and a zeroed page
// per 4 KiB on first touch: on the development VM that was 10-25% of a fused op's time at
// 56x56x96. Blocks of at least kMinPooledBytes freed by their tensors go to an idle list instead
// and are handed out again for a request of the same size; the idle list is bounded (oldest
// blocks are freed first) by HRNAS_CPU_POOL_MB, read once, default 256; 0 turns pooling off.
// The floor is glibc's default mmap threshold, 128 KiB: below 1 MiB (the floor until then) a
// training step of the token transformer at 8x36x28x28 still took 55-95 page faults.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

namespace hrnas {

constexpr int64_t kMinPooledBytes = int64_t(128) << 10;

// at::empty(sizes, options.memory_format(fmt)) for a CPU tensor, its storage from the pool.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat fmt = at::MemoryFormat::Contiguous);

// {idle bytes, idle blocks, hits, misses, limit bytes}; with release, idle blocks are freed first.
std::vector<int64_t> output_pool_info(bool release);

// A call's intermediate buffers carved from one pooled block: one allocation instead of one per
// buffer (each at::empty is a dispatcher call and a malloc; a token transformer backward made
// 21). buffer(i) has sizes[i] values and starts on a 64-byte boundary; all live as long as this.
template <typename T>
class PooledBuffers {
 public:
  PooledBuffers(std::initializer_list<int64_t> sizes, const at::TensorOptions& options) {
    constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));
    const auto padded = [](int64_t n) { return (n + line - 1) / line * line; };
    int64_t total = line;  // room to align the first buffer
    for (int64_t n : sizes) total += padded(n);
    block_ = pooled_empty({total}, options);
    const auto base = reinterpret_cast<std::uintptr_t>(block_.template mutable_data_ptr<T>());
    T* next = reinterpret_cast<T*>((base + 63) / 64 * 64);
    for (int64_t n : sizes) {
      starts_.push_back(next);
      next += padded(n);
    }
  }
  T* buffer(size_t i) const { return starts_[i]; }

 private:
  at::Tensor block_;
  std::vector<T*> starts_;
};

}  // namespace hrnas
