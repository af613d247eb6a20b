"""Compiles and loads the C++ CPU kernels (``csrc/``).

The kernels are built for the instruction set of the CPU they run on
(AVX-512, AVX2 or portable code), with ``at::vec`` told which one through
``CPU_CAPABILITY``: without it ``at::vec::Vectorized`` falls back to scalar
code. The library is looked up in this order:

1. ``genfast/_cpu_<isa>.so``, built ahead of time by ``setup.py`` when torch
   was importable at build time;
2. the cache folder ``$GENFAST_CACHE`` (default ``~/.cache/genfast``), built
   there with ninja at first use, under a file lock (``python -m genfast build``
   does it ahead of time).

If there is no compiler or the build fails, genfast warns once with the reason
and CPU tensors run on the reference implementation.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

_status: tuple[bool, str] | None = None
_module = None  # the loaded library, a Python module too (its direct bindings; see csrc/ops.cpp)

_ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "default": [],
}


def cpu_capability() -> str:
    """The best ISA of this CPU that ATen's vectorized code supports: avx512, avx2 or default.

    ``GENFAST_CPU_CAPABILITY`` lowers it (to test the portable builds).
    """
    import torch

    forced = os.environ.get("GENFAST_CPU_CAPABILITY", "").lower()
    if forced in _ISA_FLAGS:
        return forced

    cap = torch.backends.cpu.get_cpu_capability().lower()
    if cap.startswith("avx512"):
        return "avx512"
    return cap if cap in _ISA_FLAGS else "default"


def compile_flags(cap: str) -> list[str]:
    # -ffp-contract=off: fused multiply-adds only where the code asks for them,
    # so the same expression rounds the same way in every kernel.
    # -fopenmp: at::parallel_for is an OpenMP pragma in a header; compiled
    # without it, every kernel silently runs on one thread.
    macro = cap.upper()
    flags = ["-O3", "-std=c++17", f"-DCPU_CAPABILITY={macro}", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    if cap != "default":
        flags.append(f"-DCPU_CAPABILITY_{macro}")
    return flags + _ISA_FLAGS[cap]


LINK_FLAGS = ["-fopenmp"]


def csrc_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "_csrc"):  # source checkout, installed package
        if (candidate / "ops.cpp").exists():
            return candidate
    raise FileNotFoundError("genfast's C++ sources (csrc/) are not found next to the package")


def sources(root: Path) -> list[Path]:
    return [root / "ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]


def cache_dir() -> Path:
    import torch

    base = Path(os.environ.get("GENFAST_CACHE", Path.home() / ".cache" / "genfast"))
    tag = f"torch{torch.__version__.split('+')[0]}-py{sys.version_info.major}{sys.version_info.minor}"
    return base / tag


def _prebuilt(cap: str) -> Path | None:
    for path in Path(__file__).resolve().parent.glob(f"_cpu_{cap}*.so"):
        return path
    return None


def build(verbose: bool = False):
    """Compile the C++ kernels for this CPU into the cache folder (no-op when up to date)
    and import them: the module, whose ``__file__`` is the library."""
    import torch.utils.cpp_extension as cpp

    cap = cpu_capability()
    root = csrc_dir()
    build_dir = cache_dir() / cap
    build_dir.mkdir(parents=True, exist_ok=True)
    lib = build_dir / f"genfast_cpu_{cap}.so"
    inputs = [*sources(root), *root.glob("cpu/*.h"), Path(__file__)]
    if not lib.exists() or max(p.stat().st_mtime for p in inputs) > lib.stat().st_mtime:
        print(f"genfast: compiling the C++ CPU kernels ({cap}) into {build_dir} ...", file=sys.stderr, flush=True)
    # cpp_extension.load locks the build folder and rebuilds only when sources or flags change.
    return cpp.load(
        name=f"genfast_cpu_{cap}",
        sources=[str(p) for p in sources(root)],
        extra_cflags=compile_flags(cap),
        extra_ldflags=LINK_FLAGS,
        extra_include_paths=[str(root)],
        build_directory=str(build_dir),
        is_python_module=True,
        verbose=verbose,
    )


def _load() -> str:
    import importlib

    global _module
    cap = cpu_capability()
    prebuilt = _prebuilt(cap)
    if prebuilt is not None:
        _module = importlib.import_module(f"genfast.{prebuilt.name.split('.')[0]}")
        return f"prebuilt for {cap}: {prebuilt.name}"
    _module = build()
    return f"built for {cap} in {Path(_module.__file__).parent}"


def library() -> Path | None:
    """Path of the loaded C++ library (None when the C++ backend is not live)."""
    return Path(_module.__file__) if status()[0] else None


def module():
    """The loaded C++ library as a Python module (None when the C++ backend is not live)."""
    return _module if status()[0] else None


def status() -> tuple[bool, str]:
    """(live, reason) of the C++ backend; loads (and if needed builds) it on first call."""
    global _status
    if _status is None:
        if os.environ.get("GENFAST_DISABLE_CPP", "0") == "1":
            _status = (False, "disabled by GENFAST_DISABLE_CPP=1")
        else:
            try:
                _status = (True, _load())
            except Exception as e:  # no compiler, failed build, missing sources
                lines = str(e).strip().splitlines() or [""]
                # A failed compile ends with ninja's summary; the compiler's first error says why.
                reason = f"{type(e).__name__}: {next((l for l in lines if 'error' in l), lines[-1]).strip()}"
                warnings.warn(f"genfast: C++ CPU kernels unavailable, CPU ops use the reference: {reason}",
                              RuntimeWarning, stacklevel=3)
                _status = (False, reason)
    return _status
