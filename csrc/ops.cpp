// The C++ CPU kernels live in the torch.library namespace genfast_cpu; each
// family's file (cpu/<family>.cpp) adds its ops with TORCH_LIBRARY_FRAGMENT,
// schemas inferred from the C++ signatures. The public ops
// (torch.ops.genfast.*, with fake impls and autograd) are defined in Python
// (genfast/_ops.py), which dispatches CPU tensors to these.
//
// The library is also a Python module with direct bindings for calls made once
// per step on small tensors, where the dispatcher's boxed call from Python
// (every argument converted through the schema: 3 us for sampler_step's 19) costs
// as much as the kernel; a direct binding costs 0.4 us.
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(genfast_cpu, m) {}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // without the GIL while the kernel runs, as torch's own ops
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("sampler_step_plain", &genfast::cpu::sampler_step_plain, nogil);
  m.def("kvcache_append_plain", &genfast::cpu::kvcache_append_plain, nogil);
  m.def("attention_with_kvcache_plain", &genfast::cpu::attention_with_kvcache_plain, nogil);
}
