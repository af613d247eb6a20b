// Declarations shared between the C++ CPU kernel files. Kernel arguments are
// in the order of the genfast:: schemas (genfast/<family>.py); the Python
// layer has already validated them and made the tensors contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

namespace genfast::cpu {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// rng.cpp: the seed an op runs with (a 0-d seed tensor wins over the int).
int64_t resolve_seed(int64_t seed, const OptTensor& seed_tensor);

// pool.cpp: an uninitialized output with like's shape, strides and dtype; large
// ones come from a pool of recycled blocks (no fresh pages to fault in).
Tensor empty_output(const Tensor& like);
// The same for a contiguous tensor of these sizes.
Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// diffusion.cpp: the scheduler twins' per-step call (bound in ops.cpp).
std::optional<std::tuple<Tensor, Tensor>> sampler_step_plain(
    const Tensor& sample, const Tensor& model_output, const OptTensor& cond, const OptTensor& history,
    const OptTensor& history2, const OptTensor& history3, const Tensor& coeffs, int64_t row,
    const OptTensor& row_tensor, double guidance_scale, double clip, bool draw_noise, int64_t seed,
    const OptTensor& seed_tensor, bool return_x0);

// attention.cpp: KVCache's decode step (bound in ops.cpp); -1 / nullopt: declined, use the ops.
int64_t kvcache_append_plain(const Tensor& k_cache, const Tensor& v_cache, const Tensor& k, const Tensor& v,
                             const Tensor& seqlens, const OptTensor& block_table, const OptTensor& k_scale,
                             const OptTensor& v_scale, int64_t room, int64_t pending);
std::optional<Tensor> attention_with_kvcache_plain(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                                   const Tensor& seqlens, int64_t seqlen_offset,
                                                   const OptTensor& block_table, double softmax_scale, bool causal,
                                                   int64_t window_left, int64_t window_right, double softcap,
                                                   const OptTensor& k_scale, const OptTensor& v_scale);

}  // namespace genfast::cpu
