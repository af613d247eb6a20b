"""group_norm_act on every backend against nn.GroupNorm (F.group_norm) + the
activation written here in plain PyTorch: fp64 is the truth, the same
composition in the input dtype is the yardstick (conftest.assert_close)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import genfast
from genfast.conv import group_norm_act

from conftest import BACKENDS, DEVICE, assert_close, assert_compiled_matches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = ["silu", "gelu", "relu", "leaky_relu", "none"]
# (shape, groups): SD UNet channels at an odd size, one group, one channel per
# group, H*W = 1, 5D video; the large one is skipped under the Triton interpreter.
SHAPES = [
    ((2, 320, 37, 37), 32),
    ((1, 3, 5, 7), 1),
    ((2, 6, 4, 5), 6),
    ((4, 16, 1, 1), 4),
    ((1, 8, 3, 5, 6), 4),
    ((2, 64, 13, 11), 32),
]
SMALL = [s for s in SHAPES if torch.Size(s[0]).numel() < 100_000]


# The Triton forward and backward take one of three paths, chosen by the group's size
# (kernels/conv.py): one program per (n, group) holding the group in one register tile,
# or looping over its tiles, and above GROUP_ONE_PROGRAM elements three kernels (channel
# moments, group finalize, apply). Small test shapes mostly select the first, so tests
# that take gn_backend run on every backend and on the Triton backend once more per
# forced path: "tiled" (32-lane tiles: most small groups span several, the last one
# partial) and "three_kernels" (a size limit of 0).
GROUP_PATHS = {"tiled": {"GROUP_ONE_PROGRAM": 2**62, "GROUP_TILE": 32}, "three_kernels": {"GROUP_ONE_PROGRAM": 0}}
GN_BACKENDS = [(name, device, "") for name, device in BACKENDS] + [
    (name, device, path) for name, device in BACKENDS if name == "triton" for path in GROUP_PATHS]


@pytest.fixture(params=GN_BACKENDS, ids=[f"{b}-{d}{'-' + p if p else ''}" for b, d, p in GN_BACKENDS])
def gn_backend(request, monkeypatch):
    """The backend fixture of conftest, with the Triton kernels' path forced."""
    name, device, path = request.param
    if path:
        from genfast.kernels import conv as kernels

        for constant, value in GROUP_PATHS[path].items():
            monkeypatch.setattr(kernels, constant, value)
    with genfast.use_backend(name):
        yield device


def interpreted(device):
    return device == "cpu" and genfast._ops.backends.forced() == "triton"


def skip_unsupported(device, dtype, shape=None):
    if interpreted(device):
        if dtype == torch.bfloat16:
            pytest.skip("the Triton interpreter has no bf16 arithmetic")
        if shape is not None and torch.Size(shape).numel() >= 100_000:
            pytest.skip("too slow under the Triton interpreter")


def torch_block(x, num_groups, weight=None, bias=None, eps=1e-5, activation="silu", negative_slope=0.01,
                add=None, scale_shift=None, residual=None):
    """The eager composition genfast fuses (diffusers' ResnetBlock2D order)."""
    def per_channel(t):
        return t[(...,) + (None,) * (x.dim() - 2)]

    h = x if add is None else x + per_channel(add)
    y = F.group_norm(h, num_groups, weight, bias, eps)
    if scale_shift is not None:
        scale, shift = scale_shift.chunk(2, dim=1)
        y = y * (1 + per_channel(scale)) + per_channel(shift)
    if activation == "silu":
        y = F.silu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    elif activation == "relu":
        y = F.relu(y)
    elif activation == "leaky_relu":
        y = F.leaky_relu(y, negative_slope)
    return y if residual is None else y + residual


def to_layout(x, channels_last):
    if not channels_last:
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def make_inputs(shape, dtype, device, channels_last, features, requires_grad=True):
    """x with a mean far from 0 (so a naive E[x^2] - E[x]^2 would fail) and the optional inputs."""
    n, c = shape[:2]
    x = (2.0 * torch.randn(shape, device=device) + 3.0).to(dtype)
    t = {"x": to_layout(x, channels_last)}
    if "affine" in features:
        t["weight"] = (1 + 0.5 * torch.randn(c, device=device)).to(dtype)
        t["bias"] = (0.5 * torch.randn(c, device=device)).to(dtype)
    if "add" in features:
        t["add"] = torch.randn(n, c, device=device).to(dtype)
    if "scale_shift" in features:
        t["scale_shift"] = (0.5 * torch.randn(n, 2 * c, device=device)).to(dtype)
    if "residual" in features:
        t["residual"] = to_layout(torch.randn(shape, device=device).to(dtype), channels_last)
    for v in t.values():
        v.requires_grad_(requires_grad)
    return t


def detached(tensors, dtype=None):
    return {k: (v.detach().to(dtype) if dtype else v.detach().clone()).requires_grad_() for k, v in tensors.items()}


def run_and_grad(fn, tensors, grad, **kw):
    out = fn(**tensors, **kw)
    grads = torch.autograd.grad(out, list(tensors.values()), grad)
    return out, dict(zip(tensors, grads))


def conditioning_atol(tensors, num_groups, grad, eps=1e-5):
    """Rounding that a group's small variance magnifies, whichever fp32 code computes it:
    out has (h - mean) * rstd with h itself rounded (u |h| rstd |w (1 + scale)|); grad_x
    is a difference of terms of size rstd |dy w (1 + scale)| that cancel when a group
    has few elements. Returns per-element bounds for out and grad_x and the per-(n, c)
    one for grad_add."""
    x = tensors["x"].detach().double()
    n, c = x.shape[:2]
    pc = (...,) + (None,) * (x.dim() - 2)
    h = x if "add" not in tensors else x + tensors["add"].detach().double()[pc]
    var = h.reshape(n, num_groups, -1).var(2, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    k = torch.ones(n, c, dtype=torch.float64, device=x.device)
    if "weight" in tensors:
        k = k * tensors["weight"].detach().double()
    if "scale_shift" in tensors:
        k = k * (1 + tensors["scale_shift"].detach().double()[:, :c])
    dyk = (grad.double() * k[pc]).abs().reshape(n, num_groups, -1).amax(2) * 1.2  # |act'| <= 1.13 (GELU)
    hk = (h * k[pc]).abs().reshape(n, num_groups, -1).amax(2)
    u = 2.0**-24

    def per_element(per_group):
        return per_group.repeat_interleave(c // num_groups, dim=1)[pc].expand(x.shape).cpu()

    s = x[0, 0].numel()
    return (per_element(2 * u * rstd * hk), per_element(8 * u * rstd * dyk),
            (8 * u * rstd * dyk).repeat_interleave(c // num_groups, dim=1).cpu() * s)


def check_against_torch(tensors, num_groups, grad, out, grads, eps=1e-5, **kw):
    """out and every gradient within the accuracy rule of fp64 vs the input dtype."""
    dtype = tensors["x"].dtype
    kw["eps"] = eps
    ref64, g64 = run_and_grad(lambda **t: torch_block(num_groups=num_groups, **t, **kw),
                              detached(tensors, torch.float64), grad.double())
    lowp, glowp = run_and_grad(lambda **t: torch_block(num_groups=num_groups, **t, **kw), detached(tensors), grad)
    assert out.dtype == dtype and out.shape == tensors["x"].shape
    cond_out, cond_x, cond_add = conditioning_atol(tensors, num_groups, grad, eps)
    assert_close(out, ref64, lowp, atol=1e-6 + cond_out, name="out")
    for name, g in grads.items():
        assert g.dtype == tensors[name].dtype, name
        # Gradients of per-channel inputs are sums over N*S (weight, bias) or S elements:
        # allow fp32 summation-order slack in proportion to the sum of magnitudes.
        per_elem = torch.Size(tensors["x"].shape).numel() / max(g.numel(), 1)
        slack = 1e-6 * (1 + g64[name].abs().cpu()) * per_elem ** 0.5
        slack = slack + {"x": cond_x, "add": cond_add}.get(name, 0.0)
        assert_close(g, g64[name], glowp[name], atol=slack, name=f"grad_{name}")


FEATURES = {
    "plain": (),
    "affine": ("affine",),
    "all": ("affine", "add", "scale_shift", "residual"),
}


@pytest.mark.parametrize("shape, groups", SHAPES, ids=[f"{'x'.join(map(str, s))}-g{g}" for s, g in SHAPES])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("features", list(FEATURES))
def test_group_norm_act_matches_torch(gn_backend, shape, groups, channels_last, dtype, features):
    skip_unsupported(gn_backend, dtype, shape)
    tensors = make_inputs(shape, dtype, gn_backend, channels_last, FEATURES[features])
    grad = torch.randn(shape, device=gn_backend).to(dtype)
    out, grads = run_and_grad(lambda **t: group_norm_act(num_groups=groups, **t), tensors, grad)
    assert out.is_contiguous(memory_format=torch.contiguous_format if not channels_last else
                             (torch.channels_last if len(shape) == 4 else torch.channels_last_3d))
    check_against_torch(tensors, groups, grad, out, grads)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_activation(gn_backend, activation, channels_last, dtype):
    skip_unsupported(gn_backend, dtype)
    shape, groups = (2, 12, 6, 7), 3
    tensors = make_inputs(shape, dtype, gn_backend, channels_last, ("affine", "add", "scale_shift", "residual"))
    grad = torch.randn(shape, device=gn_backend).to(dtype)
    kw = dict(activation=activation, negative_slope=0.2, eps=1e-6)
    out, grads = run_and_grad(lambda **t: group_norm_act(num_groups=groups, **t, **kw), tensors, grad)
    check_against_torch(tensors, groups, grad, out, grads, **kw)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_saturating_activation_arguments(gn_backend, activation, channels_last):
    """Weights and biases that put the activation's argument where exp overflows or the sigmoid
    saturates (|y| up to 1e4, and around 88, where exp(88.7) leaves fp32): limits, not NaN,
    forward and backward, within the accuracy rule."""
    shape, groups = (2, 8, 5, 3), 4
    tensors = make_inputs(shape, torch.float32, gn_backend, channels_last, ("affine",), requires_grad=False)
    tensors["weight"] = torch.tensor([1e4, 1.0, 1.0, 1.0, 5.0, 1.0, 1e-3, 0.0], device=gn_backend)
    tensors["bias"] = torch.tensor([0.0, -200.0, -88.5, 88.5, -20.0, 0.5, 89.0, -95.0], device=gn_backend)
    for v in tensors.values():
        v.requires_grad_(True)
    grad = torch.randn(shape, device=gn_backend)
    out, grads = run_and_grad(lambda **t: group_norm_act(num_groups=groups, activation=activation, **t), tensors,
                              grad)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    check_against_torch(tensors, groups, grad, out, grads, activation=activation)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_output_changed_in_place_before_backward(gn_backend, channels_last):
    """The C++ backward takes an fp32 SiLU's derivative from the forward's output; an output the caller
    changed in place (legal: the output is not a saved tensor) is not used, and the gradients stay right."""
    shape, groups = (2, 8, 5, 3), 4
    tensors = make_inputs(shape, torch.float32, gn_backend, channels_last, ("affine",))
    grad = torch.randn(shape, device=gn_backend)
    out = group_norm_act(num_groups=groups, **tensors)
    out.mul_(2.0)
    grads = dict(zip(tensors, torch.autograd.grad(out, list(tensors.values()), grad)))
    check_against_torch(tensors, groups, 2 * grad, out / 2, grads)


def test_large_group_split_within_groups(gn_backend):
    """One image, few groups of many elements: the C++ kernels and the Triton three-kernel
    path split each group; the Triton one-program path loops over a group's tiles."""
    shape, groups = ((1, 4, 96, 100), 2) if interpreted(gn_backend) else ((1, 16, 256, 256), 2)
    for channels_last in (False, True):
        tensors = make_inputs(shape, torch.float32, gn_backend, channels_last, ("affine", "add"))
        grad = torch.randn(shape, device=gn_backend)
        out, grads = run_and_grad(lambda **t: group_norm_act(num_groups=groups, **t), tensors, grad)
        check_against_torch(tensors, groups, grad, out, grads)


def test_mean_far_from_zero(gn_backend):
    """Statistics by exact two-pass merges: a mean 1e4 standard deviations away does not
    cancel. What is left is the rounding of the fp32 mean itself (as in PyTorch), u·|mean|·rstd."""
    x = (1e4 + torch.randn(2, 8, 9, 9, device=gn_backend)).requires_grad_()
    out = group_norm_act(x, 4, activation="none")
    ref64 = torch_block(x.detach().double(), 4, activation="none")
    lowp = torch_block(x.detach(), 4, activation="none")
    assert_close(out, ref64, lowp, atol=2 * 2.0**-24 * 1e4 * 1.2)


def test_non_contiguous_input_and_residual(backend):
    base = torch.randn(2, 16, 10, 12, device=backend)
    x = base[:, ::2, :, 1:-1]  # strided, neither NCHW- nor channels_last-contiguous
    res = torch.randn(2, 8, 10, 10, device=backend).transpose(2, 3)
    out = group_norm_act(x, 4, residual=res)
    assert_close(out, torch_block(x.double(), 4, residual=res.double()), torch_block(x, 4, residual=res), atol=1e-6)
    assert out.is_contiguous()


def test_residual_keeps_x_layout(backend):
    x = to_layout(torch.randn(2, 8, 5, 6, device=backend), channels_last=True)
    res = torch.randn(2, 8, 5, 6, device=backend)  # NCHW: converted to x's layout
    out = group_norm_act(x, 2, residual=res)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, torch_block(x, 2, residual=res), rtol=1e-5, atol=1e-5)


def test_out_writes_into_the_buffer_and_in_place(gn_backend):
    """out= (inference): bit-for-bit the fresh output, written into the caller's buffer, also over x itself."""
    for channels_last in (False, True):
        t = make_inputs((2, 64, 13, 11), torch.float32, gn_backend, channels_last, ("affine", "add", "residual"))
        t = {k: v.detach() for k, v in t.items()}
        want = group_norm_act(num_groups=32, **t)
        out = torch.full_like(want, float("nan"))
        assert group_norm_act(num_groups=32, out=out, **t) is out
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        x = t.pop("x").clone()
        assert group_norm_act(x, 32, out=x, **t) is x
        torch.testing.assert_close(x, want, rtol=0, atol=0)


def test_out_refuses_autograd_and_other_buffers():
    x = torch.randn(2, 8, 5, 3)
    with pytest.raises(ValueError, match="out"):
        group_norm_act(x, 4, out=torch.empty(2, 8, 5, 4))
    with pytest.raises(ValueError, match="out must be laid out like x"):
        group_norm_act(x, 4, out=torch.empty_like(x, memory_format=torch.channels_last))
    with pytest.raises((ValueError, TypeError), match="out"):
        group_norm_act(x, 4, out=torch.empty_like(x, dtype=torch.float16))
    with pytest.raises(ValueError, match="autograd"):
        group_norm_act(x.clone().requires_grad_(), 4, out=torch.empty_like(x))


def test_empty_batch(backend):
    x = torch.randn(0, 8, 4, 4, device=backend, requires_grad=True)
    out = group_norm_act(x, 2)
    assert out.shape == x.shape
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == x.shape


def test_fp32_params_with_low_precision_x():
    """Mixed precision: fp32 weight/bias/add with fp16 x; gradients come back in each input's dtype."""
    x = torch.randn(2, 8, 5, 5, device=DEVICE).half().requires_grad_()
    w = torch.randn(8, device=DEVICE, requires_grad=True)
    add = torch.randn(2, 8, device=DEVICE, requires_grad=True)
    out = group_norm_act(x, 4, w, add=add)
    assert out.dtype == torch.float16
    gx, gw, gadd = torch.autograd.grad(out.float().sum(), (x, w, add))
    assert (gx.dtype, gw.dtype, gadd.dtype) == (torch.float16, torch.float32, torch.float32)


class _LaunchLog:
    """Records the Triton launches of kernels/conv.py: (kernel name, ONE_TILE, the launch's tensor dtypes)."""

    def __init__(self, monkeypatch):
        from genfast.kernels import conv as kernels

        self.kernels, self.calls = kernels, []
        for name in dir(kernels):
            if name.endswith("_kernel"):
                monkeypatch.setattr(kernels, name, self._wrap(name, getattr(kernels, name)))

    def _wrap(self, name, kernel):
        log = self

        class Recorded:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    log.calls.append((name, kwargs.get("ONE_TILE"),
                                      [a.dtype for a in args if isinstance(a, torch.Tensor)]))
                    return kernel[grid](*args, **kwargs)
                return launch
        return Recorded()

    def names(self):
        names = [c[0] for c in self.calls]
        self.calls.clear()
        return names


@pytest.mark.skipif(not any(b == "triton" for b, _ in BACKENDS), reason="no Triton backend")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_launches_per_call(channels_last, monkeypatch):
    """Each path's launches for one call, forward and backward, on a 5D shape with every input:
    one kernel for a group that one program takes (tiled or not), three (forward) and four
    (backward) above the limit; parameters reach the kernels uncast (fp16 with fp32 x)."""
    from genfast.kernels import conv as kernels

    log = _LaunchLog(monkeypatch)
    shape, groups = (2, 6, 3, 5, 7), 3
    t32 = make_inputs(shape, torch.float32, DEVICE, channels_last, ("affine", "add", "scale_shift", "residual"))
    params = ("weight", "bias", "add", "scale_shift")
    for name in params:  # fp16 values, so that the fp32 copies are the same numbers
        t32[name] = t32[name].detach().half().float().requires_grad_()
    t = {k: v.detach().half().requires_grad_() if k in params else v for k, v in t32.items()}
    grad = torch.randn(shape, device=DEVICE)
    one = ["_group_norm_act_one_program_kernel"], ["_group_norm_act_backward_one_program_kernel"]
    three = (["_channel_moments_kernel", "_group_finalize_kernel", "_apply_kernel"],
             ["_coef_kernel", "_channel_sums_kernel", "_group_backward_kernel", "_grad_apply_kernel"])
    with genfast.use_backend("triton"):
        for limits, (forward, backward), one_tile in (({}, one, True), (GROUP_PATHS["tiled"], one, False),
                                                      (GROUP_PATHS["three_kernels"], three, None)):
            for constant, value in limits.items():
                monkeypatch.setattr(kernels, constant, value)
            out = group_norm_act(num_groups=groups, activation="gelu", **t)
            assert [c[1] for c in log.calls] == [one_tile] * len(forward)
            if one_tile is not None:  # weight, bias, add, scale_shift as the caller gave them
                assert log.calls[0][2][3:7] == [torch.float16] * 4
            assert log.names() == forward
            grads = torch.autograd.grad(out, list(t.values()), grad)
            assert log.names() == backward
            assert [g.dtype for g in grads] == [v.dtype for v in t.values()]
            # The same numbers as fp32 parameters: the same result, bit for bit, which is right.
            out32 = group_norm_act(num_groups=groups, activation="gelu", **t32)
            grads32 = torch.autograd.grad(out32, list(t32.values()), grad)
            log.calls.clear()
            torch.testing.assert_close(out, out32, rtol=0, atol=0)
            for g, g32 in zip(grads, grads32):
                torch.testing.assert_close(g, g32.to(g.dtype), rtol=0, atol=0)
            check_against_torch(t32, groups, grad, out32, dict(zip(t32, grads32)), activation="gelu")


def test_triton_path_by_shape():
    """The one-program bound, by shape only: SD1.5 UNet groups (G = 32) take one program, the
    VAE decoder's 2M-element groups and groups of more than GROUP_TILE channels do not."""
    if not any(b == "triton" for b, _ in BACKENDS):
        pytest.skip("no Triton backend")
    from genfast.kernels.conv import _one_program_tiling

    assert _one_program_tiling(10, 64 * 64) == (16, 256, False)  # 2x320x64x64: 40960 per group, 16 tiles
    assert _one_program_tiling(40, 8 * 8) == (64, 64, True)  # 2x1280x8x8: one tile
    assert _one_program_tiling(1, 7) == (1, 8, True)
    assert _one_program_tiling(16, 256 * 256) is None  # VAE 1x512x256x256
    assert _one_program_tiling(8192, 1) is None  # a tile of more channels than GROUP_TILE


def test_same_result_on_every_backend():
    tensors = make_inputs((2, 12, 7, 5), torch.float32, DEVICE, True, ("affine", "add", "scale_shift", "residual"),
                          requires_grad=False)
    outs = {}
    for name, device in BACKENDS:
        with genfast.use_backend(name):
            outs[name] = group_norm_act(num_groups=3, **{k: v.to(device) for k, v in tensors.items()}).cpu()
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["reference"], rtol=2e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_fp64(activation):
    """float64 runs on the reference: gradcheck checks the registered backward formulas."""
    t = make_inputs((2, 6, 3, 4), torch.float64, DEVICE, False, ("affine", "add", "scale_shift", "residual"))
    names = list(t)

    def fn(*args):
        return group_norm_act(num_groups=3, activation=activation, negative_slope=0.1, **dict(zip(names, args)))

    assert torch.autograd.gradcheck(fn, tuple(t.values()))
    x = to_layout(torch.randn(2, 4, 3, 3, dtype=torch.float64, device=DEVICE), True).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: group_norm_act(x, 2, activation=activation), (x,))


def test_opcheck(backend):
    """Every backend: the schemas (outputs that do not alias), fakes and autograd registrations."""
    ops = torch.ops.genfast
    t = make_inputs((2, 8, 5, 3), torch.float32, backend, False, ("affine", "add", "scale_shift", "residual"))
    x, w, b, add, ss, res = (t[k] for k in ("x", "weight", "bias", "add", "scale_shift", "residual"))
    xcl = to_layout(x.detach(), True).requires_grad_()
    cases = [
        (ops.group_norm_act.default, (x, 4, w, b, 1e-5, "silu", 0.01, add, ss, res)),
        (ops.group_norm_act.default, (x, 2, None, None, 1e-6, "gelu", 0.01, None, None, None)),
        (ops.group_norm_act.default, (xcl, 4, w, None, 1e-5, "leaky_relu", 0.2, add, None, None)),
    ]
    out, mean, rstd = ops.group_norm_act(x.detach(), 4, w.detach(), b.detach(), 1e-5, "silu", 0.01, add.detach(),
                                         ss.detach(), None)
    g = torch.randn_like(out)
    cases.append((ops.group_norm_act_backward.default,
                  (g, x.detach(), 4, w.detach(), b.detach(), mean, rstd, "silu", 0.01, add.detach(), ss.detach(),
                   out)))
    cases.append((ops.group_norm_act_out.default, (x.detach(), 4, w.detach(), b.detach(), 1e-5, "silu", 0.01,
                                                   add.detach(), ss.detach(), res.detach(), torch.empty_like(out))))
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_resnet_block():
    torch._dynamo.reset()

    def block(x, w, b, temb, res):
        h = group_norm_act(x, 4, w, b, add=temb)
        return group_norm_act(h, 2, w, b, activation="gelu", residual=res)

    t = make_inputs((2, 8, 6, 6), torch.float32, DEVICE, True, ("affine", "add", "residual"))
    args = (t["x"], t["weight"], t["bias"], t["add"], t["residual"])
    assert_compiled_matches(block, args, args)


def test_torch_compile_output_changed_in_place_before_backward():
    """A compiled region's output changed in place before the backward: legal (as in eager), right
    gradients; under torch.compile the backward does not keep the output for SiLU's derivative."""
    torch._dynamo.reset()
    t = make_inputs((2, 8, 5, 3), torch.float32, DEVICE, False, ("affine",))
    grad = torch.randn(2, 8, 5, 3, device=DEVICE)
    f = torch.compile(lambda x, w, b: group_norm_act(x, 4, w, b), fullgraph=True)
    out = f(t["x"], t["weight"], t["bias"])
    out.mul_(2.0)
    grads = dict(zip(t, torch.autograd.grad(out, list(t.values()), grad)))
    check_against_torch(t, 4, 2 * grad, out / 2, grads)


def _never(*args):
    raise AssertionError("a kernel ran")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_groups=3), ValueError, "num_groups"),
    (dict(num_groups=0), ValueError, "num_groups"),
    (dict(num_groups=2.0), ValueError, "num_groups"),
    (dict(weight=torch.ones(7)), ValueError, "weight"),
    (dict(bias=torch.ones(8, 1)), ValueError, "bias"),
    (dict(weight=torch.ones(8, dtype=torch.int32)), TypeError, "weight"),
    (dict(add=torch.ones(2, 16)), ValueError, "add"),
    (dict(scale_shift=torch.ones(2, 8)), ValueError, "scale_shift"),
    (dict(residual=torch.ones(2, 8, 5)), ValueError, "residual"),
    (dict(residual=torch.ones(2, 8, 5, 5, dtype=torch.float16)), TypeError, "residual"),
    (dict(residual=torch.ones(2, 8, 5, 5, device="meta")), ValueError, "residual"),
    (dict(activation="swish"), ValueError, "activation"),
    (dict(negative_slope="0.1"), TypeError, "negative_slope"),
    (dict(eps=-1.0), ValueError, "eps"),
])
def test_bad_input_raises_before_anything_runs(kwargs, error, match, monkeypatch):
    x = torch.randn(2, 8, 5, 5)
    kwargs = {"num_groups": 4, **kwargs}
    monkeypatch.setattr(genfast._ops, "implementation", lambda *a: _never)
    with pytest.raises(error, match=match):
        group_norm_act(x, **kwargs)
    with pytest.raises(ValueError, match="x"):
        group_norm_act(torch.randn(8), 4)
    with pytest.raises(TypeError, match="x"):
        group_norm_act(torch.ones(2, 8, 5, 5, dtype=torch.int64), 4)


# The C++ channels_last forward and backward run an image in channel blocks of whole groups
# (statistics or sums, then the apply from L2) where a block's part of a row is long enough, else
# in row pieces with the statistics merged across them: both paths, one and two threads, blocks
# that split the groups unevenly (32 groups in 3 or 5 blocks), a block ending in a part vector
# ("tail": 530 channels), with the per-(n, c) inputs and with weight and bias alone (where the
# fp32 SiLU backward takes the derivative from the output); and training-mode batch norm over wide
# (N, C) rows, forward and backward, which takes the same kernels with a group per channel (in two
# channel blocks of 512 channels on two threads).
@pytest.mark.parametrize("shape, groups, dtype", [
    ((2, 1280, 16, 16), 32, torch.float32), ((2, 640, 5, 5), 32, torch.bfloat16), ((1, 96, 9, 7), 32, torch.float32),
    ((2, 530, 4, 3), 10, torch.float32)], ids=["blocks3", "bf16", "rows", "tail"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("features", ["all", "affine"])
def test_cpp_channels_last_paths(shape, groups, dtype, threads, features):
    if not genfast.backends()["cpp"][0]:
        pytest.skip("no C++ backend")
    tensors = make_inputs(shape, dtype, "cpu", True, FEATURES[features])
    grad = torch.randn(shape).to(dtype)
    x2d = (2 * torch.randn(24, 1024) + 3).requires_grad_()
    w2d = (1 + 0.3 * torch.randn(1024)).requires_grad_()
    g2d = torch.randn(24, 1024)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with genfast.use_backend("cpp"):
            out, grads = run_and_grad(lambda **t: group_norm_act(num_groups=groups, **t), tensors, grad)
            bn = genfast.batch_norm_act(x2d, None, None, w2d, training=True, activation="silu")
            bn_grads = torch.autograd.grad(bn, (x2d, w2d), g2d)
    finally:
        torch.set_num_threads(previous)
    assert out.is_contiguous(memory_format=torch.channels_last)
    check_against_torch(tensors, groups, grad, out, grads)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x2d, w2d))
    ref = F.silu(F.batch_norm(x64, None, None, w64, training=True))
    torch.testing.assert_close(bn, ref.float(), rtol=1e-5, atol=1e-5)
    for got, want in zip(bn_grads, torch.autograd.grad(ref, (x64, w64), g2d.double())):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("features", [(), ("affine",), ("add", "residual"), ("affine", "add", "scale_shift", "residual")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_autograd_node(features, channels_last, monkeypatch):
    """On the C++ backend a recorded call takes the op's C++ autograd node: the Python node's
    gradients bit for bit, whichever inputs ask for one and whichever optionals are absent;
    the statistics stay non-differentiable, and a double backward raises."""
    if not genfast.backends()["cpp"][0]:
        pytest.skip("no C++ backend")
    shape = (2, 12, 7, 5)
    t = make_inputs(shape, torch.float32, "cpu", channels_last, features, requires_grad=False)
    grad = torch.randn(shape)
    op = genfast.conv.group_norm_act_op
    with genfast.use_backend("cpp"):
        for wanted in [[name] for name in t] + [list(t)]:
            runs = []
            for cpp_node in (True, False):
                monkeypatch.setattr(op, "cpp_autograd", cpp_node)
                inputs = {k: v.detach().clone().requires_grad_(k in wanted) for k, v in t.items()}
                out = group_norm_act(num_groups=3, activation="gelu", **inputs)
                assert (type(out.grad_fn).__name__ == "CppFunction") == cpp_node
                runs.append((out, torch.autograd.grad(out, [inputs[k] for k in wanted], grad)))
            (out, grads), (out_py, grads_py) = runs
            torch.testing.assert_close(out, out_py, rtol=0, atol=0)
            for g, g_py in zip(grads, grads_py):
                torch.testing.assert_close(g, g_py, rtol=0, atol=0)
        monkeypatch.setattr(op, "cpp_autograd", True)
        x = t["x"].detach().clone().requires_grad_()
        _, mean, rstd = op(x, 3, None, None, 1e-5, "silu", 0.01, None, None, None)
        assert not mean.requires_grad and not rstd.requires_grad
        out = group_norm_act(x, 3)
        (gx,) = torch.autograd.grad(out, x, grad.requires_grad_(), create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            gx.sum().backward()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3), groups=st.integers(1, 4), cg=st.integers(1, 5),
       spatial=st.lists(st.integers(1, 17), min_size=0, max_size=3), channels_last=st.booleans(),
       activation=st.sampled_from(ACTIVATIONS), features=st.sampled_from(list(FEATURES)))
def test_cpp_matches_reference_on_random_shapes(n, groups, cg, spatial, channels_last, activation, features):
    if not genfast.backends()["cpp"][0]:
        pytest.skip("no C++ backend")
    shape = (n, groups * cg, *spatial)
    channels_last = channels_last and len(shape) in (4, 5)
    t = make_inputs(shape, torch.float32, "cpu", channels_last, FEATURES[features])
    grad = torch.randn(shape)
    res = {}
    for name in ("cpp", "reference"):
        with genfast.use_backend(name):
            res[name] = run_and_grad(
                lambda **k: group_norm_act(num_groups=groups, activation=activation, **k), detached(t), grad)
    out, grads = res["cpp"]
    torch.testing.assert_close(out, res["reference"][0], rtol=1e-4, atol=1e-4)
    for k in grads:
        # groups of one or two elements make the normalization ill-conditioned: compare
        # relative to the gradient's own size
        ref = res["reference"][1][k]
        torch.testing.assert_close(grads[k], ref, rtol=1e-3, atol=1e-3 * (1 + ref.abs().max().item()))


# ---- instance_norm_act, batch_norm_act, conv2d_act ------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_instance_norm_act_matches_torch(backend, channels_last, activation):
    x = to_layout(torch.randn(3, 6, 7, 5, device=backend) + 1, channels_last).requires_grad_()
    w = torch.randn(6, device=backend, requires_grad=True)
    b = torch.randn(6, device=backend, requires_grad=True)
    rm, rv = torch.zeros(6, device=backend), torch.ones(6, device=backend)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out = genfast.instance_norm_act(x, rm, rv, w, b, activation=activation, negative_slope=0.2)
    ref = F.instance_norm(x, rm_ref, rv_ref, w, b, True, 0.1, 1e-5)
    ref = F.relu(ref) if activation == "relu" else F.leaky_relu(ref, 0.2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(running_mean=torch.zeros(7)), "running_mean must have shape"),
    (dict(running_var=torch.ones(6, device="meta")), "running_var must be on the device"),
    (dict(use_input_stats=False, running_var=None), "running_mean and running_var"),
])
def test_instance_norm_act_bad_running_stats_raise_before_anything_runs(kwargs, match, monkeypatch):
    args = {"running_mean": torch.zeros(6), "running_var": torch.ones(6), **kwargs}
    monkeypatch.setattr(genfast._ops, "implementation", lambda *a: _never)
    stats = [(t, t.clone()) for t in args.values() if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    with pytest.raises(ValueError, match=match):
        genfast.instance_norm_act(torch.randn(2, 6, 3, 3), **args)
    assert all(torch.equal(t, before) for t, before in stats), "running statistics touched"


def test_batch_norm_act_running_stats_and_eval():
    bn = torch.nn.BatchNorm2d(8)
    mine = genfast.nn.BatchNormAct.from_module(bn, torch.nn.LeakyReLU(0.2))
    for _ in range(3):
        x = torch.randn(4, 8, 5, 5) * 2 + 1
        torch.testing.assert_close(mine(x), F.leaky_relu(bn(x), 0.2))
    torch.testing.assert_close(mine.running_mean, bn.running_mean)
    torch.testing.assert_close(mine.running_var, bn.running_var)
    assert int(mine.num_batches_tracked) == 3
    bn.eval(), mine.eval()
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    torch.testing.assert_close(mine(x), F.leaky_relu(bn(x), 0.2))
    with pytest.raises(ValueError, match="running_mean"):
        genfast.batch_norm_act(x, torch.zeros(7), torch.ones(8))


def test_conv2d_act_is_diffusers_resnet_output():
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6, 4, 3, 3), torch.randn(6)
    res = torch.randn(2, 6, 9, 9)
    out = genfast.conv2d_act(x, w, b, padding=1, residual=res, output_scale=0.5)
    torch.testing.assert_close(out, (F.conv2d(x, w, b, padding=1) + res) / 2.0)
    out = genfast.conv2d_act(x, w, b, stride=2, activation="silu")
    torch.testing.assert_close(out, F.silu(F.conv2d(x, w, b, stride=2)))
    with pytest.raises(ValueError, match="residual"):
        genfast.conv2d_act(x, w, b, residual=res)


# ---- genfast.nn modules ----------------------------------------------------------

@pytest.mark.parametrize("act", [torch.nn.SiLU(), torch.nn.GELU(), torch.nn.ReLU(), torch.nn.LeakyReLU(0.1), None])
def test_group_norm_act_module_from_module(act):
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    fused = genfast.nn.GroupNormAct.from_module(norm, act)
    assert fused.weight is not norm.weight and torch.equal(fused.weight, norm.weight)
    assert set(fused.state_dict()) == set(norm.state_dict())
    x = torch.randn(2, 16, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    ref = norm.to(DEVICE)(x)
    ref = act.to(DEVICE)(ref) if act is not None else ref
    torch.testing.assert_close(fused.to(DEVICE)(x), ref, rtol=1e-5, atol=1e-5)
    temb = torch.randn(2, 16, device=DEVICE)
    torch.testing.assert_close(fused(x, add=temb), (act or torch.nn.Identity())(norm(x + temb[:, :, None, None])),
                               rtol=1e-5, atol=1e-5)


def test_modules_refuse_what_they_cannot_reproduce():
    with pytest.raises(ValueError, match="no fused equivalent"):
        genfast.nn.GroupNormAct.from_module(torch.nn.GroupNorm(2, 4), torch.nn.GELU(approximate="tanh"))
    with pytest.raises(ValueError, match="no fused equivalent"):
        genfast.nn.GroupNormAct.from_module(torch.nn.GroupNorm(2, 4), torch.nn.Tanh())
    with pytest.raises(TypeError, match="GroupNorm"):
        genfast.nn.GroupNormAct.from_module(torch.nn.BatchNorm2d(4), torch.nn.SiLU())
    with pytest.raises(ValueError, match="divide"):
        genfast.nn.GroupNormAct(3, 8)


def test_instance_norm_act_module():
    norm = torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
    fused = genfast.nn.InstanceNormAct.from_module(norm, torch.nn.ReLU())
    for _ in range(2):
        x = torch.randn(3, 8, 7, 7)
        torch.testing.assert_close(fused(x), F.relu(norm(x)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.running_var, norm.running_var)
    norm.eval(), fused.eval()
    torch.testing.assert_close(fused(x), F.relu(norm(x)), rtol=1e-5, atol=1e-5)


# ---- batch_norm_act in eval mode and the conv2d_act epilogue: one fused pass -------------

def torch_activate(y, activation, negative_slope=0.2):
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "none": lambda t: t,
            "leaky_relu": lambda t: F.leaky_relu(t, negative_slope)}[activation](y)


BN_SHAPES = [(3, 10, 7, 5), (2, 6, 3, 4, 5), (5, 7), (1, 3, 1, 1), (2, 64, 13, 11)]


@pytest.mark.parametrize("shape", BN_SHAPES, ids=["x".join(map(str, s)) for s in BN_SHAPES])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_batch_norm_act_eval_matches_torch(backend, shape, channels_last, dtype):
    skip_unsupported(backend, dtype)
    if channels_last and len(shape) < 4:
        pytest.skip("no channels_last for 2D input")
    c = shape[1]
    x = to_layout((2 * torch.randn(shape, device=backend) + 1).to(dtype), channels_last)
    # Running statistics and affine in fp32, as nn.BatchNorm keeps them under autocast.
    rm, rv = 0.5 * torch.randn(c, device=backend), 0.2 + torch.rand(c, device=backend)
    w, b = 1 + 0.3 * torch.randn(c, device=backend), 0.3 * torch.randn(c, device=backend)
    for activation in ACTIVATIONS:
        out = genfast.batch_norm_act(x, rm, rv, w, b, activation=activation, eps=1e-3)
        assert out.dtype == dtype and out.stride() == x.stride()
        ref64 = torch_activate(F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False,
                                            0.1, 1e-3), activation)
        # PyTorch in x's dtype casts the parameters to it: the yardstick of the same composition there.
        lowp = torch_activate(F.batch_norm(x, rm.to(dtype), rv.to(dtype), w.to(dtype), b.to(dtype), False, 0.1,
                                           1e-3), activation)
        assert_close(out, ref64, lowp, atol=1e-6, name=activation)


def test_batch_norm_act_eval_gradients():
    """float64 runs on the reference: gradcheck of the eval-mode op's backward (x, weight, bias)."""
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.randn(5, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64,
                                                                              requires_grad=True)
    rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    for activation in ("silu", "leaky_relu"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: genfast.batch_norm_act(x, rm, rv, w, b, activation=activation), (x, w, b))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_conv2d_act_epilogue_matches_torch(backend, channels_last, activation):
    x = to_layout(torch.randn(2, 5, 9, 8, device=backend), channels_last)
    w, b = torch.randn(7, 5, 3, 3, device=backend) / 6, torch.randn(7, device=backend)
    res = to_layout(torch.randn(2, 7, 9, 8, device=backend), not channels_last)  # the other layout
    for bias, residual, scale in ((b, res, 0.5), (None, res, 1.0), (b, None, 1 / 1.4142)):
        out = genfast.conv2d_act(x, w, bias, padding=1, activation=activation, negative_slope=0.2, residual=residual,
                                 output_scale=scale)
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

        def ref(dt):
            y = F.conv2d(x.to(dt), w.to(dt), None if bias is None else bias.to(dt), padding=1)
            y = y if residual is None else y + residual.to(dt)
            return torch_activate(y * scale, activation)

        # The convolution is PyTorch's in both: compare the epilogue against fp64 of the same conv output.
        y32 = F.conv2d(x, w, padding=1)
        ref64 = torch_activate(((y32.double() + (0 if bias is None else bias.double()[:, None, None])
                                 + (0 if residual is None else residual.double())) * scale), activation)
        lowp = torch_activate(((y32 + (0 if bias is None else bias[:, None, None])
                                + (0 if residual is None else residual)) * scale), activation)
        assert_close(out, ref64, lowp, atol=1e-6)
        torch.testing.assert_close(out, ref(torch.float32), rtol=1e-5, atol=1e-5)


def test_channel_affine_act_opcheck_and_compile():
    x = torch.randn(2, 6, 5, 3, requires_grad=True)
    scale, shift = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    res = torch.randn(2, 6, 5, 3, requires_grad=True)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for args in ((x, scale, shift, res, "silu", 0.01), (xcl, scale, shift, None, "leaky_relu", 0.2)):
        torch.library.opcheck(torch.ops.genfast.channel_affine_act.default, args)
    torch._dynamo.reset()
    rm, rv = torch.randn(6), torch.rand(6) + 0.5

    def fn(x):
        return genfast.batch_norm_act(x, rm, rv, scale, shift, activation="relu")

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x))


# ---- batch_norm_act in training mode: batch statistics, fused forward and backward -------------

# Odd channel counts and spatial sizes, 5D, (N, C) and (N, C, L), S = 1, N = 1.
TRAIN_SHAPES = [(3, 10, 7, 5), (2, 6, 3, 4, 5), (5, 7), (4, 5, 9), (6, 3, 1, 1), (1, 5, 2, 3), (2, 64, 13, 11)]


def torch_batch_norm_act(x, rm, rv, w, b, activation, momentum=0.1, eps=1e-5):
    return torch_activate(F.batch_norm(x, rm, rv, w, b, True, momentum, eps), activation)


@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=["x".join(map(str, s)) for s in TRAIN_SHAPES])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_batch_norm_act_train_matches_torch(backend, shape, channels_last, dtype):
    skip_unsupported(backend, dtype)
    if channels_last and len(shape) < 4:
        pytest.skip("no channels_last below 4D")
    c = shape[1]
    # A mean far from 0: a naive E[x^2] - E[x]^2 would fail.
    x = to_layout((2 * torch.randn(shape, device=backend) + 3).to(dtype), channels_last)
    w, b = 1 + 0.3 * torch.randn(c, device=backend), 0.3 * torch.randn(c, device=backend)
    rm, rv = 0.5 * torch.randn(c, device=backend), 0.2 + torch.rand(c, device=backend)
    grad = torch.randn(shape, device=backend).to(dtype)
    count = x.numel() // c
    for activation in ("silu", "leaky_relu", "gelu"):
        rm_g, rv_g, rm64, rv64 = rm.clone(), rv.clone(), rm.double(), rv.double()
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        out = genfast.batch_norm_act(xs, rm_g, rv_g, ws, bs, training=True, momentum=0.3, activation=activation)
        assert out.dtype == dtype and out.stride() == x.stride()
        grads = torch.autograd.grad(out, (xs, ws, bs), grad)
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
        ref64 = torch_batch_norm_act(x64, rm64, rv64, w64, b64, activation, 0.3)
        g64 = torch.autograd.grad(ref64, (x64, w64, b64), grad.double())
        # PyTorch in x's dtype (the parameters cast to it): the yardstick.
        xl, wl, bl = (t.detach().to(dtype).requires_grad_() for t in (x, w, b))
        lowp = torch_batch_norm_act(xl, None, None, wl, bl, activation)
        glowp = torch.autograd.grad(lowp, (xl, wl, bl), grad)
        # A channel's rounding magnified by its rstd (see conditioning_atol); sums over N*S elements.
        dims = (0, *range(2, x.dim()))
        pc = (...,) + (None,) * (x.dim() - 2)
        rstd = torch.rsqrt(x64.detach().var(dim=dims, unbiased=False) + 1e-5)[pc]
        u = 2.0**-24
        wabs = w64.detach().abs()[pc]
        cond_out = (2 * u * rstd * x64.detach().abs() * wabs).cpu()
        cond_x = (8 * u * rstd * (grad.double().abs() * wabs).amax(dims, keepdim=True) * 1.2).expand(shape).cpu()
        assert_close(out, ref64, lowp, atol=1e-6 + cond_out, name=f"{activation} out")
        for name, g, r64, rl in zip(("x", "weight", "bias"), grads, g64, glowp):
            assert g.dtype == (dtype if name == "x" else torch.float32), name
            atol = cond_x if name == "x" else 1e-6 * count ** 0.5 * (1 + r64.abs().cpu())
            assert_close(g, r64, rl, atol=atol, name=f"{activation} grad_{name}")
        # The running statistics: momentum and the unbiased variance as F.batch_norm, in fp32.
        torch.testing.assert_close(rm_g, rm64.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv_g, rv64.float(), rtol=1e-5, atol=1e-6)
        assert rv_g.dtype == torch.float32 and count > 1


def test_batch_norm_act_backward_many_images(backend):
    """Many images of two positions: the Triton backward's partial sums per channel (images x
    splits) exceed what one program reduces, and are summed over the images first."""
    shape = (1100, 3, 2)
    x = (2 * torch.randn(shape, device=backend) + 3).requires_grad_()
    w = (1 + 0.3 * torch.randn(3, device=backend)).requires_grad_()
    b = (0.3 * torch.randn(3, device=backend)).requires_grad_()
    grad = torch.randn(shape, device=backend)
    out = genfast.batch_norm_act(x, None, None, w, b, training=True, activation="silu")
    grads = torch.autograd.grad(out, (x, w, b), grad)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    g64 = torch.autograd.grad(torch_batch_norm_act(x64, None, None, w64, b64, "silu"), (x64, w64, b64), grad.double())
    xl, wl, bl = (t.detach().clone().requires_grad_() for t in (x, w, b))
    glowp = torch.autograd.grad(torch_batch_norm_act(xl, None, None, wl, bl, "silu"), (xl, wl, bl), grad)
    for name, g, r64, rl in zip(("x", "weight", "bias"), grads, g64, glowp):
        assert_close(g, r64, rl, atol=1e-5 * (1 + r64.abs().cpu()), name=f"grad_{name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_batch_norm_act_train_gradcheck_fp64(activation):
    """float64 runs on the reference: gradcheck of the training-mode backward (x, weight, bias)."""
    for shape, channels_last in (((3, 4, 2, 3), False), ((2, 3, 3, 2), True), ((5, 3), False)):
        x = to_layout(torch.randn(shape, dtype=torch.float64), channels_last).requires_grad_()
        w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, w, b: genfast.batch_norm_act(x, None, None, w, b, training=True, activation=activation,
                                                   negative_slope=0.1), (x, w, b))
        assert torch.autograd.gradcheck(
            lambda x: genfast.batch_norm_act(x, None, None, training=True, activation=activation), (x,))


@pytest.mark.parametrize("shape, channels_last", [((3, 5, 4, 7), True), ((4, 6), False), ((2, 3, 11), False)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batch_norm_act_module_training_steps(backend, shape, channels_last, momentum):
    """BatchNormAct trains as nn.BatchNorm*d + activation: outputs, gradients of x, weight and
    bias, running statistics (momentum None: the cumulative average) and num_batches_tracked."""
    bn = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[len(shape)](
        shape[1], momentum=momentum).to(backend)
    with torch.no_grad():
        bn.weight.normal_(1.0, 0.3)
        bn.bias.normal_(0.0, 0.3)
    mine = genfast.nn.BatchNormAct.from_module(bn, torch.nn.ReLU())
    for _ in range(3):
        x = to_layout(torch.randn(shape, device=backend) * 2 + 1, channels_last).requires_grad_()
        out, ref = mine(x), F.relu(bn(x))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ref)
        for a, r in zip(torch.autograd.grad(out, (x, mine.weight, mine.bias), g),
                        torch.autograd.grad(ref, (x, bn.weight, bn.bias), g)):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mine.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(mine.num_batches_tracked) == int(bn.num_batches_tracked) == 3


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=torch.randn(1, 8, 1, 1)), ValueError, "more than 1 value"),
    (dict(x=torch.randn(1, 8)), ValueError, "more than 1 value"),
    (dict(x=torch.randn(8)), ValueError, "x must have shape"),
    (dict(x=torch.ones(2, 8, 3, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(running_mean=torch.zeros(7)), ValueError, "running_mean must have shape"),
    (dict(running_var=torch.ones(8, 1)), ValueError, "running_var must have shape"),
    (dict(running_var=torch.ones(8, device="meta")), ValueError, "running_var must be on the device"),
    (dict(weight=torch.ones(9)), ValueError, "weight must have shape"),
    (dict(bias=torch.ones(8, dtype=torch.int64)), TypeError, "bias must have dtype"),
    (dict(momentum="0.1"), TypeError, "momentum"),
    (dict(eps=-1e-5), ValueError, "eps"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(training=False, running_var=None), ValueError, "running_mean and running_var"),
])
def test_batch_norm_act_bad_input_raises_before_anything_runs(kwargs, error, match, monkeypatch):
    args = {"x": torch.randn(2, 8, 3), "running_mean": torch.zeros(8), "running_var": torch.ones(8),
            "weight": torch.ones(8), "bias": torch.zeros(8), "training": True, **kwargs}
    monkeypatch.setattr(genfast._ops, "implementation", lambda *a: _never)
    x, rm, rv = args.pop("x"), args.pop("running_mean"), args.pop("running_var")
    stats = [(t, t.clone()) for t in (rm, rv) if t is not None and t.device.type == "cpu"]
    with pytest.raises(error, match=match):
        genfast.batch_norm_act(x, rm, rv, **args)
    assert all(torch.equal(t, before) for t, before in stats), "running statistics touched"


def test_batch_norm_act_train_opcheck(backend):
    ops = torch.ops.genfast
    x = torch.randn(3, 6, 5, 4, device=backend, requires_grad=True)
    w, b = (torch.randn(6, device=backend, requires_grad=True) for _ in range(2))
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for args in ((x, w, b, 1e-5, "silu", 0.01), (xcl, None, b, 1e-3, "leaky_relu", 0.2)):
        torch.library.opcheck(ops.batch_norm_act_train.default, args)
    _, mean, rstd, _ = ops.batch_norm_act_train(x.detach(), w.detach(), b.detach(), 1e-5, "gelu", 0.01)
    torch.library.opcheck(ops.batch_norm_act_backward.default,
                          (torch.randn_like(x), x.detach(), w.detach(), b.detach(), mean, rstd, "gelu", 0.01))


def test_batch_norm_act_train_compiled_updates_running_stats():
    x = torch.randn(3, 6, 5, 4, requires_grad=True)
    w, b = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    torch._dynamo.reset()
    rm, rv = torch.zeros(6), torch.ones(6)
    rm_c, rv_c = rm.clone(), rv.clone()

    def fn(x, rm, rv):
        return genfast.batch_norm_act(x, rm, rv, w, b, training=True, activation="relu")

    out = fn(x, rm, rv)
    cout = torch.compile(fn, fullgraph=True)(x, rm_c, rv_c)
    torch.testing.assert_close(cout, out)
    torch.testing.assert_close(rm_c, rm)
    torch.testing.assert_close(rv_c, rv)
    for a, r in zip(torch.autograd.grad(cout.sum(), (x, w, b)), torch.autograd.grad(out.sum(), (x, w, b))):
        torch.testing.assert_close(a, r)
