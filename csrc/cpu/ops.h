// The C++ CPU kernels, registered by csrc/ops.cpp as torch.ops.genfast_cpu.*.
// Arguments are in the order of the genfast:: schemas (genfast/<family>.py);
// the Python layer has already validated them and made the tensors contiguous.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace genfast::cpu {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// rng.cpp
void fill_noise_(Tensor out, int64_t seed, const OptTensor& seed_tensor, int64_t offset, bool normal);
int64_t resolve_seed(int64_t seed, const OptTensor& seed_tensor);

// vae.cpp
Tensor reparameterize(const Tensor& mu, const Tensor& logvar, const OptTensor& noise, int64_t seed,
                      const OptTensor& seed_tensor, int64_t offset);
Tensor reparameterize_backward(const Tensor& grad_z, const Tensor& logvar, const OptTensor& noise, int64_t seed,
                               const OptTensor& seed_tensor, int64_t offset);
Tensor gaussian_kl(const Tensor& mu, const Tensor& logvar, c10::string_view reduction);
std::tuple<Tensor, Tensor> gaussian_kl_backward(const Tensor& grad_kl, const Tensor& mu, const Tensor& logvar,
                                                c10::string_view reduction);
std::tuple<Tensor, Tensor> reparameterize_with_kl(const Tensor& mu, const Tensor& logvar, int64_t seed,
                                                  const OptTensor& seed_tensor, int64_t offset,
                                                  c10::string_view reduction);
std::tuple<Tensor, Tensor> reparameterize_with_kl_backward(const Tensor& grad_z, const Tensor& grad_kl,
                                                           const Tensor& mu, const Tensor& logvar, int64_t seed,
                                                           const OptTensor& seed_tensor, int64_t offset,
                                                           c10::string_view reduction);

}  // namespace genfast::cpu
