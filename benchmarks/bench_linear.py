"""Linear family: an ``nn.Linear`` patched by ``genfast.patch`` at inference, on the CPU.

The patched module packs its weight once for oneDNN (``genfast/_onednn.py``);
PyTorch's CPU ``F.linear`` runs MKL's sgemm on fp32, which on non-Intel CPUs
takes a slow path. Baselines: the unpatched module eager, ``torch.compile`` of
it, and ``torch.compile`` with inductor's ``freezing`` (which packs weights too:
for fp32 through MKL's packed GEMM). All under ``torch.no_grad()``.

Bytes each call must move, M rows of K inputs to N outputs in s-byte elements:
the weight N·K·s, the input M·K·s and the output M·N·s. At decode sizes the
weight is nearly all of it: the op is a read of the weight, and the bandwidth
column says how close it comes.

No GPU cases: there the patched module is ``F.linear`` itself.
"""
from __future__ import annotations

import torch
import torch._inductor.config as inductor_config
from harness import Case

import genfast

FAMILY = "linear"
# (label, M, K, N): a Llama-style decoder's LM head over a 32000 vocabulary, batch 1 and 16,
# its MLP input (512 -> 2 x 1408) at batch 16, and Llama-3.2-1B's MLP input at batch 1.
SIZES = {"lm-head b1 512x32000": (1, 512, 32000), "lm-head b16 512x32000": (16, 512, 32000),
         "mlp b16 512x2816": (16, 512, 2816), "mlp b1 2048x16384": (1, 2048, 16384)}


def _build(m: int, k: int, n: int, dtype: torch.dtype, device):
    torch.manual_seed(0)
    eager = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype).eval()
    patched = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype).eval()
    patched.weight = eager.weight  # shared: the same weights, only the path differs
    genfast.patch(patched)
    x = torch.randn(m, k, device=device, dtype=dtype)
    # two functions, two dynamo caches: the frozen graph is not the other's
    compiled = torch.compile(lambda t: eager(t), dynamic=False)
    frozen = torch.compile(lambda t: eager(t), dynamic=False)

    def run(module, freezing=False):
        def call():
            with torch.no_grad(), inductor_config.patch(freezing=freezing):
                return module(x)
        return call

    return {"genfast": run(patched), "eager": run(eager), "torch.compile": run(compiled),
            "torch.compile freezing": run(frozen, freezing=True)}


def cases(quick: bool, device) -> list[Case]:
    """quick: the batch-16 LM head and MLP in fp32; full: every size in fp32 and bf16. CPU only."""
    device = torch.device(device)
    if device.type != "cpu":
        return []
    sizes = ["lm-head b16 512x32000", "mlp b16 512x2816"] if quick else list(SIZES)
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    out = []
    for dtype in dtypes:
        for size in sizes:
            m, k, n = SIZES[size]
            nbytes = (n * k + m * k + m * n) * dtype.itemsize
            out.append(Case(
                family=FAMILY, op="linear", mode="fwd", size=size, dtype=dtype, device=device,
                nbytes=nbytes, footprint=nbytes, impls=("genfast", "eager", "torch.compile", "torch.compile freezing"),
                compiled=("torch.compile", "torch.compile freezing"), backend="oneDNN packed",
                build=lambda m=m, k=k, n=n, dtype=dtype: _build(m, k, n, dtype, device),
            ))
    return out
