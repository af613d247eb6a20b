"""Compiles every Triton kernel the tests launched for a real GPU, without one.

The interpreter (TRITON_INTERPRET=1) runs kernels as NumPy and accepts code
that the compiler rejects (a plain Python global read inside a kernel, a
libdevice call, a type mix-up), so on a machine with no GPU such errors would
surface only on the first GPU run. With ``GENFAST_COMPILE_CHECK=sm_90`` (any
``sm_XY``) set, the test session records each launch's specialization
(argument dtypes, constexpr values, num_warps) and, at the end, compiles each
one to a cubin for that architecture with Triton's own compiler and ptxas; a
failure fails the session. fp16 launches are compiled in bf16 as well, since
the interpreter cannot run bf16 kernels. Each launch's 16-divisible pointers
and integers are recorded too and passed on as Triton's launcher would, so the
cubin is the one a GPU runs for those arguments (vectorized where aligned).

    GENFAST_COMPILE_CHECK=sm_90 python -m pytest tests -q

Run as a script, it compiles a recorded JSON file of specializations.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile

DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
          "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
          "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5"}
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_seen: set[str] = set()


def _arg_type(value) -> str | None:
    """Triton's signature type of a runtime argument (None: a constexpr)."""
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None


def _aligned(value) -> bool:
    """Whether Triton's launcher would mark the argument divisible by 16 (a pointer 16-byte aligned,
    an integer a multiple of 16): the compiled kernel a GPU runs assumes it, and vectorizes by it."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def _record(fn, args, kwargs) -> None:
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip((p.name for p in params), args)) | {k: v for k, v in kwargs.items() if k not in OPTIONS}
    signature, constexprs, aligned = {}, {}, []
    for p in params:
        value = bound.get(p.name, p.default)
        kind = None if "constexpr" in str(p.annotation) else _arg_type(value)
        if kind is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        else:
            signature[p.name] = kind
            if _aligned(value):
                aligned.append(p.name)
    options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    _seen.add(json.dumps([fn.__module__, fn.__name__, signature, constexprs, options, aligned], sort_keys=True,
                         default=str))


def pytest_configure(config):
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        _record(self.fn, args, kwargs)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run


def pytest_sessionfinish(session, exitstatus):
    target = os.environ["GENFAST_COMPILE_CHECK"]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(sorted(_seen), f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, said out loud (else it warns)
    done = subprocess.run([sys.executable, __file__, f.name, target], env=env)
    os.unlink(f.name)
    if done.returncode != 0 and session.exitstatus == 0:
        session.exitstatus = 1


def _with_bf16(specs: list) -> list:
    """The specs, plus each fp16 one with its fp16 pointers made bf16."""
    out = {json.dumps(s, sort_keys=True) for s in specs}
    for mod, name, sig, consts, opts, aligned in specs:
        if "*fp16" in sig.values():
            sig = {k: "*bf16" if v == "*fp16" else v for k, v in sig.items()}
            out.add(json.dumps([mod, name, sig, consts, opts, aligned], sort_keys=True))
    return [json.loads(s) for s in sorted(out)]


def _compile(spec, arch: int) -> str | None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod, name, sig, consts, opts, aligned = spec
    fn = getattr(importlib.import_module(mod), name)
    # The launcher's divisibility hints, keyed by the argument's position (none for do_not_specialize ones).
    skip = {fn.arg_names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned if a not in skip}
    try:
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options=opts)
    except Exception as e:  # the compiler's message is the report
        return f"{mod}.{name} {sig} {consts} {opts}:\n{str(e)[-2000:]}"
    return None


def main(path: str, target: str) -> int:
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    arch = int(target.removeprefix("sm_"))
    with open(path) as f:
        specs = _with_bf16([json.loads(k) for k in json.load(f)])
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        errors = [e for e in pool.map(partial(_compile, arch=arch), specs) if e]
    for e in errors:
        print(f"\nTriton compile for sm_{arch} FAILED: {e}")
    print(f"\nTriton compile check: {len(specs) - len(errors)} of {len(specs)} kernel specializations "
          f"compiled for sm_{arch}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
