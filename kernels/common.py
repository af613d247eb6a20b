"""Helpers every Triton family shares."""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# The interpreter (TRITON_INTERPRET=1, CPU tensors) has no libdevice; its tl.exp is numpy's.
INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), for launch code. triton.cdiv and triton.next_power_of_2 are
    constexpr functions: 1.5 us a call on the host (Triton 3.6 and 3.9), about a
    microsecond more per launch than the plain arithmetic for each grid or block size."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for launch code."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


@functools.cache
def _device_sms(index: int | None) -> int:
    if index is None:  # interpreter: a small pretend GPU, so tests exercise the split paths
        return 4
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the interpreter's CPU tensors)."""
    if device.type != "cuda":
        return _device_sms(None)
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def exp(x):
    """exp(x) correctly rounded to within an ulp, as PyTorch's. tl.exp is the GPU's
    approximate exp2 of x * log2(e), off by ~|x| 2^-24 relative (5 ulp at |x| = 10):
    right for a softmax, too coarse where fp32 outputs are compared with PyTorch's.
    The extra instructions are free in a memory-bound kernel."""
    if INTERPRETING:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def div(x, y):
    """x / y rounded as IEEE division, as PyTorch's. Triton's "/" on fp32 is the GPU's
    approximate division (within 2 ulp), which fp32 outputs compared with PyTorch's
    cannot afford where the quotient scales a whole group (a mean, an rstd)."""
    return tl.math.div_rn(x, y)


@triton.jit
def rsqrt(x):
    """1 / sqrt(x) from IEEE square root and division (tl.sqrt is approximate on a GPU)."""
    return tl.math.div_rn(1.0, tl.sqrt_rn(x))
