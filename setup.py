"""Packaging for genfast.

`kernels/` is installed as `genfast.kernels` and `csrc/` ships as package data
(`genfast/_csrc`) so that an installed genfast can compile its C++ kernels on
first use. When torch is importable here (``pip install --no-build-isolation``),
the C++ kernels are compiled ahead of time for this machine's CPU.
"""
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
cmdclass, ext_modules = {}, []
if os.environ.get("GENFAST_NO_BUILD", "0") != "1":
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        pass
    else:
        import importlib.util

        spec = importlib.util.spec_from_file_location("_genfast_build", ROOT / "genfast" / "_build.py")
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        cap = build.cpu_capability()
        ext_modules.append(
            CppExtension(
                f"genfast._cpu_{cap.lower()}",
                [str(p.relative_to(ROOT)) for p in build.sources(ROOT / "csrc")],
                extra_compile_args=build.compile_flags(cap),
                extra_link_args=build.LINK_FLAGS,
                py_limited_api=False,
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=True)

setup(
    packages=["genfast", "genfast.reference", "genfast.kernels", "genfast._csrc", "genfast.demo"],
    package_dir={"genfast": "genfast", "genfast.kernels": "kernels", "genfast._csrc": "csrc"},
    package_data={"genfast._csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.h"],
                  "genfast.demo": ["*.pt"]},  # the demo's trained weights
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
