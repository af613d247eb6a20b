// The C++ CPU kernels live in the torch.library namespace genfast_cpu; each
// family's file (cpu/<family>.cpp) adds its ops with TORCH_LIBRARY_FRAGMENT,
// schemas inferred from the C++ signatures. The public ops
// (torch.ops.genfast.*, with fake impls and autograd) are defined in Python
// (genfast/_ops.py), which dispatches CPU tensors to these.
#include <torch/library.h>

TORCH_LIBRARY(genfast_cpu, m) {}
