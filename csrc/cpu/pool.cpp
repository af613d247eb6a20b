// Large CPU outputs from a small pool of recycled blocks.
//
// PyTorch's CPU allocator returns a freed block of 32 MB or more to the
// system, so the next output of that size comes back as fresh pages that the
// kernel must fault in and zero on first touch. At the SDXL VAE decoder's
// GroupNorm shape (128 MB fp32) that costs about as much as the op itself:
// 1 thread, 24 ms of faults against 41 ms of kernel. A decode loop (VAE, UNet,
// diffusion steps on large latents) frees an output and asks for one of the
// same size over and over, so genfast keeps the blocks of its own outputs
// when they are freed and hands them out again, as CUDA's caching allocator
// does. Blocks are 2 MB aligned and asked to be backed by 2 MB pages.
//
// The pool holds at most GENFAST_CPU_POOL_MB megabytes of free blocks
// (default 1024; 0 turns it off); outputs under kMinBytes use PyTorch's
// allocator. A block is reused for a request of the same rounded size only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/accumulate.h>
#include <c10/util/strides.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "ops.h"

namespace genfast::cpu {
namespace {

constexpr int64_t kAlign = int64_t(2) << 20;   // 2 MB: a huge page
constexpr int64_t kMinBytes = int64_t(8) << 20;  // smaller outputs: PyTorch's allocator

int64_t pool_limit() {
  static const int64_t limit = [] {
    const char* env = std::getenv("GENFAST_CPU_POOL_MB");
    return (env != nullptr ? std::atoll(env) : 1024) << 20;
  }();
  return limit;
}

struct Pool {
  std::mutex mu;
  std::vector<std::pair<int64_t, void*>> free;  // (bytes, block)
  int64_t held = 0;

  void* take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu);
      for (size_t i = 0; i < free.size(); ++i) {
        if (free[i].first == bytes) {
          void* p = free[i].second;
          free[i] = free.back();
          free.pop_back();
          held -= bytes;
          return p;
        }
      }
    }
    void* p = std::aligned_alloc(kAlign, bytes);
    TORCH_CHECK(p != nullptr, "genfast: out of memory allocating ", bytes, " bytes");
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: errors ignored
#endif
    return p;
  }

  void give(void* p, int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (held + bytes <= pool_limit()) {
        free.emplace_back(bytes, p);
        held += bytes;
        return;
      }
    }
    std::free(p);
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may be freed during interpreter exit
  return *p;
}

// A tensor of these sizes and strides over a pool block of at least need bytes.
Tensor pooled(int64_t need, at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  const int64_t bytes = (need + kAlign - 1) / kAlign * kAlign;
  void* p = pool().take(bytes);
  return at::from_blob(p, sizes, strides, [bytes](void* q) { pool().give(q, bytes); }, options);
}

}  // namespace

Tensor empty_output(const Tensor& like) {
  const int64_t need = like.numel() * like.element_size();
  if (need < kMinBytes || pool_limit() <= 0) return at::empty_like(like);
  // x's strides (contiguous or channels_last: the Python layer made it dense)
  const Tensor meta = at::empty_like(like, like.options().device(at::kMeta));
  return pooled(need, meta.sizes(), meta.strides(), like.options());
}

Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t need = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (need < kMinBytes || pool_limit() <= 0) return at::empty(sizes, options);
  return pooled(need, sizes, c10::contiguous_strides(sizes), options);
}

}  // namespace genfast::cpu
