// Per-thread scratch buffers that survive across calls.
//
// Fresh multi-megabyte buffers cost a page fault per 4 KiB on first touch, which dominated
// kernels of a few milliseconds on the development VM. Each (thread, type, slot) keeps the largest
// buffer it has needed; at::parallel_for threads are long-lived, so the memory is reused.
#pragma once

#include <cstdint>
#include <vector>

namespace hrnas {

template <typename T>
T* scratch(int slot, int64_t size) {
  static thread_local std::vector<T> buffers[8];
  std::vector<T>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < size) b.resize(size);
  return b.data();
}

}  // namespace hrnas
