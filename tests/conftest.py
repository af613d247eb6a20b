"""Shared test setup.

Without a GPU, Triton kernels run in the interpreter on CPU tensors
(TRITON_INTERPRET=1 must be set before triton is imported). Every test runs
with uninitialized memory poisoned (torch.empty returns NaN), so an output
element a kernel forgets to write fails the comparison, and with torch's
generator seeded from the test's name (fresh inputs per test, reproducible).
"""
import os
import sys
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("GENFAST_COMPILE_CHECK") and os.environ.get("TRITON_INTERPRET") == "1":
    pytest_plugins = ["triton_compile"]  # compile every launched kernel for a GPU (tests/triton_compile.py)
# cuBLAS refuses matrix products in deterministic mode unless its workspace is fixed.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import genfast  # noqa: E402  (after TRITON_INTERPRET)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def live_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs this machine can run."""
    status = genfast.backends()
    pairs = [("reference", DEVICE)]
    if status["cpp"][0]:
        pairs.append(("cpp", "cpu"))
    if status["triton"][0]:
        pairs.append(("triton", DEVICE))
    return pairs


BACKENDS = live_backends()
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]


def pytest_runtest_logreport(report):
    """With GENFAST_REPORT_FAILURES=1 (the GPU check sets it) a failure's traceback is printed as
    it happens, so a run cut at its time limit, before pytest's summary, still says why."""
    if report.failed and os.environ.get("GENFAST_REPORT_FAILURES") and not os.environ.get("PYTEST_XDIST_WORKER"):
        print(f"\n--- {report.nodeid} failed ({report.when}):\n{report.longreprtext[-4000:]}\n", file=sys.stderr,
              flush=True)


@pytest.fixture(params=BACKENDS, ids=BACKEND_IDS)
def backend(request):
    """Yields the device; genfast ops inside the test run on the backend."""
    name, device = request.param
    with genfast.use_backend(name):
        yield device


@pytest.fixture(autouse=True)
def seed_from_test_name(request):
    """Fresh random inputs for every test, the same on every run: a test's draws do not
    depend on which tests ran before it (or on pytest-xdist's split)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    previous = torch.are_deterministic_algorithms_enabled()
    # warn_only: the point is the poisoning, not refusing PyTorch's CUDA ops
    # that have no deterministic version (the references use some).
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


def assert_close(out, ref64, ref_lowp, *, atol, name: str = "out"):
    """The accuracy rule of DESIGN.md, as flash-attn applies it: the kernel's
    error may be at most twice PyTorch's own worst error in the same precision
    (measured relative to 1 + |ref|, so large and small elements are held to
    the same standard), plus the output's rounding and a small stated atol
    (a float or a per-element tensor):

        |out - ref64| <= (1 + |ref64|) * 2 max(|ref_lowp - ref64| / (1 + |ref64|))
                         + eps(dtype) |ref64| + atol
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(ref64).any(), f"{name}: NaN in the fp64 reference: the test's inputs are out of range"
    assert not torch.isnan(out).any(), f"{name}: NaN in the output (an element was not written?)"
    out64, ref64, lowp64 = out.double().cpu(), ref64.double().cpu(), ref_lowp.double().cpu()
    scale = 1 + ref64.abs()
    torch_error = ((lowp64 - ref64).abs() / scale).max() if ref64.numel() else 0.0
    bound = 2 * torch_error * scale + torch.finfo(out.dtype).eps * ref64.abs() + atol
    err = (out64 - ref64).abs()
    bad = err > bound
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements off; worst error {err.max().item():.3g} "
        f"(bound there {bound.flatten()[err.flatten().argmax()].item():.3g})")


def assert_compiled_matches(fn, args, wrt):
    """fn compiled with fullgraph=True (no graph break) gives eager's output and the
    same gradients of its sum with respect to wrt."""
    out = fn(*args)
    grads = torch.autograd.grad(out.sum(), wrt)
    cout = torch.compile(fn, fullgraph=True)(*args)
    cgrads = torch.autograd.grad(cout.sum(), wrt)
    torch.testing.assert_close(cout, out)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b)


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's value on the host (a sync on a GPU)."""

    READS = ("_local_scalar_dense", "nonzero", "is_nonzero", "equal")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))
