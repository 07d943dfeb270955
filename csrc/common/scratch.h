// Per-thread scratch buffers that survive across calls.
//
// Fresh multi-megabyte buffers cost a page fault per 4 KiB on first touch, which dominated
// kernels of a few milliseconds on the development VM. Each (thread, type, slot) keeps the largest
// buffer it has needed; at::parallel_for threads are long-lived, so the memory is reused.
#pragma once

#include <cstdint>
#include <vector>

namespace hrnas {

// Buffers start on a 64-byte boundary (a cache line): the kernels load whole vectors at offsets
// that are multiples of 32 or 64 bytes from a buffer's start, and a vector split across two cache
// lines costs a second access (glibc's malloc aligns to 16 bytes only).
template <typename T>
T* scratch(int slot, int64_t size) {
  constexpr int64_t kAlign = 64;
  static_assert(kAlign % sizeof(T) == 0);
  static thread_local std::vector<T> buffers[8];
  std::vector<T>& b = buffers[slot];
  const int64_t pad = kAlign / static_cast<int64_t>(sizeof(T));
  if (static_cast<int64_t>(b.size()) < size + pad) b.resize(size + pad);
  const auto at = reinterpret_cast<std::uintptr_t>(b.data());
  return reinterpret_cast<T*>((at + kAlign - 1) / kAlign * kAlign);
}

}  // namespace hrnas
