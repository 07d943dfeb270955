// The output pool (see output_pool.h): a c10::Allocator whose blocks return to an idle list when
// their storage dies, and the op that reports and empties it.
#include "common/output_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdlib>
#include <deque>
#include <mutex>

namespace hrnas {
namespace {

struct Block {
  void* ptr;
  size_t bytes;
};

class OutputPool final : public c10::Allocator {
 public:
  OutputPool() {
    const char* env = std::getenv("HRNAS_CPU_POOL_MB");
    const long long mb = env != nullptr ? std::atoll(env) : 256;
    limit_ = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  }

  c10::DataPtr allocate(size_t n) override {
    if (limit_ == 0 || n < static_cast<size_t>(kMinPooledBytes)) {
      return c10::GetDefaultCPUAllocator()->allocate(n);
    }
    void* ptr = take(n);
    if (ptr == nullptr) ptr = c10::alloc_cpu(n);
    return {ptr, new Block{ptr, n}, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  std::vector<int64_t> info(bool release) {
    std::deque<Block> freed;
    std::vector<int64_t> out;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (release) {
        freed.swap(idle_);
        idle_bytes_ = 0;
      }
      out = {static_cast<int64_t>(idle_bytes_), static_cast<int64_t>(idle_.size()), hits_,
             misses_, static_cast<int64_t>(limit_)};
    }
    for (const Block& b : freed) c10::free_cpu(b.ptr);
    return out;
  }

 private:
  // The most recently idled block of exactly n bytes, or nullptr.
  void* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
      if (it->bytes == n) {
        void* ptr = it->ptr;
        idle_bytes_ -= n;
        idle_.erase(std::next(it).base());
        ++hits_;
        return ptr;
      }
    }
    ++misses_;
    return nullptr;
  }

  static void give_back(void* ctx);

  std::mutex mutex_;
  std::deque<Block> idle_;  // oldest first
  size_t idle_bytes_ = 0, limit_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors may die during static destruction and still call give_back.
OutputPool& pool() {
  static OutputPool* p = new OutputPool();
  return *p;
}

void OutputPool::give_back(void* ctx) {
  const Block* b = static_cast<Block*>(ctx);
  const Block block = *b;
  delete b;
  OutputPool& p = pool();
  std::deque<Block> evicted;
  {
    std::lock_guard<std::mutex> lock(p.mutex_);
    if (block.bytes <= p.limit_) {
      p.idle_.push_back(block);
      p.idle_bytes_ += block.bytes;
    } else {
      evicted.push_back(block);
    }
    while (p.idle_bytes_ > p.limit_) {
      evicted.push_back(p.idle_.front());
      p.idle_bytes_ -= p.idle_.front().bytes;
      p.idle_.pop_front();
    }
  }
  for (const Block& e : evicted) c10::free_cpu(e.ptr);
}

std::vector<int64_t> pool_info_op(bool release) { return output_pool_info(release); }

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat fmt) {
  TORCH_CHECK(options.device().is_cpu(), "pooled_empty: CPU tensors only, got ",
              options.device());
  return at::detail::empty_generic(sizes, &pool(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), fmt);
}

std::vector<int64_t> output_pool_info(bool release) { return pool().info(release); }

TORCH_LIBRARY_IMPL(hrnas_kernels, CatchAll, m) { m.impl("cpu_output_pool", &pool_info_op); }

}  // namespace hrnas
