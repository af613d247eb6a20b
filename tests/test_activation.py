"""gated_act (GEGLU / SwiGLU gate) on every backend, forward and backward,
against PyTorch's own ``h * act(gate)`` in fp64, with PyTorch's error in the
input precision as the yardstick."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import genfast

from conftest import DEVICE, assert_close, assert_compiled_matches

ACTIVATIONS = ["gelu", "gelu_tanh", "silu"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (..., 2F): F = 1, 7, 33, 1000; ranks 1 to 5.
SHAPES = [(2,), (5, 14), (3, 4, 66), (2, 3, 2000), (2, 1, 3, 2, 2)]
ATOL = 1e-7  # the rule's slack where ref64 ~ 0; an fp32 ulp at 1 is 1.2e-7
# Exact GELU: the C++ kernel's erf is Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), the
# approximation of PyTorch's own vectorized CPU F.gelu, evaluated in fp32: <= 4e-7 in all.
# The small tensors here take F.gelu's scalar path (libm's erf) instead, so the yardstick
# gets that error on top, propagated: 0.5 |dout/dcdf| * ERF_ERROR.
ERF_ERROR = 4e-7


def eager(x, activation):
    """diffusers' GEGLU (and a SwiGLU FF) after the projection, as PyTorch runs it."""
    h, gate = x.chunk(2, dim=-1)
    if activation == "gelu":
        return h * F.gelu(gate)
    if activation == "gelu_tanh":
        return h * F.gelu(gate, approximate="tanh")
    return h * F.silu(gate)


def skip_unsupported(device, dtype):
    if dtype == torch.bfloat16 and device == "cpu" and genfast._ops.backends.forced() == "triton":
        pytest.skip("the Triton interpreter has no bf16 arithmetic")


def make_x(shape, dtype, device, scale=2.5):
    return (scale * torch.randn(shape, device=device)).to(dtype)


def check_forward_and_backward(x, activation, name=""):
    """gated_act(x) and its gradient for a random grad_out, against fp64 autograd of ``eager``."""
    x = x.detach().requires_grad_()
    f = x.shape[-1] // 2
    h, g = x.detach().double().cpu().abs().split(f, dim=-1)
    erf_slack = 0.5 * ERF_ERROR if activation == "gelu" else 0.0
    out = genfast.gated_act(x, activation)
    assert out.dtype == x.dtype and out.device == x.device and out.is_contiguous()
    x64 = x.detach().double().cpu().requires_grad_()
    out64 = eager(x64, activation)
    x_lowp = x.detach().clone().requires_grad_()
    out_lowp = eager(x_lowp, activation)
    assert_close(out, out64.detach(), out_lowp.detach(), atol=ATOL + erf_slack * h * g, name=f"out {name}")

    grad = torch.randn(out.shape, device=x.device).to(x.dtype)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    (grad64,) = torch.autograd.grad(out64, x64, grad.double().cpu())
    (grad_lowp,) = torch.autograd.grad(out_lowp, x_lowp, grad)
    assert grad_x.dtype == x.dtype and grad_x.shape == x.shape
    d = grad.double().cpu().abs()
    grad_slack = erf_slack * torch.cat([d * g, d * h], dim=-1)  # d grad_h / d cdf = d g; d grad_gate / d cdf = d h
    assert_close(grad_x, grad64, grad_lowp, atol=ATOL + grad_slack, name=f"grad_x {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_act_forward_and_backward(backend, shape, dtype, activation):
    skip_unsupported(backend, dtype)
    check_forward_and_backward(make_x(shape, dtype, backend), activation)


@pytest.mark.parametrize("shape", [(5, 14), (2, 3, 2000)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_act_with_bias(backend, shape, dtype, activation):
    """gated_act(x, bias=b) is the gate of Linear's output x + b: forward and the gradients of x and b
    against fp64 autograd; PyTorch's error in the input precision (x + b rounded, then the gate) as the
    yardstick."""
    skip_unsupported(backend, dtype)
    x = make_x(shape, dtype, backend).requires_grad_()
    bias = make_x(shape[-1:], dtype, backend, scale=1.0).requires_grad_()
    out = genfast.gated_act(x, activation, bias=bias)
    x64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, bias))
    out64 = eager(x64 + b64, activation)
    x_lowp, b_lowp = (t.detach().clone().requires_grad_() for t in (x, bias))
    out_lowp = eager(x_lowp + b_lowp, activation)
    f = shape[-1] // 2
    h, g = (x64 + b64).detach().abs().split(f, dim=-1)
    erf_slack = 0.5 * ERF_ERROR if activation == "gelu" else 0.0
    assert_close(out, out64.detach(), out_lowp.detach(), atol=ATOL + erf_slack * h * g, name="out")
    grad = torch.randn(out.shape, device=backend).to(dtype)
    grads = torch.autograd.grad(out, (x, bias), grad)
    grads64 = torch.autograd.grad(out64, (x64, b64), grad.double().cpu())
    grads_lowp = torch.autograd.grad(out_lowp, (x_lowp, b_lowp), grad)
    d = grad.double().cpu().abs()
    slack_x = ATOL + erf_slack * torch.cat([d * g, d * h], dim=-1)
    rows = slack_x.reshape(-1, shape[-1])
    for got, ref64, lowp, atol, name in zip(grads, grads64, grads_lowp, (slack_x, rows.sum(0) + ATOL * rows.shape[0]),
                                            ("grad_x", "grad_bias")):
        assert got.dtype == dtype and got.shape == ref64.shape
        assert_close(got, ref64, lowp, atol=atol, name=name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_sd_unet_row_width(backend, activation):
    """F = 1280 as in SD1.5's first FF (a few rows): the column split and the vector loop at real width."""
    check_forward_and_backward(make_x((2, 3, 2560), torch.float32, backend), activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_extreme_gates_stay_finite(backend, activation):
    """Gates where exp overflows and the sigmoid saturates: limits, not NaN, forward and backward."""
    gate = torch.tensor([-1e4, -300.0, -100.0, -88.0, -30.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 100.0, 1e4])
    h = torch.randn(3, gate.numel())
    x = torch.cat([h, gate.expand(3, -1)], dim=-1).to(backend)
    check_forward_and_backward(x, activation)


def test_non_contiguous_input_is_made_contiguous(backend):
    base = make_x((10, 3, 8), torch.float32, backend)
    for x in (base.transpose(0, 1), base[::2], base[..., :6]):  # strided rows; a narrower view of wider rows
        assert not x.is_contiguous()
        assert torch.equal(genfast.gated_act(x, "silu"), genfast.gated_act(x.contiguous(), "silu"))
    x = base.transpose(0, 1).requires_grad_()
    (g,) = torch.autograd.grad(genfast.gated_act(x).sum(), x)
    (g_ref,) = torch.autograd.grad(eager(x, "gelu").sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_empty_inputs(backend):
    for shape in [(0, 8), (3, 0), (2, 0, 4)]:
        x = torch.randn(shape, device=backend, requires_grad=True)
        out = genfast.gated_act(x, "gelu")
        assert out.shape == (*shape[:-1], shape[-1] // 2)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        assert grad.shape == x.shape


def test_matches_diffusers_geglu():
    activations = pytest.importorskip("diffusers.models.activations")
    geglu = activations.GEGLU(16, 24).to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE)
    ours = genfast.gated_act(geglu.proj(x), "gelu")
    torch.testing.assert_close(ours, geglu(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_fp64(activation):
    """float64 runs on the reference: gradcheck checks the registered backward formulas."""
    x = (2 * torch.randn(3, 2, 10, dtype=torch.float64, device=DEVICE)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: genfast.gated_act(x, activation), (x,))


def test_opcheck(backend):
    ops = torch.ops.genfast
    for activation in ACTIVATIONS:
        x = torch.randn(3, 5, 18, device=backend, requires_grad=True)
        bias = torch.randn(18, device=backend, requires_grad=True)
        for b in (None, bias):
            torch.library.opcheck(ops.gated_act.default, (x, b, activation))
            grad_out = torch.randn(3, 5, 9, device=backend)
            torch.library.opcheck(ops.gated_act_backward.default,
                                  (grad_out, x.detach(), None if b is None else b.detach(), activation))


def test_torch_compile_fullgraph_feed_forward():
    """diffusers' FeedForward with GEGLU: Linear -> gated_act -> Linear, compiled without a graph break."""
    torch._dynamo.reset()
    proj, out_proj = torch.nn.Linear(8, 2 * 12).to(DEVICE), torch.nn.Linear(12, 8).to(DEVICE)

    def ff(x):
        return out_proj(genfast.gated_act(proj(x), "gelu")) + genfast.gated_act(proj(x), "silu").sum(-1, True)

    x = torch.randn(2, 7, 8, device=DEVICE, requires_grad=True)
    assert_compiled_matches(ff, (x,), (x, proj.weight, out_proj.weight))


def _never(*args):
    raise AssertionError("the op ran")


@pytest.mark.parametrize("call, error, match", [
    (lambda x: genfast.gated_act(x.tolist()), TypeError, "x must be a torch.Tensor"),
    (lambda x: genfast.gated_act(x.int()), TypeError, "x must have dtype"),
    (lambda x: genfast.gated_act(x[0, 0]), ValueError, "x must have at least one dimension"),
    (lambda x: genfast.gated_act(x[:, :5]), ValueError, "last dimension must be even"),
    (lambda x: genfast.gated_act(x, "relu"), ValueError, "activation must be one of"),
    (lambda x: genfast.gated_act(x, activation=None), ValueError, "activation"),
    (lambda x: genfast.gated_act(x, bias=x[0].tolist()), TypeError, "bias must be a torch.Tensor"),
    (lambda x: genfast.gated_act(x, bias=x[0, :4]), ValueError, "bias must have shape"),
    (lambda x: genfast.gated_act(x, bias=x[0].double()), TypeError, "bias must have x's dtype"),
    (lambda x: genfast.gated_act(x, bias=x[0].to("meta")), ValueError, "bias must be on x's device"),
])
def test_bad_input_raises_before_anything_runs(call, error, match, monkeypatch):
    x = torch.randn(3, 8)
    monkeypatch.setattr(genfast.activation, "gated_act_op", _never)
    with pytest.raises(error, match=match):
        call(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_rows_split_between_threads(dtype):
    """67 rows of F = 1000: past the C++ kernels' one-thread threshold (32K outputs),
    in uneven tasks of rows."""
    if not genfast.backends()["cpp"][0]:
        pytest.skip("no C++ backend")
    with genfast.use_backend("cpp"):
        for activation in ACTIVATIONS:
            check_forward_and_backward(make_x((67, 2000), dtype, "cpu"), activation, name=activation)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), activation=st.sampled_from(ACTIVATIONS),
       dtype=st.sampled_from(DTYPES))
def test_cpp_on_random_shapes(shape, activation, dtype):
    if not genfast.backends()["cpp"][0]:
        pytest.skip("no C++ backend")
    shape[-1] *= 2
    with genfast.use_backend("cpp"):
        check_forward_and_backward(make_x(shape, dtype, "cpu"), activation, name=str(shape))
