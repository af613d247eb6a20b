"""The op registry: every genfast op is defined once in the torch.library
namespace ``genfast``.

Each op gets a fake (meta) implementation, so ``torch.ops.genfast.*`` traces
inside ``torch.compile(fullgraph=True)`` without a graph break, and one
dispatching implementation that picks the backend for the tensors' device and
dtype (``backends.select``) and calls

- ``genfast.kernels.<family>.<name>``   (Triton),
- ``torch.ops.genfast_cpu.<name>``      (C++, registered by ``csrc/ops.cpp``),
- ``genfast.reference.<family>.<name>`` (PyTorch).

All three take the op's arguments in schema order; the public functions
(``genfast/<family>.py``) validate and normalize the arguments first (contiguous
tensors, matching shapes and dtypes), so the implementations do not re-check.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from . import _build, backends

lib = torch.library.Library("genfast", "DEF")
_impls: dict[tuple[str, str], Callable] = {}


def implementation(name: str, family: str, backend: str) -> Callable:
    """The function that runs op ``name`` on ``backend``."""
    key = (name, backend)
    fn = _impls.get(key)
    if fn is None:
        if backend == "cpp":
            fn = getattr(torch.ops.genfast_cpu, name)
        else:
            package = "genfast.kernels" if backend == "triton" else "genfast.reference"
            fn = getattr(importlib.import_module(f"{package}.{family}"), name)
        _impls[key] = fn
    return fn


def _first_tensor(args) -> torch.Tensor:
    return next(a for a in args if isinstance(a, torch.Tensor))


_NOT_TENSORS = frozenset({type(None), bool, int, float, str})  # skipped by type: isinstance costs 0.1 us each


DIRECT, AUTOGRAD, DISPATCHER = 0, 1, 2


def _route(args, differentiable: bool) -> int:
    """How a call must run: DISPATCHER for tracing, dispatch modes, tensor subclasses
    (fake tensors) and functorch transforms; AUTOGRAD when the only reason is an
    input that requires grad; else DIRECT."""
    if torch.compiler.is_compiling():
        return DISPATCHER
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return DISPATCHER
    grad = differentiable and torch.is_grad_enabled()
    route = DIRECT
    for a in args:
        kind = type(a)
        if kind in _NOT_TENSORS:
            continue
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            if grad and a.requires_grad:
                route = AUTOGRAD
        elif isinstance(a, torch.Tensor):  # a subclass
            return DISPATCHER
    return route


class Op:
    """A registered op, called as ``op(*args)`` in schema order.

    The dispatcher's trip into a Python kernel costs ~10 us a call, as much as
    a small kernel; when nothing needs it (no tracing, no autograd, plain
    tensors) the call goes straight to the implementation the dispatcher would
    pick. When only autograd needs it, the call runs through an
    ``autograd.Function`` with the op's own setup_context and backward, which
    is what ``torch.library``'s autograd kernel builds, without the trips
    through the dispatcher and its argument handling (a GroupNorm forward and
    backward on a tiny tensor: 115 -> 70 us of host time on the CPU). An op
    defined with ``cpp_autograd`` takes the C++ library's ``<name>_autograd``
    there instead where the C++ kernels run: its autograd node is C++, with no
    Python frame in the backward (group_norm_act's round trip 84-86 -> 70 us,
    eager's 56). ``op.packet`` is ``torch.ops.genfast.<name>``.

    The implementation is cached per (device, dtype, forced backend):
    ``backends.select`` costs 1-3 us, a real share of a small op. The cache is
    emptied when the C++ build's status changes (it is probed on the first
    CPU call, and tests replace it).
    """

    __slots__ = ("name", "family", "packet", "function", "cpp_autograd", "_chosen", "_chosen_under")

    def __init__(self, name: str, family: str, backward: Callable | None, setup_context: Callable | None,
                 cpp_autograd: bool = False):
        self.name, self.family = name, family
        self.packet = getattr(torch.ops.genfast, name)
        self.cpp_autograd = cpp_autograd  # the C++ library has <name>_autograd
        self.function = None  # the autograd.Function of a differentiable op
        if backward is not None:
            def forward(ctx, *args):
                result = self.dispatch(*args)
                if setup_context is not None:
                    setup_context(ctx=ctx, inputs=args, output=result)
                return result
            self.function = type(f"{name}_autograd", (torch.autograd.Function,),
                                 {"forward": staticmethod(forward), "backward": staticmethod(backward)})
        self._chosen: dict[tuple, Callable] = {}
        self._chosen_under = _build._status  # the build status the cached choices were made under

    def implementation_for(self, device: torch.device, dtype: torch.dtype) -> Callable:
        """The implementation that runs this op on tensors of ``device`` and ``dtype``."""
        key = (device, dtype, backends._forced)  # the device, not device.type: 0.4 us cheaper
        fn = self._chosen.get(key) if self._chosen_under is _build._status else None
        if fn is None:
            fn = implementation(self.name, self.family, backends.select(device, dtype))
            if self._chosen_under is not _build._status:  # changed, or probed by select just now
                self._chosen = {}
                self._chosen_under = _build._status
            self._chosen[key] = fn
        return fn

    def dispatch(self, *args):
        """The body of the dispatcher's kernel: the implementation for the first tensor."""
        t = _first_tensor(args)
        return self.implementation_for(t.device, t.dtype)(*args)

    def __call__(self, *args):
        route = _route(args, self.function is not None)
        if route == AUTOGRAD:
            if self.cpp_autograd:
                t = _first_tensor(args)
                if self.implementation_for(t.device, t.dtype) is _impls.get((self.name, "cpp")):
                    return implementation(f"{self.name}_autograd", self.family, "cpp")(*args)
            return self.function.apply(*args)
        if route == DISPATCHER:
            return self.packet(*args)
        t = _first_tensor(args)
        return self.implementation_for(t.device, t.dtype)(*args)


def define(schema: str, family: str, fake: Callable, *, backward: Callable | None = None,
           setup_context: Callable | None = None, cpp_autograd: bool = False) -> Op:
    """Define ``genfast::<schema>`` with its fake impl, device dispatch and autograd."""
    name = schema.split("(", 1)[0]
    lib.define(schema)
    op = Op(name, family, backward, setup_context, cpp_autograd)
    lib.impl(name, op.dispatch, "CompositeExplicitAutograd")
    torch.library.register_fake(f"genfast::{name}", fake, lib=lib)
    if backward is not None:
        torch.library.register_autograd(f"genfast::{name}", backward, setup_context=setup_context, lib=lib)
    return op


# ---- argument checks shared by the public functions -------------------------

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(fn: str, name: str, x, *, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{fn}: {name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")
    return x


def check_like(fn: str, name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, *, dtype: bool = True) -> None:
    """x must match ref in shape, device and (optionally) dtype."""
    if x.shape != ref.shape:
        raise ValueError(f"{fn}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{fn}: {name} must be on the device of {ref_name} ({ref.device}), got {x.device}")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")


def check_choice(fn: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {tuple(choices)}, got {value!r}")
