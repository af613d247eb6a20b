"""Host time per call: what a call costs the CPU that launches it, on tensors so small
that the device finishes each kernel before the next launch arrives. Calls are issued
back to back with no sync between them, so the time per call is the host's (Python,
dispatch, the launch itself), not the kernels'.

usage: python benchmarks/host_time.py [--device cuda] [--calls N]

Rows: one ATen kernel (the floor), eager GroupNorm+SiLU (two), genfast's ops through
their public functions and, on a GPU, bare Triton launches of an empty kernel with 1
and with 24 arguments (Triton's own launch cost, and its cost per argument), the
24-argument kernel launched through its compiled kernel (what a launcher that keeps
it would save), then genfast's Triton GroupNorm called below its op (the op layer's
share). A loop whose
steps are host-bound (a small model's decode step, an uncaptured diffusion loop)
is as slow as these add up to.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import genfast


def per_call_us(fn, calls: int, sync) -> float:
    """Best of 5 rounds of `calls` back-to-back calls, in µs per call."""
    for _ in range(20):
        fn()
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def _triton_rows(device):
    """Bare launches: an empty kernel with 1 argument and one with 24 (pointers, ints, floats)."""
    import triton
    import triton.language as tl

    @triton.jit
    def one_arg(p):
        tl.store(p, 1.0)

    @triton.jit
    def many_args(p0, p1, p2, p3, p4, p5, p6, p7, n0, n1, n2, n3, n4, n5, n6, n7, f0, f1, f2, f3, f4, f5, f6, f7,
                  A: tl.constexpr, B: tl.constexpr):
        tl.store(p0, f0)

    t = torch.zeros(8, device=device)
    ptrs = [torch.zeros(8, device=device) for _ in range(8)]
    ints = [3, 5, 7, 11, 13, 17, 19, 23]
    floats = [0.5 * i for i in range(8)]
    rows = [("triton: empty kernel, 1 argument", lambda: one_arg[(1,)](t)),
            ("triton: empty kernel, 24 arguments", lambda: many_args[(1,)](*ptrs, *ints, *floats, A=1, B=2))]
    # What a launcher that keeps the compiled kernel would pay: the 24-argument kernel through
    # the compiled kernel's own runner (its grid fixed), and its driver launch called directly
    # (Triton 3.x: kernel[grid](...) returns the CompiledKernel; run takes the grid, the stream,
    # the function, the packed metadata, the launch metadata and hooks, then every argument in
    # the signature's order, constexprs included). Not all Triton versions have these.
    args = (*ptrs, *ints, *floats, 1, 2)
    try:
        compiled = many_args[(1,)](*ptrs, *ints, *floats, A=1, B=2)
        runner = compiled[(1, 1, 1)]
        run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
        stream = torch.cuda.current_stream(device).cuda_stream
        rows += [("triton: 24 arguments, the compiled kernel's runner", lambda: runner(*args)),
                 ("triton: 24 arguments, its launcher called directly",
                  lambda: run(1, 1, 1, stream, function, metadata, None, None, None, *args))]
    except Exception as e:  # noqa: BLE001 - a probe: say what this Triton lacks and go on
        print(f"(no direct launch rows with this Triton: {type(e).__name__}: {e})")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=500)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8, device=device)
    w, b = torch.randn(32, device=device), torch.randn(32, device=device)
    h = torch.randn(2, 16, 64, device=device)
    q, k = torch.randn(1, 16, 4, 64, device=device), torch.randn(1, 16, 4, 64, device=device)
    logits = torch.randn(4, 1000, device=device)
    y = torch.randn_like(x)
    rows = [
        ("aten: x + y (one kernel)", lambda: x + y),
        ("eager: F.silu(F.group_norm) (two kernels)", lambda: F.silu(F.group_norm(x, 8, w, b))),
        ("genfast.group_norm_act", lambda: genfast.group_norm_act(x, 8, w, b)),
        ("genfast.gated_act", lambda: genfast.gated_act(h)),
        ("genfast.attention", lambda: genfast.attention(q, k, k)),
        ("genfast.sample_tokens (top-k 50, top-p 0.9)",
         lambda: genfast.sample_tokens(logits, temperature=1.0, top_k=50, top_p=0.9, seed=1, check=False)),
    ]
    if device.type == "cuda":
        from genfast.kernels import conv

        rows += _triton_rows(device)
        rows.append(("genfast.kernels.conv.group_norm_act (below the op)",
                     lambda: conv.group_norm_act(x, 8, w, b, 1e-5, "silu", 0.01, None, None, None)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"host time per call, {a.calls} calls back to back, best of 5; {name}, torch {torch.__version__}")
    with torch.no_grad():
        for label, fn in rows:
            print(f"  {label:55s} {per_call_us(fn, a.calls, sync):8.1f} us")


if __name__ == "__main__":
    main()
