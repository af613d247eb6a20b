// Registers the C++ CPU kernels as torch.ops.genfast_cpu.*. The public ops
// (torch.ops.genfast.*, with fake impls and autograd) are defined in Python
// (genfast/_ops.py), which dispatches CPU tensors here; schemas are inferred
// from the C++ signatures.
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(genfast_cpu, m) {
  using namespace genfast::cpu;
  m.def("fill_noise_", &fill_noise_);
  m.def("reparameterize", &reparameterize);
  m.def("reparameterize_backward", &reparameterize_backward);
  m.def("gaussian_kl", &gaussian_kl);
  m.def("gaussian_kl_backward", &gaussian_kl_backward);
  m.def("reparameterize_with_kl", &reparameterize_with_kl);
  m.def("reparameterize_with_kl_backward", &reparameterize_with_kl_backward);
}
