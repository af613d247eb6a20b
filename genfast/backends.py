"""Which implementation runs an op, and why the others do not.

Every op has three implementations: Triton (``genfast.kernels``, the GPU path),
C++ (``csrc/cpu``, the CPU path) and the PyTorch reference
(``genfast.reference``, the fallback and test oracle). By default a CUDA tensor
goes to Triton, a CPU tensor to C++ (reference if the C++ build is not
available), float64 (any backend) and any other device to the reference.
``use_backend`` forces one for tests and benchmarks.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from . import _build

BACKENDS = ("triton", "cpp", "reference")
_forced: str | None = None
_triton_reason: str | None = None  # None: not probed yet


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> tuple[bool, str]:
    global _triton_reason
    if _triton_reason is None:  # probed once: importing triton is slow
        try:
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            _triton_reason = f"triton does not import: {e}"
        else:
            if triton_interpreted():
                _triton_reason = "interpreter (TRITON_INTERPRET=1): runs on CPU tensors, slowly"
            elif torch.cuda.is_available():
                _triton_reason = f"GPU: {torch.cuda.get_device_name()}"
            else:
                _triton_reason = "no GPU (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    live = _triton_reason.startswith(("interpreter", "GPU"))
    return live, _triton_reason


def _cpp_status() -> tuple[bool, str]:
    return _build.status()


def backends() -> dict[str, tuple[bool, str]]:
    """Report each backend as ``name -> (live, reason)``.

    Probing the C++ backend compiles it if it was not built yet.
    """
    return {
        "triton": _triton_status(),
        "cpp": _cpp_status(),
        "reference": (True, "pure PyTorch, any device"),
    }


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every genfast op inside the ``with`` block onto one backend.

    ``"triton"`` needs a GPU or ``TRITON_INTERPRET=1``; ``"cpp"`` needs CPU
    tensors and a successful C++ build; ``"reference"`` always works.
    """
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    live, reason = backends()[name] if name != "reference" else (True, "")
    if not live:
        raise RuntimeError(f"use_backend({name!r}): backend is not available: {reason}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def forced() -> str | None:
    return _forced


def select(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs an op on tensors of this device and dtype."""
    if dtype == torch.float64:  # the kernels compute in fp32; fp64 stays exact
        return "reference"
    if _forced is not None:
        if _forced == "cpp" and device.type != "cpu":
            raise ValueError(f"the cpp backend runs CPU tensors only, got a tensor on {device}")
        return _forced
    if device.type == "cuda":
        return "triton" if _triton_status()[0] else "reference"
    if device.type == "cpu":
        return "cpp" if _cpp_status()[0] else "reference"
    return "reference"
